"""The shape of one entry in the table of methods (`methods.py`): what a fine-tuning method is and can do.

Each method module (`adapters.py` for LoRA, `prompt_tuning.py`, `selective.py`, `bottleneck.py`;
full fine-tuning in `methods.py`) builds one `Method`; `methods.py` collects them. This module
only defines the shape, so that the method modules can build their entry without importing
the table that imports them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import RecipeConfig


def check_nothing(cfg: RecipeConfig) -> None:
    """No settings specific to the method."""


def no_modules(cfg: RecipeConfig) -> list[str] | None:
    """Every linear layer of the base may be quantized."""
    return None


def no_saved_modules(raw: dict[str, Any]) -> list[str]:
    return []


def no_virtual_tokens(cfg: RecipeConfig) -> int:
    return 0


def head_frozen(cfg: RecipeConfig, head_names: list[str]) -> bool:
    return False


def default_trainable_dtype(cfg: RecipeConfig) -> str:
    return "bfloat16"


def remove_nothing(model: nn.Module) -> None:
    """The method adds no layers to the base."""


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: its names and what the rest of the package asks of it.

    Recipe side (fit, config, planner) and folder side (generate's switcher, merge, the merge
    report). Folder-side fields are None where the method writes no adapter folder (full).
    """

    name: str  # the recipe's `method:` value
    peft_type: str | None  # adapter_config.json's peft_type; None: not an adapter folder (full)

    # --- recipe side: fit() and config validation
    attach: Callable[[nn.Module, RecipeConfig, Any], nn.Module]  # (base, cfg, tokenizer) -> model to train
    save: Callable[[nn.Module, RecipeConfig, Path, str], None]  # (model, cfg, folder, base path)
    load: Callable[[nn.Module, RecipeConfig, Path, bool], nn.Module]  # (base, cfg, folder, trainable) -> model
    validate: Callable[[RecipeConfig], None] = check_nothing  # raises ConfigError for settings the method cannot take
    unquantized_modules: Callable[[RecipeConfig], list[str] | None] = no_modules  # base linears kept out of NF4

    # --- planner facts
    count_trainable: Callable[[RecipeConfig, nn.Module], list[int]] | None = None  # element count of each trained tensor
    trainable_dtype: Callable[[RecipeConfig], str] = default_trainable_dtype
    trains_head: Callable[[RecipeConfig, list[str]], bool] = head_frozen  # (cfg, names of the head's parameters)
    virtual_tokens: Callable[[RecipeConfig], int] = no_virtual_tokens  # tokens added before every example
    plan_note: str = "trainable part estimated from its parameters; activations as for LoRA"

    # --- folder side: generate's switcher, merge and its report
    read_config: Callable[[Path], dict[str, Any]] | None = None  # adapter_config.json, checked by the method's reader
    saved_unquantized_modules: Callable[[dict[str, Any]], list[str]] = no_saved_modules  # from adapter_config.json
    read: Callable[[Path, bool], tuple[Any, dict[str, torch.Tensor]]] | None = None  # (folder, allow_pickle) -> (cfg, weights)
    check_fits: Callable[[nn.Module, Any, dict[str, torch.Tensor]], None] | None = None  # raises AdapterError
    apply: Callable[[nn.Module, Any, dict[str, torch.Tensor]], nn.Module] | None = None  # -> the model to run
    remove: Callable[[nn.Module], None] = remove_nothing  # take the method's layers off the base again
    replaces_base_tensors: bool = False  # apply overwrites base tensors (the switcher keeps the originals)
    merge_refusal: str | None = None  # why it cannot be merged ({adapter_dir} is filled in); None: it merges
    merge_summary: str = ""  # the merge report's verb phrase, {n} = modules merged
