"""Useful (non-pad) tokens per second: qlora-lite's training step against the usual PEFT script, on a realistic length mix.

``benchmarks/throughput.py`` times both stacks on full rectangular batches, where padding and
prompt masking cannot show. This one feeds both the same instruction-tuning-like examples and
counts only the tokens that were really there.

Model: a random-weight Llama saved once to a temporary folder (``qlora_lite.build_tiny_model``): hidden 1024,
intermediate 2816, 16 heads / 8 KV heads, 2 layers, vocabulary 32,000, untied head, so the decoder
layers and the head (not embeddings or Python overhead) dominate the step. The tokenizer is
``qlora_lite.build_tokenizer``'s (pad 0, EOS 3); token ids are drawn directly in [4, 32000).

Examples: 10,000, lengths drawn lognormal with median 180 tokens and sigma 0.8, cut to
[2, 2048] (``padding.sample_lengths``, seed 42: the mix of benchmarks/padding.py, like
alpaca-cleaned's, about 1.7% past 1,000 tokens). Each example is ``length - 1`` uniform random ids
then EOS; the first ``max(1, floor(0.4 * length))`` tokens are the prompt (labels -100), the rest,
EOS included, the labelled response.

Both sides, each case in a fresh process: 1 CPU thread (``torch.set_num_threads(1)``,
OMP_NUM_THREADS=1), NF4 base with double quantization, fp32 compute (``quant.compute_dtype: auto``
resolves to fp32 on the CPU), LoRA r=16 alpha 32 dropout 0 on all linear layers with fp32 adapter
weights, non-reentrant gradient checkpointing, 8-bit AdamW (bitsandbytes ``AdamW8bit``, lr 2e-4),
gradient clipping at 1.0 (``torch.nn.utils.clip_grad_norm_``), one micro-batch per optimizer step.

- qlora-lite: what ``fit()`` does: ``throughput.load_ours`` (``load_config`` with overrides,
  ``load_base_model``, ``enable_gradient_checkpointing``, ``attach_method``, ``build_optimizer``
  paged_adamw_8bit -> adamw_8bit on the CPU); micro-batches from
  ``select_micro_batch(examples, i, mbs, 42, "grouped")`` (train.batching default), ``collate_batch``,
  loss ``compute_causal_lm_loss(model, batch, cfg.train)`` with ``train.loss: chunked`` (the default).
  Not included: accelerate's ``prepare`` wrapper (a no-op on the CPU without mixed precision).
  Note that fit()'s default ``lora.dtype`` is bfloat16; this benchmark, like throughput.py, uses
  fp32 adapters on the CPU so that both sides run the same adapter arithmetic.
- PEFT: ``throughput.load_peft`` (transformers + ``BitsAndBytesConfig`` NF4 +
  ``prepare_model_for_kbit_training`` + ``get_peft_model(LoraConfig r16 all-linear)`` +
  ``bnb.optim.AdamW8bit``); examples in random order, ``select_micro_batch(..., "random")``, padded to
  the longest of each micro-batch by ``collate_batch``; loss ``model(**batch).loss`` (full logits).

Measured per side at micro-batch 4 and 8, over the timed steps after the warm-up steps (wall time
of select + collate + forward + backward + clip + optimizer step): useful tokens/s (non-pad tokens,
the attention mask's ones, prompt included), labelled tokens/s (tokens with a label, which the loss
trains on), the padded fraction of the processed micro-batches, seconds per step, peak RSS and the
first losses. Sanity: before training, each process computes its own loss (chunked or HF) on one
identical padded batch (the first 4 examples); the two sides must agree within 1e-3.

    python benchmarks/useful_throughput.py                    # mbs 4 and 8, 2 warm-up + 20 timed steps (~11 min on 1 busy core)
    python benchmarks/useful_throughput.py --steps 3 --micro-batch 4

Writes benchmarks/results/useful-throughput-cpu.{json,md}. Goal: qlora-lite >= 1.8x the PEFT
stack's useful tokens/s at micro-batch 4.
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

SIDES = ("qlora-lite", "peft")
BATCHING = {"qlora-lite": "grouped", "peft": "random"}
MODEL_SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_layers=2, num_heads=16, num_kv_heads=8, vocab_size=32000, max_position_embeddings=4096)
N_EXAMPLES, LENGTH_SEED, TOKEN_SEED, TRAIN_SEED = 10_000, 42, 0, 42
MIN_TOKENS = 2  # a prompt token and the EOS
PROMPT_SHARE = 0.4
PAD_ID, EOS_ID = 0, 3
SANITY_EXAMPLES = 4
SANITY_TOLERANCE = 1e-3
GOAL_RATIO, GOAL_MICRO_BATCH = 1.8, 4
MAX_GRAD_NORM = 1.0


def build_checkpoint(folder: Path) -> Path:
    """The random-weight Llama of MODEL_SHAPE and a small tokenizer, saved to folder."""
    from qlora_lite import build_tiny_model, build_tokenizer

    build_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, folder, vocab_size=256)
    build_tiny_model(folder, **MODEL_SHAPE)
    return folder


def build_examples(n: int = N_EXAMPLES) -> list[dict]:
    """n masked examples (see the module docstring): random ids + EOS, the first 40% of tokens unlabelled."""
    import torch
    from padding import sample_lengths

    from qlora_lite import IGNORE_INDEX

    gen = torch.Generator().manual_seed(TOKEN_SEED)
    examples = []
    for length in sample_lengths(n, LENGTH_SEED):
        length = max(MIN_TOKENS, length)
        ids = torch.randint(4, MODEL_SHAPE["vocab_size"], (length - 1,), generator=gen).tolist() + [EOS_ID]
        prompt = max(1, int(PROMPT_SHARE * length))
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def run_side(side: str, base: str, micro_batch: int, steps: int, warmup: int) -> dict:
    """One case in this process: load the side's stack, check the loss on the sanity batch, train, measure."""
    import torch

    torch.set_num_threads(1)
    from throughput import BENCH_OVERRIDES, load_ours, load_peft

    from qlora_lite import IGNORE_INDEX, collate_batch, compute_causal_lm_loss, load_recipe, padding_fraction, read_peak_rss_bytes, select_micro_batch

    device = torch.device("cpu")
    examples = build_examples()
    start_load = time.perf_counter()
    model, optimizer = (load_ours if side == "qlora-lite" else load_peft)(base, device)
    load_s = time.perf_counter() - start_load
    train_cfg = load_recipe(None, [f"model.name_or_path={base}", *BENCH_OVERRIDES]).train  # loss chunked, as fit()'s default

    def compute_loss(batch: dict) -> torch.Tensor:
        if side == "qlora-lite":
            return compute_causal_lm_loss(model, batch, train_cfg)
        return model(**batch, use_cache=False).loss  # the usual script: transformers' loss over full logits

    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    with torch.no_grad():
        sanity_loss = compute_loss(collate_batch(examples[:SANITY_EXAMPLES], PAD_ID)).item()

    micro_batches = [select_micro_batch(examples, i, micro_batch, TRAIN_SEED, BATCHING[side]) for i in range(warmup + steps)]
    losses, step_s, start = [], [], None
    for i, chosen in enumerate(micro_batches):
        if i == warmup:
            start = time.perf_counter()
        t0 = time.perf_counter()
        batch = collate_batch(chosen, PAD_ID)
        loss = compute_loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step_s.append(time.perf_counter() - t0)
        print(f"{side} mbs {micro_batch} step {i}: {batch['input_ids'].shape[0]} x {batch['input_ids'].shape[1]}, loss {losses[-1]:.4f}, {step_s[-1]:.1f} s", file=sys.stderr, flush=True)
    seconds = time.perf_counter() - start
    timed = micro_batches[warmup:]
    real_tokens = sum(len(ex["input_ids"]) for mb in timed for ex in mb)
    labelled_tokens = sum(sum(1 for t in ex["labels"][1:] if t != IGNORE_INDEX) for mb in timed for ex in mb)
    computed_tokens = sum(len(mb) * max(len(ex["input_ids"]) for ex in mb) for mb in timed)
    return {
        "side": side, "micro_batch": micro_batch, "batching": BATCHING[side], "steps": steps, "warmup": warmup,
        "timed_seconds": seconds, "step_s": seconds / steps, "step_s_each": step_s[warmup:], "load_s": load_s,
        "useful_tokens": real_tokens, "labelled_tokens": labelled_tokens, "computed_tokens": computed_tokens,
        "useful_tokens_per_s": real_tokens / seconds, "labelled_tokens_per_s": labelled_tokens / seconds,
        "computed_tokens_per_s": computed_tokens / seconds, "padded_fraction": padding_fraction(timed),
        "padded_fraction_with_warmup": padding_fraction(micro_batches),
        "shapes": [[len(mb), max(len(ex["input_ids"]) for ex in mb)] for mb in micro_batches],
        "first_losses": losses[:3], "sanity_loss": sanity_loss, "peak_rss_gib": read_peak_rss_bytes() / 2**30,
    }  # fmt: skip


def run_case_in_subprocess(side: str, base: Path, micro_batch: int, args) -> dict:
    code = (
        "import json, sys; sys.argv = ['x']; import useful_throughput as u; "
        f"print('RESULT ' + json.dumps(u.run_side({side!r}, {str(base)!r}, {micro_batch}, {args.steps}, {args.warmup})))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=None, text=True, check=False, cwd=REPO / "benchmarks", env=env)
    line = next((line for line in out.stdout.splitlines() if line.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{side} mbs {micro_batch} failed (rc {out.returncode}); its stderr is above")
    return json.loads(line[len("RESULT "):])


def describe_epoch_padding(micro_batches: list[int]) -> dict:
    """Padded fraction of a whole epoch 0 of the examples under each batching, the reference for the timed few steps."""
    from qlora_lite import padding_fraction, select_micro_batch

    examples = build_examples()
    out = {}
    for mbs in micro_batches:
        per_epoch = len(examples) // mbs
        for side in SIDES:
            batches = [select_micro_batch(examples, i, mbs, TRAIN_SEED, BATCHING[side]) for i in range(per_epoch)]
            out[f"{side} mbs {mbs}"] = padding_fraction(batches)
    lengths = sorted(len(ex["input_ids"]) for ex in examples)
    stats = {
        "n": len(lengths), "median": lengths[len(lengths) // 2], "mean": sum(lengths) / len(lengths), "max": lengths[-1],
        "share_over_1000": sum(n > 1000 for n in lengths) / len(lengths), "share_at_cap_2048": sum(n >= 2048 for n in lengths) / len(lengths),
        "labelled_share": sum(sum(t != -100 for t in ex["labels"]) for ex in examples) / sum(lengths),
    }  # fmt: skip
    return {"epoch0_padded_fraction": out, "lengths": stats}


def compute_ratios(cases: list[dict]) -> list[dict]:
    by = {(c["side"], c["micro_batch"]): c for c in cases}
    ratios = []
    for mbs in sorted({c["micro_batch"] for c in cases}):
        ours, peft = by.get(("qlora-lite", mbs)), by.get(("peft", mbs))
        if ours and peft:
            ratio = ours["useful_tokens_per_s"] / peft["useful_tokens_per_s"]
            ratios.append({
                "micro_batch": mbs, "useful_ratio": ratio,
                "labelled_ratio": ours["labelled_tokens_per_s"] / peft["labelled_tokens_per_s"],
                "computed_ratio": ours["computed_tokens_per_s"] / peft["computed_tokens_per_s"],
                "goal": GOAL_RATIO if mbs == GOAL_MICRO_BATCH else None,
                "goal_met": ratio >= GOAL_RATIO if mbs == GOAL_MICRO_BATCH else None,
            })  # fmt: skip
    return ratios


def check_sanity(cases: list[dict]) -> dict:
    values = {f"{c['side']} mbs {c['micro_batch']}": c["sanity_loss"] for c in cases}
    spread = max(values.values()) - min(values.values())
    return {"losses": values, "max_abs_difference": spread, "tolerance": SANITY_TOLERANCE, "ok": spread <= SANITY_TOLERANCE}


def format_table(record: dict) -> str:
    lengths = record["reference"]["lengths"]
    lines = [
        f"Useful (non-pad) tokens/s, LoRA r=16 all-linear on NF4, random-weight Llama (hidden 1024, intermediate 2816, "
        f"16/8 heads, 2 layers, vocab 32,000), {record['device']}, {record['date']}; {record['steps']} timed steps after "
        f"{record['warmup']} warm-up, fp32 compute, gradient checkpointing, 8-bit AdamW, clip 1.0. "
        f"`{record['command'].strip()}`",
        "",
        f"Examples: {lengths['n']:,}, lognormal lengths (median 180, sigma 0.8, cut to [2, 2048]; drawn median "
        f"{lengths['median']}, mean {lengths['mean']:.0f}, {100 * lengths['share_over_1000']:.1f}% past 1,000), first 40% "
        f"prompt (unlabelled), then response + EOS ({100 * lengths['labelled_share']:.0f}% of tokens labelled).",
        "qlora-lite: grouped micro-batches, chunked loss over labelled tokens. PEFT: random order, padded to the longest, HF loss.",
        "",
        "| side | micro-batch | useful tok/s | labelled tok/s | computed (padded) tok/s | padded % (timed) | padded % (epoch 0) | step s | peak RSS GiB | first losses |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    epoch = record["reference"]["epoch0_padded_fraction"]
    for r in record["cases"]:
        losses = ", ".join(f"{x:.4f}" for x in r["first_losses"])
        epoch_padded = epoch[f"{r['side']} mbs {r['micro_batch']}"]
        lines.append(
            f"| {r['side']} | {r['micro_batch']} | {r['useful_tokens_per_s']:,.0f} | {r['labelled_tokens_per_s']:,.0f} | "
            f"{r['computed_tokens_per_s']:,.0f} | {100 * r['padded_fraction']:.1f}% | {100 * epoch_padded:.1f}% | "
            f"{r['step_s']:.2f} | {r['peak_rss_gib']:.2f} | {losses} |"
        )
    lines += ["", "| micro-batch | qlora-lite / PEFT useful tok/s | labelled | computed | goal |", "| ---: | ---: | ---: | ---: | --- |"]
    for r in record["ratios"]:
        goal = f">= {r['goal']}x: {'met' if r['goal_met'] else 'MISSED'}" if r["goal"] else "none"
        lines.append(f"| {r['micro_batch']} | {r['useful_ratio']:.2f}x | {r['labelled_ratio']:.2f}x | {r['computed_ratio']:.2f}x | {goal} |")
    s = record["sanity"]
    lines += [
        "",
        f"Sanity: loss on one identical padded batch (the first {SANITY_EXAMPLES} examples) before training, per process: "
        + ", ".join(f"{k} {v:.6f}" for k, v in s["losses"].items())
        + f"; largest difference {s['max_abs_difference']:.2e} (tolerance {s['tolerance']}): {'ok' if s['ok'] else 'FAILED'}.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--micro-batch", default="4,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--work", default=None)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    from throughput import versions

    batches = [int(b) for b in args.micro_batch.split(",")]
    reference = describe_epoch_padding(batches)
    print(json.dumps(reference), flush=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        base = build_checkpoint(Path(tmp) / "base")
        cases = []
        for micro_batch in batches:
            for side in SIDES:
                result = run_case_in_subprocess(side, base, micro_batch, args)
                cases.append(result)
                print(json.dumps({k: v for k, v in result.items() if k not in ("shapes", "step_s_each")}), flush=True)
    record = {
        "device": f"cpu: {platform.machine()}, 1 thread", "date": datetime.date.today().isoformat(), "steps": args.steps,
        "warmup": args.warmup, "model": MODEL_SHAPE, "versions": versions(), "reference": reference, "cases": cases,
        "ratios": compute_ratios(cases), "sanity": check_sanity(cases),
        "command": "python benchmarks/useful_throughput.py " + " ".join(sys.argv[1:]),
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "useful-throughput-cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "useful-throughput-cpu.md").write_text(format_table(record))
    print(format_table(record))


if __name__ == "__main__":
    main()
