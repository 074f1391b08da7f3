"""Preference tuning on one GPU: the peak memory of one DPO step, TRL's DPOTrainer against qlora-lite, side by side.

Both sides load the same random-weight Llama-3.1-8B-shaped checkpoint (bf16 on disk, NF4 with double quantization
on load, bf16 compute), LoRA r=16 / alpha 32 / dropout 0 on every linear layer of every block, gradient
checkpointing, and run one forward + backward of one pair: a short prompt (--prompt tokens, unlabelled) followed
by a chosen and a rejected answer of --seq tokens each, every answer token labelled; batch (2, prompt + seq),
chosen row first. The token ids are the same on both sides.

  * trl:  TRL's `DPOTrainer(model=<path>, quantization_config=BitsAndBytesConfig(nf4, double quant, bf16),
          peft_config=LoraConfig(r=16, alpha 32, dropout 0, all-linear), args=DPOConfig(bf16, gradient
          checkpointing, max_length = prompt + seq, precompute_ref_log_probs=False))` on a tiny local dataset
          (`datasets.Dataset.from_dict`, a word-level tokenizer built here whose word `t<i>` is token i). The step
          measured is the first `trainer.training_step(model, inputs)` that `trainer.train()` makes, on the batch
          of TRL's own collator, after everything train() sets up (gradient checkpointing, accelerate's bf16
          autocast); the run stops right after it, before the optimizer step. With PEFT and no precomputed
          reference log-probs the step runs the reference forward itself, adapters disabled, under no_grad.
  * ours: qlora-lite as benchmarks/long_context.py's `plain` side loads it (recipes/llama3.1-8b-alpaca.yaml with
          lora.dropout=0, objective.name=dpo, data.format=preference: `load_base_model`, `apply_lean_rms_norm`,
          gradient checkpointing, `attach_method`, accelerate's bf16 autocast); the step is
          `qlora_lite.compute_objective(model, batch, cfg)` + backward, with the reference
          log-probs precomputed data in the batch (`ref_chosen_logps`, `ref_rejected_logps`, random float32).
          Skipped (and said so) where that function does not exist yet.

Each measurement runs in a fresh subprocess; `qlora_lite.MemoryMeter` measures the step on the CPU or a GPU:
static = what was alive before the step (weights, adapter, batch), step peak = the peak of live storages above
that, and the device peak of each phase. The table also says whether a second (reference) model exists: the
parameters of every live nn.Module in the process that are not the trained model's.

Derived: per side, step peak(L) = a + b L through the two layer counts, extrapolated to 32 layers, and ours / trl
there (goal: at most 0.5x), on the step peak and on the total (static + step peak).

    python benchmarks/preference_memory.py                                     # 8B widths, 2 and 4 layers, 1024 + 1024 tokens: ~18 min on 2 cores
    python benchmarks/preference_memory.py --widths 1024,2,3584,32000 --name quick   # narrower widths: ~4 min
    python benchmarks/preference_memory.py --rewrite benchmarks/results/preference-memory-llama8b-cpu.json   # the .md again, no measuring
    python benchmarks/preference_memory.py --layers 1 2 --seq 512 --sides trl

Writes benchmarks/results/preference-memory-<name>-<cpu|cuda>.{json,md}.
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

import long_context as lc
import memory_compare as mc

GIB = 1024**3
SIDES = ("trl", "ours")
RESULT_MARK = "RESULT "
TARGET_LAYERS = 32
GOAL_RATIO = 0.5
TRL_ARGS = "DPOConfig(per_device_train_batch_size=1, bf16=True, gradient_checkpointing=True, max_length=prompt+seq, precompute_ref_log_probs=False; beta 0.1, loss_type sigmoid)"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0}
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0..3; eos "</s>" = 3
EOS_ID = 3
FIRST_WORD = len(SPECIAL)
TOKENIZER_WORDS = 32000  # the word-level vocabulary: ids below the narrowest model's vocabulary
TRL_CHUNK = 32768  # TRL's _CHUNKED_LOGPROB_CHUNK_SIZE: vocabulary columns per tile of its fused LM head


# ---------------------------------------------------------------------------- the pair, the same ids on both sides


def pair_ids(prompt: int, seq: int, seed: int = 1234) -> tuple[list[int], list[int], list[int]]:
    """Prompt ids and the chosen and rejected answers' ids (each seq tokens, ending with eos)."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def draw(n: int) -> list[int]:
        return torch.randint(FIRST_WORD, TOKENIZER_WORDS, (n,), generator=gen).tolist()

    return draw(prompt), draw(seq - 1) + [EOS_ID], draw(seq - 1) + [EOS_ID]


def words(ids: list[int]) -> str:
    return " ".join(SPECIAL[i] if i < FIRST_WORD else f"t{i}" for i in ids)


def build_tokenizer():
    """Word-level: `t<i>` is token i, split on whitespace; pad 0, eos 3; no bos added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL)} | {f"t{i}": i for i in range(FIRST_WORD, TOKENIZER_WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


# ---------------------------------------------------------------------------- what the process holds


def other_model_params(model) -> dict:
    """Parameters of every live nn.Module that are not `model`'s: a second (reference) model would show here."""
    import gc

    from torch import nn

    own = {id(p) for p in model.parameters()}
    extra: dict[int, tuple[int, int]] = {}
    holders = set()
    for obj in gc.get_objects():
        if isinstance(obj, nn.Module):
            for p in obj.parameters(recurse=False):
                if id(p) not in own and id(p) not in extra:
                    extra[id(p)] = (p.numel(), p.numel() * p.element_size())
                    holders.add(type(obj).__name__)
    return {
        "params": sum(n for n, _ in extra.values()),
        "bytes_gib": sum(b for _, b in extra.values()) / GIB,
        "held_by": sorted(holders),
    }


def meter_result(meter, vocab: int, trl_side: bool = False) -> dict:
    from qlora_lite import read_peak_rss_bytes

    def head(a) -> bool:  # the LM head's and the loss's storages: a vocabulary (or TRL's vocabulary tile) dimension
        return vocab in a.shape or TRL_CHUNK in a.shape

    largest = max((a.nbytes for a in meter.allocations if not a.is_baseline), default=0)
    result = {
        "static_gib": meter.baseline_bytes / GIB,
        "static_found_in_step_gib": meter.found_baseline_bytes / GIB,
        "step_peak_gib": meter.peak_transient_bytes / GIB,
        "total_peak_gib": meter.peak_bytes / GIB,
        "phase_peaks_gib": {k: v / GIB for k, v in meter.phase_peaks.items()},
        "head_and_loss_at_peak_gib": sum(a.nbytes for a in meter.allocations_at_peak() if head(a)) / GIB,
        "head_and_loss_own_peak_gib": meter.peak_transient_bytes_where(head) / GIB,
        "largest_storage_mib": largest / 2**20,
        "peak_breakdown": meter.peak_breakdown(top=10),
        "process_peak_rss_gib": read_peak_rss_bytes() / GIB,
    }
    if trl_side:
        tiles = {min(vocab, TRL_CHUNK), vocab % TRL_CHUNK} - {0}

        def cpu_fallback(a) -> bool:
            """TRL's fused head on a device without Triton (the CPU): the fp32 / bool [tokens, tile] temporaries of its torch
            fallback and the fp32 upcasts of `_addmm_fp32` ([tokens, tile], [tile, hidden]). On CUDA a Triton kernel works in
            the bf16 tile in place and torch >= 2.8 multiplies bf16 into the fp32 accumulator without them. The bf16 tile
            buffer itself is kept."""
            return len(a.shape) == 2 and a.dtype != "bfloat16" and not a.is_baseline and bool(tiles & set(a.shape))

        result["step_peak_without_cpu_fallback_gib"] = meter.peak_transient_bytes_where(lambda a: not cpu_fallback(a)) / GIB
        result["cpu_fallback_own_peak_gib"] = meter.peak_transient_bytes_where(cpu_fallback) / GIB
    return result


# ---------------------------------------------------------------------------- one measurement, in its own process


class _Measured(Exception):
    """Raised right after the metered training_step, so train() goes no further (no optimizer step)."""


def measure_trl(model_dir: str, prompt: int, seq: int, threads: int, dtype: str) -> dict:
    import torch
    import trl
    import trl.trainer.dpo_trainer as dpo_module
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig
    from trl import DPOConfig, DPOTrainer

    from qlora_lite import MemoryMeter, format_peak_breakdown, keep_4bit_layout

    torch.manual_seed(0)
    if not torch.cuda.is_available():
        torch.set_num_threads(threads)
    p_ids, c_ids, r_ids = pair_ids(prompt, seq)
    n_pairs = 2
    # The metered batch is the first one; the others only keep the dataset a dataset. Each pair: the same lengths.
    data = {"prompt": [words(p_ids)] * n_pairs, "chosen": [" " + words(c_ids)] * n_pairs, "rejected": [" " + words(r_ids)] * n_pairs}
    tokenizer = build_tokenizer()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"], target_modules="all-linear", task_type="CAUSAL_LM")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out_dir = tempfile.mkdtemp(prefix="trl-dpo-")
    args = DPOConfig(
        output_dir=out_dir, per_device_train_batch_size=1, bf16=True, gradient_checkpointing=True, max_length=prompt + seq,
        precompute_ref_log_probs=False, report_to=[], max_steps=1, save_strategy="no", logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, use_cpu=device == "cpu", model_init_kwargs={"dtype": dtype, "attn_implementation": "sdpa", "device_map": {"": device}},
    )  # fmt: skip
    start = time.perf_counter()
    trainer = DPOTrainer(model=model_dir, args=args, train_dataset=Dataset.from_dict(data), processing_class=tokenizer, quantization_config=quant, peft_config=lora)
    load_s = time.perf_counter() - start
    keep_4bit_layout(trainer.model)  # the CPU-only bitsandbytes quirk (see quant.py); a no-op on GPUs
    config = trainer.model.base_model.config
    state: dict = {}
    original_step = trainer.training_step
    original_backward = trainer.accelerator.backward
    original_use_adapter = dpo_module.use_adapter

    def backward(loss, **kwargs):
        state["meter"].start_phase("backward")
        return original_backward(loss, **kwargs)

    import contextlib

    @contextlib.contextmanager
    def use_adapter(model, adapter_name):  # the reference forward: adapters disabled
        meter = state.get("meter")
        if meter is not None:
            meter.start_phase("reference forward")
        with original_use_adapter(model, adapter_name):
            yield
        if meter is not None:
            meter.start_phase("loss")

    def training_step(model, inputs, *rest, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        state["inputs"] = {k: (list(v.shape), str(v.dtype)) for k, v in inputs.items() if hasattr(v, "shape")}
        state["completion_tokens"] = int(inputs["completion_mask"].sum())
        state["gradient_checkpointing"] = bool(getattr(trainer.model, "is_gradient_checkpointing", False))
        t0 = time.perf_counter()
        with MemoryMeter(baseline=[trainer.model, model, inputs], device=device) as meter:
            state["meter"] = meter
            meter.start_phase("policy forward")
            loss = original_step(model, inputs, *rest, **kwargs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            state["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / GIB
        state["step_s"] = time.perf_counter() - t0
        state["loss"] = float(loss)
        raise _Measured

    trainer.training_step = training_step
    trainer.accelerator.backward = backward
    dpo_module.use_adapter = use_adapter
    try:
        trainer.train()
    except _Measured:
        pass
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    meter = state["meter"]
    print(format_peak_breakdown(meter, top=12), file=sys.stderr)
    model = trainer.model
    lm_head = model.base_model.model.get_output_embeddings() if hasattr(model, "base_model") else model.get_output_embeddings()
    result = {
        "side": "trl", "layers": config.num_hidden_layers, "prompt": prompt, "seq": seq, "loss": state["loss"], "step_s": state["step_s"], "load_s": load_s,
        "batch": state["inputs"], "completion_tokens": state["completion_tokens"],
        "gradient_checkpointing": f"{state['gradient_checkpointing']}, {mc.describe_checkpointing(model)}",
        "ref_model": None if trainer.ref_model is None else type(trainer.ref_model).__name__,
        "other_model_params": other_model_params(model),
        "fused_lm_head_patched": "forward" in vars(model.get_base_model()),  # add_fused_lm_head sets an instance forward
        "lm_head_dtype": str(lm_head.weight.dtype), "model_dtype_arg": dtype,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "param_bytes_by_dtype": mc.bytes_by_dtype_gib(model),
        "trl": trl.__version__,
        **meter_result(meter, config.vocab_size, trl_side=True),
    }  # fmt: skip
    if "cuda_max_allocated_gib" in state:
        result["cuda_max_allocated_gib"] = state["cuda_max_allocated_gib"]
    return result


def ours_batch(prompt: int, seq: int, device) -> dict:
    """(2B, T): chosen rows first, then rejected; labels -100 on the prompt; reference log-probs as precomputed data."""
    import torch

    p_ids, c_ids, r_ids = pair_ids(prompt, seq)
    ids = torch.tensor([p_ids + c_ids, p_ids + r_ids])
    labels = ids.clone()
    labels[:, :prompt] = -100
    gen = torch.Generator().manual_seed(99)
    ref = -(torch.rand(2, generator=gen, dtype=torch.float32) * 100 + seq * 10)  # log-probs of a seq-token answer: large negative
    return {
        "input_ids": ids.to(device), "labels": labels.to(device), "attention_mask": torch.ones_like(ids).to(device),
        "ref_chosen_logps": ref[:1].to(device), "ref_rejected_logps": ref[1:].to(device),
    }  # fmt: skip


def measure_ours(model_dir: str, prompt: int, seq: int, threads: int) -> dict:
    import torch
    from accelerate import Accelerator

    from qlora_lite import (
        MemoryMeter,
        apply_lean_rms_norm,
        attach_method,
        enable_gradient_checkpointing,
        format_peak_breakdown,
        load_base_model,
        load_recipe,
        pick_device,
    )
    from qlora_lite import compute_objective

    torch.manual_seed(0)
    device = pick_device()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    start = time.perf_counter()
    overrides = [f"model.name_or_path={model_dir}", "lora.dropout=0", "objective.name=dpo", "data.format=preference",
                 f"train.max_seq_len={prompt + seq}", "train.micro_batch_size=1"]  # fmt: skip
    cfg = load_recipe(mc.RECIPE, overrides)  # load_recipe = the YAML + overrides through build_config
    model = load_base_model(cfg.model, cfg.quant, device, model_dir)
    apply_lean_rms_norm(model)
    enable_gradient_checkpointing(model)
    model = attach_method(model, cfg, tokenizer=None)
    load_s = time.perf_counter() - start
    accelerator = Accelerator(mixed_precision="bf16", cpu=device.type == "cpu")
    model = accelerator.prepare(model)
    model.train()
    config = model.config if hasattr(model, "config") else model.base_model.config
    batch = ours_batch(prompt, seq, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    with MemoryMeter(baseline=[model, batch], device=device.type) as meter:
        meter.start_phase("forward")
        with accelerator.autocast():
            loss, metrics = compute_objective(model, batch, cfg)
        meter.start_phase("backward")
        accelerator.backward(loss)
    if device.type == "cuda":
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    print(format_peak_breakdown(meter, top=12), file=sys.stderr)
    result = {
        "side": "ours", "layers": config.num_hidden_layers, "prompt": prompt, "seq": seq, "loss": float(loss), "step_s": step_s, "load_s": load_s,
        "batch": {k: (list(v.shape), str(v.dtype)) for k, v in batch.items()},
        "completion_tokens": int((batch["labels"] != -100).sum()),
        "gradient_checkpointing": mc.describe_checkpointing(model),
        "ref_model": None, "other_model_params": other_model_params(model),
        "metrics": {k: (float(v) if hasattr(v, "__float__") else str(v)) for k, v in (metrics or {}).items()},
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "trainable_dtypes": sorted({str(p.dtype) for p in model.parameters() if p.requires_grad}),
        "param_bytes_by_dtype": mc.bytes_by_dtype_gib(model),
        **meter_result(meter, config.vocab_size),
    }  # fmt: skip
    if device.type == "cuda":
        result["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated(device) / GIB
    return result


def ours_available() -> str | None:
    """None where qlora_lite.compute_objective imports, else why not."""
    out = subprocess.run(
        [sys.executable, "-c", "from qlora_lite import compute_objective"], capture_output=True, text=True, cwd=REPO, check=False
    )
    return None if out.returncode == 0 else (out.stderr.strip().splitlines() or ["import failed"])[-1][:300]


def run_in_subprocess(side: str, model_dir: Path, args) -> dict:
    """One measurement in a fresh interpreter, so that nothing of the previous one is alive."""
    command = [
        sys.executable, __file__, "--measure", side, "--model-dir", str(model_dir), "--seq", str(args.seq), "--prompt", str(args.prompt),
        "--threads", str(args.threads), "--trl-dtype", args.trl_dtype,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(command, capture_output=True, text=True, check=False, env=env, cwd=REPO)
    sys.stderr.write("".join(line + "\n" for line in out.stderr.splitlines()[-20:] if "kernels" not in line))
    line = next((line for line in out.stdout.splitlines() if line.startswith(RESULT_MARK)), None)
    if line is None:
        last = out.stderr.strip().splitlines()[-1:] or [""]
        return {"side": side, "failed": f"exit code {out.returncode}: {last[0][:300]}"}
    return json.loads(line[len(RESULT_MARK) :])


# ---------------------------------------------------------------------------- derived figures and output


def extrapolate(runs: list[dict]) -> dict:
    """Per side: value(L) = a + b L through the two layer counts (the least and the most measured), at 32 layers."""
    out: dict = {}
    for side in SIDES:
        by_layers = {r["layers"]: r for r in runs if r.get("side") == side and "step_peak_gib" in r}
        if len(by_layers) < 2:
            continue
        lo, hi = min(by_layers), max(by_layers)
        fit = {}
        for key in ("step_peak_gib", "static_gib", "total_peak_gib", "step_peak_without_cpu_fallback_gib"):
            if key not in by_layers[lo] or key not in by_layers[hi]:
                continue
            b = (by_layers[hi][key] - by_layers[lo][key]) / (hi - lo)
            a = by_layers[lo][key] - b * lo
            fit[key] = {"a": a, "b_per_layer": b, f"at_{TARGET_LAYERS}": a + b * TARGET_LAYERS}
        out[side] = {"from_layers": [lo, hi], **fit}
    if "trl" in out and "ours" in out:
        out["ratio_ours_over_trl"] = {
            key: out["ours"][key][f"at_{TARGET_LAYERS}"] / out["trl"][key][f"at_{TARGET_LAYERS}"] for key in ("step_peak_gib", "total_peak_gib")
        }
        if "step_peak_without_cpu_fallback_gib" in out["trl"]:
            out["ratio_ours_over_trl"]["step_peak_vs_trl_without_cpu_fallback"] = (
                out["ours"]["step_peak_gib"][f"at_{TARGET_LAYERS}"] / out["trl"]["step_peak_without_cpu_fallback_gib"][f"at_{TARGET_LAYERS}"]
            )
        ratio = out["ratio_ours_over_trl"]["step_peak_gib"]
        out["goal"] = f"step peak at {TARGET_LAYERS} layers: ours / trl = {ratio:.3f} (goal: at most {GOAL_RATIO}): {'met' if ratio <= GOAL_RATIO else 'missed'}"
        gpu_like = out["ratio_ours_over_trl"].get("step_peak_vs_trl_without_cpu_fallback")
        if gpu_like is not None:
            out["goal"] += (f"; against TRL's step peak without its CPU-only head temporaries (what its Triton path would hold): {gpu_like:.3f}: "
                            f"{'met' if gpu_like <= GOAL_RATIO else 'missed'}")
    return out


def format_markdown(record: dict) -> str:
    s = record["settings"]
    lines = [
        (
            f"One DPO step (forward + backward), LoRA r=16 all-linear (dropout 0) on NF4 (double quant, bf16 compute), {record['model']}, "
            f"one pair: prompt {s['prompt']} + chosen {s['seq']} / rejected {s['seq']} answer tokens (batch 2 x {s['prompt'] + s['seq']}, "
            f"answer tokens labelled), gradient checkpointing, bf16 autocast, {record['device']}, {record['date']}."
        ),
        (
            "Measured with `qlora_lite.MemoryMeter`: static = alive before the step (weights, adapter, batch); step peak = the peak of "
            "live storages above it; total = static + step peak. Other model params = parameters of live modules that are not the "
            "trained model's (a second, reference model would show here)."
        ),
        f"Versions: {', '.join(f'{k} {v}' for k, v in record['versions'].items() if not isinstance(v, list))}.",
        "",
        "| side | layers | static GiB | step peak GiB | total GiB | step peak without TRL's CPU-only head temporaries GiB | phase peaks GiB (live bytes, static included) | head + loss at peak / own peak GiB | ref model | other model params | peak RSS GiB | step s | loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(record["runs"], key=lambda r: (SIDES.index(r["side"]), r.get("layers", 0))):
        if "step_peak_gib" not in r:
            lines.append(f"| {r['side']} | {r.get('layers', '')} | {r.get('skipped') or r.get('failed')} | | | | | | | | | | |")
            continue
        phases = ", ".join(f"{k} {v:.2f}" for k, v in r["phase_peaks_gib"].items() if k != "step")
        without = f"{r['step_peak_without_cpu_fallback_gib']:.2f}" if "step_peak_without_cpu_fallback_gib" in r else ""
        lines.append(
            f"| {r['side']} | {r['layers']} | {r['static_gib']:.2f} | {r['step_peak_gib']:.2f} | {r['total_peak_gib']:.2f} | {without} | {phases} | "
            f"{r['head_and_loss_at_peak_gib']:.2f} / {r['head_and_loss_own_peak_gib']:.2f} | {r['ref_model'] or 'none'} | "
            f"{r['other_model_params']['params']:,} | {r['process_peak_rss_gib']:.2f} | {r['step_s']:.0f} | {r['loss']:.4f} |"
        )
    ex = record.get("extrapolation") or {}
    if any(side in ex for side in SIDES):
        lines += ["", f"Extrapolated to {TARGET_LAYERS} layers, value(L) = a + b L through the two layer counts:", "",
                  "| side | from layers | step peak: a + b L GiB | step peak at 32 GiB | static at 32 GiB | total at 32 GiB |",
                  "| --- | --- | --- | ---: | ---: | ---: |"]  # fmt: skip
        for side in SIDES:
            if side in ex:
                e = ex[side]
                sp = e["step_peak_gib"]
                lines.append(
                    f"| {side} | {e['from_layers'][0]}, {e['from_layers'][1]} | {sp['a']:.3f} + {sp['b_per_layer']:.4f} L | {sp['at_32']:.2f} | "
                    f"{e['static_gib']['at_32']:.2f} | {e['total_peak_gib']['at_32']:.2f} |"
                )
                if "step_peak_without_cpu_fallback_gib" in e:
                    w = e["step_peak_without_cpu_fallback_gib"]
                    lines.append(f"| {side}, without its CPU-only head temporaries | | {w['a']:.3f} + {w['b_per_layer']:.4f} L | {w['at_32']:.2f} | | "
                                 f"{e['static_gib']['at_32'] + w['at_32']:.2f} |")
        if "ratio_ours_over_trl" in ex:
            rt = ex["ratio_ours_over_trl"]
            extra = f"; step peak against TRL's without its CPU-only head temporaries {rt['step_peak_vs_trl_without_cpu_fallback']:.3f}x" if "step_peak_vs_trl_without_cpu_fallback" in rt else ""
            lines += ["", f"ours / trl at {TARGET_LAYERS} layers: step peak {rt['step_peak_gib']:.3f}x, total {rt['total_peak_gib']:.3f}x{extra}.", "", f"Goal: {ex['goal']}."]
    lines += ["", "Where the step peaks come from:", ""]
    for r in sorted(record["runs"], key=lambda r: (SIDES.index(r["side"]), r.get("layers", 0))):
        if "step_peak_gib" not in r:
            continue
        line = (f"- {r['side']}, {r['layers']} layers: peak in {max((k for k in r['phase_peaks_gib'] if k != 'step'), key=r['phase_peaks_gib'].get)}; "
                f"head + loss storages {r['head_and_loss_at_peak_gib']:.2f} GiB at the peak, {r['head_and_loss_own_peak_gib']:.2f} GiB at their own peak")  # fmt: skip
        if "cpu_fallback_own_peak_gib" in r:
            line += (f"; of them TRL's CPU-only fallback temporaries (fp32/bool [tokens, 32,768] tiles, fp32 lm_head slices) "
                     f"{r['cpu_fallback_own_peak_gib']:.2f} GiB at their own peak; without them the step peak is {r['step_peak_without_cpu_fallback_gib']:.2f} GiB")  # fmt: skip
        lines.append(line + ".")
    lines += ["", "Largest storages alive at each step peak (above static):", ""]
    for r in sorted(record["runs"], key=lambda r: (SIDES.index(r["side"]), r.get("layers", 0))):
        if "peak_breakdown" in r:
            lines.append(f"- {r['side']}, {r['layers']} layers:")
            for g in r["peak_breakdown"][:6]:
                shape = "x".join(str(d) for d in g["shape"])
                lines.append(f"  - {g['bytes'] / GIB:.3f} GiB: {g['count']} x `{g['op']}` {g['dtype']}[{shape}]")
    lines += ["", "Notes:", "", *[f"- {note}" for note in record["notes"]]]
    return "\n".join(lines) + "\n"


NOTES = [
    "32 layers are extrapolated from the two layer counts measured, not measured.",
    (
        "trl: TRL 1.16's DPOTrainer does not call peft's prepare_model_for_kbit_training (only the experimental ORPO/CPO trainers do): "
        "it calls get_peft_model, enable_input_require_grads, casts the trainable (LoRA) parameters to bf16 for a quantized model, and "
        "train() turns gradient checkpointing on (transformers 5: activation_checkpointing). Embeddings, lm_head and norms stay in the "
        "dtype the model was loaded in: model_init_kwargs dtype (this run: see settings.trl_dtype; TRL's own scripts default to float32, "
        "which would double the embeddings' and lm_head's bytes)."
    ),
    (
        "trl: with PEFT and no ref_model, trainer.ref_model is None; the reference forward runs in the step on the same model with the "
        "adapters disabled (use_adapter(model, None) = model.disable_adapter()), under no_grad and with gradient checkpointing turned off "
        "for it (disable_gradient_checkpointing)."
    ),
    (
        "trl: `fused_lm_head=True` reaches the forward that DPOTrainer patched in with trl.trainer.utils.add_fused_lm_head: the backbone "
        "runs, then trl.kernels.ChunkedLogProbFunction projects the hidden states through lm_head in tiles of 4,096 tokens x 32,768 "
        "vocabulary columns and folds each tile into online-logsumexp statistics, so the (2, T, vocab) logits never exist; its backward "
        "recomputes each tile and accumulates the gradients in fp32. On CUDA/XPU a Triton kernel folds the tiles and only labelled "
        "positions are scored; on the CPU (no Triton) a torch fallback scores every position and makes several fp32 [tokens, 32,768] "
        "temporaries per tile, and its backward upcasts each tile and each [32,768, hidden] lm_head slice to fp32 before the matmul "
        "(`_addmm_fp32`), which a GPU with torch >= 2.8 does not: the CPU figures overstate TRL's head bytes by roughly those temporaries."
    ),
    "ours: the reference log-probs are data in the batch (precomputed before training), so the step runs no reference forward.",
    (
        "Losses differ by design: TRL's is ln 2 (a fresh LoRA: policy = reference); ours reads random reference log-probs from the "
        "batch, so its loss is whatever they make it. Memory does not depend on them."
    ),
    (
        "Adapters: TRL casts the LoRA weights to bf16 on a quantized model; the recipe keeps ours in fp32 (lora.dtype), a little more "
        "static memory. Both checkpoint non-reentrantly (transformers 5's default for TRL, use_reentrant=False for ours)."
    ),
    (
        "The goal is read on the step peak (what the step adds above the weights it starts with). On the CPU TRL's step peak is its "
        "fused head's torch fallback; the column and row 'without its CPU-only head temporaries' leave those storages out (the peak "
        "of everything else over the step), an estimate of what its Triton path would hold on a GPU, where the ratio decides."
    ),
    "The meter counts live tensor storages; it does not see scratch buffers an operation frees before returning, nor a CUDA context.",
]


def versions() -> dict:
    import trl

    return {**mc.versions(), "trl": trl.__version__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq", type=int, default=1024, help="answer tokens per sequence (chosen and rejected each)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (unlabelled) before each answer")
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
    parser.add_argument("--widths", default=None, help="hidden,kv_heads,intermediate,vocab instead of Llama-3.1-8B's")
    parser.add_argument("--name", default="llama8b")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--trl-dtype", default="bfloat16", choices=("bfloat16", "float32"), help="TRL's model_init_kwargs dtype (non-4-bit weights)")
    parser.add_argument("--work", default=None, help="folder for the random checkpoint, kept (default: a temporary one, removed at the end)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--append", action="store_true", help="keep the runs of the results file of the same name, replacing those measured again")
    parser.add_argument("--rewrite", default=None, help="a results .json: recompute the extrapolation and rewrite its .md, measuring nothing")
    parser.add_argument("--measure", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure == "trl":
        print(RESULT_MARK + json.dumps(measure_trl(args.model_dir, args.prompt, args.seq, args.threads, args.trl_dtype)), flush=True)
        return
    if args.measure == "ours":
        print(RESULT_MARK + json.dumps(measure_ours(args.model_dir, args.prompt, args.seq, args.threads)), flush=True)
        return

    if args.rewrite:
        path = Path(args.rewrite)
        record = json.loads(path.read_text())
        record["notes"] = NOTES
        record["extrapolation"] = extrapolate(record["runs"])
        path.write_text(json.dumps(record, indent=1) + "\n")
        path.with_suffix(".md").write_text(format_markdown(record))
        print(format_markdown(record))
        return

    import torch

    lc.set_widths(args.widths)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="preference-memory-"))
    start = time.perf_counter()
    folders = mc.write_checkpoints(work, bool(args.widths), sorted(set(args.layers)))
    print(f"random bf16 checkpoint written in {time.perf_counter() - start:.0f} s: {work}", file=sys.stderr, flush=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"preference-memory-{args.name}-{device}.json"
    widths = mc.QUICK_WIDTHS if args.widths else {k: v for k, v in mc.build_model_config(False, 0).items() if k in mc.QUICK_WIDTHS}
    record = {
        "model": "Llama-3.1-8B shapes" if not args.widths else f"Llama shapes hidden,kv_heads,intermediate,vocab = {args.widths}",
        "widths": widths,
        "device": f"cuda: {torch.cuda.get_device_name(0)}" if device == "cuda" else f"cpu: {platform.machine()}, {args.threads} threads",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "date": datetime.date.today().isoformat(),
        "versions": versions(),
        "settings": {"layers": sorted(set(args.layers)), "prompt": args.prompt, "seq": args.seq, "micro_batch_pairs": 1, "lora": LORA,
                     "trl_dtype": args.trl_dtype, "trl_args": TRL_ARGS,
                     "ours_recipe": "recipes/llama3.1-8b-alpaca.yaml lora.dropout=0 objective.name=dpo data.format=preference"},
        "command": "python benchmarks/preference_memory.py " + " ".join(sys.argv[1:]),
        "runs": [],
        "notes": NOTES,
    }
    if args.append and path.exists():
        record["runs"] = json.loads(path.read_text())["runs"]
    try:
        measure_all(args, record, folders, path)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    record["extrapolation"] = extrapolate(record["runs"])
    path.write_text(json.dumps(record, indent=1) + "\n")
    path.with_suffix(".md").write_text(format_markdown(record))
    print(format_markdown(record))


def measure_all(args, record: dict, folders: dict[int, Path], path: Path) -> None:
    """Every side at every layer count, each in its own process; the results file is rewritten after each."""
    why_not = ours_available() if "ours" in args.sides else None
    for layers in sorted(set(args.layers)):
        for side in args.sides:
            record["runs"] = [r for r in record["runs"] if not (r.get("side") == side and r.get("layers") == layers)]
            if side == "ours" and why_not:
                record["runs"].append({"side": side, "layers": layers, "skipped": f"not run: qlora_lite.compute_objective: {why_not}"})
                continue
            print(f"{side}: {layers} layers, prompt {args.prompt} + 2 x {args.seq} tokens", file=sys.stderr, flush=True)
            result = run_in_subprocess(side, folders[layers], args)
            result.setdefault("layers", layers)
            if "step_peak_gib" in result:
                print(f"{side:5s} {layers} layers: static {result['static_gib']:.3f} GiB, step peak {result['step_peak_gib']:.3f} GiB, "
                      f"total {result['total_peak_gib']:.3f} GiB; loss {result['loss']:.4f}; step {result['step_s']:.0f} s", file=sys.stderr, flush=True)  # fmt: skip
            record["runs"].append(result)
            record["extrapolation"] = extrapolate(record["runs"])
            path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
