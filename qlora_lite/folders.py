"""The folders qlora-lite writes: whole or not at all, readable as the umask says, checked before anything slow.

Checkpoints, the final adapter and merged models are written under a temporary name beside
their destination and renamed into place, so a crash or an error never leaves a
half-written folder where a reader (``--resume``, ``generate``, a serving stack) would take
it for a finished one. Their files get the modes a plain open() gives (``apply_umask``), and an
output folder that cannot be written is refused before any work (``find_write_problem``).
``cache_root`` is where qlora-lite keeps what it builds once.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CACHE_ENV = "QLORA_LITE_CACHE"


def cache_root() -> Path:
    """Where qlora-lite caches what it builds (the demo base, tokenized data, llama.cpp's converter):
    `$QLORA_LITE_CACHE`, else `~/.cache/qlora-lite`."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qlora-lite").expanduser().absolute()


def find_write_problem(folder: Path) -> str | None:
    """None when `folder` can be created (or exists) and written; else why not, in words. Leaves nothing behind.

    Asked before anything slow, so that an output folder on a read-only or virtual file system
    (/proc, /sys) or without permission is refused in one line rather than after training or a
    merge. It is tried, not judged from permission bits (root passes those, and /proc refuses
    root): the first missing folder on the way is made and removed, or a file is made in the folder.
    """
    target = Path(os.path.abspath(folder))
    existing, missing = target, None  # missing: the first folder to create under existing, if any
    while not existing.exists():
        existing, missing = existing.parent, existing
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        if missing is not None:
            missing.mkdir()
            missing.rmdir()
        else:
            with tempfile.TemporaryFile(dir=existing):
                pass
    except OSError as err:
        what = f"create {missing}" if missing is not None else f"create files in {existing}"
        return f"cannot {what} ({explain_os_error(err, existing, 'folders' if missing is not None else 'files')})"
    return None


def explain_os_error(err: OSError, parent: Path, kind: str) -> str:
    """Why creating something in `parent` failed, in words that fit after "cannot create X (".

    /proc answers ENOENT even to root, and /sys EPERM: strerror would say "No such file or directory"
    of the folder being created, or "Operation not permitted".
    """
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.EROFS:
        return "read-only file system"
    if err.errno == errno.ENOENT:
        return f"the file system of {parent} takes no new {kind}"
    if err.errno == errno.EEXIST:
        return "a file of that name exists"
    if err.errno == errno.ENOTDIR:
        return "part of its path is a file, not a folder"
    return (err.strerror or type(err).__name__).lower()


def apply_umask(root: Path) -> None:
    """Give root and everything under it the modes a plain open() or mkdir() gives: 0o666 / 0o777 less the umask.

    safetensors' save_file writes 0o600 files and tempfile.mkdtemp 0o700 folders, so another user or a
    serving container could not read an adapter that qlora-lite wrote. The modes are those of a file and
    a folder made here for the purpose (the umask itself can only be read by setting it, which races
    with the process's other threads).
    """
    root = Path(root)
    probe = root / ".mode-probe"
    probe.touch()
    probe.with_suffix(".dir").mkdir()
    file_mode, folder_mode = (path.stat().st_mode & 0o777 for path in (probe, probe.with_suffix(".dir")))
    probe.unlink()
    probe.with_suffix(".dir").rmdir()
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(folder_mode if path.is_dir() else file_mode)


def write_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) on a fresh temporary folder, then rename it to final (replacing an old one).

    Its files get the umask's modes (apply_umask). If write raises, the temporary folder is removed
    and final is left as it was.
    """
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        apply_umask(tmp)
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
