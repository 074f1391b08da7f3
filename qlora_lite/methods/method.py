"""The `Method` type: what a fine-tuning method is and can do, as the rest of the package asks it.

Each method module (`lora.py`, `prompt_tuning.py`, `selective.py`, `bottleneck.py`, `full.py`)
builds one `Method` from its own functions; `table.py` collects them. A method's settings are one
section of the recipe (`cfg.lora`, `cfg.prompt`, ...): `Method.settings(cfg)` picks it, and every
function of the entry takes that section, never the whole recipe, so the method modules need no
glue between the recipe and their functions.

The folder side is one path for serving and for resuming: `read` a saved folder into settings
and tensors, `check_fits` a base, `apply` them to it. `generate`'s switcher reads once and applies
at each switch; `Method.load` (a checkpoint back onto a fresh base) reads and applies at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RecipeConfig

Weights = dict[str, torch.Tensor]  # what a folder holds, by the name the method gives each tensor


def modify_in_place(apply: Callable[[nn.Module, Any], Any]) -> Callable[[nn.Module, Any, Any], nn.Module]:
    """`attach` for a method that changes the base in place (apply(base, settings)): the base is then the model to train."""

    def attach(model: nn.Module, settings: Any, tokenizer: Any) -> nn.Module:
        apply(model, settings)
        return model

    return attach


def no_modules(settings: Any) -> list[str] | None:
    """Every linear layer of the base may be quantized."""
    return None


def no_virtual_tokens(settings: Any) -> int:
    return 0


def head_frozen(settings: Any, head_names: list[str]) -> bool:
    return False


def compute_dtype(settings: Any) -> str:
    """The method trains tensors of the base, which keep the compute dtype (bf16 on a GPU)."""
    return "bfloat16"


def remove_nothing(model: nn.Module) -> None:
    """The method adds no layers to the base."""


class LinearWrapper(nn.Module):
    """A module standing in for the linear layer `base_layer` it wraps: same features and weight."""

    base_layer: nn.Module

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def weight(self) -> torch.Tensor:
        # transformers reads `.weight` of some projections (dtype checks, tied weights).
        return self.base_layer.weight


def replace_submodule(model: nn.Module, path: str, new: nn.Module) -> None:
    """Put `new` in the place of the module at dotted `path` (e.g. `model.layers.0.mlp.down_proj`)."""
    parent_path, _, child = path.rpartition(".")
    # A top-level child has parent_path "", and get_submodule("") is the model itself: no special case.
    setattr(model.get_submodule(parent_path), child, new)


def copy_into_parameters(model: nn.Module, weights: Weights, trainable: bool) -> None:
    """Each tensor into the model's parameter of the same name (cast to its dtype), trained or frozen as asked."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in weights.items():
            params[name].copy_(tensor.to(params[name].dtype))
            params[name].requires_grad_(trainable)


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: its names and what the rest of the package asks of it.

    Recipe side (fit, the planner) and folder side (generate's switcher, merge, resume). Folder-side
    fields are None where the method writes no adapter folder (full, whose `load_checkpoint` reads its
    plain checkpoint instead). `settings` below means the method's recipe section.
    """

    name: str  # the recipe's `method:` value, one of config.METHODS
    section: str | None  # the recipe section holding its settings (`lora` for cfg.lora); None: it has none
    peft_type: str | None  # adapter_config.json's peft_type; None: not an adapter folder (full)

    # --- recipe side: fit()
    attach: Callable[[nn.Module, Any, Any], nn.Module]  # (base, settings, tokenizer) -> the model to train
    save: Callable[[nn.Module, Any, Path, str], Any]  # (model, settings, folder, base path)
    unquantized_modules: Callable[[Any], list[str] | None] = no_modules  # base linears kept out of NF4

    # --- planner facts
    count_trainable: Callable[[Any, nn.Module], list[int]] | None = None  # (settings, meta model) -> element count of each trained tensor
    trainable_dtype: Callable[[Any], str] = compute_dtype  # (settings) -> dtype name of the trained tensors
    trains_head: Callable[[Any, list[str]], bool] = head_frozen  # (settings, names of the head's parameters)
    virtual_tokens: Callable[[Any], int] = no_virtual_tokens  # tokens added before every example
    plan_note: str = "trainable part estimated from its parameters; activations as for LoRA"

    # --- folder side: generate's switcher, merge and its report, resume
    read_config: Callable[[Path], dict[str, Any]] | None = None  # adapter_config.json, checked by the method's reader
    saved_unquantized_modules: Callable[[dict[str, Any]], list[str]] = lambda raw: []  # from adapter_config.json
    read: Callable[[Path, bool], tuple[Any, Weights]] | None = None  # (folder, allow_pickle) -> (settings, weights)
    check_fits: Callable[[nn.Module, Any, Weights], Any] | None = None  # raises AdapterError; changes nothing
    apply: Callable[[nn.Module, Any, Weights, bool], nn.Module] | None = None  # (base, settings, weights, trainable) -> model to run
    remove: Callable[[nn.Module], Any] = remove_nothing  # take the method's layers off the base again
    load_checkpoint: Callable[[nn.Module, Path, bool], nn.Module] | None = None  # for a method with no `read` (full)
    replaces_base_tensors: bool = False  # apply overwrites base tensors (the switcher keeps the originals)
    merge_refusal: str | None = None  # why it cannot be merged ({adapter_dir} is filled in); None: it merges
    merge_summary: str = ""  # the merge report's verb phrase, {n} = modules merged

    def settings(self, cfg: RecipeConfig) -> Any:
        """The method's section of the recipe (None for a method without settings)."""
        return getattr(cfg, self.section) if self.section is not None else None

    def load(self, model: nn.Module, folder: Path, trainable: bool) -> nn.Module:
        """What `save` wrote, back onto a freshly loaded base (checked first); returns the model to train or run."""
        if self.load_checkpoint is not None:
            return self.load_checkpoint(model, folder, trainable)
        settings, weights = self.read(folder, False)
        device = next(model.parameters()).device
        return self.apply(model, settings, {name: tensor.to(device) for name, tensor in weights.items()}, trainable)
