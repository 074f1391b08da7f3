"""select_micro_batch (train.batching): grouped micro-batches cover each example once per epoch, are
deterministic across calls and processes, cut the padding of a realistic length mix to a stated
bound and leave every loss as it was; random is the stream of qlora-lite before train.batching."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_lite.config import DataConfig
from qlora_lite.data import batching, cache
from qlora_lite.data.batching import collate_batch, pack_examples, padding_fraction, plan_epoch, select_micro_batch
from qlora_lite.data.cache import build_datasets
from qlora_lite.data.formats import IGNORE_INDEX
from qlora_lite.data.tokenizing import tokenize_example
from tests.helpers import EOS, alpaca_records, learned_predictions, write_jsonl

REPO = Path(__file__).resolve().parents[2]


def sample_lengths(n: int, seed: int) -> list[int]:
    """The realistic mix of benchmarks/padding.py: lognormal, median 180 tokens, sigma 0.8, cut at 2048."""
    rng = random.Random(seed)
    return [min(2048, max(1, round(rng.lognormvariate(math.log(180), 0.8)))) for _ in range(n)]


def build_examples(lengths: list[int]) -> list[dict]:
    # input_ids only needs a length here; "id" names the example in assertions.
    return [{"id": i, "input_ids": range(n)} for i, n in enumerate(lengths)]


def ids_of(batches: list[list[dict]]) -> list[list[int]]:
    return [[ex["id"] for ex in batch] for batch in batches]


def take(examples: list[dict], indices, mbs: int, seed: int, batching: str = "grouped") -> list[list[dict]]:
    return [select_micro_batch(examples, i, mbs, seed, batching) for i in indices]


def select_micro_batch_before_batching(examples: list[dict], index: int, micro_batch_size: int, seed: int) -> list[dict]:
    """train.select_micro_batch as it was at commit feb5d04, verbatim, before train.batching existed."""
    per_epoch = len(examples) // micro_batch_size
    epoch, offset = divmod(index, per_epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch))
    return [examples[i] for i in order[offset * micro_batch_size : (offset + 1) * micro_batch_size].tolist()]


# --------------------------------------------------------------------------------- coverage and order


@pytest.mark.parametrize("n, mbs", [(1003, 4), (1003, 8), (37, 4), (10, 3)])
def test_grouped_epoch_holds_each_example_once_and_drops_the_same_remainder_as_random(n, mbs):
    # 1003 at 4: 250 micro-batches, windows of 256, 256, 256 and 232 examples; 3 left over.
    examples = build_examples(sample_lengths(n, seed=1))
    per_epoch = n // mbs
    for epoch in range(3):
        indices = range(epoch * per_epoch, (epoch + 1) * per_epoch)
        grouped = [i for batch in ids_of(take(examples, indices, mbs, seed=5)) for i in batch]
        random_order = [i for batch in ids_of(take(examples, indices, mbs, seed=5, batching="random")) for i in batch]
        assert len(grouped) == len(set(grouped)) == per_epoch * mbs  # no example twice
        assert set(grouped) == set(random_order)  # the same n % mbs examples sit this epoch out
        assert all(len(batch) == mbs for batch in take(examples, indices, mbs, seed=5))


def test_grouped_batches_hold_similar_lengths_in_a_random_order():
    lengths = sample_lengths(1003, seed=1)
    examples = build_examples(lengths)
    grouped, randomly = take(examples, range(250), 4, seed=5), take(examples, range(250), 4, seed=5, batching="random")
    assert ids_of(grouped) != ids_of(randomly)
    # No grouped micro-batch is one of random's: the sort regroups every one of them.
    assert not {frozenset(b) for b in ids_of(grouped)} & {frozenset(b) for b in ids_of(randomly)}
    # Inside a micro-batch the lengths are close: the longest at most 1.25 x the shortest in 90% of them.
    ratios = sorted(max(len(ex["input_ids"]) for ex in b) / min(len(ex["input_ids"]) for ex in b) for b in grouped)
    assert ratios[int(0.9 * len(ratios))] < 1.25
    # ...while the order of micro-batches is not: sorted windows left in order would make 246 of the
    # 249 steps from one micro-batch to the next go to a longer (or equal) one; shuffled, about half do.
    longest = [max(len(ex["input_ids"]) for ex in batch) for batch in grouped]
    rising = sum(b > a for a, b in zip(longest, longest[1:])) / 249
    assert 0.4 < rising < 0.6


def test_each_epoch_regroups_the_examples():
    examples = build_examples(sample_lengths(1003, seed=1))
    first, second = ids_of(take(examples, range(0, 250), 4, seed=5)), ids_of(take(examples, range(250, 500), 4, seed=5))
    shared = {frozenset(b) for b in first} & {frozenset(b) for b in second}
    assert len(shared) <= 5  # of 250; measured: 0


# --------------------------------------------------------------------------------------- determinism


def test_grouped_batches_are_a_pure_function_of_the_index():
    examples = build_examples(sample_lengths(600, seed=2))
    in_order = ids_of(take(examples, range(300), 8, seed=11))  # 75 per epoch: 4 epochs
    # Out of order, on a copy of the list (a new identity, so no cached plan) and after other
    # calls filled the cache with other plans: the same batches, as a resumed run needs.
    shuffled = list(range(300))
    random.Random(0).shuffle(shuffled)
    copy = list(examples)
    take(examples, range(10), 4, seed=3)
    out_of_order = {i: [ex["id"] for ex in select_micro_batch(copy, i, 8, 11)] for i in shuffled}
    assert [out_of_order[i] for i in range(300)] == in_order
    assert ids_of(take(examples, range(3), 8, seed=12)) != in_order[:3]  # another seed, other batches


def test_grouped_batches_are_the_same_in_another_process():
    script = (
        "import json, sys; "
        "from tests.data.test_batching import build_examples, sample_lengths, take, ids_of; "
        "print(json.dumps(ids_of(take(build_examples(sample_lengths(600, seed=2)), range(0, 300, 7), 8, seed=11))))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # nothing may depend on set or dict hashing
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    here = ids_of(take(build_examples(sample_lengths(600, seed=2)), range(0, 300, 7), 8, seed=11))
    assert json.loads(result.stdout) == here


def test_an_epoch_plan_is_computed_once_and_recomputed_for_another_list(monkeypatch):
    calls = []
    real_plan_epoch = batching.plan_epoch
    monkeypatch.setattr(batching, "plan_epoch", lambda *args, **kw: calls.append(args[1:]) or real_plan_epoch(*args, **kw))
    examples = build_examples(sample_lengths(1000, seed=3))
    take(examples, range(500), 4, seed=1)  # two epochs of 250
    assert len(calls) == 2
    # A list with the same length but other lengths (here reversed) gets its own plan, never the cached one.
    other = build_examples(list(reversed([len(ex["input_ids"]) for ex in examples])))
    lengths = [len(ex["input_ids"]) for ex in other]
    assert ids_of(take(other, range(250), 4, seed=1)) == real_plan_epoch(lengths, 4, 1, 0, "grouped")
    assert len(calls) == 3


# ------------------------------------------------------------------------------------- random = before


def test_random_batching_is_the_stream_from_before_train_batching():
    # Pinned from train.select_micro_batch at commit feb5d04: runs started then resume on these batches.
    examples = [{"id": i} for i in range(10)]  # random reads no lengths, so examples need no input_ids
    assert ids_of(take(examples, range(6), 3, seed=7, batching="random")) == [[5, 0, 3], [4, 1, 7], [9, 6, 8], [3, 5, 0], [1, 2, 6], [4, 7, 8]]
    examples = [{"id": i} for i in range(1003)]
    assert ids_of(take(examples, (0, 1, 249, 250, 777), 4, seed=42, batching="random")) == [
        [64, 474, 671, 417], [67, 256, 491, 915], [615, 575, 163, 30], [557, 523, 590, 540], [237, 522, 14, 940]
    ]
    for n, mbs, seed in [(1003, 4, 42), (37, 5, 0), (64, 8, 3), (10, 1, 7)]:
        examples = build_examples(sample_lengths(n, seed=seed))
        indices = range(0, 4 * (n // mbs))  # four epochs
        before = [select_micro_batch_before_batching(examples, i, mbs, seed) for i in indices]
        assert take(examples, indices, mbs, seed, batching="random") == before


def test_window_of_one_micro_batch_pads_as_much_as_random():
    lengths = sample_lengths(2000, seed=4)
    examples = build_examples(lengths)
    def padding(batching: str, window: int) -> float:
        return padding_fraction([[examples[i] for i in b] for b in plan_epoch(lengths, 4, 9, 0, batching, window=window)])
    assert padding("grouped", 1) == pytest.approx(padding("random", 1), abs=1e-12)


# -------------------------------------------------------------------------------------------- padding


def test_padding_fraction_counts_padded_tokens():
    batches = [[{"input_ids": [1] * 3}, {"input_ids": [1] * 5}], [{"input_ids": [1] * 4}]]
    assert padding_fraction(batches) == pytest.approx(2 / 14)  # (2x5 + 1x4) slots, 12 tokens
    assert padding_fraction([]) == 0.0
    batch = [{"input_ids": [7] * n, "labels": [7] * n} for n in (2, 9, 4)]
    tensor = collate_batch(batch, pad_token_id=0)["attention_mask"]
    assert padding_fraction([batch]) == pytest.approx(1 - tensor.sum().item() / tensor.numel())


@pytest.mark.parametrize(
    "mbs, random_at_least, grouped_below, tokens_ratio_below",
    # Measured on 10,000 examples, seed 42: random 49.1% and 61.6%, grouped 4.4% and 5.8% (over
    # seeds 0-3 and 42: 4.1-4.6% and 5.6-6.2%), so grouped computes 0.53 and 0.41 of random's
    # tokens (padding included); see benchmarks/results/padding-cpu.md.
    [(4, 0.45, 0.06, 0.56), (8, 0.57, 0.08, 0.45)],
)
def test_grouped_batching_cuts_padding_on_a_realistic_length_mix(mbs, random_at_least, grouped_below, tokens_ratio_below):
    examples = build_examples(sample_lengths(10_000, seed=42))
    epoch = range(len(examples) // mbs)
    random_share = padding_fraction(take(examples, epoch, mbs, seed=42, batching="random"))
    grouped_share = padding_fraction(take(examples, epoch, mbs, seed=42))
    assert random_share > random_at_least
    assert grouped_share < grouped_below
    assert (1 - random_share) / (1 - grouped_share) < tokens_ratio_below  # grouped's padded tokens over random's


# ---------------------------------------------------------------------------------------------- loss


def test_grouped_micro_batch_loss_is_the_token_weighted_mean_of_each_example_alone(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    rng = random.Random(0)
    examples = []
    for i, n in enumerate(sample_lengths(64, seed=6)):
        n = min(4 + n // 4, 300)  # the mix, scaled down: the tiny model's positions stop at 512; keep the test quick
        ids = [rng.randrange(4, 256) for _ in range(n)]
        prompt = rng.randrange(0, n // 2 + 1)  # a masked prompt of random length, as data.py writes it
        examples.append({"id": i, "input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    batch = select_micro_batch(examples, 3, 4, seed=8)
    lengths = [len(ex["input_ids"]) for ex in batch]
    assert max(lengths) > min(lengths)  # some padding to be ignored
    with torch.no_grad():
        padded = model(**collate_batch(batch, pad_token_id=0), use_cache=False)
        alone = [model(**collate_batch([ex], pad_token_id=0), use_cache=False).loss for ex in batch]
    targets = [sum(label != IGNORE_INDEX for label in ex["labels"][1:]) for ex in batch]  # shifted by one in the model
    weighted = sum(loss * n for loss, n in zip(alone, targets)) / sum(targets)
    torch.testing.assert_close(padded.loss, weighted, atol=1e-5, rtol=0)
    # Each example's own loss read from the padded batch's logits equals its loss alone: padding changes nothing.
    for row, (ex, loss) in enumerate(zip(batch, alone)):
        logits, labels = padded.logits[row, : len(ex["input_ids"]) - 1], torch.tensor(ex["labels"][1:])
        torch.testing.assert_close(torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX), loss, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------------- errors


def test_bad_arguments_say_what_to_change():
    examples = build_examples([5, 6, 7])
    with pytest.raises(ValueError, match=r"train.batching='sorted' is not one of grouped, random"):
        select_micro_batch(examples, 0, 2, seed=0, batching="sorted")
    with pytest.raises(ValueError, match=r"train.micro_batch_size=4 is more than the 3 training examples; lower it"):
        select_micro_batch(examples, 0, 4, seed=0)
    with pytest.raises(ValueError, match=r"train.micro_batch_size=0; it must be at least 1"):
        select_micro_batch(examples, 0, 0, seed=0)
    with pytest.raises(ValueError, match="index -1 is negative"):
        select_micro_batch(examples, -1, 2, seed=0)
    with pytest.raises(ValueError, match="window=0"):
        plan_epoch([5, 6, 7], 2, 0, 0, "grouped", window=0)


# ------------------------------------------------------------------------------ prepared (cached) data


def test_prepared_examples_give_the_batches_of_a_list_and_plan_without_reading_them(tmp_path, tokenizer, monkeypatch):
    from qlora_lite.config import DataConfig

    rng = random.Random(3)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog"]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=n))}) + "\n" for n in sample_lengths(203, seed=3)))
    prepared = cache.prepare_datasets(DataConfig(path=str(path), format="text", cache_dir=str(tmp_path / "cache")), tokenizer, 4096, seed=0)
    as_list = list(prepared.train)
    assert len(set(prepared.train.lengths.tolist())) > 50  # a real length mix for grouped to sort

    reads = []
    real_read_row = cache.TokenizedExamples._read_row
    monkeypatch.setattr(cache.TokenizedExamples, "_read_row", lambda self, row: reads.append(row) or real_read_row(self, row))
    for order in ("grouped", "random"):
        reads.clear()
        from_disk = take(prepared.train, range(150), 4, seed=9, batching=order)  # three epochs of 50
        assert len(reads) == 150 * 4  # the examples returned, and not one more: the plan read the lengths
        assert from_disk == take(as_list, range(150), 4, seed=9, batching=order)


# ----------------------------------------------------------------------------- collate


def test_collate_right_pads_and_masks_padding_by_position():
    short = {"input_ids": [5, 6, 3], "labels": [IGNORE_INDEX, 6, 3]}
    long = {"input_ids": [5, 6, 7, 8, 3], "labels": [IGNORE_INDEX, IGNORE_INDEX, 7, 8, 3]}

    batch = collate_batch([short, long], pad_token_id=0)

    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].tolist() == [[5, 6, 3, 0, 0], [5, 6, 7, 8, 3]]
    assert batch["labels"].tolist() == [[-100, 6, 3, -100, -100], [-100, -100, 7, 8, 3]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_ids"].dtype == torch.long

    # Padding with the EOS id (tokenizers without a pad token) loses no learned EOS.
    same_as_eos = collate_batch([short, long], pad_token_id=EOS)
    assert same_as_eos["input_ids"][0].tolist() == [5, 6, 3, 3, 3]
    assert (same_as_eos["labels"] == EOS).sum().item() == 2
    assert same_as_eos["attention_mask"].sum().item() == 8


def test_collate_packed_returns_position_ids_and_no_attention_mask():
    packs = pack_examples([
        {"input_ids": [5, 6, 3], "labels": [5, 6, 3]},
        {"input_ids": [7, 3], "labels": [7, 3]},
        {"input_ids": [8, 9, 9, 3], "labels": [8, 9, 9, 3]},
    ], max_seq_len=5)

    batch = collate_batch(packs, pad_token_id=0)

    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 3, 7, 3], [8, 9, 9, 3, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 3, -100, 3], [-100, 9, 9, 3, -100]]
    # Padding is its own sequence (positions restart at 0), after every real token.
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("fmt", ["alpaca", "text"])
def test_packing_keeps_every_token_and_every_scored_label(tmp_path, tokenizer, fmt):
    records = alpaca_records(30) if fmt == "alpaca" else [{"text": "the quick brown fox " * (1 + i % 5)} for i in range(30)]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    max_seq_len = 256

    plain, _ = build_datasets(DataConfig(path=str(path), format=fmt), tokenizer, max_seq_len, seed=0)
    packed, _ = build_datasets(DataConfig(path=str(path), format=fmt, packing=True), tokenizer, max_seq_len, seed=0)

    assert len(packed) < len(plain) / 2
    assert all(len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) <= max_seq_len for p in packed)
    assert sum(p["position_ids"].count(0) for p in packed) == len(plain) == 30
    # Same tokens in the same order; next-fit: the next example would not have fit.
    assert [t for p in packed for t in p["input_ids"]] == [t for ex in plain for t in ex["input_ids"]]
    batch = collate_batch(packed, pad_token_id=0)
    assert (batch["input_ids"] != 0).sum().item() == sum(len(ex["input_ids"]) for ex in plain)
    # Each example's first label becomes -100; no label the unpacked loss scores is lost.
    assert sum(label != IGNORE_INDEX for p in packed for label in p["labels"]) == learned_predictions(plain)


def _load_fp32(model_dir, attn_implementation: str):
    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation=attn_implementation).eval()


def _packed_fixture(tokenizer):
    """Five text examples of 7 to 19 tokens packed into 40-token rows: 3 + 2 examples, 33 and 26 tokens."""
    examples = [
        tokenize_example({"text": "the quick brown fox " * (1 + i % 4) + str(i)}, "text", tokenizer, 40, index=i)
        for i in range(5)
    ]
    packs = pack_examples(examples, max_seq_len=40)
    return examples, packs, collate_batch(packs, pad_token_id=0)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_logits_and_loss_equal_each_example_run_alone(tokenizer, tiny_model_dir, attn_implementation):
    model = _load_fp32(tiny_model_dir, attn_implementation)
    examples, packs, batch = _packed_fixture(tokenizer)
    assert [p["position_ids"].count(0) for p in packs] == [3, 2]
    assert [len(p["input_ids"]) for p in packs] == [33, 26]  # row 1 is padded

    with torch.no_grad():
        packed = model(**batch, use_cache=False)
        alone = [model(torch.tensor([ex["input_ids"]]), labels=torch.tensor([ex["labels"]])) for ex in examples]

    unpacked = iter(zip(examples, alone))
    for row, pack in enumerate(packs):
        for start in [i for i, position in enumerate(pack["position_ids"]) if position == 0]:
            ex, out = next(unpacked)
            length = len(ex["input_ids"])
            torch.testing.assert_close(packed.logits[row, start : start + length], out.logits[0], atol=1e-5, rtol=0)
    assert next(unpacked, None) is None

    # The packed mean loss is the token-weighted mean of the per-example losses.
    counts = torch.tensor([learned_predictions([ex]) for ex in examples], dtype=torch.float32)
    losses = torch.stack([out.loss for out in alone])
    torch.testing.assert_close(packed.loss, (losses * counts).sum() / counts.sum(), atol=1e-5, rtol=1e-5)


def test_packed_attention_needs_use_cache_false(tokenizer, tiny_llama_dir):
    """Why callers must pass use_cache=False: transformers skips packed-sequence detection when a
    KV cache exists, and the default config (use_cache=True) creates one. If this starts to fail,
    transformers fixed that and the requirement can be relaxed."""
    model = _load_fp32(tiny_llama_dir, "sdpa")
    examples, packs, batch = _packed_fixture(tokenizer)
    second = len(examples[0]["input_ids"])  # the second example of row 0
    with torch.no_grad():
        leaky = model(**batch).logits[0, second:second + len(examples[1]["input_ids"])]
        alone = model(torch.tensor([examples[1]["input_ids"]])).logits[0]
    assert (leaky - alone).abs().max().item() > 1e-2

