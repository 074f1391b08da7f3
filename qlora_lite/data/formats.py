"""Data formats: how one record becomes the prompt (masked) and the answer (learned).

One record becomes one example ``{"input_ids": [...], "labels": [...]}``:

    [bos] + prompt tokens + response tokens + eos        (input_ids)
    [-100] + -100 ...      + response tokens + eos        (labels)

The loss is on the response and on the EOS that ends it (so the model learns to stop);
``IGNORE_INDEX`` (-100, what ``torch.nn.functional.cross_entropy`` skips) hides the rest. A chat
turn ends instead with the token its template writes there (``find_end_of_turn_token``):
``<|eot_id|>`` for Llama 3, ``<|im_end|>`` for ChatML, EOS for ``DEFAULT_CHAT_TEMPLATE``.
This module renders the text pieces; ``tokenizing.py`` turns them into ids.

Formats (``DataConfig.format``, listed with what they need in ``config.DATA_FORMATS``):

- ``alpaca``: fields ``instruction``, ``output`` and optional ``input``, in the Stanford
  Alpaca prompt template.
- ``chat``: field ``messages``, a list of ``{role, content}`` ending with an assistant turn,
  rendered with the tokenizer's chat template or ``DEFAULT_CHAT_TEMPLATE``. Every assistant
  turn is learned, with the end-of-turn token the template writes after it; system and user
  turns and the template's markup are masked. The token sequence spells the template's own
  rendering, less the whitespace after the last turn (and plus BOS when the tokenizer adds one
  and the template does not write it). Roles are system, user, assistant (and tool where the
  template handles it, ``chat_roles``); ``CHAT_ROLE_ALIASES`` are read as those, ShareGPT's
  ``conversations`` of ``{from, value}`` as ``messages`` of ``{role, content}``
  (``read_chat_messages``); any other role is refused.
- ``text``: one text field, every token learned (plain language modelling).
"""

from __future__ import annotations

import math
import re
from typing import Any

from ..config import DATA_FORMATS
from ..errors import DataError

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

FORMAT_NEEDS = {name: f"format {name} needs {needs}" for name, needs in DATA_FORMATS.items()}
"""What each format needs, quoted in the error for a bad record."""

CHAT_ROLES = ("system", "user", "assistant")
"""The roles every chat template renders as such; ``tool`` too where the template handles it (``chat_roles``)."""

CHAT_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
"""Roles other data sets write (ShareGPT: human, gpt; Gemma: model), read as the role the templates know.

Without this a template writes them as they stand (``<|human|>``, which ``generate``'s ``<|user|>``
never matches) and only ``assistant`` turns are learned, so a ``bot`` answer would be masked."""

CHAT_READINGS = (
    "conversations->messages",
    "from/value->role/content",
    *(f"{alias}->{role}" for alias, role in CHAT_ROLE_ALIASES.items()),
)
"""What ``read_chat_messages`` may have read otherwise than as written; bit ``i`` of its flags is ``CHAT_READINGS[i]``."""

# Built once: read_chat_messages looks a bit up per turn, on the data cache's hot path.
_READING_BIT = {name: 1 << i for i, name in enumerate(CHAT_READINGS)}


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
    segments = render_segments(record, fmt, tokenizer, index, text_field)
    # Earlier learned pieces (multi-turn chat) are followed by their end token in the token
    # sequence, so the prompt text shows it there too.
    prompt = "".join(text + (end or "") for text, end in segments[:-1])
    return prompt, segments[-1][0]


def render_segments(
    record: dict,
    fmt: str,
    tokenizer: Any,
    index: int,
    text_field: str,
    end_of_turn: str | None = None,
    messages: list[dict] | None = None,
) -> list[tuple[str, str | None]]:
    """Split a record into consecutive ``(text, end)`` pieces.

    ``end`` is None for a masked piece; for a learned piece it is the special token that closes
    it (EOS, or a chat template's end-of-turn token), appended as an id by ``tokenize_example``.
    ``end_of_turn``: the chat end-of-turn token (``find_end_of_turn_token`` or EOS), when the caller
    has already found it once for many records; None finds it. ``messages``: the chat record's turns
    as ``read_chat_messages`` returns them, when the caller has already read them; None reads them.
    """
    eos_token = getattr(tokenizer, "eos_token", None) or ""
    if fmt == "alpaca":
        return _render_alpaca(record, index, eos_token)
    if fmt == "chat":
        return _render_chat(record, tokenizer, index, end_of_turn, messages)
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


def _render_chat(
    record: dict, tokenizer: Any, index: int, end_of_turn: str | None = None, messages: list[dict] | None = None
) -> list[tuple[str, str | None]]:
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
    if messages is None:  # callers over many records read them once, with the roles found once (tokenize_records)
        messages, _ = read_chat_messages(record, index, chat_roles(tokenizer))
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


def find_end_of_turn_id(tokenizer: Any) -> int | None:
    """The id of the token the tokenizer's chat template closes an assistant turn with; None without one."""
    token = find_end_of_turn_token(tokenizer)
    token_id = tokenizer.convert_tokens_to_ids(token) if token is not None else None
    return None if token_id is None or token_id == tokenizer.unk_token_id else token_id


def _apply_chat_template(tokenizer: Any, messages: list[dict], add_generation_prompt: bool, index: int) -> str:
    # The tokenizer's own template wins; DEFAULT_CHAT_TEMPLATE only fills the gap.
    template = None if getattr(tokenizer, "chat_template", None) else DEFAULT_CHAT_TEMPLATE
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except Exception as err:  # jinja raises TemplateError or whatever the template's raise_exception says
        raise DataError(f"record {index}: the chat template could not render the conversation: {err}") from err


def chat_roles(tokenizer: Any) -> tuple[str, ...]:
    """The roles the tokenizer's chat template (or ``DEFAULT_CHAT_TEMPLATE``) knows: ``CHAT_ROLES``, plus ``tool`` where it handles one.

    A template that handles tool results compares the role with ``'tool'`` (Llama 3.1, Qwen2.5,
    Mistral); rendering a probe would not tell, since ours and many others write any role as it stands.
    """
    template = str(getattr(tokenizer, "chat_template", None) or DEFAULT_CHAT_TEMPLATE)
    return (*CHAT_ROLES, "tool") if re.search(r"""["']tool["']""", template) else CHAT_ROLES


def read_chat_messages(record: dict, index: int, roles: tuple[str, ...]) -> tuple[list[dict], int]:
    """A chat record's turns as ``{role, content}`` with the roles the template knows, and what was read otherwise.

    ``messages`` (else ShareGPT's ``conversations``), each turn ``{role, content}`` or ShareGPT's
    ``{from, value}``; an alias of ``CHAT_ROLE_ALIASES`` becomes its role. Returns the turns
    (other keys of a turn kept, for templates that read them) and flags: bit ``i`` set when
    ``CHAT_READINGS[i]`` was taken, which the data report counts. ``roles``: ``chat_roles(tokenizer)``,
    which callers over many records find once.

    Raises:
        DataError: No turns, a turn without role and text, a role outside ``roles`` and the
            aliases, or a last turn that is not the assistant's.
    """
    needs = FORMAT_NEEDS["chat"]
    flags = 0
    messages = record.get("messages")
    # Records read from one file share their columns: a record without a field has it as None.
    if messages is None and record.get("conversations") is not None:
        messages, flags = record["conversations"], flags | _READING_BIT["conversations->messages"]
    if messages is None:
        raise DataError(f"record {index} has no 'messages' field (nor ShareGPT's 'conversations') ({needs})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"record {index} has an empty or non-list 'messages' field ({needs})")
    turns, written = [], []
    for turn, message in enumerate(messages):
        keys = ("role", "content")
        if isinstance(message, dict) and message.get("role") is None and message.get("from") is not None:
            keys, flags = ("from", "value"), flags | _READING_BIT["from/value->role/content"]
        if not isinstance(message, dict) or message.get(keys[0]) is None or keys[1] not in message:
            raise DataError(
                f"record {index} message {turn} is not a {{role, content}} mapping ({needs}); "
                "write each turn as {role, content} (or ShareGPT's {from, value})"
            )
        if not isinstance(message[keys[1]], str):
            raise DataError(f"record {index} message {turn} has no text in its {keys[1]!r} field ({needs})")
        role = message[keys[0]]
        alias_of = CHAT_ROLE_ALIASES.get(role) if isinstance(role, str) else None  # a number or a list is no role
        if alias_of:
            flags |= _READING_BIT[f"{role}->{alias_of}"]
        written.append(role)
        rest = {key: value for key, value in message.items() if key not in ("role", "content", "from", "value")}
        turns.append({**rest, "role": alias_of or role, "content": message[keys[1]]})
    if any(turn["role"] not in roles for turn in turns):
        found = [role for turn, role in enumerate(written) if role not in written[:turn]]  # each once, in the record's order
        raise DataError(
            f"record {index} has chat roles {found}; qlora-lite reads {', '.join(roles)} "
            f"(and {', '.join(CHAT_ROLE_ALIASES)} as their aliases): rename the others"
        )
    if turns[-1]["role"] != "assistant":
        raise DataError(
            f"record {index}: the last message has role {written[-1]!r}, but a record must end with the assistant's answer "
            f"({needs}); rename that turn to 'assistant' if it is the answer, else drop it"
        )
    return turns, flags


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
