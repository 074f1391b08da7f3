"""Peak memory of `qlora-lite merge` against the size of the model it merges.

Builds a random-weight Llama of several safetensors shards (default ~160M parameters, fp32,
~640 MB in 100 MB shards) and an r=16 all-linear adapter, then merges it in fresh
subprocesses and records each one's peak RSS (VmHWM), next to the RSS the
same interpreter has after importing torch and transformers (the floor any merge pays).

Cases:
  * qlora-lite merge, bf16 and fp32 output, --no-verify: the shard-by-shard path;
  * qlora-lite merge with --verify (fp32 base+adapter, then the merged model, one at a time);
  * the usual PEFT route for contrast: from_pretrained (fp32) + PeftModel + merge_and_unload
    + save_pretrained.

    python benchmarks/merge_memory.py                     # writes benchmarks/results/merge_memory-cpu.{json,md}
    python benchmarks/merge_memory.py --layers 4 --shard-mb 50   # smaller, faster
    python benchmarks/merge_memory.py --llama8b           # Llama-3.1-8B's shapes: 16 GB bf16 in 4 shards

--llama8b writes a random bf16 checkpoint with Llama-3.1-8B's config and Meta's 4-shard layout
straight to disk, tensor by tensor (needs ~33 GB of free disk and no GPU), and an r=16
all-linear adapter, then runs only the qlora-lite bf16 merge (the PEFT route would need the
whole model in memory).
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
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Each case runs in its own interpreter so that ru_maxrss is that case's peak alone.
PRELUDE = """
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, transformers
from transformers.utils import logging
logging.disable_progress_bar()
def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def peak_rss():
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the (large) parent.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
floor = rss_now()
start = time.perf_counter()
"""
EPILOGUE = """
print(json.dumps({"floor_rss_bytes": floor, "peak_rss_bytes": peak_rss(), "seconds": time.perf_counter() - start}))
"""
CASES = {
    "qlora-lite merge --dtype bf16 --no-verify": "from qlora_lite import merge_adapter\nmerge_adapter(ADAPTER, OUT, dtype='bf16', verify=False)",
    "qlora-lite merge --dtype fp32 --no-verify": "from qlora_lite import merge_adapter\nmerge_adapter(ADAPTER, OUT, dtype='fp32', verify=False)",
    "qlora-lite merge --dtype bf16 --verify": "from qlora_lite import merge_adapter\nmerge_adapter(ADAPTER, OUT, dtype='bf16', verify=True)",
    "transformers + peft merge_and_unload (bf16 out)": textwrap.dedent(
        """
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
        model = PeftModel.from_pretrained(model, ADAPTER).merge_and_unload()
        model.to(torch.bfloat16).save_pretrained(OUT, max_shard_size="100MB")
        """
    ),
}


def build_inputs(work: Path, layers: int, shard_mb: int) -> tuple[Path, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from qlora_lite import LoRAConfig, apply_lora, build_tiny_model, build_tokenizer, lora_layers, save_adapter

    base, adapter = work / "base", work / "adapter"
    build_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, base, vocab_size=256)
    build_tiny_model(
        base, vocab_size=32000, hidden_size=1024, num_layers=layers, num_heads=16, num_kv_heads=8,
        intermediate_size=2816, max_shard_size=f"{shard_mb}MB",
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoRAConfig(r=16, alpha=32, dropout=0.0, dtype="bfloat16")
    apply_lora(model, cfg)
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B.weight, std=0.01)
    save_adapter(model, cfg, adapter, str(base))
    return base, adapter


LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16",
    "hidden_act": "silu", "bos_token_id": 2, "eos_token_id": 3,
}  # fmt: skip


def build_llama8b_inputs(work: Path) -> tuple[Path, Path]:
    """Llama-3.1-8B-shaped random bf16 shards and an r=16 adapter, written one tensor at a time."""
    import torch

    from qlora_lite import LoRAConfig, ShardWriter, build_peft_config, build_tokenizer, write_tensors

    base, adapter = work / "base", work / "adapter"
    build_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, base, vocab_size=256)
    (base / "config.json").write_text(json.dumps(LLAMA_8B, indent=2))
    c = LLAMA_8B
    h, i, kv = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"] * c["num_key_value_heads"]
    linear = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h), "self_attn.o_proj": (h, h),
              "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h), "mlp.down_proj": (h, i)}  # fmt: skip
    tensors = [("model.embed_tokens.weight", (c["vocab_size"], h))]
    for layer in range(c["num_hidden_layers"]):
        tensors += [(f"model.layers.{layer}.{name}.weight", shape) for name, shape in linear.items()]
        tensors += [(f"model.layers.{layer}.input_layernorm.weight", (h,)), (f"model.layers.{layer}.post_attention_layernorm.weight", (h,))]
    tensors += [("model.norm.weight", (h,)), ("lm_head.weight", (c["vocab_size"], h))]
    shards, size = [[]], 0
    for name, shape in tensors:  # ~5 GB shards, as Meta's checkpoint has
        nbytes = torch.Size(shape).numel() * 2
        if shards[-1] and size + nbytes > 5 * 10**9:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    for n, shard in enumerate(shards, start=1):
        file = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        with ShardWriter(base / file, [(name, torch.bfloat16, shape) for name, shape in shard]) as writer:
            for name, shape in shard:
                writer.write(name, (torch.randn(shape, dtype=torch.bfloat16) * 0.02))
        weight_map.update(dict.fromkeys([name for name, _ in shard], file))
    (base / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg = LoRAConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
    lora = {}
    for name, (out_f, in_f) in ((n, s) for n, s in tensors if any(n.endswith(f"{k}.weight") for k in linear)):
        module = name.removesuffix(".weight")
        lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(16, in_f, dtype=torch.bfloat16) * 0.01
        lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, 16, dtype=torch.bfloat16) * 0.01
    adapter.mkdir(parents=True)
    write_tensors(adapter / "adapter_model.safetensors", lora)
    targets = sorted({k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0] for k in lora})
    (adapter / "adapter_config.json").write_text(json.dumps(build_peft_config(cfg, targets, str(base))))
    return base, adapter


def run_case(code: str, base: Path, adapter: Path, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    script = PRELUDE + f"BASE, ADAPTER, OUT = {str(base)!r}, {str(adapter)!r}, {str(out)!r}\n" + code + EPILOGUE
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"})
    if result.returncode != 0:
        raise SystemExit(f"case failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def folder_bytes(folder: Path, suffix: str = ".safetensors") -> list[int]:
    return sorted((p.stat().st_size for p in folder.iterdir() if p.name.endswith(suffix)), reverse=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--shard-mb", type=int, default=100)
    parser.add_argument("--llama8b", action="store_true", help="Llama-3.1-8B shapes, bf16, qlora-lite merge only")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder); needs ~33 GB with --llama8b")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    cases = {k: v for k, v in CASES.items() if k == "qlora-lite merge --dtype bf16 --no-verify"} if args.llama8b else CASES
    name = "merge_memory-llama8b-cpu" if args.llama8b else "merge_memory-cpu"
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        base, adapter = build_llama8b_inputs(work) if args.llama8b else build_inputs(work, args.layers, args.shard_mb)
        shards = folder_bytes(base)
        model_info = {
            "base_bytes": sum(shards), "num_shards": len(shards), "largest_shard_bytes": shards[0],
            "adapter_bytes": sum(folder_bytes(adapter)), "layers": LLAMA_8B["num_hidden_layers"] if args.llama8b else args.layers,
            "shape": "Llama-3.1-8B, bf16" if args.llama8b else "Llama-style hidden 1024, fp32",
        }  # fmt: skip
        rows = []
        for case, code in cases.items():
            result = run_case(code, base, adapter, work / "merged")
            result["case"] = case
            result["output_bytes"] = sum(folder_bytes(work / "merged"))
            rows.append(result)
            print(f"{case}: peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB (floor {result['floor_rss_bytes'] / 2**20:.0f} MiB), {result['seconds']:.1f} s")
    record = {
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "model": model_info,
        "cases": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / f"{name}.md").write_text(format_table(record))
    print(format_table(record))


def format_table(record: dict) -> str:
    mib = 2**20
    m = record["model"]
    lines = [
        f"Merge peak memory, {record['device']}, {record['date']}. Base ({m['shape']}): {m['base_bytes'] / mib:,.0f} MiB in "
        f"{m['num_shards']} shards (largest {m['largest_shard_bytes'] / mib:.0f} MiB); adapter {m['adapter_bytes'] / mib:.1f} MiB.",
        "",
        "| case | peak RSS (MiB) | after imports (MiB) | peak - imports (MiB) | (peak - imports) / base size | output (MiB) | time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in record["cases"]:
        extra = row["peak_rss_bytes"] - row["floor_rss_bytes"]
        lines.append(
            f"| {row['case']} | {row['peak_rss_bytes'] / mib:,.0f} | {row['floor_rss_bytes'] / mib:,.0f} | {extra / mib:,.0f} | "
            f"{extra / m['base_bytes']:.2f} | {row['output_bytes'] / mib:,.0f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
