"""Full fine-tuning: every floating-point weight of an unquantized base trains (the reference the PEFT methods are measured against).

There is no adapter folder: the model is saved whole, as a plain Hugging Face checkpoint
(safetensors shards), and a checkpoint is read back tensor by tensor into a freshly loaded base.
Its recipe needs quant.load_in_4bit false (config.check_full_recipe): a 4-bit weight holds packed
codes a gradient cannot move.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import MethodError
from ..safetensors_io import iter_tensors
from .method import Method, modify_in_place


def unfreeze_all(model: nn.Module, settings: Any = None) -> None:
    """Every floating-point parameter trains (integer buffers never do)."""
    for param in model.parameters():
        param.requires_grad_(param.is_floating_point())


def save_full(model: nn.Module, settings: Any, folder: Path, base_path: str) -> None:
    # A whole model: the folder is a plain Hugging Face checkpoint (safetensors shards).
    model.save_pretrained(str(folder), safe_serialization=True)


def load_full_weights(model: nn.Module, folder: Path) -> None:
    """Copy a full checkpoint's tensors into the model by name, one at a time (tied weights share one tensor)."""
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


def load_full_checkpoint(model: nn.Module, folder: Path, trainable: bool) -> nn.Module:
    load_full_weights(model, folder)
    if trainable:
        unfreeze_all(model)
    return model


FULL_METHOD = Method(
    name="full",
    section=None,
    peft_type=None,
    attach=modify_in_place(unfreeze_all),
    save=save_full,
    load_checkpoint=load_full_checkpoint,
    count_trainable=lambda settings, model: [p.numel() for p in model.parameters()],
    trains_head=lambda settings, head_names: True,
)
