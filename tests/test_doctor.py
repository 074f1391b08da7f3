"""`qlora-lite doctor`: the facts it reports match the machine, the tested set matches pyproject,
the GPU branch (torch's CUDA queries patched) reports capability, bf16 and memory, and a broken
bitsandbytes gives exit 2 with a one-line cause and fix."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
import tomllib
import torch

from qlora_lite import cli, doctor
from qlora_lite.doctor import PACKAGES, collect_environment, find_problems, find_untested, format_environment, read_tested_versions

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def test_cpu_facts_match_this_machine():
    env = collect_environment()
    assert env["packages"] == {name: metadata.version(name) for name in PACKAGES}  # every one installed here
    assert env["tested_set"] is (env["untested"] == {})
    assert env["device"] == "cpu" and env["gpus"] == [] and env["auto_compute_dtype"] == "float32"
    assert env["paged_optimizers"] is False
    found = re.search(r"^flags\s*:(.*)$", Path("/proc/cpuinfo").read_text(), re.M)  # x86 only; ARM has none of these
    flags = set(found.group(1).split()) if found else set()
    assert env["cpu"]["flags"] == {f: f in flags for f in doctor.CPU_FLAGS}
    assert env["cpu"]["cores"] >= 1 and 0 < env["cpu"]["ram_available_gib"] <= env["cpu"]["ram_total_gib"]
    bnb = env["bitsandbytes"]
    assert bnb["error"] is None and bnb["backend"] == "CPU" and bnb["native_library"].startswith("libbitsandbytes_cpu")
    assert 0.05 < bnb["nf4_roundtrip_rel_error"] < 0.15  # NF4 on a Gaussian 64x64 matrix: 0.092 measured
    assert find_problems(env) == []


def test_doctor_command_exits_0_and_prints_the_versions(capsys):
    assert cli.main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert f"transformers  {metadata.version('transformers')}" in out
    assert "tested set: " in out and "compute dtype auto -> float32" in out


def test_tested_set_pins_every_dependency_and_satisfies_pyproject():
    from packaging.requirements import Requirement

    tested = read_tested_versions()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    assert len(requirements) == 9 + 9  # runtime + test extra (trl: the oracle of the preference objectives)
    for req in requirements:
        name = doctor.normalize(req.name)
        assert name in tested, f"{req.name} is not pinned in {doctor.TESTED_VERSIONS.name}"
        assert req.specifier.contains(tested[name]), f"{req.name}=={tested[name]} is outside pyproject's {req.specifier}"


def test_untested_versions_are_named_and_local_build_tags_ignored():
    tested = {"torch": "2.13.0", "transformers": "5.24.0", "peft": "0.21.2"}
    installed = {"torch": "2.13.0+cu128", "transformers": "5.25.0", "peft": None, "datasets": "5.2.0"}
    assert find_untested(installed, tested) == {"transformers": "5.25.0 installed, 5.24.0 tested"}
    env = collect_environment()
    env.update(untested={"transformers": "5.25.0 installed, 5.24.0 tested"}, tested_set=False)
    text = format_environment(env)
    assert "<- 5.25.0 installed, 5.24.0 tested" in text and "tested set: no (1 differ" in text


@pytest.fixture
def two_gpus(monkeypatch):
    """torch's CUDA queries answer as on a machine with a T4 (device 0, current) and an H100."""
    gpus = [("Tesla T4", (7, 5), 15.0, 14.5), ("NVIDIA H100 80GB HBM3", (9, 0), 79.2, 78.6)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # asked of the current device, the T4
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(name=gpus[i][0]))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i: gpus[i][1])
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i: (int(gpus[i][3] * GIB), int(gpus[i][2] * GIB)))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    # bitsandbytes cannot quantize on a CUDA device that is not there: report what a CUDA install would.
    healthy = {"version": "0.50.2", "backend": "CUDA", "native_library": "libbitsandbytes_cuda128.so",
               "cpu_avx512_bf16": False, "nf4_roundtrip_rel_error": 0.0918, "error": None}  # fmt: skip
    monkeypatch.setattr(doctor, "describe_bitsandbytes", lambda device: healthy)


def test_gpu_branch_reports_capability_bf16_memory_and_auto_dtype(two_gpus):
    env = collect_environment()
    assert env["device"] == "cuda:0" and env["auto_compute_dtype"] == "float16"  # T4: no bf16
    assert [(g["compute_capability"], g["bf16"], g["total_gib"], g["free_gib"]) for g in env["gpus"]] == [
        ("7.5", False, 15.0, 14.5), ("9.0", True, 79.2, 78.6)
    ]
    assert env["paged_optimizers"] is True and find_problems(env) == []
    text = format_environment(env)
    assert "GPU 0: Tesla T4, compute capability 7.5, bf16 no, 14.5 of 15.0 GiB free" in text
    assert "GPU 1: NVIDIA H100 80GB HBM3, compute capability 9.0, bf16 yes, 78.6 of 79.2 GiB free" in text
    assert "torch         " in text and "(CUDA 12.8)" in text and "no CUDA GPU" not in text


def test_bitsandbytes_without_its_library_exits_2_with_cause_and_fix(monkeypatch, capsys):
    import bitsandbytes.cextension as cext

    broken = cext.ErrorHandlerMockBNBNativeLibrary("libbitsandbytes_cpu.so: cannot open shared object file")
    monkeypatch.setattr(cext, "lib", broken)
    assert cli.main(["doctor"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert err[0].startswith("error: bitsandbytes could not load its CPU native library (libbitsandbytes_cpu.so: cannot open")
    assert "pip install --force-reinstall bitsandbytes" in err[0]
