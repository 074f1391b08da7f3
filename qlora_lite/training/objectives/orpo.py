"""ORPO (Hong et al., 2024): no reference; SFT on the chosen answer plus an odds-ratio term against the rejected one.

    loss = NLL(x + y_w) - beta mean_pairs log sigmoid(log odds(y_w|x) - log odds(y_l|x)),
    log odds(y|x) = m - log(1 - exp(m)),   m = the answer's mean token log-prob

As TRL's ORPOTrainer (and the ORPO authors' code) computes it, the NLL term is the token mean over
every real token of the chosen sequences, prompt included (so the prompt is learned too, unlike
SFT here); rewards/* are beta x m, logps/* are m, and nll_loss, log_odds_ratio (the mean log
sigmoid) and log_odds_chosen (the mean log-odds difference) are logged beside them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ObjectiveConfig, TrainConfig
from .logps import compute_token_logps, split_pairs
from .result import StepResult, sum_pair_metrics

LOG_HALF = -0.6931471805599453


def compute_orpo(model: nn.Module, batch: dict[str, torch.Tensor], train: TrainConfig, objective: ObjectiveConfig) -> StepResult:
    """ORPO's loss over a micro-batch of pairs (chosen rows then rejected rows)."""
    logps = compute_token_logps(model, batch, train, with_prompt=True)
    chosen, rejected = split_pairs(logps.mean_by_row())
    chosen_rows = logps.rows < logps.n_rows // 2
    nll = -logps.values[chosen_rows].mean()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    loss = nll - (objective.beta * ratio).mean()
    sums = sum_pair_metrics(objective.beta * chosen, objective.beta * rejected, chosen, rejected)
    pairs = sums["pairs"]
    sums.update({"nll_loss": nll.item() * pairs, "log_odds_ratio": ratio.mean().item() * pairs, "log_odds_chosen": log_odds.mean().item() * pairs})
    return StepResult(loss, sums)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation: log1p(-exp x) below -ln 2, log(-expm1 x) above (Maechler's split)."""
    return torch.where(x < LOG_HALF, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))
