"""Tokenizing and masking: a record's rendered pieces (formats.py) into input ids and labels.

Prompt and response are tokenized separately and their ids concatenated, so the boundary between
masked and learned tokens is exact rather than guessed from character offsets. Many records go to
the tokenizer in one call (``tokenize_records``), which is what the data cache runs in its workers.
"""

from __future__ import annotations

from typing import Any

import tokenizers

from ..errors import DataError
from .formats import (
    IGNORE_INDEX,
    chat_roles,
    find_end_of_turn_token,
    read_chat_messages,
    render_segments,
)


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
    example = tokenize_records([record], [index], fmt, tokenizer, text_field)[0]
    return {"input_ids": example["input_ids"][:max_seq_len], "labels": example["labels"][:max_seq_len]}


def tokenize_records(
    records: list[dict], indices: list[int], fmt: str, tokenizer: Any, text_field: str
) -> list[dict[str, Any]]:
    """``tokenize_example`` before the cut to ``max_seq_len``, for many records at once.

    The texts of all records go to the tokenizer in one call: a fast tokenizer encodes a batch in
    Rust, where one call per text spends most of its time in Python (3 calls per alpaca record
    before, 128 s for 200,000 records). Each piece is still encoded on its own, so the ids equal
    those of one call per piece. Each example also carries ``chat_read_as``: the flags of
    ``read_chat_messages`` for a chat record (0 for the other formats), which the data report counts.
    """
    eos_id = require_eos_id(tokenizer)
    end_of_turn = (find_end_of_turn_token(tokenizer) or tokenizer.eos_token) if fmt == "chat" else None
    # Once per batch: chat_roles runs a regex over the whole template.
    roles = chat_roles(tokenizer) if fmt == "chat" else None
    # Read and rendered in one loop, so a bad record raises the same first error as rendering alone did.
    rendered = [
        _render_record(record, index, fmt, tokenizer, text_field, end_of_turn, roles) for record, index in zip(records, indices)
    ]
    texts = [text for segments, _ in rendered for text, _ in segments if text]
    encoded = iter(_encode_texts(tokenizer, texts) if texts else [])
    end_ids = {tokenizer.eos_token: eos_id}
    bos_id = tokenizer.bos_token_id if _adds_bos(tokenizer) else None
    examples = []
    for segments, read_as in rendered:
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
        examples.append({"input_ids": input_ids, "labels": labels, "chat_read_as": read_as})
    return examples


def _render_record(
    record: dict, index: int, fmt: str, tokenizer: Any, text_field: str, end_of_turn: str | None, roles: tuple[str, ...] | None
) -> tuple[list[tuple[str, str | None]], int]:
    """A record's pieces (``render_segments``) and its chat reading flags (0 for a format other than chat)."""
    if roles is None:
        return render_segments(record, fmt, tokenizer, index, text_field, end_of_turn), 0
    # Read once: the rendering takes the turns, the data report the flags.
    messages, read_as = read_chat_messages(record, index, roles)
    return render_segments(record, fmt, tokenizer, index, text_field, end_of_turn, messages=messages), read_as


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
