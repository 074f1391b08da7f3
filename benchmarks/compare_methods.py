"""Compare the fine-tuning methods on one task, with the same data and step budget.

The task is the offline demo's (recipes/tiny-demo.yaml): a 0.36M-parameter Llama pretrained on
ROT13 lines in its own formats learns to answer the same question in the alpaca instruction
format. The base is pretrained, so "how much of the skill does each method unlock" means
something. Every run is `qlora-lite train recipes/tiny-demo.yaml method=... ...` with the
recipe's data, batch (16), schedule and seed; only the method, its size and its learning rate
change. The budget is 150 steps, not the demo's 300: at 300 steps every method reaches 100%
exact match and the comparison says nothing. Each method gets the best of three learning rates
(its family's usual rate x 1/3, 1, 3), picked by eval loss; all runs are in the JSON.

Runs (all on the same fp32 base, so that precision does not confound the methods; one extra
QLoRA row puts LoRA on the NF4 base as the product does):
  full fine-tuning; LoRA r = 1, 2, 4, 8, 16, 64; QLoRA r = 8 (NF4 base); prompt tuning with
  20 and 100 virtual tokens; selective (RMSNorm weights); bottleneck adapters (size 16, after
  attention and MLP).

Reported per run: trainable parameters, exact match on 50 held-out prompts, eval loss (answer
tokens), peak RSS, wall time, and a forgetting figure: the loss on held-out text in the base's
own pretraining formats, before and after fine-tuning (the notes claim PEFT forgets less).

    python benchmarks/compare_methods.py                 # all runs, 2 at a time (~10 min on 2 cores)
    python benchmarks/compare_methods.py --only lora-r8,full --workers 1

Writes benchmarks/results/compare_methods.{json,md,png} (the plot needs matplotlib:
`pip install -e ".[bench]"`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "tiny-demo.yaml"
FP32_BASE = {"quant.load_in_4bit": False}
# Learning rates are per method, as each family needs (not tuned per run): LoRA and the
# adapters use the demo's 3e-3; full fine-tuning moves every weight and takes a third of that;
# a soft prompt is a handful of vectors far from the gradient's source and needs ~10x more;
# norm weights are few and near 1, so they take a larger step too.
RUNS: dict[str, tuple[str, dict]] = {
    "full": ("full fine-tuning", {"method": "full", "train.lr": 1e-3, **FP32_BASE}),
    **{f"lora-r{r}": (f"LoRA r={r}", {"method": "lora", "lora.r": r, "lora.alpha": 2 * r, **FP32_BASE}) for r in (1, 2, 4, 8, 16, 64)},
    "qlora-r8": ("QLoRA r=8 (NF4 base)", {"method": "lora", "lora.r": 8, "lora.alpha": 16}),
    "prompt-20": ("prompt tuning, 20 tokens", {"method": "prompt_tuning", "prompt.num_virtual_tokens": 20, "train.lr": 3e-2, **FP32_BASE}),
    "prompt-100": ("prompt tuning, 100 tokens", {"method": "prompt_tuning", "prompt.num_virtual_tokens": 100, "train.lr": 3e-2, **FP32_BASE}),
    "selective": ("selective (norm weights)", {"method": "selective", "selective.patterns": ["norm"], "train.lr": 1e-2, **FP32_BASE}),
    "adapter": ("bottleneck adapters, size 16", {"method": "adapter", "bottleneck.size": 16, **FP32_BASE}),
}
FORGETTING_SEED = 4321  # held-out pretraining-format text, not the base's own corpus (seed 0)
FORGETTING_DOCS = 24


STEPS = 150
LR_FACTORS = (1 / 3, 1.0, 3.0)
DEFAULT_LR = 3e-3  # the demo recipe's


def expand_runs(keys: list[str]) -> list[tuple[str, float]]:
    """(run key, learning rate) for every run and every factor of its usual rate."""
    return [(key, RUNS[key][1].get("train.lr", DEFAULT_LR) * f) for key in keys for f in LR_FACTORS]


def run_one(key: str, lr: float, out_root: Path) -> dict:
    """Train one method at one learning rate through the CLI in its own process; return its figures."""
    label, base_overrides = RUNS[key]
    overrides = {**base_overrides, "train.lr": float(f"{lr:.3g}"), "train.max_steps": STEPS, "train.warmup_steps": 4}
    out = out_root / f"{key}-lr{lr:.3g}"
    args = [f"{k}={json.dumps(v)}" for k, v in overrides.items()] + [f"output_dir={out}", "train.save_every=0", "train.eval_every=0"]
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "qlora_lite.cli", "train", str(RECIPE), *args, "--overwrite"],
        capture_output=True, text=True, check=False, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{key} failed:\n{result.stderr[-3000:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = metrics[-1]
    end_memory = [m for m in metrics if m.get("event") == "memory" and m["when"] == "end"][-1]
    params = end_memory["params"]
    print(f"{label}, lr {lr:.3g}: exact match {summary['final_exact_match']:.0%}, eval loss {summary['final_eval_loss']:.3f}, {seconds:.0f} s", flush=True)
    return {
        "key": key, "label": label, "lr": overrides["train.lr"], "overrides": overrides, "trainable_params": params["trainable"], "total_params": params["total"],
        "initial_exact_match": summary["initial_exact_match"], "exact_match": summary["final_exact_match"],
        "initial_eval_loss": summary["initial_eval_loss"], "eval_loss": summary["final_eval_loss"],
        "peak_rss_gib": end_memory["device_memory"].get("peak_rss_gib", end_memory["device_memory"].get("peak_gib")), "seconds": seconds, "adapter_dir": summary["adapter_dir"],
    }  # fmt: skip


def measure_forgetting(rows: list[dict]) -> float:
    """Loss per token on held-out text in the base's pretraining formats: base alone, then each run's model."""
    import torch

    from qlora_lite import ensure_demo_base, load_base_model, load_method, load_recipe, load_tokenizer, make_demo_records, make_pretraining_text

    torch.set_num_threads(1)
    base_path = str(ensure_demo_base())
    _, eval_records = make_demo_records()
    excluded = {r[key] for r in eval_records for key in ("input", "output")}
    rng = random.Random(FORGETTING_SEED)
    docs = [make_pretraining_text(rng, 3, excluded) for _ in range(FORGETTING_DOCS)]

    def text_loss(model, tokenizer) -> float:
        total, count = 0.0, 0
        with torch.no_grad():
            for doc in docs:
                ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(doc, add_special_tokens=False)["input_ids"]]])
                loss = model(input_ids=ids, labels=ids).loss
                total, count = total + loss.item() * (ids.shape[1] - 1), count + ids.shape[1] - 1
        return total / count

    for row in rows:
        cfg = load_recipe(RECIPE, [f"{k}={json.dumps(v)}" for k, v in row["overrides"].items()])
        tokenizer = load_tokenizer(cfg.model, base_path)
        base = load_base_model(cfg.model, cfg.quant, torch.device("cpu"), base_path).eval()
        row["base_text_loss"] = text_loss(base, tokenizer)
        model = load_method(base, cfg, Path(row["adapter_dir"]), trainable=False).eval()
        row["text_loss"] = text_loss(model, tokenizer)
    return rows[0]["base_text_loss"]


def format_table(record: dict) -> str:
    lines = [
        f"Method comparison on the demo task ({record['steps']} steps, batch 16, same data and seed; best of 3 learning rates "
        f"by eval loss), {record['device']}, {record['date']}.",
        "",
        "| method | trainable params | % of model | lr | exact match (50 held out) | eval loss | held-out text loss (base {:.3f}) | peak RSS | time |".format(record["base_text_loss"]),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in record["runs"]:
        lines.append(
            f"| {row['label']} | {row['trainable_params']:,} | {100 * row['trainable_params'] / row['total_params']:.2f}% | {row['lr']:.3g} | "
            f"{row['initial_exact_match']:.0%} -> **{row['exact_match']:.0%}** | {row['initial_eval_loss']:.3f} -> {row['eval_loss']:.3f} | "
            f"{row['text_loss']:.3f} ({row['text_loss'] - row['base_text_loss']:+.3f}) | "
            f"{(row['peak_rss_gib'] or 0) * 1024:.0f} MiB | {row['seconds']:.0f} s |"
        )
    return "\n".join(lines) + "\n"


def plot(record: dict, path: Path) -> bool:
    """Task metric and eval loss against trainable parameters (log scale); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    families = {
        "full": ("tab:red", "full fine-tuning"), "lora": ("tab:blue", "LoRA (r = 1..64)"), "qlora": ("tab:cyan", "QLoRA r=8 (NF4 base)"),
        "prompt": ("tab:green", "prompt tuning (20, 100 tokens)"), "selective": ("tab:purple", "selective (norms)"),
        "adapter": ("tab:orange", "bottleneck adapters"),
    }  # fmt: skip
    seen = set()
    for row in record["runs"]:
        family = row["key"].split("-")[0]
        color, name = families[family]
        label = None if family in seen else name
        seen.add(family)
        left.scatter(row["trainable_params"], row["exact_match"] * 100, color=color, s=40, zorder=3, label=label)
        right.scatter(row["trainable_params"], row["eval_loss"], color=color, s=40, zorder=3)
        short = {"qlora": "QLoRA r=8", "full": "full", "selective": "norms"}.get(family) or (
            row["label"].removeprefix("LoRA ").removeprefix("prompt tuning, ").removeprefix("bottleneck adapters, ")
        )
        right.annotate(short, (row["trainable_params"], row["eval_loss"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    left.legend(fontsize=7, loc="upper left")
    lora = sorted((r for r in record["runs"] if r["key"].startswith("lora-")), key=lambda r: r["trainable_params"])
    left.plot([r["trainable_params"] for r in lora], [r["exact_match"] * 100 for r in lora], color="tab:blue", lw=1, zorder=2)
    right.plot([r["trainable_params"] for r in lora], [r["eval_loss"] for r in lora], color="tab:blue", lw=1, zorder=2)
    for axis, ylabel in ((left, "exact match on 50 held-out prompts (%)"), (right, "eval loss (answer tokens)")):
        axis.set_xscale("log")
        axis.set_xlabel("trainable parameters (log scale)")
        axis.set_ylabel(ylabel)
        axis.grid(alpha=0.3)
    right.set_yscale("log")
    fig.suptitle(f"Fine-tuning methods on the demo task: same data, {record['steps']} steps ({record['date']}, CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time (each uses one thread)")
    parser.add_argument("--work", default=str(REPO / "runs" / "compare"), help="where the runs' output folders go")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--replot", action="store_true", help="redraw the table and plot from the saved JSON, train nothing")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    if args.replot:
        record = json.loads((Path(args.out) / "compare_methods.json").read_text())
        (Path(args.out) / "compare_methods.md").write_text(format_table(record))
        plot(record, Path(args.out) / "compare_methods.png")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    keys = args.only.split(",") if args.only else list(RUNS)
    unknown = [k for k in keys if k not in RUNS]
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    from qlora_lite import ensure_demo_base

    ensure_demo_base()  # build the cached base once, before the parallel runs race to build it
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.workers) as pool:
        every_run = list(pool.map(lambda job: run_one(*job, Path(args.work)), expand_runs(keys)))
    rows = [min((r for r in every_run if r["key"] == key), key=lambda r: r["eval_loss"]) for key in keys]
    base_text_loss = measure_forgetting(rows)
    record = {
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores, {args.workers} runs at a time, 1 thread each)",
        "date": datetime.date.today().isoformat(),
        "steps": STEPS,
        "all_runs": [{k: r[k] for k in ("key", "lr", "exact_match", "eval_loss", "seconds")} for r in every_run],
        "base_text_loss": base_text_loss,
        "total_seconds": time.perf_counter() - start,
        "runs": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare_methods.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "compare_methods.md").write_text(format_table(record))
    plot(record, out / "compare_methods.png")
    print(format_table(record))
    print(f"total {record['total_seconds'] / 60:.1f} min")
    if not math.isfinite(record["total_seconds"]):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
