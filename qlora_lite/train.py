"""The training loop: one flat `fit()` you can read top to bottom, plus checkpoint and resume.

A run's output folder:
    config.yaml         the resolved recipe
    metrics.jsonl       one JSON object per logged step, eval, memory report and summary
    checkpoints/step-N  adapter + trainer_state.pt (optimizer, scheduler, RNG, data position)
    adapter/            the final adapter, in PEFT's format, with the tokenizer and qlora_lite.json (its data format)
"""

from __future__ import annotations

import errno
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapters import save_adapter_state, write_prompt_info
from .config import RecipeConfig, config_to_dict, save_config
from .folders import write_atomically
from .data import DEFAULT_CHAT_TEMPLATE, IGNORE_INDEX, collate_batch, prepare_datasets, select_micro_batch
from .loss import check_chunked_loss_supported
from .names import resolve_model_path
from .methods import attach_method, get_method, load_method, save_method, unwrap_base
from .planner import choose_micro_batch, estimate_optimizer_bytes
from .memory import build_memory_report, format_memory_report, format_memory_short
from .optim import build_optimizer, build_scheduler
from .plot import plot_run
from .tracking import MetricsLog, check_trackers_installed, open_run_log
from .distributed import (
    TrainingModule,
    World,
    barrier,
    broadcast_parameters,
    check_devices,
    check_launch,
    check_recipe,
    describe_device,
    gather_objects,
    gather_optimizer_state,
    gather_trainable_state,
    gradient_sync,
    is_sharded,
    load_optimizer_state,
    read_world,
    select_device,
    shard_with_fsdp,
    sum_across,
    unwrap_training_module,
)
from .doctor import collect_environment
from .quant import enable_gradient_checkpointing, load_base_model, load_tokenizer, read_prequantized_storage, resolve_compute_dtype

CHECKPOINT_PREFIX = "step-"
STATE_NAME = "trainer_state.pt"
# Fault injection for the resume test: SIGKILL this process right after the given optimizer step.
KILL_AT_STEP_ENV = "QLORA_LITE_KILL_AT_STEP"
EVAL_BAR_BATCHES = 20  # evaluations of at least this many batches (per process) show their own progress bar


class TrainingError(RuntimeError):
    """A run stopped for a reason the user can act on; the message says what was kept and what to do."""

    exit_code = 2


class TrainingStopped(TrainingError):
    """The run was asked to stop (SIGINT, SIGTERM); exit code 128 + the signal number, as shells report it."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


# ---------------------------------------------------------------------------- the loop


def fit(cfg: RecipeConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Train the recipe's adapter; returns the run summary (also the last line of metrics.jsonl).

    Under torchrun or accelerate launch every process runs this same function (see
    distributed.py): each takes its slice of every step's examples, rank 0 alone writes.
    """
    out = Path(cfg.output_dir)
    world = read_world()
    check_output_dir(out, resume, overwrite)  # writes nothing: every cheap check comes before the first write
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

    # --- the processes: one, or N started by torchrun / accelerate launch, checked before anything loads
    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    check_launch(accelerator.num_processes, world)
    check_devices(gather_objects(describe_device(device)))
    sharded = is_sharded(cfg, world)
    compute_dtype = resolve_compute_dtype(cfg.quant.compute_dtype, device)

    # --- data, read and checked before the model: a bad record costs seconds, not a model load.
    # Rank 0 first: it builds what is cached on disk (the demo base), the others then read it.
    with accelerator.main_process_first():
        base_path = resolve_model_path(cfg.model)
        storage = read_prequantized_storage(base_path) if cfg.quant.load_in_4bit else None
        check_recipe(cfg, world, mixed_precision, compute_dtype, storage)
        check_trackers_installed(cfg.train.report_to)
        tokenizer = load_tokenizer(cfg.model, base_path)
        # Tokenized once into a memory-mapped cache on disk; a later run or a resume only opens it.
        data = prepare_datasets(cfg.data, tokenizer, cfg.train.max_seq_len, cfg.train.seed)
    train_examples, eval_examples = data.train, data.eval
    # Resolved before the resume check and config.yaml: a run records the sizes it really used.
    if cfg.train.micro_batch_size == "auto":
        cfg.train.micro_batch_size = choose_auto_micro_batch(cfg, device, base_path, len(train_examples) // world.size, world.size)
    per_micro_batch = cfg.train.micro_batch_size * world.size  # examples all processes take at one micro-batch index
    if len(train_examples) < per_micro_batch:
        processes = f" x {world.size} processes" if world.is_distributed else ""
        raise TrainingError(
            f"only {len(train_examples)} training examples for train.micro_batch_size={cfg.train.micro_batch_size}{processes}; "
            "lower the micro-batch size or add data"
        )
    if cfg.train.epochs is not None:
        cfg.train.max_steps = steps_for_epochs(cfg, len(train_examples), world.size)
    # Read the checkpoint before anything is loaded or written: a resume that cannot work fails in seconds.
    checkpoint = find_latest_checkpoint(out) if resume else None
    state = read_trainer_state(checkpoint, cfg, world.size) if checkpoint else None

    # --- the run really starts: from here on rank 0 writes into output_dir (the others never do)
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    metrics: MetricsLog | None = None  # rank 0's: metrics.jsonl and the trackers of train.report_to

    def log(record: dict) -> None:
        if metrics is not None:
            metrics.write(record)

    if world.is_main:
        prepare_output_dir(out, resume, overwrite)
        save_config(cfg, out / "config.yaml")
        # On resume it forgets the killed run's steps past the checkpoint: the resumed run redoes them.
        metrics = open_run_log(out, cfg, resume_step=state["step"] if state else None)
    barrier()  # nobody reads output_dir before rank 0 has cleared and prepared it
    log({"event": "data", **data.stats})  # how the data was prepared: records, kept, dropped, tokens, cache hit
    # What `qlora-lite doctor` reports (versions, tested set, GPU/CPU), so a run can be reproduced;
    # a resumed run adds its own line, since it may run on another machine.
    log({"event": "environment", **collect_environment(), "processes": world.size, "strategy": cfg.dist.strategy if world.is_distributed else None})

    try:  # the trackers are closed however the run ends (a stop, a NaN, out of memory)
        # --- model: frozen base (4-bit or not) + what the method trains, fresh or from the newest checkpoint
        unquantized = get_method(cfg.method).unquantized_modules(cfg)
        model = load_base_model(cfg.model, cfg.quant, device, base_path, skip_modules=unquantized, shardable=sharded)
        if cfg.model.gradient_checkpointing:
            enable_gradient_checkpointing(model)  # on the base, before prompt tuning wraps it
        model = load_method(model, cfg, checkpoint, trainable=True) if checkpoint else attach_method(model, cfg, tokenizer)
        if cfg.train.loss == "chunked":
            check_chunked_loss_supported(unwrap_base(model))  # refuse now, not at the first eval
        if world.is_distributed:
            broadcast_parameters([p for p in model.parameters() if p.requires_grad])  # one starting adapter, whatever each seed gave
            torch.manual_seed(cfg.train.seed + world.rank)  # but each process its own dropout masks
        if world.is_main:
            report = build_memory_report(model, device)
            print(format_memory_report(report, "start"))
            log({"event": "memory", "when": "start", **report})

        # --- the engine (DDP, FSDP2, or none for one process), optimizer, schedule
        module = TrainingModule(model, cfg.train)  # every call into the model goes through its forward
        if sharded:
            shard_with_fsdp(module, compute_dtype, cfg.dist.cpu_offload)
        trainable = [p for p in module.parameters() if p.requires_grad]
        optimizer = build_optimizer(trainable, cfg.train.optimizer, cfg.train.lr, cfg.train.weight_decay, device)
        scheduler = build_scheduler(optimizer, cfg.train.lr_scheduler, cfg.train.warmup_steps, cfg.train.max_steps)
        if sharded:
            optimizer = accelerator.prepare(optimizer)  # the model is already FSDP2's; accelerate would wrap it in DDP
            runner = module
        else:
            runner, optimizer = accelerator.prepare(module, optimizer)  # DDP with several processes
        # Evaluation and generation call FSDP2's root (its forward gathers the shards: every process
        # takes part), but DDP's inner module: DDP's forward syncs buffers, a collective per call,
        # and generation makes as many calls as each process's answers need.
        evaluator = runner if sharded else unwrap_training_module(runner)
        checkpoint_bytes = estimate_checkpoint_bytes(trainable, cfg.train.optimizer)
        if world.is_main:
            warn_if_disk_is_short(out, cfg, checkpoint_bytes)
        step, micro_batches_seen, first_eval = 0, 0, None
        if state:
            step, micro_batches_seen, first_eval = restore_trainer_state(state, cfg, module, optimizer, scheduler, accelerator, world)
            print(f"resumed from {checkpoint} at step {step}")
            log({"event": "resume", "step": step, "checkpoint": str(checkpoint), "processes": world.size})
            for note in resume_notes(state, cfg, step, micro_batches_seen, scheduler, world):
                print(f"note: {note}")
                log({"event": "note", "step": step, "note": note})

        def next_micro_batch() -> dict[str, torch.Tensor]:
            nonlocal micro_batches_seen
            # The micro-batch one process would take with N x micro_batch_size; this process's slice of it.
            together = select_micro_batch(train_examples, micro_batches_seen, per_micro_batch, cfg.train.seed, cfg.train.batching)
            micro_batches_seen += 1
            mine = together[world.rank * cfg.train.micro_batch_size : (world.rank + 1) * cfg.train.micro_batch_size]
            return {k: v.to(device) for k, v in collate_batch(mine, tokenizer.pad_token_id).items()}

        def evaluate_now(with_task_metric: bool = False) -> dict:
            nonlocal window_start
            started = time.perf_counter()
            result = {"step": step, "eval_loss": evaluate_loss(evaluator, eval_examples, cfg, tokenizer.pad_token_id, device, world)}
            if with_task_metric and cfg.train.exact_match_examples:
                examples = eval_examples[: cfg.train.exact_match_examples]
                result["exact_match"] = exact_match(evaluator, tokenizer, examples, device, world, lockstep=sharded)
            print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k != "step"))
            log({"event": "eval", **result})
            if cfg.train.sample_prompts and cfg.data.format != "text":  # a plain text has no prompt to answer
                # The same first eval prompts at every eval: how the answers change as the model learns.
                samples = generate_answers(evaluator, tokenizer, eval_examples[: cfg.train.sample_prompts], device, world, lockstep=sharded)
                log({"event": "samples", "step": step, "samples": samples})
            runner.train()
            window_start += time.perf_counter() - started  # tokens/s counts training time only
            return result

        # --- before training: eval loss and task metric of the untouched adapter
        window_tokens, window_start, last_checkpoint = 0, time.perf_counter(), checkpoint
        if eval_examples and not state:
            first_eval = evaluate_now(with_task_metric=True)

        # --- the loop: accumulate grad_accum_steps micro-batches, clip, step
        bar = tqdm(total=cfg.train.max_steps, initial=step, desc="train", dynamic_ncols=True, disable=not world.is_main)

        def checkpoint_now() -> Path:
            # Every process takes part (FSDP gathers the shards, RNG states are collected); rank 0 writes.
            adapter = gather_trainable_state(module) if sharded else None
            optimizer_state = gather_optimizer_state(module, optimizer.optimizer) if sharded else optimizer.state_dict()
            rng_by_rank = gather_objects(capture_rng())
            path = out / "checkpoints" / checkpoint_name(step)
            if world.is_main:
                trainer_state = build_trainer_state(cfg, step, micro_batches_seen, first_eval, optimizer_state, scheduler, accelerator, rng_by_rank, sharded)
                path = save_checkpoint(out, lambda folder: save_trained(module, cfg, folder, base_path, adapter), cfg, trainer_state, checkpoint_bytes)
            barrier()  # a checkpoint is complete for every process before any goes on (or is killed)
            return path

        stop = StopRequest(out)
        runner.train()
        with stop.listening():
            while step < cfg.train.max_steps:
                micro_batches = [next_micro_batch() for _ in range(cfg.train.grad_accum_steps)]
                # Weight each micro-batch by its share of the step's target tokens over every process, so
                # the step's loss is the mean over all its tokens, as one big batch on one process would give.
                targets = [count_targets(b["labels"]) for b in micro_batches]
                total_targets = max(sum_across([sum(targets)], device)[0], 1)
                step_loss = 0.0
                lr = scheduler.get_last_lr()[0]  # the LR this step uses
                try:
                    for i, (batch, n_targets) in enumerate(zip(micro_batches, targets)):
                        # Gradients are averaged across processes once, in the step's last backward.
                        with gradient_sync(runner, enabled=i == len(micro_batches) - 1), accelerator.autocast():
                            # The mean over the micro-batch's target tokens: transformers' loss, or with
                            # train.loss chunked (default) the same number without the batch's logits.
                            loss = runner(batch)
                            check_finite(loss, step + 1, last_checkpoint)
                            # x world.size: DDP and FSDP average the processes' gradients, this wants their sum.
                            accelerator.backward(loss * (n_targets * world.size / total_targets))
                        step_loss += loss.item() * n_targets / total_targets
                        window_tokens += count_tokens(batch)
                    grad_norm = clip_gradients(accelerator, trainable, cfg.train.max_grad_norm)
                    optimizer.step()
                    if not accelerator.optimizer_step_was_skipped:  # fp16 loss scaling skips steps with inf gradients
                        scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                except torch.OutOfMemoryError as err:
                    raise TrainingError(out_of_memory_message(step + 1, device, last_checkpoint)) from err
                step += 1
                # One collective: the step's loss over all processes, and whether any was asked to stop
                # (a signal may reach them at different steps; they must stop at the same one).
                step_loss, stop_votes = sum_across([step_loss, float(stop.signum is not None)], device)

                # --- log, evaluate, checkpoint
                if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                    elapsed = time.perf_counter() - window_start
                    tokens = sum_across([window_tokens], device)[0]
                    record = {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / max(elapsed, 1e-9)}
                    log(record)
                    epoch = micro_batches_seen * per_micro_batch / len(train_examples)  # passes over the data so far
                    bar.set_postfix(epoch=f"{epoch:.2f}", loss=f"{step_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{record['tokens_per_s']:.0f}", mem=format_memory_short(device))
                    window_tokens, window_start = 0, time.perf_counter()
                bar.update(1)
                if eval_examples and cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < cfg.train.max_steps:
                    evaluate_now()
                if cfg.train.save_every and (step % cfg.train.save_every == 0 or step == cfg.train.max_steps):
                    started = time.perf_counter()
                    last_checkpoint = checkpoint_now()
                    window_start += time.perf_counter() - started
                maybe_kill_for_test(step)
                if stop_votes:  # SIGINT / SIGTERM arrived: this step is done, keep it and go
                    if last_checkpoint is None or last_checkpoint.name != checkpoint_name(step):
                        last_checkpoint = checkpoint_now()
                    bar.close()
                    signum = stop.signum or signal.SIGTERM  # a process that got no signal itself stops with its peers
                    log({"event": "stopped", "step": step, "signal": signal.Signals(signum).name, "checkpoint": str(last_checkpoint)})
                    raise TrainingStopped(f"stopped at step {step}; checkpoint {last_checkpoint}; continue with --resume", signum)
        bar.close()

        # --- after training: final eval, adapter, memory report, summary
        summary: dict = {"event": "summary", "steps": step}
        if eval_examples:
            last_eval = evaluate_now(with_task_metric=True)
            summary.update({f"final_{k}": v for k, v in last_eval.items() if k != "step"})
            summary.update({f"initial_{k}": v for k, v in (first_eval or {}).items() if k != "step"})
        adapter = gather_trainable_state(module) if sharded else None
        if world.is_main:

            def write_adapter(tmp: Path) -> None:
                save_trained(module, cfg, tmp, base_path, adapter)
                save_adapter_extras(cfg, tokenizer, tmp)

            write_or_explain(out / "adapter", write_adapter, checkpoint_bytes, out)
            report = build_memory_report(model, device)
            print(format_memory_report(report, "end"))
            log({"event": "memory", "when": "end", **report})
            log({"event": "plan_check", **check_plan(cfg, base_path, device, world.size)})
        summary["adapter_dir"] = str(out / "adapter")
        log(summary)
        if metrics is not None:
            metrics.close()
            metrics = None
            if plot_run(out):  # curves.png; without matplotlib a one-line note
                print(f"curves: {out / 'curves.png'}")
        barrier()  # the adapter is on disk before any process returns
        return summary
    finally:
        if metrics is not None:
            metrics.close()


# ---------------------------------------------------------------------------- pieces of the loop


def resolve_mixed_precision(name: str, device: torch.device) -> str:
    """`auto`: bf16 autocast on GPUs that have it, fp16 on older GPUs, none on the CPU."""
    if name != "auto":
        return name
    if device.type != "cuda":
        return "no"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def count_targets(labels: torch.Tensor) -> int:
    """Tokens the loss is computed on: labels are shifted by one inside the model."""
    return int((labels[..., 1:] != IGNORE_INDEX).sum())


def count_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-pad tokens of a batch; packed batches carry no attention mask and have little padding."""
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


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


def clip_gradients(accelerator, params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm (when max_norm > 0) and return the norm before clipping.

    With max_norm 0 the limit is infinite: the gradients are scaled by exactly 1. Under FSDP2 the
    norm comes back as a DTensor over the shards; full_tensor() is the global value.
    """
    norm = accelerator.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf)
    return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)


def out_of_memory_message(step: int, device: torch.device, last_checkpoint: Path | None) -> str:
    peak = f" (peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB)" if device.type == "cuda" else ""
    kept = f"the last checkpoint {last_checkpoint} is kept" if last_checkpoint else "no checkpoint had been written yet"
    return (
        f"out of GPU memory at step {step}{peak}; {kept}. Lower train.micro_batch_size (raise train.grad_accum_steps "
        "to keep the effective batch) or train.max_seq_len, keep model.gradient_checkpointing on, or run `qlora-lite plan`"
    )


def as_training_module(model: torch.nn.Module, cfg: RecipeConfig | None) -> torch.nn.Module:
    """fit()'s runner as it is; a plain model (tests, benchmarks) wrapped so it is called the same way."""
    if isinstance(unwrap_training_module(model), TrainingModule):
        return model
    return TrainingModule(model, cfg.train if cfg is not None else None)


def share_of(items: list, world: World) -> tuple[list, int]:
    """This process's items (every world.size-th) and the rounds every process runs: the most any has.

    Under FSDP each forward gathers shards from all processes, so all must make the same number
    of calls; a process with fewer items repeats the first item in the rounds it lacks, and drops its result.
    """
    return items[world.rank :: world.size], math.ceil(len(items) / world.size)


@torch.no_grad()
def evaluate_loss(model, examples: list[dict], cfg: RecipeConfig, pad_id: int, device: torch.device, world: World = World()) -> float:
    """Mean loss per target token over the eval examples (or the first eval_max_batches batches), over every process."""
    runner = as_training_module(model, cfg)
    runner.eval()
    size = cfg.train.micro_batch_size
    starts = list(range(0, len(examples), size))
    if cfg.train.eval_max_batches is not None:
        starts = starts[: cfg.train.eval_max_batches]
    mine, rounds = share_of(starts, world)
    # A long evaluation gets its own bar (rank 0's), under the training bar.
    rounds_bar = tqdm(range(rounds), desc="eval", leave=False, dynamic_ncols=True, disable=not world.is_main or rounds < EVAL_BAR_BATCHES)
    # accelerate autocasts the model's forward; the chunked loss runs the model's body and head
    # itself, so evaluation sets the autocast that training's loop sets.
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_mixed_precision(cfg.train.mixed_precision, device))
    total_loss, total_targets = 0.0, 0
    for round_ in rounds_bar:
        start = mine[round_] if round_ < len(mine) else starts[0]
        batch = {k: v.to(device) for k, v in collate_batch(examples[start : start + size], pad_id).items()}
        n = count_targets(batch["labels"]) if round_ < len(mine) else 0
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = runner(batch).float().item()
        if n:
            total_loss += loss * n
            total_targets += n
    total_loss, total_targets = sum_across([total_loss, total_targets], device)
    return total_loss / max(total_targets, 1)


def exact_match(model, tokenizer, examples: list[dict], device: torch.device, world: World = World(), lockstep: bool = False) -> float:
    """Share of examples whose greedy answer equals the reference answer exactly (after strip), over every process."""
    answers = generate_answers(model, tokenizer, examples, device, world, lockstep)
    return sum(a["answer"] == a["reference"] for a in answers) / max(len(answers), 1)


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[dict], device: torch.device, world: World = World(), lockstep: bool = False) -> list[dict]:
    """Greedy answers to the examples' prompts: [{"prompt", "answer", "reference"}] in the examples' order, on every process.

    The prompt is the tokens before the first target token; the reference is the first run of
    target tokens, up to EOS. Works for every format with a prompt, from tokenized examples
    alone. The processes answer every world.size-th example each. lockstep (FSDP): every process
    generates the same number of tokens for every example (the longest any needs, without
    stopping at EOS; the answer is cut at EOS after), since each forward is a collective call.
    """
    runner = as_training_module(model, None)
    runner.eval()
    prompts = [split_prompt_and_reference(example, tokenizer) for example in examples]
    longest = max((len(reference) for _, reference in prompts), default=0) + 8
    indices, rounds = share_of(list(range(len(prompts))), world)
    mine: list[tuple[int, dict]] = []
    for round_ in range(rounds):
        index = indices[round_] if round_ < len(indices) else 0
        prompt_ids, reference_ids = prompts[index]
        prompt = torch.tensor([prompt_ids], device=device)
        generated = runner(
            generate=dict(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=longest if lockstep else len(reference_ids) + 8,
                do_sample=False,
                use_cache=True,
                eos_token_id=None if lockstep else tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        answer_ids = generated[0, prompt.shape[1] :].tolist()
        if tokenizer.eos_token_id in answer_ids:
            answer_ids = answer_ids[: answer_ids.index(tokenizer.eos_token_id)]
        if round_ < len(indices):
            mine.append((index, {
                "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True),
                "answer": tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
                "reference": tokenizer.decode(reference_ids, skip_special_tokens=True).strip(),
            }))  # fmt: skip
    gathered = sorted((pair for part in gather_objects(mine) for pair in part), key=lambda pair: pair[0])
    return [answer for _, answer in gathered]


def split_prompt_and_reference(example: dict, tokenizer) -> tuple[list[int], list[int]]:
    """An eval example's prompt (the tokens before the first target) and reference answer (the first run of targets, up to EOS)."""
    ids, labels = list(example["input_ids"]), list(example["labels"])
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)  # examples with no target are dropped by data
    if start == 0:
        raise TrainingError("exact match needs a prompt before the answer; use it with data.format alpaca or chat, not text")
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX and labels[end] != tokenizer.eos_token_id:
        end += 1
    return ids[:start], ids[start:end]


# ---------------------------------------------------------------------------- output folder and checkpoints


def check_output_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train over a finished or checkpointed run unless asked to resume it or start over.

    A run that stopped before its first checkpoint (a data error, a crash) left nothing to
    resume, so running it again simply starts over. Writes nothing.
    """
    if out.exists() and not out.is_dir():
        raise TrainingError(f"output_dir {out} is a file, not a folder; choose another folder with output_dir=... or move the file away")
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


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (schedulers, `timeout`, `docker stop`, spot preemption) during training.

    The first signal only records itself: fit() finishes the optimizer step, writes a
    checkpoint and stops. A second Ctrl-C stops at once.
    """

    def __init__(self, out: Path) -> None:
        self.out = out
        self.signum: int | None = None

    def handle(self, signum: int, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise TrainingStopped(
                f"stopped at once by a second Ctrl-C; the newest checkpoint in {self.out / 'checkpoints'} is kept; continue with --resume",
                signum,
            )
        self.signum = signum
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


def check_plan(cfg: RecipeConfig, base_path: str, device: torch.device, processes: int = 1) -> dict:
    """The planner's estimate (per GPU of `processes`) next to the measured peak, so that every GPU run checks the planner."""
    from .planner import GIB, PlanError, plan_memory, read_model_config

    try:
        plan = plan_memory(cfg, read_model_config(base_path), gpus=processes)
    except (PlanError, ValueError, OSError) as err:  # an architecture the meta build cannot make: report, never fail the run
        return {"estimated_peak_gib": None, "note": f"planner unavailable: {err}"}
    record = {"estimated_peak_gib": plan.total_bytes / GIB, "estimated_weights_gib": plan.weights_bytes / GIB}
    if device.type == "cuda":
        # PyTorch's counters do not see the CUDA context, so it is left out of both sides of the ratio.
        measured = torch.cuda.max_memory_reserved(device)
        record["measured_peak_reserved_gib"] = measured / GIB
        record["estimate_over_measured"] = (plan.total_bytes - plan.cuda_context_bytes) / max(measured, 1)
    else:
        record["note"] = "the estimate is for a GPU (bf16 compute); a CPU run has no device peak to compare"
    return record


def save_trained(module: TrainingModule, cfg: RecipeConfig, folder: Path, base_path: str, gathered: dict | None) -> None:
    """What the method trained, into folder; gathered: the LoRA tensors FSDP collected on rank 0 (its shards hold only slices)."""
    if gathered is not None:
        save_adapter_state(gathered, cfg.lora, folder, base_path)  # dist.strategy fsdp trains lora only
    else:
        save_method(module.model, cfg, folder, base_path)
    write_prompt_info(folder, cfg.data.format)  # `generate` formats prompts the way training did


def save_adapter_extras(cfg: RecipeConfig, tokenizer, folder: Path) -> None:
    """Beside the final adapter: the tokenizer it was trained with (generation and merge need it)."""
    if cfg.data.format == "chat" and not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # so generation prompts the way training did
    tokenizer.save_pretrained(str(folder))


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


def maybe_kill_for_test(step: int) -> None:
    if os.environ.get(KILL_AT_STEP_ENV) == str(step):
        os.kill(os.getpid(), signal.SIGKILL)

