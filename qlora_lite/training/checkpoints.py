"""Checkpoints and resume: what a run keeps on disk to continue exactly, and the checks before it does.

    output_dir/checkpoints/step-NNNNNNN/   what the method trained (a folder `generate` and `merge` take)
                                           + trainer_state.pt (optimizer, scheduler, RNG, data position, recipe)

A checkpoint is written under a temporary name and renamed (folders.write_atomically), so a crash
never leaves half of one; the newest `train.keep_checkpoints` are kept. Resuming refuses a recipe
that differs in anything but the settings of RESUMABLE_CHANGES, and maps the data position onto
another number of processes.
"""

from __future__ import annotations

import errno
import math
import random
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from ..config import RecipeConfig, config_to_dict
from ..data.formats import DEFAULT_CHAT_TEMPLATE
from ..errors import TrainingError
from ..folders import write_atomically
from ..methods.folder import write_prompt_info
from ..methods.lora import save_adapter_state
from ..methods.table import save_method
from ..planner import estimate_optimizer_bytes
from ..quant import save_tokenizer
from .distributed import World, load_optimizer_state
from .objective import TrainingModule

CHECKPOINT_PREFIX = "step-"
STATE_NAME = "trainer_state.pt"


def estimate_checkpoint_bytes(params: list[torch.nn.Parameter], optimizer: str) -> int:
    """Bytes of one checkpoint: the trainable tensors plus the optimizer's two moments (and a margin)."""
    tensors = sum(p.numel() * p.element_size() for p in params)
    return tensors + estimate_optimizer_bytes([p.numel() for p in params], optimizer) + 2**20


def warn_if_disk_is_short(out: Path, cfg: RecipeConfig, checkpoint_bytes: int) -> None:
    """Warn at the start when the disk cannot hold keep_checkpoints checkpoints plus the final adapter."""
    kept = min(cfg.train.keep_checkpoints, math.ceil(cfg.train.max_steps / cfg.train.save_every)) if cfg.train.save_every else 0
    # +1: a new checkpoint is written whole before the oldest is pruned
    need = (kept + 1) * checkpoint_bytes + checkpoint_bytes
    free = shutil.disk_usage(out).free
    if free < need:
        print(
            f"warning: {out} has {free / 2**20:.0f} MiB free but this run needs about {need / 2**20:.0f} MiB "
            f"({kept} checkpoints of {checkpoint_bytes / 2**20:.0f} MiB kept, one being written, and the final adapter); "
            "free space, lower train.keep_checkpoints, raise train.save_every, or set output_dir on another disk",
            file=sys.stderr,
        )


def is_disk_full(err: BaseException) -> bool:
    """ENOSPC / EDQUOT, or torch.save's zip writer failing mid-file ("unexpected pos N vs M")."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return isinstance(err, RuntimeError) and any(s in str(err) for s in ("unexpected pos", "No space left", "file write failed"))


def write_or_explain(final: Path, write: Callable[[Path], None], need_bytes: int, out: Path) -> Path:
    """write_atomically, with a full disk turned into one line: what, where, bytes needed and free, what is kept."""
    try:
        return write_atomically(final, write)
    except (OSError, RuntimeError) as err:
        if not is_disk_full(err):
            raise
        latest = find_latest_checkpoint(out)
        kept = f"the last complete checkpoint is {latest}" if latest else "no checkpoint was written"
        raise TrainingError(
            f"disk full while writing {final.name} in {final.parent}: it needs about {need_bytes / 2**20:.1f} MiB and "
            f"{shutil.disk_usage(final.parent).free / 2**20:.1f} MiB are free; {kept}. Free space, lower "
            "train.keep_checkpoints, raise train.save_every, or set output_dir on another disk, then continue with --resume"
        ) from err


def save_trained(module: TrainingModule, cfg: RecipeConfig, folder: Path, base_path: str, gathered: dict | None) -> None:
    """What the method trained, into folder; gathered: the LoRA tensors FSDP collected on rank 0 (its shards hold only slices)."""
    if gathered is not None:
        save_adapter_state(gathered, cfg.lora, folder, base_path)  # dist.strategy fsdp trains lora only
    else:
        save_method(module.model, cfg, folder, base_path)
    write_prompt_info(folder, cfg.data.format)  # `generate` formats prompts the way training did


def save_adapter_extras(cfg: RecipeConfig, tokenizer, folder: Path, base_path: str) -> None:
    """Beside the final adapter: the tokenizer it was trained with (generation, merge and export-gguf need it)."""
    if cfg.data.format == "chat" and not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # so generation prompts the way training did
    save_tokenizer(tokenizer, folder, [Path(base_path)])


def capture_rng() -> dict:
    """This process's random number generators, for an exact resume."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
    }


def build_trainer_state(
    cfg: RecipeConfig, step: int, micro_batches_seen: int, first_eval: dict | None, optimizer_state: dict, scheduler, accelerator,
    rng_by_rank: list[dict] | None = None, gathered_optimizer: bool = False,
) -> dict:  # fmt: skip
    """Everything besides the adapter that a resumed run needs to continue exactly.

    micro_batches_seen counts micro-batch indices, each taken by all `processes` together.
    rng: rank 0's generators (what one process restores); rng_by_rank: every process's.
    optimizer_state: the optimizer's own state dict, or (gathered_optimizer, FSDP) the whole
    state keyed by parameter name, which any number of processes can load.
    """
    rng_by_rank = rng_by_rank or [capture_rng()]
    return {
        "step": step,
        "micro_batches_seen": micro_batches_seen,
        "processes": len(rng_by_rank),
        "first_eval": first_eval or {},
        "optimizer": optimizer_state,
        "optimizer_gathered": gathered_optimizer,
        "scheduler": scheduler.state_dict(),
        "grad_scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
        "rng": rng_by_rank[0],
        "rng_by_rank": rng_by_rank,
        "config": config_to_dict(cfg),
    }


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def save_checkpoint(out: Path, write_adapter: Callable[[Path], None], cfg: RecipeConfig, trainer_state: dict, need_bytes: int = 0) -> Path:
    """Adapter (a folder `generate` and `merge` take) + trainer state, written atomically; checkpoints beyond keep_checkpoints are pruned."""

    def write(folder: Path) -> None:
        write_adapter(folder)
        torch.save(trainer_state, folder / STATE_NAME)

    path = write_or_explain(out / "checkpoints" / checkpoint_name(trainer_state["step"]), write, need_bytes, out)
    for old in list_checkpoints(out)[: -cfg.train.keep_checkpoints]:
        shutil.rmtree(old)
    return path


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders start with a dot and are skipped)."""
    folder = out / "checkpoints"
    if not folder.exists():
        return []
    done = [p for p in folder.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_NAME).is_file()]
    return sorted(done, key=lambda p: int(p.name.removeprefix(CHECKPOINT_PREFIX)))


def find_latest_checkpoint(out: Path) -> Path | None:
    found = list_checkpoints(out)
    return found[-1] if found else None


# Settings a resumed run may change: they steer the rest of the run (or only its speed, like
# cpu_threads), not what was already learned. Anything else (model, quant, lora, data, batch shape, seed) would silently mix two runs.
RESUMABLE_CHANGES = {
    "train.max_steps", "train.epochs", "train.cpu_threads", "train.loss", "train.loss_chunk_tokens", "train.lr", "train.weight_decay", "train.lr_scheduler", "train.warmup_steps",
    "train.max_grad_norm", "train.eval_every", "train.eval_max_batches", "train.exact_match_examples",
    "train.save_every", "train.keep_checkpoints", "train.log_every", "output_dir",
    "train.report_to", "train.run_name", "train.sample_prompts", "data.num_proc", "data.cache_dir",
}


def read_trainer_state(checkpoint: Path, cfg: RecipeConfig, processes: int = 1) -> dict:
    """Load a checkpoint's trainer state and refuse to resume it under settings it was not trained with.

    On another number of processes, train.grad_accum_steps may change so that a step takes as
    many examples as before (micro_batch_size x grad_accum_steps x processes).
    """
    try:
        state = torch.load(checkpoint / STATE_NAME, weights_only=True, map_location="cpu")
    except Exception as err:  # a torn or foreign file: say which and what to do
        raise TrainingError(f"{checkpoint / STATE_NAME} cannot be read ({err}); delete that checkpoint folder to resume from an earlier one") from err
    saved = fill_legacy_settings(state["config"])
    allowed = set(RESUMABLE_CHANGES)
    if saved["train"]["grad_accum_steps"] * state.get("processes", 1) == cfg.train.grad_accum_steps * processes:
        allowed.add("train.grad_accum_steps")
    changed = [key for key in diff_configs(saved, config_to_dict(cfg)) if key not in allowed]
    if changed:
        raise TrainingError(
            f"cannot resume {checkpoint}: it was trained with different {', '.join(changed)}. "
            "Resume with the recipe and overrides it was started with, or start a new run (--overwrite or another output_dir)"
        )
    return state


# Settings added after checkpoints were already being written, with the value that reproduces
# what those older runs did (random batches, cut answers kept): a checkpoint without the key was
# trained that way, so resuming it asks for that value, not the new default.
LEGACY_SETTINGS = {
    "train": {"batching": "random", "loss": "hf", "report_to": [], "run_name": None, "sample_prompts": 3},
    "data": {"truncation": "keep", "num_proc": None, "cache_dir": None},
    "dist": {"strategy": "ddp"},
}


def fill_legacy_settings(saved: dict) -> dict:
    """A checkpoint's recipe as today's would say it: the settings added since it was written filled in."""
    filled = {section: dict(values) if isinstance(values, dict) else values for section, values in saved.items()}
    for section, defaults in LEGACY_SETTINGS.items():
        for key, value in defaults.items():
            filled.setdefault(section, {}).setdefault(key, value)
    return filled


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += diff_configs(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return keys


def restore_trainer_state(
    state: dict, cfg: RecipeConfig, module: TrainingModule, optimizer, scheduler, accelerator, world: World = World()
) -> tuple[int, int, dict]:
    """Load optimizer, scheduler, loss-scaler and RNG state; returns (step, micro_batches_seen, first_eval).

    A changed train.lr or weight_decay is applied on top of the restored state (the schedule
    itself is rebuilt from the recipe), so lowering the LR after a NaN stop really lowers it.
    With another number of processes, the data position maps to the same number of examples
    seen, and each process starts fresh random streams (seed + rank + step).
    """
    if state.get("optimizer_gathered"):
        load_optimizer_state(module, optimizer.optimizer, state["optimizer"])
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    for group in optimizer.param_groups:
        group["initial_lr"], group["weight_decay"] = cfg.train.lr, cfg.train.weight_decay
    scheduler.base_lrs = [cfg.train.lr] * len(optimizer.param_groups)
    for group, lr in zip(optimizer.param_groups, [cfg.train.lr * f(scheduler.last_epoch) for f in scheduler.lr_lambdas]):
        group["lr"] = lr
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    if state["grad_scaler"] and accelerator.scaler is not None:
        accelerator.scaler.load_state_dict(state["grad_scaler"])
    saved_processes = state.get("processes", 1)
    micro_batches_seen = state["micro_batches_seen"]
    if saved_processes == world.size:
        rng = state.get("rng_by_rank", [state["rng"]])[world.rank]
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
    else:
        examples_seen = micro_batches_seen * cfg.train.micro_batch_size * saved_processes
        micro_batches_seen = examples_seen // (cfg.train.micro_batch_size * world.size)
        torch.manual_seed(cfg.train.seed + world.rank + state["step"])
        random.seed(cfg.train.seed + world.rank + state["step"])
    return state["step"], micro_batches_seen, state["first_eval"] or None


def resume_notes(state: dict, cfg: RecipeConfig, step: int, micro_batches_seen: int, scheduler, world: World) -> list[str]:
    """What a resume changed that the user should know: a rebuilt schedule, another number of processes."""
    notes = []
    if state["config"]["train"]["max_steps"] != cfg.train.max_steps and cfg.train.lr_scheduler != "constant":
        notes.append(
            f"train.max_steps changed from {state['config']['train']['max_steps']} to {cfg.train.max_steps}: the "
            f"{cfg.train.lr_scheduler} schedule is rebuilt over the new length, so the LR at step {step} is now "
            f"{scheduler.get_last_lr()[0]:.3g} (it was {state['scheduler']['_last_lr'][0]:.3g})"
        )
    saved = state.get("processes", 1)
    if saved != world.size:
        m, g, saved_g = cfg.train.micro_batch_size, cfg.train.grad_accum_steps, state["config"]["train"]["grad_accum_steps"]
        batch = f"each step takes {m * g * world.size} examples as before" if g * world.size == saved_g * saved else (
            f"each step now takes {m * g * world.size} examples (it took {m * saved_g * saved}; resume with "
            f"train.grad_accum_steps={saved_g * saved / world.size:g} to keep it)"
        )  # fmt: skip
        notes.append(
            f"the checkpoint was written by {saved} processes and {world.size} continue it: its "
            f"{state['micro_batches_seen'] * m * saved} training examples seen map to micro-batch {micro_batches_seen} of "
            f"{m} x {world.size}; {batch}; random streams (dropout) start afresh"
        )
    return notes
