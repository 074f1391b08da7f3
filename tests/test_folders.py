"""write_atomically: a folder appears whole, replaces the old one whole, or not at all."""

from __future__ import annotations

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
