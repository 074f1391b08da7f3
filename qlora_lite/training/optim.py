"""Optimizers (bitsandbytes 8-bit and paged AdamW, torch AdamW) and learning-rate schedules."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch

# Paged optimizers keep their state in CUDA unified memory, which the GPU pages out to host
# RAM under pressure instead of failing with out-of-memory. Without CUDA there is nothing to
# page, so on the CPU each falls back to its unpaged twin.
CPU_FALLBACK = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw"}


def build_optimizer(
    params: Iterable[torch.nn.Parameter], name: str, lr: float, weight_decay: float, device: torch.device
) -> torch.optim.Optimizer:
    """The optimizer a recipe names; paged ones fall back to unpaged on the CPU with a note."""
    import bitsandbytes as bnb

    params = list(params)
    if device.type != "cuda" and name in CPU_FALLBACK:
        print(f"note: {name} needs a CUDA GPU to page optimizer state; using {CPU_FALLBACK[name]} on the CPU")
        name = CPU_FALLBACK[name]
    kwargs = dict(lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if name == "paged_adamw_8bit":
        return bnb.optim.PagedAdamW8bit(params, **kwargs)
    if name == "adamw_8bit":
        with warnings.catch_warnings():  # bnb warns about its CPU state buffers; the CPU path is intended
            warnings.simplefilter("ignore")
            return bnb.optim.AdamW8bit(params, **kwargs)
    if name == "paged_adamw_32bit":
        return bnb.optim.PagedAdamW32bit(params, **kwargs)
    if name == "adamw":
        return torch.optim.AdamW(params, **kwargs)
    raise ValueError(f"unknown optimizer {name!r}")


def lr_multiplier(step: int, schedule: str, warmup_steps: int, max_steps: int) -> float:
    """Factor on the peak LR at optimizer step `step` (0-based): linear warmup, then the schedule."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    progress = min(progress, 1.0)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, max_steps: int):
    """A LambdaLR over lr_multiplier; its state_dict goes into every checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, schedule, warmup_steps, max_steps))
