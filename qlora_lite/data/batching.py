"""Batches: packing short examples together, padding micro-batches, and the order they come in.

Packing (``DataConfig.packing``) concatenates several training examples into one sequence
of at most ``max_seq_len`` tokens and gives it ``position_ids`` that restart at 0 for each
example. ``collate_batch`` then returns no ``attention_mask``: transformers (5.x) detects
packed sequences from ``position_ids`` when the mask is None and keeps attention inside each
example, for eager, sdpa, flex and flash attention alike. That detection only runs without
a KV cache, so the forward pass of a packed batch must be called with ``use_cache=False``
(gradient checkpointing in training mode forces it too); with a cache, attention silently
crosses example boundaries.

Batching (``TrainConfig.batching``): ``select_micro_batch`` gives ``fit`` the i-th micro-batch of an
endless stream of epochs, each a seeded permutation of the examples, as a pure function of i (so a
resumed run sees the same batches). ``grouped`` sorts windows of ``GROUP_WINDOW_MICRO_BATCHES``
micro-batches by length before cutting them and then shuffles the micro-batches, so each holds
examples of similar length: on a lognormal length mix, 4% of a micro-batch of 4 is padding instead
of 49% (``padding_fraction``; benchmarks/padding.py). ``random`` cuts the permutation in order.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from .formats import IGNORE_INDEX


def pack_examples(examples: list[dict], max_seq_len: int) -> list[dict]:
    """Greedily concatenate consecutive examples into sequences of at most ``max_seq_len`` tokens.

    An example joins the current pack if it fits, else starts a new one (order is kept; the
    training loop shuffles packs). ``position_ids`` restart at 0 for each example, which is
    what keeps attention inside it (see the module docstring). The first label of every example
    becomes ``IGNORE_INDEX``: the causal-LM loss scores position i against label i + 1, so that
    label would make the last token of the previous example predict the next example's first
    token. Unpacked, that label is never scored either, so packing changes no loss term.

    Returns:
        Packed examples with ``input_ids``, ``labels`` and ``position_ids``.
    """
    bounds = plan_packs([len(ex["input_ids"]) for ex in examples], max_seq_len)
    return [merge_pack(examples[start:end]) for start, end in itertools.pairwise(bounds)]


def plan_packs(lengths: list[int], max_seq_len: int) -> list[int]:
    """Where each pack of ``pack_examples`` starts, and the end: pack j is examples ``bounds[j]:bounds[j + 1]``."""
    bounds, size = [0], 0
    for i, length in enumerate(lengths):
        if size and size + length > max_seq_len:
            bounds.append(i)
            size = 0
        size += length
    if lengths:
        bounds.append(len(lengths))
    return bounds


def merge_pack(examples: list[dict]) -> dict[str, list[int]]:
    pack: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        pack["input_ids"] += ex["input_ids"]
        pack["labels"] += [IGNORE_INDEX] + ex["labels"][1:]
        pack["position_ids"] += list(range(len(ex["input_ids"])))
    return pack


def collate_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into one batch of tensors.

    Args:
        examples: Examples from ``build_datasets`` (all packed or all unpacked), with what the
            training wing adds to them.
        pad_token_id: Id written into padded ``input_ids``. It may equal the EOS id: padding
            is masked by position (labels ``IGNORE_INDEX``), never by value.

    Returns:
        Unpacked: ``input_ids``, ``labels`` and ``attention_mask`` (1 on tokens, 0 on padding),
        each ``(B, T)`` int64 with T the longest example. Packed: ``input_ids``, ``labels`` and
        ``position_ids`` and *no* ``attention_mask``, so that transformers builds the
        per-example causal mask from ``position_ids``; call the model with
        ``use_cache=False``. Padding gets positions 0, 1, ... of its own, a separate
        sequence that no real token can see (it comes after them).

        Preference pairs (examples with ``rejected_input_ids``): the three tensors are ``(2B, T)``,
        the B chosen sequences first, then the B rejected ones in the same order, T the longest of
        all 2B, so one forward pass scores both answers of every pair. Examples with ``desirable``
        (format unpaired) add it as a bool ``(B,)`` tensor; with ``kl_input_ids`` and ``kl_labels``
        (KTO's mismatched pairs, built by the training wing) add those and ``kl_attention_mask``,
        padded as the others to ``(B, T_kl)``; every ``ref_*`` value (a reference model's
        log-probability, one float per example) becomes a float32 ``(B,)`` tensor under its key.

    Raises:
        ValueError: ``pad_token_id`` is None, or packed and unpacked examples are mixed, or
            some examples hold one of the keys above and others do not.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; use the tokenizer's pad id, or its EOS id when it has no pad token")
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    if _held_by_all(examples, "position_ids"):
        input_ids, labels, attention_mask = _pad_rows(examples, "input_ids", "labels", pad_token_id)
        position_ids = torch.zeros_like(input_ids)  # (B, T)
        for row, ex in enumerate(examples):
            length = len(ex["input_ids"])
            position_ids[row, :length] = torch.tensor(ex["position_ids"], dtype=torch.long)
            position_ids[row, length:] = torch.arange(input_ids.shape[1] - length)
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    rows = examples
    if _held_by_all(examples, "rejected_input_ids"):
        # Chosen rows first: row i and row B + i are the two answers of pair i.
        rows = examples + [{"input_ids": ex["rejected_input_ids"], "labels": ex["rejected_labels"]} for ex in examples]
    input_ids, labels, attention_mask = _pad_rows(rows, "input_ids", "labels", pad_token_id)  # (B, T), pairs (2B, T)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if _held_by_all(examples, "desirable"):
        batch["desirable"] = torch.tensor([bool(ex["desirable"]) for ex in examples], dtype=torch.bool)  # (B,)
    if _held_by_all(examples, "kl_input_ids"):
        kl_input_ids, kl_labels, kl_attention_mask = _pad_rows(examples, "kl_input_ids", "kl_labels", pad_token_id)  # (B, T_kl)
        batch.update(kl_input_ids=kl_input_ids, kl_labels=kl_labels, kl_attention_mask=kl_attention_mask)
    for key in sorted({key for ex in examples for key in ex if key.startswith("ref_")}):
        if _held_by_all(examples, key):  # always, or it raises: a missing reference value must not pass as 0
            batch[key] = torch.tensor([float(ex[key]) for ex in examples], dtype=torch.float32)  # (B,)
    return batch


def _held_by_all(examples: list[dict], key: str) -> bool:
    """Whether the examples hold ``key``: all of them (True) or none (False)."""
    held = sum(key in ex for ex in examples)
    if held not in (0, len(examples)):
        what = "packed and unpacked examples" if key == "position_ids" else f"examples with and without {key!r}"
        raise ValueError(f"cannot collate {what} into one batch")
    return bool(held)


def _pad_rows(rows: list[dict], ids_key: str, labels_key: str, pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows[i][ids_key]`` and ``rows[i][labels_key]`` right-padded to the longest, and the mask of real tokens: each ``(N, T)`` int64."""
    longest = max(len(row[ids_key]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)  # (N, T)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)  # (N, T)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)  # (N, T)
    for i, row in enumerate(rows):
        length = len(row[ids_key])
        input_ids[i, :length] = torch.tensor(row[ids_key], dtype=torch.long)
        labels[i, :length] = torch.tensor(row[labels_key], dtype=torch.long)
        attention_mask[i, :length] = 1
    return input_ids, labels, attention_mask


GROUP_WINDOW_MICRO_BATCHES = 64
"""Micro-batches per window that ``grouped`` batching sorts by length (micro_batch_size x 64 examples).

On lognormal lengths (median 180 tokens, sigma 0.8; benchmarks/results/padding-cpu.md) the padded
share of a micro-batch of 4 is 49% in random order and about halves with each doubling of the
window: 12.5% at 16, 7.5% at 32, 4.4% at 64, 2.3% at 128 (at 8: 62%, 17%, 10%, 5.8%, 2.9%). Each
doubling also doubles how often the same examples share a micro-batch again, since an example's
batch-mates are its length neighbours within the window: of 2,000 examples at micro-batch 8, 13%
of the pairs sharing a micro-batch in one epoch share one in the next at 64, 27% at 128, 65% when
the whole epoch is sorted. 64 takes most of the saving (1.05 computed tokens per real one, from
1.97) while batches still change from epoch to epoch; transformers' ``LengthGroupedSampler`` uses
a similar 50.
"""

# The epoch plans of the last examples list seen, so that each call after an epoch's first costs
# O(micro_batch_size) rather than a permutation and sort of the whole data (~20 ms at 50,000 examples).
# The list itself is held (not its id), so its id cannot be reused by another list while cached.
_plan_cache: dict[str, Any] = {"examples": None, "n": -1, "lengths": None, "plans": {}}

_PLAN_CACHE_EPOCHS = 4


def select_micro_batch(
    examples: Sequence[dict], index: int, micro_batch_size: int, seed: int, batching: str = "grouped"
) -> list[dict]:
    """The index-th micro-batch of an endless stream of epochs, each epoch in its own seeded order.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have seen.
    Epoch ``e`` is ``len(examples) // micro_batch_size`` micro-batches built from
    ``torch.randperm(len(examples))`` seeded with ``seed + e``; the ``len(examples) % micro_batch_size``
    examples at the end of that permutation are left out of the epoch (different ones each epoch),
    every other example is in exactly one of its micro-batches.

    Args:
        examples: Training examples: a list, or ``TokenizedExamples`` (whose ``lengths`` the plan reads;
            of a list, ``example_length`` of each under ``grouped``). Do not change the list
            in place between calls: the epoch's plan is cached for the sequence last seen.
        index: Micro-batches already taken from the stream (``fit``'s ``micro_batches_seen``).
        micro_batch_size: Examples per micro-batch.
        seed: ``train.seed``.
        batching: ``train.batching``. ``random``: the permutation cut in order, which is the stream
            of qlora-lite before ``train.batching`` existed, so earlier runs resume on the same
            batches. ``grouped``: the permutation cut into windows of
            ``micro_batch_size * GROUP_WINDOW_MICRO_BATCHES`` examples, each window sorted by length
            and cut into micro-batches, then the epoch's micro-batches shuffled by the same generator;
            examples in a micro-batch have similar lengths, so little of it is padding, while the
            order of the epoch stays random.

    Returns:
        ``micro_batch_size`` examples: ``examples[i]`` for each (a list's own objects, not copies).

    Raises:
        ValueError: ``micro_batch_size`` is below 1 or above ``len(examples)``, ``index`` is
            negative, or ``batching`` is unknown.
    """
    if index < 0:
        raise ValueError(f"micro-batch index {index} is negative")
    if micro_batch_size < 1:
        raise ValueError(f"train.micro_batch_size={micro_batch_size}; it must be at least 1")
    if micro_batch_size > len(examples):
        raise ValueError(
            f"train.micro_batch_size={micro_batch_size} is more than the {len(examples)} training examples; "
            "lower it or add training data"
        )
    per_epoch = len(examples) // micro_batch_size
    epoch, offset = divmod(index, per_epoch)
    plan = _cached_epoch_plan(examples, epoch, micro_batch_size, seed, batching)
    return [examples[i] for i in plan[offset]]


def plan_epoch(
    lengths: list[int], micro_batch_size: int, seed: int, epoch: int, batching: str = "grouped", window: int = GROUP_WINDOW_MICRO_BATCHES
) -> list[list[int]]:
    """One epoch of ``select_micro_batch`` as example indices: ``len(lengths) // micro_batch_size`` lists of indices.

    Args:
        lengths: Token count of each example, in the examples' order.
        micro_batch_size, seed, batching: As for ``select_micro_batch``.
        epoch: 0 for the first pass over the data.
        window: Micro-batches per sorted window under ``grouped`` (1 sorts nothing: random's padding).

    Raises:
        ValueError: ``batching`` is not ``grouped`` or ``random``, or ``window`` is below 1.
    """
    if batching not in EPOCH_PLANNERS:
        raise ValueError(f"train.batching={batching!r} is not one of {', '.join(EPOCH_PLANNERS)}")
    if window < 1:
        raise ValueError(f"window={window} micro-batches; it must be at least 1")
    generator = torch.Generator().manual_seed(seed + epoch)
    # The first draw of this generator is the whole order of the random stream; every planner
    # starts from it, so grouped and random drop the same remainder and random stays as it was.
    order = torch.randperm(len(lengths), generator=generator).tolist()
    kept = order[: len(order) // micro_batch_size * micro_batch_size]
    return EPOCH_PLANNERS[batching](kept, lengths, micro_batch_size * window, micro_batch_size, generator)


def _plan_random_epoch(order: list[int], lengths: list[int], window_examples: int, micro_batch_size: int, generator: torch.Generator) -> list[list[int]]:
    return [order[start : start + micro_batch_size] for start in range(0, len(order), micro_batch_size)]


def _plan_grouped_epoch(order: list[int], lengths: list[int], window_examples: int, micro_batch_size: int, generator: torch.Generator) -> list[list[int]]:
    batches: list[list[int]] = []
    for start in range(0, len(order), window_examples):
        # A stable sort: equal lengths keep the permutation's order, so the plan has no ties to break arbitrarily.
        by_length = sorted(order[start : start + window_examples], key=lengths.__getitem__)
        batches += [by_length[i : i + micro_batch_size] for i in range(0, len(by_length), micro_batch_size)]
    # Without this shuffle each window would run from its shortest batch to its longest, a
    # length curriculum repeating every window; shuffled, any batch can come at any step.
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


EPOCH_PLANNERS = {"grouped": _plan_grouped_epoch, "random": _plan_random_epoch}
"""``train.batching`` -> how an epoch's seeded permutation becomes micro-batches (``plan_epoch``)."""


def _cached_epoch_plan(examples: Sequence[dict], epoch: int, micro_batch_size: int, seed: int, batching: str) -> list[list[int]]:
    cache = _plan_cache
    if cache["examples"] is not examples or cache["n"] != len(examples):
        cache.update(examples=examples, n=len(examples), lengths=None, plans={})
    key = (epoch, micro_batch_size, seed, batching)
    if key not in cache["plans"]:
        if batching == "random":
            lengths = [0] * len(examples)  # never read: random examples need no input_ids, as before
        else:
            if cache["lengths"] is None:
                # TokenizedExamples knows its lengths: planning reads no example from disk.
                known = getattr(examples, "lengths", None)
                cache["lengths"] = known.tolist() if known is not None else [example_length(ex) for ex in examples]
            lengths = cache["lengths"]
        if len(cache["plans"]) >= _PLAN_CACHE_EPOCHS:
            cache["plans"].pop(next(iter(cache["plans"])))  # the oldest: fit only moves forward
        cache["plans"][key] = plan_epoch(lengths, micro_batch_size, seed, epoch, batching)
    return cache["plans"][key]


def example_length(example: dict) -> int:
    """An example's tokens as batching sorts it: a preference pair's longer sequence, which its rows are padded to."""
    return max(len(example["input_ids"]), len(example.get("rejected_input_ids", ())))


def padding_fraction(batches: list[list[dict]]) -> float:
    """The share of padding in the tensors ``collate_batch`` would build from these micro-batches.

    ``1 - tokens / sum(B * T)`` over all micro-batches, with T each micro-batch's longest example
    (a packed example counts as one row). 0.0 for no batches.
    """
    tokens = sum(len(ex["input_ids"]) for batch in batches for ex in batch)
    padded = sum(len(batch) * max(len(ex["input_ids"]) for ex in batch) for batch in batches if batch)
    return 1.0 - tokens / padded if padded else 0.0
