"""Selective fine-tuning: train a chosen subset of the base model's own parameters.

The lecture notes' selective family: nothing is added to the model; the parameters whose
name matches one of `selective.patterns` (regexes, `re.search`) train and every other one
stays frozen. Norms (`norm`) or biases (`bias`) are a few thousand numbers per layer; a
pattern such as `layers\\.1\\.mlp` selects whole weights. A 4-bit NF4 weight holds packed
codes, not numbers a gradient can move, so a pattern may only select a linear layer loaded
unquantized (`selective.unquantized_modules`, which `load_base_model(skip_modules=)` keeps
in the compute dtype).

On-disk format (version 1), a folder with two files:

- `adapter_config.json`::

      {"peft_type": "SELECTIVE", "qlora_lite_format": 1,
       "base_model_name_or_path": "...", "patterns": ["norm"],
       "unquantized_modules": [], "parameters": ["model.layers.0.input_layernorm.weight", ...]}

- `adapter_model.safetensors`: the trained tensors under their full parameter names as
  they appear in the base checkpoint (`model.layers.0.input_layernorm.weight`), in the
  dtype they trained in. Loading or merging is a replacement of those tensors.

Tied weights are saved once, under the name the checkpoint uses (`model.embed_tokens.weight`
for a model whose lm_head shares it). PEFT has no such adapter type; this format is ours.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import SelectiveConfig
from ..errors import SelectiveError
from ..quant import is_4bit_linear, is_quantized_parameter
from .folder import CONFIG_NAME, FORMAT_VERSION, WEIGHTS_NAME, read_adapter_weights, read_method_config, write_adapter_files
from .method import Method, copy_into_parameters, modify_in_place

PEFT_TYPE = "SELECTIVE"
SHOWN_NAMES = 16  # parameter names listed when a pattern matches nothing
CONFIG_FIELDS = {"patterns": list, "unquantized_modules": list, "parameters": list}  # adapter_config.json key -> type


def apply_selective(model: nn.Module, cfg: SelectiveConfig) -> list[str]:
    """Freeze the model, then unfreeze the parameters whose name matches any of cfg.patterns.

    Trained parameters keep their dtype (fp32 on the CPU, the compute dtype, often bf16, on a
    GPU; AdamW's state is fp32 or 8-bit either way).

    Args:
        model: the base model (plain or 4-bit), frozen or not.
        cfg: the patterns to train; unquantized_modules is only recorded (it acts at load time).

    Returns:
        The trained parameter names, in the model's order.

    Raises:
        SelectiveError: a pattern is not a valid regex, matches nothing, or matches a 4-bit weight.
    """
    names = select_parameters(model, cfg.patterns)
    params = dict(model.named_parameters())
    model.requires_grad_(False)
    for name in names:
        params[name].requires_grad_(True)
    return names


def select_parameters(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the parameters matched by any pattern, after checking each pattern can be trained."""
    if not patterns:
        raise SelectiveError("selective.patterns is empty: name what to train, e.g. [norm] or [bias, norm]")
    # named_parameters() lists a tied tensor once, under the name checkpoints store it by.
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    chosen: set[str] = set()
    for pattern in patterns:
        regex = compile_pattern(pattern)
        hits = [name for name in params if regex.search(name)]
        if not hits:
            raise SelectiveError(describe_no_match(model, pattern, regex, list(params)))
        frozen_4bit = [name for name in hits if is_4bit_weight(name, params[name], modules)]
        if frozen_4bit:
            layers = sorted({name.rsplit(".", 2)[-2] for name in frozen_4bit})
            raise SelectiveError(
                f"selective.patterns: {pattern!r} matches {len(frozen_4bit)} 4-bit NF4 weight(s) such as {frozen_4bit[0]}, "
                "which cannot be trained in NF4 (they hold packed 4-bit codes): add "
                f"{layers} to selective.unquantized_modules, which loads those layers unquantized, or narrow the pattern "
                "(e.g. norm or bias)"
            )
        chosen.update(hits)
    return [name for name in params if name in chosen]


def compile_pattern(pattern: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as err:
        raise SelectiveError(
            f"selective.patterns: {pattern!r} is not a valid regular expression ({err}); "
            "escape literal dots and brackets, e.g. layers\\.1\\.mlp"
        ) from err


def is_4bit_weight(name: str, param: torch.Tensor, modules: dict[str, nn.Module]) -> bool:
    module_path, _, leaf = name.rpartition(".")
    return is_quantized_parameter(param) or (leaf == "weight" and is_4bit_linear(modules.get(module_path, nn.Identity())))


def describe_no_match(model: nn.Module, pattern: str, regex: re.Pattern, names: list[str]) -> str:
    """The error for a pattern that matches nothing: a sample of the names that exist, layers folded."""
    aliases = [(name, p) for name, p in model.named_parameters(remove_duplicate=False) if name not in names and regex.search(name)]
    if aliases:
        # lm_head tied to the embeddings: one tensor, listed (and stored) under the embedding's name only.
        alias, tensor = aliases[0]
        owner = next(name for name, p in model.named_parameters() if p is tensor)
        return (
            f"selective.patterns: {pattern!r} matches only {alias}, which is tied to {owner} (the same tensor, stored "
            f"under that name): select {owner} instead, which trains both"
        )
    folded = list(dict.fromkeys(re.sub(r"\.\d+\.", ".N.", name) for name in names))
    shown = folded[:SHOWN_NAMES] + (["..."] if len(folded) > SHOWN_NAMES else [])
    return (
        f"selective.patterns: {pattern!r} matches no parameter of this model (patterns are regexes searched in the "
        f"parameter names); its parameters are named like {shown}"
    )


# --- saving and loading ------------------------------------------------------------------------


def save_selective(model: nn.Module, cfg: SelectiveConfig, out_dir: str | Path, base_model_name_or_path: str) -> Path:
    """Write the parameters cfg.patterns select, and the config, to out_dir (format in the module docstring).

    Returns:
        out_dir, as a Path.
    """
    names = select_parameters(model, cfg.patterns)
    params = dict(model.named_parameters())
    config = {
        "peft_type": PEFT_TYPE,
        "qlora_lite_format": FORMAT_VERSION,
        "base_model_name_or_path": base_model_name_or_path,
        "patterns": list(cfg.patterns),
        "unquantized_modules": list(cfg.unquantized_modules),
        "parameters": names,
    }
    return write_adapter_files(out_dir, {name: params[name] for name in names}, config)


def load_selective(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> SelectiveConfig:
    """Copy a selective adapter's tensors into the model (checked first: nothing is half-applied).

    Args:
        model: a base loaded as for training: with `skip_modules=unquantized_modules` if the
            adapter trained linear weights.
        adapter_dir: the folder save_selective wrote.
        trainable: True (resume) freezes the rest of the model and lets these train; False freezes them.

    Returns:
        The adapter's SelectiveConfig.
    """
    cfg, weights = read_selective(adapter_dir)
    attach_selective(model, cfg, weights, trainable)
    return cfg


def read_selective_json(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json of a selective adapter as a dict, every field it needs present and of its type."""
    return read_method_config(adapter_dir, PEFT_TYPE, CONFIG_FIELDS)


def read_selective(adapter_dir: str | Path, allow_pickle: bool = False) -> tuple[SelectiveConfig, dict[str, torch.Tensor]]:
    """The adapter's config and tensors (by parameter name), checked to agree with each other."""
    raw = read_selective_json(adapter_dir)
    cfg = SelectiveConfig(patterns=list(raw["patterns"]), unquantized_modules=list(raw["unquantized_modules"]))
    weights = read_adapter_weights(adapter_dir, allow_pickle=allow_pickle)
    if sorted(weights) != sorted(raw["parameters"]):
        differ = sorted(set(weights) ^ set(raw["parameters"]))
        raise SelectiveError(
            f"{adapter_dir}: {WEIGHTS_NAME} holds {len(weights)} tensors but {CONFIG_NAME} lists {len(raw['parameters'])} "
            f"parameters, and {differ[0]} is in only one of them; the folder is incomplete or mixed, re-save the adapter"
        )
    return cfg, weights


def attach_selective(model: nn.Module, cfg: SelectiveConfig, weights: dict[str, torch.Tensor], trainable: bool = False) -> nn.Module:
    """Replace the model's parameters named in weights by those tensors (after checking all of them fit); returns the model."""
    check_selective_fits(model, cfg, weights)
    if trainable:
        model.requires_grad_(False)
    copy_into_parameters(model, weights, trainable)
    return model


def check_selective_fits(model: nn.Module, cfg: SelectiveConfig, weights: dict[str, torch.Tensor]) -> None:
    """Every tensor must name a trainable-kind parameter of this model with the same shape."""
    if not weights:
        raise SelectiveError("the selective adapter holds no tensors; the file is incomplete, re-save it")
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    unknown = sorted(set(weights) - set(params))
    if unknown:
        raise SelectiveError(
            f"adapter tensor {unknown[0]}{f' (and {len(unknown) - 1} more)' if len(unknown) > 1 else ''} is not a parameter "
            "of this base model: the adapter "
            "was made for a different base model (check base_model_name_or_path in adapter_config.json)"
        )
    for name, tensor in sorted(weights.items()):
        if is_4bit_weight(name, params[name], modules):
            raise SelectiveError(
                f"adapter tensor {name} replaces a weight this model holds in 4-bit NF4: load the base with "
                f"skip_modules={cfg.unquantized_modules or [name.rsplit('.', 2)[-2]]} (the adapter's unquantized_modules)"
            )
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise SelectiveError(
                f"adapter tensor {name} has shape {tuple(tensor.shape)} but this base's {name} has shape "
                f"{tuple(params[name].shape)}: the adapter was made for a different base model"
            )


# --- the selective entry in the table of methods (table.py) ---------------------------------------


def count_selective_trainable(cfg: SelectiveConfig, model: nn.Module) -> list[int]:
    return [p.numel() for n, p in model.named_parameters() if any(re.search(pat, n) for pat in cfg.patterns)]


def selects_head(cfg: SelectiveConfig, head_names: list[str]) -> bool:
    return any(re.search(pat, n) for pat in cfg.patterns for n in head_names)


SELECTIVE_METHOD = Method(
    name="selective",
    section="selective",
    peft_type=PEFT_TYPE,
    attach=modify_in_place(apply_selective),
    save=save_selective,
    unquantized_modules=lambda cfg: cfg.unquantized_modules,
    count_trainable=count_selective_trainable,
    trains_head=selects_head,
    # generate reads raw["unquantized_modules"] before loading the base: the reader checks it is there.
    read_config=read_selective_json,
    saved_unquantized_modules=lambda raw: raw["unquantized_modules"],
    read=read_selective,
    check_fits=check_selective_fits,
    apply=attach_selective,
    replaces_base_tensors=True,
    merge_summary="replaced {n} tensors of",
)
