"""Long context on one GPU: device and host bytes of a training step, the PEFT stack against ours, side by side.

Three sides load the same random-weight Llama-3.1-8B-shaped checkpoint (bf16 on disk, NF4 with double
quantization on load, bf16 autocast compute, as fit() runs), LoRA r=16 / alpha 32 / dropout 0 on every
linear layer of every block, gradient checkpointing, micro-batch 1 (or --micro-batch), every token labelled:

  * peft:    transformers + bitsandbytes + peft (prepare_model_for_kbit_training, its default non-reentrant
             checkpointing), sdpa, transformers' loss `model(**batch).loss`;
  * plain:   qlora-lite as fit() assembles it (recipes/llama3.1-8b-alpaca.yaml, chunked loss), without
             activation offload or tiled MLP;
  * offload: the same with model.activation_offload and model.tiled_mlp on (tile: planner.choose_mlp_tile_tokens).

Each measurement runs in a fresh subprocess; `qlora_lite.MemoryMeter` measures the step on the CPU:
device bytes (everything but what the offload store holds) and host bytes (what it holds: on a GPU, pinned
host memory), each at its own peak, and the device peak of the forward (to the loss) and of the backward.
A side that would not fit this machine's RAM at some length is not run and the table says so.

Derived (per side, from the grid): per-token slope at fixed layers, per-layer slope at fixed length;
the fit  device(L, T) = a + b L + c T + d L T  over the grid, extrapolated to 32 layers and 131,072 tokens,
beside the planner's figure for the same step (its total less the CUDA context allowance, which a CPU has not).

    python benchmarks/long_context.py                              # 8B widths, 1 and 2 layers, 4k/8k/16k: ~1 hour on 2 cores
    python benchmarks/long_context.py --layers 1 2 --seq 4096 8192 --sides plain offload
    python benchmarks/long_context.py --widths 1024,2,3584,32000 --name quick   # narrower widths, minutes

Writes benchmarks/results/long-context-<name>-<cpu|cuda>.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import memory_compare as mc

GIB = 1024**3
KIB = 1024
SIDES = ("peft", "plain", "tiled", "offload")
RESULT_MARK = "RESULT "
TARGET_LAYERS, TARGET_TOKENS = 32, 131072


# ---------------------------------------------------------------------------- one measurement, in its own process


def load_side(side: str, model_dir: str, device):
    """The model and the loss function of one side."""
    from qlora_lite import (
        ActivationOffload,
        apply_lean_rms_norm,
        apply_tiled_mlp,
        attach_method,
        choose_mlp_tile_tokens,
        compute_causal_lm_loss,
        enable_gradient_checkpointing,
        keep_4bit_layout,
        load_base_model,
        load_recipe,
    )

    if side == "peft":
        mc.LORA["dropout"] = 0.0
        model = mc.load_peft_stack(model_dir, device)
        keep_4bit_layout(model)
        return model, lambda m, batch: m(**batch).loss, None
    cfg = load_recipe(mc.RECIPE, [f"model.name_or_path={model_dir}", "lora.dropout=0"])
    model = load_base_model(cfg.model, cfg.quant, device, model_dir)
    apply_lean_rms_norm(model)
    store = ActivationOffload(device) if side == "offload" else None
    enable_gradient_checkpointing(model, store.checkpoint if store else None)
    if side in ("tiled", "offload"):
        apply_tiled_mlp(model, choose_mlp_tile_tokens(model.config))
    model = attach_method(model, cfg, tokenizer=None)
    return model, lambda m, batch: compute_causal_lm_loss(m, batch, cfg.train), store


def measure(side: str, model_dir: str, micro_batch: int, seq: int, threads: int, timed_steps: int = 0, cap_gib: float | None = None) -> dict:
    import torch
    from accelerate import Accelerator

    from qlora_lite import MemoryMeter, format_peak_breakdown, pick_device

    torch.manual_seed(0)
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    elif cap_gib:  # a 24 GB card on a larger GPU: the allocator refuses past the cap, as the small card would
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / torch.cuda.get_device_properties(device).total_memory), device)
    model, compute_loss, store = load_side(side, model_dir, device)
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    model = accelerator.prepare(model)
    model.train()
    config = model.config if hasattr(model, "config") else model.base_model.config
    batch = mc.build_batch(config.vocab_size, micro_batch, seq, device)
    batch.pop("attention_mask")  # micro-batch 1 without padding: no mask, sdpa's causal kernel
    if device.type != "cpu":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with MemoryMeter(baseline=[model, batch], device=device.type) as meter:
        meter.start_phase("forward")
        with accelerator.autocast():
            loss = compute_loss(model, batch)
        meter.start_phase("backward")
        accelerator.backward(loss)
    if device.type != "cpu":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - start
    print(format_peak_breakdown(meter, top=12), file=sys.stderr)
    largest = max((a.nbytes for a in meter.allocations if not a.is_baseline), default=0)
    result = {
        "side": side, "layers": config.num_hidden_layers, "micro_batch": micro_batch, "seq": seq, "tokens": micro_batch * seq,
        "loss": float(loss), "step_s": step_s,
        "static_gib": meter.baseline_bytes / GIB,
        "device_peak_gib": meter.peak_device_bytes / GIB, "host_peak_gib": meter.peak_host_bytes / GIB,
        "total_peak_gib": meter.peak_bytes / GIB,
        "forward_device_peak_gib": meter.phase_peaks["forward"] / GIB, "backward_device_peak_gib": meter.phase_peaks["backward"] / GIB,
        "largest_storage_mib": largest / 2**20,
        "device_peak_breakdown": meter.peak_breakdown(top=10, device_only=True),
        "grad_sum": float(sum(p.grad.float().abs().sum() for p in model.parameters() if p.grad is not None)),
    }  # fmt: skip
    if device.type != "cpu":
        result["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    if timed_steps:  # unmetered steps (the meter's dispatch mode slows every op): the step time to compare sides by
        times = []
        for _ in range(timed_steps):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            with accelerator.autocast():
                loss = compute_loss(model, batch)
            accelerator.backward(loss)
            if device.type != "cpu":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        result.update(timed_step_s=times, median_step_s=sorted(times)[len(times) // 2], tokens_per_s=micro_batch * seq / sorted(times)[len(times) // 2])
    return result


def run_in_subprocess(side: str, model_dir: Path, micro_batch: int, seq: int, args) -> dict:
    """One measurement in a fresh interpreter, so that nothing of the previous one is alive."""
    command = [
        sys.executable, __file__, "--measure", side, "--model-dir", str(model_dir), "--micro-batch", str(micro_batch), "--seq", str(seq),
        "--threads", str(args.threads), "--timed-steps", str(args.timed_steps), *(["--cap-gib", str(args.cap_gib)] if args.cap_gib else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=REPO)
    sys.stderr.write("".join(line + "\n" for line in out.stderr.splitlines()[-16:] if "kernels" not in line))
    line = next((line for line in out.stdout.splitlines() if line.startswith(RESULT_MARK)), None)
    if line is None:
        last = out.stderr.strip().splitlines()[-1:] or [""]
        return {"side": side, "seq": seq, "failed": f"exit code {out.returncode}: {last[0][:300]}"}
    return json.loads(line[len(RESULT_MARK) :])


# ---------------------------------------------------------------------------- the planner's figures and the fits


def planned(side: str, layers: int, tokens: int, model_dir: Path, micro_batch: int = 1) -> dict:
    """The planner's device bytes (less the CUDA context allowance) and host bytes for this step; none for the PEFT stack
    (the planner plans qlora-lite's step, not transformers' loss and PEFT's fp32 casts)."""
    from qlora_lite import load_recipe, plan_memory, read_model_config

    if side == "peft":
        return {}

    offload = str(side == "offload").lower()
    overrides = [
        f"model.name_or_path={model_dir}", "lora.dropout=0", f"train.micro_batch_size={micro_batch}", f"train.max_seq_len={tokens // micro_batch}",
        f"model.activation_offload={offload}", f"model.tiled_mlp={offload}",
    ]  # fmt: skip
    cfg = load_recipe(mc.RECIPE, overrides)
    config = read_model_config(str(model_dir))
    config.num_hidden_layers = layers
    plan = plan_memory(cfg, config, vram_bytes=1 << 50)
    return {"device_gib": (plan.total_bytes - plan.cuda_context_bytes) / GIB, "host_gib": plan.host_ram_bytes / GIB}


def fit_bilinear(runs: list[dict], key: str) -> dict | None:
    """device(L, T) = a + b L + c T + d L T, least squares over the runs; slopes in KiB per token."""
    import numpy as np

    rows = [(r["layers"], r["tokens"], r[key]) for r in runs if key in r]
    if len({(L, T) for L, T, _ in rows}) < 4 or len({L for L, _, _ in rows}) < 2 or len({T for _, T, _ in rows}) < 2:
        return None
    A = np.array([[1, L, T, L * T] for L, T, _ in rows], dtype=float)
    y = np.array([v for _, _, v in rows], dtype=float)
    a, b, c, d = np.linalg.lstsq(A, y, rcond=None)[0]
    return {
        "per_token_kib_at_1_layer": (c + d) * GIB / KIB, "per_token_kib_per_layer": d * GIB / KIB,
        f"per_token_kib_at_{TARGET_LAYERS}_layers": (c + d * TARGET_LAYERS) * GIB / KIB,
        f"at_{TARGET_LAYERS}_layers_{TARGET_TOKENS}_tokens_gib": a + b * TARGET_LAYERS + c * TARGET_TOKENS + d * TARGET_LAYERS * TARGET_TOKENS,
        "max_residual_gib": float(max(abs(A @ np.array([a, b, c, d]) - y))),
    }  # fmt: skip


def fit_offloaded(runs: list[dict], key: str) -> dict | None:
    """With offload two layers' inputs stay on the device, so a layer more adds its weights, not tokens:
    device(L, T) = a + c T, fitted at the most layers measured L0, + (L - L0) x the measured static bytes per layer."""
    import numpy as np

    layer_counts = sorted({r["layers"] for r in runs if key in r})
    top = layer_counts[-1] if layer_counts else 0
    # The two longest steps: at 4,096 tokens (one tile of hidden_size tokens) the MLP is not tiled yet.
    longest = sorted({r["tokens"] for r in runs if r["layers"] == top and key in r})[-2:]
    rows = [(r["tokens"], r[key]) for r in runs if r["layers"] == top and key in r and r["tokens"] in longest]
    if len(layer_counts) < 2 or len(longest) < 2:
        return None
    c, a = np.polyfit([T for T, _ in rows], [v for _, v in rows], 1)
    static = {L: next(r["static_gib"] for r in runs if r["layers"] == L) for L in layer_counts}
    per_layer = (static[top] - static[layer_counts[0]]) / (top - layer_counts[0])
    return {
        "per_token_kib_at_1_layer": c * GIB / KIB, "per_token_kib_per_layer": 0.0, f"per_token_kib_at_{TARGET_LAYERS}_layers": c * GIB / KIB,
        f"at_{TARGET_LAYERS}_layers_{TARGET_TOKENS}_tokens_gib": a + c * TARGET_TOKENS + (TARGET_LAYERS - top) * per_layer,
        "from_layers": top, "static_per_layer_gib": per_layer,
    }  # fmt: skip


def extrapolate_p_recipe(runs: list[dict]) -> dict:
    """Micro-batch 2 x 2048 (the P recipe): device peak at 32 layers, peak(L0) + (32 - L0) x per layer, per side."""
    out = {}
    for side in SIDES:
        by_layers = {r["layers"]: r for r in runs if r["side"] == side and r.get("tokens") == 4096 and r.get("micro_batch") == 2 and "device_peak_gib" in r}
        if len(by_layers) >= 2:
            lo, hi = min(by_layers), max(by_layers)
            per_layer = (by_layers[hi]["device_peak_gib"] - by_layers[lo]["device_peak_gib"]) / (hi - lo)
            out[side] = by_layers[lo]["device_peak_gib"] + (TARGET_LAYERS - lo) * per_layer
    if "peft" in out:
        out["ratios_to_peft"] = {side: out[side] / out["peft"] for side in SIDES if side in out}
    return out


# ---------------------------------------------------------------------------- output


def format_markdown(record: dict) -> str:
    lines = [
        (
            f"Long-context training step, LoRA r=16 all-linear (dropout 0) on NF4, {record['model']}, every token labelled, "
            f"bf16 autocast, {record['device']}, {record['date']}."
        ),
        (
            "Measured with `qlora_lite.MemoryMeter`: device = live storages except what the offload store holds; host = what it holds "
            "(pinned host memory on a GPU); each at its own peak. Planner: `plan_memory` for the same step, its CUDA context allowance left out."
        ),
        "",
        "| side | layers | micro-batch x seq | device peak GiB | host peak GiB | forward / backward device peak GiB | planner device GiB | planner host GiB | largest storage MiB | step s | loss |",
        "| --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(record["runs"], key=lambda r: (SIDES.index(r["side"]), r.get("micro_batch", 1), r.get("layers", 0), r["seq"])):
        shape = f"{r.get('micro_batch', 1)} x {r['seq']}"
        if "device_peak_gib" not in r:
            lines.append(f"| {r['side']} | {r.get('layers', '')} | {shape} | {r.get('skipped') or r.get('failed')} | | | | | | | |")
            continue
        p = r.get("planned", {})
        lines.append(
            f"| {r['side']} | {r['layers']} | {shape} | {r['device_peak_gib']:.2f} | {r['host_peak_gib']:.2f} | "
            f"{r['forward_device_peak_gib']:.2f} / {r['backward_device_peak_gib']:.2f} | {p.get('device_gib', float('nan')):.2f} | "
            f"{p.get('host_gib', float('nan')):.2f} | {r['largest_storage_mib']:.0f} | {r['step_s']:.0f} | {r['loss']:.4f} |"
        )
    lines += [
        "",
        "Fitted device peak (micro-batch 1; measured, and the planner's at the same points), extrapolated to 32 layers x 131,072 tokens:",
        "",
        "| side | source | KiB per token at 1 layer | KiB per token per layer | KiB per token at 32 layers | 32 layers x 131,072 tokens GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for side, fits in record["fits"].items():
        for source, f in fits.items():
            if f:
                lines.append(
                    f"| {side} | {source} | {f['per_token_kib_at_1_layer']:.1f} | {f['per_token_kib_per_layer']:.2f} | "
                    f"{f['per_token_kib_at_32_layers']:.1f} | {f['at_32_layers_131072_tokens_gib']:.1f} |"
                )
    p_recipe = record.get("p_recipe") or {}
    if any(side in p_recipe for side in SIDES):
        lines += ["", "Micro-batch 2 x 2048 (the P recipe), device peak extrapolated to 32 layers: " + ", ".join(
            f"{side} {p_recipe[side]:.2f} GiB" + (f" ({p_recipe['ratios_to_peft'][side]:.2f}x PEFT)" if "ratios_to_peft" in p_recipe else "")
            for side in SIDES if side in p_recipe
        ) + "."]  # fmt: skip
    timed = [r for r in record["runs"] if r.get("median_step_s")]
    if timed:
        lines += ["", "Unmetered step times (the meter's dispatch mode slows every op), median of the timed steps:", "",
                  "| side | layers | micro-batch x seq | median step s | all s | tokens/s |", "| --- | ---: | ---: | ---: | --- | ---: |"]  # fmt: skip
        for r in timed:
            lines.append(
                f"| {r['side']} | {r['layers']} | {r['micro_batch']} x {r['seq']} | {r['median_step_s']:.2f} | "
                f"{', '.join(f'{t:.2f}' for t in r['timed_step_s'])} | {r['tokens_per_s']:.0f} |"
            )
        by_side = {(r["side"], r["layers"], r["tokens"]): r["median_step_s"] for r in timed}
        for (side, layers, tokens), seconds in by_side.items():
            if side == "offload" and ("tiled", layers, tokens) in by_side:
                cost = seconds / by_side[("tiled", layers, tokens)] - 1
                lines += ["", f"Offload's step-time cost ({layers} layers, {tokens} tokens): {cost:+.1%} against the same step without it (goal: at most 5%)."]
    if record.get("goals"):
        lines += ["", "Goals (issue 23):", "", *[f"- {goal}" for goal in record["goals"]]]
    lines += ["", *[f"- {note}" for note in record["notes"]]]
    return "\n".join(lines) + "\n"


def check_goals(record: dict) -> list[str]:
    """Issue 23's goals, each with its figure and whether it is met."""
    fits, lines = record["fits"], []
    offload = (fits.get("offload") or {}).get("measured")
    if offload:
        per_token = offload["per_token_kib_at_32_layers"]
        lines.append(f"device bytes per token with offload and tiles, 32 layers: {per_token:.1f} KiB (goal: at most 140): {'met' if per_token <= 140 else 'missed'}")
        total = offload["at_32_layers_131072_tokens_gib"] + 0.75  # + the planner's CUDA context allowance
        lines.append(f"32 layers x 131,072 tokens, device: {total:.2f} GiB with a 0.75 GiB CUDA context (goal: under 24): {'met' if total < 24 else 'missed'}")
    for side in ("plain", "offload"):
        measured, planner = (fits.get(side) or {}).get("measured"), (fits.get(side) or {}).get("planner")
        if measured and planner:
            ratio = planner["per_token_kib_at_1_layer"] / measured["per_token_kib_at_1_layer"]
            line = f"{side}: planner / meter, KiB per token {ratio:.3f}"
            if measured["per_token_kib_per_layer"]:
                layer_ratio = planner["per_token_kib_per_layer"] / measured["per_token_kib_per_layer"]
                line += f", per layer {layer_ratio:.3f}"
                ratio = max(abs(ratio - 1), abs(layer_ratio - 1)) + 1
            lines.append(line + f" (goal: within 10%): {'met' if abs(ratio - 1) <= 0.10 else 'missed'}")
    ratios = (record.get("p_recipe") or {}).get("ratios_to_peft", {})
    if "offload" in ratios:
        lines.append(f"micro-batch 2 x 2048, 32 layers: offload and tiles {ratios['offload']:.3f}x the PEFT stack's device peak (goal: at most 0.42x): "
                     f"{'met' if ratios['offload'] <= 0.42 else 'missed'}; without them {ratios.get('plain', float('nan')):.3f}x")  # fmt: skip
    return lines


def summarize(record: dict, path: Path) -> None:
    """The fits, the P recipe's figures, the notes and the markdown, from the runs in record."""
    one = [r for r in record["runs"] if r.get("micro_batch", 1) == 1 and "device_peak_gib" in r]
    record["fits"] = {}
    for side in SIDES:
        runs = [r for r in one if r["side"] == side]
        planned_runs = [{**r, "planner": r["planned"]["device_gib"]} for r in runs if r.get("planned")]
        fit = fit_offloaded if side == "offload" else fit_bilinear
        if runs:
            record["fits"][side] = {"measured": fit(runs, "device_peak_gib"), "planner": fit(planned_runs, "planner") if planned_runs else None}
    record["p_recipe"] = extrapolate_p_recipe(record["runs"])
    record["goals"] = check_goals(record)
    record["notes"] = [
        "32 layers and 131,072 tokens are extrapolations from the grid, not measurements: no GPU was lent, and this CPU has 23 GiB of RAM.",
        "A CPU step moves nothing: the offload store relabels what it holds as host memory, so device + host is what a GPU would split.",
        "offload: a layer more adds only its weights on the device (its input waits on the host), so its 32-layer figure is the line "
        "through its two longest steps at the most layers measured plus the measured static bytes per layer; peft and plain: the bilinear fit.",
        "offload tiles the MLP in tiles of hidden_size (4,096) tokens: at 4,096 tokens there is one tile, so the per-token slope is fitted over longer steps.",
    ]
    path.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    path.with_suffix(".md").write_text(format_markdown(record))
    print(format_markdown(record))


def write_configs(work: Path, quick: bool, layer_counts: list[int]) -> dict[int, Path]:
    """config.json alone, per layer count: all the planner reads."""
    from transformers import AutoConfig

    folders = {}
    for layers in layer_counts:
        folder = work / f"config-{layers}"
        folder.mkdir(parents=True, exist_ok=True)
        AutoConfig.for_model(**mc.build_model_config(quick, layers)).save_pretrained(folder)
        folders[layers] = folder
    return folders


def set_widths(widths: str | None) -> None:
    if widths:
        hidden, kv_heads, inter, vocab = (int(x) for x in widths.split(","))
        mc.QUICK_WIDTHS.update(hidden_size=hidden, num_key_value_heads=kv_heads, intermediate_size=inter, vocab_size=vocab, num_attention_heads=hidden // 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--widths", default=None, help="hidden,kv_heads,intermediate,vocab instead of Llama-3.1-8B's")
    parser.add_argument("--name", default="llama8b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ram-gib", type=float, default=None, help="RAM a measurement may use (default: what /proc/meminfo says is available, less 2 GiB)")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--append", action="store_true", help="add the runs to the results file of the same name instead of starting it over")
    parser.add_argument("--timed-steps", type=int, default=0, help="unmetered steps after the metered one, for step times (median)")
    parser.add_argument("--cap-gib", type=float, default=None, help="CUDA: cap the allocator at this many GiB (torch.cuda.set_per_process_memory_fraction)")
    parser.add_argument("--replan", default=None, help="a results .json: recompute the planner's figures and the fits (after a planner change)")
    parser.add_argument("--measure", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        result = measure(args.measure, args.model_dir, args.micro_batch, args.seq[0], args.threads, args.timed_steps, args.cap_gib)
        print(RESULT_MARK + json.dumps(result))
        return

    import torch

    from qlora_lite import read_available_ram_bytes

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="long-context-"))
    if args.replan:
        path = Path(args.replan)
        record = json.loads(path.read_text())
        set_widths(record.get("widths"))
        folders = write_configs(work, bool(record.get("widths")), sorted({r["layers"] for r in record["runs"] if "layers" in r}))
        for r in record["runs"]:
            if "device_peak_gib" in r:
                r["planned"] = planned(r["side"], r["layers"], r["tokens"], folders[r["layers"]], r["micro_batch"])
        summarize(record, path.with_suffix(""))
        return

    set_widths(args.widths)
    ram = args.ram_gib * GIB if args.ram_gib else (read_available_ram_bytes() or 0) - 2 * GIB
    device = "cuda" if torch.cuda.is_available() else "cpu"
    folders = mc.write_checkpoints(work, bool(args.widths), sorted(set(args.layers)))
    name = f"long-context-{args.name}-{device}"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    record = {
        "model": "Llama-3.1-8B shapes" if not args.widths else f"Llama shapes hidden,kv_heads,intermediate,vocab = {args.widths}",
        "device": f"{device}: {platform.machine()}, {args.threads} threads", "date": datetime.date.today().isoformat(),
        "runs": [], "fits": {}, "notes": [], "widths": args.widths,
    }  # fmt: skip
    if args.append and path.exists():
        record["runs"] = json.loads(path.read_text())["runs"]
    for layers in sorted(set(args.layers)):
        for seq in sorted(args.seq):
            for side in args.sides:
                tokens = args.micro_batch * seq
                plan = planned(side, layers, tokens, folders[layers], args.micro_batch)
                # The planner's device + host bytes are what this CPU needs too (the same tensors), with some slack; the PEFT
                # stack: its fp32 embeddings and head (~4.2 GiB) and transformers' loss, ~1.75 MiB per token of a 128k
                # vocabulary (memory-llama8b-cpu.md: 6.85 GiB at 4,096 tokens).
                need = (4.5 * GIB + tokens * 1.75 * 2**20) if side == "peft" else (plan["device_gib"] + plan["host_gib"]) * GIB * 1.15
                base = {"side": side, "layers": layers, "seq": seq, "micro_batch": args.micro_batch, "tokens": tokens}
                if device == "cpu" and need > ram:
                    record["runs"].append({**base, "skipped": f"not run: needs ~{need / GIB:.0f} GiB, this machine {ram / GIB:.0f} GiB of RAM"})
                    continue
                print(f"{side}: {layers} layers x {args.micro_batch} x {seq} tokens", file=sys.stderr, flush=True)
                result = run_in_subprocess(side, folders[layers], args.micro_batch, seq, args)
                record["runs"].append({**base, **result, "planned": plan})
                path.write_text(json.dumps(record, indent=1) + "\n")
    summarize(record, path.with_suffix(""))


if __name__ == "__main__":
    main()
