"""Stopping a run early: what each way of stopping says is kept is what is on disk."""

from __future__ import annotations

import signal

import pytest

from qlora_lite.errors import TrainingStopped
from qlora_lite.training.checkpoints import STATE_NAME, checkpoint_name
from qlora_lite.training.stopping import StopRequest


def second_ctrl_c(out) -> TrainingStopped:
    stop = StopRequest(out)
    stop.handle(signal.SIGINT, None)  # the first only asks for a stop after this step
    with pytest.raises(TrainingStopped) as err:
        stop.handle(signal.SIGINT, None)
    return err.value


def test_a_second_ctrl_c_says_what_really_is_kept(tmp_path, capsys):
    """Issue 22: it claimed "the newest checkpoint in .../checkpoints is kept" with an empty checkpoints folder."""
    (tmp_path / "checkpoints").mkdir()
    stopped = second_ctrl_c(tmp_path)
    assert str(stopped) == "stopped at once by a second Ctrl-C; no checkpoint had been written yet: run the same command again to start over"
    assert stopped.exit_code == 130
    assert "SIGINT: stopping after this step with a checkpoint (Ctrl-C again to stop at once)" in capsys.readouterr().err
    for step in (2, 4):
        (tmp_path / "checkpoints" / checkpoint_name(step)).mkdir()
        (tmp_path / "checkpoints" / checkpoint_name(step) / STATE_NAME).write_bytes(b"")
    (tmp_path / "checkpoints" / checkpoint_name(6)).mkdir()  # half written: no trainer state, not a checkpoint
    latest = tmp_path / "checkpoints" / checkpoint_name(4)
    assert str(second_ctrl_c(tmp_path)) == f"stopped at once by a second Ctrl-C; the newest checkpoint, {latest}, is kept; continue from it with --resume"
