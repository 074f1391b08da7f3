"""Data preparation: seconds and peak memory of turning a 200,000-record file into training examples.

Before (``data.build_datasets`` at commit 67160d9, imported from ``git show`` into a temporary module):
every record tokenized in Python, one tokenizer call per piece, into lists held in RAM, on every run.
After (``data.prepare_datasets``): records tokenized in batches by ``datasets.map`` over
``data.num_proc`` processes into a memory-mapped Arrow cache; a second run (or a resume) opens it.

The data: ``--records`` generated alpaca-style records (``generate_alpaca``; seed 0): pseudo-words of
1 to 3 syllables from a 3,000-word vocabulary; instruction lognormal(median 12 words, sigma 0.5,
3..80), an input on 40% of records (median 25 words, sigma 0.7, 3..400), output (median 33 words,
sigma 0.8, 2..1,500); about 505 bytes a record, 101 MB at 200,000. Written to the work folder, never
to the repository. The tokenizer: the tests' (tests/conftest.py), a 256-token BPE, about 440 tokens
a record (the measured character and token quantiles are in the results). max_seq_len 2,048, data
defaults otherwise (truncation drop, no packing, no held-out split).

Each variant runs in a fresh subprocess that measures only itself: seconds of the data call, the
process's peak RSS (``ru_maxrss``, imports included: torch, transformers and datasets hold ~0.4 GB
before any data), its RSS after the imports, the peak anonymous RSS (sampled every 20 ms: memory
the process owns, without the pages of memory-mapped files, which the kernel can drop and re-read),
and for 2 processes the largest worker's peak RSS (forked, so it shares the parent's pages). First
runs start from an empty cache, datasets' JSON-to-Arrow conversion included. Variants:

- ``before``, ``before (datasets cache warm)``: the old path, cold, then again as every later run was.
- ``first run, 1 process``: tokenized in this process (the Rust encoder's own thread pool spreads a
  batch over the cores); ``... TOKENIZERS_PARALLELISM=false``: one core only; ``first run, 2 processes``.
- ``cached``: the same call again, the cache filled; then one epoch of ``select_micro_batch`` (grouped,
  micro-batch 8) and ``collate_batch`` over the prepared examples, as training reads them, to show
  memory stays flat when every example has been read; the same at 50,000 records (``max_examples``),
  and the old path at 50,000, to show how each grows with the data.

    python benchmarks/data_prep.py                    # about 15 minutes on 2 cores
    python benchmarks/data_prep.py --records 20000    # a quick look

Writes benchmarks/results/data_prep.{json,md}. Other sessions may share the CPU: the load average
before each variant is recorded with it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BEFORE_COMMIT = "67160d9"
MAX_SEQ_LEN = 2048
SMALL_RECORDS = 50_000
ISSUE_BEFORE = {"seconds": 128.0, "peak_rss_bytes": 1.68e9}  # issue 16, measured on this machine


# ----------------------------------------------------------------------------------------- the data


def generate_alpaca(path: Path, n: int, seed: int = 0) -> dict:
    """Write n alpaca-style records as JSON lines; return their size and character quantiles."""
    rng = random.Random(seed)
    syllables = "ba ce di fo gu ha je ki lo mu na pe ri so tu va we xi yo za an el in or us th st er qu pl".split()
    vocabulary: set[str] = set()
    while len(vocabulary) < 3000:
        vocabulary.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 1, 2, 2, 2, 3)))))
    words = sorted(vocabulary)

    def sentence(median: float, sigma: float, low: int, high: int) -> str:
        count = min(high, max(low, round(rng.lognormvariate(math.log(median), sigma))))
        return " ".join(rng.choice(words) for _ in range(count)).capitalize() + "."

    chars = []
    with open(path, "w") as f:
        for _ in range(n):
            record = {
                "instruction": sentence(12, 0.5, 3, 80),
                "input": sentence(25, 0.7, 3, 400) if rng.random() < 0.4 else "",
                "output": sentence(33, 0.8, 2, 1500),
            }
            chars.append(sum(len(value) for value in record.values()))
            f.write(json.dumps(record) + "\n")
    return {"records": n, "bytes": path.stat().st_size, "characters_per_record": quantiles(chars)}


def quantiles(values: list[int]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"mean": round(sum(ordered) / len(ordered), 1), "p10": pick(0.1), "p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": ordered[-1]}


def build_benchmark_tokenizer(out_dir: Path) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TOKENIZER_TEXTS  # the tests' tokenizer texts

    from qlora_lite import build_tokenizer

    build_tokenizer(TOKENIZER_TEXTS, out_dir, vocab_size=256)


# ------------------------------------------------------------------------------- one variant, measured


class AnonSampler:
    """Peak RssAnon of this process, sampled every 20 ms on a thread."""

    def __init__(self) -> None:
        self.peak = self.read()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def read() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.read())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.read())


def run_variant(args: argparse.Namespace) -> dict:
    """In a fresh process: prepare the data one way and measure it."""
    sys.path.insert(0, str(REPO))
    import datasets
    from transformers import AutoTokenizer

    from qlora_lite import DataConfig, collate_batch, prepare_datasets, select_micro_batch

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    cfg = DataConfig(path=args.data, cache_dir=args.cache, num_proc=args.num_proc, max_examples=args.max_examples)
    if args.variant == "before":
        old = import_before(Path(args.tokenizer).parent / "data_before.py")
    rss_after_imports = current_rss()
    sampler = AnonSampler()
    cpu_started = cpu_seconds()
    started = time.perf_counter()
    if args.variant == "before":
        train, evaluation = old.build_datasets(cfg, tokenizer, MAX_SEQ_LEN, 0)
        stats = {"kept": len(train) + len(evaluation), "tokens": sum(len(ex["input_ids"]) for ex in train)}
    else:
        prepared = prepare_datasets(cfg, tokenizer, MAX_SEQ_LEN, 0)
        train, stats = prepared.train, prepared.stats
    seconds = time.perf_counter() - started
    result = {
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_seconds() - cpu_started, 1),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_imports_bytes": rss_after_imports,
        "peak_anon_rss_bytes": sampler.peak,
        "workers_peak_rss_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
        "stats": stats,
    }
    if args.read_epoch:
        # One epoch as fit() reads it: every example once, collated into micro-batches of 8.
        started = time.perf_counter()
        for index in range(len(train) // 8):
            collate_batch(select_micro_batch(train, index, 8, 42, "grouped"), pad_token_id=0)
        result["epoch_read_seconds"] = round(time.perf_counter() - started, 2)
        result["peak_rss_after_epoch_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result["peak_anon_rss_bytes"] = sampler.stop()
    if args.variant != "before":
        result["lengths"] = quantiles(train.lengths.tolist())
    return result


def cpu_seconds() -> float:
    """User + system seconds of this process and of its finished children (the tokenizing workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_before(path: Path) -> None:
    # Written here, not in the measured process: a child it started (git) would count as its worker.
    path.write_text(subprocess.run(["git", "show", f"{BEFORE_COMMIT}:qlora_lite/data.py"], cwd=REPO, check=True, capture_output=True, text=True).stdout)


def import_before(path: Path):
    """data.py as it was before this change (``write_before``), as a module of its own."""
    spec = importlib.util.spec_from_file_location("data_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["data_before"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def current_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(name: str, variant: str, work: Path, data: Path, cache: Path, hf_cache: Path, num_proc: int | None = None,
            max_examples: int | None = None, read_epoch: bool = False, serial_tokenizer: bool = False) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(hf_cache), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    if serial_tokenizer:
        env["TOKENIZERS_PARALLELISM"] = "false"
    command = [sys.executable, __file__, "--run", variant, "--data", str(data), "--tokenizer", str(work / "tokenizer"), "--cache", str(cache)]
    if num_proc:
        command += ["--num-proc", str(num_proc)]
    if max_examples:
        command += ["--max-examples", str(max_examples)]
    if read_epoch:
        command.append("--read-epoch")
    load = os.getloadavg()[0]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{name} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(name=name, load_average_before=round(load, 2))
    print(f"{name}: {result['seconds']:.1f} s ({result['cpu_seconds']:.0f} CPU s), peak RSS {result['peak_rss_bytes'] / 1e9:.2f} GB, "
          f"peak anon {result['peak_anon_rss_bytes'] / 1e9:.2f} GB (load {load:.1f})", flush=True)
    return result


# ------------------------------------------------------------------------------------------- report


def write_markdown(record: dict, path: Path) -> None:
    rows = {row["name"]: row for row in record["variants"]}
    before = rows["before"]
    gb = lambda b: f"{b / 1e9:.2f}"  # noqa: E731
    lines = [
        f"Data preparation, {record['data']['records']:,} generated alpaca records ({record['data']['bytes'] / 1e6:.0f} MB), "
        f"max_seq_len {MAX_SEQ_LEN}, the tests' 256-token BPE tokenizer. {record['date']}, {record['device']}, "
        f"datasets {record['versions']['datasets']}, tokenizers {record['versions']['tokenizers']}, transformers {record['versions']['transformers']}. "
        "Other sessions shared the 2 cores (load average before each run in the last column).",
        "",
        "| variant | seconds | x before | CPU seconds | peak RSS (GB) | x before | RSS after imports | peak anonymous RSS | largest worker's peak RSS | load |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in record["variants"]:
        if row.get("records", record["data"]["records"]) != record["data"]["records"]:
            continue
        lines.append(
            f"| {row['name']} | {row['seconds']:.1f} | {row['seconds'] / before['seconds']:.2f} | {row['cpu_seconds']:.0f} | {gb(row['peak_rss_bytes'])} | "
            f"{row['peak_rss_bytes'] / before['peak_rss_bytes']:.2f} | {gb(row['rss_after_imports_bytes'])} | {gb(row['peak_anon_rss_bytes'])} | "
            f"{gb(row['workers_peak_rss_bytes']) if row['workers_peak_rss_bytes'] else '-'} | {row['load_average_before']} |"
        )
    lines += ["", "Memory as the data grows (the cached run then reads one epoch: every example once, micro-batches of 8):", "",
              "| records | variant | peak RSS (GB) | peak anonymous RSS (GB) | epoch read (s) |", "| ---: | --- | ---: | ---: | ---: |"]
    for row in record["growth"]:
        lines.append(f"| {row['records']:,} | {row['name']} | {gb(row.get('peak_rss_after_epoch_bytes', row['peak_rss_bytes']))} | "
                     f"{gb(row['peak_anon_rss_bytes'])} | {row.get('epoch_read_seconds', '-')} |")
    lines += [
        "",
        "Seconds and CPU seconds are the data call's alone (imports excluded); CPU seconds add the workers' and are the "
        "figure other sessions on the cores disturb least. Peak RSS counts the imports (RSS after imports) and the pages "
        "of the memory-mapped cache that reading touched: clean file pages, which the kernel drops under memory pressure "
        "and reads again. The anonymous RSS is the memory the process owns: flat from 50,000 to 200,000 records once "
        "prepared, even after every example was read, where the old path's grows with the data. Workers are forked, so "
        "their RSS shares the parent's pages (mostly the imports). With 1 process and TOKENIZERS_PARALLELISM unset, the "
        "Rust encoder spreads each batch over both cores; with other sessions on them its threads wait on each other "
        "(more seconds and CPU seconds than the single-threaded run).",
    ]
    goals = record["goals"]
    lines += ["", "Goals (issue 16):", ""] + [f"- {goal['goal']}: {goal['measured']} -> {'met' if goal['met'] else 'missed'}" for goal in goals]
    data = record["data"]
    lines += ["", f"The data: {data['records']:,} records, {data['bytes']:,} bytes; characters per record {data['characters_per_record']}; "
              f"tokens per example {data['tokens_per_example']}; {data['dropped']} dropped (longer than {MAX_SEQ_LEN} tokens)."]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--work", default=None, help="scratch folder (default: a temp folder); needs ~1.5 GB")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--run", help=argparse.SUPPRESS)  # a variant, in its own subprocess
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--num-proc", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--max-examples", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--read-epoch", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        args.variant = args.run
        print(json.dumps(run_variant(args)))
        return

    sys.path.insert(0, str(REPO))
    import datasets
    import tokenizers
    import transformers

    with tempfile.TemporaryDirectory(dir=args.work, prefix="data-prep-") as tmp:
        work = Path(tmp)
        data = work / "alpaca.jsonl"
        data_info = generate_alpaca(data, args.records)
        build_benchmark_tokenizer(work / "tokenizer")
        write_before(work / "data_before.py")
        print(f"generated {args.records} records, {data_info['bytes'] / 1e6:.0f} MB", flush=True)
        small = min(SMALL_RECORDS, args.records // 4)
        new = lambda name, **kw: measure(name, "after", work, data, work / name.replace(" ", "-"), work / f"hf-{name}".replace(" ", "-"), **kw)  # noqa: E731
        variants = [
            measure("before", "before", work, data, work / "before", work / "hf-before"),
            measure("before (datasets cache warm)", "before", work, data, work / "before", work / "hf-before"),
            new("first run, 1 process", num_proc=1),
            new("first run, 1 process, TOKENIZERS_PARALLELISM=false", num_proc=1, serial_tokenizer=True),
            new("first run, 2 processes", num_proc=2),
        ]
        cached = measure("cached", "after", work, data, work / "first-run,-2-processes", work / "hf-cached", read_epoch=True)
        variants.append(cached)
        growth = [
            measure(f"before, {small:,} records", "before", work, data, work / "before", work / "hf-before", max_examples=small),
            {**variants[1], "name": "before (datasets cache warm)"},
            new(f"first run, {small:,} records, 2 processes", num_proc=2, max_examples=small),
        ]
        growth.append(measure(f"cached, {small:,} records", "after", work, data, work / f"first-run,-{small:,}-records,-2-processes",
                              work / "hf-cached", max_examples=small, read_epoch=True))
        growth.append(cached)
        for row, records in zip(growth, [small, args.records, small, small, args.records]):
            row["records"] = records
        growth = [row for row in growth if "first run" not in row["name"]]

    stats = cached["stats"]
    before, two = variants[0], variants[4]
    data_info.update(tokens_per_example=cached["lengths"], dropped=stats["dropped"], kept=stats["kept"], tokens=stats["tokens"])
    goals = [
        {"goal": "a cached run prepares its data in under 5 s", "measured": f"{cached['seconds']:.2f} s", "met": cached["seconds"] < 5},
        {"goal": f"a first run with 2 processes in at most 0.6 x the issue's {ISSUE_BEFORE['seconds']:.0f} s ({0.6 * ISSUE_BEFORE['seconds']:.1f} s)",
         "measured": f"{two['seconds']:.1f} s ({two['seconds'] / ISSUE_BEFORE['seconds']:.2f}x the issue's, {two['seconds'] / before['seconds']:.2f}x before measured here, {before['seconds']:.1f} s)",
         "met": two["seconds"] <= 0.6 * ISSUE_BEFORE["seconds"] and two["seconds"] <= 0.6 * before["seconds"]},
        {"goal": f"peak RSS at most half the issue's {ISSUE_BEFORE['peak_rss_bytes'] / 1e9:.2f} GB ({ISSUE_BEFORE['peak_rss_bytes'] / 2e9:.2f} GB)",
         "measured": "; ".join(f"{row['name']} {row['peak_rss_bytes'] / 1e9:.2f} GB" for row in variants[2:])
         + f" (before, measured here: {before['peak_rss_bytes'] / 1e9:.2f} GB)",
         "met": all(row["peak_rss_bytes"] <= ISSUE_BEFORE["peak_rss_bytes"] / 2 and row["peak_rss_bytes"] <= before["peak_rss_bytes"] / 2 for row in variants[2:])},
    ]
    record = {
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "versions": {"datasets": datasets.__version__, "tokenizers": tokenizers.__version__, "transformers": transformers.__version__},
        "max_seq_len": MAX_SEQ_LEN,
        "data": data_info,
        "variants": variants,
        "growth": growth,
        "goals": goals,
        "note": "Other sessions shared the 2 CPU cores during these runs; load_average_before is the 1-minute load when each started.",
    }
    out = Path(args.out)
    suffix = "" if args.records == 200_000 else f"-{args.records}"
    (out / f"data_prep{suffix}.json").write_text(json.dumps(record, indent=1) + "\n")
    write_markdown(record, out / f"data_prep{suffix}.md")
    print((out / f"data_prep{suffix}.md").read_text())


if __name__ == "__main__":
    main()
