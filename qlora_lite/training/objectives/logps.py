"""Log-probabilities of whole answers: what every preference objective compares.

log pi(y | x) = sum over the answer's tokens t of log p(y_t | x, y_<t). One forward of the
decoder over all the batch's rows (chosen and rejected of a pair in the same batch: 2B rows),
then the head over the selected positions only, chunk by chunk (loss.linear_token_logps): no
(rows, T, vocab) logits tensor exists, as with the chunked SFT loss. The per-token values come
back with the row each belongs to, so an objective can sum them (DPO, KTO), average them
(SimPO, ORPO) or take a token mean over prompt and answer (ORPO's NLL) from the same forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...config import TrainConfig
from ...data.formats import IGNORE_INDEX
from ...methods.prompt_tuning import unwrap_base
from ..loss import check_chunked_loss_supported, linear_token_logps, read_output_head, run_decoder


@dataclass
class TokenLogps:
    """The log-prob of each selected next-token target of a batch: values (N,) fp32, their row (N,), and whether each is an answer token (N,)."""

    values: torch.Tensor
    rows: torch.Tensor
    answer: torch.Tensor
    n_rows: int

    def sum_by_row(self, answer_only: bool = True) -> torch.Tensor:
        """(n_rows,): the sum of each row's log-probs (the answer's, or every selected token's)."""
        keep = self.answer if answer_only else torch.ones_like(self.answer)
        return torch.zeros(self.n_rows, dtype=self.values.dtype, device=self.values.device).index_add(0, self.rows[keep], self.values[keep])

    def count_by_row(self, answer_only: bool = True) -> torch.Tensor:
        """(n_rows,): how many tokens each row has (answer tokens, or every selected one), as fp32."""
        keep = self.answer if answer_only else torch.ones_like(self.answer)
        return torch.bincount(self.rows[keep], minlength=self.n_rows).to(self.values.dtype)

    def mean_by_row(self) -> torch.Tensor:
        """(n_rows,): each row's mean answer-token log-prob (SimPO's and ORPO's length-normalized log pi)."""
        return self.sum_by_row() / self.count_by_row().clamp(min=1)


def compute_token_logps(model: nn.Module, batch: dict[str, torch.Tensor], cfg: TrainConfig, with_prompt: bool = False) -> TokenLogps:
    """The answer tokens' log-probs of every row of batch (``input_ids``, ``labels``, ``attention_mask``), and with_prompt the prompt's too.

    Targets are shifted as for the loss: position t predicts token t + 1. with_prompt selects every
    real (non-pad) target, as ORPO's NLL term reads them; ``answer`` tells which of them are labelled.
    """
    selector = batch["labels"]  # (B, T): -100 on the prompt and padding
    if with_prompt:
        selector = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    inputs = {key: batch[key] for key in ("input_ids", "attention_mask") if key in batch} | {"labels": selector}
    if cfg.loss == "hf":
        hidden_or_logits, labels = run_for_logits(model, inputs)
    else:
        check_chunked_loss_supported(unwrap_base(model))
        hidden_or_logits, labels = run_decoder(model, inputs)  # (B, T', H): T' = T + virtual tokens of a soft prompt
    virtual = labels.shape[1] - selector.shape[1]
    answer_mask = F.pad(batch["labels"][:, 1:] != IGNORE_INDEX, (virtual, 0), value=False)  # (B, T'-1)
    keep = labels[:, 1:] != IGNORE_INDEX  # (B, T'-1)
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(keep)[keep]  # (N,)
    selected, targets = hidden_or_logits[:, :-1][keep], labels[:, 1:][keep]  # (N, H or V), (N,)
    if cfg.loss == "hf":
        values = torch.log_softmax(selected.float(), dim=-1).gather(1, targets[:, None]).squeeze(1)
    else:
        base = unwrap_base(model)
        weight, bias = read_output_head(base)
        values = linear_token_logps(selected, weight, bias, targets, cfg.loss_chunk_tokens, getattr(base.config, "final_logit_softcapping", None))
    return TokenLogps(values, rows, answer_mask[keep], labels.shape[0])


def run_for_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """train.loss hf: the model's own forward, its whole (B, T', V) logits and the labels it saw (a soft prompt's included)."""
    outer = getattr(model, "module", model)
    labels = inputs["labels"]
    if hasattr(outer, "build_base_inputs"):
        labels = outer.build_base_inputs(**inputs)["labels"]
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}, use_cache=False).logits
    return logits, labels


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B,) -> the chosen (B,) and rejected (B,) halves: collate_batch puts chosen rows first."""
    return values.chunk(2, dim=0)
