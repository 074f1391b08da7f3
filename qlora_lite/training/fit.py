"""The run: `fit()`, read top to bottom as its phases, with each step's pieces as plain functions beside it.

A run's output folder:
    config.yaml         the resolved recipe
    metrics.jsonl       one JSON object per logged step, eval, memory report and summary
    checkpoints/step-N  adapter + trainer_state.pt (optimizer, scheduler, RNG, data position)
    adapter/            the final adapter, in PEFT's format, with the tokenizer and qlora_lite.json (its data format)
    curves.png          the run's curves (plot.py)

The phases share three small objects: `Run` (setup.py: the recipe, this process's place, the data),
`Engine` (the model as it trains: the DDP / FSDP2 wrapper, optimizer, schedule) and `Progress`
(the step, the data position, the eval before training, the last checkpoint, the tokens/s window).
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import RecipeConfig, save_config
from ..data.batching import collate_batch, select_micro_batch
from ..doctor import collect_environment
from ..errors import TrainingError, TrainingStopped
from ..gguf_base import format_round_trip, measure_round_trip
from ..memory import build_memory_report, format_memory_report, format_memory_short
from ..methods.prompt_tuning import unwrap_base
from ..methods.table import attach_method, get_method, load_method
from ..planner import check_plan_against_peak
from ..quant import enable_gradient_checkpointing, load_base_model
from .checkpoints import (
    build_trainer_state,
    capture_rng,
    checkpoint_name,
    estimate_checkpoint_bytes,
    restore_trainer_state,
    resume_notes,
    save_adapter_extras,
    save_checkpoint,
    save_trained,
    warn_if_disk_is_short,
    write_or_explain,
)
from .distributed import (
    barrier,
    broadcast_parameters,
    gather_objects,
    gather_optimizer_state,
    gather_trainable_state,
    gradient_sync,
    shard_with_fsdp,
    sum_across,
)
from .evaluate import evaluate_objective, exact_match, generate_answers
from .loss import check_chunked_loss_supported
from .objective import TrainingModule, count_tokens, unwrap_training_module
from .objectives import add_sums, get_objective
from .objectives.reference import attach_reference
from .offload import ActivationOffload
from .optim import build_optimizer, build_scheduler
from .plot import plot_run
from .rms_norm import apply_lean_rms_norm
from .setup import Run, prepare_output_dir, prepare_run
from .stopping import StopRequest, check_finite, maybe_kill_for_test, out_of_memory_message
from .layerwise import load_layer_by_layer, loads_run_layer_by_layer
from .tiled_mlp import apply_tiled_mlp
from .tracking import MetricsLog, NullLog, open_run_log


@dataclass
class Engine:
    """The model as it trains: the module the engine wraps, and its optimizer and schedule."""

    module: TrainingModule  # the model with the loss in its forward; its .model: the base with the method's layers (or its SoftPromptModel)
    runner: nn.Module  # what the loop calls: DDP around the module, the FSDP2 module itself, or the module
    evaluator: nn.Module  # what evaluation calls (FSDP2's root: it gathers the shards; DDP's inner module)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable: list[nn.Parameter]
    checkpoint_bytes: int


@dataclass
class Progress:
    """Where the run is; a checkpoint stores it, a resume restores it."""

    step: int = 0
    micro_batches_seen: int = 0  # micro-batch indices taken, each by all processes together
    first_eval: dict | None = None  # the eval before training, reported beside the last one
    last_checkpoint: Path | None = None
    window_tokens: int = 0  # tokens trained since the last logged step
    window_start: float = field(default_factory=time.perf_counter)  # training time only: eval and checkpoints are left out
    window_sums: dict[str, float] = field(default_factory=dict)  # the objective's metric sums since the last logged step
    bar: tqdm | None = None  # the loop's progress bar, while it runs

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the block's time out of the tokens/s window: evals and checkpoints are not training."""
        started = time.perf_counter()
        yield
        self.window_start += time.perf_counter() - started


def fit(cfg: RecipeConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the recipe's adapter; returns the run summary (also the last line of metrics.jsonl).

    Under torchrun or accelerate launch every process runs this same function (distributed.py):
    each takes its slice of every step's examples, rank 0 alone writes.
    """
    # --- 1. prepare: the recipe, processes, data and checkpoint checked; nothing is written before this returns
    run = prepare_run(cfg, resume, overwrite)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    # --- 2. the log: rank 0 clears what the run replaces and writes config.yaml, metrics.jsonl, the trackers
    log = open_log(run, resume, overwrite)
    try:  # the trackers are closed however the run ends (a stop, a NaN, out of memory)
        # --- 3. the model: the frozen base (4-bit or not) + what the method trains, fresh or from the checkpoint
        model = load_model(run, log)
        # --- 4. the engine: DDP, FSDP2 or none for one process; optimizer; schedule
        engine = build_engine(run, model)
        # --- 5. the objective's reference log-probs (computed once, or read from the cache); the checkpoint's state restored, or the untouched model evaluated
        prepare_reference(run, engine, log)
        progress = restore_progress(run, engine, log)
        if run.data.eval and not run.state:
            progress.first_eval = evaluate_now(run, engine, progress, log, with_task_metric=True)

        # --- 6. the loop: accumulate grad_accum_steps micro-batches, clip, step; log, evaluate, checkpoint
        train = cfg.train
        progress.bar = tqdm(total=train.max_steps, initial=progress.step, desc="train", dynamic_ncols=True, disable=not run.world.is_main)
        stop = StopRequest(run.out, announce=run.world.is_main)
        engine.runner.train()
        with stop.listening():
            while progress.step < train.max_steps:
                micro_batches = [take_micro_batch(run, progress) for _ in range(train.grad_accum_steps)]
                lr = engine.scheduler.get_last_lr()[0]  # the LR this step uses
                step_loss, grad_norm = run_step(run, engine, progress, micro_batches)
                progress.step += 1
                # One collective: the step's loss over all processes, and whether any was asked to stop
                # (a signal may reach them at different steps; they must stop at the same one).
                step_loss, stop_votes = sum_across([step_loss, float(stop.signum is not None)], run.device)
                # Step 1 too: the warm-up's first learning rate is on the curves, whatever log_every is.
                if progress.step % train.log_every == 0 or progress.step in (1, train.max_steps):
                    log_step(run, progress, log, {"loss": step_loss, "lr": lr, "grad_norm": grad_norm})
                progress.bar.update(1)
                if run.data.eval and train.eval_every and progress.step % train.eval_every == 0 and progress.step < train.max_steps:
                    evaluate_now(run, engine, progress, log)
                if train.save_every and (progress.step % train.save_every == 0 or progress.step == train.max_steps):
                    save_checkpoint_now(run, engine, progress)
                maybe_kill_for_test(progress.step)
                if stop_votes:  # SIGINT / SIGTERM arrived: this step is done, keep it and go
                    progress.bar.close()
                    stop_run(run, engine, progress, log, stop.signum or signal.SIGTERM)  # a process with no signal stops with its peers
        progress.bar.close()
        progress.bar = None

        # --- 7. finish: the final eval, the adapter, the memory report, the summary, the curves
        return finish(run, engine, progress, log)
    finally:
        log.close()


# ---------------------------------------------------------------------------- the phases


def open_log(run: Run, resume: bool, overwrite: bool) -> MetricsLog | NullLog:
    """Rank 0: the output folder prepared, config.yaml, and metrics.jsonl opened with the data and environment lines."""
    log: MetricsLog | NullLog = NullLog()
    if run.world.is_main:
        prepare_output_dir(run.out, resume, overwrite)
        save_config(run.cfg, run.out / "config.yaml")
        # On resume it forgets the killed run's steps past the checkpoint: the resumed run redoes them.
        log = open_run_log(run.out, run.cfg, resume_step=run.state["step"] if run.state else None)
    barrier()  # nobody reads output_dir before rank 0 has cleared and prepared it
    if run.world.is_main:  # the others' NullLog would drop the lines, and probing the environment opens a CUDA context on every GPU
        write_data_and_environment(run, log)
    return log


def write_data_and_environment(run: Run, log: MetricsLog | NullLog) -> None:
    """metrics.jsonl's first lines: how the data was prepared, and the environment the run trains in."""
    log.write({"event": "data", **run.data.stats})  # records, kept, dropped, tokens, cache hit
    # What `qlora-lite doctor` reports (versions, tested set, GPU/CPU), so a run can be reproduced;
    # a resumed run adds its own line, since it may run on another machine.
    strategy = run.cfg.dist.strategy if run.world.is_distributed else None
    log.write({"event": "environment", **collect_environment(), "processes": run.world.size, "strategy": strategy})


def load_model(run: Run, log: MetricsLog | NullLog) -> nn.Module:
    """The base loaded (4-bit, or the method's unquantized layers kept so) with the method attached, fresh or from the checkpoint."""
    cfg = run.cfg
    adapter = run.checkpoint or (Path(cfg.model.init_adapter) if cfg.model.init_adapter else None)  # a resume, or a run continuing an adapter (SFT -> DPO)
    if loads_run_layer_by_layer(run):  # FSDP: each layer quantized, given its LoRA and sharded in turn, never the whole base on one device
        if run.world.is_main:
            print(f"loading the base layer by layer into FSDP2 shards ({run.world.size} processes)")
        model = load_layer_by_layer(run, adapter, lambda base: prepare_base(base, run))
    else:
        method = get_method(cfg.method)
        unquantized = method.unquantized_modules(method.settings(cfg))
        model = load_base_model(cfg.model, cfg.quant, run.device, run.base_path, skip_modules=unquantized, shardable=run.sharded)
        report_gguf_round_trip(run, model, log)
        prepare_base(model, run)
        model = load_method(model, cfg, adapter, trainable=True) if adapter else attach_method(model, cfg, run.tokenizer)
    if cfg.train.loss == "chunked":
        check_chunked_loss_supported(unwrap_base(model))  # refuse now, not at the first eval
    if run.world.is_distributed:
        broadcast_parameters([p for p in model.parameters() if p.requires_grad])  # one starting adapter, whatever each seed gave
        torch.manual_seed(cfg.train.seed + run.world.rank)  # but each process its own dropout masks
    if run.world.is_main:
        report = build_memory_report(model, run.device)
        print(format_memory_report(report, "start"))
        log.write({"event": "memory", "when": "start", **report})
    return model


def report_gguf_round_trip(run: Run, model: nn.Module, log: MetricsLog | NullLog) -> None:
    """A GGUF base: how far the loaded base's logits are from llama.cpp's on the original file (the log and metrics.jsonl)."""
    result = measure_round_trip(model, run.base_path) if run.world.is_main else None
    if result is not None:
        print(format_round_trip(result))
        log.write(result)


def prepare_base(model: nn.Module, run: Run) -> None:
    """Before the method wraps the base: gradient checkpointing (with activation offload), the lean RMSNorm, the tiled MLP."""
    if run.cfg.model.gradient_checkpointing:  # on the base, before prompt tuning wraps it
        offload = ActivationOffload(run.device) if run.long_context.activation_offload else None
        enable_gradient_checkpointing(model, offload.checkpoint if offload else None)
    apply_lean_rms_norm(model)  # Llama's RMSNorm without its fp32 copies: the same outputs, less memory per token
    if run.long_context.mlp_tile_tokens:
        apply_tiled_mlp(model, run.long_context.mlp_tile_tokens)


def build_engine(run: Run, model: nn.Module) -> Engine:
    """The model wrapped for its engine (DDP with several processes, FSDP2 when sharded), with its optimizer and schedule."""
    train = run.cfg.train
    module = TrainingModule(model, train, run.cfg.objective)  # every call into the model goes through its forward
    if run.sharded:
        shard_with_fsdp(module, run.compute_dtype, run.cfg.dist.cpu_offload)
    trainable = [p for p in module.parameters() if p.requires_grad]
    optimizer = build_optimizer(trainable, train.optimizer, train.lr, train.weight_decay, run.device)
    scheduler = build_scheduler(optimizer, train.lr_scheduler, train.warmup_steps, train.max_steps)
    if run.sharded:
        optimizer = run.accelerator.prepare(optimizer)  # the model is already FSDP2's; accelerate would wrap it in DDP
        runner = module
    else:
        runner, optimizer = run.accelerator.prepare(module, optimizer)  # DDP with several processes
    # Evaluation and generation call FSDP2's root (its forward gathers the shards: every process
    # takes part), but DDP's inner module: DDP's forward syncs buffers, a collective per call,
    # and generation makes as many calls as each process's answers need.
    evaluator = runner if run.sharded else unwrap_training_module(runner)
    checkpoint_bytes = estimate_checkpoint_bytes(trainable, train.optimizer)
    if run.world.is_main:
        warn_if_disk_is_short(run.out, run.cfg, checkpoint_bytes)
    return Engine(module, runner, evaluator, optimizer, scheduler, trainable, checkpoint_bytes)


def prepare_reference(run: Run, engine: Engine, log: MetricsLog | NullLog) -> None:
    """What the objective reads beside the tokens: DPO's and KTO's reference log-probs (from the model as it starts, before any step), KTO's KL pairs."""
    info = attach_reference(run, engine.evaluator, engine.module.objective)
    if info and run.world.is_main:
        print(f"reference log-probs: {info['reference']} ({info['reference_file']})")
        log.write({"event": "reference", **info})


def restore_progress(run: Run, engine: Engine, log: MetricsLog | NullLog) -> Progress:
    """A fresh Progress, or the checkpoint's: optimizer, schedule, RNG and data position restored, with notes on what the resume changed."""
    progress = Progress(last_checkpoint=run.checkpoint)
    if not run.state:
        return progress
    progress.step, progress.micro_batches_seen, progress.first_eval = restore_trainer_state(
        run.state, run.cfg, engine.module, engine.optimizer, engine.scheduler, run.accelerator, run.world
    )
    print(f"resumed from {run.checkpoint} at step {progress.step}")
    log.write({"event": "resume", "step": progress.step, "checkpoint": str(run.checkpoint), "processes": run.world.size})
    for note in resume_notes(run.state, run.cfg, progress.step, progress.micro_batches_seen, engine.scheduler, run.world):
        print(f"note: {note}")
        log.write({"event": "note", "step": progress.step, "note": note})
    return progress


def finish(run: Run, engine: Engine, progress: Progress, log: MetricsLog | NullLog) -> dict:
    """The final eval, the adapter (rank 0 writes it whole), the memory report and planner check, the summary and the curves."""
    summary: dict = {"event": "summary", "steps": progress.step}
    if run.data.eval:
        last_eval = evaluate_now(run, engine, progress, log, with_task_metric=True)
        summary.update({f"final_{k}": v for k, v in last_eval.items() if k != "step"})
        summary.update({f"initial_{k}": v for k, v in (progress.first_eval or {}).items() if k != "step"})
    gathered = gather_trainable_state(engine.module) if run.sharded else None
    if run.world.is_main:

        def write_adapter(tmp: Path) -> None:
            save_trained(engine.module, run.cfg, tmp, run.base_path, gathered)
            save_adapter_extras(run.cfg, run.tokenizer, tmp, run.base_path)

        write_or_explain(run.out / "adapter", write_adapter, engine.checkpoint_bytes, run.out)
        report = build_memory_report(engine.module.model, run.device)
        print(format_memory_report(report, "end"))
        log.write({"event": "memory", "when": "end", **report})
        log.write({"event": "plan_check", **check_plan_against_peak(run.cfg, run.base_path, run.device, run.world.size)})
    summary["adapter_dir"] = str(run.out / "adapter")
    log.write(summary)  # fit's finally closes the log (the trackers), as it does however the run ends
    if run.world.is_main and plot_run(run.out):  # curves.png; without matplotlib a one-line note
        print(f"curves: {run.out / 'curves.png'}")
    barrier()  # the adapter is on disk before any process returns
    return summary


# ---------------------------------------------------------------------------- pieces of a step


def take_micro_batch(run: Run, progress: Progress) -> dict[str, torch.Tensor]:
    """The next micro-batch: the one one process would take with N x micro_batch_size, this process's slice of it."""
    train = run.cfg.train
    together = select_micro_batch(run.data.train, progress.micro_batches_seen, run.per_micro_batch, train.seed, train.batching)
    progress.micro_batches_seen += 1
    mine = together[run.world.rank * train.micro_batch_size : (run.world.rank + 1) * train.micro_batch_size]
    return {k: v.to(run.device) for k, v in collate_batch(mine, run.tokenizer.pad_token_id).items()}


def run_step(run: Run, engine: Engine, progress: Progress, micro_batches: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """One optimizer step over the micro-batches: forward and backward each, clip, step. Returns (this process's loss, grad norm).

    Each micro-batch is weighted by its share of the step's target tokens over every process, so
    the step's loss is the mean over all its tokens, as one big batch on one process would give.
    """
    accelerator, world = run.accelerator, run.world
    targets = [engine.module.objective.count_units(b) for b in micro_batches]  # tokens (sft), pairs or examples
    total_targets = max(sum_across([sum(targets)], run.device)[0], 1)
    step_loss = 0.0
    try:
        for i, (batch, n_targets) in enumerate(zip(micro_batches, targets)):
            # Gradients are averaged across processes once, in the step's last backward.
            with gradient_sync(engine.runner, enabled=i == len(micro_batches) - 1), accelerator.autocast():
                # The mean over the micro-batch's target tokens: transformers' loss, or with
                # train.loss chunked (default) the same number without the batch's logits.
                loss = engine.runner(batch)
                check_finite(loss, progress.step + 1, progress.last_checkpoint)
                # x world.size: DDP and FSDP average the processes' gradients, this wants their sum.
                accelerator.backward(loss * (n_targets * world.size / total_targets))
            step_loss += loss.item() * n_targets / total_targets
            add_sums(progress.window_sums, engine.module.last_sums)
            progress.window_tokens += count_tokens(batch)
        grad_norm = clip_gradients(accelerator, engine.trainable, run.cfg.train.max_grad_norm)
        engine.optimizer.step()
        if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips steps with inf gradients
            engine.scheduler.step()
        engine.optimizer.zero_grad(set_to_none=True)
    except torch.OutOfMemoryError as err:
        raise TrainingError(out_of_memory_message(progress.step + 1, run.device, progress.last_checkpoint)) from err
    return step_loss, grad_norm


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (when max_norm > 0) and return the norm before clipping.

    With max_norm 0 the limit is infinite: the gradients are scaled by exactly 1. Under FSDP2 the
    norm comes back as a DTensor over the shards; full_tensor() is the global value.
    """
    norm = accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def log_step(run: Run, progress: Progress, log: MetricsLog | NullLog, values: dict[str, float]) -> None:
    """A metrics line for this step (loss, lr, grad_norm, tokens/s over every process, the objective's metrics since the last line) and the progress bar's numbers."""
    elapsed = time.perf_counter() - progress.window_start
    keys = sorted(progress.window_sums)  # the same keys on every process: each objective always writes all of its own
    tokens, *sums = sum_across([progress.window_tokens, *(progress.window_sums[key] for key in keys)], run.device)
    metrics = get_objective(run.cfg.objective.name).summarize(dict(zip(keys, sums)))
    record = {"step": progress.step, **values, **metrics, "tokens_per_s": tokens / max(elapsed, 1e-9)}
    log.write(record)
    epoch = progress.micro_batches_seen * run.per_micro_batch / len(run.data.train)  # passes over the data so far
    progress.bar.set_postfix(
        epoch=f"{epoch:.2f}", loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}",
        mem=format_memory_short(run.device),
    )  # fmt: skip
    progress.window_tokens, progress.window_start, progress.window_sums = 0, time.perf_counter(), {}


def evaluate_now(run: Run, engine: Engine, progress: Progress, log: MetricsLog | NullLog, with_task_metric: bool = False) -> dict:
    """The eval loss (and at the start and end, exact match), logged with the sample answers; its time is left out of tokens/s."""
    cfg, eval_examples, evaluator = run.cfg, run.data.eval, engine.evaluator
    with progress.paused():
        loss, metrics = evaluate_objective(evaluator, eval_examples, cfg, run.tokenizer.pad_token_id, run.device, run.world)
        result = {"step": progress.step, "eval_loss": loss, **{f"eval_{key}": value for key, value in metrics.items()}}
        if with_task_metric and cfg.train.exact_match_examples:
            examples = eval_examples[: cfg.train.exact_match_examples]
            result["exact_match"] = exact_match(evaluator, run.tokenizer, examples, run.device, run.world, lockstep=run.sharded)
        print_beside_bar(progress.bar, f"step {progress.step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "step"))
        log.write({"event": "eval", **result})
        if cfg.train.sample_prompts and cfg.data.format != "text":  # a plain text has no prompt to answer
            # The same first eval prompts at every eval: how the answers change as the model learns.
            prompts = eval_examples[: cfg.train.sample_prompts]
            samples = generate_answers(evaluator, run.tokenizer, prompts, run.device, run.world, lockstep=run.sharded)
            log.write({"event": "samples", "step": progress.step, "samples": samples})
        engine.runner.train()
    return result


def print_beside_bar(bar: tqdm | None, line: str) -> None:
    """A line of the run's report on a line of its own, above the progress bar.

    On a terminal tqdm redraws the bar below it. Into a file (a log holding stdout and stderr), the bar
    only ever returns to the start of its line, so that line is ended first: the report line is not glued to it.
    """
    if bar is not None and not bar.disable and not getattr(bar.fp, "isatty", lambda: False)():
        bar.fp.write("\n")
        bar.fp.flush()
    tqdm.write(line)


def save_checkpoint_now(run: Run, engine: Engine, progress: Progress) -> Path:
    """A checkpoint of this step: every process takes part (FSDP gathers the shards, RNG states are collected), rank 0 writes."""
    with progress.paused():
        gathered = gather_trainable_state(engine.module) if run.sharded else None
        optimizer_state = gather_optimizer_state(engine.module, engine.optimizer.optimizer) if run.sharded else engine.optimizer.state_dict()
        rng_by_rank = gather_objects(capture_rng())
        path = run.out / "checkpoints" / checkpoint_name(progress.step)
        if run.world.is_main:
            trainer_state = build_trainer_state(
                run.cfg, progress.step, progress.micro_batches_seen, progress.first_eval, optimizer_state, engine.scheduler,
                run.accelerator, rng_by_rank, run.sharded,
            )  # fmt: skip
            write = lambda folder: save_trained(engine.module, run.cfg, folder, run.base_path, gathered)  # noqa: E731
            path = save_checkpoint(run.out, write, run.cfg, trainer_state, engine.checkpoint_bytes)
        barrier()  # a checkpoint is complete for every process before any goes on (or is killed)
        progress.last_checkpoint = path
    return path


def stop_run(run: Run, engine: Engine, progress: Progress, log: MetricsLog | NullLog, signum: int) -> None:
    """A signal asked the run to stop: this step is kept in a checkpoint (unless one was just written), and the run ends."""
    if progress.last_checkpoint is None or progress.last_checkpoint.name != checkpoint_name(progress.step):
        save_checkpoint_now(run, engine, progress)
    log.write({"event": "stopped", "step": progress.step, "signal": signal.Signals(signum).name, "checkpoint": str(progress.last_checkpoint)})
    stopped = TrainingStopped(f"stopped at step {progress.step}; checkpoint {progress.last_checkpoint}; continue with --resume", signum)
    stopped.quiet = not run.world.is_main  # every process stops at this step; rank 0 says so
    raise stopped
