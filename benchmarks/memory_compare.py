"""Peak memory of one training step: the usual PEFT stack against qlora-lite, same checkpoint, same batch.

Both sides load the same random-weight Llama-3.1-8B-shaped checkpoint (bf16 on disk, NF4 with
double quantization on load, bf16 compute), attach LoRA r=16 / alpha 32 / dropout 0.05 to every
linear layer of every block, turn on gradient checkpointing, and run one forward + backward of
the same micro-batch (2 x 2048 tokens, every token labelled) under the same bf16 autocast that
`fit()` uses (accelerate's `Accelerator(mixed_precision="bf16")`, as the HF Trainer with bf16=True).

  * PEFT stack: `AutoModelForCausalLM.from_pretrained(BitsAndBytesConfig(nf4, double quant, bf16))`
    + `peft.prepare_model_for_kbit_training` (its default gradient checkpointing; it also casts
    every non-4-bit weight, embeddings and lm_head included, to fp32) + `get_peft_model(LoraConfig(
    r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))`; loss
    `model(**batch).loss`, transformers' own.
  * qlora-lite: `quant.load_base_model` + `quant.enable_gradient_checkpointing` +
    `methods.attach_method` with recipes/llama3.1-8b-alpaca.yaml; loss as `fit()` computes it
    (`compute_ours_loss`, the one call site: `loss.compute_causal_lm_loss` with the recipe's
    `train.loss`, chunked by default; `--ours-loss hf` measures transformers' loss on this side too).

Memory is measured by `qlora_lite.MemoryMeter`, which needs no GPU: the peak bytes of
live tensor storages during the step, split into the static part (weights, adapter, batch:
alive before the step) and the transient part (activations, saved tensors, gradients, logits).
On CUDA the meter's peak is also checked against `torch.cuda.max_memory_allocated` (within 5%).
No optimizer is built: one forward + backward creates no optimizer state, and LoRA's 8-bit Adam
state would add ~0.1 GB at 32 layers, equal on both sides.

Figures derived from the runs:
  * per layer = (peak with 4 layers - peak with 2 layers) / 2, and the 32-layer extrapolation
    peak(2) + 30 x per layer (with gradient checkpointing a layer adds its weights and one
    checkpointed hidden state; the recomputed layer's activations are paid once);
  * head and loss = the transient storages alive at the peak with a vocabulary-sized dimension
    (the logits, their fp32 copy, log-softmax, their gradients, and a bf16 copy of an fp32
    lm_head that autocast makes and the backward keeps). The embeddings and lm_head are frozen,
    so no other tensor of the step has a vocabulary-sized dimension: this is exactly what the
    head and the loss hold at the moment of the peak; the rest of the transient peak is the
    trunk's (checkpointed hidden states, the recomputed layer, LoRA gradients). Their own peak,
    the most they held at any one moment, is reported too: with the chunked loss the step's
    peak moves into the trunk and the head and loss hold nothing at that moment.

Each measurement runs in a fresh subprocess, so peaks never mix; results are rewritten after
each one.

    python benchmarks/memory_compare.py --quick             # hidden 1024, vocab 32000: ~2 minutes on 2 CPU cores
    python benchmarks/memory_compare.py                     # Llama-3.1-8B widths, 2 and 4 layers: ~11 minutes on 2 CPU cores
    python benchmarks/memory_compare.py --ours-loss hf      # both sides with transformers' loss
    python benchmarks/memory_compare.py --layers 2 --seq 1024 --micro-batch 1

Writes benchmarks/results/memory-<quick|llama8b>[-ours-hf-loss]-<cpu|cuda>.{json,md}.
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
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GIB = 1024**3
SIDES = ("peft", "qlora-lite")
RECIPE = REPO / "recipes" / "llama3.1-8b-alpaca.yaml"
LLAMA_8B_CONFIG = REPO / "qlora_lite" / "known_configs" / "Llama-3.1-8B.json"
# Llama 3.1's rope scaling (config.json of meta-llama/Llama-3.1-8B); the known config omits it.
LLAMA_31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# --quick: same architecture and head_dim 128, ~1/4 of the widths and a 32k vocabulary.
QUICK_WIDTHS = {"hidden_size": 1024, "intermediate_size": 3584, "num_attention_heads": 8, "num_key_value_heads": 2, "vocab_size": 32000}
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}  # the recipe's values; the PEFT side gets the same
CUDA_AGREEMENT = 0.05
RESULT_MARK = "RESULT "


# ---------------------------------------------------------------------------- the checkpoint


def build_model_config(quick: bool, layers: int) -> dict:
    """Llama-3.1-8B's config.json (or --quick's narrower one) with `layers` blocks."""
    config = json.loads(LLAMA_8B_CONFIG.read_text())
    config.update(num_hidden_layers=layers, rope_scaling=LLAMA_31_ROPE, torch_dtype="bfloat16", architectures=["LlamaForCausalLM"])
    if quick:  # Llama 3's bos/eos ids lie outside a 32k vocabulary
        config.update(QUICK_WIDTHS, bos_token_id=1, eos_token_id=2)
    return config


def write_checkpoints(
    work: Path, quick: bool, layer_counts: list[int], config_of: Callable[[int], dict] | None = None,
    own_embeddings: bool = False, tokenizer_texts: list[str] | None = None,
) -> dict[int, Path]:
    """Random bf16 weights, one safetensors file per block, written once; one folder per layer count.

    Each folder holds its config.json and an index naming only its own blocks' files (symlinks to
    the shared ones), so the 2-layer model is exactly the first 2 blocks of the 4-layer one.
    config_of(layers): the config (default: build_model_config(quick, layers)); own_embeddings: the
    input embeddings in a file of their own, not with the head; tokenizer_texts: a tokenizer trained
    on them in each folder. A shared file already in work is kept (a rerun with --work reuses it).
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config_of = config_of or (lambda layers: build_model_config(quick, layers))
    most = max(layer_counts)
    config = AutoConfig.for_model(**config_of(most))
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    shared = work / "shards"
    shared.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)

    def file_of(name: str) -> str:
        if name.startswith("model.layers."):
            return f"layer-{int(name.split('.')[2]):03d}.safetensors"
        return "embed.safetensors" if own_embeddings and "embed_tokens" in name else "outer.safetensors"

    by_file: dict[str, list[str]] = {}
    for name in shapes:
        by_file.setdefault(file_of(name), []).append(name)
    for file, names in by_file.items():
        if (shared / file).exists():
            continue
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:  # HF's initializer_range: logits stay small, so the first loss is near ln(vocab)
                tensors[name] = (torch.randn(shapes[name], generator=gen) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(shared / file), metadata={"format": "pt"})
        del tensors

    folders = {}
    for layers in layer_counts:
        folder = work / f"layers-{layers}"
        folder.mkdir(exist_ok=True)
        AutoConfig.for_model(**config_of(layers)).save_pretrained(folder)
        weight_map = {}
        for name in shapes:
            if name.startswith("model.layers.") and int(name.split(".")[2]) >= layers:
                continue
            weight_map[name] = file_of(name)
        for file in set(weight_map.values()):
            link = folder / file
            if not link.exists():
                link.symlink_to(shared / file)
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if tokenizer_texts:
            from qlora_lite import build_tokenizer

            build_tokenizer(tokenizer_texts, folder, vocab_size=256)
        folders[layers] = folder
    return folders


# ---------------------------------------------------------------------------- one side, in its own process


def load_peft_stack(model_dir: str, device):
    """The usual QLoRA script: transformers + bitsandbytes + PEFT."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.bfloat16, device_map={"": device}, attn_implementation="sdpa")
    model = prepare_model_for_kbit_training(model)  # its default: gradient checkpointing on
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_ours(model_dir: str, device, loss: str | None = None):
    """qlora-lite's pieces with the Llama-3.1-8B recipe's settings, as fit() assembles them; loss overrides train.loss."""
    from qlora_lite import attach_method, enable_gradient_checkpointing, load_base_model, load_recipe

    cfg = load_recipe(RECIPE, [f"model.name_or_path={model_dir}", *([f"train.loss={loss}"] if loss else [])])
    model = load_base_model(cfg.model, cfg.quant, device, model_dir)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return attach_method(model, cfg, tokenizer=None), cfg  # the tokenizer only serves prompt tuning


def compute_peft_loss(model, batch: dict):
    """transformers' loss: logits for every token, then its ForCausalLMLoss."""
    return model(**batch).loss


def compute_ours_loss(model, batch: dict, cfg):
    """The loss exactly as fit() computes it: LOSS CALL SITE, the one line to change when fit()'s does.

    fit() calls `qlora_lite.compute_causal_lm_loss(model, batch, cfg.train)`: with
    `train.loss: chunked` (the default) a fused chunked linear cross-entropy over the labelled
    tokens, with `train.loss: hf` transformers' `model(**batch, use_cache=False).loss`.
    """
    try:
        from qlora_lite import compute_causal_lm_loss
    except ImportError:  # a tree from before train.loss existed: fit() called transformers' loss
        if cfg.train.loss != "hf":
            raise SystemExit("this qlora_lite has no qlora_lite/training/loss.py: run with --ours-loss hf") from None
        return model(**batch, use_cache=False).loss
    return compute_causal_lm_loss(model, batch, cfg.train)


def describe_checkpointing(model) -> str:
    """How gradient checkpointing is set on model (the kwargs transformers bound), for the record."""
    for module in model.modules():
        func = getattr(module, "_gradient_checkpointing_func", None)
        if func is not None:
            return f"use_reentrant={getattr(func, 'keywords', {}).get('use_reentrant')}"
    return "off"


def build_batch(vocab_size: int, micro_batch: int, seq: int, device) -> dict:
    """The same token ids on both sides; every token is a target (labels = input_ids)."""
    import torch

    gen = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab_size, (micro_batch, seq), generator=gen)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": ids.clone().to(device)}


def measure_side(side: str, model_dir: str, micro_batch: int, seq: int, warmup: int, threads: int, ours_loss: str | None) -> dict:
    """Load one side, then meter one forward + backward (after `warmup` unmetered ones)."""
    import torch
    from accelerate import Accelerator

    from qlora_lite import GIB as _GIB
    from qlora_lite import MemoryMeter, format_peak_breakdown, keep_4bit_layout, pick_device

    torch.manual_seed(0)
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    start = time.perf_counter()
    if side == "peft":
        model, cfg = load_peft_stack(model_dir, device), None
        keep_4bit_layout(model)  # a CPU-only bitsandbytes quirk (see quant.py); a no-op on GPUs
    else:
        model, cfg = load_ours(model_dir, device, ours_loss)
    load_s = time.perf_counter() - start
    # fit()'s wrapping: accelerate's bf16 autocast (the HF Trainer with bf16=True does the same).
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    model = accelerator.prepare(model)
    model.train()
    vocab = model.config.vocab_size if hasattr(model, "config") else model.base_model.config.vocab_size
    batch = build_batch(vocab, micro_batch, seq, device)

    def step():
        with accelerator.autocast():
            loss = compute_peft_loss(model, batch) if side == "peft" else compute_ours_loss(model, batch, cfg)
        accelerator.backward(loss)
        return loss.detach()

    for _ in range(warmup):
        step()
        model.zero_grad(set_to_none=True)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    if not cuda:
        touch_pages([model, batch])
    rss_before = reset_peak_rss()
    start = time.perf_counter()
    with MemoryMeter(baseline=[model, batch], device=device.type) as meter:
        loss = step()
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - start
    print(format_peak_breakdown(meter, top=10), file=sys.stderr)
    vocab_wide = sum(a.nbytes for a in meter.allocations_at_peak() if vocab in a.shape)
    vocab_wide_own_peak = meter.peak_transient_bytes_where(lambda a: vocab in a.shape)
    result = {
        "side": side,
        "loss": "transformers (model(**batch).loss)" if side == "peft" else f"fit()'s, train.loss={getattr(cfg.train, 'loss', 'hf')}",
        "layers": model.config.num_hidden_layers if hasattr(model, "config") else None,
        "micro_batch": micro_batch,
        "seq": seq,
        "first_loss": float(loss),
        "peak_gib": meter.peak_bytes / _GIB,
        "static_gib": meter.baseline_bytes / _GIB,
        "static_found_in_step_gib": meter.found_baseline_bytes / _GIB,
        "transient_gib": meter.peak_transient_bytes / _GIB,
        "head_and_loss_at_peak_gib": vocab_wide / _GIB,
        "head_and_loss_own_peak_gib": vocab_wide_own_peak / _GIB,
        "end_gib": meter.end_bytes / _GIB,
        "peak_breakdown": meter.peak_breakdown(top=10),
        "storages_seen": len(meter.allocations),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "gradient_checkpointing": describe_checkpointing(model),
        "param_bytes_by_dtype": bytes_by_dtype_gib(model),
        "load_s": load_s,
        "step_s": step_s,
    }
    if not cuda and rss_before is not None:
        # An independent CPU check: the process's resident-memory rise during the step (the meter's own
        # records and the allocator's slack included) against the meter's transient peak.
        from qlora_lite import read_peak_rss_bytes

        rise = read_peak_rss_bytes() - rss_before
        result.update(rss_rise_gib=rise / _GIB, rss_rise_over_transient=rise / max(meter.peak_transient_bytes, 1))
    if cuda:
        peak_alloc = torch.cuda.max_memory_allocated(device)
        result.update(
            cuda_allocated_before_gib=allocated_before / _GIB,
            cuda_max_allocated_gib=peak_alloc / _GIB,
            cuda_transient_gib=(peak_alloc - allocated_before) / _GIB,
            meter_over_cuda=meter.peak_bytes / peak_alloc,
            cuda_agrees_within_5pct=abs(meter.peak_bytes / peak_alloc - 1) <= CUDA_AGREEMENT,
        )
    return result


def touch_pages(objects: list) -> None:
    """Read one byte of every 4 KiB page of every tensor the objects hold.

    transformers leaves bf16 weights memory-mapped from the safetensors files, and a mapped page
    joins the resident set only when first read: without this, the RSS check would count the
    embedding rows and lm_head the first step reads as if the step had allocated them.
    """
    import torch

    from qlora_lite import iter_held_tensors

    for tensor in iter_held_tensors(objects):
        storage = tensor.untyped_storage()
        if storage.device.type == "cpu" and storage.nbytes():
            torch.empty(0, dtype=torch.uint8).set_(storage)[::4096].sum()


def reset_peak_rss() -> int | None:
    """Reset this process's peak RSS (Linux: 5 > /proc/self/clear_refs) and return the RSS now; None where it cannot."""
    from qlora_lite import read_peak_rss_bytes, read_rss_bytes

    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    rss = read_rss_bytes()
    return rss if read_peak_rss_bytes() <= rss + 2**20 else None  # the reset did not take


def bytes_by_dtype_gib(model) -> dict[str, float]:
    from qlora_lite import bytes_by_dtype

    return {k: v / GIB for k, v in sorted(bytes_by_dtype(model).items())}


def run_in_subprocess(side: str, model_dir: Path, args) -> dict:
    """One measurement in a fresh interpreter, so that nothing of the previous one is alive."""
    command = [
        sys.executable, __file__, "--measure", side, "--model-dir", str(model_dir), "--seq", str(args.seq),
        "--micro-batch", str(args.micro_batch), "--warmup", str(args.warmup), "--threads", str(args.threads),
        *(["--ours-loss", args.ours_loss] if args.ours_loss else []),
    ]  # fmt: skip
    # glibc malloc: hand freed blocks over 64 KiB straight back to the OS (no dynamic mmap threshold,
    # no arena retention), so that the process's resident memory follows its live tensors and the RSS
    # check means something. The meter's figures do not depend on it.
    malloc = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
    env = {**os.environ, **malloc, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=REPO)
    sys.stderr.write("".join(line + "\n" for line in out.stderr.splitlines() if "kernels" not in line))
    line = next((line for line in out.stdout.splitlines() if line.startswith(RESULT_MARK)), None)
    if line is None:
        raise SystemExit(f"{side} ({model_dir.name}) failed with exit code {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(line[len(RESULT_MARK) :])


# ---------------------------------------------------------------------------- derived figures and output


def derive(runs: list[dict], target_layers: int = 32) -> dict:
    """Per-layer cost from two layer counts, extrapolated to target_layers, per side."""
    derived = {}
    for side in SIDES:
        by_layers = {r["layers"]: r for r in runs if r["side"] == side}
        if len(by_layers) < 2:
            continue
        lo, hi = min(by_layers), max(by_layers)
        a, b = by_layers[lo], by_layers[hi]
        per_layer = {k: (b[k] - a[k]) / (hi - lo) for k in ("peak_gib", "static_gib", "transient_gib")}
        derived[side] = {
            "from_layers": [lo, hi],
            "per_layer_gib": per_layer,
            f"peak_at_{target_layers}_layers_gib": a["peak_gib"] + (target_layers - lo) * per_layer["peak_gib"],
        }
    return derived


def format_markdown(record: dict) -> str:
    runs = record["runs"]
    lines = [
        f"Peak memory of one forward + backward, LoRA r=16 all-linear on NF4, {record['model']}, "
        f"micro-batch {record['micro_batch']} x seq {record['seq']}, {record['device']}, {record['date']}.",
        "Loss: " + "; ".join(sorted({f"{r['side']} {r['loss']}" for r in runs})) + ".",
        "Measured with `qlora_lite.MemoryMeter` (live tensor storages; static = alive before the step).",
        "",
        "| layers | side | peak GiB | static GiB | transient GiB | head + loss at peak GiB | head + loss own peak GiB | RSS rise in the step GiB | first loss | step s |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(runs, key=lambda r: (r["layers"], r["side"])):
        rss = f"{r['rss_rise_gib']:.2f}" if r.get("rss_rise_gib") is not None else "n/a"
        lines.append(
            f"| {r['layers']} | {r['side']} | {r['peak_gib']:.2f} | {r['static_gib']:.2f} | {r['transient_gib']:.2f} | "
            f"{r['head_and_loss_at_peak_gib']:.2f} | {r['head_and_loss_own_peak_gib']:.2f} | {rss} | {r['first_loss']:.4f} | {r['step_s']:.0f} |"
        )
    if record.get("derived"):
        lines += ["", "| side | per layer GiB (peak / static / transient) | peak at 32 layers GiB |", "| --- | --- | ---: |"]
        for side, d in record["derived"].items():
            p = d["per_layer_gib"]
            lines.append(f"| {side} | {p['peak_gib']:.3f} / {p['static_gib']:.3f} / {p['transient_gib']:.3f} | {d['peak_at_32_layers_gib']:.2f} |")
    if any("meter_over_cuda" in r for r in runs):
        lines += ["", "| layers | side | meter peak GiB | torch.cuda.max_memory_allocated GiB | ratio | within 5% |", "| ---: | --- | ---: | ---: | ---: | --- |"]
        for r in runs:
            if "meter_over_cuda" in r:
                lines.append(f"| {r['layers']} | {r['side']} | {r['peak_gib']:.3f} | {r['cuda_max_allocated_gib']:.3f} | {r['meter_over_cuda']:.3f} | {r['cuda_agrees_within_5pct']} |")
    if record.get("loss_agreement"):
        lines += ["", f"First loss: {record['loss_agreement']}."]
    lines += ["", "Largest transient storages alive at each peak:", ""]
    for r in sorted(runs, key=lambda r: (r["layers"], r["side"])):
        lines.append(f"- {r['side']}, {r['layers']} layers (static: {', '.join(f'{k} {v:.2f}' for k, v in r['param_bytes_by_dtype'].items())} GiB):")
        for g in r["peak_breakdown"][:6]:
            shape = "x".join(str(d) for d in g["shape"])
            lines.append(f"  - {g['bytes'] / GIB:.3f} GiB: {g['count']} x `{g['op']}` {g['dtype']}[{shape}]")
    lines += ["", *record["notes"]]
    return "\n".join(lines) + "\n"


def compare_losses(runs: list[dict]) -> str | None:
    parts = []
    for layers in sorted({r["layers"] for r in runs}):
        pair = {r["side"]: r["first_loss"] for r in runs if r["layers"] == layers}
        if len(pair) == 2:
            diff = abs(pair["peft"] - pair["qlora-lite"])
            parts.append(f"{layers} layers: PEFT {pair['peft']:.4f}, qlora-lite {pair['qlora-lite']:.4f} (|diff| {diff:.4f})")
    return "; ".join(parts) or None


def write_results(record: dict, out_dir: Path, name: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out_dir / f"{name}.md").write_text(format_markdown(record))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="hidden 1024 / intermediate 3584 / vocab 32000 instead of Llama-3.1-8B's widths")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--warmup", type=int, default=None, help="unmetered steps first (default: 0 on the CPU, 1 on CUDA, where the allocator's first-use buffers would count)")
    parser.add_argument("--ours-loss", choices=("chunked", "hf"), default=None, help="qlora-lite's train.loss (default: the recipe's, i.e. what fit() uses)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per measurement")
    parser.add_argument("--work", default=None, help="folder for the random checkpoint (default: a temporary one, removed at the end)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--measure", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    import torch

    if args.warmup is None:
        args.warmup = 1 if torch.cuda.is_available() else 0
    if args.measure:
        result = measure_side(args.measure, args.model_dir, args.micro_batch, args.seq, args.warmup, args.threads, args.ours_loss)
        print(RESULT_MARK + json.dumps(result), flush=True)
        return

    device = f"cuda: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else f"cpu: {platform.machine()}, {args.threads} threads"
    loss_tag = f"-ours-{args.ours_loss}-loss" if args.ours_loss else ""
    name = f"memory-{'quick' if args.quick else 'llama8b'}{loss_tag}-{'cuda' if torch.cuda.is_available() else 'cpu'}"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="memory-compare-"))
    widths = QUICK_WIDTHS if args.quick else {k: v for k, v in build_model_config(False, 0).items() if k in QUICK_WIDTHS}
    record = {
        "model": ("quick Llama " if args.quick else "Llama-3.1-8B shapes ") + ", ".join(f"{k} {v}" for k, v in widths.items()),
        "widths": widths,
        "layers": args.layers,
        "micro_batch": args.micro_batch,
        "seq": args.seq,
        "warmup": args.warmup,
        "device": device,
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "ours_loss": args.ours_loss or "the recipe's train.loss",
        "command": "python benchmarks/memory_compare.py " + " ".join(sys.argv[1:]),
        "runs": [],
        "notes": NOTES,
    }
    try:
        start = time.perf_counter()
        folders = write_checkpoints(work, args.quick, args.layers)
        print(f"random bf16 checkpoint written in {time.perf_counter() - start:.0f} s: {work}", flush=True)
        for layers in args.layers:
            for side in args.sides:
                result = run_in_subprocess(side, folders[layers], args)
                print(f"{side:10s} {layers} layers: peak {result['peak_gib']:.3f} GiB = static {result['static_gib']:.3f} + "
                      f"transient {result['transient_gib']:.3f} (head + loss {result['head_and_loss_at_peak_gib']:.3f}); "
                      f"first loss {result['first_loss']:.4f}; step {result['step_s']:.0f} s", flush=True)  # fmt: skip
                record["runs"].append(result)
                record["derived"] = derive(record["runs"])
                record["loss_agreement"] = compare_losses(record["runs"])
                write_results(record, Path(args.out), name)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(format_markdown(record))


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    def git(*argv: str) -> str:
        return subprocess.run(["git", *argv], capture_output=True, text=True, cwd=REPO).stdout.strip()

    return {
        "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__, "qlora_lite_commit": git("rev-parse", "--short", "HEAD"),
        "qlora_lite_uncommitted": git("status", "--porcelain", "--", "qlora_lite").splitlines(),
    }  # fmt: skip


NOTES = [
    "Notes:",
    "- static = weights (NF4 blocks and their constants, embeddings, lm_head, norms), LoRA weights and the batch; "
    "PEFT's `prepare_model_for_kbit_training` casts embeddings, lm_head and norms to fp32, qlora-lite keeps them bf16.",
    "- head + loss at peak = transient storages alive at the peak with a vocabulary-sized dimension: logits, their "
    "fp32 copy, log-softmax, gradients, and autocast's bf16 copy of an fp32 lm_head (PEFT side), which the backward keeps. "
    "Embeddings and lm_head are frozen, so nothing else in the step has a vocabulary-sized dimension.",
    "- head + loss own peak = the most those vocabulary-sized storages held at any one moment of the step (with a chunked "
    "loss that moment is not the step's peak).",
    "- per layer = (peak at the larger layer count - peak at the smaller) / difference; 32 layers = peak(smaller) + "
    "(32 - smaller) x per layer.",
    "- RSS rise in the step (CPU only) = peak resident memory during the step (VmHWM, reset just before it) minus the "
    "resident memory at its start, with every weight page read in beforehand and glibc told to return freed blocks "
    "over 64 KiB at once: an independent check of the transient column, which it exceeds by what is not a tensor "
    "(heap blocks, thread arenas, the meter's own records; ~0.02-0.12 GiB seen here), pages not yet written, and "
    "scratch buffers an operation frees before returning.",
    "- the meter counts live tensor storages (CUDA sizes rounded to 512 B, as the caching allocator does); it does not see "
    "scratch buffers an operation frees before returning, nor the allocator's cache or a CUDA context.",
]


if __name__ == "__main__":
    main()
