"""Prepared data: eval splits, truncation and its report, bad records and chat aliases, and the on-disk cache (hits, misses, each key part, processes, atomic folders, modes).

The tokenizer fixture has pad id 0, bos id 2, eos id 3 (`</s>`), no chat template, and does
not add BOS by itself; tests that need BOS or a template set them on a copy.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from qlora_lite.config import DataConfig
from qlora_lite.data import cache, tokenizing
from qlora_lite.data.batching import collate_batch, pack_examples
from qlora_lite.data.cache import DATA_CACHE_ENV, TruncationStats, build_datasets, build_datasets_with_stats, prepare_datasets, resolve_data_cache_dir
from qlora_lite.data.formats import IGNORE_INDEX
from qlora_lite.data.records import split_indices
from qlora_lite.data.tokenizing import tokenize_example
from qlora_lite.errors import DataError
from tests.helpers import ALPACA_NO_INPUT, BOS, CHATML_TEMPLATE, EOS, alpaca_records, ids_of, write_csv, write_jsonl

# ----------------------------------------------------------------------------- build_datasets


def test_eval_fraction_holds_out_a_seeded_tenth(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_records(100))
    cfg = DataConfig(path=str(path), eval_fraction=0.1)

    train, evaluation = build_datasets(cfg, tokenizer, max_seq_len=512, seed=1)
    _, same_eval = build_datasets(cfg, tokenizer, max_seq_len=512, seed=1)
    _, other_eval = build_datasets(cfg, tokenizer, max_seq_len=512, seed=2)

    assert (len(train), len(evaluation)) == (90, 10)
    as_set = lambda examples: {tuple(ex["input_ids"]) for ex in examples}  # noqa: E731
    assert as_set(evaluation) == as_set(same_eval)
    assert as_set(evaluation) != as_set(other_eval)
    assert len(as_set(train) | as_set(evaluation)) == 100
    assert split_indices(100, 0.1, seed=1)[1] == split_indices(100, 0.1, seed=1)[1]
    assert len(split_indices(7, 0.1, seed=0)[1]) == 1  # round(0.7) = 1, never 0


def test_eval_fraction_that_leaves_nothing_to_train_on_is_an_error():
    with pytest.raises(DataError, match="eval_fraction"):
        split_indices(1, 0.5, seed=0)


def test_eval_path_is_used_and_never_packed(tmp_path, tokenizer):
    train_path = write_csv(tmp_path / "train.csv", alpaca_records(7))
    eval_path = tmp_path / "eval.parquet"
    datasets.Dataset.from_list(alpaca_records(3)).to_parquet(str(eval_path))
    cfg = DataConfig(path=str(train_path), eval_path=str(eval_path), eval_fraction=0.5, packing=True)

    train, evaluation = build_datasets(cfg, tokenizer, max_seq_len=512, seed=0)

    assert len(evaluation) == 3  # eval_path wins over eval_fraction
    assert all(set(ex) == {"input_ids", "labels"} for ex in evaluation)
    assert sum(ex["position_ids"].count(0) for ex in train) == 7  # all 7 records train, packed


def test_max_examples_and_text_field(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"body": f"the quick fox {i}"} for i in range(10)])
    cfg = DataConfig(path=str(path), format="text", text_field="body", max_examples=4)

    train, evaluation = build_datasets(cfg, tokenizer, max_seq_len=512, seed=0)

    assert (len(train), len(evaluation)) == (4, 0)
    assert train[2]["input_ids"] == ids_of(tokenizer, "the quick fox 2") + [EOS]


def test_bad_record_in_a_file_reports_its_row(tmp_path, tokenizer):
    records = alpaca_records(20)
    del records[17]["output"]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError, match=r"record 17 has no 'output' field"):
        build_datasets(DataConfig(path=str(path)), tokenizer, max_seq_len=512, seed=0)


# max_seq_len = prompt (33 tokens) + 6: room for 5 response tokens and EOS.
FIT_MAX_SEQ_LEN = 39
FIT_RECORDS = [
    {"instruction": "Name a colour.", "output": "the lazy dog"},  # 3 tokens + EOS: fits
    {"instruction": "Name a colour.", "output": "the quick brown fox jumps"},  # 5 + EOS: exactly 39 tokens, fits
    {"instruction": "Name a colour.", "output": "Blue is a colour."},  # 6 + EOS: only the EOS is cut (1 token)
    {"instruction": "Name a colour.", "output": "the quick brown fox jumps over the lazy dog"},  # 9 + EOS: 4 cut
    {"instruction": "the quick brown fox jumps over the lazy dog " * 8, "output": "Blue."},  # prompt too long: 4 + EOS cut
]


def test_fit_records_have_the_token_counts_the_truncation_tests_rely_on(tokenizer):
    full = [tokenize_example(r, "alpaca", tokenizer, max_seq_len=512) for r in FIT_RECORDS]
    assert len(ids_of(tokenizer, ALPACA_NO_INPUT)) == 33
    assert [len(ex["input_ids"]) for ex in full] == [37, 39, 40, 43, 113]
    assert [sum(label != IGNORE_INDEX for label in ex["labels"]) for ex in full] == [4, 6, 7, 10, 5]


def test_truncation_drop_drops_every_example_whose_response_and_eos_do_not_fit(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", FIT_RECORDS)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", FIT_RECORDS[:1] + FIT_RECORDS[3:4])
    cfg = DataConfig(path=str(path), eval_path=str(eval_path))
    assert cfg.truncation == "drop"  # the default

    train, evaluation, stats = build_datasets_with_stats(cfg, tokenizer, FIT_MAX_SEQ_LEN, seed=0)

    assert list(train) == [tokenize_example(r, "alpaca", tokenizer, max_seq_len=512) for r in FIT_RECORDS[:2]]
    assert list(evaluation) == [tokenize_example(FIT_RECORDS[0], "alpaca", tokenizer, max_seq_len=512)]
    assert all(ex["labels"][-1] == EOS for ex in [*train, *evaluation])
    assert stats["train"] == TruncationStats(
        split="train", examples=5, truncated=3, fully_cut=1, response_tokens_cut=10, dropped=3,
        longest_tokens=113, max_seq_len=39, policy="drop",
    )
    assert stats["eval"] == TruncationStats(
        split="eval", examples=2, truncated=1, fully_cut=0, response_tokens_cut=4, dropped=1,
        longest_tokens=43, max_seq_len=39, policy="drop",
    )
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        "train: 3 of 5 examples did not fit in max_seq_len=39 (10 response tokens cut, longest example 113 tokens); "
        "dropped them (data.truncation=drop)",
        "eval: 1 of 2 examples did not fit in max_seq_len=39 (4 response tokens cut, longest example 43 tokens); "
        "dropped them (data.truncation=drop)",
    ]
    assert out[2].startswith("data: 7 records -> 3 examples (4 dropped), 113 tokens; tokenized with 1 process in ")
    assert len(out) == 3
    # build_datasets gives the same examples and prints the same lines, read from the cache this time.
    again = build_datasets(cfg, tokenizer, FIT_MAX_SEQ_LEN, seed=0)
    assert [list(split) for split in again] == [list(train), list(evaluation)]
    out = capsys.readouterr().out.splitlines()
    assert sum("did not fit" in line for line in out) == 2 and "read from the cache" in out[2]


def test_truncation_keep_keeps_cut_responses_but_drops_those_with_none_left(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", FIT_RECORDS)
    cfg = DataConfig(path=str(path), truncation="keep")

    train, evaluation, stats = build_datasets_with_stats(cfg, tokenizer, FIT_MAX_SEQ_LEN, seed=0)

    full = [tokenize_example(r, "alpaca", tokenizer, max_seq_len=512) for r in FIT_RECORDS]
    assert len(train) == 4 and list(evaluation) == []
    assert train[:2] == full[:2]
    for cut, whole in zip(train[2:], full[2:4]):
        assert len(cut["input_ids"]) == len(cut["labels"]) == 39
        assert cut["input_ids"] == whole["input_ids"][:39] and cut["labels"] == whole["labels"][:39]
        assert EOS not in cut["input_ids"]  # the lesson this policy accepts: these responses never end
    assert train[2]["labels"][33:] == ids_of(tokenizer, "Blue is a colour.")  # the whole response, its EOS cut
    assert stats == {
        "train": TruncationStats(
            split="train", examples=5, truncated=3, fully_cut=1, response_tokens_cut=10, dropped=1,
            longest_tokens=113, max_seq_len=39, policy="keep",
        ),
        "eval": TruncationStats(
            split="eval", examples=0, truncated=0, fully_cut=0, response_tokens_cut=0, dropped=0,
            longest_tokens=0, max_seq_len=39, policy="keep",
        ),
    }
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (
        "train: 3 of 5 examples did not fit in max_seq_len=39 (10 response tokens cut, longest example 113 tokens); "
        "kept 2 with a cut response and no EOS, dropped 1 with no response token left (data.truncation=keep)"
    )
    assert out[1].startswith("data: 5 records -> 4 examples (1 dropped), 154 tokens; ") and len(out) == 2


def test_truncation_report_when_everything_fits(tmp_path, tokenizer, capsys):
    path = write_jsonl(tmp_path / "train.jsonl", FIT_RECORDS[:4])
    cfg = DataConfig(path=str(path), eval_fraction=0.25)

    train, evaluation, stats = build_datasets_with_stats(cfg, tokenizer, max_seq_len=43, seed=0)

    assert (len(train), len(evaluation)) == (3, 1)
    assert (stats["train"].truncated, stats["eval"].truncated) == (0, 0)
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "train: all 3 examples fit in max_seq_len=43 (longest example 43 tokens)"
    assert out[1].startswith("eval: all 1 examples fit in max_seq_len=43 (longest example ")
    assert out[2].startswith("data: 4 records -> 4 examples (0 dropped), ")
    assert len(out) == 3


@pytest.mark.parametrize("truncation, records, message", [
    ("drop", FIT_RECORDS[2:], "no training examples left from {path}: all 3 did not fit in max_seq_len=39; "
     "raise train.max_seq_len, or set data.truncation=keep to train on the cut responses"),
    ("keep", FIT_RECORDS[4:], "no training examples left from {path}: all 1 had no response token left within "
     "max_seq_len=39; raise train.max_seq_len or shorten the prompts"),
], ids=["drop", "keep"])
def test_no_example_fits_is_an_error_naming_the_fix(tmp_path, tokenizer, truncation, records, message):
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(DataError) as err:
        build_datasets(DataConfig(path=str(path), truncation=truncation), tokenizer, FIT_MAX_SEQ_LEN, seed=0)
    assert str(err.value) == message.format(path=path)


# ----------------------------------------------------------------------------- prepared data and its cache


def chat_records(n: int) -> list[dict]:
    """n distinct conversations, every other one with two assistant turns."""
    records = []
    for i in range(n):
        messages = [{"role": "user", "content": f"Name colour {i}."}, {"role": "assistant", "content": f"Blue {i} is a colour."}]
        if i % 2:
            messages += [{"role": "user", "content": "Another?"}, {"role": "assistant", "content": f"the lazy dog {i}"}]
        records.append({"messages": messages})
    return records


def test_prepared_examples_are_a_sequence_of_the_examples_read_from_disk(tmp_path, tokenizer):
    records = alpaca_records(30)
    path = write_jsonl(tmp_path / "train.jsonl", records)

    prepared = prepare_datasets(DataConfig(path=str(path), eval_fraction=0.2), tokenizer, 512, seed=0)

    train_indices, eval_indices = split_indices(30, 0.2, seed=0)
    expected = [tokenize_example(records[i], "alpaca", tokenizer, 512, index=i) for i in train_indices]
    train = prepared.train
    assert len(train) == 24 and list(train) == expected
    assert list(prepared.eval) == [tokenize_example(records[i], "alpaca", tokenizer, 512) for i in eval_indices]
    assert train[3] == expected[3] and train[-1] == expected[-1] and train[np.int64(5)] == expected[5]
    assert train[2:5] == expected[2:5] and train[::7] == expected[::7] and train[:100] == expected
    assert isinstance(train[2:5], list) and prepared.eval[:0] == []
    assert all(type(token) is int for token in train[0]["input_ids"] + train[0]["labels"])
    assert train.lengths.tolist() == [len(ex["input_ids"]) for ex in expected]
    with pytest.raises(IndexError):
        train[24]
    # Collated and padded as a list of the same examples would be.
    batch = collate_batch(train[:4], pad_token_id=0)
    assert torch.equal(batch["input_ids"], collate_batch(expected[:4], pad_token_id=0)["input_ids"])

    # Packed: the packs pack_examples builds from the same examples, each built when read.
    packed = prepare_datasets(DataConfig(path=str(path), eval_fraction=0.2, packing=True), tokenizer, 128, seed=0)
    assert list(packed.train) == pack_examples([tokenize_example(r, "alpaca", tokenizer, 128) for r in (records[i] for i in train_indices)], 128)
    assert packed.train.lengths.tolist() == [len(p["input_ids"]) for p in packed.train]
    assert packed.stats["train"]["sequences"] == len(packed.train) < 24 == packed.stats["train"]["kept"]


def test_chat_records_prepared_in_batches_equal_each_tokenized_alone(tmp_path, tokenizer):
    # One tokenizer call per batch of records: the ids still fall in each piece as one call per record gives them.
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.chat_template = CHATML_TEMPLATE
    records = chat_records(25)
    path = write_jsonl(tmp_path / "chat.jsonl", records)

    prepared = prepare_datasets(DataConfig(path=str(path), format="chat"), tokenizer, 512, seed=0)

    assert list(prepared.train) == [tokenize_example(r, "chat", tokenizer, 512) for r in records]
    assert prepared.train[1]["input_ids"][0] == BOS and prepared.train[1]["labels"].count(EOS) == 2


def test_batched_encoding_gives_the_ids_of_the_tokenizers_own_call(tokenizer):
    texts = ["Name a colour.", "the quick </s> fox", " leading space", "x" * 300, "tab\there"]
    expected = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert tokenizing._encode_texts(tokenizer, texts) == expected
    # A backend left truncating, or set to split special tokens: the tokenizer's own call runs.
    truncating = copy.deepcopy(tokenizer)
    truncating.backend_tokenizer.enable_truncation(3)
    assert tokenizing._encode_texts(truncating, texts) == expected
    splitting = copy.deepcopy(tokenizer)
    splitting.split_special_tokens = True
    split_ids = tokenizing._encode_texts(splitting, texts)
    assert split_ids == [splitting(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert split_ids[1] != expected[1] and EOS in expected[1]


def test_a_second_run_reads_the_cache_without_loading_or_tokenizing(tmp_path, tokenizer, monkeypatch, data_cache):
    path = write_jsonl(tmp_path / "train.jsonl", FIT_RECORDS * 4)
    cfg = DataConfig(path=str(path), eval_fraction=0.25)

    first = prepare_datasets(cfg, tokenizer, FIT_MAX_SEQ_LEN, seed=0)

    def fail(*args, **kwargs):
        raise AssertionError("a cached run must not load or tokenize the records")

    monkeypatch.setattr(cache, "load_records", fail)
    monkeypatch.setattr(cache, "_tokenize_batch", fail)
    second = prepare_datasets(cfg, tokenizer, FIT_MAX_SEQ_LEN, seed=0)

    assert (first.stats["cache"], second.stats["cache"]) == ("miss", "hit")
    assert list(second.train) == list(first.train) and list(second.eval) == list(first.eval)
    same = lambda stats: {k: v for k, v in stats.items() if k not in ("seconds", "cache")}  # noqa: E731
    assert same(second.stats) == same(first.stats)
    assert json.loads(json.dumps(second.stats)) == second.stats
    # 20 records: 15 train, 5 held out; 3 of each 5 FIT_RECORDS do not fit and are dropped.
    stats = second.stats
    assert (stats["records"], stats["kept"], stats["dropped"], stats["truncated"]) == (20, 8, 12, 12)
    assert stats["train"]["examples"] + stats["eval"]["examples"] == 20
    assert stats["tokens"] == sum(map(len, (ex["input_ids"] for ex in [*second.train, *second.eval])))
    assert (stats["num_proc"], stats["max_seq_len"], stats["truncation"], stats["packing"]) == (1, 39, "drop", False)
    assert stats["cache_path"].startswith(str(data_cache)) and stats["seconds"] < stats["tokenize_seconds"] + 1
    # The finished folder only: no temporary folder left beside it.
    assert [p.name for p in data_cache.iterdir()] == [Path(stats["cache_path"]).name]


def _edit_a_record_keeping_size_and_mtime(path: Path) -> None:
    before = path.stat()
    text = path.read_text()
    assert "Blue 5 is" in text
    path.write_text(text.replace("Blue 5 is", "Bleu 5 is"))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def _with_tokenizer(state: dict, change) -> None:
    state["tokenizer"] = copy.deepcopy(state["tokenizer"])
    change(state["tokenizer"])


def _replace_cfg(**changes):
    return lambda state: state.update(cfg=dataclasses.replace(state["cfg"], **changes))


# Each part of the key: (format of the data, the change). Every change must make a miss.
KEY_PARTS = {
    "data content": ("alpaca", lambda state: _edit_a_record_keeping_size_and_mtime(state["path"])),
    "eval data content": ("alpaca", lambda state: _edit_a_record_keeping_size_and_mtime(state["eval_path"])),
    "tokenizer vocabulary": ("alpaca", lambda state: _with_tokenizer(state, lambda tok: tok.add_tokens(["colour"]))),
    "tokenizer special tokens": ("alpaca", lambda state: _with_tokenizer(state, lambda tok: setattr(tok, "eos_token", "<s>"))),
    "split special tokens": ("alpaca", lambda state: _with_tokenizer(state, lambda tok: setattr(tok, "split_special_tokens", True))),
    "chat template": ("chat", lambda state: _with_tokenizer(state, lambda tok: setattr(tok, "chat_template", CHATML_TEMPLATE))),
    "format": ("alpaca", _replace_cfg(format="text", text_field="output")),
    "text field": ("text", _replace_cfg(text_field="instruction")),
    "max_seq_len": ("alpaca", lambda state: state.update(max_seq_len=60)),
    "truncation": ("alpaca", _replace_cfg(truncation="keep")),
    "packing": ("alpaca", _replace_cfg(packing=True)),
    "max_examples": ("alpaca", _replace_cfg(max_examples=7)),
    "eval_fraction": ("alpaca", _replace_cfg(eval_path=None, eval_fraction=0.2)),
}


@pytest.mark.parametrize("part", KEY_PARTS)
def test_each_part_of_the_key_invalidates_the_cache(tmp_path, tokenizer, part):
    fmt, change = KEY_PARTS[part]
    records = chat_records(12) if fmt == "chat" else alpaca_records(12)
    if fmt == "text":
        records = [{**r, "text": r["output"]} for r in records]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    eval_path = write_jsonl(tmp_path / "eval.jsonl", records[:6])
    base = {"cfg": DataConfig(path=str(path), eval_path=str(eval_path), format=fmt, text_field="text"), "tokenizer": tokenizer, "max_seq_len": 512}
    state = {**base, "path": path, "eval_path": eval_path}
    prepare = lambda s: prepare_datasets(s["cfg"], s["tokenizer"], s["max_seq_len"], seed=0)  # noqa: E731

    before = prepare(base)
    change(state)
    after = prepare(state)

    assert (before.stats["cache"], after.stats["cache"]) == ("miss", "miss")
    assert after.stats["cache_path"] != before.stats["cache_path"]
    if part in ("data content", "eval data content"):
        edited = after.train if part == "data content" else after.eval
        record = {**alpaca_records(12)[5], "output": "Bleu 5 is the quick fox."}
        assert edited[5] == tokenize_example(record, "alpaca", tokenizer, 512) != before.train[5]
    else:
        # The entry for the other key stays valid: going back is a hit.
        assert prepare(base).stats["cache"] == "hit"


def test_what_changes_no_example_keeps_the_cache(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_records(12))
    first = prepare_datasets(DataConfig(path=str(path)), tokenizer, 512, seed=0)
    os.utime(path, ns=(1, 1))  # touched: same bytes
    for cfg, seed in [
        (DataConfig(path=str(path)), 0),
        (DataConfig(path=str(path), num_proc=2), 0),  # processes change how, not what
        (DataConfig(path=str(path)), 5),  # the seed only matters when it picks held-out records
        (DataConfig(path=str(path), split="test", text_field="body"), 0),  # a file has one split; alpaca reads no text field
    ]:
        again = prepare_datasets(cfg, tokenizer, 512, seed)
        assert again.stats["cache"] == "hit" and again.stats["cache_path"] == first.stats["cache_path"]
    with_eval = DataConfig(path=str(path), eval_fraction=0.25)
    assert prepare_datasets(with_eval, tokenizer, 512, seed=0).stats["cache"] == "miss"
    assert prepare_datasets(with_eval, tokenizer, 512, seed=1).stats["cache"] == "miss"  # another held-out set


def test_two_processes_prepare_the_examples_of_one(tmp_path, tokenizer):
    records = alpaca_records(40) + FIT_RECORDS
    path = write_jsonl(tmp_path / "train.jsonl", records)
    cfg = DataConfig(path=str(path), eval_fraction=0.1, packing=True)

    one = prepare_datasets(dataclasses.replace(cfg, num_proc=1, cache_dir=str(tmp_path / "one")), tokenizer, 64, seed=0)
    two = prepare_datasets(dataclasses.replace(cfg, num_proc=2, cache_dir=str(tmp_path / "two")), tokenizer, 64, seed=0)

    assert (one.stats["num_proc"], two.stats["num_proc"]) == (1, 2)
    assert list(two.train) == list(one.train) and list(two.eval) == list(one.eval)
    assert {k: v for k, v in two.stats["train"].items()} == one.stats["train"]
    assert len(list(Path(two.stats["cache_path"]).glob("train/*.arrow"))) == 2  # one file per process


def test_bad_record_reports_its_row_from_any_process_and_caches_nothing(tmp_path, tokenizer, data_cache):
    records = alpaca_records(20)
    del records[17]["output"]
    path = write_jsonl(tmp_path / "train.jsonl", records)
    for num_proc in (1, 2):  # 2: record 17 is row 7 of the second process's shard
        with pytest.raises(DataError) as err:
            prepare_datasets(DataConfig(path=str(path), num_proc=num_proc), tokenizer, 512, seed=0)
        assert str(err.value) == f"train file {path}, record 17 has no 'output' field (format alpaca needs instruction, output; input optional)"
    assert list(data_cache.iterdir()) == []


@pytest.mark.parametrize("num_proc", [1, 2])
def test_a_bad_record_in_the_eval_file_names_the_file_and_the_split(tmp_path, tokenizer, num_proc):
    """Issue 22: "record 1 has no 'output' field (...)" read the same whether the record was in data.path or data.eval_path."""
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_records(6))
    records = alpaca_records(4)
    del records[1]["output"]
    eval_path = write_jsonl(tmp_path / "eval.jsonl", records)
    with pytest.raises(DataError) as err:
        prepare_datasets(DataConfig(path=str(path), eval_path=str(eval_path), num_proc=num_proc), tokenizer, 512, seed=0)
    assert str(err.value) == f"eval file {eval_path}, record 1 has no 'output' field (format alpaca needs instruction, output; input optional)"


def test_a_bad_record_in_a_folder_names_the_folder_and_its_split(tmp_path, tokenizer):
    records = alpaca_records(5)
    del records[3]["instruction"]
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "test.jsonl", records)
    with pytest.raises(DataError) as err:
        prepare_datasets(DataConfig(path=str(tmp_path / "data"), split="test"), tokenizer, 512, seed=0)
    assert str(err.value) == (
        f"train data {tmp_path / 'data'} (split 'test'), record 3 has no 'instruction' field "
        "(format alpaca needs instruction, output; input optional)"
    )


def test_chat_role_aliases_are_counted_over_processes_and_reported_once(tmp_path, tokenizer, capsys):
    records = chat_records(12)
    sharegpt = {"user": "human", "assistant": "gpt"}
    for record in records[:8]:  # ShareGPT's layout
        record["conversations"] = [{"from": sharegpt[m["role"]], "value": m["content"]} for m in record.pop("messages")]
    records[8]["messages"] = [{"from": sharegpt[m["role"]], "value": m["content"]} for m in records[8]["messages"]]
    records[9]["messages"][1]["role"] = "model"  # Gemma's
    records[11]["messages"][1]["role"] = "bot"
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    plain = write_jsonl(tmp_path / "plain.jsonl", chat_records(12))

    cfg = DataConfig(path=str(path), format="chat", eval_fraction=0.25)
    one = prepare_datasets(dataclasses.replace(cfg, num_proc=1), tokenizer, 512, seed=0)
    two = prepare_datasets(dataclasses.replace(cfg, num_proc=2, cache_dir=str(tmp_path / "two")), tokenizer, 512, seed=0)
    out = capsys.readouterr().out.splitlines()
    again = prepare_datasets(cfg, tokenizer, 512, seed=0)
    expected = prepare_datasets(dataclasses.replace(cfg, path=str(plain)), tokenizer, 512, seed=0)

    assert list(one.train) == list(two.train) == list(expected.train) and list(one.eval) == list(expected.eval)
    read_as = {"conversations->messages": 8, "from/value->role/content": 9, "human->user": 9, "gpt->assistant": 9, "bot->assistant": 1, "model->assistant": 1}
    for prepared in (one, two, again):
        assert (prepared.stats["chat_read_as"], prepared.stats["chat_records_read_as"]) == (read_as, 11)
    assert (expected.stats["chat_read_as"], expected.stats["chat_records_read_as"]) == ({}, 0)
    clause = "; chat read as: conversations->messages, from/value->role/content, human->user, gpt->assistant, bot->assistant, model->assistant (11 records); "
    assert [clause in line for line in out] == [False, False, True, False, False, True]  # per process: train, eval, data
    assert out[2].startswith("data: 12 records -> 12 examples (0 dropped), ") and out[2].split(clause)[1].startswith("tokenized with 1 process in ")
    assert out[5].split(clause)[1].startswith("tokenized with 2 processes in ")
    again_out, expected_out = capsys.readouterr().out.splitlines()[2::3]
    assert clause in again_out and "read from the cache" in again_out and "chat read as" not in expected_out


def test_cache_folders_and_files_follow_the_umask(tmp_path, tokenizer, data_cache):
    """Issue 22: tempfile.mkdtemp made the cache folder drwx------, unreadable to another user or a serving container."""
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_records(8))
    before = os.umask(0o022)
    try:
        folder = Path(prepare_datasets(DataConfig(path=str(path), num_proc=2), tokenizer, 512, seed=0).stats["cache_path"])
    finally:
        os.umask(before)
    modes = {str(p.relative_to(data_cache)): oct(p.stat().st_mode & 0o777) for p in [data_cache, *sorted(data_cache.rglob("*"))]}
    name = folder.name
    assert modes == {
        ".": "0o755", name: "0o755", f"{name}/train": "0o755", f"{name}/train/tokens_00000_of_00002.arrow": "0o644",
        f"{name}/train/tokens_00001_of_00002.arrow": "0o644", f"{name}/train_rows.npy": "0o644", f"{name}/eval_rows.npy": "0o644",
        f"{name}/manifest.json": "0o644",
    }


def test_a_cache_folder_appears_whole_or_not_at_all(tmp_path, tokenizer, monkeypatch, data_cache):
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_records(12))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", alpaca_records(3))
    cfg = DataConfig(path=str(path), eval_path=str(eval_path))

    # A writer that stops half way (here after the training split) leaves nothing behind.
    real_tokenize = cache._tokenize_to_arrow
    def stop_at_eval(records, tmp, name, *args):
        if name == "eval":
            raise KeyboardInterrupt
        return real_tokenize(records, tmp, name, *args)
    monkeypatch.setattr(cache, "_tokenize_to_arrow", stop_at_eval)
    with pytest.raises(KeyboardInterrupt):
        prepare_datasets(cfg, tokenizer, 512, seed=0)
    assert list(data_cache.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv(DATA_CACHE_ENV, str(data_cache))

    # Two writers at once (ranks without a barrier): the one that renames second finds the
    # first one's complete folder in place, uses it, and removes its own.
    real_rename = Path.rename
    def lose_the_race(self, target):
        shutil.copytree(self, target)  # the other writer's folder, complete, renamed first
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", lose_the_race)
    prepared = prepare_datasets(cfg, tokenizer, 512, seed=0)
    assert prepared.stats["cache"] == "miss" and len(prepared.train) == 12 and len(prepared.eval) == 3
    assert [p.name for p in data_cache.iterdir()] == [Path(prepared.stats["cache_path"]).name]


def test_a_damaged_cache_says_to_delete_it(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_records(5))
    folder = Path(prepare_datasets(DataConfig(path=str(path)), tokenizer, 512, seed=0).stats["cache_path"])
    next(folder.glob("train/*.arrow")).unlink()
    with pytest.raises(DataError, match=r"^the data cache .* is damaged .*; delete that folder and run again to rebuild it$"):
        prepare_datasets(DataConfig(path=str(path)), tokenizer, 512, seed=0)


def test_opening_the_cache_copies_no_tokens_into_memory(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_records(2000))
    cfg = DataConfig(path=str(path))
    first = prepare_datasets(cfg, tokenizer, 512, seed=0)
    token_bytes = 2 * 4 * first.stats["tokens"]  # input_ids and labels, int32
    before = pa.total_allocated_bytes()
    cached = prepare_datasets(cfg, tokenizer, 512, seed=0)
    assert cached.stats["cache"] == "hit" and token_bytes > 500_000
    assert pa.total_allocated_bytes() - before < token_bytes / 100  # memory-mapped, not read


def test_cache_folder_comes_from_the_recipe_then_the_environment_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path / "env"))
    assert resolve_data_cache_dir(DataConfig(cache_dir=str(tmp_path / "recipe"))) == tmp_path / "recipe"
    assert resolve_data_cache_dir(DataConfig()) == tmp_path / "env"
    monkeypatch.delenv(DATA_CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_cache_dir(DataConfig()) == tmp_path / ".cache" / "qlora-lite" / "data"




@pytest.mark.parametrize("given", ["setting", "environment"])
def test_a_relative_cache_folder_is_read_from_where_the_command_runs(tmp_path, tokenizer, monkeypatch, given):
    """Issue 22: a relative data.cache_dir (or $QLORA_LITE_DATA_CACHE) crashed in _tokenize_to_arrow ("is not in the subpath of")."""
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_records(8))
    monkeypatch.chdir(tmp_path)
    if given == "environment":
        monkeypatch.setenv(DATA_CACHE_ENV, "dcrel")
    cfg = DataConfig(path=str(path), cache_dir="dc3rel" if given == "setting" else None)
    first, second = prepare_datasets(cfg, tokenizer, 512, seed=0), prepare_datasets(cfg, tokenizer, 512, seed=0)
    folder = Path.cwd() / ("dc3rel" if given == "setting" else "dcrel")
    assert (first.stats["cache"], second.stats["cache"]) == ("miss", "hit")
    assert Path(second.stats["cache_path"]).parent == folder and len(second.train) == 8
