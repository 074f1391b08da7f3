"""benchmarks/throughput.py: the parts a CPU can check of a benchmark whose figures come from a GPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import throughput  # noqa: E402

GIB = 2**30


def make_case(side: str, mbs: int, seq: int, tokens_per_s: float, reserved: float, planned: float) -> dict:
    return {
        "side": side, "micro_batch": mbs, "seq": seq, "oom": False, "tokens_per_s": tokens_per_s, "first_losses": [11.9, 11.8, 11.7],
        "peak_allocated_gib": reserved - 1, "peak_reserved_gib": reserved, "mfu": 0.31, "planner_gib": planned,
        "planner_over_measured": planned / reserved,
    }  # fmt: skip


def test_cuda_table_shows_speed_planner_check_and_longest_sequence():
    longest = make_case("qlora-lite", 1, 16384, 2500.0, 23.5, 22.0)
    record = {
        "arch": "llama8b", "device": "cuda: NVIDIA H100", "date": "2026-11-23", "steps": 5, "warmup": 2, "longest_cap_gib": 24.0,
        "cases": [make_case("qlora-lite", 1, 512, 3000.0, 9.0, 9.9), make_case("peft", 1, 512, 2800.0, 10.0, 9.9),
                  {"side": "peft", "micro_batch": 4, "seq": 8192, "oom": True}],
        "longest": [{"side": "qlora-lite", "longest_seq": 16384, "probes": [512, 1024, 16384], "at_longest": longest},
                    {"side": "peft", "longest_seq": 0, "probes": [512], "at_longest": None}],
    }  # fmt: skip
    table = throughput.format_table(record)
    assert "| 1 x 512 | qlora-lite | 3,000 | 8.00 / 9.00 | 31.0% | 11.9000, 11.8000, 11.7000 |" in table
    assert "| 4 x 8192 | peft | out of memory | | | |" in table
    assert "| 1 x 512 | qlora-lite | 9.90 | 9.00 | 1.10 |" in table  # planner / measured = 9.9 / 9.0
    assert "| 1 x 512 | peft | 9.90 | 10.00 | 0.99 |" in table
    assert "inside a 24.0 GiB cap" in table
    assert "| qlora-lite | 16,384 | 2,500 | 23.50 |" in table
    assert "| peft | 0 | n/a | n/a |" in table


def test_planner_estimate_for_a_case_leaves_out_the_cuda_context(tiny_llama_dir):
    from qlora_lite.config import load_recipe
    from qlora_lite.planner import plan_memory

    cfg = load_recipe(None, [f"model.name_or_path={tiny_llama_dir}", *throughput.BENCH_OVERRIDES, "train.micro_batch_size=4", "train.max_seq_len=256"])
    plan = plan_memory(cfg)
    assert throughput.estimate_peak_gib(str(tiny_llama_dir), 4, 256) * GIB == pytest.approx(plan.total_bytes - plan.cuda_context_bytes, abs=1)
    assert plan.cuda_context_bytes == int(0.75 * GIB)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="with a GPU, --longest runs the real search")
def test_longest_search_refuses_without_cuda():
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--longest"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 1
    assert "--longest needs a CUDA GPU" in out.stderr and "set_per_process_memory_fraction" in out.stderr
