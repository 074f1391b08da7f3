"""Output folders that appear whole or not at all.

Checkpoints, the final adapter and merged models are written under a temporary name beside
their destination and renamed into place, so a crash or an error never leaves a
half-written folder where a reader (``--resume``, ``generate``, a serving stack) would take
it for a finished one.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "QLORA_LITE_CACHE"


def cache_root() -> Path:
    """Where qlora-lite caches what it builds (the demo base, tokenized data, llama.cpp's converter):
    `$QLORA_LITE_CACHE`, else `~/.cache/qlora-lite`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qlora-lite")


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a fresh temporary folder, then rename it to final (replacing an old one).

    If write raises, the temporary folder is removed and final is left as it was.
    """
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old.tmp"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    return final
