"""The table of methods: the one place that knows which fine-tuning methods exist.

The lecture notes' three PEFT families, plus full fine-tuning as the reference:

| method          | family             | trains                                   | entry (module)                    |
| ---             | ---                | ---                                      | ---                               |
| `lora`          | reparameterization | low-rank updates B A beside linear layers | `LORA_METHOD` (`adapters.py`)     |
| `prompt_tuning` | additive           | a soft prompt prepended to the input     | `PROMPT_TUNING_METHOD` (`prompt_tuning.py`) |
| `adapter`       | additive           | bottleneck adapters after attn / MLP     | `BOTTLENECK_METHOD` (`bottleneck.py`) |
| `selective`     | selective          | named base parameters (norms, biases...) | `SELECTIVE_METHOD` (`selective.py`) |
| `full`          | (none)             | every weight of an unquantized base      | `FULL_METHOD` (here)              |

Each entry is a `method_entry.Method`: its recipe name, its on-disk `peft_type`, and what it
can do (attach, save, load for `fit`; read, check, apply, remove for generate's switcher; merge
or the reason it cannot; the few facts config validation and the planner need). `fit`,
`generate`, `merge`, the CLI's merge report, config validation and the planner look a method up
here (`get_method` by recipe name, `get_method_by_peft_type` / `find_saved_method` by folder) and
never compare method names themselves. `attach` may return a different module than it was
given: prompt tuning wraps the base in a `SoftPromptModel` that prepends the prompt.

To add a method:
1. In its own module (e.g. `qlora_lite/ia3.py`): the layer or wrapper, apply/save/load/read
   functions, and one `Method(...)` entry built from them (see `bottleneck.py`'s
   `BOTTLENECK_METHOD`). Leave a folder-side field at its default where the method has no such
   capability; give `merge_refusal` the message if it cannot be merged.
2. `config.py`: its name in `METHODS` and, if it has settings, its section dataclass.
3. Here: import the entry and add it to `TABLE`.
4. `export.py` only if it merges in a way neither LoRA's delta nor selective's replacement covers.
5. Tests: `tests/test_<module>.py`, and its overrides in `tests/test_methods.py`'s METHOD_OVERRIDES.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .adapters import LORA_METHOD, read_adapter_json
from .bottleneck import BOTTLENECK_METHOD
from .config import ConfigError, RecipeConfig
from .method_entry import Method
from .prompt_tuning import PROMPT_TUNING_METHOD
from .selective import SELECTIVE_METHOD
from .shards import iter_tensors


class MethodError(ValueError):
    """A method cannot be applied or loaded as asked; the message says why and what to do."""


def attach_method(model: nn.Module, cfg: RecipeConfig, tokenizer) -> nn.Module:
    """Freeze what the method leaves alone and attach (or unfreeze) what it trains; returns the model to train."""
    return get_method(cfg.method).attach(model, cfg, tokenizer)


def save_method(model: nn.Module, cfg: RecipeConfig, folder: Path, base_path: str) -> None:
    """Write what the method trained to folder (PEFT's format for lora and prompt_tuning)."""
    get_method(cfg.method).save(model, cfg, folder, base_path)


def load_method(model: nn.Module, cfg: RecipeConfig, folder: Path, trainable: bool = True) -> nn.Module:
    """Put what save_method wrote back onto a freshly loaded base; returns the model to train or run."""
    return get_method(cfg.method).load(model, cfg, folder, trainable)


def unfreeze_all(model: nn.Module) -> None:
    """Full fine-tuning: every floating-point parameter trains (integer buffers never do)."""
    for param in model.parameters():
        param.requires_grad_(param.is_floating_point())


def load_full_weights(model: nn.Module, folder: Path) -> None:
    """Copy a full checkpoint's tensors into the model by name (tied weights share one tensor)."""
    params = dict(model.named_parameters())
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise MethodError(f"{folder} holds no safetensors weights; the checkpoint was not fully written")
    seen = set()
    with torch.no_grad():
        for file in files:
            for name, tensor in iter_tensors(file):
                if name not in params:
                    raise MethodError(f"{file} holds {name}, which this base model does not have: the checkpoint was made for another base")
                params[name].copy_(tensor.to(params[name].dtype))
                seen.add(name)
    missing = sorted(set(params) - seen)
    if missing:
        raise MethodError(f"{folder} lacks {len(missing)} of the model's tensors (e.g. {missing[0]}); the checkpoint is incomplete")


def unwrap_base(model: nn.Module) -> nn.Module:
    """The transformers model under any wrapper (accelerate's, or the soft-prompt one)."""
    model = getattr(model, "module", model)
    return getattr(model, "base_model", model) if type(model).__name__ == "SoftPromptModel" else model


# --- full fine-tuning: no adapter folder, so no folder-side capabilities -------------------------


def attach_full(model: nn.Module, cfg: RecipeConfig, tokenizer) -> nn.Module:
    unfreeze_all(model)
    return model


def save_full(model: nn.Module, cfg: RecipeConfig, folder: Path, base_path: str) -> None:
    # A whole model: the folder is a plain Hugging Face checkpoint (safetensors shards).
    model.save_pretrained(str(folder), safe_serialization=True)


def load_full(model: nn.Module, cfg: RecipeConfig, folder: Path, trainable: bool) -> nn.Module:
    load_full_weights(model, folder)
    if trainable:
        unfreeze_all(model)
    return model


def validate_full_recipe(cfg: RecipeConfig) -> None:
    if cfg.quant.load_in_4bit:
        raise ConfigError("method full trains every weight, which 4-bit weights cannot hold: set quant.load_in_4bit: false (or use method lora)")


FULL_METHOD = Method(
    name="full",
    peft_type=None,
    attach=attach_full,
    save=save_full,
    load=load_full,
    validate=validate_full_recipe,
    count_trainable=lambda cfg, model: [p.numel() for p in model.parameters()],
    trains_head=lambda cfg, head_names: True,
)


# --- the table ------------------------------------------------------------------------------------

TABLE: tuple[Method, ...] = (LORA_METHOD, PROMPT_TUNING_METHOD, SELECTIVE_METHOD, BOTTLENECK_METHOD, FULL_METHOD)
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
