"""KTO (Ethayarajh et al., 2024): unpaired answers, each desirable or not, scored against a KL baseline.

    z = log pi(y|x) - log ref(y|x)
    desirable:    loss = w_d (1 - sigmoid(beta (z - KL)))
    undesirable:  loss = w_u (1 - sigmoid(beta (KL - z)))
    KL = max(0, mean over the micro-batch of [log pi(y'|x) - log ref(y'|x)]), not differentiated

y' is another example's completion after this example's prompt: reference.py pairs example i's
prompt with example i-1's completion over the whole split, fixed by index so that the reference's
part of it is computed once. TRL rotates the completions the same way but within each batch of its
dataset, so the two agree on one batch (tested) and differ only at TRL's batch edges. The loss is the mean over the micro-batch's examples of the weighted losses, as
TRL's KTOTrainer (``loss_type="kto"``); rewards/chosen and rewards/rejected are beta z averaged
over the desirable and the undesirable examples, and kl is logged.
"""

from __future__ import annotations

import torch
from torch import nn

from ...config import ObjectiveConfig, TrainConfig
from .logps import compute_token_logps
from .result import StepResult

KL_KEYS = ("kl_input_ids", "kl_labels", "kl_attention_mask")


def compute_kto(model: nn.Module, batch: dict[str, torch.Tensor], train: TrainConfig, objective: ObjectiveConfig) -> StepResult:
    """KTO's loss over a micro-batch of unpaired examples with their KL sequences and reference log-probs."""
    logps = compute_token_logps(model, batch, train).sum_by_row()  # (B,)
    with torch.no_grad():
        kl_logps = compute_token_logps(model, read_kl_batch(batch), train).sum_by_row()
    kl = (kl_logps - batch["ref_kl_logps"]).mean().clamp(min=0)
    desirable = batch["desirable"].bool()
    ratio = logps - batch["ref_logps"]
    beta = objective.beta
    chosen_losses = 1 - torch.sigmoid(beta * (ratio[desirable] - kl))
    rejected_losses = 1 - torch.sigmoid(beta * (kl - ratio[~desirable]))
    loss = torch.cat((objective.desirable_weight * chosen_losses, objective.undesirable_weight * rejected_losses)).mean()
    rewards = beta * ratio.detach().float()
    sums = {
        "examples": float(len(ratio)),
        "desirable": float(desirable.sum()),
        "undesirable": float((~desirable).sum()),
        "rewards/chosen": rewards[desirable].sum().item(),
        "rewards/rejected": rewards[~desirable].sum().item(),
        "logps/chosen": logps.detach()[desirable].sum().item(),
        "logps/rejected": logps.detach()[~desirable].sum().item(),
        "kl": kl.item() * len(ratio),
    }
    return StepResult(loss, sums)


def summarize_kto(sums: dict[str, float]) -> dict[str, float]:
    """rewards/* and logps/* averaged over their own examples (desirable: chosen), margins when both kinds were seen, kl per example."""
    metrics = {}
    for kind, count in (("chosen", sums.get("desirable", 0.0)), ("rejected", sums.get("undesirable", 0.0))):
        if count:
            metrics[f"rewards/{kind}"] = sums[f"rewards/{kind}"] / count
            metrics[f"logps/{kind}"] = sums[f"logps/{kind}"] / count
    if "rewards/chosen" in metrics and "rewards/rejected" in metrics:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if sums.get("examples"):
        metrics["kl"] = sums["kl"] / sums["examples"]
    return metrics


def read_kl_batch(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch's KL sequences (prompt i + completion i-1) under the names a forward reads."""
    return {key.removeprefix("kl_"): batch[key] for key in KL_KEYS}


@torch.no_grad()
def reference_kto(model: nn.Module, batch: dict[str, torch.Tensor], train: TrainConfig) -> dict[str, torch.Tensor]:
    """The reference's summed completion log-probs, and its KL sequences', (B,) each."""
    logps = compute_token_logps(model, batch, train).sum_by_row()
    kl_logps = compute_token_logps(model, read_kl_batch(batch), train).sum_by_row()
    return {"ref_logps": logps.float(), "ref_kl_logps": kl_logps.float()}
