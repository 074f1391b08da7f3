"""Setting a run up: the checks that cost seconds, made before anything is loaded or written, and the sizes the run will use.

`prepare_run` is fit()'s first phase: the output folder, the processes and their devices, the base
model's path and tokenizer, the data (tokenized once into the cache), auto micro-batch and epochs,
and the checkpoint to resume. A bad recipe, record or checkpoint fails here, before a model loads.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from ..activations import choose_mlp_tile_tokens
from ..config import RecipeConfig
from ..data.cache import PreparedData, prepare_datasets
from ..errors import PlanError, TrainingError
from ..folders import find_write_problem
from ..memory import read_available_ram_bytes
from ..methods.table import find_saved_method
from ..model_paths import resolve_model_path
from ..planner import LongContext, choose_micro_batch, plan_long_context, read_device_memory_bytes, read_model_config
from ..quant import load_tokenizer, read_prequantized_storage, resolve_compute_dtype
from .checkpoints import find_latest_checkpoint, read_trainer_state
from .distributed import (
    World,
    check_devices,
    check_launch,
    check_recipe,
    describe_device,
    gather_objects,
    is_sharded,
    one_error_for_all,
    read_world,
    resolve_mixed_precision,
    select_device,
)
from .tracking import check_trackers_installed


@dataclass
class Run:
    """What every phase of fit() reads: the recipe, this process's place in the job, and what was prepared before the model loads."""

    cfg: RecipeConfig
    out: Path  # output_dir
    world: World
    device: torch.device
    accelerator: Accelerator
    sharded: bool  # FSDP2 over several processes
    compute_dtype: torch.dtype
    base_path: str  # the base model, resolved (a folder, a hub id, the built demo base)
    tokenizer: Any
    data: PreparedData  # data.train, data.eval: tokenized examples; data.stats: how they were prepared
    long_context: LongContext = field(default_factory=lambda: LongContext(False, 0))  # activation offload, MLP tiles
    checkpoint: Path | None = None  # the checkpoint a resume continues from
    state: dict | None = None  # its trainer state (checked against the recipe)

    @property
    def per_micro_batch(self) -> int:
        """Examples all processes take at one micro-batch index."""
        return self.cfg.train.micro_batch_size * self.world.size


def prepare_run(cfg: RecipeConfig, resume: bool, overwrite: bool) -> Run:
    """Every check and preparation that needs no model: nothing is written to output_dir yet.

    Under torchrun or accelerate launch every process runs it; rank 0 builds what is cached on
    disk (the demo base, the tokenized data) first, the others then read it. An error on any
    process stops all of them with one line, printed once (distributed.one_error_for_all).
    """
    out = Path(cfg.output_dir).expanduser()  # relative: from where the command runs, as every folder setting
    world = read_world()
    device = select_device(world)
    if device.type == "cpu" and cfg.train.cpu_threads:
        # Tiny matrices gain nothing from a second thread, and spinning threads stall badly
        # when another process holds a core: 1 thread trains the demo ~10x faster on a busy box.
        torch.set_num_threads(cfg.train.cpu_threads)
    mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision, device)
    if mixed_precision == "fp16" and cfg.lora.dtype != "float32":
        # fp16 gradient scaling cannot unscale fp16 parameters: keep the adapter in fp32 on such GPUs.
        print(f"note: fp16 mixed precision needs fp32 adapter weights; using lora.dtype=float32 instead of {cfg.lora.dtype}")
        cfg.lora.dtype = "float32"

    # The processes: one, or N started by torchrun / accelerate launch, checked before anything loads.
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    compute_dtype = resolve_compute_dtype(cfg.quant.compute_dtype, device)
    with one_error_for_all(world):
        # Writes nothing: every cheap check comes before the first write. Rank 0 alone tries the folder
        # (a probe from each process would race the others'); the others learn its answer.
        check_output_dir(out, resume, overwrite, try_writing=world.is_main)
        check_launch(accelerator.num_processes, world)
    devices = gather_objects(describe_device(device))  # a collective: never inside a block a process may leave early
    with one_error_for_all(world):
        check_devices(devices)

    # The base and the data, read and checked before the model: a bad record costs seconds, not a model load.
    # Rank 0 first, since it builds what is cached on disk (the demo base, the tokenized data); then the others.
    for first in (True, False):
        with one_error_for_all(world):
            if world.is_main == first:
                base_path, tokenizer, data = read_base_and_data(cfg, world, mixed_precision, compute_dtype)
    run = Run(cfg, out, world, device, accelerator, is_sharded(cfg, world), compute_dtype, base_path, tokenizer, data)
    with one_error_for_all(world):
        size_batches(run)
        run.long_context = resolve_long_context(run)
        # Read the checkpoint before anything is loaded or written: a resume that cannot work fails in seconds.
        run.checkpoint = find_latest_checkpoint(out) if resume else None
        run.state = read_trainer_state(run.checkpoint, cfg, world.size) if run.checkpoint else None
    return run


def read_base_and_data(cfg: RecipeConfig, world: World, mixed_precision: str, compute_dtype: torch.dtype) -> tuple[str, Any, PreparedData]:
    """The base's path (the demo base built on first use) and tokenizer, the settings they allow, and the tokenized data."""
    base_path = resolve_model_path(cfg.model)
    storage = read_prequantized_storage(base_path) if cfg.quant.load_in_4bit else None
    check_recipe(cfg, world, mixed_precision, compute_dtype, storage)
    check_init_adapter(cfg)
    check_trackers_installed(cfg.train.report_to)
    tokenizer = load_tokenizer(cfg.model, base_path)
    # Tokenized once into a memory-mapped cache on disk; a later run or a resume only opens it.
    return base_path, tokenizer, prepare_datasets(cfg.data, tokenizer, cfg.train.max_seq_len, cfg.train.seed)


def check_init_adapter(cfg: RecipeConfig) -> None:
    """model.init_adapter names a folder holding an adapter of the recipe's method (its weights are checked against the base when they load)."""
    if not cfg.model.init_adapter:
        return
    folder = Path(cfg.model.init_adapter).expanduser()
    if not (folder / "adapter_config.json").is_file():
        raise TrainingError(f"model.init_adapter {folder} holds no adapter_config.json; point it at a finished run's adapter/ folder, or train that run first")
    method = find_saved_method(folder)
    if method.name != cfg.method:
        raise TrainingError(f"model.init_adapter {folder} holds a {method.name} adapter, but the recipe trains method {cfg.method}: set method: {method.name}")


def size_batches(run: Run) -> None:
    """train.micro_batch_size auto and train.epochs resolved to numbers, before config.yaml records the sizes the run really uses."""
    cfg, n_examples, world = run.cfg, len(run.data.train), run.world
    if cfg.train.micro_batch_size == "auto":
        cfg.train.micro_batch_size = choose_auto_micro_batch(cfg, run.device, run.base_path, n_examples // world.size, world.size)
    if n_examples < run.per_micro_batch:
        processes = f" x {world.size} processes" if world.is_distributed else ""
        raise TrainingError(
            f"only {n_examples} training examples for train.micro_batch_size={cfg.train.micro_batch_size}{processes}; "
            "lower the micro-batch size or add data"
        )
    if cfg.train.epochs is not None:
        cfg.train.max_steps = steps_for_epochs(cfg, n_examples, world.size)


def resolve_long_context(run: Run) -> LongContext:
    """model.activation_offload and model.tiled_mlp for this run; on a GPU a step the planner says cannot fit is refused here, before loading."""
    cfg = run.cfg
    on_gpu = run.device.type == "cuda"
    try:
        model_config = read_model_config(run.base_path)
    except PlanError:
        if on_gpu:
            raise
        return LongContext(cfg.model.activation_offload is True, 0)  # a CPU run of a model the planner cannot read: nothing to size tiles by
    vram = read_device_memory_bytes(run.device) if on_gpu else None
    try:
        long_context = plan_long_context(cfg, model_config, vram, run.world.size, read_available_ram_bytes())
    except PlanError:
        raise
    except (ValueError, OSError) as err:  # an architecture the meta build cannot make: train as set, as check_plan_against_peak does
        print(f"note: the planner cannot plan this model ({type(err).__name__}); model.activation_offload and model.tiled_mlp run as set, auto as off")
        tiles = choose_mlp_tile_tokens(model_config) if cfg.model.tiled_mlp is True else 0
        return LongContext(cfg.model.activation_offload is True and cfg.model.gradient_checkpointing, tiles)
    if run.world.is_main and (long_context.activation_offload or long_context.mlp_tile_tokens):
        host = f"{long_context.host_ram_bytes / 2**30:.1f} GiB of pinned host RAM" if on_gpu else "on the CPU nothing moves: there is no other memory"
        parts = [f"activation offload ({host})"] if long_context.activation_offload else []
        parts += [f"MLP in tiles of {long_context.mlp_tile_tokens} tokens"] if long_context.mlp_tile_tokens else []
        print(f"long context: {', '.join(parts)}")
    return long_context


def check_output_dir(out: Path, resume: bool, overwrite: bool, try_writing: bool = True) -> None:
    """Refuse to train over a finished or checkpointed run unless asked to resume it or start over.

    A run that stopped before its first checkpoint (a data error, a crash) left nothing to
    resume, so running it again simply starts over. Writes nothing.
    """
    if resume and overwrite:
        raise TrainingError(
            f"--resume continues the run in {out} and --overwrite deletes it to start over; pass one of them"
        )
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output_dir {out} is a file, not a folder; choose another folder with output_dir=... or move the file away")
    problem = find_write_problem(out) if try_writing else None
    if problem:
        raise TrainingError(f"output_dir {out} cannot be written: {problem}; choose a folder you can write with output_dir=...")
    has_checkpoint = find_latest_checkpoint(out) is not None
    finished = (out / "adapter").exists()
    if resume and not has_checkpoint:
        fix = "pass --overwrite to train it again" if finished else "run it again without --resume to start over"
        raise TrainingError(f"--resume: no complete checkpoint in {out / 'checkpoints'}; {fix}")
    if (has_checkpoint or finished) and not resume and not overwrite:
        how = "pass --resume to continue it, " if has_checkpoint else "it has finished; "
        raise TrainingError(f"{out} already holds a run; {how}pass --overwrite to delete it and start over, or choose another folder with output_dir=...")


def prepare_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Clear what a new run replaces (checked by check_output_dir first) and stale temporary folders."""
    if overwrite and not resume:
        for name in ("checkpoints", "adapter"):
            shutil.rmtree(out / name, ignore_errors=True)
        (out / "metrics.jsonl").unlink(missing_ok=True)
    elif not resume and (out / "metrics.jsonl").exists():
        # A run that stopped before its first checkpoint: its log is kept beside the new one.
        (out / "metrics.jsonl").replace(out / "metrics.previous.jsonl")
        print(f"note: {out} held a run that stopped before its first checkpoint; starting it over (its log is now metrics.previous.jsonl)")
    out.mkdir(parents=True, exist_ok=True)
    for folder in (out, out / "checkpoints"):
        for stale in folder.glob(".*.tmp") if folder.exists() else []:
            shutil.rmtree(stale, ignore_errors=True)  # half-written by a killed run: never used


def choose_auto_micro_batch(cfg: RecipeConfig, device: torch.device, base_path: str, n_examples: int, processes: int = 1) -> int:
    """train.micro_batch_size auto: the planner's largest for this device, but never more than the data holds (per process)."""
    size, plan = choose_micro_batch(cfg, device, base_path, gpus=processes)
    memory = f"the planner fits {plan.largest_micro_batch} in {plan.vram_bytes / 2**30:.1f} GiB"
    if size > n_examples:
        print(f"train.micro_batch_size auto -> {n_examples} ({memory}, but there are only {n_examples} training examples)")
        return n_examples
    print(f"train.micro_batch_size auto -> {size} ({memory})")
    return size


def steps_for_epochs(cfg: RecipeConfig, n_examples: int, processes: int = 1) -> int:
    """train.epochs -> optimizer steps: each step takes micro_batch_size x grad_accum_steps x processes examples."""
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps * processes
    steps = max(1, math.ceil(cfg.train.epochs * n_examples / per_step))
    on = f" x {processes} processes" if processes > 1 else ""
    print(
        f"train.epochs {cfg.train.epochs:g} -> train.max_steps {steps} ({n_examples} training examples / "
        f"(micro-batch {cfg.train.micro_batch_size} x {cfg.train.grad_accum_steps} accumulated{on}) = {n_examples / per_step:.1f} steps per epoch)"
    )
    return steps
