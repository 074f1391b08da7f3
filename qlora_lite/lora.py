"""LoRA: a trainable low-rank update beside each frozen linear layer.

    h = W0 x + (alpha / r) * B A dropout(x)        (alpha / sqrt(r) with rsLoRA)

W0 is the frozen base weight (a plain `nn.Linear` or a bitsandbytes NF4 `Linear4bit`),
A (r x in) starts Kaiming-uniform and B (out x r) starts at zero, so a fresh adapter leaves
the model's output unchanged. The module keeps PEFT's attribute names (`base_layer`,
`lora_A`, `lora_B`) so that its state dict keys are PEFT's on-disk names.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn

from .config import LoRAConfig
from .quant import DTYPES, is_4bit_linear


class LoRAError(ValueError):
    """A LoRA setting the user chose cannot be applied to this model; the message says why and what to do."""


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


class LoRALinear(LinearWrapper):
    """A frozen linear layer plus a trainable low-rank update: h = W0 x + (alpha/r) B A dropout(x)."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise LoRAError(f"LoRA rank r must be a positive integer, got {r}")
        self.base_layer = base_layer
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=dtype)
        self.merged = False
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # Same init as PEFT and the LoRA paper: A like nn.Linear's default, B zero.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)  # (..., out)
        if self.merged:
            return result
        dropped = self.lora_dropout(x)  # in x's dtype (bf16 on a GPU): no full-width fp32 copy and fp32 mask
        if not torch.is_autocast_enabled(x.device.type):
            # Under autocast the matmul casts its input to bf16 anyway, so an fp32 copy of the
            # (tokens x in_features) activation would be made, kept for backward and thrown away.
            dropped = dropped.to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(dropped))  # (..., out)
        return result + (update * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(alpha/r) B A in fp32, the (out, in) matrix the adapter adds to W0."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def merge(self) -> None:
        """Fold the update into W0 (full-precision bases only; 4-bit merging is export's job)."""
        if self.merged:
            return
        self._check_mergeable()
        weight = self.base_layer.weight
        weight.data = (weight.data.float() + self.delta_weight()).to(weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self.base_layer.weight
        weight.data = (weight.data.float() - self.delta_weight()).to(weight.dtype)
        self.merged = False

    def _check_mergeable(self) -> None:
        if is_4bit_linear(self.base_layer):
            raise LoRAError(
                "cannot merge LoRA into a 4-bit layer in place: re-quantizing would add rounding error; "
                "use `qlora-lite merge`, which merges into the original full-precision weights"
            )

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:.4g}"


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_4bit_linear(module)


def find_linear_names(model: nn.Module) -> list[str]:
    """Module paths of every linear layer LoRA may wrap: all but the output head (lm_head)."""
    output_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [
        name
        for name, module in model.named_modules()
        # lora_A / lora_B are nn.Linear too: never wrap an adapter's own layers.
        if is_linear(module) and module is not output_head and not name.endswith("lm_head") and ".lora_" not in name
    ]


def resolve_targets(model: nn.Module, target_modules: list[str] | str) -> list[str]:
    """Module paths to wrap: `all-linear`, or each name matched exactly or as a dotted suffix.

    Raises LoRAError for a name that matches nothing (listing the names that exist) and for a
    name that matches a module that is not a linear layer.
    """
    linear_names = find_linear_names(model)
    if target_modules == "all-linear":
        return linear_names
    modules = dict(model.named_modules())
    chosen: list[str] = []
    for target in target_modules:
        hits = [name for name in modules if name == target or name.endswith("." + target)]
        if not hits:
            short = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
            raise LoRAError(
                f"lora.target_modules: {target!r} matches no module of this model; "
                f"its linear layers are named {short} (or use all-linear)"
            )
        for name in hits:
            if not is_linear(modules[name]):
                raise LoRAError(
                    f"lora.target_modules: {target!r} matches {name}, a {type(modules[name]).__name__}, "
                    "not a linear layer; LoRA wraps nn.Linear / Linear4bit layers only"
                )
            if name.endswith("lm_head") or (hasattr(model, "get_output_embeddings") and modules[name] is model.get_output_embeddings()):
                raise LoRAError(f"lora.target_modules: {target!r} names the output head {name}; LoRA on lm_head is not supported")
            if name not in chosen:
                chosen.append(name)
    return chosen


def apply_lora(model: nn.Module, cfg: LoRAConfig, targets: list[str] | None = None) -> list[str]:
    """Freeze the model and wrap its target linear layers in LoRALinear. Returns the wrapped paths."""
    if cfg.r <= 0:
        raise LoRAError(f"lora.r must be a positive integer, got {cfg.r}")
    targets = targets if targets is not None else resolve_targets(model, cfg.target_modules)
    if not targets:
        kinds = sorted({type(m).__name__ for m in model.modules() if "Linear" in type(m).__name__ or "Conv1D" in type(m).__name__})
        raise LoRAError(
            f"no layer to wrap: this model has no nn.Linear / Linear4bit layers besides lm_head (found {kinds}); "
            "qlora-lite's LoRA supports Llama-style architectures built from nn.Linear"
        )
    model.requires_grad_(False)
    dtype = DTYPES[cfg.dtype]
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if isinstance(base, LoRALinear):
            raise LoRAError(f"{name} already carries a LoRA adapter; load one adapter per base model instance")
        layer = LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, dtype)
        layer.train(model.training)  # a new module starts in train mode: keep an eval model's dropout off
        setattr(parent, child, layer)
    return targets


def remove_lora(model: nn.Module) -> list[str]:
    """Put the plain base layers back where apply_lora wrapped them (unmerging first). Returns their paths."""
    removed = []
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer.base_layer)
        removed.append(name)
    return removed


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by module path (`...q_proj.lora_A.weight`)."""
    return {name: p.detach() for name, p in model.named_parameters() if re.search(r"\.lora_[AB]\.weight$", name)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its full-precision base weight (for evaluation or export)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()
