"""What a run trains: one entry per fine-tuning method, each able to attach, save and load its part.

The lecture notes' three PEFT families, plus full fine-tuning as the reference:

| method          | family             | trains                                   | module            |
| ---             | ---                | ---                                      | ---               |
| `lora`          | reparameterization | low-rank updates B A beside linear layers | `lora.py`         |
| `prompt_tuning` | additive           | a soft prompt prepended to the input     | `prompt_tuning.py`|
| `adapter`       | additive           | bottleneck adapters after attn / MLP     | `bottleneck.py`   |
| `selective`     | selective          | named base parameters (norms, biases...) | `selective.py`    |
| `full`          | (none)             | every weight of an unquantized base      | here              |

`fit()` calls `attach_method`, `save_method` and `load_method` and never asks which method it
runs. `attach_method` may return a different module than it was given: prompt tuning wraps
the base in a `SoftPromptModel` that prepends the prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .config import RecipeConfig
from .shards import iter_tensors


class MethodError(ValueError):
    """A method cannot be applied or loaded as asked; the message says why and what to do."""


def attach_method(model: nn.Module, cfg: RecipeConfig, tokenizer) -> nn.Module:
    """Freeze what the method leaves alone and attach (or unfreeze) what it trains; returns the model to train."""
    if cfg.method == "lora":
        from .lora import apply_lora

        apply_lora(model, cfg.lora)
        return model
    if cfg.method == "prompt_tuning":
        from .prompt_tuning import apply_prompt_tuning

        return apply_prompt_tuning(model, cfg.prompt, tokenizer)
    if cfg.method == "selective":
        from .selective import apply_selective

        apply_selective(model, cfg.selective)
        return model
    if cfg.method == "adapter":
        from .bottleneck import apply_bottleneck

        apply_bottleneck(model, cfg.bottleneck)
        return model
    if cfg.method == "full":
        unfreeze_all(model)
        return model
    raise MethodError(f"method {cfg.method!r} is unknown")  # config validation makes this unreachable


def save_method(model: nn.Module, cfg: RecipeConfig, folder: Path, base_path: str) -> None:
    """Write what the method trained to folder (PEFT's format for lora and prompt_tuning)."""
    if cfg.method == "lora":
        from .adapters import save_adapter

        save_adapter(model, cfg.lora, folder, base_path)
    elif cfg.method == "prompt_tuning":
        from .prompt_tuning import save_soft_prompt

        save_soft_prompt(model, cfg.prompt, folder, base_path)
    elif cfg.method == "selective":
        from .selective import save_selective

        save_selective(model, cfg.selective, folder, base_path)
    elif cfg.method == "adapter":
        from .bottleneck import save_bottleneck

        save_bottleneck(model, cfg.bottleneck, folder, base_path)
    elif cfg.method == "full":
        # A whole model: the folder is a plain Hugging Face checkpoint (safetensors shards).
        model.save_pretrained(str(folder), safe_serialization=True)


def load_method(model: nn.Module, cfg: RecipeConfig, folder: Path, trainable: bool = True) -> nn.Module:
    """Put what save_method wrote back onto a freshly loaded base; returns the model to train or run."""
    if cfg.method == "lora":
        from .adapters import load_adapter

        load_adapter(model, folder, trainable=trainable)
        return model
    if cfg.method == "prompt_tuning":
        from .prompt_tuning import load_soft_prompt

        return load_soft_prompt(model, folder, trainable=trainable)
    if cfg.method == "selective":
        from .selective import load_selective

        load_selective(model, folder, trainable=trainable)
        return model
    if cfg.method == "adapter":
        from .bottleneck import load_bottleneck

        load_bottleneck(model, folder, trainable=trainable)
        return model
    if cfg.method == "full":
        load_full_weights(model, folder)
        if trainable:
            unfreeze_all(model)
        return model
    raise MethodError(f"method {cfg.method!r} is unknown")


def unfreeze_all(model: nn.Module) -> None:
    """Full fine-tuning: every floating-point parameter trains (integer buffers never do)."""
    for param in model.parameters():
        param.requires_grad_(param.is_floating_point())


def load_full_weights(model: nn.Module, folder: Path) -> None:
    """Copy a full checkpoint's tensors into the model by name (tied weights share one tensor)."""
    params = dict(model.named_parameters())
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise MethodError(f"{folder} holds no safetensors weights; the checkpoint was not fully written")
    seen = set()
    with torch.no_grad():
        for file in files:
            for name, tensor in iter_tensors(file):
                if name not in params:
                    raise MethodError(f"{file} holds {name}, which this base model does not have: the checkpoint was made for another base")
                params[name].copy_(tensor.to(params[name].dtype))
                seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise MethodError(f"{folder} lacks {len(missing)} of the model's tensors (e.g. {missing[0]}); the checkpoint is incomplete")


def unwrap_base(model: nn.Module) -> nn.Module:
    """The transformers model under any wrapper (accelerate's, or the soft-prompt one)."""
    model = getattr(model, "module", model)
    return getattr(model, "base_model", model) if type(model).__name__ == "SoftPromptModel" else model
