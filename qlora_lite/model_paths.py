"""Model names as a recipe, an adapter or a command gives them, resolved to what transformers can load.

Four kinds of name: `demo:...` (the offline demo base, built and cached on first use by
`demo.py`), a GGUF (`x.gguf`, `ollama:NAME[:TAG]`, a folder of GGUFs: dequantized once into a
cached model folder by `gguf_base.py`), a local folder (made absolute), and a hub id (kept as given; `find_hub_problem` says
whether the hub, or its local cache, has it). `quant` loads whatever path it is handed and never
reaches up into the demo; callers that start from a recipe's name (fit, generate, merge, the
planner) resolve it here first.
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import ModelConfig
from .demo import ensure_demo_base
from .errors import ModelLoadError
from .gguf_base import ensure_gguf_base, is_gguf_name

DEMO_PREFIX = "demo:"
# What a Hugging Face hub model id can look like: "name" or "owner/name", never a path from "/", "." or "~".
HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?")
HUB_TIMEOUT_S = 10  # asking the hub whether it has the base must not hang a command when it does not answer


def is_demo_name(name_or_path: str) -> bool:
    """Whether the name asks for the offline demo base."""
    return name_or_path.startswith(DEMO_PREFIX)


def resolve_model_path(model: ModelConfig) -> str:
    """Local folder, hub id, or the offline demo base (`demo:...`, built and cached on first use).

    A local folder comes back absolute: adapters record this path as their base, and a relative
    one would mean another folder (or a hub id) when read from another directory.
    """
    if is_demo_name(model.name_or_path):
        return str(ensure_demo_base())
    if not model.name_or_path:
        raise ModelLoadError("model.name_or_path is empty; set it to a local model folder or a hub id")
    if is_gguf_name(model.name_or_path):
        return str(ensure_gguf_base(model.name_or_path))
    local = Path(model.name_or_path).expanduser()
    return str(local.resolve()) if local.is_dir() else model.name_or_path


def find_hub_problem(repo_id: str) -> str | None:
    """None when the Hugging Face hub has a model of this id (in the local cache, or answering); else why not, in words."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
            return None  # downloaded before: transformers loads it from the cache, online or not
    except ValueError:  # not a valid repo id after all (HFValidationError): the hub cannot have it
        return "not a valid hub id"
    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set, so the hub was not asked"
    try:
        HfApi().model_info(repo_id, timeout=HUB_TIMEOUT_S)
    except GatedRepoError:
        return None  # it exists; loading says how to get access
    except RepositoryNotFoundError:
        return "the hub has no public model of that id"
    except Exception as err:  # noqa: BLE001 - network errors come in many types; all mean the hub did not answer
        return f"the hub could not be reached: {type(err).__name__}"
    return None
