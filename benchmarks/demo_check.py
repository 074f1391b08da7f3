"""Check that the offline demo learns, using only transformers, peft and bitsandbytes.

A standalone stand-in for `qlora-lite train recipes/tiny-demo.yaml`, kept as an
independent check of the demo's numbers: it builds (or reuses) the demo base, loads it
in 4-bit NF4 through transformers' BitsAndBytesConfig, attaches LoRA with the `peft`
package (the same maths as ours, h = W0 x + (alpha/r) B A x), trains with bitsandbytes'
8-bit AdamW using the recipe's steps, batch and learning rate, and reports eval loss and
exact match before and after, with wall times.

    python benchmarks/demo_check.py                 # reuse the cached base if there is one
    python benchmarks/demo_check.py --fresh         # time a first run: build the base in a temp cache

Exit status 1 when the demo's bar is missed (eval loss must at least halve, exact match
must rise by 50 points or more).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from qlora_lite import (  # noqa: E402
    DEMO_BASE_SPEC,
    ensure_demo_base,
    format_demo_prompt,
    load_recipe,  # noqa: E402
)

IGNORE_INDEX = -100


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "tiny-demo.yaml"))
    parser.add_argument("--fresh", action="store_true", help="build the base in a new temporary cache")
    parser.add_argument("--compute-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--base-seed", type=int, default=None, help="pretrain a variant base with this seed (robustness check)")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="pretrain a variant base for this many steps")
    parser.add_argument(
        "--show-worst", type=int, default=0, help="after training, print the N eval examples with the highest loss"
    )
    parser.add_argument("--override", nargs="*", default=[], help="recipe overrides, e.g. train.lr=1e-3")
    return parser.parse_args()


def read_records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tokenize_record(record: dict[str, str], tokenizer, max_seq_len: int) -> dict[str, list[int]]:
    """Prompt and response tokenized separately, + EOS, loss on response and EOS only.

    Mirrors qlora_lite.tokenize_example for alpaca records: the prompt with the BOS the demo's
    SentencePiece tokenizer adds, the response without (checked equal on 50 records).
    """
    prompt_ids = tokenizer(format_demo_prompt(record))["input_ids"]
    answer_ids = tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_seq_len]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_seq_len]
    return {"input_ids": ids, "labels": labels}


def collate(examples: list[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        labels[i, :n] = torch.tensor(e["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def compute_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the learned tokens, and their count (token-weighted means)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    targets = batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_loss(model, examples, pad_id: int, batch_size: int = 50) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = compute_loss(model, collate(examples[i : i + batch_size], pad_id))
        total, count = total + loss.item(), count + n
    model.train()
    return total / count


@torch.no_grad()
def evaluate_exact_match(model, tokenizer, records, max_new_tokens: int) -> tuple[float, list[str]]:
    """Greedy generation one prompt at a time until EOS; decoded answer `.strip()` == output."""
    model.eval()
    hits, samples = 0, []
    for record in records:
        ids = torch.tensor([tokenizer(format_demo_prompt(record))["input_ids"]])
        out = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
        hits += answer == record["output"].strip()
        if len(samples) < 3:
            samples.append(f"{record['input']} -> {answer!r} (want {record['output']})")
    model.train()
    return hits / len(records), samples


@torch.no_grad()
def show_worst_examples(model, tokenizer, examples, n: int) -> None:
    """Print the n examples with the highest summed loss, token by token (diagnostics)."""
    model.eval()
    scored = []
    for e in examples:
        batch = collate([e], tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"]).logits[0, :-1]
        targets = batch["labels"][0, 1:]
        keep = targets != IGNORE_INDEX
        losses = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="none")
        tokens = tokenizer.convert_ids_to_tokens(targets[keep].tolist())
        scored.append((losses.sum().item(), [f"{t}:{l:.2f}" for t, l in zip(tokens, losses.tolist())]))
    for total, detail in sorted(scored, reverse=True)[:n]:
        print(f"  worst: {total:.2f}  {' '.join(detail)}")


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_recipe(args.recipe, args.override)
    recipe_dir = Path(args.recipe).resolve().parent
    t = cfg.train

    # --- base model ---------------------------------------------------------------------
    start = time.perf_counter()
    spec = DEMO_BASE_SPEC
    if args.base_seed is not None:
        spec = dataclasses.replace(spec, seed=args.base_seed)
    if args.pretrain_steps is not None:
        spec = dataclasses.replace(spec, pretrain_steps=args.pretrain_steps)
    cache = tempfile.mkdtemp(prefix="demo-cache-") if args.fresh else None
    base_dir = ensure_demo_base(cache, spec)
    base_s = time.perf_counter() - start

    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    start = time.perf_counter()
    compute_dtype = getattr(torch, args.compute_dtype)
    quant = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype
    )
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=torch.float32)
    torch.manual_seed(t.seed)
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=cfg.lora.target_modules if cfg.lora.target_modules != "all-linear" else "all-linear",
    )
    model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n4bit = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    load_s = time.perf_counter() - start

    train_records = read_records(recipe_dir / cfg.data.path)
    eval_records = read_records(recipe_dir / cfg.data.eval_path)
    train = [tokenize_record(r, tokenizer, t.max_seq_len) for r in train_records]
    evaluation = [tokenize_record(r, tokenizer, t.max_seq_len) for r in eval_records]
    em_records = eval_records[: t.exact_match_examples]
    answer_tokens = max(len(tokenizer(r["output"], add_special_tokens=False)["input_ids"]) for r in em_records)
    max_new_tokens = answer_tokens + 4  # room for the EOS and a little more, so a model that never stops is caught
    print(
        f"base {base_dir.name}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params in the quantized model, "
        f"{n4bit} Linear4bit layers, LoRA trainable {trainable:,}; {len(train)} train / {len(evaluation)} eval examples, "
        f"longest {max(len(e['input_ids']) for e in train)} tokens; max_new_tokens {max_new_tokens}"
    )

    # --- before ---------------------------------------------------------------------------
    start = time.perf_counter()
    loss_before = evaluate_loss(model, evaluation, tokenizer.pad_token_id)
    em_before, samples_before = evaluate_exact_match(model, tokenizer, em_records, max_new_tokens)
    eval_before_s = time.perf_counter() - start
    print(f"before: eval loss {loss_before:.3f}, exact match {em_before:.0%} ({eval_before_s:.1f} s)  {samples_before}")

    # --- train ----------------------------------------------------------------------------
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = bnb.optim.AdamW8bit(params, lr=t.lr, weight_decay=t.weight_decay)
    generator = torch.Generator().manual_seed(t.seed)
    order: list[int] = []
    model.train()
    start = time.perf_counter()
    for step in range(t.max_steps):
        warm = min(1.0, (step + 1) / max(1, t.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * step / t.max_steps)) if t.lr_scheduler == "cosine" else 1.0
        for group in optimizer.param_groups:
            group["lr"] = t.lr * warm * decay
        micro_batches = []
        for _ in range(t.grad_accum_steps):
            if len(order) < t.micro_batch_size:  # reshuffle each epoch
                order += torch.randperm(len(train), generator=generator).tolist()
            micro_batches.append(collate([train[i] for i in order[: t.micro_batch_size]], tokenizer.pad_token_id))
            del order[: t.micro_batch_size]
        count = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        step_loss = 0.0
        for batch in micro_batches:
            loss, _ = compute_loss(model, batch)
            (loss / count).backward()
            step_loss += loss.item() / count
        if t.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % t.log_every == 0:
            print(f"  step {step + 1}/{t.max_steps}: loss {step_loss:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    train_s = time.perf_counter() - start

    # --- after ----------------------------------------------------------------------------
    start = time.perf_counter()
    loss_after = evaluate_loss(model, evaluation, tokenizer.pad_token_id)
    em_after, samples_after = evaluate_exact_match(model, tokenizer, em_records, max_new_tokens)
    eval_after_s = time.perf_counter() - start
    print(f"after:  eval loss {loss_after:.3f}, exact match {em_after:.0%} ({eval_after_s:.1f} s)  {samples_after}")

    if args.show_worst:
        show_worst_examples(model, tokenizer, evaluation, args.show_worst)

    total_s = base_s + load_s + eval_before_s + train_s + eval_after_s
    ok = loss_after <= 0.5 * loss_before and em_after - em_before >= 0.5
    print(
        f"RESULT eval loss {loss_before:.3f} -> {loss_after:.3f} ({loss_after / loss_before:.2f}x), "
        f"exact match {em_before:.0%} -> {em_after:.0%} on {len(em_records)} held-out prompts; "
        f"base {base_s:.1f} s, load {load_s:.1f} s, train {train_s:.1f} s ({train_s / t.max_steps:.2f} s/step), "
        f"eval {eval_before_s + eval_after_s:.1f} s, total {total_s:.1f} s; {'PASS' if ok else 'FAIL'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
