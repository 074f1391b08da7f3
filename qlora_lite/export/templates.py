"""The chat template an export writes, and the same template as Ollama's TEMPLATE.

`find_prompt_layout` decides what goes into a GGUF: the chat template the adapter was trained with
(the alpaca layout for an alpaca adapter, the tokenizer's template for a chat one, a plain
concatenation for text) and the stop tokens (EOS, and the template's end of turn when it closes
turns with another token: Llama-3 `<|eot_id|>`, ChatML `<|im_end|>`). `build_modelfile` writes an
Ollama Modelfile whose Go TEMPLATE renders every conversation as the Jinja template does.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from jinja2 import TemplateError
from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template

from ..data.formats import ALPACA_PROMPT_NO_INPUT, DEFAULT_CHAT_TEMPLATE, find_end_of_turn_token
from ..errors import GenerationError, GGUFError
from ..generate import resolve_prompt_format
from ..methods.folder import read_prompt_info

TEXT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
"""The chat template of a text-format adapter: the prompt continued as it stands, as training saw it."""


@dataclass
class PromptLayout:
    """How the exported model is prompted: the chat template written into the GGUF, and where turns end."""

    data_format: str  # alpaca, chat or text: how the adapter was trained (or --format)
    chat_template: str
    eos_token: str
    eos_id: int
    end_of_turn: str  # the token an answer ends with (EOS unless the chat template closes turns with another)
    end_of_turn_id: int


def find_prompt_layout(source: Path, tokenizer_dirs: list[Path], prompt_format: str) -> PromptLayout:
    """The chat template and end-of-turn token of the exported model, as the adapter was trained.

    alpaca: a template rendering a user message in the Alpaca no-input layout and an answer
    followed by EOS (what training learned). chat: the tokenizer's template, or the default one
    training used when it had none. text: the messages' text as it stands.
    """
    tokenizer = load_tokenizer_from(tokenizer_dirs)
    if tokenizer.eos_token_id is None:
        raise GGUFError(f"the tokenizer in {tokenizer_dirs[0]} has no EOS token, so no server could tell where an answer ends; set eos_token")
    try:
        data_format = resolve_prompt_format(prompt_format, read_prompt_info(source).get("data_format"), tokenizer)
    except GenerationError as err:
        raise GGUFError(str(err).replace("prompt format", "--format")) from err
    if data_format == "alpaca":
        template = build_alpaca_template()
    elif data_format == "chat":
        template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    else:
        template = TEXT_TEMPLATE
    tokenizer.chat_template = template
    end = find_end_of_turn_token(tokenizer) if data_format == "chat" else None
    end = end or tokenizer.eos_token
    return PromptLayout(data_format, template, tokenizer.eos_token, tokenizer.eos_token_id, end, tokenizer.convert_tokens_to_ids(end))


def load_tokenizer_from(folders: list[Path]):
    for folder in folders:
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return AutoTokenizer.from_pretrained(str(folder))
    raise GGUFError(f"no tokenizer in {' or '.join(map(str, folders))}; copy the base model's tokenizer files into {folders[0]}")


def build_alpaca_template() -> str:
    """A chat template that renders a user message as training's Alpaca prompt (no input) and an answer + EOS."""
    before, after = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    # Literal text between tags, never right after a block tag: transformers renders with trim_blocks.
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}" + before + "{{ message['content'] }}" + after
        + "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    )


# ---------------------------------------------------------------------------------------------
# Ollama
# ---------------------------------------------------------------------------------------------


# Message texts that no template writes, to find where each role's content goes in a rendering.
MARKERS = {"system": "QLORAxSYSTEMx1", "user": "QLORAxUSERx1", "assistant": "QLORAxASSISTANTx1", "user2": "QLORAxUSERx2"}


@dataclass
class TurnPieces:
    """A chat template as Ollama's TEMPLATE can say it: text before all messages, around each role's content, the generation prompt."""

    head: str
    around: dict[str, tuple[str, str]]  # role -> (before content, after content)
    generation: str  # after the last message when it is not the assistant's
    default_system: str | None  # what the template says when no system message is given


def build_modelfile(gguf_name: str, layout: PromptLayout, base: str | None = None) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, TEMPLATE (Go) equal to the chat template, stop parameters, SYSTEM.

    With base (a GGUF LoRA's: the original file's absolute path, or the Ollama model it came from, by name): FROM base
    and ADAPTER the GGUF beside it. The TEMPLATE is written all the same: the adapter learned its own layout (alpaca,
    say), which need not be the template the base model carries.

    The Go template walks .Messages and writes each role's pieces, which are read off the Jinja
    template by rendering conversations of marker strings; the result is checked by rendering
    several conversations both ways. A template that is not a message-by-message
    concatenation (one that rewrites earlier turns) cannot be written so and is refused.
    """
    pieces = split_template(layout)
    lines = [
        f"# Written by qlora-lite export-gguf. Create the model with: ollama create NAME -f {Path(gguf_name).with_suffix('.Modelfile')}",
        *([f"FROM ./{gguf_name}"] if base is None else [f"FROM {base}", f"ADAPTER ./{gguf_name}"]),
        f'TEMPLATE """{build_go_template(pieces)}"""',
    ]
    if pieces.default_system:
        lines.append(f'SYSTEM """{pieces.default_system}"""')
    for token in dict.fromkeys([layout.end_of_turn, layout.eos_token]):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    text = "\n".join(lines) + "\n"
    if text.count('"""') != 2 * (2 if pieces.default_system else 1):
        raise GGUFError('--ollama: the chat template contains """, which a Modelfile cannot quote; write its TEMPLATE by hand')
    return text


def split_template(layout: PromptLayout) -> TurnPieces:
    try:
        return _split_template(layout)
    except (ValueError, TemplateError) as err:
        raise GGUFError(
            f"--ollama: the {layout.data_format} chat template cannot be written as an Ollama TEMPLATE ({err}); drop --ollama "
            "(the GGUF carries the template for llama.cpp and LM Studio) or write the Modelfile's TEMPLATE by hand"
        ) from err


def _split_template(layout: PromptLayout) -> TurnPieces:
    """Read the pieces off renderings of marker conversations (the model: head, then per message
    before + content + after, then the generation prompt), then check them on longer conversations."""
    system, user, assistant, user2 = (MARKERS[k] for k in ("system", "user", "assistant", "user2"))

    def render(conversation: list[tuple[str, str]], generation: bool) -> str:
        return render_template(layout, [{"role": r, "content": c} for r, c in conversation], generation)

    def cut(text: str, marker: str) -> tuple[str, str]:
        if text.count(marker) != 1:
            raise ValueError(f"a message's text appears {text.count(marker)} times in its rendering")
        before, _, after = text.partition(marker)
        return before, after

    asked = render([("user", user)], True)  # head + user_before + U + user_after + generation
    opening, closing = cut(asked, user)
    answered = render([("user", user), ("assistant", assistant)], False)  # ... U + user_after + assistant_before + A + assistant_after
    if not answered.startswith(opening + user):
        raise ValueError("the first user message renders differently once it is answered")
    between, assistant_after = cut(answered[len(opening + user) :], assistant)
    followed = render([("user", user), ("assistant", assistant), ("user", user2)], True)
    if not followed.startswith(answered):
        raise ValueError("an answer renders differently once another message follows it")
    user_before, rest = cut(followed[len(answered) :], user2)
    if rest != closing or not opening.endswith(user_before):
        raise ValueError("a later user message is laid out differently from the first")
    # Seen so far: user_after + generation (closing) and user_after + assistant_before (between).
    # Two user messages in a row show user_after + user_before; templates that refuse them get the
    # common start of the two, which renders every alternating conversation the same.
    user_after = os.path.commonprefix([closing, between])
    try:
        twice = render([("user", user), ("user", user2)], True)
        joint = twice[len(opening + user) : twice.index(user2)] if twice.startswith(opening + user) and user2 in twice else ""
        if joint.endswith(user_before) and closing.startswith(joint[: len(joint) - len(user_before)]):
            candidate = joint[: len(joint) - len(user_before)]
            if between.startswith(candidate):
                user_after = candidate
    except TemplateError:
        pass
    generation, assistant_before = closing[len(user_after) :], between[len(user_after) :]
    head = opening[: len(opening) - len(user_before)]
    around = {"user": (user_before, user_after), "assistant": (assistant_before, assistant_after)}
    default_system = None
    try:
        with_system = render([("system", system), ("user", user)], True)
    except TemplateError:  # templates that refuse a system role (raise_exception) simply have none
        with_system = ""
    if system in with_system:
        system_before, system_rest = cut(with_system, system)
        system_after = system_rest[: system_rest.index(user)]
        if not system_after.endswith(user_before):
            raise ValueError("the first user message is introduced differently after a system message")
        system_after = system_after[: len(system_after) - len(user_before)]
        start = len(os.path.commonprefix([asked, with_system]))
        stop = len(os.path.commonprefix([asked[::-1], with_system[::-1]]))
        if with_system[start : len(with_system) - stop] == system and asked.startswith(system_before):
            # The template writes a default system message when none is given (Qwen2.5): Ollama's SYSTEM line.
            default_system = asked[start : len(asked) - stop]
            head = ""
        elif not system_before.startswith(head):
            raise ValueError("a system message changes the text before the first message")
        around["system"] = (system_before[len(head) :], system_after)
    pieces = TurnPieces(head, around, generation, default_system)
    conversations = [
        [("user", user)],
        [("user", user), ("assistant", assistant)],
        [("user", user), ("assistant", assistant), ("user", user2)],
    ]
    if "system" in around:
        conversations.append([("system", system), ("user", user), ("assistant", assistant), ("user", user2)])
    for conversation in conversations:
        generation_prompt = conversation[-1][0] != "assistant"
        if render_pieces(pieces, conversation) != render(conversation, generation_prompt):
            raise ValueError(f"it renders a {len(conversation)}-message conversation differently from message by message")
    return pieces


def render_template(layout: PromptLayout, messages: list[dict[str, str]], generation: bool) -> str:
    """The chat template rendered as transformers renders it (Jinja, trim_blocks, eos_token and bos_token set)."""
    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=layout.chat_template, add_generation_prompt=generation,
        eos_token=layout.eos_token, bos_token="",
    )  # fmt: skip
    return rendered[0]


def render_pieces(pieces: TurnPieces, conversation: list[tuple[str, str]]) -> str:
    """What the Go template of build_go_template renders for a conversation (Ollama puts SYSTEM first when none is given)."""
    if pieces.default_system is not None and conversation[0][0] != "system":
        conversation = [("system", pieces.default_system), *conversation]
    text = pieces.head
    for role, content in conversation:
        before, after = pieces.around[role]
        text += before + content + after
    return text + (pieces.generation if conversation[-1][0] != "assistant" else "")


def build_go_template(pieces: TurnPieces) -> str:
    """Ollama's Go template for the pieces: .Messages in order, the generation prompt after the last non-assistant one."""
    branches = []
    for index, role in enumerate(role for role in ("system", "user", "assistant") if role in pieces.around):
        before, after = pieces.around[role]
        keyword = "if" if index == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{go_literal(before)}{{{{ .Content }}}}{go_literal(after)}')
    loop, generation = "{{ range .Messages }}", ""
    if pieces.generation:  # Ollama's own templates find the last message this way
        loop = "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        generation = f'{{{{ if and $last (ne .Role "assistant") }}}}{go_literal(pieces.generation)}{{{{ end }}}}'
    return go_literal(pieces.head) + loop + "".join(branches) + "{{ end }}" + generation + "{{ end }}"


def go_literal(text: str) -> str:
    """Text for a Go template: literal, except the action delimiters."""
    return text.replace("{{", '{{ "{{" }}')
