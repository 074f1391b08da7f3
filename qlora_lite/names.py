"""Model names as a recipe or an adapter gives them, resolved to what transformers can load.

Three kinds of name: `demo:...` (the offline demo base, built and cached on first use by
`demo.py`), a local folder (made absolute), and a hub id (kept as given). This module sits
above both `quant` and `demo`: quant loads whatever path it is handed and never reaches up
into demo; callers that start from a recipe's name (train, generate, merge, the planner)
resolve it here first.
"""

from __future__ import annotations

from pathlib import Path

from .config import ModelConfig
from .quant import ModelLoadError

DEMO_PREFIX = "demo:"


def is_demo_name(name_or_path: str) -> bool:
    """Whether the name asks for the offline demo base."""
    return name_or_path.startswith(DEMO_PREFIX)


def resolve_model_path(model: ModelConfig) -> str:
    """Local folder, hub id, or the offline demo base (`demo:...`, built and cached on first use).

    A local folder comes back absolute: adapters record this path as their base, and a relative
    one would mean another folder (or a hub id) when read from another directory.
    """
    if is_demo_name(model.name_or_path):
        from .demo import ensure_demo_base  # building the demo base needs data and tiny: load them only when asked

        return str(ensure_demo_base())
    if not model.name_or_path:
        raise ModelLoadError("model.name_or_path is empty; set it to a local model folder or a hub id")
    local = Path(model.name_or_path).expanduser()
    return str(local.resolve()) if local.is_dir() else model.name_or_path
