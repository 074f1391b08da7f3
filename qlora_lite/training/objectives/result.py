"""What an objective returns for one micro-batch: its loss and the sums its metrics are made of."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepResult:
    """loss: the mean over the micro-batch's units (tokens for sft, pairs, examples for kto), what backward runs on.

    sums: metric numerators and denominators over the micro-batch (``{"pairs": 4, "rewards/chosen": 0.31, ...}``),
    plain floats, so that they add up over micro-batches, steps and processes before the objective's
    ``summarize`` turns them into the logged means.
    """

    loss: torch.Tensor
    sums: dict[str, float] = field(default_factory=dict)


def add_sums(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    """total += part, key by key (in place; returns total)."""
    for key, value in part.items():
        total[key] = total.get(key, 0.0) + value
    return total


def summarize_pairs(sums: dict[str, float]) -> dict[str, float]:
    """TRL's pair metrics from their sums: each a mean over the pairs (rewards/accuracies: the share whose chosen reward is higher)."""
    pairs = sums.get("pairs", 0.0)
    return {key: value / pairs for key, value in sums.items() if key != "pairs"} if pairs else {}


def sum_pair_metrics(beta_chosen: torch.Tensor, beta_rejected: torch.Tensor, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor) -> dict[str, float]:
    """The sums behind TRL's rewards/* and logps/* for a micro-batch of pairs (rewards: beta x the objective's implicit reward)."""
    chosen, rejected = beta_chosen.detach().float(), beta_rejected.detach().float()
    return {
        "pairs": float(chosen.shape[0]),
        "rewards/chosen": chosen.sum().item(),
        "rewards/rejected": rejected.sum().item(),
        "rewards/accuracies": (chosen > rejected).float().sum().item(),
        "rewards/margins": (chosen - rejected).sum().item(),
        "logps/chosen": chosen_logps.detach().float().sum().item(),
        "logps/rejected": rejected_logps.detach().float().sum().item(),
    }
