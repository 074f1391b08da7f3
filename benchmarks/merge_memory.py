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
    "qlora-lite merge --dtype bf16 --no-verify": "from qlora_lite.export import merge_adapter\nmerge_adapter(ADAPTER, OUT, dtype='bf16', verify=False)",
    "qlora-lite merge --dtype fp32 --no-verify": "from qlora_lite.export import merge_adapter\nmerge_adapter(ADAPTER, OUT, dtype='fp32', verify=False)",
    "qlora-lite merge --dtype bf16 --verify": "from qlora_lite.export import merge_adapter\nmerge_adapter(ADAPTER, OUT, dtype='bf16', verify=True)",
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

    from qlora_lite.adapters import save_adapter
    from qlora_lite.config import LoRAConfig
    from qlora_lite.lora import apply_lora, lora_layers
    from qlora_lite.tiny import build_tiny_model, build_tokenizer

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
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base, adapter = build_inputs(work, args.layers, args.shard_mb)
        shards = folder_bytes(base)
        model_info = {
            "base_bytes": sum(shards), "num_shards": len(shards), "largest_shard_bytes": shards[0],
            "adapter_bytes": sum(folder_bytes(adapter)), "layers": args.layers,
        }  # fmt: skip
        rows = []
        for name, code in CASES.items():
            result = run_case(code, base, adapter, work / "merged")
            result["case"] = name
            result["output_bytes"] = sum(folder_bytes(work / "merged"))
            rows.append(result)
            print(f"{name}: peak RSS {result['peak_rss_bytes'] / 2**20:.0f} MiB (floor {result['floor_rss_bytes'] / 2**20:.0f} MiB), {result['seconds']:.1f} s")
    record = {
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "model": model_info,
        "cases": rows,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "merge_memory-cpu.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "merge_memory-cpu.md").write_text(format_table(record))
    print(format_table(record))


def format_table(record: dict) -> str:
    mib = 2**20
    m = record["model"]
    lines = [
        f"Merge peak memory, {record['device']}, {record['date']}. Base: {m['base_bytes'] / mib:.0f} MiB fp32 in "
        f"{m['num_shards']} shards (largest {m['largest_shard_bytes'] / mib:.0f} MiB); adapter {m['adapter_bytes'] / mib:.1f} MiB.",
        "",
        "| case | peak RSS (MiB) | after imports (MiB) | peak - imports (MiB) | peak - imports / base size | output (MiB) | time (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in record["cases"]:
        extra = row["peak_rss_bytes"] - row["floor_rss_bytes"]
        lines.append(
            f"| {row['case']} | {row['peak_rss_bytes'] / mib:.0f} | {row['floor_rss_bytes'] / mib:.0f} | {extra / mib:.0f} | "
            f"{extra / m['base_bytes']:.2f} | {row['output_bytes'] / mib:.0f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
