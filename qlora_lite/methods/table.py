"""The table of methods: the one place that knows which fine-tuning methods exist.

The lecture notes' three PEFT families, plus full fine-tuning as the reference:

| method          | family             | trains                                    | entry (module)                    |
| ---             | ---                | ---                                       | ---                               |
| `lora`          | reparameterization | low-rank updates B A beside linear layers | `LORA_METHOD` (`lora.py`)         |
| `prompt_tuning` | additive           | a soft prompt prepended to the input      | `PROMPT_TUNING_METHOD` (`prompt_tuning.py`) |
| `adapter`       | additive           | bottleneck adapters after attn / MLP      | `BOTTLENECK_METHOD` (`bottleneck.py`) |
| `selective`     | selective          | named base parameters (norms, biases...)  | `SELECTIVE_METHOD` (`selective.py`) |
| `full`          | (none)             | every weight of an unquantized base       | `FULL_METHOD` (`full.py`)         |

Each entry is a `method.Method`: its recipe name (one of `config.METHODS`, where the recipe's
checks of its settings live), its recipe section, its on-disk `peft_type`, and what it can do.
`fit`, `generate`, `merge`, the CLI's merge report, the GGUF export and the planner look a method
up here (`get_method` by recipe name, `get_method_by_peft_type` / `find_saved_method` by folder)
and never compare method names themselves. `attach` may return a different module than it was
given: prompt tuning wraps the base in a `SoftPromptModel` that prepends the prompt.

To add a method:
1. Its own module (e.g. `methods/ia3.py`): the layer or wrapper, apply / save / read / check / attach
   functions over its settings section, and one `Method(...)` entry built from them (see
   `bottleneck.py`). Leave a folder-side field at its default where the method has no such
   capability; give `merge_refusal` the message if it cannot be merged.
2. `config.py`: its settings section (a dataclass) and its name in `METHODS` with the check of them.
3. Here: add its entry to `TABLE` (`build_table` refuses a duplicate, or a name config does not list).
4. `export/merge.py` only if it merges in a way neither LoRA's delta nor selective's replacement covers.
5. Tests: `tests/methods/test_<module>.py`, and its overrides in `tests/methods/test_table.py`'s METHOD_OVERRIDES.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..config import METHODS, RecipeConfig
from ..errors import MethodError
from .bottleneck import BOTTLENECK_METHOD
from .folder import read_adapter_json
from .full import FULL_METHOD
from .lora import LORA_METHOD
from .method import Method
from .prompt_tuning import PROMPT_TUNING_METHOD
from .selective import SELECTIVE_METHOD


def build_table(entries: tuple[Method, ...]) -> tuple[Method, ...]:
    """The entries in config.METHODS' order, after checking each recipe method has exactly one and each peft_type one method."""
    names = [method.name for method in entries]
    types = [method.peft_type for method in entries if method.peft_type is not None]
    if sorted(names) != sorted(METHODS) or len(set(types)) != len(types):
        # A mistake in the package, not the user's: a traceback, not a one-line error.
        raise RuntimeError(f"the table of methods has entries {names} (peft_types {types}) for config.METHODS {list(METHODS)}")
    return tuple(sorted(entries, key=lambda method: list(METHODS).index(method.name)))


TABLE: tuple[Method, ...] = build_table((LORA_METHOD, PROMPT_TUNING_METHOD, SELECTIVE_METHOD, BOTTLENECK_METHOD, FULL_METHOD))
BY_NAME: dict[str, Method] = {method.name: method for method in TABLE}
BY_PEFT_TYPE: dict[str, Method] = {method.peft_type: method for method in TABLE if method.peft_type is not None}


def get_method(name: str) -> Method:
    """The entry for a recipe's `method:` value; an unknown name is a MethodError listing the known ones."""
    if name not in BY_NAME:
        raise MethodError(f"method {name!r} is unknown; known methods: {', '.join(BY_NAME)}")
    return BY_NAME[name]


def get_method_by_peft_type(peft_type: str | None) -> Method:
    """The entry for an adapter folder's peft_type; an unknown one is a MethodError listing the known ones."""
    if peft_type not in BY_PEFT_TYPE:
        raise MethodError(f"peft_type {peft_type!r} is not one qlora-lite reads; known: {', '.join(BY_PEFT_TYPE)}")
    return BY_PEFT_TYPE[peft_type]


def find_saved_method(adapter_dir: str | Path) -> Method:
    """The entry for the adapter in a folder, by its adapter_config.json's peft_type.

    A peft_type the table does not know goes to LoRA, the PEFT format's common case, whose
    reader then refuses it naming what it expected (the message users already know).
    """
    return find_method_of_config(read_adapter_json(adapter_dir))


def find_method_of_config(raw: dict) -> Method:
    """The entry for an adapter_config.json already read (unknown peft_types go to LoRA, as in find_saved_method)."""
    return BY_PEFT_TYPE.get(raw.get("peft_type"), LORA_METHOD)


# --- what fit() asks of the recipe's method -------------------------------------------------------


def attach_method(model: nn.Module, cfg: RecipeConfig, tokenizer) -> nn.Module:
    """Freeze what the method leaves alone and attach (or unfreeze) what it trains; returns the model to train."""
    method = get_method(cfg.method)
    return method.attach(model, method.settings(cfg), tokenizer)


def save_method(model: nn.Module, cfg: RecipeConfig, folder: Path, base_path: str) -> None:
    """Write what the method trained to folder (PEFT's format for lora and prompt_tuning)."""
    method = get_method(cfg.method)
    method.save(model, method.settings(cfg), folder, base_path)


def load_method(model: nn.Module, cfg: RecipeConfig, folder: Path, trainable: bool = True) -> nn.Module:
    """Put what save_method wrote back onto a freshly loaded base; returns the model to train or run."""
    return get_method(cfg.method).load(model, Path(folder), trainable)
