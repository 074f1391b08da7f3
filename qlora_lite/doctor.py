"""`qlora-lite doctor`: this machine and its packages, in one report to paste into a bug report.

It says which versions are installed and whether they are the set CI tested
(`tested-versions.txt`, beside this file), what bitsandbytes loaded and whether NF4 works, the
GPUs (compute capability, bf16, memory) or the CPU (the flags bitsandbytes' CPU code paths
depend on, RAM), the compute dtype `auto` picks, and whether paged optimizers and flash attention
are available. Every training run writes the same facts as the first line of metrics.jsonl.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from pathlib import Path

import torch

from .memory import read_available_ram_bytes
from .quant import describe_bitsandbytes, pick_device, resolve_compute_dtype

GIB = 2**30
TESTED_VERSIONS = Path(__file__).with_name("tested-versions.txt")
PACKAGES = ("torch", "bitsandbytes", "transformers", "accelerate", "peft", "datasets")
# The x86 flags that decide bitsandbytes' and torch's CPU code paths (AVX512-BF16: bitsandbytes'
# packed 4-bit inference layout; AMX: torch's bf16 matmuls).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def read_tested_versions(path: Path = TESTED_VERSIONS) -> dict[str, str]:
    """name -> version of the tested set (names normalised as pip does)."""
    pins = {}
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[normalize(name)] = version.strip()
    return pins


def normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def read_installed_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions; None for a package that is not installed."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def find_untested(installed: dict[str, str | None], tested: dict[str, str]) -> dict[str, str]:
    """Packages whose installed version differs from the tested one (a local tag such as +cpu or
    +cu128 is the build, not the release, and is ignored)."""
    untested = {}
    for name, version in installed.items():
        want = tested.get(normalize(name))
        if version is not None and want is not None and version.split("+")[0] != want:
            untested[name] = f"{version} installed, {want} tested"
    return untested


def describe_gpus() -> list[dict]:
    gpus = []
    for index in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props = torch.cuda.get_device_properties(index)
        free, total = torch.cuda.mem_get_info(index)
        major, minor = torch.cuda.get_device_capability(index)
        gpus.append({
            "index": index, "name": props.name, "compute_capability": f"{major}.{minor}",
            "bf16": major >= 8,  # bf16 tensor cores arrived with Ampere (8.0)
            "total_gib": round(total / GIB, 2), "free_gib": round(free / GIB, 2),
        })  # fmt: skip
    return gpus


def describe_cpu() -> dict:
    info = read_cpuinfo()
    flags = set(info.get("flags", "").split())
    return {
        "model": info.get("model name") or platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "flags": {flag: flag in flags for flag in CPU_FLAGS},
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **read_ram_gib(),
    }


def read_cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty off Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = {}
    for line in text.split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def read_ram_gib() -> dict[str, float | None]:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = None
    available = read_available_ram_bytes()
    return {
        "ram_total_gib": round(total / GIB, 2) if total else None,
        "ram_available_gib": round(available / GIB, 2) if available else None,
    }


def is_flash_attention_available() -> bool:
    from transformers.utils import is_flash_attn_2_available

    return bool(is_flash_attn_2_available())


def collect_environment() -> dict:
    """Everything `doctor` reports, as one JSON-ready dict."""
    device = pick_device()
    installed = read_installed_versions()
    untested = find_untested(installed, read_tested_versions())
    bnb = describe_bitsandbytes(device)
    return {
        "python": platform.python_version(),
        "platform": f"{platform.system()} {platform.machine()}",
        "packages": installed,
        "tested_set": not untested,
        "untested": untested,
        "torch_cuda": torch.version.cuda,
        "bitsandbytes": bnb,
        "device": str(device),
        "gpus": describe_gpus(),
        "cpu": describe_cpu(),
        "auto_compute_dtype": str(resolve_compute_dtype("auto", device)).removeprefix("torch."),
        # Paged optimizers keep their state in CUDA unified memory: a GPU and a CUDA bitsandbytes.
        "paged_optimizers": device.type == "cuda" and bnb["backend"] == "CUDA" and bnb["error"] is None,
        "flash_attention": is_flash_attention_available(),
    }


def find_problems(env: dict) -> list[str]:
    """One line per thing that stops this setup from training, each with its fix."""
    problems = []
    if env["bitsandbytes"]["error"]:
        backend = "the CUDA build of torch" if env["torch_cuda"] else "this torch"
        problems.append(
            f"{env['bitsandbytes']['error']}; reinstall it for {backend} "
            "(pip install --force-reinstall bitsandbytes) or pick quant.load_in_4bit=false"
        )
    if env["packages"]["transformers"] is None or env["packages"]["accelerate"] is None:
        problems.append("transformers or accelerate is not installed; run pip install -e . (or pip install qlora-lite)")
    return problems


def format_environment(env: dict) -> str:
    bnb = env["bitsandbytes"]
    lines = [f"python {env['python']} on {env['platform']}"]
    for name, version in env["packages"].items():
        note = f"  <- {env['untested'][name]}" if name in env["untested"] else ""
        extra = f" (CUDA {env['torch_cuda']})" if name == "torch" and env["torch_cuda"] else ""
        lines.append(f"  {name:<13} {version or 'not installed'}{extra}{note}")
    lines.append("  tested set: " + ("yes" if env["tested_set"] else f"no ({len(env['untested'])} differ; CI tests {TESTED_VERSIONS.name})"))
    if bnb["version"]:
        roundtrip = "failed" if bnb["nf4_roundtrip_rel_error"] is None else f"NF4 round trip rel. error {bnb['nf4_roundtrip_rel_error']}"
        lines.append(f"bitsandbytes backend {bnb['backend']}, library {bnb['native_library'] or 'not loaded'}, {roundtrip}")
    for gpu in env["gpus"]:
        lines.append(
            f"GPU {gpu['index']}: {gpu['name']}, compute capability {gpu['compute_capability']}, "
            f"bf16 {'yes' if gpu['bf16'] else 'no'}, {gpu['free_gib']:.1f} of {gpu['total_gib']:.1f} GiB free"
        )
    cpu = env["cpu"]
    flags = " ".join(f"{flag}{'+' if on else '-'}" for flag, on in cpu["flags"].items())
    lines.append(f"CPU: {cpu['model']}, {cpu['cores']} cores, {flags}, RAM {cpu['ram_available_gib']} of {cpu['ram_total_gib']} GiB free")
    if not env["gpus"]:
        lines.append("  no CUDA GPU: training runs on the CPU, which suits tiny models (the demo) only")
    lines.append(f"device {env['device']}; compute dtype auto -> {env['auto_compute_dtype']}")
    lines.append(f"paged optimizers: {'yes' if env['paged_optimizers'] else 'no (need a CUDA GPU; unpaged AdamW is used)'}")
    lines.append(f"flash attention 2: {'yes' if env['flash_attention'] else 'no (sdpa is used)'}")
    return "\n".join(lines)
