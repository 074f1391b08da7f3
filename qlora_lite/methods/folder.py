"""The adapter folder every method writes: PEFT's on-disk layout, and what qlora-lite keeps beside it.

An adapter folder holds `adapter_config.json` (its `peft_type` says which method wrote it) and
`adapter_model.safetensors`, whose tensor names are the method's (LoRA and prompt tuning: exactly
PEFT's, with PEFT's `base_model.model.` prefix on LoRA's). PEFT loads our LORA and PROMPT_TUNING
folders and we load its. SELECTIVE and BOTTLENECK are qlora-lite's own types in the same layout,
versioned by `qlora_lite_format`. Beside the adapter, `qlora_lite.json` records the data format
training used, so `generate` and `export-gguf` prompt as training did (PEFT ignores the file).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import DATA_FORMATS, ModelConfig
from ..errors import AdapterError
from ..gguf_base import is_gguf_name
from ..model_paths import HUB_ID, find_hub_problem, is_demo_name, resolve_model_path

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # older PEFT versions wrote this pickle file
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1  # qlora_lite_format of SELECTIVE/BOTTLENECK folders: bump when a version-1 reader would misread one
PROMPT_INFO_NAME = "qlora_lite.json"  # beside the adapter: how training formatted prompts (PEFT ignores it)


def write_adapter_files(out_dir: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """An adapter folder: the tensors (made contiguous, on the CPU) as safetensors, and adapter_config.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out_dir


def write_prompt_info(folder: str | Path, data_format: str) -> Path:
    """Record beside an adapter the data format it was trained on (for `generate --format auto`)."""
    path = Path(folder) / PROMPT_INFO_NAME
    path.write_text(json.dumps({"data_format": data_format}, indent=2) + "\n")
    return path


def read_prompt_info(adapter_dir: str | Path) -> dict[str, Any]:
    """The adapter's qlora_lite.json as a dict; empty when the adapter was made elsewhere."""
    path = Path(adapter_dir) / PROMPT_INFO_NAME
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); delete it and pass --format alpaca|chat|text") from err
    if not isinstance(info, dict) or info.get("data_format") not in DATA_FORMATS:
        raise AdapterError(
            f"{path}: data_format must be one of {', '.join(DATA_FORMATS)}, got {info!r}; fix or delete the file and pass --format"
        )
    return info


def find_base_model(adapter_dir: str | Path, peft_config: dict[str, Any], base: str | None = None) -> str:
    """The base to put the adapter on: `base` if given, else the one adapter_config.json names.

    A folder (absolute, or relative to the current directory) is used as it is, and `demo:`
    names resolve to the cached demo base. A name that is no folder here is refused before any
    slow load unless it can be a hub id (no leading "/", "." or "~", at most one "/") that the
    hub, or its local cache, has: an adapter trained elsewhere, or whose base has moved, names a
    folder this machine does not have, and the hub's "not found" would only mislead.

    Raises:
        AdapterError: No base is named, or the one named is neither a folder here nor on the hub.
    """
    name = base or peft_config.get("base_model_name_or_path")
    if not name:
        raise AdapterError(f"{adapter_dir}/{CONFIG_NAME} names no base model (base_model_name_or_path); pass --base PATH")
    if is_demo_name(name) or is_gguf_name(name):
        return resolve_model_path(ModelConfig(name_or_path=name))
    path = Path(name).expanduser()
    if path.exists():
        return str(path) if name.startswith("~") else name
    where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
    if not HUB_ID.fullmatch(name):
        if base:
            raise AdapterError(
                f"--base names base model {name}, which does not exist on this machine; "
                "pass --base PATH pointing at the model the adapter was trained on"
            )
        raise AdapterError(
            f"the adapter's base {name} ({adapter_dir}/{CONFIG_NAME} base_model_name_or_path) is not a folder here{where}; "
            "it may have moved: pass --base PATH"
        )
    problem = find_hub_problem(name)
    if problem is None:
        return name
    check = "check its spelling, the network, or your login (hf auth login) for a private model"
    if base:
        raise AdapterError(
            f"--base {name} is not a folder here{where} nor a model on the Hugging Face hub ({problem}): "
            f"pass the base model's folder, or a hub id the hub has ({check})"
        )
    raise AdapterError(
        f"the adapter's base {name} ({adapter_dir}/{CONFIG_NAME} base_model_name_or_path) is not a folder here{where} "
        f"nor a model on the Hugging Face hub ({problem}): if it is a folder that moved or was relative to where "
        f"training ran, pass --base PATH; if it is a hub id, {check}"
    )


def read_adapter_weights(adapter_dir: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The adapter's tensors keyed by module path (PEFT's `base_model.model.` prefix removed).

    Weights are read from safetensors. A folder with only PEFT's older `adapter_model.bin` is
    refused unless allow_pickle is set, and even then it is read with `weights_only=True`.
    """
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / WEIGHTS_NAME
    pickled = adapter_dir / PICKLE_WEIGHTS_NAME
    if not path.is_file():
        if pickled.is_file() and not allow_pickle:
            raise AdapterError(
                f"{adapter_dir} holds only {PICKLE_WEIGHTS_NAME}, a pickle file that can run code when loaded; "
                "if you trust its source pass --allow-pickle (read with torch.load(weights_only=True)), "
                "or convert it to safetensors first"
            )
        if not pickled.is_file():
            raise AdapterError(f"{adapter_dir}: {WEIGHTS_NAME} is missing; the adapter was not fully written")
    try:
        if path.is_file():
            tensors = load_file(str(path))
        else:
            tensors = torch.load(str(pickled), map_location="cpu", weights_only=True)
    except (SafetensorError, OSError, ValueError, RuntimeError, EOFError) as err:
        shown = path if path.is_file() else pickled
        raise AdapterError(f"{shown} is corrupt or truncated ({err}); re-save the adapter or use an earlier checkpoint") from err
    out = {}
    for key, value in tensors.items():
        key = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        out[key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")] = value
    return out


def read_adapter_json(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json as a dict, whatever its peft_type; clear errors for a missing or corrupt file."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{adapter_dir} is not an adapter folder: {CONFIG_NAME} is missing (pass the folder that save wrote, e.g. runs/NAME/adapter)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterError(f"{path} is not valid JSON ({err}); the file is corrupt, re-save the adapter") from err
    if not isinstance(raw, dict):
        raise AdapterError(f"{path} must hold a JSON object, got {type(raw).__name__}; the file is corrupt, re-save the adapter")
    return raw


def read_method_config(adapter_dir: str | Path, peft_type: str, fields: dict[str, type]) -> dict[str, Any]:
    """adapter_config.json of a qlora-lite-only adapter type, refusing another type, a newer format,
    or a missing field (fields: key -> the type its value must have)."""
    raw = read_adapter_json(adapter_dir)
    path = Path(adapter_dir) / CONFIG_NAME
    if raw.get("peft_type") != peft_type:
        raise AdapterError(
            f"{path}: peft_type is {raw.get('peft_type')!r}, but this loader reads {peft_type} adapters; "
            "load the folder with the method it was trained with"
        )
    version = raw.get("qlora_lite_format")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AdapterError(
            f"{path}: qlora_lite_format is {version!r}, but this qlora-lite reads format {FORMAT_VERSION}; "
            "upgrade qlora-lite to load it (or the file is corrupt)"
        )
    for key, kind in fields.items():
        # bool is an int in Python, but never a valid size.
        if not isinstance(raw.get(key), kind) or (kind is int and isinstance(raw[key], bool)):
            raise AdapterError(
                f"{path}: {key} must be of type {kind.__name__}, got {raw.get(key)!r}; the file is corrupt or was edited, re-save the adapter"
            )
    return raw
