"""Generating text with a trained adapter, and one base model in memory serving several adapters.

The prompt is turned into exactly the token ids training put before a response: the
record is built in the adapter's data format with a placeholder answer and tokenized by
``data.tokenizing.tokenize_example``, and the ids before the first learned label are the prompt. So
BOS, the Alpaca template and the chat template's generation prompt come out as in training,
by construction rather than by a second copy of the rules.

``AdapterSwitcher`` keeps one base model (4-bit or not) and any number of adapters whose
weights were read once, at ``add``: LoRA adapters and soft prompts (PEFT PROMPT_TUNING).
Switching removes the current LoRA wrappers and attaches the chosen adapter's in-memory
weights, or puts the chosen soft prompt in front of the base; the base is never reloaded, so
switching costs a copy of the adapter's tensors, not a model load.

Training writes ``qlora_lite.json`` beside the adapter, ``{"data_format": "alpaca"}``, so
that ``--format auto`` prompts the way the adapter was trained. PEFT ignores the file.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch
from torch import nn

from .config import DATA_FORMATS, OBJECTIVES, ModelConfig, QuantConfig
from .data.formats import IGNORE_INDEX, find_end_of_turn_id
from .data.tokenizing import tokenize_example
from .errors import AdapterError, DataError, GenerationError
from .methods.folder import find_base_model, read_prompt_info
from .methods.method import Method
from .methods.table import TABLE, find_method_of_config, find_saved_method
from .quant import load_base_model, load_tokenizer

PROMPT_FORMATS = ("auto", *OBJECTIVES["sft"].formats)  # the single-answer formats; preference data has no one prompt layout
BASE_NAME = "base"
"""The name that routes a prompt to the base model with no adapter."""
NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
ROUTED_PROMPT = re.compile(rf"^\s*(?P<name>{NAME_PATTERN})\s*:\s?(?P<prompt>.*)$", re.DOTALL)
# The answer that stands in for the real one when training's tokenizer builds the prompt ids;
# only the ids before it are used, and no template renders the prompt differently for it.
PLACEHOLDER_ANSWER = "x"
NO_LENGTH_LIMIT = sys.maxsize


@dataclass
class GenerationSettings:
    """How to pick each new token.

    Temperature 0 (the default) is greedy decoding: the same prompt always gets the same
    answer, so two adapters (or an adapter and its base) can be compared answer for answer.
    """

    max_new_tokens: int = 256
    """Stop after this many new tokens if EOS has not come first."""
    temperature: float = 0.0
    """0: greedy; > 0: sample from the softmax of logits / temperature."""
    top_p: float = 1.0
    """When sampling, draw only from the smallest set of tokens whose probabilities sum to top_p."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise GenerationError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise GenerationError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"--top-p must be in (0, 1], got {self.top_p}")


@dataclass
class LoadedAdapter:
    """An adapter read into memory, ready to attach to the base in a switch."""

    path: Path
    cfg: Any  # the method's settings (LoRAConfig, PromptConfig, ...), as read from the folder
    weights: dict[str, torch.Tensor]  # module path -> tensor (a soft prompt: PROMPT_KEY -> (n, H)), on the model's device
    data_format: str | None  # from qlora_lite.json; None for adapters trained elsewhere
    method: Method  # its entry in the table of methods: how the switcher applies and removes it


# ---------------------------------------------------------------------------------------------
# Prompt format: how training rendered prompts
# ---------------------------------------------------------------------------------------------


def resolve_prompt_format(fmt: str, trained_format: str | None, tokenizer: Any) -> str:
    """The format to render a prompt in: the one asked for, else training's, else the tokenizer's habit.

    Without a record of training (a PEFT adapter made elsewhere, or the plain base) a tokenizer
    with a chat template is a chat model, and any other takes raw text.
    """
    if fmt not in PROMPT_FORMATS:
        raise GenerationError(f"unknown prompt format {fmt!r}; use one of {', '.join(PROMPT_FORMATS)}")
    if fmt != "auto":
        return fmt
    if trained_format in PROMPT_FORMATS:
        return trained_format
    # No record, or preference data (prompts as written or as conversations): the tokenizer's habit.
    return "chat" if getattr(tokenizer, "chat_template", None) else "text"


def build_prompt_ids(prompt: str, fmt: str, tokenizer: Any, input_text: str = "", system: str = "") -> list[int]:
    """The token ids training put before the response, for this prompt in format alpaca, chat or text.

    alpaca: BOS (if the tokenizer adds one) + the Alpaca no-input template around the prompt.
    chat: the chat template (the tokenizer's, else ``DEFAULT_CHAT_TEMPLATE``) of one user turn,
    after a system turn when system is given (it replaces a template's default system prompt),
    with the generation prompt. text: BOS (if added) + the prompt, continued as it stands.

    Raises:
        GenerationError: The prompt is empty, input_text or system do not belong to the format,
            or the chat template cannot render it.
    """
    if not prompt.strip():
        raise GenerationError("the prompt is empty; pass some text to answer")
    check_prompt_options(fmt, input_text, system)
    try:
        if fmt == "text":
            # Training learns every token of a text record: the prompt is that record less its closing EOS.
            return tokenize_example({"text": prompt}, "text", tokenizer, NO_LENGTH_LIMIT)["input_ids"][:-1]
        example = tokenize_example(build_prompt_record(prompt, fmt, input_text, system), fmt, tokenizer, NO_LENGTH_LIMIT)
    except DataError as err:
        raise GenerationError(f"cannot format the prompt as {fmt}: {err}") from err
    start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    return example["input_ids"][:start]


def check_prompt_options(fmt: str, input_text: str = "", system: str = "") -> None:
    """Refuse a prompt option the format has no place for: --input is alpaca's, --system chat's."""
    if input_text and fmt != "alpaca":
        raise GenerationError(f"--input is the alpaca format's input field, but prompts are formatted as {fmt}; drop --input or pass --format alpaca")
    if system and fmt != "chat":
        raise GenerationError(f"--system is the chat format's system message, but prompts are formatted as {fmt}; drop --system or pass --format chat")


def build_prompt_record(prompt: str, fmt: str, input_text: str = "", system: str = "") -> dict[str, Any]:
    """A training record in format alpaca or chat whose prompt is this text and whose answer is a placeholder.

    input_text fills alpaca's optional input field (the template with "### Input:"); system opens a
    chat with a system message.
    """
    if fmt == "alpaca":
        return {"instruction": prompt, "input": input_text, "output": PLACEHOLDER_ANSWER}
    if fmt == "chat":
        opening = [{"role": "system", "content": system}] if system else []
        return {"messages": [*opening, {"role": "user", "content": prompt}, {"role": "assistant", "content": PLACEHOLDER_ANSWER}]}
    raise GenerationError(f"unknown prompt format {fmt!r}; use one of {', '.join(DATA_FORMATS)}")


# ---------------------------------------------------------------------------------------------
# Generating
# ---------------------------------------------------------------------------------------------


def build_generate_kwargs(
    settings: GenerationSettings, tokenizer: Any, model: nn.Module, stop_ids: list[int] | None = None
) -> dict[str, Any]:
    """Arguments for ``model.generate``: greedy or sampling, the KV cache on, stop at EOS or the end of a chat turn.

    stop_ids: collect_eos_ids(tokenizer, model), when the caller has them already (it renders the
    chat template, so a caller answering many prompts or cutting the answer after computes them once).
    """
    kwargs: dict[str, Any] = {
        "max_new_tokens": settings.max_new_tokens,
        "use_cache": True,  # load_base_model turns the cache off for training; decoding needs it
        "eos_token_id": collect_eos_ids(tokenizer, model) if stop_ids is None else stop_ids,
        "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    }
    if settings.temperature == 0:
        kwargs["do_sample"] = False
    else:
        # top_k=0: transformers would otherwise also cut to its default top 50; top_p alone decides.
        kwargs.update(do_sample=True, temperature=settings.temperature, top_p=settings.top_p, top_k=0)
    return kwargs


def collect_eos_ids(tokenizer: Any, model: nn.Module) -> list[int]:
    """The ids an answer ends with: the tokenizer's EOS, the chat template's end of turn, any the model's generation config adds.

    Training ends a chat answer with the token the template writes after an assistant turn
    (Llama-3 ``<|eot_id|>``, ChatML ``<|im_end|>``), which on a base tokenizer is not its EOS
    (``<|end_of_text|>``, ``<|endoftext|>``); other answers end with EOS.
    """
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    candidates = [tokenizer.eos_token_id, find_end_of_turn_id(tokenizer), *(configured if isinstance(configured, list) else [configured])]
    return list(dict.fromkeys(i for i in candidates if i is not None))


def cut_at_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """The answer's ids before the first token it stops at (collect_eos_ids), that token left out."""
    return next((ids[:i] for i, token in enumerate(ids) if token in stop_ids), ids)


@torch.no_grad()
def generate_ids(
    model: nn.Module, tokenizer: Any, prompt_ids: list[int], settings: GenerationSettings, stream: bool = False, stop_ids: list[int] | None = None
) -> list[int]:
    """The new token ids answering the prompt ids (EOS included when it came); with stream, also printed as they come.

    stop_ids: as build_generate_kwargs takes them (computed here when None).
    """
    from transformers import TextStreamer

    input_ids = torch.tensor([prompt_ids], device=model.device)  # (1, T)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    output = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        streamer=streamer,
        **build_generate_kwargs(settings, tokenizer, model, stop_ids),
    )  # (1, T + new)
    return output[0, input_ids.shape[1] :].tolist()


def generate_answer(model: nn.Module, tokenizer: Any, prompt_ids: list[int], settings: GenerationSettings, stream: bool = False) -> str:
    """The answer's text (no prompt, no special tokens); with stream, printed to stdout token by token as well."""
    stop_ids = collect_eos_ids(tokenizer, model)  # once: generation stops at them and the answer is cut at them
    answer_ids = cut_at_stop(generate_ids(model, tokenizer, prompt_ids, settings, stream, stop_ids), stop_ids)
    return tokenizer.decode(answer_ids, skip_special_tokens=True)


# ---------------------------------------------------------------------------------------------
# One base, several adapters
# ---------------------------------------------------------------------------------------------


class AdapterSwitcher:
    """One base model in memory and several adapters (LoRA or soft prompts) by name; each request picks one (or none).

    ``model`` is the base (with the active LoRA attached, if any); ``active_model`` is what
    answers: the base itself, or a ``SoftPromptModel`` around it when a soft prompt is active.

    Example:
        switcher = AdapterSwitcher.from_base("models/llama")
        switcher.add("math", "runs/math/adapter")
        switcher.add("sql", "runs/sql-prompt/adapter")  # a soft prompt (method prompt_tuning)
        switcher.generate("What is 7 * 6?", adapter="math")
        switcher.generate("List the tables.", adapter="sql")
        switcher.generate("Hello", adapter=None)  # the plain base
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        """Wrap a loaded base model (from ``load_base_model``, with no LoRA attached) and its tokenizer."""
        self.model = model.eval()
        # load_base_model turns the KV cache off for training; generation reuses past keys and values.
        self.model.config.use_cache = True
        self.tokenizer = tokenizer
        self.adapters: dict[str, LoadedAdapter] = {}
        self.active: str | None = None
        self.active_model: nn.Module = self.model
        self.replaced: dict[str, torch.Tensor] = {}  # base tensors an active selective adapter overwrote

    @classmethod
    def from_base(
        cls,
        base_path: str,
        load_in_4bit: bool = True,
        compute_dtype: str = "auto",
        tokenizer_path: str | Path | None = None,
        device: torch.device | None = None,
        skip_modules: list[str] | None = None,
    ) -> AdapterSwitcher:
        """Load the base (NF4 by default) and the tokenizer (from tokenizer_path, else the base's folder).

        skip_modules: linear layers to keep out of NF4, as selective adapters that trained them need.
        """
        model_cfg = ModelConfig(name_or_path=str(base_path))
        tokenizer = load_tokenizer(model_cfg, str(tokenizer_path or base_path))
        quant = QuantConfig(load_in_4bit=load_in_4bit, compute_dtype=compute_dtype)
        model = load_base_model(model_cfg, quant, device, str(base_path), skip_modules=skip_modules)
        return cls(model, tokenizer)

    @property
    def names(self) -> list[str]:
        """Names of the adapters added, in the order they were added."""
        return list(self.adapters)

    def add(self, name: str, adapter_dir: str | Path, allow_pickle: bool = False) -> None:
        """Read an adapter (LoRA or PROMPT_TUNING soft prompt) into memory under a name, after checking it fits this base.

        Raises:
            GenerationError: The name is taken, reserved or not a plain word.
            AdapterError: The folder is missing, corrupt, or the adapter was made for another base.
        """
        check_adapter_name(name, self.names)
        adapter_dir = require_adapter_dir(adapter_dir)
        device = next(self.model.parameters()).device
        active = self.active
        self.use(None)  # fit checks run against the plain base
        try:  # a wrong adapter fails now, not at its first request
            method = find_saved_method(adapter_dir)
            cfg, weights = method.read(adapter_dir, allow_pickle)
            weights = {key: tensor.to(device) for key, tensor in weights.items()}
            method.check_fits(self.model, cfg, weights)
        except AdapterError as err:
            raise AdapterError(f"adapter {name!r} ({adapter_dir}): {err}") from err
        finally:
            self.use(active)
        data_format = read_prompt_info(adapter_dir).get("data_format")
        self.adapters[name] = LoadedAdapter(adapter_dir, cfg, weights, data_format, method)

    def use(self, name: str | None) -> None:
        """Make the named adapter active (None: the plain base). The base itself is never reloaded."""
        if name == self.active:
            return
        adapter = self.get(name) if name is not None else None
        self.detach_all()
        if adapter is not None:
            if adapter.method.replaces_base_tensors:
                # The adapter overwrites base tensors: keep the originals to put back on the next switch.
                params = dict(self.model.named_parameters())
                self.replaced = {key: params[key].detach().clone() for key in adapter.weights}
            self.active_model = adapter.method.apply(self.model, adapter.cfg, adapter.weights)
        self.active = name
        self.active_model.eval()

    def detach_all(self) -> None:
        """Back to the plain base: every method's layers removed, selectively replaced tensors restored."""
        for method in TABLE:
            method.remove(self.model)
        if self.replaced:
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for key, original in self.replaced.items():
                    params[key].copy_(original)
            self.replaced = {}
        self.active, self.active_model = None, self.model

    def get(self, name: str) -> LoadedAdapter:
        """The added adapter of that name; an unknown name is an error that lists the known ones."""
        if name not in self.adapters:
            raise GenerationError(f"no adapter named {name!r}; added adapters: {format_names(self.names)}")
        return self.adapters[name]

    def prompt_format(self, adapter: str | None, fmt: str = "auto") -> str:
        """The format prompts to this adapter (None: the base) are rendered in; see resolve_prompt_format."""
        trained_format = self.get(adapter).data_format if adapter is not None else None
        return resolve_prompt_format(fmt, trained_format, self.tokenizer)

    def generate(
        self,
        prompt: str,
        *,
        adapter: str | None,
        settings: GenerationSettings | None = None,
        fmt: str = "auto",
        stream: bool = False,
        input_text: str = "",
        system: str = "",
    ) -> str:
        """Answer a prompt with the named adapter (None: the plain base), formatted as it was trained.

        Args:
            prompt: The user's text (an instruction, a chat message, or text to continue).
            adapter: Name given to ``add``, or None for the base model alone.
            settings: Decoding settings; greedy with 256 new tokens when None.
            fmt: ``auto`` (the adapter's training format), ``chat``, ``alpaca`` or ``text``.
            stream: Also print the answer to stdout as it is generated.
            input_text: The alpaca format's input field (the text the instruction is about).
            system: The chat format's system message (replaces the template's default one, if any).

        Returns:
            The answer's text.
        """
        prompt_ids = self.prompt_ids(prompt, adapter=adapter, fmt=fmt, input_text=input_text, system=system)
        return self.answer_ids(prompt_ids, adapter=adapter, settings=settings, stream=stream)

    def prompt_ids(self, prompt: str, *, adapter: str | None, fmt: str = "auto", input_text: str = "", system: str = "") -> list[int]:
        """The prompt's token ids as this adapter (None: the base) was trained on them; nothing is generated.

        Raises:
            GenerationError: The adapter is unknown, the prompt is empty, or input_text / system
                have no place in the adapter's prompt format (see build_prompt_ids).
        """
        return build_prompt_ids(prompt, self.prompt_format(adapter, fmt), self.tokenizer, input_text, system)

    def answer_ids(self, prompt_ids: list[int], *, adapter: str | None, settings: GenerationSettings | None = None, stream: bool = False) -> str:
        """The named adapter's (None: the base's) answer to prompt ids from ``prompt_ids``."""
        self.use(adapter)
        return generate_answer(self.active_model, self.tokenizer, prompt_ids, settings or GenerationSettings(), stream)


def check_adapter_name(name: str, taken: list[str]) -> None:
    """Refuse a name that routing could not address: reserved, taken, or not a plain word."""
    if name == BASE_NAME:
        raise GenerationError(f"adapter name {BASE_NAME!r} is reserved for the plain base model; choose another name")
    if not re.fullmatch(NAME_PATTERN, name):
        raise GenerationError(f"adapter name {name!r} must be letters, digits, '_', '.' or '-' (e.g. math, sql-v2)")
    if name in taken:
        raise GenerationError(f"adapter name {name!r} is given twice; give each adapter its own name")


def read_any_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    """adapter_config.json of any adapter kind, checked by the reader of its kind where it has one."""
    return find_saved_method(adapter_dir).read_config(adapter_dir)


def require_adapter_dir(adapter_dir: str | Path) -> Path:
    """The folder as a Path, after checking it exists (the adapter loader then checks its files)."""
    adapter_dir = Path(adapter_dir).expanduser()
    if not adapter_dir.is_dir():
        raise AdapterError(f"adapter folder {adapter_dir} does not exist; pass the folder training wrote, e.g. runs/NAME/adapter")
    return adapter_dir


def format_names(names: Iterable[str]) -> str:
    return ", ".join([*names, BASE_NAME])


# ---------------------------------------------------------------------------------------------
# What the command line needs: open, route, read, answer
# ---------------------------------------------------------------------------------------------


def open_switcher(
    adapters: dict[str, str | Path],
    base: str | None = None,
    load_in_4bit: bool = True,
    allow_pickle: bool = False,
) -> AdapterSwitcher:
    """Load the base once and add each named adapter.

    The base is ``base`` if given, else the first adapter's ``base_model_name_or_path``. The
    tokenizer comes from the adapter's folder when exactly one adapter is given and training
    saved the tokenizer there, else from the base.

    Raises:
        GenerationError: Neither an adapter nor a base is given.
        AdapterError: An adapter folder is missing, corrupt or made for another base, or the base
            (--base, else the first adapter's) is neither a folder here nor on the hub.
    """
    collect_named_adapters(adapters.items())  # names are checked before anything slow
    folders = {name: require_adapter_dir(path) for name, path in adapters.items()}
    configs = {name: read_any_adapter_config(folder) for name, folder in folders.items()}  # fail before the slow base load
    if not folders and not base:
        raise GenerationError("nothing to load: pass an adapter folder, or --base PATH (with --adapter NAME=DIR to add adapters)")
    # --base is checked as the recorded base is: a folder here, or a model the hub has
    base_path = find_base_model(next(iter(folders.values())), next(iter(configs.values())), base) if folders else base
    only = next(iter(folders.values())) if len(folders) == 1 else None
    tokenizer_path = only if only is not None and (only / "tokenizer_config.json").is_file() else None
    # Layers a selective adapter trained unquantized must be loaded unquantized for it to replace them.
    unquantized = sorted({m for raw in configs.values() for m in find_method_of_config(raw).saved_unquantized_modules(raw)})
    switcher = AdapterSwitcher.from_base(base_path, load_in_4bit=load_in_4bit, tokenizer_path=tokenizer_path, skip_modules=unquantized or None)
    for name, folder in folders.items():
        switcher.add(name, folder, allow_pickle=allow_pickle)
    return switcher


def collect_named_adapters(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``--adapter NAME=DIR`` pairs as a dict, refusing a reserved, malformed or repeated name."""
    named: dict[str, str] = {}
    for name, folder in pairs:
        check_adapter_name(name, list(named))
        named[name] = folder
    return named


def route_prompt(line: str, names: list[str]) -> tuple[str | None, str]:
    """Split ``NAME: prompt`` into (adapter name or None for ``base``, prompt).

    With a single adapter, a line that does not start like a prefix goes to it whole. A line that
    does (a word and a colon, ``dmo: hello``) but names no adapter is refused, however many are
    loaded: it is far more likely a mistyped name than a prompt, and sending it on would answer
    the wrong question silently. A prompt that really starts that way is written ``NAME: Note: ...``.

    Raises:
        GenerationError: The line starts with a word and a colon that names no adapter, or several
            adapters are loaded and the line names none of them.
    """
    match = ROUTED_PROMPT.match(line)
    shown = shorten(line)
    if match:
        name = match.group("name")
        if name in (*names, BASE_NAME):
            return (None if name == BASE_NAME else name), match.group("prompt")
        fix = f"'{names[0]}: '" if len(names) == 1 else f"its adapter's name, e.g. '{(names or [BASE_NAME])[0]}: '"
        raise GenerationError(
            f"prompt {shown!r} starts with '{name}:', which names no adapter; known: {format_names(names)} "
            f"(a prompt that really starts with a word and a colon: prefix it with {fix})"
        )
    if len(names) == 1:
        return names[0], line
    raise GenerationError(
        f"prompt {shown!r} names no adapter; start each line with one of {format_names(names)} and a colon, "
        f"e.g. '{BASE_NAME}: {shown}'"
    )


def shorten(line: str) -> str:
    """A prompt as an error message quotes it: at most 60 characters."""
    return line if len(line) <= 60 else line[:57] + "..."


def read_prompt_lines(stream: TextIO) -> Iterable[str]:
    """Prompts from a text stream, one per line, blank lines skipped.

    A file or a pipe (not a terminal) is read whole into a list, so that answer_prompts checks
    every line before it answers any: a bad line 40 fails before 39 answers were printed. A
    terminal is read lazily, a line at a time as it is typed (reading it whole would wait for
    Ctrl-D before the first answer); there is nothing ahead to check, so each line is checked
    when it comes.
    """
    prompts = (line for line in (raw.rstrip("\r\n") for raw in stream) if line.strip())
    # A terminal: lazily, each line checked as it is typed. A file or pipe: whole, every line checked before any answer.
    return prompts if is_terminal(stream) else list(prompts)


def is_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def answer_prompts(
    switcher: AdapterSwitcher,
    prompts: Iterable[str],
    settings: GenerationSettings,
    fmt: str = "auto",
    routed: bool = False,
    input_text: str = "",
    system: str = "",
) -> int:
    """Stream an answer to each prompt to stdout; returns the number answered.

    Routed: each prompt starts ``NAME:`` (``base:`` for no adapter) and its answer is preceded
    by ``[NAME]``. Otherwise every prompt goes to the only adapter (or to the base when there is none).

    Each line is routed and turned into prompt ids (its adapter's format, --input / --system
    allowed there, not empty) before anything is printed for it. Prompts given as a collection
    (a list: a PROMPT argument, or stdin from a file or pipe, see read_prompt_lines) are all
    checked before the first is answered; an iterator (a terminal) is checked line by line as it comes.

    Raises:
        GenerationError: A line names no adapter, or its prompt does not fit its adapter's format.
    """
    planned: Iterable[tuple[str | None, list[int]]] = (plan_prompt(switcher, line, fmt, routed, input_text, system) for line in prompts)
    if isinstance(prompts, Collection):
        planned = list(planned)  # every line checked before the first answer
    answered = 0
    for adapter, prompt_ids in planned:
        if routed:
            print(f"[{adapter or BASE_NAME}] ", end="", flush=True)
        switcher.answer_ids(prompt_ids, adapter=adapter, settings=settings, stream=True)
        answered += 1
    return answered


def plan_prompt(switcher: AdapterSwitcher, line: str, fmt: str, routed: bool, input_text: str, system: str) -> tuple[str | None, list[int]]:
    """(adapter or None for the base, prompt ids) for one line, or the error the line would meet when answered.

    Routed, an error about the prompt quotes the line, since lines go to adapters with different formats.
    """
    if not routed:
        adapter = switcher.names[0] if switcher.names else None
        return adapter, switcher.prompt_ids(line, adapter=adapter, fmt=fmt, input_text=input_text, system=system)
    adapter, prompt = route_prompt(line, switcher.names)
    try:
        return adapter, switcher.prompt_ids(prompt, adapter=adapter, fmt=fmt, input_text=input_text, system=system)
    except GenerationError as err:
        raise GenerationError(f"prompt {shorten(line)!r}: {err}") from err
