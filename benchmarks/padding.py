"""Padding: how much of a micro-batch is padding under train.batching, and what padding-free rows cost.

Lengths are a realistic instruction-tuning mix: lognormal with median 180 tokens and sigma 0.8
(about 1.7% of examples past 1,000 tokens), cut at 2,048 (``data.truncation=keep``).

1. Padding fractions (``qlora_lite.padding_fraction``) of one epoch of 10,000 such examples
   at micro-batch 4 and 8: ``random`` (the order before ``train.batching`` existed) against
   ``grouped``, and grouped over a sweep of window sizes (micro-batches per sorted window), for
   five seeds; and, since a wider window makes the same examples share micro-batches again, the
   share of epoch 0's batch-mate pairs that meet again in epoch 1 (at 10,000 and at 2,000
   examples, a small set trained for several epochs). Pure Python, seconds.
2. Padding-free micro-batches: the same examples laid end to end in one row with position ids
   restarting at 0 (``pack_examples``, no ``attention_mask``), against the padded batch that
   ``collate_batch`` builds. On a small Llama (hidden 256, 4 layers, fp32, 1 CPU thread):
   - correctness, for sdpa and eager: the row's logits against each example run alone, and
     the row's loss against the padded batch's;
   - the block-diagonal mask transformers builds from ``position_ids`` (``create_causal_mask``):
     equal to the expected one, and its build time;
   - forward + backward time of the padded batch and the padding-free row, for a micro-batch of
     median padded size from a random and from a grouped epoch, at 4 and 8.
   And, because a small model's attention is a far larger share of its work than an 8B model's,
   the attention op alone at Llama-3.1-8B head shape (head_dim 128, 8 of its 32 heads), fwd + bwd:
   padded, padding-free with the dense block-diagonal mask (what sdpa and eager compute), and
   each example alone (the work of a varlen kernel such as flash-attention's, which we cannot
   run on the CPU).

    python benchmarks/padding.py                  # both parts, a few minutes on one CPU core
    python benchmarks/padding.py --skip-timing    # part 1 only

Writes benchmarks/results/padding-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from qlora_lite import GROUP_WINDOW_MICRO_BATCHES, collate_batch, pack_examples, padding_fraction, plan_epoch  # noqa: E402

MEDIAN_TOKENS, SIGMA, MAX_TOKENS = 180, 0.8, 2048
N_EXAMPLES = 10_000
SMALL_N_EXAMPLES = 2_000  # a small fine-tuning set, trained for several epochs
MICRO_BATCHES = (4, 8)
WINDOWS = (1, 8, 16, 32, 64, 128, 256)
SEEDS = (42, 0, 1, 2, 3)  # 42 (train.seed's default) is the one the timings use


def sample_lengths(n: int, seed: int) -> list[int]:
    """Lognormal token counts (median MEDIAN_TOKENS, sigma SIGMA), cut to 1..MAX_TOKENS."""
    rng = random.Random(seed)
    return [min(MAX_TOKENS, max(1, round(rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA)))) for _ in range(n)]


def build_examples(lengths: list[int], seed: int = 0, vocab_size: int = 256) -> list[dict]:
    rng = random.Random(seed)
    examples = []
    for length in lengths:
        ids = [rng.randrange(4, vocab_size) for _ in range(length)]
        examples.append({"input_ids": ids, "labels": list(ids)})
    return examples


def share_of_pairs_repeated(lengths: list[int], mbs: int, batching: str, window: int, seed: int) -> float:
    """Of the pairs of examples that share a micro-batch in epoch 0, the share that share one again in epoch 1."""
    def pairs(plan: list[list[int]]) -> set[tuple[int, int]]:
        return {(a, b) for batch in plan for a in batch for b in batch if a < b}
    first = pairs(plan_epoch(lengths, mbs, seed, 0, batching, window=window))
    return len(first & pairs(plan_epoch(lengths, mbs, seed, 1, batching, window=window))) / len(first)


def measure_padding() -> dict:
    """Padded share of epoch 0 per (micro-batch, batching or window), for each seed; and how often batch-mates meet again."""
    rows = []
    small = sample_lengths(SMALL_N_EXAMPLES, SEEDS[0])
    for mbs in MICRO_BATCHES:
        for name, batching, window in [("random", "random", 1)] + [(f"grouped W={w}", "grouped", w) for w in WINDOWS] + [("grouped, whole epoch", "grouped", N_EXAMPLES)]:
            fractions = []
            for seed in SEEDS:
                lengths = sample_lengths(N_EXAMPLES, seed)
                examples = [{"input_ids": range(n)} for n in lengths]  # only the lengths matter here
                plan = plan_epoch(lengths, mbs, seed, 0, batching, window=window)
                fractions.append(padding_fraction([[examples[i] for i in batch] for batch in plan]))
            lengths_42 = sample_lengths(N_EXAMPLES, SEEDS[0])
            rows.append({
                "micro_batch_size": mbs, "batching": name, "window_micro_batches": window if batching == "grouped" else None,
                "padding_fraction": fractions[0], "padding_fraction_min": min(fractions), "padding_fraction_max": max(fractions),
                "is_default": batching == "grouped" and window == GROUP_WINDOW_MICRO_BATCHES,
                "pairs_repeated_next_epoch": share_of_pairs_repeated(lengths_42, mbs, batching, window, SEEDS[0]),
                f"pairs_repeated_next_epoch_{SMALL_N_EXAMPLES}": share_of_pairs_repeated(small, mbs, batching, window, SEEDS[0]),
            })
            print(f"mbs {mbs}  {name:22s} padding {fractions[0]:.3f}  (seeds {min(fractions):.3f}-{max(fractions):.3f})  "
                  f"pairs repeated {rows[-1]['pairs_repeated_next_epoch']:.3f} ({SMALL_N_EXAMPLES}: {rows[-1][f'pairs_repeated_next_epoch_{SMALL_N_EXAMPLES}']:.3f})")
    return {"rows": rows, "seeds": list(SEEDS)}


# ---------------------------------------------------------------------------------------------- timing


def build_model(attn_implementation: str):
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, max_position_embeddings=4096, pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)


def time_calls(*fns, repeats: int = 5) -> list[float]:
    """Fastest seconds of each fn() over repeats, after one warm-up call each.

    The calls alternate (a, b, a, b, ...) and the fastest is kept: other jobs sharing the CPU only
    ever add time, and they add it to both sides alike.
    """
    times = [[] for _ in fns]
    for repeat in range(repeats + 1):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            if repeat:
                spent.append(time.perf_counter() - start)
    return [min(spent) for spent in times]


def pick_median_batch(examples: list[dict], mbs: int, batching: str, seed: int) -> list[dict]:
    """The micro-batch of epoch 0 whose padded size (B x T) is the epoch's median: a typical step."""
    lengths = [len(ex["input_ids"]) for ex in examples]
    plan = plan_epoch(lengths, mbs, seed, 0, batching)
    plan.sort(key=lambda batch: max(lengths[i] for i in batch))
    return [examples[i] for i in plan[len(plan) // 2]]


def check_padding_free(model, examples: list[dict]) -> dict:
    """Logits of the padding-free row against each example alone; its loss against the padded batch's; its mask."""
    model.eval()
    padded, row = collate_batch(examples, 0), collate_batch(pack_examples(examples, 10**9), 0)
    with torch.no_grad():
        padded_out, row_out = model(**padded, use_cache=False), model(**row, use_cache=False)
        alone = torch.cat([model(input_ids=torch.tensor([ex["input_ids"]]), use_cache=False).logits[0] for ex in examples])
    model.train()
    lengths = [len(ex["input_ids"]) for ex in examples]
    padded_logits = torch.cat([padded_out.logits[i, :n] for i, n in enumerate(lengths)])
    mask = build_mask_call(model, row)()
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0  # sdpa: bool; eager: 0 / -inf additive
    segment = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    expected = (segment[:, None] == segment[None, :]) & torch.ones(len(segment), len(segment), dtype=torch.bool).tril()
    return {
        "max_abs_logit_diff_row_vs_alone": (row_out.logits[0] - alone).abs().max().item(),
        "max_abs_logit_diff_padded_vs_alone": (padded_logits - alone).abs().max().item(),
        "loss_padded": padded_out.loss.item(), "loss_row": row_out.loss.item(),
        "mask_is_block_diagonal_causal": bool(torch.equal(allowed, expected)),
        "mask_shape": list(mask.shape), "mask_dtype": str(mask.dtype),
    }


def build_mask_call(model, batch: dict):
    """The mask transformers builds for this batch's forward (once per forward, shared by the layers)."""
    from transformers.masking_utils import create_causal_mask

    embeds = torch.zeros(*batch["input_ids"].shape, model.config.hidden_size)
    return lambda: create_causal_mask(config=model.config, inputs_embeds=embeds, attention_mask=batch.get("attention_mask"),
                                      cache=None, position_ids=batch.get("position_ids"))


def train_step(model, batch: dict):
    def step():
        model.zero_grad(set_to_none=True)
        model(**batch, use_cache=False).loss.backward()
    return step


def measure_model(lengths: list[int]) -> dict:
    examples = build_examples(lengths)
    rows, checks = [], {}
    for impl in ("sdpa", "eager"):
        model = build_model(impl)
        model.train()
        checks[impl] = check_padding_free(model, pick_median_batch(examples, 4, "random", SEEDS[0]))
        print(f"{impl}: {checks[impl]}")
        for mbs in MICRO_BATCHES:
            for batching in ("random", "grouped"):
                batch = pick_median_batch(examples, mbs, batching, SEEDS[0])
                tokens = sum(len(ex["input_ids"]) for ex in batch)
                longest = max(len(ex["input_ids"]) for ex in batch)
                padded, row = collate_batch(batch, 0), collate_batch(pack_examples(batch, 10**9), 0)
                padded_s, row_s = time_calls(train_step(model, padded), train_step(model, row))
                padded_mask_s, row_mask_s = time_calls(build_mask_call(model, padded), build_mask_call(model, row), repeats=10)
                rows.append({
                    "attention": impl, "micro_batch_size": mbs, "batch_from": batching, "lengths": sorted(len(ex["input_ids"]) for ex in batch),
                    "tokens": tokens, "padded_tokens": mbs * longest, "padded_ms": 1000 * padded_s, "padding_free_ms": 1000 * row_s,
                    "padded_mask_ms": 1000 * padded_mask_s, "padding_free_mask_ms": 1000 * row_mask_s,
                })
                print(f"{impl} mbs {mbs} {batching:7s} tokens {tokens:5d} padded {mbs * longest:5d}: padded {1000 * padded_s:7.1f} ms, padding-free {1000 * row_s:7.1f} ms")
    return {"model": "Llama, hidden 256, 4 layers, 8 heads (head_dim 32), 4 KV heads, MLP 688, vocab 256, fp32, all weights trained",
            "checks": checks, "rows": rows}


def measure_attention_op(lengths: list[int]) -> dict:
    """Fwd + bwd of sdpa alone at head_dim 128 (8 heads): padded, padding-free (dense mask), each example alone."""
    import torch.nn.functional as F

    heads, head_dim = 8, 128
    examples = build_examples(lengths)
    rows = []
    for mbs in MICRO_BATCHES:
        for batching in ("random", "grouped"):
            batch_lengths = [len(ex["input_ids"]) for ex in pick_median_batch(examples, mbs, batching, SEEDS[0])]
            longest, total = max(batch_lengths), sum(batch_lengths)
            # Padded: the causal mask AND each row's padding mask, as transformers builds it for sdpa.
            valid = torch.arange(longest)[None, :] < torch.tensor(batch_lengths)[:, None]  # (B, T)
            padded_mask = (torch.ones(longest, longest, dtype=torch.bool).tril()[None] & valid[:, None, :])[:, None]  # (B, 1, T, T)
            segment = torch.repeat_interleave(torch.arange(mbs), torch.tensor(batch_lengths))
            row_mask = ((segment[:, None] == segment[None, :]) & torch.ones(total, total, dtype=torch.bool).tril())[None, None]

            def fwd_bwd(shapes, masks, causal=False):
                inputs = [[torch.randn(*shape, requires_grad=True) for _ in range(3)] for shape in shapes]
                def run():
                    for (q, k, v), mask in zip(inputs, masks):
                        F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal).sum().backward()
                return run

            padded_s, row_s, alone_s = time_calls(
                fwd_bwd([(mbs, heads, longest, head_dim)], [padded_mask]),
                fwd_bwd([(1, heads, total, head_dim)], [row_mask]),
                fwd_bwd([(1, heads, n, head_dim) for n in batch_lengths], [None] * mbs, causal=True),
            )
            rows.append({"micro_batch_size": mbs, "batch_from": batching, "tokens": total, "padded_tokens": mbs * longest,
                         "padded_ms": 1000 * padded_s, "padding_free_dense_mask_ms": 1000 * row_s, "each_alone_ms": 1000 * alone_s,
                         "score_pairs_padded": mbs * longest**2, "score_pairs_row": total**2,
                         "score_pairs_alone": sum(n * n for n in batch_lengths)})
            print(f"sdpa op mbs {mbs} {batching:7s}: padded {1000 * padded_s:7.1f} ms, row (dense mask) {1000 * row_s:7.1f} ms, each alone {1000 * alone_s:7.1f} ms")
    return {"heads": heads, "head_dim": head_dim, "rows": rows}


# ---------------------------------------------------------------------------------------------- report


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        f"Padding under train.batching: {N_EXAMPLES:,} examples, lognormal lengths (median {MEDIAN_TOKENS}, sigma {SIGMA}, cut at {MAX_TOKENS}), "
        f"epoch 0; seed {SEEDS[0]}, range over seeds {', '.join(map(str, SEEDS))}. {result['date']}, {result['machine']}.",
        "",
        "| micro-batch | batching | padded share | over 5 seeds | computed tokens per real token | batch-mates together again next epoch | same, 2,000 examples |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for row in result["padding"]["rows"]:
        name = row["batching"] + (" (default)" if row["is_default"] else "")
        lines.append(f"| {row['micro_batch_size']} | {name} | {100 * row['padding_fraction']:.1f}% | "
                     f"{100 * row['padding_fraction_min']:.1f}-{100 * row['padding_fraction_max']:.1f}% | {1 / (1 - row['padding_fraction']):.2f} | "
                     f"{100 * row['pairs_repeated_next_epoch']:.1f}% | {100 * row[f'pairs_repeated_next_epoch_{SMALL_N_EXAMPLES}']:.1f}% |")
    if "model" in result:
        model = result["model"]
        lines += ["", f"Padding-free rows on the CPU (1 thread), {model['model']}.", "",
                  "| attention | row logits vs each example alone (max abs) | padded logits vs alone | loss padded / row | mask from position_ids |",
                  "| --- | ---: | ---: | --- | --- |"]
        for impl, c in model["checks"].items():
            lines.append(f"| {impl} | {c['max_abs_logit_diff_row_vs_alone']:.1e} | {c['max_abs_logit_diff_padded_vs_alone']:.1e} | "
                         f"{c['loss_padded']:.6f} / {c['loss_row']:.6f} | {'block-diagonal causal, exact' if c['mask_is_block_diagonal_causal'] else 'WRONG'} "
                         f"{tuple(c['mask_shape'])} {c['mask_dtype']} |")
        lines += ["", "Forward + backward of one micro-batch of median padded size from that epoch; fastest of 5, the two layouts alternating "
                  "(the CPU may be shared: compare the two layouts of a row, not rows or runs).", "",
                  "| attention | micro-batch | from | tokens | padded tokens | padded ms | padding-free ms | padding-free / padded | mask build ms, padded / padding-free |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in model["rows"]:
            lines.append(f"| {r['attention']} | {r['micro_batch_size']} | {r['batch_from']} | {r['tokens']:,} | {r['padded_tokens']:,} | "
                         f"{r['padded_ms']:.1f} | {r['padding_free_ms']:.1f} | {r['padding_free_ms'] / r['padded_ms']:.2f} | "
                         f"{r['padded_mask_ms']:.2f} / {r['padding_free_mask_ms']:.2f} |")
    if "attention_op" in result:
        op = result["attention_op"]
        lines += ["", f"The sdpa op alone, fwd + bwd, {op['heads']} heads x head_dim {op['head_dim']} (Llama-3.1-8B's head shape), the same micro-batches.", "",
                  "| micro-batch | from | padded ms | padding-free, dense block mask ms | each example alone ms (varlen kernel's work) | score pairs padded / row / alone |",
                  "| ---: | --- | ---: | ---: | ---: | --- |"]
        for r in op["rows"]:
            lines.append(f"| {r['micro_batch_size']} | {r['batch_from']} | {r['padded_ms']:.1f} | {r['padding_free_dense_mask_ms']:.1f} | {r['each_alone_ms']:.1f} | "
                         f"{r['score_pairs_padded'] / 1e6:.2f}M / {r['score_pairs_row'] / 1e6:.2f}M / {r['score_pairs_alone'] / 1e6:.2f}M |")
    if "model" in result and "attention_op" in result:
        lines += ["", *summarize_padding_free(result)]
    path.write_text("\n".join(lines) + "\n")


def summarize_padding_free(result: dict) -> list[str]:
    """The comparison that decides whether padding-free micro-batches are worth offering: against grouped, not random."""
    def span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}"
    lines = ["Reading:", ""]
    for impl in ("sdpa", "eager"):
        rows = [r for r in result["model"]["rows"] if r["attention"] == impl]
        vs_random = [r["padding_free_ms"] / r["padded_ms"] for r in rows if r["batch_from"] == "random"]
        vs_grouped = [r["padding_free_ms"] / r["padded_ms"] for r in rows if r["batch_from"] == "grouped"]
        lines.append(f"- {impl}, whole model: laying a random micro-batch's examples in one row takes {span(vs_random)} x the time "
                     f"of padding them; a grouped micro-batch's, {span(vs_grouped)} x.")
    op = [r for r in result["attention_op"]["rows"] if r["batch_from"] == "grouped"]
    lines.append(f"- sdpa op at 8B head shape, grouped micro-batches: the padded batch costs {span([r['padded_ms'] / r['each_alone_ms'] for r in op])} x "
                 f"the examples run alone (a varlen kernel's work); the padding-free row with its dense block mask "
                 f"{span([r['padding_free_dense_mask_ms'] / r['each_alone_ms'] for r in op])} x.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-timing", action="store_true", help="padding fractions only (seconds)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # steadier timings on a shared machine; the ratios are what matter
    result = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread",
              "lengths": {"median": MEDIAN_TOKENS, "sigma": SIGMA, "max": MAX_TOKENS, "n": N_EXAMPLES},
              "window_micro_batches_default": GROUP_WINDOW_MICRO_BATCHES, "padding": measure_padding()}
    if not args.skip_timing:
        import transformers

        result["machine"] += f", transformers {transformers.__version__}"
        lengths = sample_lengths(N_EXAMPLES, SEEDS[0])
        result["model"] = measure_model(lengths)
        result["attention_op"] = measure_attention_op(lengths)
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "padding-cpu.json").write_text(json.dumps(result, indent=1) + "\n")
    write_markdown(result, out / "padding-cpu.md")
    print(f"wrote {out / 'padding-cpu.json'} and {out / 'padding-cpu.md'}")


if __name__ == "__main__":
    main()
