"""Training data: records from files or the hub, prompt formats, loss masking, packing, batches.

One record becomes one example ``{"input_ids": [...], "labels": [...]}``:

    [bos] + prompt tokens + response tokens + eos        (input_ids)
    [-100] + -100 ...      + response tokens + eos        (labels)

The loss is on the response and on the EOS that ends it (so the model learns to stop);
``IGNORE_INDEX`` (-100, what ``torch.nn.functional.cross_entropy`` skips) hides the rest. A chat
turn ends instead with the token its template writes there (``find_end_of_turn_token``):
``<|eot_id|>`` for Llama 3, ``<|im_end|>`` for ChatML, EOS for ``DEFAULT_CHAT_TEMPLATE``.
Prompt and response are tokenized separately and their ids concatenated, so the boundary
between masked and learned tokens is exact rather than guessed from character offsets.

Formats (``DataConfig.format``):

- ``alpaca``: fields ``instruction``, ``output`` and optional ``input``, in the Stanford
  Alpaca prompt template.
- ``chat``: field ``messages``, a list of ``{role, content}`` ending with an assistant turn,
  rendered with the tokenizer's chat template or ``DEFAULT_CHAT_TEMPLATE``. Every assistant
  turn is learned, with the end-of-turn token the template writes after it; system and user
  turns and the template's markup are masked. The token sequence spells the template's own
  rendering, less the whitespace after the last turn (and plus BOS when the tokenizer adds one
  and the template does not write it).
- ``text``: one text field, every token learned (plain language modelling).

Truncation (``DataConfig.truncation``): an example whose response and closing EOS do not fit in
``max_seq_len`` is dropped (``drop``, the default) or kept cut, without its EOS (``keep``); one with
no response token left is always dropped. ``prepare_datasets`` prints one line per split saying how
many did not fit and how many response tokens were cut, and returns them in its stats.

Preparation (``prepare_datasets``): the records are tokenized once, by ``datasets.map`` over
``data.num_proc`` processes, into Arrow files in a cache folder named by a hash of everything that
changes the examples (the data's bytes, the tokenizer and chat template, this module's source, the
format, ``max_seq_len``, truncation, packing, the held-out split); a later run and a resumed run open
those files memory-mapped (``TokenizedExamples``) and read an example only when a batch needs it, so
memory stays flat as the data grows. On 200,000 alpaca records (100 MB): benchmarks/data_prep.py.

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

import bisect
import dataclasses
import functools
import hashlib
import itertools
import json
import math
import operator
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import tokenizers
import torch

from qlora_lite.config import CHOICES, DataConfig
from qlora_lite.folders import cache_root

IGNORE_INDEX = -100
"""Label of tokens that carry no loss; the default ``ignore_index`` of torch's cross entropy."""

# The Stanford Alpaca templates, verbatim: models tuned on Alpaca expect exactly this text.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)

DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
"""Chat template for tokenizers that ship none (Zephyr's layout), as Jinja like any HF template.

Each turn is ``<|role|>\\n{content}{eos}\\n``; the generation prompt is ``<|assistant|>\\n``.
So ``[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]`` renders as
``<|user|>\\nHi</s>\\n<|assistant|>\\nHello</s>\\n``. Set it as ``tokenizer.chat_template`` when
saving an adapter so that generation uses the same layout as training.
"""

# What each format needs, quoted in the error for a bad record.
FORMAT_NEEDS = {
    "alpaca": "format alpaca needs instruction, output; input optional",
    "chat": "format chat needs messages: a list of {role, content} ending with an assistant turn",
    "text": "format text needs {text_field}; set data.text_field to the column holding the text",
}

# Extension -> datasets' packaged builder. .jsonl is read by the json builder.
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """A data file, record or split the user supplied is unusable; the message says which and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Loading records
# ---------------------------------------------------------------------------------------------


def load_records(path: str, split: str = "train", cache_dir: str | None = None) -> datasets.Dataset:
    """Load raw records from a local file or folder, or from the Hugging Face hub.

    Args:
        path: A ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a folder of such files (split
            names come from the file names, e.g. ``train.jsonl`` and ``test.jsonl``), or a hub
            dataset id such as ``tatsu-lab/alpaca``.
        split: Split to read from a folder or a hub dataset. A single file has one split and
            ignores this.
        cache_dir: Where datasets writes the Arrow copy of local files (default: its own cache).
            datasets reuses a copy while the file keeps its path, size and modification time,
            even when its content changed; ``prepare_datasets`` passes a fresh folder.

    Returns:
        The records as a ``datasets.Dataset``.

    Raises:
        DataError: The local file does not exist, cannot be parsed or holds no records; the
            split does not exist; or the hub cannot be reached for a hub id.
    """
    if _looks_local(path):
        records = _load_local_records(Path(path).expanduser(), split, cache_dir)
    else:
        records = _load_hub_records(path, split)
    if len(records) == 0:
        raise DataError(f"{path} (split {split!r}) holds no records; check the file is not empty")
    return records


def _looks_local(path: str) -> bool:
    # A hub id is "name" or "owner/name"; anything with a data-file suffix or a filesystem
    # prefix is meant as a local path, so a typo there says "file not found", not "hub unreachable".
    return Path(path).expanduser().exists() or Path(path).suffix in LOCAL_BUILDERS or path.startswith(("/", ".", "~"))


def _load_local_records(path: Path, split: str, cache_dir: str | None = None) -> datasets.Dataset:
    if not path.exists():
        raise DataError(f"data file {path} does not exist; check data.path (absolute, or relative to where you run qlora-lite)")
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in LOCAL_BUILDERS)
    elif path.suffix not in LOCAL_BUILDERS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_BUILDERS)}")
    else:
        files = [path]
    # datasets 5.2 reads an empty file as StopIteration (json) or a pandas EmptyDataError (csv),
    # so a file with nothing in it is caught before datasets sees it.
    for file in files:
        if _is_blank(file):
            reason = "the file is empty" if file.stat().st_size == 0 else "the file has only blank lines"
            raise DataError(_no_records_message(file, reason))
    try:
        if path.is_dir():
            records = datasets.load_dataset(str(path), split=split, cache_dir=cache_dir)
        else:
            # A single file is one split, which datasets names "train" whatever the file is for.
            records = datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir)
    except (datasets.exceptions.DatasetsError, OSError, ValueError, StopIteration) as err:
        if path.is_dir() and isinstance(err, ValueError) and "split" in str(err).lower():
            raise DataError(f"{path} has no split {split!r} ({err}); set data.split to one of the listed splits") from err
        raise _explain_unreadable(path, files, err) from err
    if len(records) == 0 and not path.is_dir():
        raise DataError(_no_records_message(path, "it has no rows"))
    return records


# What a record looks like in each local file type, quoted when a file holds none.
RECORD_LAYOUTS = {
    ".jsonl": "one JSON object per line",
    ".json": "a JSON list of objects (or one object per line)",
    ".csv": "rows under a header row (one per record)",
    ".parquet": "one row per record",
}


def _no_records_message(path: Path, reason: str) -> str:
    return f"{path} holds no records ({reason}); add {RECORD_LAYOUTS[path.suffix]}, or point data.path at your data file"


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _explain_unreadable(path: Path, files: list[Path], err: BaseException) -> DataError:
    """The DataError for a local file or folder that datasets failed to read: which file, which line, why."""
    for file in files:
        problem = _find_json_problem(file) if file.suffix in (".json", ".jsonl") else None
        if problem:
            return DataError(problem)
    # datasets 5.2 says 'Instruction "train" corresponds to no data!' for a file whose records
    # are all missing: "[]", a CSV header alone, a parquet schema without rows.
    if isinstance(err, StopIteration) or "corresponds to no data" in str(err):
        for file in files:
            reason = _find_missing_records(file)
            if reason:
                return DataError(_no_records_message(file, reason))
        return DataError(f"{path} holds no records; check that its files are not empty")
    kind = path.suffix.lstrip(".") if path.is_file() else "data"
    return DataError(f"could not read {path}: {_root_cause(err)}; check the file is valid {kind}")


def _find_json_problem(path: Path) -> str | None:
    """The first syntax problem of a JSON or JSON Lines file, naming its line, or None."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON document: a list of records
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path} is not valid JSON: {_json_reason(err)} at line {err.lineno} column {err.colno}; fix the file there"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path} line {number} is not valid JSON: {_json_reason(err)} at column {err.colno}; fix or remove that line"
        if not isinstance(value, dict):
            kind = {list: "list", str: "string"}.get(type(value), "number or constant")
            return f"{path} line {number} is a JSON {kind}, not an object; write one record per line as a JSON object"
    return None


def _json_reason(err: json.JSONDecodeError) -> str:
    # The json module ends some messages with "at" ("Unterminated string starting at") and adds the position itself.
    return err.msg.removesuffix(" at")


def _find_missing_records(path: Path) -> str | None:
    """Why a non-blank file holds no records, or None when it seems to hold some."""
    if path.suffix == ".csv":
        rows = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return "it has a header row but no data rows" if len(rows) <= 1 else None
    if path.suffix == ".json":
        try:
            value = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if value == []:
            return "its JSON list is empty"
        return "its JSON is an object, not a list of records" if isinstance(value, dict) else None
    if path.suffix == ".parquet":
        return "it has no rows"
    return None


def _root_cause(err: BaseException) -> str:
    # datasets wraps the parser's error ("An error occurred while generating the dataset"); the
    # innermost one says what is wrong. One line, since the CLI prints it after "error: ".
    while err.__cause__ is not None:
        err = err.__cause__
    return " ".join(str(err).split()) or type(err).__name__


def _load_hub_records(dataset_id: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(dataset_id, split=split)
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataError(
            f"{dataset_id!r} is neither a local file nor a dataset on the Hugging Face hub; "
            "pass a local .jsonl/.json/.csv/.parquet file or a valid hub id"
        ) from err
    except ConnectionError as err:
        raise DataError(
            f"the Hugging Face hub is unreachable, so dataset {dataset_id!r} cannot be downloaded ({err}); "
            "check the network, or pass a local .jsonl/.json/.csv/.parquet file as data.path"
        ) from err
    except OSError as err:  # a download that started and then failed
        raise DataError(
            f"dataset {dataset_id!r} could not be downloaded from the Hugging Face hub ({err}); "
            "check the network, or pass a local .jsonl/.json/.csv/.parquet file as data.path"
        ) from err
    except ValueError as err:
        if "split" in str(err).lower():
            raise DataError(f"dataset {dataset_id!r} has no split {split!r} ({err}); set data.split") from err
        raise


# ---------------------------------------------------------------------------------------------
# Rendering a record as text
# ---------------------------------------------------------------------------------------------


def render_example(record: dict, fmt: str, tokenizer: Any, index: int = 0, text_field: str = "text") -> tuple[str, str]:
    """Render one record as (prompt_text, response_text); the loss falls on the response only.

    Args:
        record: One raw record (a mapping of field name to value).
        fmt: ``alpaca``, ``chat`` or ``text``.
        tokenizer: The model's tokenizer; only ``chat`` uses it (its chat template and EOS).
        index: Position of the record in its file, quoted in errors.
        text_field: Field holding the text for format ``text``.

    Returns:
        ``(prompt, response)``. For ``chat`` the response is the final assistant turn as the
        template renders it, less the end-of-turn token that closes it (``tokenize_example``
        appends it as an id) and less trailing whitespace; the prompt is the template's rendering
        of the conversation before it with the generation prompt (``add_generation_prompt=True``).
        For ``text`` the prompt is empty. The prompt holds BOS only where a chat
        template writes ``bos_token``; the BOS ``tokenize_example`` prepends is not in it.

    Raises:
        DataError: A required field is missing or empty; the message names the field and index.
    """
    segments = _render_segments(record, fmt, tokenizer, index, text_field)
    # Earlier learned pieces (multi-turn chat) are followed by their end token in the token
    # sequence, so the prompt text shows it there too.
    prompt = "".join(text + (end or "") for text, end in segments[:-1])
    return prompt, segments[-1][0]


def _render_segments(
    record: dict, fmt: str, tokenizer: Any, index: int, text_field: str, end_of_turn: str | None = None
) -> list[tuple[str, str | None]]:
    """Split a record into consecutive ``(text, end)`` pieces.

    ``end`` is None for a masked piece; for a learned piece it is the special token that closes
    it (EOS, or a chat template's end-of-turn token), appended as an id by ``tokenize_example``.
    ``end_of_turn``: the chat end-of-turn token (``find_end_of_turn_token`` or EOS), when the caller
    has already found it once for many records; None finds it.
    """
    eos_token = getattr(tokenizer, "eos_token", None) or ""
    if fmt == "alpaca":
        return _render_alpaca(record, index, eos_token)
    if fmt == "chat":
        return _render_chat(record, tokenizer, index, end_of_turn)
    if fmt == "text":
        return [("", None), (_require_text(record, text_field, fmt, index, text_field), eos_token)]
    raise DataError(f"unknown data format {fmt!r}; use one of {', '.join(FORMAT_NEEDS)}")


def _render_alpaca(record: dict, index: int, eos_token: str) -> list[tuple[str, str | None]]:
    instruction = _require_text(record, "instruction", "alpaca", index)
    output = _require_text(record, "output", "alpaca", index)
    context = _optional_text(record.get("input"))
    if context:
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return [(prompt, None), (output, eos_token)]


def _render_chat(record: dict, tokenizer: Any, index: int, end_of_turn: str | None = None) -> list[tuple[str, str | None]]:
    """Cut a rendered conversation into masked markup/user text and learned assistant turns.

    Multi-turn masking works by rendering growing prefixes of the conversation: for each
    assistant turn j, the text of ``messages[:j]`` with the generation prompt is everything
    before the turn, and the text of ``messages[:j + 1]`` minus that is the turn itself. The
    difference between consecutive cut points is masked, the turn is learned.

    The special token the template writes right after a turn (``find_end_of_turn_token``:
    ``<|eot_id|>``, ``<|im_end|>``, or EOS) is cut off the learned text and re-added as an id by
    the tokenizer step, learned: it is how the model ends a turn, and what generation stops on.
    No EOS is added after it, so on a base tokenizer whose EOS is another token (Llama-3.1 base:
    ``<|end_of_text|>``; Qwen2.5 base: ``<|endoftext|>``) the sequence is still the template's
    own rendering, as a chat server will send it. A turn the template closes with no special
    token gets one appended (the end-of-turn token, else EOS), or the model would never learn to stop. Template text
    after the final turn's end token (usually a newline) is dropped: nothing follows it in training.
    """
    messages = _require_messages(record, index)
    eos_token = tokenizer.eos_token or ""
    # Rendering the probe conversation costs as much as a record: callers over many records pass it in.
    end_of_turn = end_of_turn or find_end_of_turn_token(tokenizer) or eos_token
    segments: list[tuple[str, str | None]] = []
    consumed = ""  # rendered text already assigned to a segment
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _apply_chat_template(tokenizer, messages[:turn], True, index)
        through = _apply_chat_template(tokenizer, messages[: turn + 1], False, index)
        if not (before.startswith(consumed) and through.startswith(before)):
            raise DataError(
                f"record {index}: the chat template renders message {turn} differently once later turns follow, "
                "so the prompt/response boundary is not exact; use a template whose rendering of the first turns "
                "is a prefix of the whole conversation"
            )
        turn_text = through[len(before) :]
        stripped = turn_text.rstrip()
        end = next((token for token in (end_of_turn, eos_token) if token and stripped.endswith(token)), None)
        if end:
            # Whatever follows the template's end token (usually "\n") belongs to the next masked piece.
            learned = stripped[: -len(end)]
            covered = before + learned + end
        else:
            # Trailing whitespace after the turn is template layout: it goes to the next masked piece.
            # The turn still needs an end the model learns to stop on.
            learned, end = stripped, end_of_turn
            covered = before + learned
        if not learned.strip():
            raise DataError(f"record {index} message {turn} has an empty 'content' field ({FORMAT_NEEDS['chat']})")
        segments += [(before[len(consumed) :], None), (learned, end)]
        consumed = covered
    return segments


def find_end_of_turn_token(tokenizer: Any) -> str | None:
    """The special token the chat template writes right after an assistant reply, or None.

    Llama-3 templates write ``<|eot_id|>``, ChatML (Qwen) ``<|im_end|>``, our default template the
    tokenizer's EOS. On a *base* tokenizer this differs from its EOS (``<|end_of_text|>``,
    ``<|endoftext|>``), so a chat model must be trained to end turns with it, and generation,
    a merged model's generation_config.json and servers must stop on it. None when the tokenizer
    has no chat template or the template writes no special token after the reply.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    probe = "qlora-lite end of turn probe"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hello"}, {"role": "assistant", "content": probe}], tokenize=False
        )
    except Exception:  # a template that refuses this conversation has no end of turn to learn from
        return None
    # Some templates put a space before it (Llama 2: "{content} </s>").
    after = text[text.rfind(probe) + len(probe) :].lstrip() if probe in text else ""
    special = set(getattr(tokenizer, "all_special_tokens", []))
    special |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if getattr(t, "special", False)}
    matches = [token for token in special if token and after.startswith(token)]
    return max(matches, key=len) if matches else None


def _apply_chat_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool, index: int) -> str:
    # The tokenizer's own template wins; DEFAULT_CHAT_TEMPLATE only fills the gap.
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as err:  # jinja raises TemplateError or whatever the template's raise_exception says
        raise DataError(f"record {index}: the chat template could not render the conversation: {err}") from err


def _require_messages(record: dict, index: int) -> list[dict]:
    messages = record.get("messages")
    if messages is None:
        raise DataError(f"record {index} has no 'messages' field ({FORMAT_NEEDS['chat']})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"record {index} has an empty or non-list 'messages' field ({FORMAT_NEEDS['chat']})")
    for turn, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(
                f"record {index} message {turn} is not a {{role, content}} mapping ({FORMAT_NEEDS['chat']}; "
                "convert ShareGPT-style from/value pairs first)"
            )
        if not isinstance(message["content"], str):
            raise DataError(f"record {index} message {turn} has no text in its 'content' field ({FORMAT_NEEDS['chat']})")
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"record {index}: the last message has role {messages[-1]['role']!r}, not 'assistant' "
            f"({FORMAT_NEEDS['chat']}); drop trailing user turns"
        )
    return messages


def _require_text(record: dict, field: str, fmt: str, index: int, text_field: str = "text") -> str:
    needs = FORMAT_NEEDS[fmt].replace("{text_field}", text_field)
    if record.get(field) is None:
        raise DataError(f"record {index} has no {field!r} field ({needs})")
    text = _optional_text(record[field])
    if not text.strip():
        raise DataError(f"record {index} has an empty {field!r} field ({needs})")
    return text


def _optional_text(value: Any) -> str:
    # CSV and parquet give None (or NaN for numeric columns) for an empty cell, and numbers for numeric ones.
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return value if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------------------------
# Tokenizing and masking
# ---------------------------------------------------------------------------------------------


def tokenize_example(
    record: dict, fmt: str, tokenizer: Any, max_seq_len: int, index: int = 0, text_field: str = "text"
) -> dict[str, list[int]]:
    """Tokenize one record into input ids and labels that carry loss on the response only.

    The sequence is ``[bos] + prompt + response + eos``: BOS only when the tokenizer adds one
    by itself (Llama 2/3 do, Qwen2 does not) and the rendered text does not already start with
    it (chat templates often write it); EOS always, learned, so the model learns to stop. For
    chat, each assistant turn is learned as content + the end-of-turn token its template writes
    (``<|eot_id|>``, ``<|im_end|>``; EOS for ``DEFAULT_CHAT_TEMPLATE``), with no EOS after it
    (see ``_render_chat``).

    Args:
        record: One raw record.
        fmt: ``alpaca``, ``chat`` or ``text``.
        tokenizer: The model's tokenizer (must define an EOS token).
        max_seq_len: Longer sequences keep their first ``max_seq_len`` tokens, losing the EOS
            at least. When that cuts every learned token, the example is still returned with all
            labels ``IGNORE_INDEX``. ``build_datasets`` drops or keeps cut examples as
            ``data.truncation`` says, and reports them.
        index: Position of the record in its file, quoted in errors.
        text_field: Field holding the text for format ``text``.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length; labels are ``IGNORE_INDEX``
        on BOS, prompts, user turns and template markup, and the token id elsewhere.

    Raises:
        DataError: A required field is missing or empty, or the tokenizer has no EOS token.
    """
    example = _tokenize_records([record], [index], fmt, tokenizer, text_field)[0]
    return {"input_ids": example["input_ids"][:max_seq_len], "labels": example["labels"][:max_seq_len]}


def _tokenize_records(
    records: list[dict], indices: list[int], fmt: str, tokenizer: Any, text_field: str
) -> list[dict[str, list[int]]]:
    """``tokenize_example`` before the cut to ``max_seq_len``, for many records at once.

    The texts of all records go to the tokenizer in one call: a fast tokenizer encodes a batch in
    Rust, where one call per text spends most of its time in Python (3 calls per alpaca record
    before, 128 s for 200,000 records). Each piece is still encoded on its own, so the ids equal
    those of one call per piece.
    """
    eos_id = _require_eos_id(tokenizer)
    end_of_turn = (find_end_of_turn_token(tokenizer) or tokenizer.eos_token) if fmt == "chat" else None
    rendered = [
        _render_segments(record, fmt, tokenizer, index, text_field, end_of_turn) for record, index in zip(records, indices)
    ]
    texts = [text for segments in rendered for text, _ in segments if text]
    encoded = iter(_encode_texts(tokenizer, texts) if texts else [])
    end_ids = {tokenizer.eos_token: eos_id}
    bos_id = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    examples = []
    for segments in rendered:
        input_ids: list[int] = []
        labels: list[int] = []
        # Each piece was tokenized on its own, so the masked/learned boundary falls between ids.
        for text, end in segments:
            if text:
                ids = next(encoded)
                input_ids += ids
                labels += [IGNORE_INDEX] * len(ids) if end is None else ids
            if end is not None:
                if end not in end_ids:
                    end_ids[end] = tokenizer.convert_tokens_to_ids(end)
                input_ids.append(end_ids[end])
                labels.append(end_ids[end])
        if bos_id is not None and input_ids[:1] != [bos_id]:
            input_ids.insert(0, bos_id)
            labels.insert(0, IGNORE_INDEX)
        examples.append({"input_ids": input_ids, "labels": labels})
    return examples


def _encode_texts(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """``tokenizer(texts, add_special_tokens=False)["input_ids"]``, faster where that is safe.

    transformers 5.24's fast-tokenizer call converts every ``Encoding`` in Python (offsets, masks),
    which costs as much as a third of the Rust encoding itself. When the backend is a plain
    ``tokenizers.Tokenizer`` set as that call would set it (no truncation, no padding, special
    tokens split or not as ``split_special_tokens`` says), its ``encode_batch_fast`` gives the same
    ids without offsets; otherwise the tokenizer's own call runs.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        isinstance(backend, tokenizers.Tokenizer)
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == bool(getattr(tokenizer, "split_special_tokens", False))
    ):
        return [encoding.ids for encoding in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _adds_bos(tokenizer: Any) -> bool:
    # Ask the tokenizer rather than trust add_bos_token: that attribute is absent or stale on
    # many fast tokenizers, while the post-processor is what actually runs.
    if tokenizer.bos_token_id is None:
        return False
    return tokenizer("a", add_special_tokens=True)["input_ids"][:1] == [tokenizer.bos_token_id]


# ---------------------------------------------------------------------------------------------
# Datasets: split, drop, pack
# ---------------------------------------------------------------------------------------------


@dataclass
class TruncationStats:
    """How ``max_seq_len`` cut one split's examples (``build_datasets_with_stats``)."""

    split: str
    """``train`` or ``eval``."""
    examples: int
    """Examples tokenized, before any was dropped."""
    truncated: int
    """Examples whose response, with the EOS (or end-of-turn token) closing it, did not fit."""
    fully_cut: int
    """Of those, the examples with no response token left; always dropped."""
    response_tokens_cut: int
    """Learned tokens (response and end tokens) past ``max_seq_len``, summed over the truncated examples."""
    dropped: int
    """Examples removed: every truncated one (``drop``), or the fully cut ones (``keep``)."""
    longest_tokens: int
    """Length of the longest example before the cut (0 for an empty split)."""
    max_seq_len: int
    policy: str
    """``data.truncation``: ``drop`` or ``keep``."""


def format_truncation_stats(stats: TruncationStats) -> str:
    """One report line, e.g. ``train: 3 of 40 examples did not fit in max_seq_len=128 (...); dropped them (...)``."""
    if not stats.truncated:
        return (
            f"{stats.split}: all {stats.examples} examples fit in max_seq_len={stats.max_seq_len} "
            f"(longest example {stats.longest_tokens} tokens)"
        )
    line = (
        f"{stats.split}: {stats.truncated} of {stats.examples} examples did not fit in max_seq_len={stats.max_seq_len} "
        f"({stats.response_tokens_cut} response tokens cut, longest example {stats.longest_tokens} tokens); "
    )
    kept = stats.truncated - stats.dropped
    if stats.policy == "drop":
        action = "dropped them"
    elif not stats.fully_cut:
        action = f"kept {kept} with a cut response and no EOS"
    elif not kept:
        action = f"dropped {stats.dropped} with no response token left"
    else:
        action = f"kept {kept} with a cut response and no EOS, dropped {stats.fully_cut} with no response token left"
    return line + f"{action} (data.truncation={stats.policy})"


def build_datasets(cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int) -> tuple[TokenizedExamples, TokenizedExamples]:
    """``prepare_datasets`` as ``(train, eval)``; it prints the same report lines."""
    prepared = prepare_datasets(cfg, tokenizer, max_seq_len, seed)
    return prepared.train, prepared.eval


def build_datasets_with_stats(
    cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int
) -> tuple[TokenizedExamples, TokenizedExamples, dict[str, TruncationStats]]:
    """``prepare_datasets`` as ``(train, eval, {"train": TruncationStats, "eval": TruncationStats})``."""
    prepared = prepare_datasets(cfg, tokenizer, max_seq_len, seed)
    return prepared.train, prepared.eval, prepared.truncation


# ---------------------------------------------------------------------------------------------
# Prepared data: tokenized once, in parallel, into a memory-mapped Arrow cache
# ---------------------------------------------------------------------------------------------

DATA_CACHE_ENV = "QLORA_LITE_DATA_CACHE"
"""Environment variable naming the data cache folder when ``data.cache_dir`` is not set."""

MAX_AUTO_NUM_PROC = 8
RECORDS_PER_PROCESS = 5_000
"""With ``data.num_proc`` unset, one tokenizing process per this many records (and per core, at most
``MAX_AUTO_NUM_PROC``): starting workers costs about half a second (4,000 alpaca records: 0.8 s in
this process, 1.4 s over 2), what this process takes for a few thousand records."""

_MANIFEST = "manifest.json"

# One row per record of a data file, in file order. A dropped record keeps its row (its statistics
# columns say why it was dropped) with empty token lists. int32 halves the size of the cache.
_PREPARED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),  # tokens kept: len(input_ids)
        "whole_length": datasets.Value("int32"),  # tokens before the cut to max_seq_len
        "cut_tokens": datasets.Value("int32"),  # learned tokens past max_seq_len
        "learnable": datasets.Value("bool"),  # a learned token is left within max_seq_len
        "kept": datasets.Value("bool"),  # an example of its split (data.truncation decided)
    }
)


class TokenizedExamples(Sequence):
    """Examples read on demand from a memory-mapped Arrow table: RAM does not grow with the data.

    ``examples[i]`` is a fresh ``{"input_ids": [...], "labels": [...]}`` of Python ints (packed:
    ``position_ids`` too, the pack built as ``pack_examples`` builds it); a slice is a list of them.
    ``lengths`` holds every example's token count, so ``select_micro_batch`` plans an epoch without
    reading a single example.
    """

    def __init__(self, table: pa.Table | None, rows: np.ndarray, pack_bounds: np.ndarray | None = None):
        """
        Args:
            table: The tokenized records (``_PREPARED_FEATURES``); None when ``rows`` is empty.
            rows: The table row of each example, in order.
            pack_bounds: Packed only: pack ``j`` holds the examples ``rows[pack_bounds[j]:pack_bounds[j + 1]]``.
        """
        self._rows = rows
        self._pack_bounds = pack_bounds
        # Per column: each chunk's first row, offsets and values as numpy views of the mapped file.
        # Reading an example through them takes 8 us (440 tokens), through pyarrow scalars 22 us.
        self._columns: dict[str, tuple[list[int], list[np.ndarray], list[np.ndarray]]] = {}
        row_lengths = np.zeros(0, dtype=np.int64)
        if table is not None and len(rows):
            for name in ("input_ids", "labels"):
                chunks = table.column(name).chunks
                starts = np.cumsum([0] + [len(chunk) for chunk in chunks[:-1]]).tolist()
                self._columns[name] = (starts, [c.offsets.to_numpy() for c in chunks], [c.values.to_numpy() for c in chunks])
            row_lengths = table.column("length").to_numpy().astype(np.int64)[rows]
        self.lengths: np.ndarray = row_lengths if pack_bounds is None else np.add.reduceat(row_lengths, pack_bounds[:-1])
        """Tokens in each example (each pack when packed), as ``len(examples[i]["input_ids"])``."""

    @property
    def packed(self) -> bool:
        return self._pack_bounds is not None

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        if self._pack_bounds is None:
            return self._read_row(int(self._rows[index]))
        start, end = self._pack_bounds[index], self._pack_bounds[index + 1]
        return _merge_pack([self._read_row(int(row)) for row in self._rows[start:end]])

    def __repr__(self) -> str:
        return f"TokenizedExamples({len(self)} {'packs' if self.packed else 'examples'})"

    def _read_row(self, row: int) -> dict[str, list[int]]:
        example = {}
        for name, (starts, offsets, values) in self._columns.items():
            chunk = bisect.bisect_right(starts, row) - 1
            local = row - starts[chunk]
            example[name] = values[chunk][offsets[chunk][local] : offsets[chunk][local + 1]].tolist()
        return example


@dataclass
class PreparedData:
    """What ``prepare_datasets`` returns: the examples of each split and how they were prepared."""

    train: TokenizedExamples
    eval: TokenizedExamples
    stats: dict[str, Any]
    """JSON-able: see ``prepare_datasets``."""

    @property
    def truncation(self) -> dict[str, TruncationStats]:
        """``{"train": TruncationStats, "eval": TruncationStats}`` (``build_datasets_with_stats``)."""
        return _truncation_stats(self.stats)


def _truncation_stats(stats: dict[str, Any]) -> dict[str, TruncationStats]:
    names = [field.name for field in dataclasses.fields(TruncationStats)]
    return {split: TruncationStats(**{name: stats[split][name] for name in names}) for split in ("train", "eval")}


def prepare_datasets(cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int) -> PreparedData:
    """Load, split, tokenize and (optionally) pack the examples once, and cache them on disk.

    The first run tokenizes the records with ``datasets.map`` over ``data.num_proc`` processes
    into Arrow files under ``data.cache_dir`` (``resolve_data_cache_dir``); a later run with the
    same key, and a resumed run, only opens them (memory-mapped, so the examples stay on disk until
    read). The key is everything that changes the examples: the content of the data files (a hash
    of their bytes; a hub dataset's fingerprint), the tokenizer (its vocabulary, merges, pre- and
    post-processing, special tokens and chat template), this module's source (the prompt templates
    and the masking rules), ``data.format``, ``text_field`` (format text), ``split`` (of a folder or a
    hub dataset), ``max_examples``,
    ``eval_path``, ``eval_fraction`` with ``seed`` when it holds records out, ``max_seq_len``,
    ``truncation`` and ``packing``; not ``num_proc``, which changes no example. A cache folder
    appears whole or not at all (written under a temporary name, then renamed), so processes that
    prepare the same data at once, as the ranks of a distributed run may, never read half of one.

    An example whose response does not fit in ``max_seq_len`` with the EOS that ends it is
    dropped (``cfg.truncation="drop"``, the default: a cut response would teach the model that
    some answers never stop) or kept with its first ``max_seq_len`` tokens (``"keep"``). An
    example with no response token left is dropped either way. Printed, on every run: one line per
    non-empty split (``format_truncation_stats``), then one line saying how the data was prepared
    (``format_preparation_stats``).

    Args:
        cfg: The recipe's data section.
        tokenizer: The model's tokenizer.
        max_seq_len: Longest sequence in tokens; packs fill up to it.
        seed: Seeds the shuffle that picks the held-out records for ``cfg.eval_fraction``.

    Returns:
        ``PreparedData``: ``train`` and ``eval``, sequences of examples (``TokenizedExamples``) with
        ``input_ids`` and ``labels``, in file order (packed training examples also carry
        ``position_ids``; evaluation examples are never packed). The eval split comes from
        ``cfg.eval_path`` (read with ``cfg.split``; a single file ignores it), else from
        ``round(n * cfg.eval_fraction)`` (at least 1) held-out training records, else it is empty.
        ``stats``, JSON-able: ``records`` (read, both splits), ``kept``, ``dropped``, ``truncated``
        and ``tokens`` (of the kept examples), each summed over both splits; ``train`` and ``eval``:
        the split's ``TruncationStats`` fields plus ``kept``, ``tokens`` and ``sequences`` (packs
        when packed); ``max_seq_len``, ``truncation``, ``packing``; ``num_proc`` and
        ``tokenize_seconds`` of the run that tokenized; ``seconds`` this call took, ``cache``
        (``"hit"`` or ``"miss"``) and ``cache_path``.

    Raises:
        DataError: Files cannot be read, a record lacks a required field (message gives the
            field and record index), no training example is left, or the cache folder is damaged.
    """
    started = time.perf_counter()
    if cfg.truncation not in CHOICES["data.truncation"]:
        raise DataError(f"data.truncation={cfg.truncation!r} is not one of {', '.join(CHOICES['data.truncation'])}")
    _require_eos_id(tokenizer)
    train_source = _fingerprint_source(cfg.path, cfg.split)
    eval_source = _fingerprint_source(cfg.eval_path, cfg.split) if cfg.eval_path else None
    key = _describe_cache_key(cfg, tokenizer, max_seq_len, seed, train_source[0], eval_source and eval_source[0])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = resolve_data_cache_dir(cfg) / f"{_folder_stem(cfg.path)}-{digest}"
    cache = "hit"
    if not (folder / _MANIFEST).is_file():
        cache = "miss"
        _write_prepared(folder, key, cfg, tokenizer, max_seq_len, seed, train_source[1], eval_source and eval_source[1])
    prepared = _open_prepared(folder)
    prepared.stats.update(seconds=round(time.perf_counter() - started, 3), cache=cache, cache_path=str(folder))
    _print_truncation_lines(prepared.stats)
    print(format_preparation_stats(prepared.stats))
    return prepared


def resolve_data_cache_dir(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$QLORA_LITE_DATA_CACHE``, else ``data`` in qlora-lite's cache (``$QLORA_LITE_CACHE``, default ``~/.cache/qlora-lite``)."""
    return Path(cfg.cache_dir or os.environ.get(DATA_CACHE_ENV) or cache_root() / "data").expanduser()


def format_preparation_stats(stats: dict[str, Any]) -> str:
    """One report line, e.g. ``data: 200000 records -> 199973 examples (27 dropped), ...; read from the cache ...``."""
    line = (
        f"data: {stats['records']} records -> {stats['kept']} examples ({stats['dropped']} dropped), {stats['tokens']} tokens"
    )
    if stats["packing"]:
        line += f", {stats['train']['sequences']} packed training sequences"
    if stats["cache"] == "hit":
        return line + f"; read from the cache in {stats['seconds']:.2f} s ({stats['cache_path']})"
    processes = "1 process" if stats["num_proc"] == 1 else f"{stats['num_proc']} processes"
    return line + f"; tokenized with {processes} in {stats['seconds']:.1f} s, cached in {stats['cache_path']}"


def _print_truncation_lines(stats: dict[str, Any]) -> None:
    truncation = _truncation_stats(stats)
    for split in ("train", "eval"):
        if truncation[split].examples:
            print(format_truncation_stats(truncation[split]))


def _require_eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before building the data")
    return tokenizer.eos_token_id


def _fingerprint_source(path: str, split: str) -> tuple[str, datasets.Dataset | None]:
    """A fingerprint of a data file, folder or hub dataset, and its records when they had to be loaded for it.

    Local data is hashed byte for byte (an edited record changes it; size and mtime would not
    always), which reads 100 MB in about 0.1 s. A hub dataset is loaded, from datasets' own cache
    after the first download, and its ``_fingerprint`` names it.
    """
    if not _looks_local(path):
        records = load_records(path, split)
        return f"hub:{split}:{records._fingerprint}", records
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in LOCAL_BUILDERS)
    else:
        files = [root] if root.is_file() and root.suffix in LOCAL_BUILDERS else []
    if not files:
        load_records(path, split)  # raises the DataError that says what is wrong with the path
    digest = hashlib.sha256(f"folder, split {split}\0".encode() if root.is_dir() else b"file\0")  # a file has one split
    for file in files:
        digest.update(f"{file.relative_to(root) if root.is_dir() else file.suffix}\0".encode())
        content = hashlib.sha256()  # hashlib.file_digest would do, from Python 3.11
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                content.update(chunk)
        digest.update(content.digest())
    return f"sha256:{digest.hexdigest()}", None


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """A hash of everything in a tokenizer that changes the ids or the masks it gives.

    A fast tokenizer's ``backend_tokenizer.to_str()`` holds its vocabulary, merges, normalizer,
    pre-tokenizer, post-processor (the BOS it adds) and added tokens; to that come the special
    tokens and the chat template, which live on the transformers side. Another tokenizer is saved
    to a temporary folder and its files hashed.
    """
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            for file in sorted(Path(folder).iterdir()):
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
    names = ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id", "pad_token_id", "split_special_tokens")
    extra = {name: getattr(tokenizer, name, None) for name in names}
    extra.update(type=type(tokenizer).__name__, chat_template=getattr(tokenizer, "chat_template", None))
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@functools.cache
def _source_fingerprint() -> str:
    # This module's source: the prompt templates, masking and truncation rules all live here, so a
    # cache never outlives the code that wrote it.
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


def _describe_cache_key(
    cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int, data: str, eval_data: str | None
) -> dict[str, Any]:
    holds_out = not cfg.eval_path and cfg.eval_fraction > 0
    return {
        "data": data,
        "max_examples": cfg.max_examples,
        "eval_data": eval_data,
        "eval_fraction": cfg.eval_fraction if holds_out else None,
        "seed": seed if holds_out else None,
        "format": cfg.format,
        "text_field": cfg.text_field if cfg.format == "text" else None,
        "tokenizer": fingerprint_tokenizer(tokenizer),
        "max_seq_len": max_seq_len,
        "truncation": cfg.truncation,
        "packing": cfg.packing,
        "code": _source_fingerprint(),
    }


def _folder_stem(path: str) -> str:
    # Readable cache folder names: the data file's stem, or the hub id.
    stem = Path(path).stem if _looks_local(path) else path
    return re.sub(r"[^A-Za-z0-9._]+", "-", stem).strip("-.")[:60] or "data"


def _choose_num_proc(requested: int | None, n_records: int) -> int:
    if requested is not None:
        return max(1, min(requested, n_records))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_NUM_PROC, n_records // RECORDS_PER_PROCESS))


def _write_prepared(
    folder: Path,
    key: dict[str, Any],
    cfg: DataConfig,
    tokenizer: Any,
    max_seq_len: int,
    seed: int,
    train_records: datasets.Dataset | None,
    eval_records: datasets.Dataset | None,
) -> None:
    """Tokenize, split, drop and pack into a temporary folder, then rename it to ``folder``."""
    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # A name of its own per writer (not folders.write_atomically's fixed one): ranks may write at once.
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        # Local records are converted afresh into this folder (removed before the rename): the key
        # says their content changed, which datasets' own cache would not see (see load_records).
        records_dir = str(tmp / "records")
        if train_records is None:
            train_records = load_records(cfg.path, cfg.split, cache_dir=records_dir)
        if cfg.max_examples is not None:
            train_records = train_records.select(range(min(cfg.max_examples, len(train_records))))
        if cfg.eval_path and eval_records is None:
            eval_records = load_records(cfg.eval_path, cfg.split, cache_dir=records_dir)
        num_proc = _choose_num_proc(cfg.num_proc, len(train_records))
        tables = {"train": _tokenize_to_arrow(train_records, tmp, "train", cfg, tokenizer, max_seq_len, num_proc, key)}
        if eval_records is not None:
            tables["eval"] = _tokenize_to_arrow(eval_records, tmp, "eval", cfg, tokenizer, max_seq_len, num_proc, key)

        train_rows = np.arange(len(train_records), dtype=np.int64)
        eval_rows = np.arange(len(eval_records) if eval_records is not None else 0, dtype=np.int64)
        if not cfg.eval_path and cfg.eval_fraction > 0:
            train_indices, eval_indices = split_indices(len(train_records), cfg.eval_fraction, seed)
            train_rows, eval_rows = np.array(train_indices, dtype=np.int64), np.array(eval_indices, dtype=np.int64)
        eval_table = "eval" if eval_records is not None else "train"
        train_kept, train_stats = _select_split("train", tables["train"][1], train_rows, max_seq_len, cfg.truncation)
        eval_kept, eval_stats = _select_split("eval", tables[eval_table][1], eval_rows, max_seq_len, cfg.truncation)
        train_stats["sequences"] = train_stats["kept"]
        np.save(tmp / "train_rows.npy", train_kept)
        np.save(tmp / "eval_rows.npy", eval_kept)
        if cfg.packing and len(train_kept):
            bounds = np.array(_plan_packs(tables["train"][1]["length"][train_kept].tolist(), max_seq_len), dtype=np.int64)
            np.save(tmp / "train_pack_bounds.npy", bounds)
            train_stats["sequences"] = len(bounds) - 1
        splits = (train_stats, eval_stats)
        stats = {
            "records": len(train_records) + (len(eval_records) if eval_records is not None else 0),
            **{name: sum(split[name] for split in splits) for name in ("kept", "dropped", "truncated", "tokens")},
            "train": train_stats,
            "eval": eval_stats,
            "max_seq_len": max_seq_len,
            "truncation": cfg.truncation,
            "packing": cfg.packing,
            "num_proc": num_proc,
            "tokenize_seconds": round(time.perf_counter() - started, 3),
        }
        if not len(train_kept):
            _print_truncation_lines(stats)
            raise DataError(_no_training_examples_message(cfg.path, _truncation_stats(stats)["train"]))
        manifest = {
            "key": key,
            "tables": {name: files for name, (files, _) in tables.items()},
            "eval_table": eval_table,
            "stats": stats,
        }
        shutil.rmtree(records_dir, ignore_errors=True)
        # Written last: a folder with a manifest is complete, even before the rename.
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / _MANIFEST).is_file():
                raise
            # Another process prepared the same data first; its folder is the same data.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenize_to_arrow(
    records: datasets.Dataset, tmp: Path, name: str, cfg: DataConfig, tokenizer: Any, max_seq_len: int, num_proc: int, key: dict
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Tokenize the records into Arrow files under ``tmp/name``; their names and the small columns as arrays."""
    (tmp / name).mkdir()
    mapped = records.map(
        _tokenize_batch,
        batched=True,
        with_indices=True,  # each worker gets the file's row numbers, quoted in errors
        # datasets runs num_proc=1 in a worker process too; in this one it skips sending the tokenizer.
        num_proc=min(num_proc, len(records)) if num_proc > 1 else None,
        remove_columns=records.column_names,
        features=_PREPARED_FEATURES,
        fn_kwargs={"fmt": cfg.format, "tokenizer": tokenizer, "text_field": cfg.text_field, "max_seq_len": max_seq_len, "truncation": cfg.truncation},
        cache_file_name=str(tmp / name / "tokens.arrow"),
        # Our key names the result: datasets need not hash the tokenizer (seconds, and a warning when it cannot).
        new_fingerprint=hashlib.sha256(json.dumps([key, name], sort_keys=True).encode()).hexdigest()[:32],
        load_from_cache_file=False,
        desc=f"tokenizing {name} ({Path(cfg.path if name == 'train' else cfg.eval_path).name})",
    )
    files = [str(Path(f["filename"]).relative_to(tmp)) for f in mapped.cache_files]
    small = {column: mapped.data.column(column).to_numpy() for column in ("length", "whole_length", "cut_tokens", "learnable", "kept")}
    return files, small


def _tokenize_batch(
    batch: dict[str, list], indices: list[int], fmt: str, tokenizer: Any, text_field: str, max_seq_len: int, truncation: str
) -> pa.Table:
    """``datasets.map`` function: a batch of records -> one row of ``_PREPARED_FEATURES`` each."""
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    columns: dict[str, list] = {name: [] for name in _PREPARED_FEATURES}
    for whole in _tokenize_records(records, indices, fmt, tokenizer, text_field):
        labels, beyond = whole["labels"][:max_seq_len], whole["labels"][max_seq_len:]
        # Every example ends in a learned token (EOS or end of turn), so any cut loses learned tokens.
        cut = len(beyond) - beyond.count(IGNORE_INDEX)
        learnable = labels.count(IGNORE_INDEX) < len(labels)
        kept = learnable and not (cut and truncation == "drop")
        input_ids = whole["input_ids"][:max_seq_len] if kept else []
        columns["input_ids"].append(input_ids)
        columns["labels"].append(labels if kept else [])
        columns["length"].append(len(input_ids))
        columns["whole_length"].append(len(whole["input_ids"]))
        columns["cut_tokens"].append(cut)
        columns["learnable"].append(learnable)
        columns["kept"].append(kept)
    # An Arrow table, not lists: pyarrow converts lists of Python ints element by element, 30 times
    # slower than numpy's fromiter, and datasets would convert them again to infer their type.
    arrays = {name: _to_list_array(values) if name in ("input_ids", "labels") else values for name, values in columns.items()}
    return pa.table(arrays, schema=_PREPARED_FEATURES.arrow_schema)


def _to_list_array(lists: list[list[int]]) -> pa.ListArray:
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(ids) for ids in lists], out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _select_split(
    split: str, columns: dict[str, np.ndarray], rows: np.ndarray, max_seq_len: int, policy: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """The kept rows among ``rows`` and the split's statistics (``TruncationStats`` fields, kept, tokens)."""
    cut = columns["cut_tokens"][rows].astype(np.int64)
    kept = rows[columns["kept"][rows]]
    stats = TruncationStats(
        split=split,
        examples=len(rows),
        truncated=int((cut > 0).sum()),
        fully_cut=int(((cut > 0) & ~columns["learnable"][rows]).sum()),
        response_tokens_cut=int(cut.sum()),
        dropped=len(rows) - len(kept),
        longest_tokens=int(columns["whole_length"][rows].max()) if len(rows) else 0,
        max_seq_len=max_seq_len,
        policy=policy,
    )
    return kept, {**dataclasses.asdict(stats), "kept": len(kept), "tokens": int(columns["length"][kept].astype(np.int64).sum())}


def _open_prepared(folder: Path) -> PreparedData:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        tables = {name: _read_arrow([folder / file for file in files]) for name, files in manifest["tables"].items()}
        train_rows, eval_rows = np.load(folder / "train_rows.npy"), np.load(folder / "eval_rows.npy")
        bounds_file = folder / "train_pack_bounds.npy"
        bounds = np.load(bounds_file) if bounds_file.exists() else None
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise DataError(f"the data cache {folder} is damaged ({err}); delete that folder and run again to rebuild it") from err
    train = TokenizedExamples(tables["train"], train_rows, bounds)
    evaluation = TokenizedExamples(tables[manifest["eval_table"]], eval_rows)
    return PreparedData(train, evaluation, manifest["stats"])


def _read_arrow(files: list[Path]) -> pa.Table:
    # datasets writes Arrow IPC streams; reading one from a memory map copies nothing.
    tables = [pa.ipc.open_stream(pa.memory_map(str(file))).read_all() for file in files]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _no_training_examples_message(path: str, stats: TruncationStats) -> str:
    if stats.truncated > stats.fully_cut and stats.policy == "drop":
        return (
            f"no training examples left from {path}: all {stats.examples} did not fit in max_seq_len={stats.max_seq_len}; "
            "raise train.max_seq_len, or set data.truncation=keep to train on the cut responses"
        )
    return (
        f"no training examples left from {path}: all {stats.examples} had no response token left within "
        f"max_seq_len={stats.max_seq_len}; raise train.max_seq_len or shorten the prompts"
    )


def split_indices(n_records: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out ``round(n_records * eval_fraction)`` (at least 1) records, chosen by a seeded shuffle.

    Returns:
        ``(train_indices, eval_indices)``, each in ascending order so the training order
        stays the file's order.

    Raises:
        DataError: The fraction would leave no training record.
    """
    n_eval = max(1, round(n_records * eval_fraction))
    if n_eval >= n_records:
        raise DataError(
            f"data.eval_fraction={eval_fraction} holds out {n_eval} of {n_records} records, leaving none to train on; "
            "lower it or pass data.eval_path"
        )
    order = list(range(n_records))
    random.Random(seed).shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


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
    bounds = _plan_packs([len(ex["input_ids"]) for ex in examples], max_seq_len)
    return [_merge_pack(examples[start:end]) for start, end in itertools.pairwise(bounds)]


def _plan_packs(lengths: list[int], max_seq_len: int) -> list[int]:
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


def _merge_pack(examples: list[dict]) -> dict[str, list[int]]:
    pack: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        pack["input_ids"] += ex["input_ids"]
        pack["labels"] += [IGNORE_INDEX] + ex["labels"][1:]
        pack["position_ids"] += list(range(len(ex["input_ids"])))
    return pack


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------


def collate_batch(examples: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad examples into one batch of tensors.

    Args:
        examples: Examples from ``build_datasets`` (all packed or all unpacked).
        pad_token_id: Id written into padded ``input_ids``. It may equal the EOS id: padding
            is masked by position (labels ``IGNORE_INDEX``), never by value.

    Returns:
        Unpacked: ``input_ids``, ``labels`` and ``attention_mask`` (1 on tokens, 0 on padding),
        each ``(B, T)`` int64 with T the longest example. Packed: ``input_ids``, ``labels`` and
        ``position_ids`` and *no* ``attention_mask``, so that transformers builds the
        per-example causal mask from ``position_ids``; call the model with
        ``use_cache=False``. Padding gets positions 0, 1, ... of its own, a separate
        sequence that no real token can see (it comes after them).

    Raises:
        ValueError: ``pad_token_id`` is None, or packed and unpacked examples are mixed.
    """
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; use the tokenizer's pad id, or its EOS id when it has no pad token")
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    flags = {"position_ids" in ex for ex in examples}
    if len(flags) > 1:
        raise ValueError("cannot collate packed and unpacked examples into one batch")
    packed = flags.pop()
    batch_size, longest = len(examples), max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((batch_size, longest), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    attention_mask = torch.zeros((batch_size, longest), dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((batch_size, longest), dtype=torch.long)  # (B, T), packed only
    for row, ex in enumerate(examples):
        length = len(ex["input_ids"])
        input_ids[row, :length] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[row, :length] = torch.tensor(ex["labels"], dtype=torch.long)
        attention_mask[row, :length] = 1
        if packed:
            position_ids[row, :length] = torch.tensor(ex["position_ids"], dtype=torch.long)
            position_ids[row, length:] = torch.arange(longest - length)
    if packed:
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


# ---------------------------------------------------------------------------------------------
# Micro-batch order (train.batching)
# ---------------------------------------------------------------------------------------------

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
            of a list, ``input_ids`` is read for its length under ``grouped``). Do not change the list
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
                cache["lengths"] = known.tolist() if known is not None else [len(ex["input_ids"]) for ex in examples]
            lengths = cache["lengths"]
        if len(cache["plans"]) >= _PLAN_CACHE_EPOCHS:
            cache["plans"].pop(next(iter(cache["plans"])))  # the oldest: fit only moves forward
        cache["plans"][key] = plan_epoch(lengths, micro_batch_size, seed, epoch, batching)
    return cache["plans"][key]


def padding_fraction(batches: list[list[dict]]) -> float:
    """The share of padding in the tensors ``collate_batch`` would build from these micro-batches.

    ``1 - tokens / sum(B * T)`` over all micro-batches, with T each micro-batch's longest example
    (a packed example counts as one row). 0.0 for no batches.
    """
    tokens = sum(len(ex["input_ids"]) for batch in batches for ex in batch)
    padded = sum(len(batch) * max(len(ex["input_ids"]) for ex in batch) for batch in batches if batch)
    return 1.0 - tokens / padded if padded else 0.0
