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
no response token left is always dropped. ``build_datasets`` prints one line per split saying how
many did not fit and how many response tokens were cut; ``build_datasets_with_stats`` returns them.

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

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch

from qlora_lite.config import CHOICES, DataConfig

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


def load_records(path: str, split: str = "train") -> datasets.Dataset:
    """Load raw records from a local file or folder, or from the Hugging Face hub.

    Args:
        path: A ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a folder of such files (split
            names come from the file names, e.g. ``train.jsonl`` and ``test.jsonl``), or a hub
            dataset id such as ``tatsu-lab/alpaca``.
        split: Split to read from a folder or a hub dataset. A single file has one split and
            ignores this.

    Returns:
        The records as a ``datasets.Dataset``.

    Raises:
        DataError: The local file does not exist, cannot be parsed or holds no records; the
            split does not exist; or the hub cannot be reached for a hub id.
    """
    if _looks_local(path):
        records = _load_local_records(Path(path).expanduser(), split)
    else:
        records = _load_hub_records(path, split)
    if len(records) == 0:
        raise DataError(f"{path} (split {split!r}) holds no records; check the file is not empty")
    return records


def _looks_local(path: str) -> bool:
    # A hub id is "name" or "owner/name"; anything with a data-file suffix or a filesystem
    # prefix is meant as a local path, so a typo there says "file not found", not "hub unreachable".
    return Path(path).expanduser().exists() or Path(path).suffix in LOCAL_BUILDERS or path.startswith(("/", ".", "~"))


def _load_local_records(path: Path, split: str) -> datasets.Dataset:
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
            records = datasets.load_dataset(str(path), split=split)
        else:
            # A single file is one split, which datasets names "train" whatever the file is for.
            records = datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train")
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


def _render_segments(record: dict, fmt: str, tokenizer: Any, index: int, text_field: str) -> list[tuple[str, str | None]]:
    """Split a record into consecutive ``(text, end)`` pieces.

    ``end`` is None for a masked piece; for a learned piece it is the special token that closes
    it (EOS, or a chat template's end-of-turn token), appended as an id by ``tokenize_example``.
    """
    eos_token = getattr(tokenizer, "eos_token", None) or ""
    if fmt == "alpaca":
        return _render_alpaca(record, index, eos_token)
    if fmt == "chat":
        return _render_chat(record, tokenizer, index)
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


def _render_chat(record: dict, tokenizer: Any, index: int) -> list[tuple[str, str | None]]:
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
    end_of_turn = find_end_of_turn_token(tokenizer) or eos_token
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
    example = _tokenize_whole(record, fmt, tokenizer, index, text_field)
    return {"input_ids": example["input_ids"][:max_seq_len], "labels": example["labels"][:max_seq_len]}


def _tokenize_whole(record: dict, fmt: str, tokenizer: Any, index: int, text_field: str) -> dict[str, list[int]]:
    """``tokenize_example`` before the cut to ``max_seq_len``."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before building the data")
    input_ids: list[int] = []
    labels: list[int] = []
    # Each piece is tokenized on its own, so the masked/learned boundary falls between ids.
    for text, end in _render_segments(record, fmt, tokenizer, index, text_field):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        input_ids += ids
        labels += [IGNORE_INDEX] * len(ids) if end is None else ids
        if end is not None:
            end_id = eos_id if end == tokenizer.eos_token else tokenizer.convert_tokens_to_ids(end)
            input_ids.append(end_id)
            labels.append(end_id)
    bos_id = tokenizer.bos_token_id
    if _adds_bos(tokenizer) and input_ids[:1] != [bos_id]:
        input_ids.insert(0, bos_id)
        labels.insert(0, IGNORE_INDEX)
    return {"input_ids": input_ids, "labels": labels}


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


def build_datasets(cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Load, split, tokenize and (optionally) pack the training and evaluation examples.

    ``build_datasets_with_stats`` without the stats; it prints the same report lines.
    """
    train_examples, eval_examples, _ = build_datasets_with_stats(cfg, tokenizer, max_seq_len, seed)
    return train_examples, eval_examples


def build_datasets_with_stats(
    cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int
) -> tuple[list[dict], list[dict], dict[str, TruncationStats]]:
    """Load, split, tokenize and (optionally) pack the examples, and say what ``max_seq_len`` cut.

    An example whose response does not fit in ``max_seq_len`` with the EOS that ends it is
    dropped (``cfg.truncation="drop"``, the default: a cut response would teach the model that
    some answers never stop) or kept with its first ``max_seq_len`` tokens (``"keep"``). An
    example with no response token left is dropped either way. One line per non-empty split
    (``format_truncation_stats``) is printed: how many examples did not fit, the response
    tokens cut and what the policy did.

    Args:
        cfg: The recipe's data section.
        tokenizer: The model's tokenizer.
        max_seq_len: Longest sequence in tokens; packs fill up to it.
        seed: Seeds the shuffle that picks the held-out records for ``cfg.eval_fraction``.

    Returns:
        ``(train, eval, stats)``: lists of examples with ``input_ids`` and ``labels`` (packed
        training examples also carry ``position_ids``; evaluation examples are never packed),
        and ``{"train": TruncationStats, "eval": TruncationStats}``. The eval list comes from
        ``cfg.eval_path`` (read with ``cfg.split``; a single file ignores it), else from
        ``round(n * cfg.eval_fraction)`` (at least 1) held-out training records, else it is empty.

    Raises:
        DataError: Files cannot be read, a record lacks a required field (message gives the
            field and record index), or no training example is left.
    """
    if cfg.truncation not in CHOICES["data.truncation"]:
        raise DataError(f"data.truncation={cfg.truncation!r} is not one of {', '.join(CHOICES['data.truncation'])}")
    records = load_records(cfg.path, cfg.split)
    if cfg.max_examples is not None:
        records = records.select(range(min(cfg.max_examples, len(records))))
    train_indices = list(range(len(records)))
    eval_records, eval_indices = records, []
    if cfg.eval_path:
        eval_records = load_records(cfg.eval_path, cfg.split)
        eval_indices = list(range(len(eval_records)))
    elif cfg.eval_fraction > 0:
        train_indices, eval_indices = split_indices(len(records), cfg.eval_fraction, seed)
    train_examples, train_stats = _tokenize_split(records, train_indices, cfg, tokenizer, max_seq_len, "train")
    eval_examples, eval_stats = _tokenize_split(eval_records, eval_indices, cfg, tokenizer, max_seq_len, "eval")
    for stats in (train_stats, eval_stats):
        if stats.examples:
            print(format_truncation_stats(stats))
    if not train_examples:
        raise DataError(_no_training_examples_message(cfg.path, train_stats))
    if cfg.packing:
        train_examples = pack_examples(train_examples, max_seq_len)
    return train_examples, eval_examples, {"train": train_stats, "eval": eval_stats}


def _tokenize_split(
    records: datasets.Dataset, indices: Any, cfg: DataConfig, tokenizer: Any, max_seq_len: int, split: str
) -> tuple[list[dict], TruncationStats]:
    stats = TruncationStats(split, 0, 0, 0, 0, 0, 0, max_seq_len, cfg.truncation)
    examples: list[dict] = []
    for i in indices:
        # The index in errors is the record's row in the file, whatever split or shuffle came first.
        whole = _tokenize_whole(records[i], cfg.format, tokenizer, index=i, text_field=cfg.text_field)
        example = {"input_ids": whole["input_ids"][:max_seq_len], "labels": whole["labels"][:max_seq_len]}
        stats.examples += 1
        stats.longest_tokens = max(stats.longest_tokens, len(whole["input_ids"]))
        # Every example ends in a learned token (EOS or end of turn), so any cut loses learned tokens.
        cut = sum(label != IGNORE_INDEX for label in whole["labels"][max_seq_len:])
        learnable = any(label != IGNORE_INDEX for label in example["labels"])
        if cut:
            stats.truncated += 1
            stats.response_tokens_cut += cut
            stats.fully_cut += not learnable
        if not learnable or (cut and cfg.truncation == "drop"):
            stats.dropped += 1
            continue
        examples.append(example)
    return examples, stats


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
    packs: list[dict] = []
    current: dict[str, list[int]] = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        length = len(ex["input_ids"])
        if current["input_ids"] and len(current["input_ids"]) + length > max_seq_len:
            packs.append(current)
            current = {"input_ids": [], "labels": [], "position_ids": []}
        current["input_ids"] += ex["input_ids"]
        current["labels"] += [IGNORE_INDEX] + ex["labels"][1:]
        current["position_ids"] += list(range(length))
    if current["input_ids"]:
        packs.append(current)
    return packs


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
    examples: list[dict], index: int, micro_batch_size: int, seed: int, batching: str = "grouped"
) -> list[dict]:
    """The index-th micro-batch of an endless stream of epochs, each epoch in its own seeded order.

    A pure function of its arguments, so a resumed run sees exactly the batches it would have seen.
    Epoch ``e`` is ``len(examples) // micro_batch_size`` micro-batches built from
    ``torch.randperm(len(examples))`` seeded with ``seed + e``; the ``len(examples) % micro_batch_size``
    examples at the end of that permutation are left out of the epoch (different ones each epoch),
    every other example is in exactly one of its micro-batches.

    Args:
        examples: Training examples (``input_ids`` is read for its length under ``grouped``). Do not
            change the list in place between calls: the epoch's plan is cached for the list last seen.
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
        ``micro_batch_size`` examples (the objects of ``examples``, not copies).

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


def _cached_epoch_plan(examples: list[dict], epoch: int, micro_batch_size: int, seed: int, batching: str) -> list[list[int]]:
    cache = _plan_cache
    if cache["examples"] is not examples or cache["n"] != len(examples):
        cache.update(examples=examples, n=len(examples), lengths=None, plans={})
    key = (epoch, micro_batch_size, seed, batching)
    if key not in cache["plans"]:
        if batching == "random":
            lengths = [0] * len(examples)  # never read: random examples need no input_ids, as before
        else:
            if cache["lengths"] is None:
                cache["lengths"] = [len(ex["input_ids"]) for ex in examples]
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
