"""DPO (Rafailov et al., 2023): the policy's log-ratio to the reference, chosen over rejected, through a logistic loss.

    loss = -(1 - eps) log sigmoid(beta d) - eps log sigmoid(-beta d),
    d = [log pi(y_w|x) - log ref(y_w|x)] - [log pi(y_l|x) - log ref(y_l|x)]

per pair, averaged over the pairs; log pi sums the answer's token log-probs. eps
(objective.label_smoothing) is conservative DPO; at 0 this is TRL's DPOTrainer `loss_type="sigmoid"`.
The reference log-probs are the batch's ``ref_chosen_logps`` / ``ref_rejected_logps``, computed once
before the first step (reference.py). rewards/* are beta x each answer's log-ratio, as TRL logs them.
At step 0 of a fresh LoRA (B = 0) the policy is the reference: d = 0, loss = ln 2.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ObjectiveConfig, TrainConfig
from .logps import compute_token_logps, split_pairs
from .result import StepResult, sum_pair_metrics


def compute_dpo(model: nn.Module, batch: dict[str, torch.Tensor], train: TrainConfig, objective: ObjectiveConfig) -> StepResult:
    """DPO's loss over a micro-batch of pairs (chosen rows then rejected rows) with their reference log-probs."""
    chosen, rejected = split_pairs(compute_token_logps(model, batch, train).sum_by_row())
    chosen_ratio = chosen - batch["ref_chosen_logps"]
    rejected_ratio = rejected - batch["ref_rejected_logps"]
    losses = logistic_loss(objective.beta * (chosen_ratio - rejected_ratio), objective.label_smoothing)
    sums = sum_pair_metrics(objective.beta * chosen_ratio, objective.beta * rejected_ratio, chosen, rejected)
    return StepResult(losses.mean(), sums)


def logistic_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - eps) log sigmoid(z) - eps log sigmoid(-z), per pair: DPO's and SimPO's loss of a scaled margin z."""
    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


@torch.no_grad()
def reference_dpo(model: nn.Module, batch: dict[str, torch.Tensor], train: TrainConfig) -> dict[str, torch.Tensor]:
    """The reference's summed answer log-probs of each pair, (B,) each: what compute_dpo reads from the batch."""
    chosen, rejected = split_pairs(compute_token_logps(model, batch, train).sum_by_row())
    return {"ref_chosen_logps": chosen.float(), "ref_rejected_logps": rejected.float()}
