"""Every way a run stops before its last step: a signal, a loss that is not finite, out of GPU memory.

Each ends in one line that says where the run stopped and what was kept (the newest checkpoint),
and what to do next; a signal is not an error (exit code 128 + the signal, as shells report it).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ..errors import TrainingError, TrainingStopped
from .checkpoints import find_latest_checkpoint

# Fault injection for the resume test: SIGKILL this process right after the given optimizer step.
KILL_AT_STEP_ENV = "QLORA_LITE_KILL_AT_STEP"


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (schedulers, `timeout`, `docker stop`, spot preemption) during training.

    The first signal only records itself: fit() finishes the optimizer step, writes a
    checkpoint and stops. A second Ctrl-C stops at once. Under torchrun every process gets the
    signal (torchrun passes it on); only the one that `announces` (rank 0) says so.
    """

    def __init__(self, out: Path, announce: bool = True) -> None:
        self.out = out
        self.announce = announce
        self.signum: int | None = None

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            stopped = TrainingStopped(f"stopped at once by a second Ctrl-C; {describe_what_is_kept(self.out)}", signum)
            stopped.quiet = not self.announce
            raise stopped
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)

    @contextmanager
    def listening(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():  # Python delivers signals to the main thread only
            yield self
            return
        previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def describe_what_is_kept(out: Path) -> str:
    """What a run stopped now leaves to continue from, as it really is on disk."""
    latest = find_latest_checkpoint(out)
    if latest is None:
        return "no checkpoint had been written yet: run the same command again to start over"
    return f"the newest checkpoint, {latest}, is kept; continue from it with --resume"


def check_finite(loss: torch.Tensor, step: int, last_checkpoint: Path | None) -> None:
    if not torch.isfinite(loss):
        if last_checkpoint:
            kept = f"the last good checkpoint is {last_checkpoint}; continue from it with --resume"
        else:
            kept = "no checkpoint had been written yet; after the fix, run the same command again (it starts over)"
        raise TrainingError(
            f"loss became {loss.item()} at step {step}; stopped without writing anything further. "
            f"Lower train.lr, raise train.warmup_steps, keep train.max_grad_norm on, or check the data; {kept}"
        )


def out_of_memory_message(step: int, device: torch.device, last_checkpoint: Path | None) -> str:
    peak = f" (peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB)" if device.type == "cuda" else ""
    kept = f"the last checkpoint {last_checkpoint} is kept" if last_checkpoint else "no checkpoint had been written yet"
    return (
        f"out of GPU memory at step {step}{peak}; {kept}. Lower train.micro_batch_size (raise train.grad_accum_steps "
        "to keep the effective batch) or train.max_seq_len, keep model.gradient_checkpointing on, or run `qlora-lite plan`"
    )


def maybe_kill_for_test(step: int) -> None:
    if os.environ.get(KILL_AT_STEP_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
