"""SimPO (Meng et al., 2024): no reference; the length-normalized log-likelihood is the reward, with a target margin.

    loss = -(1 - eps) log sigmoid(beta (m_w - m_l) - gamma) - eps log sigmoid(-(...)) + alpha NLL(y_w)

m = the answer's mean token log-prob, gamma = objective.simpo_gamma, alpha = objective.cpo_alpha
(0: the paper's SimPO; TRL's CPO-SimPO adds the chosen answers' token-mean NLL). This is TRL's
CPOTrainer with ``loss_type="simpo"``: rewards/* are beta x m, logps/* are m.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import ObjectiveConfig, TrainConfig
from .dpo import logistic_loss
from .logps import compute_token_logps, split_pairs
from .result import StepResult, sum_pair_metrics


def compute_simpo(model: nn.Module, batch: dict[str, torch.Tensor], train: TrainConfig, objective: ObjectiveConfig) -> StepResult:
    """SimPO's loss over a micro-batch of pairs (chosen rows then rejected rows)."""
    logps = compute_token_logps(model, batch, train)
    chosen, rejected = split_pairs(logps.mean_by_row())
    beta = objective.beta
    losses = logistic_loss(beta * (chosen - rejected - objective.simpo_gamma / beta), objective.label_smoothing)
    loss = losses.mean()
    sums = sum_pair_metrics(beta * chosen, beta * rejected, chosen, rejected)
    if objective.cpo_alpha:
        chosen_rows = logps.rows < logps.n_rows // 2
        nll = -logps.values[chosen_rows].mean()  # token mean over the chosen answers, as CPO's cross-entropy
        loss = loss + objective.cpo_alpha * nll
        sums["nll_loss"] = nll.item() * sums["pairs"]
    return StepResult(loss, sums)
