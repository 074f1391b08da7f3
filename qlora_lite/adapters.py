"""Saving and loading LoRA adapters in PEFT's on-disk format.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors
are named `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, exactly as
`peft.PeftModel.save_pretrained` writes them. PEFT loads ours and we load PEFT's.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .config import LoRAConfig, RecipeConfig
from .lora import apply_lora, is_linear, lora_state_dict, remove_lora, resolve_targets
from .method_entry import Method
from .names import is_demo_name
from .quant import DTYPES

PEFT_TYPE = "LORA"

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"  # older PEFT versions wrote this pickle file
PEFT_PREFIX = "base_model.model."
FORMAT_VERSION = 1  # qlora_lite_format of SELECTIVE/BOTTLENECK folders: bump when a version-1 reader would misread one
PROMPT_INFO_NAME = "qlora_lite.json"  # beside the adapter: how training formatted prompts (PEFT ignores it)
DATA_FORMATS = ("alpaca", "chat", "text")
ADAPTER_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# What a Hugging Face hub model id can look like: "name" or "owner/name", never a path from "/", "." or "~".
HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?")
HUB_TIMEOUT_S = 10  # asking the hub whether it has the base must not hang a command when it does not answer

# adapter_config.json keys whose value we read or that cannot change what a plain LoRA layer
# computes. Any other key (DoRA, PiSSA/OLoRA init, aLoRA, rank patterns, ...) must hold its
# neutral value, or we refuse the adapter rather than load it and answer differently from PEFT.
UNDERSTOOD_PEFT_KEYS = {
    "peft_type", "task_type", "base_model_name_or_path", "revision", "r", "lora_alpha", "lora_dropout",
    "target_modules", "use_rslora", "init_lora_weights", "inference_mode", "peft_version", "auto_mapping",
    "exclude_modules", "layers_pattern", "layers_to_transform", "megatron_core", "qalora_group_size",
}
NEUTRAL_VALUES = (None, False, {}, [], "none")
# init_lora_weights values that only decide the starting point; others (pissa, olora, loftq, ...)
# also rewrite the base weights when PEFT loads the adapter, which a plain load would miss.
PLAIN_INITS = (True, False, "gaussian")
NEUTRAL_PEFT_OPTIONS = {
    "bias": "none", "fan_in_fan_out": False, "use_dora": False, "lora_bias": False, "modules_to_save": None,
    "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "trainable_token_indices": None,
}


class AdapterError(ValueError):
    """An adapter folder is missing, corrupt, or made for another base; the message says which and what to do."""


def build_peft_config(cfg: LoRAConfig, targets: list[str], base_model_name_or_path: str) -> dict[str, Any]:
    """adapter_config.json content: PEFT's LoraConfig fields for what our LoRALinear computes."""
    # Named targets are written as the user gave them (PEFT matches them as we do: exact or
    # dotted suffix); all-linear is written as the full module paths, as PEFT itself does.
    target_modules = sorted(targets) if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": target_modules,
        "use_rslora": cfg.use_rslora,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
        **NEUTRAL_PEFT_OPTIONS,
    }


def save_adapter(model: nn.Module, cfg: LoRAConfig, out_dir: str | Path, base_model_name_or_path: str) -> Path:
    """Write the model's LoRA weights and config to out_dir in PEFT's format."""
    return save_adapter_state(lora_state_dict(model), cfg, out_dir, base_model_name_or_path)


def save_adapter_state(state: dict[str, torch.Tensor], cfg: LoRAConfig, out_dir: str | Path, base_model_name_or_path: str) -> Path:
    """save_adapter from the LoRA tensors by module path (`...q_proj.lora_A.weight`), e.g. gathered from FSDP shards."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if not state:
        raise AdapterError("the model carries no LoRA layers to save; call apply_lora first")
    targets = sorted({ADAPTER_KEY.match(k).group("module") for k in state})
    tensors = {PEFT_PREFIX + k: v.contiguous() for k, v in state.items()}
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    (out_dir / CONFIG_NAME).write_text(json.dumps(build_peft_config(cfg, targets, base_model_name_or_path), indent=2))
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
    if is_demo_name(name):
        from .config import ModelConfig
        from .names import resolve_model_path

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


def find_hub_problem(repo_id: str) -> str | None:
    """None when the Hugging Face hub has a model of this id (in the local cache, or answering); else why not, in words."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None  # downloaded before: transformers loads it from the cache, online or not
    except ValueError:  # not a valid repo id after all (HFValidationError): the hub cannot have it
        return "not a valid hub id"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so the hub was not asked"
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # it exists; loading says how to get access
    except RepositoryNotFoundError:
        return "the hub has no public model of that id"
    except Exception as err:  # noqa: BLE001 - network errors come in many types; all mean the hub did not answer
        return f"the hub could not be reached: {type(err).__name__}"
    return None


def read_adapter_config(adapter_dir: str | Path) -> tuple[LoRAConfig, dict[str, Any]]:
    """Parse adapter_config.json into our LoRAConfig (plus the raw dict), refusing what we cannot compute."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / CONFIG_NAME
    raw = read_adapter_json(adapter_dir)
    if raw.get("peft_type") != PEFT_TYPE:
        raise AdapterError(f"{path}: peft_type is {raw.get('peft_type')!r}; this loader reads {PEFT_TYPE} adapters")
    unsupported = [k for k, v in raw.items() if k not in UNDERSTOOD_PEFT_KEYS and not any(v == n and type(v) is type(n) for n in NEUTRAL_VALUES)]
    if raw.get("init_lora_weights", True) not in PLAIN_INITS:
        unsupported.append("init_lora_weights")
    if unsupported:
        shown = ", ".join(f"{k}={raw[k]!r}" for k in unsupported)
        raise AdapterError(f"{path}: {shown} not supported by qlora-lite's plain LoRA layer; use PEFT to merge or run this adapter")
    targets = raw.get("target_modules")
    cfg = LoRAConfig(
        r=int(raw["r"]),
        alpha=float(raw.get("lora_alpha", 8)),
        dropout=float(raw.get("lora_dropout", 0.0)),
        target_modules="all-linear" if targets in ("all-linear", None) or isinstance(targets, str) else list(targets),
        use_rslora=bool(raw.get("use_rslora", False)),
    )
    return cfg, raw


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


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False, allow_pickle: bool = False) -> LoRAConfig:
    """Wrap the model's layers named in the adapter and load its weights; checks it fits this base.

    Every adapter tensor must land in a layer of the right shape: a shape mismatch or a module
    the model lacks means the adapter was made for a different base, and nothing is changed.
    """
    cfg, _ = read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir, allow_pickle=allow_pickle)
    attach_adapter(model, cfg, weights, trainable)
    return cfg


def attach_adapter(model: nn.Module, cfg: LoRAConfig, weights: dict[str, torch.Tensor], trainable: bool = False) -> list[str]:
    """Wrap the layers the weights name in LoRALinear and copy the weights in (kept in their own dtype).

    Returns the wrapped module paths. Checks everything before changing the model.
    """
    targets = check_adapter_fits(model, weights, cfg.r)
    # Keep the file's precision: an fp32 adapter loaded into bf16 layers would answer differently.
    saved_dtype = next(iter(weights.values())).dtype
    cfg.dtype = next((name for name, dtype in DTYPES.items() if dtype == saved_dtype), cfg.dtype)
    apply_lora(model, cfg, targets)
    state = lora_state_dict(model)
    missing = sorted(set(state) - set(weights))
    if missing:  # cannot happen after check_adapter_fits, but a partial load must never pass silently
        raise AdapterError(f"adapter lacks tensors {missing[:4]}...; the file is incomplete")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name in weights:
                param.copy_(weights[name].to(param.dtype))
                param.requires_grad_(trainable)
    return targets


def check_adapter_fits(model: nn.Module, weights: dict[str, torch.Tensor], r: int) -> list[str]:
    """The module paths the adapter targets, after checking each exists here with matching shapes."""
    modules = dict(model.named_modules())
    targets: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = ADAPTER_KEY.match(key)
        if not match:
            raise AdapterError(f"adapter tensor {key!r} is not a LoRA A/B weight; only plain LoRA adapters are supported")
        targets.setdefault(match.group("module"), {})[match.group("part")] = tensor
    for module_path, parts in sorted(targets.items()):
        if set(parts) != {"A", "B"}:
            raise AdapterError(f"adapter has lora_{'A' if 'B' in parts else 'B'} missing for {module_path}; the file is incomplete")
        layer = modules.get(module_path)
        if layer is None or not is_linear(getattr(layer, "base_layer", layer)):
            raise AdapterError(
                f"adapter targets {module_path}, which this base model does not have as a linear layer: "
                "the adapter was made for a different base model (check base_model_name_or_path in adapter_config.json)"
            )
        base = getattr(layer, "base_layer", layer)
        want = {"A": (r, base.in_features), "B": (base.out_features, r)}
        for part, shape in want.items():
            if tuple(parts[part].shape) != shape:
                raise AdapterError(
                    f"adapter tensor {module_path}.lora_{part}.weight has shape {tuple(parts[part].shape)} but this base "
                    f"needs {shape}: the adapter was made for a different base model"
                )
    return sorted(targets)


# --- adapter_config.json of the methods PEFT does not have ------------------------------------------
# Every adapter type's config is read here; SELECTIVE and BOTTLENECK are qlora-lite's own types.


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


# --- the LoRA entry in the table of methods (methods.py) --------------------------------------


def attach_lora_method(model: nn.Module, cfg: RecipeConfig, tokenizer) -> nn.Module:
    apply_lora(model, cfg.lora)
    return model


def save_lora_method(model: nn.Module, cfg: RecipeConfig, folder: Path, base_path: str) -> None:
    save_adapter(model, cfg.lora, folder, base_path)


def load_lora_method(model: nn.Module, cfg: RecipeConfig, folder: Path, trainable: bool) -> nn.Module:
    load_adapter(model, folder, trainable=trainable)
    return model


def count_lora_trainable(cfg: RecipeConfig, model: nn.Module) -> list[int]:
    """A (r, in) and B (out, r) for each target layer."""
    modules = dict(model.named_modules())
    sizes = []
    for name in resolve_targets(model, cfg.lora.target_modules):
        layer = modules[name]
        sizes += [cfg.lora.r * layer.in_features, layer.out_features * cfg.lora.r]
    return sizes


def read_lora(adapter_dir: Path, allow_pickle: bool) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    cfg, _ = read_adapter_config(adapter_dir)
    return cfg, read_adapter_weights(adapter_dir, allow_pickle)


def check_lora_fits(model: nn.Module, cfg: LoRAConfig, weights: dict[str, torch.Tensor]) -> None:
    check_adapter_fits(model, weights, cfg.r)


def apply_lora_weights(model: nn.Module, cfg: LoRAConfig, weights: dict[str, torch.Tensor]) -> nn.Module:
    # attach_adapter records the weights' dtype in its config: give it a copy, keep the caller's as read.
    attach_adapter(model, replace(cfg), weights)
    return model


LORA_METHOD = Method(
    name="lora",
    peft_type=PEFT_TYPE,
    attach=attach_lora_method,
    save=save_lora_method,
    load=load_lora_method,
    count_trainable=count_lora_trainable,
    trainable_dtype=lambda cfg: cfg.lora.dtype,
    plan_note="",
    read_config=lambda adapter_dir: read_adapter_config(adapter_dir)[1],
    read=read_lora,
    check_fits=check_lora_fits,
    apply=apply_lora_weights,
    remove=remove_lora,
    merge_summary="merged {n} LoRA layers into",
)
