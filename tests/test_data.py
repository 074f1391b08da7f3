"""Data: loading, prompt formats, loss masking, eval splits, packing and batches.

The tokenizer fixture has pad id 0, bos id 2, eos id 3 (`</s>`), no chat template, and does
not add BOS by itself; tests that need BOS or a template set them on a copy.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
import shutil
from pathlib import Path

import datasets
import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from qlora_lite import data
from qlora_lite.config import DataConfig
from qlora_lite.data import (
    DATA_CACHE_ENV,
    IGNORE_INDEX,
    DataError,
    build_datasets,
    collate_batch,
    find_end_of_turn_token,
    load_records,
    pack_examples,
    prepare_datasets,
    render_example,
    resolve_data_cache_dir,
    TruncationStats,
    build_datasets_with_stats,
    split_indices,
    tokenize_example,
)

EOS = 3
BOS = 2

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a colour.\n\n### Input:\nthe sky\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a colour.\n\n### Response:\n"
)
# ChatML-like, closing each turn with the tokenizer's EOS and opening with BOS, as Llama 3 and
# Qwen2 templates do with their own tokens.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] + eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SINGLE_TURN = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is a colour."}]}


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def alpaca_records(n: int) -> list[dict]:
    """n distinct records, every third one with an input."""
    return [
        {"instruction": f"Name colour {i}.", "input": f"hint {i}" if i % 3 == 0 else "", "output": f"Blue {i} is the quick fox."}
        for i in range(n)
    ]


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path, records: list[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def learned_predictions(examples: list[dict]) -> int:
    """Labels the shifted causal-LM loss scores: every one but the first of each example."""
    return sum(sum(label != IGNORE_INDEX for label in ex["labels"][1:]) for ex in examples)


@pytest.fixture(autouse=True)
def data_cache(tmp_path, monkeypatch):
    """Each test prepares its data into a cache of its own, never into ~/.cache."""
    folder = tmp_path / "data-cache"
    monkeypatch.setenv(DATA_CACHE_ENV, str(folder))
    return folder


# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_load_records_reads_each_local_format(tmp_path, suffix):
    records = alpaca_records(5)
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, records)
    elif suffix == "json":
        path.write_text(json.dumps(records))
    elif suffix == "csv":
        write_csv(path, records)
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))

    loaded = load_records(str(path))

    assert len(loaded) == 5
    assert loaded[3]["output"] == "Blue 3 is the quick fox."
    assert loaded[3]["instruction"] == "Name colour 3."


def test_load_records_reads_named_split_of_a_folder(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", alpaca_records(3))
    write_jsonl(tmp_path / "test.jsonl", alpaca_records(2))

    assert len(load_records(str(tmp_path), split="train")) == 3
    assert len(load_records(str(tmp_path), split="test")) == 2
    with pytest.raises(DataError, match="no split 'validation'"):
        load_records(str(tmp_path), split="validation")


def test_load_records_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match="does not exist") as err:
        load_records(str(missing))
    assert str(missing) in str(err.value)


def test_load_records_unreachable_hub_says_pass_a_local_file(monkeypatch):
    # Offline mode fails the same way as a dead network, without waiting for retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="hub is unreachable") as err:
        load_records("someone/some-dataset")
    assert "local .jsonl" in str(err.value)


NO_RECORDS_FIX = {
    "jsonl": "add one JSON object per line, or point data.path at your data file",
    "json": "add a JSON list of objects (or one object per line), or point data.path at your data file",
    "csv": "add rows under a header row (one per record), or point data.path at your data file",
    "parquet": "add one row per record, or point data.path at your data file",
}


@pytest.mark.parametrize("suffix, content, reason", [
    ("jsonl", "", "the file is empty"),
    ("json", "", "the file is empty"),
    ("csv", "", "the file is empty"),
    ("parquet", "", "the file is empty"),
    ("jsonl", "\n  \n\n", "the file has only blank lines"),
    ("csv", "\n\n", "the file has only blank lines"),
    ("json", "[]\n", "its JSON list is empty"),
    ("csv", "instruction,output\n", "it has a header row but no data rows"),
    ("parquet", None, "it has no rows"),
], ids=["0-byte-jsonl", "0-byte-json", "0-byte-csv", "0-byte-parquet", "blank-jsonl", "blank-csv", "empty-list-json",
        "header-only-csv", "0-row-parquet"])
def test_file_without_records_says_it_holds_none(tmp_path, suffix, content, reason):
    path = tmp_path / f"data.{suffix}"
    if content is None:
        datasets.Dataset.from_dict({"instruction": [], "output": []}).to_parquet(str(path))
    else:
        path.write_text(content)

    with pytest.raises(DataError) as err:
        load_records(str(path))

    assert str(err.value) == f"{path} holds no records ({reason}); {NO_RECORDS_FIX[suffix]}"


@pytest.mark.parametrize("suffix, lines, message", [
    ("jsonl", ['{"instruction": "a", "output": "b"}', "", '{"instruction": "a", output: "b"}'],
     "line 3 is not valid JSON: Expecting property name enclosed in double quotes at column 22; fix or remove that line"),
    ("jsonl", ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "out'],
     "line 2 is not valid JSON: Unterminated string starting at column 22; fix or remove that line"),
    ("jsonl", ['{"instruction": "a", "output": "b"}', "[1, 2]"],
     "line 2 is a JSON list, not an object; write one record per line as a JSON object"),
    ("json", ['{"instruction": "a", "output": "b"}', '{"instruction": "a" "output": "b"}'],
     "line 2 is not valid JSON: Expecting ',' delimiter at column 21; fix or remove that line"),
    ("json", ['[{"instruction": "a", "output": "b"},', '{"instruction": "a", "output": "b"},', "]"],
     "is not valid JSON: Expecting value at line 3 column 1; fix the file there"),
], ids=["jsonl-bad-key", "jsonl-cut-line", "jsonl-array-line", "json-lines-bad-line", "json-list-trailing-comma"])
def test_malformed_json_names_the_line(tmp_path, suffix, lines, message):
    path = tmp_path / f"data.{suffix}"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as err:
        load_records(str(path))

    assert str(err.value) == f"{path} {message}"


def test_malformed_csv_gives_the_parser_cause(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n")

    with pytest.raises(DataError) as err:
        load_records(str(path))

    assert str(err.value) == (
        f"could not read {path}: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3; check the file is valid csv"
    )


# ----------------------------------------------------------------------------- formats and masking


def test_alpaca_prompt_is_the_standard_template_and_only_response_is_learned(tokenizer):
    record = {"instruction": "Name a colour.", "input": "the sky", "output": "Blue is a colour."}

    prompt, response = render_example(record, "alpaca", tokenizer)
    example = tokenize_example(record, "alpaca", tokenizer, max_seq_len=512)

    assert (prompt, response) == (ALPACA_WITH_INPUT, "Blue is a colour.")
    n_prompt, response_ids = len(ids_of(tokenizer, prompt)), ids_of(tokenizer, response)
    assert len(example["input_ids"]) == n_prompt + len(response_ids) + 1
    assert example["labels"].count(IGNORE_INDEX) == n_prompt
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][n_prompt:] == response_ids + [EOS]
    assert example["input_ids"][-1] == EOS and example["labels"][-1] == EOS


@pytest.mark.parametrize("record", [
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Name a colour.", "input": "", "output": "Blue."},
    {"instruction": "Name a colour.", "input": None, "output": "Blue."},
], ids=["missing", "empty", "null"])
def test_alpaca_without_input_uses_the_no_input_template(tokenizer, record):
    assert render_example(record, "alpaca", tokenizer) == (ALPACA_NO_INPUT, "Blue.")


def test_alpaca_csv_empty_input_cell_uses_the_no_input_template(tmp_path, tokenizer):
    path = write_csv(tmp_path / "d.csv", [{"instruction": "Name a colour.", "input": "", "output": "42"}])
    record = load_records(str(path))[0]
    # An empty CSV cell arrives as None and a numeric answer as an int: both must render.
    assert render_example(record, "alpaca", tokenizer) == (ALPACA_NO_INPUT, "42")


def test_bos_is_prepended_and_masked_when_the_tokenizer_adds_one(tokenizer):
    bos_tokenizer = copy.deepcopy(tokenizer)
    bos_tokenizer.add_bos_token = True
    record = {"instruction": "Name a colour.", "output": "Blue."}

    example = tokenize_example(record, "alpaca", bos_tokenizer, max_seq_len=512)

    n_prompt = len(ids_of(tokenizer, ALPACA_NO_INPUT))
    assert example["input_ids"][0] == BOS and example["input_ids"].count(BOS) == 1
    assert example["labels"].count(IGNORE_INDEX) == 1 + n_prompt
    assert example["labels"][-1] == EOS


def test_text_format_learns_every_token(tokenizer):
    record = {"body": "the quick brown fox jumps over the lazy dog"}

    prompt, response = render_example(record, "text", tokenizer, text_field="body")
    example = tokenize_example(record, "text", tokenizer, max_seq_len=512, text_field="body")

    assert prompt == "" and response == record["body"]
    assert example["input_ids"] == ids_of(tokenizer, record["body"]) + [EOS]
    assert example["labels"] == example["input_ids"]
    assert example["labels"].count(IGNORE_INDEX) == 0


def test_chat_without_template_uses_the_default_template(tokenizer):
    assert tokenizer.chat_template is None

    prompt, response = render_example(SINGLE_TURN, "chat", tokenizer)
    example = tokenize_example(SINGLE_TURN, "chat", tokenizer, max_seq_len=512)

    assert prompt == "<|user|>\nName a colour.</s>\n<|assistant|>\n"
    assert response == "Blue is a colour."
    n_prompt = len(ids_of(tokenizer, prompt))
    assert example["labels"].count(IGNORE_INDEX) == n_prompt
    assert example["input_ids"] == ids_of(tokenizer, prompt) + ids_of(tokenizer, response) + [EOS]
    assert example["labels"][-1] == EOS


def test_chat_uses_the_tokenizer_template_without_doubling_bos_or_eos(tokenizer):
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = CHATML_TEMPLATE
    chat_tokenizer.add_bos_token = True  # the template writes BOS too: it must appear once

    prompt, response = render_example(SINGLE_TURN, "chat", chat_tokenizer)
    example = tokenize_example(SINGLE_TURN, "chat", chat_tokenizer, max_seq_len=512)

    assert prompt == "<s><|im_start|>user\nName a colour.</s>\n<|im_start|>assistant\n"
    assert response == "Blue is a colour."  # the template's closing </s> becomes the appended EOS
    n_prompt = len(ids_of(tokenizer, prompt))
    assert example["input_ids"][0] == BOS and example["input_ids"].count(BOS) == 1
    assert example["labels"].count(IGNORE_INDEX) == n_prompt
    assert example["labels"][n_prompt:] == ids_of(tokenizer, "Blue is a colour.") + [EOS]
    assert example["input_ids"].count(EOS) == 2  # one closing the user turn (masked), one learned


def test_multi_turn_chat_learns_every_assistant_turn_and_nothing_else(tokenizer):
    record = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": "hi! how can I help?"},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue is a colour."},
    ]}

    prompt, response = render_example(record, "chat", tokenizer)
    example = tokenize_example(record, "chat", tokenizer, max_seq_len=512)

    first = "<|system|>\nBe brief.</s>\n<|user|>\nhello there</s>\n<|assistant|>\n"
    between = "\n<|user|>\nName a colour.</s>\n<|assistant|>\n"
    assert prompt == first + "hi! how can I help?</s>" + between
    assert response == "Blue is a colour."
    t1, t2 = ids_of(tokenizer, "hi! how can I help?"), ids_of(tokenizer, "Blue is a colour.")
    m1, m2 = ids_of(tokenizer, first), ids_of(tokenizer, between)
    assert example["input_ids"] == m1 + t1 + [EOS] + m2 + t2 + [EOS]
    assert example["labels"] == [IGNORE_INDEX] * len(m1) + t1 + [EOS] + [IGNORE_INDEX] * len(m2) + t2 + [EOS]


# Meta-Llama-3-8B-Instruct's chat template, verbatim; Llama-3.1 closes turns the same way.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen2.5's ChatML template less its tool branches.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}"
    "{%- else %}{{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}"
    "{%- endif %}{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]  # ids 0..4
QWEN25_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0..2
TWO_TURNS = {"messages": [
    {"role": "user", "content": "hello there"},
    {"role": "assistant", "content": "hi! how can I help?"},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue is a colour."},
]}


def build_byte_level_tokenizer(special: list[str], template: str, eos: str, bos: str | None = None) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer like Llama 3's and Qwen2's (decode gives back the exact text); adds BOS when given one."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(["hello there hi! how can I help? Name a colour. Blue is a colour. You are a helpful assistant."] * 5, trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, special.index(bos))])
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=eos)
    hf_tok.chat_template = template
    return hf_tok


def llama3_tokenizer(eos: str = "<|end_of_text|>") -> PreTrainedTokenizerFast:
    """Llama-3.1 base (eos <|end_of_text|>) by default; eos <|eot_id|> is the instruct tokenizer."""
    return build_byte_level_tokenizer(LLAMA3_SPECIAL, LLAMA3_TEMPLATE, eos=eos, bos="<|begin_of_text|>")


def qwen25_tokenizer(eos: str = "<|endoftext|>") -> PreTrainedTokenizerFast:
    """Qwen2.5 base (eos <|endoftext|>, no BOS) by default; eos <|im_end|> is the instruct tokenizer."""
    return build_byte_level_tokenizer(QWEN25_SPECIAL, QWEN25_TEMPLATE, eos=eos)


def test_find_end_of_turn_token_reads_the_template():
    assert find_end_of_turn_token(llama3_tokenizer()) == "<|eot_id|>"
    assert find_end_of_turn_token(qwen25_tokenizer()) == "<|im_end|>"
    assert find_end_of_turn_token(llama3_tokenizer(eos="<|eot_id|>")) == "<|eot_id|>"


def test_find_end_of_turn_token_of_our_fixture_tokenizer(tokenizer):
    assert find_end_of_turn_token(tokenizer) is None  # no template: DEFAULT_CHAT_TEMPLATE ends turns with EOS
    chat_tokenizer = copy.deepcopy(tokenizer)
    chat_tokenizer.chat_template = CHATML_TEMPLATE
    assert find_end_of_turn_token(chat_tokenizer) == "</s>"
    chat_tokenizer.chat_template = "{% for m in messages %}{{ m['content'] | trim + ' ' + eos_token }}{% endfor %}"
    assert find_end_of_turn_token(chat_tokenizer) == "</s>"  # Llama 2 writes a space before it
    chat_tokenizer.chat_template = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] }}\n{% endfor %}"
    assert find_end_of_turn_token(chat_tokenizer) is None


@pytest.mark.parametrize("eos", ["<|end_of_text|>", "<|eot_id|>"], ids=["base", "instruct"])
def test_llama3_chat_ends_each_turn_with_eot_and_no_extra_eos(eos):
    tok = llama3_tokenizer(eos)
    eot, bos = 4, 0
    assert (tok.convert_tokens_to_ids("<|eot_id|>"), tok.bos_token_id) == (eot, bos)

    prompt, response = render_example(TWO_TURNS, "chat", tok)
    example = tokenize_example(TWO_TURNS, "chat", tok, max_seq_len=512)

    first = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhello there<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    between = "<|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert prompt == first + "hi! how can I help?<|eot_id|>" + between
    assert prompt == tok.apply_chat_template(TWO_TURNS["messages"][:3], add_generation_prompt=True, tokenize=False)
    assert response == "Blue is a colour."
    m1, m2 = ids_of(tok, first), ids_of(tok, between)
    t1, t2 = ids_of(tok, "hi! how can I help?"), ids_of(tok, "Blue is a colour.")
    assert m1[0] == bos and m1.count(eot) == 1 and m2.count(eot) == 1  # the user turns' <|eot_id|>, masked
    assert example["input_ids"] == m1 + t1 + [eot] + m2 + t2 + [eot]
    assert example["labels"] == [IGNORE_INDEX] * len(m1) + t1 + [eot] + [IGNORE_INDEX] * len(m2) + t2 + [eot]
    assert example["input_ids"].count(bos) == 1 and 1 not in example["input_ids"]  # no <|end_of_text|> anywhere
    # The training sequence is the template's own rendering (which ends right after <|eot_id|>).
    assert tok.decode(example["input_ids"]) == tok.apply_chat_template(TWO_TURNS["messages"], tokenize=False)


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<|im_end|>"], ids=["base", "instruct"])
def test_chatml_chat_ends_each_turn_with_im_end_and_no_extra_eos(eos):
    tok = qwen25_tokenizer(eos)
    im_end, endoftext = 2, 0
    assert tok.convert_tokens_to_ids("<|im_end|>") == im_end and tok.bos_token_id is None

    prompt, response = render_example(TWO_TURNS, "chat", tok)
    example = tokenize_example(TWO_TURNS, "chat", tok, max_seq_len=512)

    first = (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nhello there<|im_end|>\n<|im_start|>assistant\n"
    )
    between = "\n<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n"
    assert prompt == first + "hi! how can I help?<|im_end|>" + between
    assert prompt == tok.apply_chat_template(TWO_TURNS["messages"][:3], add_generation_prompt=True, tokenize=False)
    assert response == "Blue is a colour."
    m1, m2 = ids_of(tok, first), ids_of(tok, between)
    t1, t2 = ids_of(tok, "hi! how can I help?"), ids_of(tok, "Blue is a colour.")
    assert m1.count(im_end) == 2 and m2.count(im_end) == 1  # system and user turns' <|im_end|>, masked
    assert example["input_ids"] == m1 + t1 + [im_end] + m2 + t2 + [im_end]
    assert example["labels"] == [IGNORE_INDEX] * len(m1) + t1 + [im_end] + [IGNORE_INDEX] * len(m2) + t2 + [im_end]
    assert endoftext not in example["input_ids"]
    # The template's rendering, less the "\n" it writes after the last turn.
    assert tok.decode(example["input_ids"]) + "\n" == tok.apply_chat_template(TWO_TURNS["messages"], tokenize=False)


@pytest.mark.parametrize("fmt, record, field", [
    ("alpaca", {"instruction": "Name a colour.", "input": ""}, "output"),
    ("alpaca", {"instruction": "  ", "output": "Blue."}, "instruction"),
    ("chat", {"text": "hello"}, "messages"),
    ("chat", {"messages": [{"role": "user", "content": "hi"}]}, "assistant"),
    ("chat", {"messages": [{"from": "human", "value": "hi"}]}, "role, content"),
    ("text", {"body": "hello"}, "text"),
], ids=["alpaca-no-output", "alpaca-blank-instruction", "chat-no-messages", "chat-ends-with-user", "chat-sharegpt", "text-no-field"])
def test_bad_record_error_names_the_field_and_the_index(tokenizer, fmt, record, field):
    with pytest.raises(DataError) as err:
        tokenize_example(record, fmt, tokenizer, max_seq_len=512, index=17)
    assert "record 17" in str(err.value)
    assert field in str(err.value)


def test_missing_output_message_is_exact(tokenizer):
    with pytest.raises(DataError) as err:
        render_example({"instruction": "Name a colour."}, "alpaca", tokenizer, index=17)
    assert str(err.value) == "record 17 has no 'output' field (format alpaca needs instruction, output; input optional)"


def test_truncation_keeps_the_first_max_seq_len_tokens(tokenizer):
    record = {"instruction": "Name a colour.", "output": "the quick brown fox jumps over the lazy dog"}
    full = tokenize_example(record, "alpaca", tokenizer, max_seq_len=512)
    n_prompt = len(ids_of(tokenizer, ALPACA_NO_INPUT))

    cut = tokenize_example(record, "alpaca", tokenizer, max_seq_len=n_prompt + 3)
    assert len(cut["input_ids"]) == len(cut["labels"]) == n_prompt + 3
    assert cut["input_ids"] == full["input_ids"][: n_prompt + 3]
    assert sum(label != IGNORE_INDEX for label in cut["labels"]) == 3

    # Cutting inside the prompt leaves nothing to learn; the example is still returned.
    prompt_only = tokenize_example(record, "alpaca", tokenizer, max_seq_len=n_prompt - 2)
    assert len(prompt_only["labels"]) == n_prompt - 2
    assert set(prompt_only["labels"]) == {IGNORE_INDEX}


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
    assert data._encode_texts(tokenizer, texts) == expected
    # A backend left truncating, or set to split special tokens: the tokenizer's own call runs.
    truncating = copy.deepcopy(tokenizer)
    truncating.backend_tokenizer.enable_truncation(3)
    assert data._encode_texts(truncating, texts) == expected
    splitting = copy.deepcopy(tokenizer)
    splitting.split_special_tokens = True
    split_ids = data._encode_texts(splitting, texts)
    assert split_ids == [splitting(text, add_special_tokens=False)["input_ids"] for text in texts]
    assert split_ids[1] != expected[1] and EOS in expected[1]


def test_a_second_run_reads_the_cache_without_loading_or_tokenizing(tmp_path, tokenizer, monkeypatch, data_cache):
    path = write_jsonl(tmp_path / "train.jsonl", FIT_RECORDS * 4)
    cfg = DataConfig(path=str(path), eval_fraction=0.25)

    first = prepare_datasets(cfg, tokenizer, FIT_MAX_SEQ_LEN, seed=0)

    def fail(*args, **kwargs):
        raise AssertionError("a cached run must not load or tokenize the records")

    monkeypatch.setattr(data, "load_records", fail)
    monkeypatch.setattr(data, "_tokenize_batch", fail)
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
        assert str(err.value) == "record 17 has no 'output' field (format alpaca needs instruction, output; input optional)"
    assert list(data_cache.iterdir()) == []


def test_a_cache_folder_appears_whole_or_not_at_all(tmp_path, tokenizer, monkeypatch, data_cache):
    path = write_jsonl(tmp_path / "train.jsonl", alpaca_records(12))
    eval_path = write_jsonl(tmp_path / "eval.jsonl", alpaca_records(3))
    cfg = DataConfig(path=str(path), eval_path=str(eval_path))

    # A writer that stops half way (here after the training split) leaves nothing behind.
    real_tokenize = data._tokenize_to_arrow
    def stop_at_eval(records, tmp, name, *args):
        if name == "eval":
            raise KeyboardInterrupt
        return real_tokenize(records, tmp, name, *args)
    monkeypatch.setattr(data, "_tokenize_to_arrow", stop_at_eval)
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

