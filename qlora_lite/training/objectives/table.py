"""The table of objectives: the one place that knows what a training step can minimize.

| objective | data.format  | reference | per example in a step   | module     | as in TRL                          |
| ---       | ---          | ---       | ---                     | ---        | ---                                |
| `sft`     | alpaca, chat, text | no  | 1 sequence              | `sft.py`   | SFTTrainer                          |
| `dpo`     | preference   | yes       | 2 sequences (one forward) | `dpo.py` | DPOTrainer, loss_type sigmoid       |
| `orpo`    | preference   | no        | 2 sequences             | `orpo.py`  | ORPOTrainer                         |
| `simpo`   | preference   | no        | 2 sequences             | `simpo.py` | CPOTrainer, loss_type simpo         |
| `kto`     | unpaired     | yes       | 1 sequence + its KL sequence without gradients | `kto.py` | KTOTrainer, loss_type kto |

config.OBJECTIVES holds what the recipe, the data and the planner must know of each (its formats,
sequences per example, whether it has a reference, the settings it reads); an `Objective` here
adds how to compute it. fit(), evaluation and the metrics ask `get_objective(name)` and never
compare objective names. Every method works with every objective: the reference is the model
fit() starts from, evaluated once before the first step (reference.py), whatever the method trains.

To add an objective: its module (a compute function, and a reference function if it has one), its
`ObjectiveSpec` in config.OBJECTIVES, its entry here, and its tests in tests/training/test_objectives.py.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ...config import OBJECTIVES, ObjectiveConfig, ObjectiveSpec, TrainConfig
from ...data.formats import IGNORE_INDEX
from ...errors import ConfigError
from .dpo import compute_dpo, reference_dpo
from .kto import compute_kto, reference_kto, summarize_kto
from .orpo import compute_orpo
from .simpo import compute_simpo
from .result import StepResult, summarize_pairs
from .sft import compute_sft


@dataclass(frozen=True)
class Objective:
    """One entry: how a micro-batch's loss and metric sums are computed, counted and summarized."""

    name: str
    compute: Callable[[nn.Module, dict[str, torch.Tensor], TrainConfig, ObjectiveConfig], StepResult]
    """(model, batch, train, objective settings) -> the micro-batch's mean loss and metric sums."""
    count_units: Callable[[dict[str, torch.Tensor]], int]
    """What the loss is a mean over, in a batch: labelled tokens (sft), pairs, examples (kto); fit() weighs micro-batches by it."""
    summarize: Callable[[dict[str, float]], dict[str, float]]
    """Metric sums (added over micro-batches and processes) -> the logged values, under TRL's names."""
    reference: Callable[[nn.Module, dict[str, torch.Tensor], TrainConfig], dict[str, torch.Tensor]] | None = None
    """(model, batch, train) -> the reference's per-example log-probs the compute reads (``reference_keys``), or None."""
    reference_keys: tuple[str, ...] = ()
    """The batch keys the reference function fills and the compute reads."""
    kl_sequences: bool = False
    """Each example also carries KTO's mismatched sequence (reference.py builds it)."""

    @property
    def spec(self) -> ObjectiveSpec:
        return OBJECTIVES[self.name]


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0] // 2  # collate_batch: chosen rows, then rejected rows


def count_examples(batch: dict[str, torch.Tensor]) -> int:
    return batch["input_ids"].shape[0]


def count_labelled(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())  # labels are shifted by one inside the model


def build_table(entries: tuple[Objective, ...]) -> dict[str, Objective]:
    """The entries by name, after checking that they are exactly config.OBJECTIVES, each with a reference function where its spec has one."""
    names = [entry.name for entry in entries]
    mismatched = [entry.name for entry in entries if entry.name in OBJECTIVES and (entry.reference is not None) != entry.spec.reference]
    if sorted(names) != sorted(OBJECTIVES) or mismatched:
        raise RuntimeError(f"the table of objectives has {names} (reference mismatch: {mismatched}) for config.OBJECTIVES {list(OBJECTIVES)}")
    return {entry.name: entry for entry in sorted(entries, key=lambda entry: list(OBJECTIVES).index(entry.name))}


TABLE: dict[str, Objective] = build_table((
    Objective("sft", compute_sft, count_labelled, lambda sums: {}),
    Objective("dpo", compute_dpo, count_pairs, summarize_pairs, reference_dpo, ("ref_chosen_logps", "ref_rejected_logps")),
    Objective("orpo", compute_orpo, count_pairs, summarize_pairs),
    Objective("simpo", compute_simpo, count_pairs, summarize_pairs),
    Objective("kto", compute_kto, count_examples, summarize_kto, reference_kto, ("ref_logps", "ref_kl_logps"), kl_sequences=True),
))  # fmt: skip


def get_objective(name: str) -> Objective:
    """The entry for objective.name (config checked it; an unknown name here is a ConfigError naming the known ones)."""
    if name not in TABLE:
        raise ConfigError(f"objective.name: {name!r} is not one of {', '.join(TABLE)}")
    return TABLE[name]
