"""FSDP2 loading on 2 processes at Llama-3.1-70B widths: what each process holds while it loads, layer by layer or whole.

Issue 25's measurement. A random-weight checkpoint at Llama-3.1-70B's widths (hidden 8192, 64 heads, 8 KV
heads of 128, intermediate 28672, vocabulary 128256, untied; bf16 safetensors, one file per block, a small
local BPE tokenizer) cut to 2 and 4 decoder layers (--layers), trained for one step by 2 gloo processes
(`torchrun --standalone --nproc_per_node 2`, this file's --worker) running the real `fit()` with
recipes/llama3.1-70b-fsdp-2x24gb.yaml (NF4 + double quant, LoRA r=16 all-linear in fp32, fsdp, bf16 compute
and autocast, gradient checkpointing) at micro-batch 1, --seq tokens, max_steps 1, no eval, no checkpoint.

In each process the worker wraps fit's `load_model`, `build_engine` and `run_step` (as
tests/training/dist_worker.py does) and records:
  * load peak:    `qlora_lite.MemoryMeter` around load_model: the most live tensor bytes on the CPU while loading;
  * after load:   the live bytes the meter sees when load_model returns (the root, head and final norm, still whole);
  * after engine: the local bytes of every parameter, buffer and quantization constant once build_engine sharded the root;
  * step peak:    a MemoryMeter around run_step (forward, backward, clip, AdamW step);
  * RSS:          peak resident memory (VmHWM) right after load_model, and after the step (includes Python + torch, ~0.5 GiB).
Two loading paths: `layerwise` (today's: training/layerwise.py) and `whole` (fit_module.loads_run_layer_by_layer
patched to False: the whole 4-bit base on each process before FSDP shards it), with dist.cpu_offload true (the
recipe's) and/or false (--offload). On a CPU offload moves nothing (the shards are already in CPU RAM).

Then per quantity value(L) = a + b L over the layer counts, extrapolated to 80 layers, beside the planner's per-GPU
loading figure (plan_memory(gpus=2), less the 1.00 GiB of CUDA context and NCCL a CPU has not), and the goals:
  (1) each process's loading peak <= its training-step peak;
  (2) loading peak within 10% of the planner's loading figure;
  (3) peak RSS while loading <= the largest unit's bf16 bytes + the process's shards + 2 GiB.

    python benchmarks/fsdp_loading.py                                    # 2 and 4 layers, both paths, offload on: ~30 min on 2 cores
    python benchmarks/fsdp_loading.py --layers 2 3 4 --offload true false
    python benchmarks/fsdp_loading.py --quick                            # narrow widths, a few minutes: checks the plumbing
    python benchmarks/fsdp_loading.py --layers 2 --paths layerwise       # on 2+ GPUs: nccl, and torch.cuda's peaks per GPU too

Needs ~11 GB of disk for 4 layers (--work to keep it) and, for the whole path, ~2 x 7 GiB of RAM at 4 layers.
Writes benchmarks/results/fsdp-loading-<name>-<cpu|cuda>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GIB = 1024**3
RECIPE = REPO / "recipes" / "llama3.1-70b-fsdp-2x24gb.yaml"
LLAMA_70B_CONFIG = REPO / "qlora_lite" / "known_configs" / "Llama-3.1-70B.json"
LLAMA_31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
QUICK_WIDTHS = {"hidden_size": 1024, "intermediate_size": 3584, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000}
TARGET_LAYERS = 80
PLANNER_DEVICE_EXTRA = "CUDA context 0.75 + NCCL 0.25 GiB"
WORDS = ["river", "stone", "cloud", "green", "table", "light", "north", "paper"]


# ---------------------------------------------------------------------------- the checkpoint


def build_model_config(quick: bool, layers: int) -> dict:
    config = json.loads(LLAMA_70B_CONFIG.read_text())
    config.update(num_hidden_layers=layers, rope_scaling=LLAMA_31_ROPE, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    if quick:
        config.update(QUICK_WIDTHS, bos_token_id=1, eos_token_id=2)
    return config


def write_checkpoints(work: Path, quick: bool, layer_counts: list[int]) -> dict[int, Path]:
    """Random bf16 weights (std 0.02, norms 1), one file per block, the embeddings and the head each their own; a folder per layer count
    (config.json, an index naming its own blocks, symlinks to the shared files, the tokenizer): memory_compare.py's writer at these widths."""
    import memory_compare as mc

    texts = [f"Repeat the word {w}. {w} {w}" for w in WORDS]
    return mc.write_checkpoints(work, quick, layer_counts, config_of=lambda layers: build_model_config(quick, layers), own_embeddings=True, tokenizer_texts=texts)


def write_data(work: Path, seq: int) -> Path:
    """Plain-text records (data.format text: every token a target), each cut to train.max_seq_len: every micro-batch is `seq` tokens."""
    path = work / "train.jsonl"
    with path.open("w") as f:
        for i in range(8):
            word = WORDS[i % len(WORDS)]
            f.write(json.dumps({"text": " ".join([word] * seq)}) + "\n")
    return path


# ---------------------------------------------------------------------------- the worker: one process of the torchrun launch


def local_tensor_bytes(module) -> int:
    """This process's bytes of the module: local shards of parameters and buffers, and the 4-bit quantization constants."""
    from qlora_lite import quant_constants

    seen, total = set(), 0
    tensors = [*module.parameters(), *module.buffers()]
    for sub in module.modules():
        state = getattr(sub, "quant_state", None)
        if state is not None:
            tensors += quant_constants(state)
        weight = getattr(sub, "weight", None)
        if weight is not None and getattr(weight, "quant_state", None) is not None and weight.quant_state is not state:
            tensors += quant_constants(weight.quant_state)
    for t in tensors:
        local = t.to_local() if hasattr(t, "to_local") else t
        if local.device.type == "meta":
            continue
        key = (str(local.device), local.untyped_storage().data_ptr())
        if key not in seen:
            seen.add(key)
            total += local.untyped_storage().nbytes()
    return total


def shard_aware_meter():
    """qlora_lite.MemoryMeter counting a DTensor (FSDP2's sharded parameters, their gradients, AdamW's moments) by its local shard.

    MemoryMeter as it is stops at the first DTensor an operation reads: a DTensor's untyped_storage() is an
    invalid python storage whose data_ptr() raises (torch 2.13), and _track only guards untyped_storage().
    Here the local tensor is tracked instead; what a DTensor operation allocates inside its own dispatch stays unseen.
    """
    from torch.distributed.tensor import DTensor

    from qlora_lite import MemoryMeter

    class ShardAwareMeter(MemoryMeter):
        def _track(self, tensor, op, found, host=False):
            if isinstance(tensor, DTensor):
                tensor = tensor._local_tensor
            try:
                tensor.untyped_storage().data_ptr()
            except (RuntimeError, NotImplementedError):
                return
            super()._track(tensor, op, found, host)

    return ShardAwareMeter


def worker(args) -> int:
    import torch

    import qlora_lite.training.fit as fit_module
    from qlora_lite import format_peak_breakdown, load_recipe, read_peak_rss_bytes

    MemoryMeter = shard_aware_meter()

    rank = int(os.environ.get("RANK", 0))
    cuda = torch.cuda.is_available()
    meter_device = "cuda" if cuda else "cpu"
    result: dict = {"rank": rank, "path": args.path, "layers": args.layers_one, "offload": args.offload_one}
    if args.path == "whole":
        fit_module.loads_run_layer_by_layer = lambda run: False
    load, build, step = fit_module.load_model, fit_module.build_engine, fit_module.run_step

    def metered_load(run, log):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with MemoryMeter(device=meter_device) as meter:
            model = load(run, log)
        result.update(
            load_s=time.perf_counter() - start, load_peak_bytes=meter.peak_device_bytes, after_load_bytes=meter.end_bytes,
            load_found_baseline_bytes=meter.found_baseline_bytes, load_rss_bytes=read_peak_rss_bytes(),
            load_peak_breakdown=meter.peak_breakdown(top=8, device_only=True),
        )  # fmt: skip
        if cuda:
            result["load_cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        print(f"rank {rank} loading peak:\n{format_peak_breakdown(meter, top=8)}", file=sys.stderr, flush=True)
        return model

    def measured_build(run, model):
        engine = build(run, model)
        result["after_engine_bytes"] = local_tensor_bytes(engine.module)
        return engine

    def metered_step(run, engine, progress, micro_batches):
        if args.skip_step:  # loading only: the step is not run (fit goes on to its end with a loss of 0)
            result.update(step_s=0.0, loss=0.0, rss_after_step_bytes=read_peak_rss_bytes(), after_step_bytes=result["after_engine_bytes"])
            return 0.0, 0.0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        with MemoryMeter(baseline=[micro_batches], device=meter_device) as meter:
            out = step(run, engine, progress, micro_batches)
        result.update(
            step_s=time.perf_counter() - start, step_peak_bytes=meter.peak_device_bytes, step_found_baseline_bytes=meter.found_baseline_bytes,
            step_peak_breakdown=meter.peak_breakdown(top=8, device_only=True), rss_after_step_bytes=read_peak_rss_bytes(),
            step_found_baseline=[  # what was alive before the step and read by it, largest first: what the step's baseline is made of
                {"shape": list(a.shape), "dtype": a.dtype, "bytes": a.nbytes}
                for a in sorted((a for a in meter.allocations if a.op == "baseline (found)"), key=lambda a: -a.nbytes)[:8]
            ],
            after_step_bytes=local_tensor_bytes(engine.module), loss=out[0], tokens=int(sum(b["input_ids"].numel() for b in micro_batches)),
        )  # fmt: skip
        if cuda:
            result["step_cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated()
        print(f"rank {rank} step peak:\n{format_peak_breakdown(meter, top=8)}", file=sys.stderr, flush=True)
        return out

    fit_module.load_model, fit_module.build_engine, fit_module.run_step = metered_load, measured_build, metered_step
    overrides = {
        "model.name_or_path": args.model_dir, "data.path": args.data, "data.format": "text", "data.truncation": "keep", "data.eval_fraction": 0.0, "output_dir": args.run_dir,
        "train.max_steps": 1, "train.micro_batch_size": 1, "train.grad_accum_steps": 1, "train.max_seq_len": args.seq,
        "train.save_every": 0, "train.eval_every": 0, "train.log_every": 1, "train.cpu_threads": args.threads,
        "dist.cpu_offload": args.offload_one, **dict(kv.split("=", 1) for kv in args.extra),
    }  # fmt: skip
    cfg = load_recipe(str(RECIPE), [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in overrides.items()])
    fit_module.fit(cfg, overwrite=True)
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(result))
    return 0


def launch(model_dir: Path, data: Path, work: Path, path: str, layers: int, offload: bool, args) -> list[dict] | dict:
    """One torchrun launch of 2 processes; each rank's record, or why it failed."""
    result_dir = work / f"result-{path}-{layers}-{offload}"
    shutil.rmtree(result_dir, ignore_errors=True)
    result_dir.mkdir(parents=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(args.processes), __file__, "--worker",
        "--path", path, "--model-dir", str(model_dir), "--data", str(data), "--run-dir", str(work / f"run-{path}-{layers}-{offload}"),
        "--result-dir", str(result_dir), "--layers-one", str(layers), "--offload-one", str(offload).lower(), "--seq", str(args.seq),
        "--threads", str(args.threads), *(["--skip-step"] if args.skip_step else []), *(["--extra", *args.extra] if args.extra else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    wall = time.perf_counter() - start
    (work / f"log-{path}-{layers}-{offload}.txt").write_text(done.stdout + "\n----- stderr\n" + done.stderr)
    ranks = [json.loads(p.read_text()) for p in sorted(result_dir.glob("rank*.json"))]
    if done.returncode != 0 or len(ranks) != args.processes:
        errors = [line for line in done.stderr.splitlines() if line.startswith("[rank") and ("Error" in line or "error" in line)]
        return {"path": path, "layers": layers, "offload": offload, "failed": f"exit {done.returncode}: {(errors or [done.stderr.strip()[-600:]])[-1]}"}
    for r in ranks:
        r["wall_s"] = wall
    return ranks


# ---------------------------------------------------------------------------- the planner, the fits, the goals


def planned(model_dir: Path, layers: int, offload: bool, seq: int, gpus: int) -> dict:
    from qlora_lite import load_recipe, plan_memory, read_model_config

    overrides = [f"model.name_or_path={model_dir}", "train.micro_batch_size=1", "train.grad_accum_steps=1", f"train.max_seq_len={seq}",
                 f"dist.cpu_offload={str(offload).lower()}"]  # fmt: skip
    cfg = load_recipe(str(RECIPE), overrides)
    config = read_model_config(str(model_dir))
    config.num_hidden_layers = layers
    plan = plan_memory(cfg, config, vram_bytes=1 << 50, gpus=gpus)
    extra = plan.cuda_context_bytes + plan.nccl_bytes
    return {
        "layers": layers, "offload": offload,
        "load_peak_gib": plan.load_peak_bytes / GIB, "load_peak_less_context_gib": (plan.load_peak_bytes - extra) / GIB,
        "step_total_gib": plan.total_bytes / GIB, "step_less_context_gib": (plan.total_bytes - extra) / GIB,
    }  # fmt: skip


def unit_bf16_bytes(config: dict) -> dict:
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    layer = (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h) * 2
    return {"layer": layer, "embeddings": v * h * 2, "head": v * h * 2}


def fit_line(points: list[tuple[int, float]]) -> dict | None:
    if len({x for x, _ in points}) < 2:
        return None
    import numpy as np

    xs, ys = np.array([p[0] for p in points], float), np.array([p[1] for p in points], float)
    b, a = np.polyfit(xs, ys, 1)
    return {"a_gib": float(a), "b_gib_per_layer": float(b), f"at_{TARGET_LAYERS}_gib": float(a + b * TARGET_LAYERS)}


QUANTITIES = {
    "load_peak_gib": "load_peak_bytes", "after_load_gib": "after_load_bytes", "after_engine_gib": "after_engine_bytes",
    "step_peak_gib": "step_peak_bytes", "load_rss_gib": "load_rss_bytes", "rss_after_step_gib": "rss_after_step_bytes",
}  # fmt: skip


def derive(record: dict) -> dict:
    """Per (path, offload, rank): value(L) = a + b L over the layer counts, at 80; the goals at each measured L and at 80."""
    runs = [r for r in record["runs"] if "failed" not in r]
    units = record["unit_bf16_bytes"]
    largest = max(units.values())
    out: dict = {}
    step_plans = {p["layers"]: p["step_less_context_gib"] for p in record["planner"] if p["offload"] == (record["meter_device"] == "cuda" and p["offload"])}

    def step_of(r: dict) -> float:  # measured; without a step (--skip-step), the planner's step figure less context, marked in the table
        return r["step_peak_bytes"] / GIB if "step_peak_bytes" in r else step_plans[r["layers"]]

    for key in sorted({(r["path"], r["offload"], r["rank"]) for r in runs}):
        path, offload, rank = key
        mine = sorted((r for r in runs if (r["path"], r["offload"], r["rank"]) == key), key=lambda r: r["layers"])
        fits = {q: fit_line([(r["layers"], r[b] / GIB) for r in mine]) for q, b in QUANTITIES.items() if all(b in r for r in mine)}
        # What a process holds, wherever it is: the planner's figure without offload (with it, the shards are in CPU RAM and
        # left out of the per-GPU figure, but a CPU meter counts them; on a GPU the offload figure is the one to compare to).
        # The planner plans the layer-by-layer path: the whole path has no figure to meet (goal 2 is '-' there).
        plans = {p["layers"]: p for p in record["planner"] if p["offload"] == (offload and record["meter_device"] == "cuda") and path == "layerwise"}
        goals = []
        for r in mine:
            plan = plans.get(r["layers"])
            goals.append(check_goals(r["layers"], r["load_peak_bytes"] / GIB, step_of(r), r["load_rss_bytes"] / GIB,
                                     r["after_engine_bytes"] / GIB, largest / GIB, plan["load_peak_less_context_gib"] if plan else None))  # fmt: skip
        if fits.get("load_peak_gib"):
            f = lambda q: fits[q][f"at_{TARGET_LAYERS}_gib"] if fits.get(q) else step_plans[TARGET_LAYERS]  # noqa: E731
            plan = plans.get(TARGET_LAYERS)
            goals.append(check_goals(TARGET_LAYERS, f("load_peak_gib"), f("step_peak_gib"), f("load_rss_gib"), f("after_engine_gib"),
                                     largest / GIB, plan["load_peak_less_context_gib"] if plan else None, extrapolated=True))  # fmt: skip
        out[f"{path}/offload={offload}/rank{rank}"] = {"fits": fits, "goals": goals}
    return out


def check_goals(layers, load, step, rss, shards, largest, plan, extrapolated=False) -> dict:
    rss_bar = largest + shards + 2.0
    return {
        "layers": layers, "extrapolated": extrapolated, "load_peak_gib": load, "step_peak_gib": step, "planner_load_gib": plan,
        "goal1_load_le_step": load <= step,
        "goal2_within_10pct_of_planner": None if plan is None else abs(load - plan) <= 0.10 * plan,
        "load_over_planner": None if plan is None else load / plan,
        "load_rss_gib": rss, "rss_bar_gib": rss_bar, "goal3_rss_le_bar": rss <= rss_bar,
    }  # fmt: skip


# ---------------------------------------------------------------------------- the report


def format_markdown(record: dict) -> str:
    g = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    lines = [
        f"# FSDP2 loading on {record['processes']} processes, {record['model']}", "",
        f"{record['date']}, {record['device']}; torch {record['versions']['torch']}, transformers {record['versions']['transformers']}, "
        f"bitsandbytes {record['versions']['bitsandbytes']}, qlora-lite {record['versions']['qlora_lite_commit']}"
        + (" (with uncommitted changes under qlora_lite/)" if record["versions"]["qlora_lite_uncommitted"] else ""), "",
        f"Command: `{record['command']}`", "",
        f"Recipe {record['recipe']}: {record['settings']}.", "",
        "Per process, GiB (meter: live tensor bytes on the " + record["meter_device"] + "; RSS: peak resident memory, Python + torch included):", "",
        "| layers | path | offload | rank | load peak | after load | after engine | step peak | RSS after load | RSS after step | load s | step s | loss |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for r in sorted(record["runs"], key=lambda r: (r["layers"], r["path"], str(r["offload"]), r.get("rank", -1))):
        if "failed" in r:
            lines.append(f"| {r['layers']} | {r['path']} | {r['offload']} | - | failed: {r['failed'][-200:].replace(chr(10), ' ')} |")
            continue
        lines.append(
            f"| {r['layers']} | {r['path']} | {r['offload']} | {r['rank']} | {g(r['load_peak_bytes'])} | {g(r['after_load_bytes'])} | "
            f"{g(r['after_engine_bytes'])} | {g(r['step_peak_bytes']) if 'step_peak_bytes' in r else 'not run'} | {g(r['load_rss_bytes'])} | {g(r['rss_after_step_bytes'])} | "
            f"{r['load_s']:.0f} | {r['step_s']:.0f} | {r['loss']:.3f} |"
        )
    if any("load_cuda_max_allocated_bytes" in r for r in record["runs"]):
        lines += ["", "| layers | path | offload | rank | cuda max allocated while loading | during the step |", "| ---: | --- | --- | ---: | ---: | ---: |"]
        for r in record["runs"]:
            if "load_cuda_max_allocated_bytes" in r:
                lines.append(f"| {r['layers']} | {r['path']} | {r['offload']} | {r['rank']} | {g(r['load_cuda_max_allocated_bytes'])} | {g(r['step_cuda_max_allocated_bytes'])} |")
    lines += ["", f"Planner, per GPU (`plan_memory(gpus={record['processes']})`; 'less context': without the {PLANNER_DEVICE_EXTRA} a CPU has not):", "",
              "| layers | offload | loading | loading less context | step | step less context |", "| ---: | --- | ---: | ---: | ---: | ---: |"]  # fmt: skip
    for p in record["planner"]:
        lines.append(f"| {p['layers']} | {p['offload']} | {p['load_peak_gib']:.2f} | {p['load_peak_less_context_gib']:.2f} | {p['step_total_gib']:.2f} | {p['step_less_context_gib']:.2f} |")
    lines += ["", f"Fits value(L) = a + b L over the measured layer counts, at {TARGET_LAYERS} layers (GiB):", "",
              "| path / offload / rank | quantity | a | b per layer | at 80 |", "| --- | --- | ---: | ---: | ---: |"]  # fmt: skip
    for key, d in record.get("derived", {}).items():
        for q, f in d["fits"].items():
            if f:
                lines.append(f"| {key} | {q.removesuffix('_gib')} | {f['a_gib']:.3f} | {f['b_gib_per_layer']:.3f} | {f[f'at_{TARGET_LAYERS}_gib']:.2f} |")
    lines += ["", "Goals: (1) loading peak <= step peak; (2) loading peak within 10% of the planner's (less context); "
              "(3) RSS after loading <= largest unit's bf16 bytes + the process's shards (after engine) + 2 GiB.", "",
              "| path / offload / rank | layers | load | step | (1) | planner | load / planner | (2) | RSS | bar | (3) |",
              "| --- | ---: | ---: | ---: | --- | ---: | ---: | --- | ---: | ---: | --- |"]  # fmt: skip
    yes = lambda v: "-" if v is None else ("met" if v else "NOT met")  # noqa: E731
    for key, d in record.get("derived", {}).items():
        for c in d["goals"]:
            plan = "-" if c["planner_load_gib"] is None else f"{c['planner_load_gib']:.2f}"
            ratio = "-" if c["load_over_planner"] is None else f"{c['load_over_planner']:.2f}"
            layers = f"{c['layers']} (fit)" if c["extrapolated"] else str(c["layers"])
            lines.append(
                f"| {key} | {layers} | {c['load_peak_gib']:.2f} | {c['step_peak_gib']:.2f} | {yes(c['goal1_load_le_step'])} | {plan} | {ratio} | "
                f"{yes(c['goal2_within_10pct_of_planner'])} | {c['load_rss_gib']:.2f} | {c['rss_bar_gib']:.2f} | {yes(c['goal3_rss_le_bar'])} |"
            )
    lines += ["", "Largest storages alive at each loading peak and step peak (rank 0):", ""]
    for r in record["runs"]:
        if r.get("rank") == 0:
            for what in ("load", "step") if "step_peak_bytes" in r else ("load",):
                lines.append(f"- {r['path']}, offload {r['offload']}, {r['layers']} layers, {what} peak {g(r[f'{what}_peak_bytes'])} GiB:")
                for b in r[f"{what}_peak_breakdown"][:6]:
                    lines.append(f"  - {b['bytes'] / GIB:.3f} GiB: {b['count']} x `{b['op']}` {b['dtype']}[{'x'.join(map(str, b['shape']))}]")
    lines += ["", *record["notes"]]
    return "\n".join(lines) + "\n"


def versions() -> dict:
    import bitsandbytes
    import torch
    import transformers

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], capture_output=True, text=True, cwd=REPO).stdout.strip()

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__,
        "qlora_lite_commit": git("rev-parse", "--short", "HEAD"), "qlora_lite_uncommitted": git("status", "--porcelain", "--", "qlora_lite").splitlines(),
    }  # fmt: skip


NOTES = [
    "Notes:",
    "- load peak: a MemoryMeter around fit's load_model, in each process: every tensor storage that process allocated while loading, at its most. "
    "It does not see a storage an operation allocates and frees inside one kernel (bitsandbytes' quantization scratch), nor what a DTensor "
    "operation allocates inside its own dispatch.",
    "- after load: what the meter saw alive when load_model returned (the layers' shards, the constants, the root's head and norm whole); "
    "after engine: the local bytes of every parameter, buffer and quantization constant once build_engine sharded the root.",
    "- step peak: a MemoryMeter around run_step (forward and backward with gradient checkpointing, clip, AdamW step), micro-batch 1. "
    "Storages alive before the step are counted when the step first reads them (found baseline).",
    "- planner: the per-GPU loading figure for the same recipe and layer count, less the CUDA context (0.75 GiB) and NCCL (0.25 GiB). "
    "On the CPU goal (2) compares with the figure for dist.cpu_offload=false whatever the run's setting: with offload the planner leaves "
    "the shards out of the GPU's figure (they are in CPU RAM), but the CPU meter counts them.",
    "- on a CPU dist.cpu_offload moves nothing: the shards are in CPU RAM either way, and the meter counts the CPU.",
    "- 'step peak: not run' (--skip-step): on the 23 GiB, 2-core CPU machine the 70B-width step does not fit beside a second process without "
    "swap (rank 1 was killed by the OOM killer at 10.5 GiB RSS). With a 16 GiB swap file the step ran once at 2 layers "
    "(fsdp-loading-70b-step-cpu.md): 11.04 / 13.00 GiB per process, 7.83 GiB of it FSDP2's all-gather buffers of the lm_head and the "
    "embeddings at the forward's start, which the planner now counts (sharding.forward_start_gather_bytes). Without a step, goal (1) "
    "compares with the planner's step figure (dist.cpu_offload=false, less CUDA context and NCCL).",
    "- MemoryMeter as shipped raises on FSDP2's DTensors ('Attempted to access the data pointer on an invalid python storage'); the worker "
    "uses a subclass that tracks a DTensor's local shard (shard_aware_meter).",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--paths", nargs="+", choices=("layerwise", "whole"), default=["layerwise", "whole"])
    parser.add_argument("--offload", nargs="+", choices=("true", "false"), default=["true"], help="dist.cpu_offload values to run")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    parser.add_argument("--quick", action="store_true", help="hidden 1024 / intermediate 3584 / vocab 32000: checks the plumbing")
    parser.add_argument("--extra", nargs="*", default=[], help="more recipe overrides, KEY=VALUE")
    parser.add_argument("--skip-step", action="store_true", help="measure loading only (the step at 70B widths needs ~11 GiB per process on a CPU)")
    parser.add_argument("--name", default=None)
    parser.add_argument("--work", default=None, help="folder for the random checkpoint (default: a temporary one, removed at the end)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    for hidden in ("--worker", "--path", "--model-dir", "--data", "--run-dir", "--result-dir", "--layers-one", "--offload-one"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, **({"action": "store_true"} if hidden == "--worker" else {}))
    args = parser.parse_args()
    if args.worker:
        args.layers_one, args.offload_one = int(args.layers_one), args.offload_one == "true"
        return worker(args)

    import torch

    cuda = torch.cuda.is_available()
    if cuda and torch.cuda.device_count() < args.processes:
        print(f"skipped: {torch.cuda.device_count()} GPU, {args.processes} needed")
        return 0
    name = args.name or ("quick" if args.quick else "70b")
    name = f"fsdp-loading-{name}-{'cuda' if cuda else 'cpu'}"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="fsdp-loading-"))
    work.mkdir(parents=True, exist_ok=True)
    config = build_model_config(args.quick, TARGET_LAYERS)
    widths = {k: config[k] for k in ("hidden_size", "num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size")}
    device = f"cuda: {args.processes} x {torch.cuda.get_device_name(0)}, nccl" if cuda else f"cpu: {platform.machine()}, {os.cpu_count()} cores, {args.threads} thread(s) per process, gloo"
    record = {
        "model": ("quick Llama " if args.quick else "Llama-3.1-70B widths ") + ", ".join(f"{k} {v}" for k, v in widths.items()) + ", untied, random bf16",
        "widths": widths, "layers": args.layers, "paths": args.paths, "offload": [v == "true" for v in args.offload], "seq": args.seq,
        "processes": args.processes, "device": device, "meter_device": "cuda" if cuda else "cpu",
        "date": datetime.date.today().isoformat(), "versions": versions(), "recipe": RECIPE.name,
        "settings": f"fsdp, NF4 + double quant, LoRA r 16 all-linear fp32, bf16 compute and autocast, gradient checkpointing, micro-batch 1 x "
                    f"{args.seq} tokens per process, 1 step, AdamW" + (f"; overrides {args.extra}" if args.extra else ""),
        "command": "python benchmarks/fsdp_loading.py " + " ".join(sys.argv[1:]),
        "unit_bf16_bytes": unit_bf16_bytes(config), "runs": [], "planner": [], "notes": NOTES,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        record["derived"] = derive(record)
        (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
        (out / f"{name}.md").write_text(format_markdown(record))

    try:
        start = time.perf_counter()
        folders = write_checkpoints(work, args.quick, args.layers)
        data = write_data(work, args.seq)
        print(f"random bf16 checkpoint written in {time.perf_counter() - start:.0f} s: {work}", flush=True)
        for offload in (False, True):
            for layers in [*args.layers, TARGET_LAYERS]:
                record["planner"].append(planned(folders[args.layers[0]], layers, offload, args.seq, args.processes))
        for path in args.paths:
            for offload in record["offload"]:
                for layers in args.layers:
                    ranks = launch(folders[layers], data, work, path, layers, offload, args)
                    if isinstance(ranks, dict):
                        print(f"{path} {layers} layers offload {offload}: FAILED {ranks['failed'][-600:]}", flush=True)
                        record["runs"].append(ranks)
                    else:
                        for r in ranks:
                            print(f"{path:9s} {layers} layers offload {offload} rank {r['rank']}: load peak {r['load_peak_bytes'] / GIB:.2f}, "
                                  f"after load {r['after_load_bytes'] / GIB:.2f}, after engine {r['after_engine_bytes'] / GIB:.2f}, "
                                  f"step peak {r.get('step_peak_bytes', float('nan')) / GIB:.2f}, RSS load {r['load_rss_bytes'] / GIB:.2f} GiB; "
                                  f"load {r['load_s']:.0f} s, step {r['step_s']:.0f} s", flush=True)  # fmt: skip
                        record["runs"].extend(ranks)
                    save()
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    save()
    print(format_markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
