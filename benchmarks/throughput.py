"""Training throughput and memory: qlora-lite against transformers + bitsandbytes + PEFT, same work.

Both sides train LoRA r=16 (alpha 32) on all linear layers of the same random-weight
checkpoint, loaded in NF4 with double quantization and bf16 compute (fp32 on the CPU), with
non-reentrant gradient checkpointing, paged 8-bit AdamW (unpaged on the CPU), SDPA attention and
the same token batches. Side (a) is qlora-lite's own pieces (`load_base_model`, `attach_method`,
`build_optimizer`); side (b) is the usual PEFT script: `BitsAndBytesConfig` +
`prepare_model_for_kbit_training` + `get_peft_model` + `bnb.optim.PagedAdamW8bit`. Each side computes
its loss as its own loop does: fit()'s (`train.loss: chunked` by default) and transformers' own.
Each case runs in its own process, so peak memory is that case's alone.

Measured per case: tokens/s over the timed steps (after warm-up), peak allocated and reserved
CUDA memory (peak RSS on the CPU), MFU (6N FLOPs per token with recomputation plus 12 L h s for
attention, over the GPU's dense bf16 peak), and the loss of the first steps (step 0 equal on both
sides: the same weights, and B = 0).

    python benchmarks/throughput.py                      # CPU: a tiny Llama, so it runs anywhere
    python benchmarks/throughput.py --arch llama8b       # GPU: Llama-3.1-8B shapes, seq 512/2048/8192, mbs 1/4
    python benchmarks/throughput.py --arch llama8b --longest   # GPU: also the longest seq at mbs 1 under 24 GiB

Every CUDA case also records the planner's estimate for the same recipe (less its CUDA-context
allowance, which PyTorch's counters do not see) next to the measured peak reserved memory, so one
GPU run checks `qlora-lite plan` on every configuration it measures.

Writes benchmarks/results/throughput-<device>.{json,md}.
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

# Dense bf16 peak FLOP/s by GPU name fragment (vendor datasheets, no sparsity).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12, "3090": 71e12, "T4": 65e12}
SIDES = ("qlora-lite", "peft")


def build_tiny_checkpoint(folder: Path) -> Path:
    from qlora_lite import build_tiny_model, build_tokenizer

    build_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, folder, vocab_size=256)
    build_tiny_model(folder, hidden_size=256, intermediate_size=688, num_layers=4, num_heads=8, num_kv_heads=4, vocab_size=256)
    return folder


def build_checkpoint(arch: str, folder: Path) -> Path:
    if arch == "tiny":
        return build_tiny_checkpoint(folder)
    from merge_memory import build_llama8b_inputs

    base, _ = build_llama8b_inputs(folder)  # random bf16 shards written tensor by tensor, plus a tokenizer
    return base


def run_side(side: str, base: str, micro_batch: int, seq: int, steps: int, warmup: int, vram_cap_gib: float | None) -> dict:
    """One case in this process: load, attach LoRA, train warmup + steps, measure."""
    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and vram_cap_gib:
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, vram_cap_gib * 2**30 / total), device)
    if not cuda:
        torch.set_num_threads(1)
    try:
        model, optimizer = (load_ours if side == "qlora-lite" else load_peft)(base, device)
    except torch.OutOfMemoryError:
        return {"side": side, "micro_batch": micro_batch, "seq": seq, "oom": True, "oom_at": "load"}
    params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    config = model.config
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(4, config.vocab_size, (micro_batch, seq), generator=gen) for _ in range(warmup + steps)]
    losses, start = [], None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    try:
        for i, ids in enumerate(batches):
            if i == warmup:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            ids = ids.to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                loss = compute_loss(side, model, ids)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        return {"side": side, "micro_batch": micro_batch, "seq": seq, "oom": True}
    seconds = time.perf_counter() - start
    tokens_per_s = steps * micro_batch * seq / seconds
    flops_per_token = 6 * params + 12 * config.num_hidden_layers * config.hidden_size * seq
    result = {
        "side": side, "micro_batch": micro_batch, "seq": seq, "oom": False, "tokens_per_s": tokens_per_s,
        "first_losses": losses[:3], "params": params, "flops_per_token": flops_per_token,
    }  # fmt: skip
    if cuda:
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
        result.update(
            peak_allocated_gib=torch.cuda.max_memory_allocated(device) / 2**30,
            peak_reserved_gib=torch.cuda.max_memory_reserved(device) / 2**30,
            mfu=tokens_per_s * flops_per_token / peak if peak else None,
        )
    else:
        from qlora_lite import read_peak_rss_bytes

        result.update(peak_rss_gib=read_peak_rss_bytes() / 2**30, mfu=None)
    result["planner_gib"] = estimate_peak_gib(base, micro_batch, seq)  # a GPU estimate; on the CPU only a record
    if cuda:
        result["planner_over_measured"] = result["planner_gib"] / result["peak_reserved_gib"]
    return result


def compute_loss(side: str, model, ids):
    """Each side's loss as its training loop computes it: fit()'s (the chunked loss by default) for
    qlora-lite, transformers' own for the PEFT script."""
    if side == "qlora-lite":
        from qlora_lite import TrainConfig, compute_causal_lm_loss

        return compute_causal_lm_loss(model, {"input_ids": ids, "labels": ids}, TrainConfig())
    return model(input_ids=ids, labels=ids, use_cache=False).loss


BENCH_OVERRIDES = ["lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "lora.target_modules=all-linear"]


def estimate_peak_gib(base: str, micro_batch: int, seq: int) -> float:
    """qlora-lite's planner for this case, without the CUDA context (max_memory_reserved does not count it)."""
    from qlora_lite import GIB, load_recipe, plan_memory, read_model_config

    cfg = load_recipe(None, [f"model.name_or_path={base}", *BENCH_OVERRIDES, f"train.micro_batch_size={micro_batch}", f"train.max_seq_len={seq}"])
    plan = plan_memory(cfg, read_model_config(base))
    return (plan.total_bytes - plan.cuda_context_bytes) / GIB


def load_ours(base: str, device):
    from qlora_lite import attach_method, build_optimizer, enable_gradient_checkpointing, load_base_model, load_recipe, load_tokenizer

    # bf16 LoRA weights on the GPU (the product's default); fp32 on the CPU, where bf16 matmuls are
    # slow and PEFT's LoRA weights are fp32 too.
    lora_dtype = "bfloat16" if device.type == "cuda" else "float32"
    cfg = load_recipe(None, [f"model.name_or_path={base}", *BENCH_OVERRIDES, f"lora.dtype={lora_dtype}"])
    model = load_base_model(cfg.model, cfg.quant, device, base)
    enable_gradient_checkpointing(model)
    model = attach_method(model, cfg, load_tokenizer(cfg.model, base))
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, build_optimizer(trainable, "paged_adamw_8bit", 2e-4, 0.0, device)


def load_peft(base: str, device):
    import bitsandbytes as bnb
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = torch.bfloat16 if device.type == "cuda" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, dtype=compute, device_map={"": device}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optim = bnb.optim.PagedAdamW8bit if device.type == "cuda" else bnb.optim.AdamW8bit
    return model, optim(trainable, lr=2e-4)


def run_case_in_subprocess(side: str, base: Path, micro_batch: int, seq: int, args) -> dict:
    code = (
        "import json, sys; sys.argv = ['x']; import throughput as t; "
        f"print('RESULT ' + json.dumps(t.run_side({side!r}, {str(base)!r}, {micro_batch}, {seq}, {args.steps}, {args.warmup}, {args.vram_cap!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, cwd=REPO / "benchmarks", env={**os.environ, "OMP_NUM_THREADS": "1"})
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} mbs {micro_batch} seq {seq} failed:\n{out.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


LONGEST_STEP = 512  # sequence-length granularity of the longest-sequence search


def find_longest_seq(side: str, base: Path, args) -> dict:
    """The longest sequence (a multiple of LONGEST_STEP) that side trains at micro-batch 1 under --longest-cap.

    Doubling then bisection, every probe a fresh process (one warm-up and one timed step), so an
    out-of-memory probe leaves nothing behind for the next.
    """
    from qlora_lite import search_largest

    probes: dict[int, dict] = {}

    def fits(seq: int) -> bool:
        probe = argparse.Namespace(**{**vars(args), "steps": 1, "warmup": 1, "vram_cap": args.longest_cap})
        probes[seq] = run_case_in_subprocess(side, base, 1, seq, probe)
        print(json.dumps(probes[seq]), flush=True)
        return not probes[seq]["oom"]

    longest = search_largest(fits, step=LONGEST_STEP, limit=args.longest_limit)
    return {"side": side, "longest_seq": longest, "probes": sorted(probes), "at_longest": probes.get(longest)}


def format_table(record: dict) -> str:
    cuda = record["device"].startswith("cuda")
    mem = "peak allocated / reserved GiB" if cuda else "peak RSS GiB"
    lines = [
        f"Training throughput, LoRA r=16 all-linear on NF4 ({record['arch']}), {record['device']}, {record['date']}, "
        f"{record['steps']} timed steps after {record['warmup']} warm-up.",
        "",
        f"| micro-batch x seq | side | tokens/s | {mem} | MFU | first losses |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for r in record["cases"]:
        if r["oom"]:
            lines.append(f"| {r['micro_batch']} x {r['seq']} | {r['side']} | out of memory | | | |")
            continue
        memory = f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f}" if cuda else f"{r['peak_rss_gib']:.2f}"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"
        losses = ", ".join(f"{x:.4f}" for x in r["first_losses"])
        lines.append(f"| {r['micro_batch']} x {r['seq']} | {r['side']} | {r['tokens_per_s']:,.0f} | {memory} | {mfu} | {losses} |")
    if cuda and any("planner_gib" in r for r in record["cases"]):
        lines += ["", "Planner (`qlora-lite plan`, less the CUDA-context allowance) against measured peak reserved:", ""]
        lines += ["| micro-batch x seq | side | planner GiB | measured GiB | planner / measured |", "| --- | --- | ---: | ---: | ---: |"]
        for r in record["cases"]:
            if not r["oom"]:
                lines.append(f"| {r['micro_batch']} x {r['seq']} | {r['side']} | {r['planner_gib']:.2f} | {r['peak_reserved_gib']:.2f} | {r['planner_over_measured']:.2f} |")
    if record.get("longest"):
        lines += ["", f"Longest sequence at micro-batch 1 inside a {record['longest_cap_gib']} GiB cap (steps of {LONGEST_STEP}):", ""]
        lines += ["| side | longest seq | tokens/s there | peak reserved GiB |", "| --- | ---: | ---: | ---: |"]
        for r in record["longest"]:
            at = r["at_longest"] or {}
            speed = f"{at['tokens_per_s']:,.0f}" if at.get("tokens_per_s") else "n/a"
            peak = f"{at['peak_reserved_gib']:.2f}" if at.get("peak_reserved_gib") else "n/a"
            lines.append(f"| {r['side']} | {r['longest_seq']:,} | {speed} | {peak} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=("tiny", "llama8b"), default="tiny")
    parser.add_argument("--seq", default=None, help="comma-separated sequence lengths (default: 64,256 tiny; 512,2048,8192 llama8b)")
    parser.add_argument("--micro-batch", default="1,4")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--vram-cap", type=float, default=None, help="GiB: emulate a smaller GPU (set_per_process_memory_fraction)")
    parser.add_argument("--longest", action="store_true", help="also find each side's longest sequence at micro-batch 1 under --longest-cap (CUDA only)")
    parser.add_argument("--longest-cap", type=float, default=24.0, help="GiB: the emulated card for --longest")
    parser.add_argument("--longest-limit", type=int, default=131072, help="stop the longest-sequence search here")
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    import torch

    seqs = [int(s) for s in (args.seq or ("64,256" if args.arch == "tiny" else "512,2048,8192")).split(",")]
    batches = [int(b) for b in args.micro_batch.split(",")]
    device = f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else f"cpu: {platform.machine()}, 1 thread"
    if args.longest and not torch.cuda.is_available():
        raise SystemExit("--longest needs a CUDA GPU: the cap is emulated with torch.cuda.set_per_process_memory_fraction, which has no CPU counterpart")
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        base = build_checkpoint(args.arch, Path(tmp) / "base")
        cases = []
        for micro_batch in batches:
            for seq in seqs:
                for side in SIDES:
                    result = run_case_in_subprocess(side, base, micro_batch, seq, args)
                    cases.append(result)
                    print(json.dumps(result), flush=True)
        longest = [find_longest_seq(side, base, args) for side in SIDES] if args.longest else []
    record = {
        "arch": args.arch, "device": device, "date": datetime.date.today().isoformat(), "steps": args.steps, "warmup": args.warmup,
        "vram_cap_gib": args.vram_cap, "versions": versions(), "cases": cases, "longest": longest,
        "longest_cap_gib": args.longest_cap if args.longest else None,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"throughput-{args.arch}-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{name}.md").write_text(format_table(record))
    print(format_table(record))


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__}


if __name__ == "__main__":
    main()
