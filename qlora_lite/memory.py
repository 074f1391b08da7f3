"""Memory accounting: what the model holds and what the device uses. It observes, never changes.

Parameter counts treat a packed 4-bit weight as the weights it holds (two per byte), the
way PEFT's `print_trainable_parameters` does, so "8B" means 8B whether the base is NF4 or
bf16. Byte counts, on the other hand, are what really sits in memory, by storage dtype.
"""

from __future__ import annotations

import os
import resource
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .quant import is_quantized_parameter, quantized_numel

GIB = 1024**3


@dataclass
class ParameterCounts:
    trainable: int
    frozen: int

    @property
    def total(self) -> int:
        return self.trainable + self.frozen

    @property
    def trainable_pct(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)


def count_parameters(model: nn.Module) -> ParameterCounts:
    """Trainable and frozen parameters, 4-bit weights counted by the values they hold."""
    trainable = frozen = 0
    for param in model.parameters():
        n = quantized_numel(param) if is_quantized_parameter(param) else param.numel()
        if param.requires_grad:
            trainable += n
        else:
            frozen += n
    return ParameterCounts(trainable, frozen)


def bytes_by_dtype(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers by storage dtype, NF4 quantization constants included."""
    totals: dict[str, int] = {}

    def add(key: str, tensor: torch.Tensor) -> None:
        totals[key] = totals.get(key, 0) + tensor.numel() * tensor.element_size()

    for param in model.parameters():
        if is_quantized_parameter(param):
            add("nf4/fp4 (packed uint8)", param)
            for constant in quant_constants(param.quant_state):
                add("quant constants", constant)
        else:
            add(str(param.dtype).removeprefix("torch."), param)
    for buffer in model.buffers():
        add(str(buffer.dtype).removeprefix("torch.") + " (buffers)", buffer)
    return totals


def quant_constants(state) -> list[torch.Tensor]:
    """The per-block scales of a bitsandbytes QuantState (and, with double quantization, theirs)."""
    tensors = [state.absmax, state.code]
    if getattr(state, "state2", None) is not None:
        tensors += [state.state2.absmax, state.state2.code]
    if getattr(state, "offset", None) is not None:
        tensors.append(state.offset)
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def get_device_memory(device: torch.device) -> dict[str, float | str]:
    """GiB in use: CUDA allocated/reserved/peak, or on the CPU the process RSS (labelled as such)."""
    if device.type == "cuda":
        return {
            "kind": "cuda",
            "allocated_gib": torch.cuda.memory_allocated(device) / GIB,
            "reserved_gib": torch.cuda.memory_reserved(device) / GIB,
            "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GIB,
        }
    rss = read_rss_bytes()
    # ru_maxrss is sampled by the kernel and can trail the current RSS by a few pages.
    return {"kind": "cpu process RSS", "rss_gib": rss / GIB, "peak_rss_gib": max(rss, read_peak_rss_bytes()) / GIB}


def read_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def read_peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux VmHWM; getrusage elsewhere).

    VmHWM, not ru_maxrss: Linux keeps ru_maxrss across execve, so a process started from a
    large parent would report the parent's peak as its own.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def build_memory_report(model: nn.Module, device: torch.device) -> dict:
    """Everything the report prints, as one JSON-able dict (also written to metrics.jsonl)."""
    counts = count_parameters(model)
    return {
        "params": {**asdict(counts), "total": counts.total, "trainable_pct": counts.trainable_pct},
        "bytes_by_dtype": bytes_by_dtype(model),
        "device_memory": get_device_memory(device),
    }


def format_memory_report(report: dict, title: str = "memory") -> str:
    """Human-readable lines of a build_memory_report dict."""
    p = report["params"]
    lines = [
        f"[{title}] parameters: trainable {p['trainable']:,} || frozen {p['frozen']:,} || "
        f"total {p['total']:,} || trainable {p['trainable_pct']:.4f}%",
        "  bytes by dtype: " + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in sorted(report["bytes_by_dtype"].items())),
    ]
    mem = report["device_memory"]
    if mem["kind"] == "cuda":
        lines.append(
            f"  GPU memory: allocated {mem['allocated_gib']:.2f} GiB, reserved {mem['reserved_gib']:.2f} GiB, "
            f"peak allocated {mem['peak_allocated_gib']:.2f} GiB, peak reserved {mem['peak_reserved_gib']:.2f} GiB"
        )
    else:
        lines.append(f"  CPU process RSS (no GPU): now {mem['rss_gib']:.2f} GiB, peak {mem['peak_rss_gib']:.2f} GiB")
    return "\n".join(lines)


def format_memory_short(device: torch.device) -> str:
    """A few characters for the progress bar."""
    mem = get_device_memory(device)
    if mem["kind"] == "cuda":
        return f"{mem['peak_allocated_gib']:.1f}G"
    return f"{mem['rss_gib']:.1f}G rss"
