"""Bottleneck adapters (Houlsby et al., 2019): small trainable layers added inside each decoder layer.

The lecture notes' additive family. Each adapter maps a hidden state h to

    h + up(act(down(h)))        down: hidden -> size,  up: size -> hidden

`up` starts at zero, so a fresh adapter returns h unchanged and training starts from the
base model's output exactly; `down` starts as nn.Linear does. An adapter sits after the
attention output, after the MLP output, or after both (`bottleneck.placement`), in every
decoder layer, before the residual addition, as in the Houlsby layout.

Where they go: the last operation of a Llama-style attention block is its output projection
`self_attn.o_proj`, and of its MLP `mlp.down_proj` (Llama, Mistral, Qwen2, Gemma, Phi-3 all
name them so). Wrapping those two linear layers in `LayerWithAdapter`, which applies the
adapter to the layer's output, gives the same values as hooking the attention and MLP
modules themselves, while the wrapper only ever sees a tensor (the attention module returns
a tuple whose layout differs between architectures and transformers versions) and works
unchanged over a 4-bit `Linear4bit`.

On-disk format (version 1), a folder with two files:

- `adapter_config.json`::

      {"peft_type": "BOTTLENECK", "qlora_lite_format": 1, "base_model_name_or_path": "...",
       "size": 16, "placement": "both", "activation": "gelu", "dtype": "float32",
       "hidden_size": 4096, "modules": ["model.layers.0.self_attn.o_proj", ...]}

- `adapter_model.safetensors`: for each wrapped layer path P, the tensors
  `P.adapter.down.weight` (size, hidden), `P.adapter.down.bias` (size),
  `P.adapter.up.weight` (hidden, size) and `P.adapter.up.bias` (hidden), in `dtype`.

Trainable parameters: layers x placements x (2 x hidden x size + size + hidden), placements
being 1 (attn or mlp) or 2 (both). The adapter is nonlinear, so it cannot be merged into
the base's weights; serve it as base + adapter. PEFT has no such adapter type; this format is ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import CHOICES, BottleneckConfig
from ..errors import BottleneckError
from ..quant import DTYPE_NAMES, DTYPES
from .folder import CONFIG_NAME, FORMAT_VERSION, read_adapter_weights, read_method_config, write_adapter_files
from .method import LinearWrapper, Method, copy_into_parameters, modify_in_place, replace_submodule

PEFT_TYPE = "BOTTLENECK"
# placement -> the output projections (module path suffixes) whose outputs get an adapter.
PLACEMENT_TARGETS = {
    "attn": ("self_attn.o_proj",),
    "mlp": ("mlp.down_proj",),
    "both": ("self_attn.o_proj", "mlp.down_proj"),
}
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
CONFIG_FIELDS = {"size": int, "placement": str, "activation": str, "dtype": str}  # adapter_config.json key -> type


class BottleneckAdapter(nn.Module):
    """h + up(act(down(h))), with up zero-initialised so that a fresh adapter is the identity."""

    def __init__(
        self,
        hidden_size: int,
        size: int,
        activation: str = "gelu",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if size <= 0:
            raise BottleneckError(f"bottleneck.size must be a positive integer, got {size}; typical values are 8 to 64")
        if activation not in ACTIVATIONS:
            raise BottleneckError(f"bottleneck.activation: {activation!r} is not one of {', '.join(ACTIVATIONS)}")
        self.activation = activation
        self.down = nn.Linear(hidden_size, size, device=device, dtype=dtype)  # nn.Linear's default init
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden_size, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        # The adapter computes in its own dtype (fp32 by default, over a bf16 base too) and its
        # update is rounded once to h's dtype: the residual stream keeps the base's dtype.
        update = self.up(self.act(self.down(h.to(self.down.weight.dtype))))  # (..., hidden)
        return h + update.to(h.dtype)

    def extra_repr(self) -> str:
        return f"hidden={self.up.out_features}, size={self.down.out_features}, activation={self.activation}"


class LayerWithAdapter(LinearWrapper):
    """A frozen layer followed by a bottleneck adapter on its output: y = adapter(layer(x))."""

    def __init__(self, base_layer: nn.Module, adapter: BottleneckAdapter) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.base_layer(x))  # (..., hidden)


# --- placing ----------------------------------------------------------------------------------


def find_bottleneck_targets(model: nn.Module, placement: str) -> list[str]:
    """Module paths of the output projections that get an adapter, in model order.

    Raises:
        BottleneckError: unknown placement, the model already has adapters, or it has no such layers.
    """
    if placement not in PLACEMENT_TARGETS:
        raise BottleneckError(f"bottleneck.placement: {placement!r} is not one of {', '.join(PLACEMENT_TARGETS)}")
    modules = dict(model.named_modules())
    if any(isinstance(m, LayerWithAdapter) for m in modules.values()):
        raise BottleneckError("the model already carries bottleneck adapters; call remove_bottleneck first, or load a fresh base")
    targets: list[str] = []
    for suffix in PLACEMENT_TARGETS[placement]:
        found = [name for name, module in modules.items() if name.endswith("." + suffix) and isinstance(getattr(module, "out_features", None), int)]
        if not found:
            raise BottleneckError(
                f"bottleneck.placement {placement}: this {type(model).__name__} has no layers named *.{suffix}. Bottleneck "
                "adapters go after each decoder layer's attention output projection (self_attn.o_proj) and MLP output "
                "projection (mlp.down_proj), the Llama / Mistral / Qwen2 / Gemma / Phi-3 layout; for other architectures "
                "use method lora"
            )
        targets += found
    chosen = set(targets)
    return [name for name in modules if name in chosen]


def apply_bottleneck(model: nn.Module, cfg: BottleneckConfig, targets: list[str] | None = None) -> list[str]:
    """Freeze the model and put a fresh (identity) bottleneck adapter after each target layer.

    Args:
        model: a plain or 4-bit Llama-style causal LM.
        cfg: size, placement (attn, mlp or both), activation and dtype of the adapters.
        targets: the layers to wrap, when check_bottleneck_fits has just found them; None finds them here.

    Returns:
        The wrapped module paths, e.g. `model.layers.0.self_attn.o_proj`.
    """
    if cfg.size <= 0:
        raise BottleneckError(f"bottleneck.size must be a positive integer, got {cfg.size}; typical values are 8 to 64")
    if cfg.activation not in ACTIVATIONS:
        raise BottleneckError(f"bottleneck.activation: {cfg.activation!r} is not one of {', '.join(ACTIVATIONS)}")
    if cfg.dtype not in DTYPES:
        raise BottleneckError(f"bottleneck.dtype: {cfg.dtype!r} is not one of {', '.join(DTYPES)}")
    targets = targets if targets is not None else find_bottleneck_targets(model, cfg.placement)
    model.requires_grad_(False)
    for name in targets:
        base = model.get_submodule(name)
        device = next(base.parameters()).device
        adapter = BottleneckAdapter(base.out_features, cfg.size, cfg.activation, DTYPES[cfg.dtype], device)
        layer = LayerWithAdapter(base, adapter)
        layer.train(model.training)
        replace_submodule(model, name, layer)
    return targets


def bottleneck_layers(model: nn.Module) -> dict[str, LayerWithAdapter]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LayerWithAdapter)}


def remove_bottleneck(model: nn.Module) -> list[str]:
    """Put the original layers back where apply_bottleneck wrapped them. Returns their paths."""
    removed = []
    for name, layer in bottleneck_layers(model).items():
        replace_submodule(model, name, layer.base_layer)
        removed.append(name)
    return removed


def find_placement(paths: list[str]) -> str | None:
    """The placement whose targets these wrapped layers are (None for a mix apply_bottleneck never makes)."""
    suffixes = {suffix for path in paths for suffix in PLACEMENT_TARGETS["both"] if path.endswith("." + suffix)}
    return next((name for name, want in PLACEMENT_TARGETS.items() if set(want) == suffixes), None)


def bottleneck_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors under their saved names (`<layer path>.adapter.down.weight`, ...)."""
    return {
        f"{path}.adapter.{name}": param.detach()
        for path, layer in bottleneck_layers(model).items()
        for name, param in layer.adapter.named_parameters()
    }


# --- saving and loading ---------------------------------------------------------------------------


def save_bottleneck(model: nn.Module, cfg: BottleneckConfig, out_dir: str | Path, base_model_name_or_path: str) -> Path:
    """Write the model's bottleneck adapters and their config to out_dir (format in the module docstring)."""
    layers = bottleneck_layers(model)
    if not layers:
        raise BottleneckError("the model carries no bottleneck adapters to save; call apply_bottleneck first")
    first = next(iter(layers.values())).adapter
    found = (first.down.out_features, first.activation, find_placement(list(layers)))
    if found != (cfg.size, cfg.activation, cfg.placement):
        raise BottleneckError(
            f"the model's adapters have size={found[0]}, activation={found[1]!r}, placement={found[2]!r} but the config says "
            f"size={cfg.size}, activation={cfg.activation!r}, placement={cfg.placement!r}; save with the config they were made with"
        )
    dtype = DTYPE_NAMES[first.down.weight.dtype]
    config = {
        "peft_type": PEFT_TYPE,
        "qlora_lite_format": FORMAT_VERSION,
        "base_model_name_or_path": base_model_name_or_path,
        "size": cfg.size,
        "placement": cfg.placement,
        "activation": cfg.activation,
        "dtype": dtype,
        "hidden_size": first.up.out_features,
        "modules": list(layers),
    }
    return write_adapter_files(out_dir, bottleneck_state_dict(model), config)


def read_bottleneck_json(adapter_dir: str | Path) -> dict[str, Any]:
    """adapter_config.json of a bottleneck adapter as a dict, its fields and values checked."""
    raw = read_method_config(adapter_dir, PEFT_TYPE, CONFIG_FIELDS)
    for key in ("placement", "activation", "dtype"):
        if raw[key] not in CHOICES[f"bottleneck.{key}"]:
            raise BottleneckError(
                f"{Path(adapter_dir) / CONFIG_NAME}: {key} {raw[key]!r} is not one of {', '.join(CHOICES[f'bottleneck.{key}'])}; "
                "the file is corrupt or from a newer qlora-lite"
            )
    if raw["size"] <= 0:
        raise BottleneckError(f"{Path(adapter_dir) / CONFIG_NAME}: size must be positive, got {raw['size']}; the file is corrupt")
    return raw


def read_bottleneck_config(adapter_dir: str | Path) -> BottleneckConfig:
    """adapter_config.json of a bottleneck adapter as a BottleneckConfig, its values checked."""
    raw = read_bottleneck_json(adapter_dir)
    return BottleneckConfig(size=raw["size"], placement=raw["placement"], activation=raw["activation"], dtype=raw["dtype"])


def read_bottleneck(adapter_dir: str | Path, allow_pickle: bool = False) -> tuple[BottleneckConfig, dict[str, torch.Tensor]]:
    """The adapter's BottleneckConfig and tensors; its dtype is the tensors' own (an fp32 adapter rebuilt in bf16 would answer differently)."""
    cfg = read_bottleneck_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir, allow_pickle)
    saved = {t.dtype for t in weights.values()}
    # Mixed or unknown dtypes keep the config's dtype: copy_into_parameters casts the tensors to it.
    if len(saved) == 1 and (only := saved.pop()) in DTYPE_NAMES:
        cfg.dtype = DTYPE_NAMES[only]
    return cfg, weights


def load_bottleneck(model: nn.Module, adapter_dir: str | Path, trainable: bool = False) -> BottleneckConfig:
    """Put a saved bottleneck adapter on the model: check every tensor fits, then wrap and copy.

    Args:
        model: the base the adapter was trained on (plain or 4-bit), without adapters.
        adapter_dir: the folder save_bottleneck wrote.
        trainable: whether the adapters train (resume) or stay frozen (generation, evaluation).

    Returns:
        The adapter's BottleneckConfig. Nothing is changed when a check fails.
    """
    cfg, weights = read_bottleneck(adapter_dir)
    attach_bottleneck(model, cfg, weights, trainable)
    return cfg


def attach_bottleneck(model: nn.Module, cfg: BottleneckConfig, weights: dict[str, torch.Tensor], trainable: bool = False) -> nn.Module:
    """Wrap the target layers in adapters holding these tensors (after checking all of them fit); returns the model."""
    targets = check_bottleneck_fits(model, cfg, weights)
    apply_bottleneck(model, cfg, targets)
    copy_into_parameters(model, weights, trainable)
    return model


def check_bottleneck_fits(model: nn.Module, cfg: BottleneckConfig, weights: dict[str, torch.Tensor]) -> list[str]:
    """The target layer paths, after checking the file holds exactly the four tensors of each, with this base's shapes."""
    targets = find_bottleneck_targets(model, cfg.placement)
    want: dict[str, tuple[int, ...]] = {}
    for path in targets:
        hidden = model.get_submodule(path).out_features
        shapes = {"down.weight": (cfg.size, hidden), "down.bias": (cfg.size,), "up.weight": (hidden, cfg.size), "up.bias": (hidden,)}
        want.update({f"{path}.adapter.{key}": shape for key, shape in shapes.items()})
    for name, tensor in sorted(weights.items()):
        if name not in want:
            raise BottleneckError(
                f"adapter tensor {name} has no place in this base model (placement {cfg.placement}): the adapter was made "
                "for a different base model (check base_model_name_or_path in adapter_config.json)"
            )
        if tuple(tensor.shape) != want[name]:
            raise BottleneckError(
                f"adapter tensor {name} has shape {tuple(tensor.shape)} but this base needs {want[name]}: "
                "the adapter was made for a different base model"
            )
    missing = sorted(set(want) - set(weights))
    if missing:
        raise BottleneckError(
            f"adapter lacks {len(missing)} tensors this base needs, e.g. {missing[0]}: the file is incomplete, "
            "or the adapter was made for a base with fewer layers"
        )
    return targets


# --- the bottleneck-adapter entry in the table of methods (table.py) ------------------------------


def count_bottleneck_trainable(cfg: BottleneckConfig, model: nn.Module) -> list[int]:
    """down (size, H) + bias, up (H, size) + bias, per placement per layer."""
    hidden = model.config.hidden_size
    placements = 2 if cfg.placement == "both" else 1
    per = [cfg.size * hidden, cfg.size, hidden * cfg.size, hidden]
    return per * (model.config.num_hidden_layers * placements)


BOTTLENECK_METHOD = Method(
    name="adapter",
    section="bottleneck",
    peft_type=PEFT_TYPE,
    attach=modify_in_place(apply_bottleneck),
    save=save_bottleneck,
    count_trainable=count_bottleneck_trainable,
    trainable_dtype=lambda cfg: cfg.dtype,
    read_config=read_bottleneck_json,
    read=read_bottleneck,
    check_fits=check_bottleneck_fits,
    apply=attach_bottleneck,
    remove=remove_bottleneck,
    merge_refusal=(
        "{adapter_dir} holds bottleneck adapters, h + up(act(down(h))): the activation between the two projections "
        "makes them nonlinear, so they cannot be folded into the base's weights. Serve the base + adapter instead "
        "(qlora-lite generate {adapter_dir}, or load_bottleneck in Python)"
    ),
)
