"""What starting from a GGUF costs in quality: the round trip GGUF -> bf16 -> NF4, each against llama.cpp on the original file.

Issue 26, item 3. The offline demo base (a pretrained 2-layer Llama, hidden 128) is written as GGUF at
f16, q8_0 and q4_k_m with `export_gguf`, each is taken as a base (`ensure_gguf_base`: dequantized once
into a bf16 cached folder, llama.cpp's logits on the probe prompts stored beside it), loaded 4-bit as
training loads it, and `measure_round_trip` gives the relative logit difference from llama.cpp
(max |difference| / max(1, max |llama.cpp's logit|), last token of each probe) for the bf16 dequantized
base and the NF4 one: the figures a run prints at its start and writes to metrics.jsonl.

    python benchmarks/gguf_round_trip.py      # ~1 min on 2 cores (the converter downloaded once); needs the gguf extra
Writes benchmarks/results/gguf-round-trip-demo-cpu.{json,md}.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TYPES = ("f16", "q8_0", "q4_k_m")


def main() -> int:
    import torch

    from qlora_lite import (
        ModelConfig, QuantConfig, ensure_demo_base, ensure_gguf_base, export_gguf, load_base_model, measure_round_trip, read_gguf_source,
    )  # fmt: skip

    demo = ensure_demo_base()
    rows = []
    with tempfile.TemporaryDirectory(prefix="gguf-round-trip-") as work:
        for gguf_type in TYPES:
            path = Path(work) / f"demo-{gguf_type}.gguf"
            export_gguf(demo, path, gguf_type, prompt_format="text", verify=False)
            folder = ensure_gguf_base(str(path))
            source = read_gguf_source(folder)
            model = load_base_model(ModelConfig(name_or_path=str(folder)), QuantConfig(compute_dtype="float32"), torch.device("cpu"), str(folder))
            trip = measure_round_trip(model, folder)
            rows.append({"type": gguf_type, "file_type": source["file_type"], "tensor_types": source["tensor_types"],
                         "size_bytes": source["size_bytes"], "dequantized_vs_llama_cpp": trip["dequantized_vs_llama_cpp"],
                         "nf4_vs_llama_cpp": trip["loaded_vs_llama_cpp"], "probes": trip["probes"],
                         "tokenization_differs": trip["tokenization_differs"], "dequantize_s": source["seconds"]})  # fmt: skip
    record = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
              "torch": torch.__version__, "rows": rows}  # fmt: skip
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gguf-round-trip-demo-cpu.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = [
        "# GGUF as the base: the round trip against llama.cpp (benchmarks/gguf_round_trip.py)", "",
        f"{record['date']}, cpu {record['machine']}, torch {record['torch']}. The demo base (pretrained 2-layer Llama, hidden 128) "
        "written as GGUF, dequantized to bf16 (ensure_gguf_base), loaded in NF4 with fp32 compute; relative logit difference from "
        "llama.cpp on the original file, last token of each probe prompt.", "",
        "| GGUF | tensor types | bf16 dequantized vs llama.cpp | NF4 as loaded vs llama.cpp | probes tokenized differently | dequantize s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for r in rows:
        types = ", ".join(f"{k} {v}" for k, v in r["tensor_types"].items())
        lines.append(f"| {r['file_type']} | {types} | {r['dequantized_vs_llama_cpp']:.4f} | {r['nf4_vs_llama_cpp']:.4f} | "
                     f"{r['tokenization_differs']} of {r['probes']} | {r['dequantize_s']} |")  # fmt: skip
    (out / "gguf-round-trip-demo-cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
