"""write_atomically: a folder appears whole, replaces the old one whole, or not at all."""

from __future__ import annotations

from pathlib import Path

import pytest

from qlora_lite.folders import write_atomically


def test_new_folder_and_replacement_are_whole(tmp_path):
    final = tmp_path / "out"
    write_atomically(final, lambda tmp: (tmp / "a.txt").write_text("1"))
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    write_atomically(final, lambda tmp: (tmp / "b.txt").write_text("2"))
    assert sorted(p.name for p in final.iterdir()) == ["b.txt"]  # the old folder is replaced, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folders left


def test_failed_write_leaves_the_old_folder_and_no_temp(tmp_path):
    final = tmp_path / "out"
    write_atomically(final, lambda tmp: (tmp / "a.txt").write_text("kept"))

    def fail(tmp):
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_atomically(final, fail)
    assert (final / "a.txt").read_text() == "kept" and not (final / "half.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_written_files_and_folders_follow_the_umask(tmp_path):
    """Issue 22: safetensors wrote adapters -rw------- and mkdtemp made drwx------ folders under umask 022."""
    import os
    import stat
    import tempfile

    import torch
    from safetensors.torch import save_file

    def write(tmp):
        save_file({"w": torch.zeros(2)}, str(tmp / "adapter_model.safetensors"))
        Path(tempfile.mkdtemp(dir=tmp, prefix="sub")).joinpath("f.txt").write_text("x")

    previous = os.umask(0o022)
    try:
        final = write_atomically(tmp_path / "out", write)
    finally:
        os.umask(previous)
    modes = {p.relative_to(final).as_posix().split("/")[0] + ("/" if p.is_dir() else ""): stat.S_IMODE(p.stat().st_mode) for p in final.rglob("*")}
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert sorted(modes.values()) == [0o644, 0o644, 0o755] and modes["adapter_model.safetensors"] == 0o644


def test_an_unwritable_folder_is_named_before_anything_is_written(tmp_path):
    from qlora_lite.folders import find_write_problem

    assert find_write_problem(tmp_path / "new" / "deeper") is None and not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("x")
    assert find_write_problem(tmp_path / "file" / "out") == f"{tmp_path / 'file'} is a file, not a folder"
    assert find_write_problem(Path("/proc/qlora-out/deeper")) in [
        f"cannot create /proc/qlora-out ({reason})" for reason in ("the file system of /proc takes no new folders", "permission denied")
    ]
    assert find_write_problem(Path("/proc")) in [f"cannot create files in /proc ({reason})" for reason in ("the file system of /proc takes no new files", "permission denied")]
