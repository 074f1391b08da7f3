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
- ``preference`` (objectives dpo, orpo, simpo): fields ``prompt``, ``chosen``, ``rejected``, each a
  string or a conversation. One record becomes two sequences, prompt + chosen and prompt + rejected
  (``render_pair``), each with its answer learned; the example holds the first as ``input_ids`` and
  ``labels`` (so evaluation reads the chosen answer as the reference) and the second as
  ``rejected_input_ids`` and ``rejected_labels``. Conversations whose first turns are the same
  (UltraFeedback-binarized: chosen = [user, assistant]) take those turns as the prompt, as TRL's
  ``extract_prompt`` does.
- ``unpaired`` (objective kto): fields ``prompt``, ``completion`` (strings or conversations) and
  ``label`` (true: desirable; ``render_unpaired``); the example adds ``desirable`` (1 or 0).

A prompt and an answer that are both strings are written as they stand, as ``text`` writes its
text: ``[bos] + prompt (masked) + answer + eos (learned)``. Where either is a conversation, a string
prompt is one user turn and a string answer one assistant turn, and prompt + answer is rendered as
``chat`` renders it; only the answer's last assistant turn is learned.
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

PREFERENCE_FORMATS = ("preference", "unpaired")
"""Formats whose records hold answers to rank or label rather than one answer to imitate; never packed."""

TEMPLATED_FORMATS = ("chat", *PREFERENCE_FORMATS)
"""Formats whose records may hold conversations, rendered with the chat template."""

Segments = list[tuple[str, str | None]]
"""A record's consecutive ``(text, end)`` pieces: ``end`` None masks the text, else it is the special token closing a learned one."""


def render_example(record: dict, fmt: str, tokenizer: Any, index: int = 0, text_field: str = "text") -> tuple[str, str]:
    """Render one record as (prompt_text, response_text); the loss falls on the response only.

    Args:
        record: One raw record (a mapping of field name to value).
        fmt: A format of ``config.DATA_FORMATS``.
        tokenizer: The model's tokenizer; its EOS, and its chat template where the record holds a conversation.
        index: Position of the record in its file, quoted in errors.
        text_field: Field holding the text for format ``text``.

    Returns:
        ``(prompt, response)``. For ``chat`` the response is the final assistant turn as the
        template renders it, less the end-of-turn token that closes it (``tokenize_example``
        appends it as an id) and less trailing whitespace; the prompt is the template's rendering
        of the conversation before it with the generation prompt (``add_generation_prompt=True``).
        For ``text`` the prompt is empty. For ``preference`` the response is the chosen answer
        (``render_pair``), for ``unpaired`` the completion. The prompt holds BOS only where a chat
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
) -> Segments:
    """Split a record into consecutive ``(text, end)`` pieces.

    ``end`` is None for a masked piece; for a learned piece it is the special token that closes
    it (EOS, or a chat template's end-of-turn token), appended as an id by ``tokenize_example``.
    ``end_of_turn``: the chat end-of-turn token (``find_end_of_turn_token`` or EOS), when the caller
    has already found it once for many records; None finds it. ``messages``: the chat record's turns
    as ``read_chat_messages`` returns them, when the caller has already read them; None reads them.
    A ``preference`` record gives the pieces of prompt + chosen, an ``unpaired`` one those of
    prompt + completion; ``render_pair`` and ``render_unpaired`` give all they hold.
    """
    eos_token = getattr(tokenizer, "eos_token", None) or ""
    if fmt == "alpaca":
        return _render_alpaca(record, index, eos_token)
    if fmt == "chat":
        return _render_chat(record, tokenizer, index, end_of_turn, messages)
    if fmt == "text":
        return [("", None), (_require_text(record, text_field, fmt, index, text_field), eos_token)]
    if fmt == "preference":
        return render_pair(record, tokenizer, index, end_of_turn)[0]
    if fmt == "unpaired":
        return render_unpaired(record, tokenizer, index, end_of_turn)[0]
    raise DataError(f"unknown data format {fmt!r}; use one of {', '.join(FORMAT_NEEDS)}")


def _render_alpaca(record: dict, index: int, eos_token: str) -> Segments:
    instruction = _require_text(record, "instruction", "alpaca", index)
    output = _require_text(record, "output", "alpaca", index)
    context = _optional_text(record.get("input"))
    if context:
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=context)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=instruction)
    return [(prompt, None), (output, eos_token)]


def _render_chat(
    record: dict, tokenizer: Any, index: int, end_of_turn: str | None = None, messages: list[dict] | None = None, fmt: str = "chat"
) -> Segments:
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
            raise DataError(f"record {index} message {turn} has an empty 'content' field ({FORMAT_NEEDS[fmt]})")
        segments += [(before[len(consumed) :], None), (learned, end)]
        consumed = covered
    return segments


def render_pair(
    record: dict, tokenizer: Any, index: int = 0, end_of_turn: str | None = None, roles: tuple[str, ...] | None = None
) -> tuple[Segments, Segments, int]:
    """A ``preference`` record as the pieces of prompt + chosen and of prompt + rejected, and its chat reading flags.

    Each ends with the answer's final turn, learned with the token that ends it; all before it is
    the prompt, masked (``_render_answer``), the same pieces before either answer. The prompt is
    the ``prompt`` field, unless ``chosen`` and ``rejected`` are conversations that begin with the
    same turns: those turns are then the prompt (TRL's ``extract_prompt``) and a ``prompt`` field,
    which such data sets often repeat as a string, is not read, lest its turn be written twice.
    ``end_of_turn`` and ``roles``: as ``render_segments`` and ``read_chat_messages`` take them,
    found once by callers over many records; None finds them. The flags are those of
    ``read_chat_messages``, over the conversations read.

    Raises:
        DataError: A field missing or empty, an answer neither a string nor a conversation ending
            with an assistant turn, a bad turn; the message names the record and the field.
            Identical answers are refused where they are tokenized (``tokenize_records``).
    """
    needs = FORMAT_NEEDS["preference"]
    roles = roles or chat_roles(tokenizer)
    chosen, flags = _read_field(record, "chosen", index, roles, needs, answer=True)
    rejected, rejected_flags = _read_field(record, "rejected", index, roles, needs, answer=True)
    flags |= rejected_flags
    shared = _count_shared_turns(chosen, rejected)
    if shared:
        prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    else:
        prompt, prompt_flags = _read_field(record, "prompt", index, roles, needs, answer=False)
        flags |= prompt_flags
    # One conversation among the three makes both sequences conversations: a string answer beside a
    # conversation is an assistant turn, never the same words written without the template.
    as_chat = any(isinstance(value, list) for value in (prompt, chosen, rejected))
    return (
        _render_answer(prompt, chosen, as_chat, tokenizer, index, end_of_turn, "preference"),
        _render_answer(prompt, rejected, as_chat, tokenizer, index, end_of_turn, "preference"),
        flags,
    )


def render_unpaired(
    record: dict, tokenizer: Any, index: int = 0, end_of_turn: str | None = None, roles: tuple[str, ...] | None = None
) -> tuple[Segments, bool, int]:
    """An ``unpaired`` record as the pieces of prompt + completion (as ``render_pair`` builds each), its label, its chat reading flags.

    Raises:
        DataError: A field missing or empty, a completion neither a string nor a conversation
            ending with an assistant turn, a bad turn, a label other than true/false (or 1/0).
    """
    needs = FORMAT_NEEDS["unpaired"]
    roles = roles or chat_roles(tokenizer)
    prompt, flags = _read_field(record, "prompt", index, roles, needs, answer=False)
    completion, completion_flags = _read_field(record, "completion", index, roles, needs, answer=True)
    desirable = read_label(record.get("label"), index)
    as_chat = isinstance(prompt, list) or isinstance(completion, list)
    return _render_answer(prompt, completion, as_chat, tokenizer, index, end_of_turn, "unpaired"), desirable, flags | completion_flags


def read_label(value: Any, index: int = 0) -> bool:
    """An ``unpaired`` record's ``label``: True (desirable) or False; 1 and 0 are read as those.

    Raises:
        DataError: The label is missing or anything else (a string "true", 0.5, 2): guessing would
            train toward the answers it meant to train away from.
    """
    needs = FORMAT_NEEDS["unpaired"]
    if value is None:
        raise DataError(f"record {index} has no 'label' field ({needs})")
    # bool is an int too: True and 1 read alike, while 2 or 0.0 are refused.
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise DataError(f"record {index} has a 'label' of {value!r}, not true or false (nor 1 or 0) ({needs})")


def _read_field(record: dict, field: str, index: int, roles: tuple[str, ...], needs: str, answer: bool) -> tuple[str | list[dict], int]:
    """A prompt or answer field as its text or its turns (``_read_chat_turns``), and the turns' reading flags."""
    value = record.get(field)
    if value is None:  # records read from one file share their columns: a missing field is None
        raise DataError(f"record {index} has no {field!r} field ({needs})")
    if not isinstance(value, (str, list)):
        raise DataError(
            f"record {index} has a {field!r} field of type {type(value).__name__}, not a string or a conversation (a list of {{role, content}}) ({needs})"
        )
    if not value or (isinstance(value, str) and not value.strip()):
        raise DataError(f"record {index} has an empty {field!r} field ({needs})")
    if isinstance(value, str):
        return value, 0
    turns, flags = _read_chat_turns(value, f"record {index} {field!r}", roles, needs)
    if answer and turns[-1]["role"] != "assistant":
        raise DataError(
            f"record {index}: the last message of {field!r} has role {_written_role(value[-1])!r}, but an answer must end with "
            f"the assistant's turn ({needs}); rename that turn to 'assistant' if it is the answer"
        )
    if answer and not turns[-1]["content"].strip():
        raise DataError(f"record {index} has an empty {field!r} field: its last message has no text ({needs})")
    return turns, flags


def _count_shared_turns(chosen: str | list[dict], rejected: str | list[dict]) -> int:
    """How many leading turns two answer conversations share: their prompt (0 unless both are conversations).

    Each keeps its last turn whatever they share, so that an answer identical to the other is
    refused as such (``tokenize_records``) rather than as an empty one.
    """
    if not (isinstance(chosen, list) and isinstance(rejected, list)):
        return 0
    shared, most = 0, min(len(chosen), len(rejected)) - 1
    while shared < most and chosen[shared] == rejected[shared]:
        shared += 1
    return shared


def _render_answer(
    prompt: str | list[dict], answer: str | list[dict], as_chat: bool, tokenizer: Any, index: int, end_of_turn: str | None, fmt: str
) -> Segments:
    """The pieces of prompt + answer, the last of them the answer's final turn: the one piece learned.

    Strings (``as_chat`` False) are ``[(prompt, None), (answer, eos)]``, written as they stand (as
    format ``text`` writes its text). Otherwise a string prompt is one user turn, a string answer one
    assistant turn, and the conversation is cut as ``chat`` cuts it (``_render_chat``), so its tokens are
    those chat trains on, piece by piece. An assistant turn before the last is the prompt's:
    ``tokenize_records`` masks every learned piece but the last of these formats (``PREFERENCE_FORMATS``),
    where ``render_example`` writes them into the prompt's text.
    """
    if not as_chat:
        return [(prompt, None), (answer, getattr(tokenizer, "eos_token", None) or "")]
    messages = _as_turns(prompt, "user") + _as_turns(answer, "assistant")
    # Not merged into one masked text: tokenized whole, it can give other ids than chat's pieces
    # (a Metaspace tokenizer writes a word mark at the start of each piece), and a pair must hold
    # the tokens SFT on the same conversation trained.
    return _render_chat({}, tokenizer, index, end_of_turn, messages, fmt)


def _as_turns(value: str | list[dict], role: str) -> list[dict]:
    return value if isinstance(value, list) else [{"role": role, "content": value}]


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
    turns, read_as = _read_chat_turns(messages, f"record {index}", roles, needs)
    if turns[-1]["role"] != "assistant":
        raise DataError(
            f"record {index}: the last message has role {_written_role(messages[-1])!r}, but a record must end with the assistant's answer "
            f"({needs}); rename that turn to 'assistant' if it is the answer, else drop it"
        )
    return turns, flags | read_as


def _read_chat_turns(messages: list, where: str, roles: tuple[str, ...], needs: str) -> tuple[list[dict], int]:
    """A non-empty list of turns as ``{role, content}`` with the roles the template knows, and what was read otherwise.

    ``read_chat_messages`` without finding the list in a record, nor asking which role comes last:
    the chat record's ``messages`` and a preference record's conversations read alike. ``where``
    begins each error (``record 7``, ``record 7 'chosen'``); ``needs`` ends it (``FORMAT_NEEDS``).
    Flags as ``read_chat_messages`` returns them.

    Raises:
        DataError: A turn without role and text, or a role outside ``roles`` and the aliases.
    """
    flags = 0
    turns, written = [], []
    for turn, message in enumerate(messages):
        keys = ("role", "content")
        if isinstance(message, dict) and message.get("role") is None and message.get("from") is not None:
            keys, flags = ("from", "value"), flags | _READING_BIT["from/value->role/content"]
        if not isinstance(message, dict) or message.get(keys[0]) is None or keys[1] not in message:
            raise DataError(
                f"{where} message {turn} is not a {{role, content}} mapping ({needs}); "
                "write each turn as {role, content} (or ShareGPT's {from, value})"
            )
        if not isinstance(message[keys[1]], str):
            raise DataError(f"{where} message {turn} has no text in its {keys[1]!r} field ({needs})")
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
            f"{where} has chat roles {found}; qlora-lite reads {', '.join(roles)} "
            f"(and {', '.join(CHAT_ROLE_ALIASES)} as their aliases): rename the others"
        )
    return turns, flags


def _written_role(message: dict) -> Any:
    # The role as the record wrote it (_read_chat_turns has accepted the turn): ShareGPT's `from` where `role` is absent.
    return message["role"] if message.get("role") is not None else message["from"]


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
