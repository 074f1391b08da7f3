"""Who reads the checkpoint while FSDP2 loads layer by layer: every process from the files, or rank 0 and a broadcast.

Issue 25 asks for this choice to be made by measurement. Two gloo processes (torchrun, this file's --worker)
read the decoder layers of a random-weight checkpoint at Llama-3.1-70B widths (the one benchmarks/fsdp_loading.py
writes; --work reuses it), tensor by tensor, as training/layerwise.py does, in two ways:

  * every:  each process reads each tensor itself with qlora_lite.CheckpointReader (what fit() does);
  * rank0:  rank 0 reads each tensor, then broadcasts it; rank 1 receives into an empty tensor of that shape.

each with the page cache of the checkpoint's files dropped before every layer (cold: as the first read of a
checkpoint larger than RAM, which a 70B's 141 GB is on a 128 GB machine) and left as it is (warm: read twice).
Per layer and per process: seconds (the slower process's, barrier to barrier), bytes the process made the disk
read (/proc/self/io read_bytes: the page cache serves a second reader without disk reads), and the most bytes of
the checkpoint held at once (one tensor in both ways: the largest, an MLP weight, 0.44 GiB in bf16).

    python benchmarks/fsdp_readers.py --work /tmp/fsdp70 --layers 4       # reuses fsdp_loading.py's checkpoint
    python benchmarks/fsdp_readers.py --quick                              # narrow widths: checks the plumbing

On one machine gloo's broadcast is a memory copy through a local socket; on GPUs NCCL's is a device copy
(NVLink/PCIe), so the rank0 way's cost here is an upper bound. Writes benchmarks/results/fsdp-readers-<name>-cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

GIB = 1024**3
WAYS = ("every", "rank0")
CACHES = ("cold", "warm")


def read_disk_bytes() -> int:
    """Bytes this process has caused to be fetched from storage (Linux /proc/self/io; 0 elsewhere)."""
    try:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))
    except (OSError, StopIteration, ValueError):
        return 0


def drop_page_cache(files: list[Path]) -> None:
    """Ask the kernel to forget the files' cached pages (clean pages: no root needed), so the next read comes from disk."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def layer_names(reader, layer: int) -> list[str]:
    prefix = f"model.layers.{layer}."
    return [name for name in reader.entries if name.startswith(prefix)]


def worker(args) -> int:
    import torch
    import torch.distributed as dist

    from qlora_lite import CheckpointReader, read_rss_bytes

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    reader = CheckpointReader(args.model_dir)
    files = sorted({file for file, _, _ in reader.entries.values()})
    dtypes = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}
    rows = []
    for way in WAYS:
        for cache in CACHES:
            for layer in range(args.layers):
                if cache == "cold" and rank == 0:
                    drop_page_cache(files)
                dist.barrier()
                disk, start, held = read_disk_bytes(), time.perf_counter(), 0
                rss_before = read_rss_bytes()
                for name in layer_names(reader, layer):
                    _, entry, _ = reader.entries[name]
                    if way == "every" or rank == 0:
                        tensor = reader.read(name)
                    else:
                        tensor = torch.empty(entry.shape, dtype=dtypes[entry.dtype])
                    if way == "rank0":
                        dist.broadcast(tensor, src=0)
                    held = max(held, tensor.numel() * tensor.element_size())
                    del tensor
                dist.barrier()
                seconds = time.perf_counter() - start
                rows.append({"way": way, "cache": cache, "layer": layer, "rank": rank, "s": seconds, "disk_bytes": read_disk_bytes() - disk,
                             "held_bytes": held, "rss_growth_bytes": read_rss_bytes() - rss_before})  # fmt: skip
    Path(args.result_dir, f"rank{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()
    return 0


def summarize(rows: list[dict], layer_bytes: int) -> list[dict]:
    """Per way and cache: mean seconds per layer (the slower rank), disk bytes per rank per layer, GB/s of layer bytes delivered to both ranks."""
    out = []
    for way in WAYS:
        for cache in CACHES:
            mine = [r for r in rows if r["way"] == way and r["cache"] == cache]
            layers = sorted({r["layer"] for r in mine})
            seconds = [max(r["s"] for r in mine if r["layer"] == layer) for layer in layers]
            per_layer = sum(seconds) / len(seconds)
            disk = {rank: sum(r["disk_bytes"] for r in mine if r["rank"] == rank) / len(layers) for rank in (0, 1)}
            out.append({
                "way": way, "cache": cache, "s_per_layer": per_layer, "s_at_80": per_layer * 80,
                "disk_gib_per_layer_rank0": disk[0] / GIB, "disk_gib_per_layer_rank1": disk[1] / GIB,
                "held_gib": max(r["held_bytes"] for r in mine) / GIB, "gb_per_s_delivered": 2 * layer_bytes / per_layer / 1e9,
            })  # fmt: skip
    return out


def format_markdown(record: dict) -> str:
    lines = [
        f"# Who reads under FSDP2 loading: {record['model']}", "",
        f"{record['date']}, {record['device']}; torch {record['torch']}, qlora-lite {record['commit']}", "",
        f"Command: `{record['command']}`", "",
        f"{record['layers']} decoder layers of {record['layer_bytes'] / GIB:.2f} GiB bf16 each, read tensor by tensor by 2 gloo processes.", "",
        "| way | page cache | s per layer (slower rank) | at 80 layers, s | disk read per layer, rank 0 / rank 1 GiB | largest tensor held GiB | GB/s delivered (both ranks) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]  # fmt: skip
    for s in record["summary"]:
        lines.append(f"| {s['way']} | {s['cache']} | {s['s_per_layer']:.2f} | {s['s_at_80']:.0f} | {s['disk_gib_per_layer_rank0']:.2f} / "
                     f"{s['disk_gib_per_layer_rank1']:.2f} | {s['held_gib']:.2f} | {s['gb_per_s_delivered']:.2f} |")  # fmt: skip
    return "\n".join([*lines, "", *record["notes"]]) + "\n"


NOTES = [
    "Notes:",
    "- every: each process reads its own copy with CheckpointReader; on one machine the second reader of a page the first just read is served "
    "by the page cache (its disk column shows how much).",
    "- rank0: rank 0 reads and gloo broadcasts each tensor; rank 1 holds an empty tensor of the same size meanwhile, so both ways hold one "
    "tensor of the checkpoint at a time on every rank.",
    "- cold: rank 0 drops the checkpoint files' cached pages (posix_fadvise DONTNEED) before each layer.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", default=None, help="fsdp_loading.py's checkpoint folder (written there if absent)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    for hidden in ("--worker", "--model-dir", "--result-dir"):
        parser.add_argument(hidden, help=argparse.SUPPRESS, **({"action": "store_true"} if hidden == "--worker" else {}))
    args = parser.parse_args()
    if args.worker:
        args.layers = int(args.layers)
        return worker(args)

    import fsdp_loading as fl
    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="fsdp-readers-"))
    folder = fl.write_checkpoints(work, args.quick, [args.layers])[args.layers]
    config = fl.build_model_config(args.quick, args.layers)
    result_dir = work / "readers"
    result_dir.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__, "--worker",
           "--model-dir", str(folder), "--result-dir", str(result_dir), "--layers", str(args.layers)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=REPO)
    if done.returncode != 0:
        print(done.stderr[-3000:])
        return done.returncode
    rows = [row for p in sorted(result_dir.glob("rank*.json")) for row in json.loads(p.read_text())]
    layer_bytes = fl.unit_bf16_bytes(config)["layer"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    name = f"fsdp-readers-{'quick' if args.quick else '70b'}-cpu"
    record = {
        "model": ("quick Llama widths" if args.quick else "Llama-3.1-70B widths") + ", random bf16", "layers": args.layers, "layer_bytes": layer_bytes,
        "date": datetime.date.today().isoformat(), "device": f"cpu: {platform.machine()}, {os.cpu_count()} cores, gloo, 1 thread per process",
        "torch": torch.__version__, "commit": commit, "command": "python benchmarks/fsdp_readers.py " + " ".join(sys.argv[1:]),
        "summary": summarize(rows, layer_bytes), "rows": rows, "notes": NOTES,
    }  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / f"{name}.md").write_text(format_markdown(record))
    print(format_markdown(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
