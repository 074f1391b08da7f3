"""What a training step computes: `TrainingModule`, the model with the objective's loss in its forward, which DDP and FSDP2 wrap.

Both engines act in hooks around a module's forward, so the model fit() trains is wrapped in
`TrainingModule`, whose forward computes the micro-batch's loss (or generates): every call into
the model goes through the engine's wrapper, and the chunked loss, which runs the decoder and the
head itself (loss.py), stays inside the forward the engine sees. The loss is the recipe's
objective's (objectives/table.py: SFT's cross-entropy, DPO, ORPO, SimPO, KTO); the metric sums of
the last forward wait in `last_sums` for fit() to add up.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..config import ObjectiveConfig, RecipeConfig, TrainConfig
from ..data.formats import IGNORE_INDEX
from .objectives import get_objective


class TrainingModule(nn.Module):
    """The model fit() trains, with the loss in its forward: what DDP and FSDP2 wrap.

    forward(batch) returns the micro-batch's mean loss (over its labelled tokens for SFT, its pairs
    or examples for a preference objective) and keeps the metric sums in `last_sums`;
    forward(generate=kwargs) runs the inner model's `generate`. FSDP2 gathers the root's
    shards (the LM head, the final norm) in the root's forward, and DDP arms its gradient
    averaging there, so nothing may call the inner model from outside.
    """

    def __init__(self, model: nn.Module, train_cfg: TrainConfig | None, objective_cfg: ObjectiveConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.train_cfg = train_cfg
        self.objective_cfg = objective_cfg or ObjectiveConfig()
        self.objective = get_objective(self.objective_cfg.name)
        self.last_sums: dict[str, float] = {}

    def forward(self, batch: dict[str, torch.Tensor] | None = None, generate: dict[str, Any] | None = None, reference: dict[str, torch.Tensor] | None = None):
        if generate is not None:
            return self.model.generate(**generate)
        if reference is not None:  # the reference's log-probs of a batch (objectives/reference.py), before the first step
            return self.objective.reference(self.model, reference, self.train_cfg)
        result = self.objective.compute(self.model, batch, self.train_cfg, self.objective_cfg)
        self.last_sums = result.sums
        return result.loss


def unwrap_training_module(module: nn.Module) -> TrainingModule:
    """The TrainingModule inside DDP's wrapper (FSDP2 keeps the module itself)."""
    return getattr(module, "module", module)


def as_training_module(model: nn.Module, cfg: RecipeConfig | None) -> nn.Module:
    """fit()'s runner as it is; a plain model (tests, benchmarks) wrapped so it is called the same way."""
    if isinstance(unwrap_training_module(model), TrainingModule):
        return model
    return TrainingModule(model, cfg.train if cfg is not None else None, cfg.objective if cfg is not None else None)


def count_targets(labels: torch.Tensor) -> int:
    """Tokens the loss is computed on: labels are shifted by one inside the model."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a batch; packed batches carry no attention mask and have little padding."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()
