"""A few real training steps of every shipped GPU recipe, on depth-cut random weights, then a resume.

For each recipe (Llama-3.1-8B, Mistral-7B, Qwen2.5-7B) this builds a random bf16 checkpoint from
the planner's shipped config with the recipe's real widths and vocabulary but only --layers
decoder layers, then runs `qlora-lite train` with the recipe's own settings (NF4, LoRA, paged
8-bit AdamW on a GPU, its sequence length) on the demo's local data (the device has no network)
for 4 optimizer steps with a checkpoint every 2, and `--resume` to 6 steps. Each run's exit code,
losses, peak memory and the resume's first step are recorded.

    python benchmarks/recipe_smoke.py                 # all three recipes, 2 layers
    python benchmarks/recipe_smoke.py --layers 1 --recipes llama3.1-8b-alpaca

Writes benchmarks/results/recipe-smoke-<device>.json as each recipe finishes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RECIPES = {
    "llama3.1-8b-alpaca": "Llama-3.1-8B.json",
    "mistral-7b-alpaca": "Mistral-7B-v0.3.json",
    "qwen2.5-7b-alpaca": "Qwen2.5-7B.json",
}
DATA = REPO / "recipes" / "data" / "tiny-demo" / "train.jsonl"


def build_cut_checkpoint(config_name: str, layers: int, folder: Path) -> Path:
    """Random bf16 weights of the shipped config with `layers` decoder layers, and a small tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qlora_lite import build_tokenizer

    raw = json.loads((REPO / "qlora_lite" / "known_configs" / config_name).read_text())
    raw["num_hidden_layers"] = layers
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(raw))
    config = AutoConfig.from_pretrained(str(folder))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(str(folder))
    # A 256-token tokenizer: its ids are a subset of the model's vocabulary, which is all training needs.
    build_tokenizer([line for line in DATA.read_text().splitlines()[:400]], folder, vocab_size=256)
    return folder


def train(recipe: str, base: Path, out: Path, steps: int, resume: bool) -> dict:
    args = [
        sys.executable, "-m", "qlora_lite.cli", "train", str(REPO / "recipes" / f"{recipe}.yaml"),
        f"model.name_or_path={base}", f"data.path={DATA}", "data.eval_path=null", "data.eval_fraction=0.05",
        f"train.max_steps={steps}", "train.save_every=2", "train.eval_every=0", "train.log_every=1",
        "train.grad_accum_steps=2", f"output_dir={out}", *(["--resume"] if resume else []),
    ]  # fmt: skip
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    record = {"rc": result.returncode, "stderr_tail": result.stderr[-1500:] if result.returncode else ""}
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        lines = [json.loads(line) for line in metrics.read_text().splitlines()]
        record["losses"] = [m["loss"] for m in lines if "loss" in m]
        record["memory_end"] = next((m["device_memory"] for m in reversed(lines) if m.get("event") == "memory"), None)
        record["plan_check"] = next((m for m in lines if m.get("event") == "plan_check"), None)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    import torch

    device = torch.cuda.get_device_name(0).replace(" ", "-") if torch.cuda.is_available() else "cpu"
    path = Path(args.out) / f"recipe-smoke-{device}.json"
    results = {"device": device, "layers": args.layers, "recipes": {}}
    with tempfile.TemporaryDirectory() as work:
        for recipe in args.recipes:
            base = build_cut_checkpoint(RECIPES[recipe], args.layers, Path(work) / recipe / "base")
            run_dir = Path(work) / recipe / "run"
            first = train(recipe, base, run_dir, steps=4, resume=False)
            resumed = train(recipe, base, run_dir, steps=6, resume=True)
            results["recipes"][recipe] = {"first": first, "resume": resumed}
            ok = first["rc"] == 0 and resumed["rc"] == 0
            print(f"{recipe}: {'ok' if ok else 'FAILED'}; losses {first.get('losses')} then {resumed.get('losses')}", flush=True)
            path.write_text(json.dumps(results, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
