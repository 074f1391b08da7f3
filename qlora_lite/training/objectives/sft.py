"""SFT: the mean cross-entropy of the answer tokens (loss.py), what qlora-lite trained before objectives existed."""

from __future__ import annotations

import torch
from torch import nn

from ...config import ObjectiveConfig, TrainConfig
from ..loss import compute_causal_lm_loss
from .result import StepResult


def compute_sft(model: nn.Module, batch: dict[str, torch.Tensor], train: TrainConfig, objective: ObjectiveConfig) -> StepResult:
    """The micro-batch's mean loss over its labelled tokens; no metrics beyond the loss."""
    return StepResult(compute_causal_lm_loss(model, batch, train))
