"""One GPU's loading peak: what `quant.load_base_model` holds at most while transformers quantizes the base, weight by weight.

Issue 25, item 4: is loading ever the peak of a one-GPU run? The same random Llama-3.1-8B-shaped
checkpoints as memory_compare.py (bf16 on disk, 2 and 4 blocks), loaded in NF4 with bf16 compute on
the CPU (device_map puts every weight on the device as it is quantized, as on a GPU), each in its own
process under `qlora_lite.MemoryMeter`: the peak of live tensor bytes while loading, the bytes the
loaded model holds (weights, quantization constants), their difference (what loading holds on top),
and peak RSS (which also counts the safetensors pages transformers maps).

    python benchmarks/load_peak.py            # ~2 min on 2 cores; writes benchmarks/results/load-peak-llama8b-cpu.{json,md}
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

GIB = 1024**3


def measure(folder: str) -> dict:
    """In this process: the meter around load_base_model, then the bytes the model holds."""
    import torch

    from qlora_lite import MemoryMeter, ModelConfig, QuantConfig, iter_held_tensors, load_base_model, read_peak_rss_bytes

    torch.set_num_threads(2)
    meter = MemoryMeter(device="cpu")
    with meter:
        model = load_base_model(ModelConfig(name_or_path=folder), QuantConfig(compute_dtype="bfloat16"), torch.device("cpu"), folder)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in iter_held_tensors(model)}
    return {"peak": meter.peak_device_bytes, "held": sum(storages.values()), "rss_peak": read_peak_rss_bytes(),
            "largest_at_peak": meter.peak_breakdown(top=3)}  # fmt: skip


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--measure":
        print("RESULT " + json.dumps(measure(sys.argv[2]), default=str))
        return
    import memory_compare as mc

    with tempfile.TemporaryDirectory() as work:
        folders = mc.write_checkpoints(Path(work), quick=False, layer_counts=[2, 4])
        runs = {}
        for layers, folder in folders.items():
            out = subprocess.run([sys.executable, __file__, "--measure", str(folder)], capture_output=True, text=True, check=True).stdout
            runs[layers] = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:])
    lines = [
        "One GPU's loading peak (benchmarks/load_peak.py): Llama-3.1-8B shapes, NF4 + double quant, bf16 compute, loaded on the CPU with "
        "device_map (each weight quantized as it lands, as on a GPU); `MemoryMeter` live tensor bytes.",
        "",
        "| layers | peak while loading GiB | held once loaded GiB | on top GiB | peak RSS GiB |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for layers, run in runs.items():
        lines.append(f"| {layers} | {run['peak'] / GIB:.3f} | {run['held'] / GIB:.3f} | {(run['peak'] - run['held']) / GIB:.3f} | {run['rss_peak'] / GIB:.2f} |")
    lines += ["", "On top of the loaded model, loading holds one weight's bf16 copy while it is quantized (the largest: 14336 x 4096 x 2 B = 0.109 GiB),",
              "whatever the number of layers: far below what a training step adds (activations, LoRA state; memory-llama8b-cpu.md), so on one GPU",
              "loading is never the peak and needs no change."]  # fmt: skip
    out_dir = REPO / "benchmarks" / "results"
    (out_dir / "load-peak-llama8b-cpu.json").write_text(json.dumps(runs, indent=1, default=str))
    (out_dir / "load-peak-llama8b-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
