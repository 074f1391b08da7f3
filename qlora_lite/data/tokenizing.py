"""Tokenizing and masking: a record's rendered pieces (formats.py) into input ids and labels.

Prompt and response are tokenized separately and their ids concatenated, so the boundary between
masked and learned tokens is exact rather than guessed from character offsets. Many records go to
the tokenizer in one call (``tokenize_records``), which is what the data cache runs in its workers.
A ``preference`` record gives two sequences, prompt + chosen and prompt + rejected, whose prompt
pieces are the same text and so the same ids.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import tokenizers

from ..errors import DataError
from .formats import (
    FORMAT_NEEDS,
    IGNORE_INDEX,
    PREFERENCE_FORMATS,
    TEMPLATED_FORMATS,
    Segments,
    chat_roles,
    find_end_of_turn_token,
    read_chat_messages,
    render_pair,
    render_segments,
    render_unpaired,
)


def tokenize_example(
    record: dict, fmt: str, tokenizer: Any, max_seq_len: int, index: int = 0, text_field: str = "text"
) -> dict[str, Any]:
    """Tokenize one record into input ids and labels that carry loss on the response only.

    The sequence is ``[bos] + prompt + response + eos``: BOS only when the tokenizer adds one
    by itself (Llama 2/3 do, Qwen2 does not) and the rendered text does not already start with
    it (chat templates often write it); EOS always, learned, so the model learns to stop. For
    chat, each assistant turn is learned as content + the end-of-turn token its template writes
    (``<|eot_id|>``, ``<|im_end|>``; EOS for ``DEFAULT_CHAT_TEMPLATE``), with no EOS after it
    (see ``_render_chat``).

    Args:
        record: One raw record.
        fmt: A format of ``config.DATA_FORMATS``.
        tokenizer: The model's tokenizer (must define an EOS token).
        max_seq_len: Longer sequences keep their first ``max_seq_len`` tokens, losing the EOS
            at least. When that cuts every learned token, the example is still returned with all
            labels ``IGNORE_INDEX``. ``build_datasets`` drops or keeps cut examples as
            ``data.truncation`` says, and reports them.
        index: Position of the record in its file, quoted in errors.
        text_field: Field holding the text for format ``text``.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` of equal length; labels are ``IGNORE_INDEX``
        on BOS, prompts, user turns and template markup, and the token id elsewhere. A
        ``preference`` example holds prompt + chosen there and prompt + rejected in
        ``rejected_input_ids`` and ``rejected_labels``, each cut to ``max_seq_len``; an ``unpaired``
        one adds ``desirable`` (1 or 0).

    Raises:
        DataError: A required field is missing or empty, or the tokenizer has no EOS token.
    """
    example = tokenize_records([record], [index], fmt, tokenizer, text_field)[0]
    del example["chat_read_as"]
    return {key: value[:max_seq_len] if isinstance(value, list) else value for key, value in example.items()}


def tokenize_records(
    records: list[dict], indices: list[int], fmt: str, tokenizer: Any, text_field: str
) -> list[dict[str, Any]]:
    """``tokenize_example`` before the cut to ``max_seq_len``, for many records at once.

    The texts of all records go to the tokenizer in one call: a fast tokenizer encodes a batch in
    Rust, where one call per text spends most of its time in Python (3 calls per alpaca record
    before, 128 s for 200,000 records). Each piece is still encoded on its own, so the ids equal
    those of one call per piece. Each example also carries ``chat_read_as``: the flags of
    ``read_chat_messages`` for a record holding conversations (0 for the other formats), which the
    data report counts.

    Raises:
        DataError: As ``tokenize_example``; also a ``preference`` record whose answers give the
            same token ids (nothing to prefer).
    """
    eos_id = require_eos_id(tokenizer)
    templated = fmt in TEMPLATED_FORMATS
    end_of_turn = (find_end_of_turn_token(tokenizer) or tokenizer.eos_token) if templated else None
    # Once per batch: chat_roles runs a regex over the whole template.
    roles = chat_roles(tokenizer) if templated else None
    # Read and rendered in one loop, so a bad record raises the same first error as rendering alone did.
    rendered = [
        _render_record(record, index, fmt, tokenizer, text_field, end_of_turn, roles) for record, index in zip(records, indices)
    ]
    texts = [text for sequences, _, _ in rendered for segments in sequences for text, _ in segments if text]
    encoded = iter(_encode_texts(tokenizer, texts) if texts else [])
    end_ids = {tokenizer.eos_token: eos_id}
    bos_id = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    # A pair's or an unpaired answer's conversation learns its final turn only: earlier assistant turns are its prompt.
    last_only = fmt in PREFERENCE_FORMATS
    examples = []
    for (sequences, read_as, extra), index in zip(rendered, indices):
        (input_ids, labels), *others = [_assemble_ids(segments, encoded, end_ids, bos_id, tokenizer, last_only) for segments in sequences]
        example = {"input_ids": input_ids, "labels": labels}
        if others:
            rejected_ids, rejected_labels = others[0]
            if rejected_ids == input_ids:
                raise DataError(
                    f"record {index}: 'chosen' and 'rejected' give the same tokens, so there is nothing to prefer "
                    f"({FORMAT_NEEDS['preference']}); fix one answer or drop the record"
                )
            example.update(rejected_input_ids=rejected_ids, rejected_labels=rejected_labels)
        examples.append({**example, **extra, "chat_read_as": read_as})
    return examples


def _assemble_ids(
    segments: Segments, encoded: Iterator[list[int]], end_ids: dict[str, int], bos_id: int | None, tokenizer: Any, last_only: bool
) -> tuple[list[int], list[int]]:
    """One sequence's input ids and labels from its pieces, whose texts are the next ones ``encoded`` gives.

    ``last_only``: only the last learned piece is learned, the earlier ones masked with the rest.
    """
    input_ids: list[int] = []
    labels: list[int] = []
    last = max((i for i, (_, end) in enumerate(segments) if end is not None), default=-1) if last_only else -1
    # Each piece was tokenized on its own, so the masked/learned boundary falls between ids.
    for i, (text, end) in enumerate(segments):
        learned = end is not None and (i == last or not last_only)
        if text:
            ids = next(encoded)
            input_ids += ids
            labels += ids if learned else [IGNORE_INDEX] * len(ids)
        if end is not None:
            if end not in end_ids:
                end_ids[end] = tokenizer.convert_tokens_to_ids(end)
            input_ids.append(end_ids[end])
            labels.append(end_ids[end] if learned else IGNORE_INDEX)
    if bos_id is not None and input_ids[:1] != [bos_id]:
        input_ids.insert(0, bos_id)
        labels.insert(0, IGNORE_INDEX)
    return input_ids, labels


def _render_record(
    record: dict, index: int, fmt: str, tokenizer: Any, text_field: str, end_of_turn: str | None, roles: tuple[str, ...] | None
) -> tuple[list[Segments], int, dict[str, int]]:
    """A record's sequences as pieces (``render_segments``; a preference record: chosen, then rejected),
    its chat reading flags (0 for a format that reads no conversation) and what else its example holds."""
    if fmt == "preference":
        chosen, rejected, read_as = render_pair(record, tokenizer, index, end_of_turn, roles)
        return [chosen, rejected], read_as, {}
    if fmt == "unpaired":
        segments, desirable, read_as = render_unpaired(record, tokenizer, index, end_of_turn, roles)
        return [segments], read_as, {"desirable": int(desirable)}
    if roles is None:
        return [render_segments(record, fmt, tokenizer, index, text_field, end_of_turn)], 0, {}
    # Read once: the rendering takes the turns, the data report the flags.
    messages, read_as = read_chat_messages(record, index, roles)
    return [render_segments(record, fmt, tokenizer, index, text_field, end_of_turn, messages=messages)], read_as, {}


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


def require_eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token before building the data")
    return tokenizer.eos_token_id
