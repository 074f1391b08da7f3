"""LoRA: a trainable low-rank update beside each frozen linear layer, saved in PEFT's LORA format.

    h = W0 x + (alpha / r) * B A dropout(x)        (alpha / sqrt(r) with rsLoRA: `lora_scale`)

W0 is the frozen base weight (a plain `nn.Linear` or a bitsandbytes NF4 `Linear4bit`),
A (r x in) starts Kaiming-uniform and B (out x r) starts at zero, so a fresh adapter leaves
the model's output unchanged. The module keeps PEFT's attribute names (`base_layer`,
`lora_A`, `lora_B`) so that its state dict keys are PEFT's on-disk names.

On disk (`methods/folder.py`): adapter_config.json with PEFT's LoraConfig keys, and
adapter_model.safetensors whose tensors are `base_model.model.<module path>.lora_A.weight` /
`.lora_B.weight` (`LORA_KEY`), exactly as `peft.PeftModel.save_pretrained` writes them. PEFT
loads ours and we load PEFT's. The key format and the scale are known here only: merge and the
GGUF export read pairs with `collect_lora_pairs` and scale them with `lora_scale`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import LoRAConfig
from ..errors import AdapterError, LoRAError
from ..quant import DTYPE_NAMES, DTYPES, is_4bit_linear
from .folder import CONFIG_NAME, PEFT_PREFIX, read_adapter_json, read_adapter_weights, write_adapter_files
from .method import LinearWrapper, Method, copy_into_parameters, modify_in_place, replace_submodule

PEFT_TYPE = "LORA"
LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
"""A LoRA tensor's name without PEFT's prefix: `<module path>.lora_A.weight` (r, in) or `.lora_B.weight` (out, r)."""

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


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """What B A is multiplied by: alpha / r, or alpha / sqrt(r) with rsLoRA (as PEFT computes it)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


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
        self.scaling = lora_scale(alpha, r, use_rslora)
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
        base = model.get_submodule(name)
        if isinstance(base, LoRALinear):
            raise LoRAError(f"{name} already carries a LoRA adapter; load one adapter per base model instance")
        layer = LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout, cfg.use_rslora, dtype)
        layer.train(model.training)  # a new module starts in train mode: keep an eval model's dropout off
        replace_submodule(model, name, layer)
    return targets


def remove_lora(model: nn.Module) -> list[str]:
    """Put the plain base layers back where apply_lora wrapped them (unmerging first). Returns their paths."""
    removed = []
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        replace_submodule(model, name, layer.base_layer)
        removed.append(name)
    return removed


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors, keyed by module path (`...q_proj.lora_A.weight`)."""
    return {name: p.detach() for name, p in model.named_parameters() if LORA_KEY.match(name)}


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its full-precision base weight (for evaluation or export)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


# --- PEFT's LORA folder ------------------------------------------------------------------------------


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
    if not state:
        raise AdapterError("the model carries no LoRA layers to save; call apply_lora first")
    targets = sorted(collect_lora_pairs(state))
    tensors = {PEFT_PREFIX + k: v for k, v in state.items()}
    return write_adapter_files(out_dir, tensors, build_peft_config(cfg, targets, base_model_name_or_path))


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


def read_lora_adapter(adapter_dir: str | Path, allow_pickle: bool = False) -> tuple[LoRAConfig, dict[str, torch.Tensor]]:
    """The adapter's LoRAConfig and tensors (by module path); its dtype is the tensors' own.

    Keeping the file's precision matters: an fp32 adapter loaded into bf16 layers would answer differently.
    """
    cfg, _ = read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir, allow_pickle=allow_pickle)
    saved = next(iter(weights.values())).dtype if weights else None
    cfg.dtype = DTYPE_NAMES.get(saved, cfg.dtype)
    return cfg, weights


def collect_lora_pairs(weights: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Module path -> (A, B), the pair whose product, scaled, is that module's weight delta.

    Raises:
        AdapterError: A tensor that is no LoRA A/B weight, or a pair with one half missing.
    """
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in weights.items():
        match = LORA_KEY.match(key)
        if not match:
            raise AdapterError(f"adapter tensor {key!r} is not a LoRA A/B weight; qlora-lite reads plain LoRA adapters only")
        parts.setdefault(match.group("module"), {})[match.group("part")] = tensor
    for module, found in sorted(parts.items()):
        if set(found) != {"A", "B"}:
            raise AdapterError(f"adapter has lora_{'A' if 'B' in found else 'B'} missing for {module}; the file is incomplete")
    return {module: (found["A"], found["B"]) for module, found in parts.items()}


def compute_delta(pair: tuple[torch.Tensor, torch.Tensor], cfg: LoRAConfig) -> torch.Tensor:
    """(alpha/r) B A in fp32 (alpha/sqrt(r) with rsLoRA), exactly what LoRALinear adds: the (out, in) delta of W0."""
    a, b = pair
    return (b.float() @ a.float()) * lora_scale(cfg.alpha, cfg.r, cfg.use_rslora)


def load_adapter(model: nn.Module, adapter_dir: str | Path, trainable: bool = False, allow_pickle: bool = False) -> LoRAConfig:
    """Wrap the model's layers named in the adapter and load its weights; checks it fits this base.

    Every adapter tensor must land in a layer of the right shape: a shape mismatch or a module
    the model lacks means the adapter was made for a different base, and nothing is changed.
    """
    cfg, weights = read_lora_adapter(adapter_dir, allow_pickle)
    attach_adapter(model, cfg, weights, trainable)
    return cfg


def attach_adapter(model: nn.Module, cfg: LoRAConfig, weights: dict[str, torch.Tensor], trainable: bool = False) -> nn.Module:
    """Wrap the layers the weights name in LoRALinear (in cfg.dtype) and copy the weights in.

    Checks everything before changing the model; returns it.
    """
    targets = check_adapter_fits(model, cfg, weights)
    apply_lora(model, cfg, targets)
    state = lora_state_dict(model)
    missing = sorted(set(state) - set(weights))
    if missing:  # cannot happen after check_adapter_fits, but a partial load must never pass silently
        raise AdapterError(f"adapter lacks tensors {missing[:4]}...; the file is incomplete")
    copy_into_parameters(model, weights, trainable)
    return model


def check_adapter_fits(model: nn.Module, cfg: LoRAConfig, weights: dict[str, torch.Tensor]) -> list[str]:
    """The module paths the adapter targets, after checking each exists here with matching shapes."""
    modules = dict(model.named_modules())
    pairs = collect_lora_pairs(weights)
    for module_path, (a, b) in sorted(pairs.items()):
        layer = modules.get(module_path)
        if layer is None or not is_linear(getattr(layer, "base_layer", layer)):
            raise AdapterError(
                f"adapter targets {module_path}, which this base model does not have as a linear layer: "
                "the adapter was made for a different base model (check base_model_name_or_path in adapter_config.json)"
            )
        base = getattr(layer, "base_layer", layer)
        want = {"A": (a, (cfg.r, base.in_features)), "B": (b, (base.out_features, cfg.r))}
        for part, (tensor, shape) in want.items():
            if tuple(tensor.shape) != shape:
                raise AdapterError(
                    f"adapter tensor {module_path}.lora_{part}.weight has shape {tuple(tensor.shape)} but this base "
                    f"needs {shape}: the adapter was made for a different base model"
                )
    return sorted(pairs)


# --- the LoRA entry in the table of methods (table.py) ---------------------------------------------


def count_lora_trainable(cfg: LoRAConfig, model: nn.Module) -> list[int]:
    """A (r, in) and B (out, r) for each target layer."""
    modules = dict(model.named_modules())
    sizes = []
    for name in resolve_targets(model, cfg.target_modules):
        layer = modules[name]
        sizes += [cfg.r * layer.in_features, layer.out_features * cfg.r]
    return sizes


LORA_METHOD = Method(
    name="lora",
    section="lora",
    peft_type=PEFT_TYPE,
    attach=modify_in_place(apply_lora),
    save=save_adapter,
    count_trainable=count_lora_trainable,
    trainable_dtype=lambda cfg: cfg.dtype,
    plan_note="",
    read_config=lambda adapter_dir: read_adapter_config(adapter_dir)[1],
    read=read_lora_adapter,
    check_fits=check_adapter_fits,
    apply=attach_adapter,
    remove=remove_lora,
    merge_summary="merged {n} LoRA layers into",
)
