"""What a training step minimizes: SFT's cross-entropy or a preference objective (DPO, ORPO, SimPO, KTO); table.py lists them."""

from __future__ import annotations

import torch
from torch import nn

from ...config import ObjectiveConfig, RecipeConfig
from .result import StepResult, add_sums
from .table import TABLE, Objective, get_objective

__all__ = ["TABLE", "Objective", "StepResult", "add_sums", "compute_objective", "get_objective"]


def compute_objective(model: nn.Module, batch: dict[str, torch.Tensor], cfg: RecipeConfig | None) -> tuple[torch.Tensor, dict[str, float]]:
    """The recipe's objective on one micro-batch: (mean loss, metric sums). A recipe-less call (tests, benchmarks) is SFT."""
    objective = cfg.objective if cfg is not None else ObjectiveConfig()
    result = get_objective(objective.name).compute(model, batch, cfg.train if cfg is not None else None, objective)
    return result.loss, result.sums
