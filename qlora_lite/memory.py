"""Memory accounting: what the model holds and what the device uses. It observes, never changes.

Parameter counts treat a packed 4-bit weight as the weights it holds (two per byte), the
way PEFT's `print_trainable_parameters` does, so "8B" means 8B whether the base is NF4 or
bf16. Byte counts, on the other hand, are what really sits in memory, by storage dtype.

`MemoryMeter` measures the peak bytes of live tensors during a step on any device, the CPU
included, by watching every storage the step's operations create until it is freed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import resource
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

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


def read_available_ram_bytes() -> int | None:
    """RAM the kernel says can be had now without swapping (Linux /proc/meminfo MemAvailable; None elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, ValueError, StopIteration):
        return None


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


def release_freed_memory() -> bool:
    """Hand the C heap's free pages back to the operating system (glibc's malloc_trim); whether it could.

    A loop that reads a tensor, quantizes it and keeps a share leaves the freed reads between the
    kept blocks, where glibc keeps them mapped: resident memory then grows faster than the live
    bytes (0.27-0.34 vs 0.22 GiB per 70B layer, benchmarks/fsdp_loading.py). Elsewhere than glibc: a no-op.
    """
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


def _glibc():
    global _GLIBC
    if _GLIBC is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _GLIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:
            _GLIBC = False
    return _GLIBC or None


_GLIBC = None


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


# ---------------------------------------------------------------------------- the meter

# The CUDA caching allocator hands out blocks in multiples of 512 bytes, and
# torch.cuda.max_memory_allocated counts the rounded sizes.
CUDA_BLOCK_BYTES = 512


@dataclass
class Allocation:
    """One storage the meter saw: who made it, how big, and when it lived (event numbers)."""

    op: str
    """The operation that created it (`aten.mm.default`), or `baseline` / `baseline (found)`."""
    shape: tuple[int, ...]
    dtype: str
    device: str
    nbytes: int
    born: int
    """Event number of its creation; -1 for storages alive before the meter started."""
    freed: int | None = None
    moves: list[tuple[int, bool]] = field(default_factory=list)
    """(event, on host) each time an offload store moved it between device and host memory (mark_host)."""

    def is_alive_at(self, event: int) -> bool:
        return self.born <= event and (self.freed is None or self.freed > event)

    def is_host_at(self, event: int) -> bool:
        host = False
        for when, on_host in self.moves:
            if when > event:
                break
            host = on_host
        return host

    @property
    def on_host(self) -> bool:
        return bool(self.moves) and self.moves[-1][1]

    @property
    def is_baseline(self) -> bool:
        return self.born < 0


@dataclass
class _Live:
    record: Allocation
    ref: weakref.ref = field(repr=False)


_RUNNING_METERS: list[MemoryMeter] = []


def mark_host(tensor: torch.Tensor, on_host: bool) -> None:
    """Tell every running MemoryMeter that tensor's storage now waits in host memory (on_host) or is back on the device.

    Called by training.offload's store: on a GPU for the pinned copies it makes, on the CPU (where
    nothing is copied) for the very storages it holds, so a CPU step is split as a GPU's would be.
    """
    for meter in list(_RUNNING_METERS):
        meter.move(tensor, on_host)


class MemoryMeter(TorchDispatchMode):
    """Peak bytes of live tensor storages during a block of code, on the CPU or a GPU.

    Usage::

        with MemoryMeter(baseline=[model, optimizer, batch]) as meter:
            loss = model(**batch).loss
            loss.backward()
        meter.peak_bytes, meter.baseline_bytes, meter.peak_transient_bytes

    Every ATen operation run inside the block (forward, autograd's saved tensors, backward,
    gradient checkpointing's recomputation) passes through `__torch_dispatch__`; each output
    storage not seen before is counted from then until it is freed (a weakref callback on the
    storage). Counting storages, keyed by their data pointer, means a view is never counted
    again. The storages of `baseline` (parameters, buffers, gradients, a Params4bit's quant
    state, optimizer state, a batch) are counted from the start: bitsandbytes' 4-bit weights
    first appear inside a step as outputs of `aten.view`, so without them each would count twice.
    A storage the block reads that is neither in the baseline nor made inside the block was
    alive from the start too: it is added to the baseline when first seen
    (`found_baseline_bytes`), and to every earlier moment, so the peak stays exact.

    Limits: temporaries made inside one operation's kernel and freed before it returns (a
    bitsandbytes kernel's scratch buffers, cuBLAS workspaces) are not seen, nor storages
    resized through `UntypedStorage.resize_`. On CUDA the autograd engine runs backward on its
    own device thread; each graph task carries the caller's thread-local state, dispatch modes
    included (`at::ThreadLocalState::torch_dispatch_mode_state_`), into that thread, so backward
    is measured there too; a lock keeps the count consistent across the two threads. A backward
    started outside the block is not measured.

    Device and host: storages an activation offload store holds in host memory (mark_host) count
    as host bytes, everything else as device bytes; `peak_device_bytes` and `peak_host_bytes` are
    each one's own peak, `peak_bytes` the peak of their sum, `phase_peaks` the device's peak in each
    phase the caller marks (start_phase). With a CUDA device filter, the store's pinned host copies
    are counted (as host) too.

    Args:
        baseline: modules, optimizers, tensors, or dicts / lists of them, alive before the block.
        device: count only storages on this device type ("cpu", "cuda"); None counts all.
    """

    def __init__(self, baseline: Iterable | None = None, device: str | torch.device | None = None) -> None:
        super().__init__()
        self.device_type = torch.device(device).type if device is not None else None
        self.allocations: list[Allocation] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        self.peak_event = -1
        self.live_host_bytes = 0
        self.peak_host_bytes = 0
        self.peak_device_bytes = 0
        self.peak_device_event = -1
        self.phase = "step"
        self.phase_peaks: dict[str, int] = {"step": 0}  # device bytes at each phase's own peak (start_phase)
        self.baseline_bytes = 0
        self.found_baseline_bytes = 0
        self.end_bytes: int | None = None
        self._event = 0
        self._live: dict[tuple[str, int], _Live] = {}
        self._lock = threading.RLock()
        self._closed = False
        for tensor in iter_held_tensors(baseline or []):
            self._track(tensor, "baseline", found=False)

    # --- results

    @property
    def peak_transient_bytes(self) -> int:
        """Peak above what was alive at the start: what the block itself needed."""
        return self.peak_bytes - self.baseline_bytes

    def allocations_at_peak(self, include_baseline: bool = False, device_only: bool = False) -> list[Allocation]:
        """The storages alive at the peak (device_only: on the device at the device's own peak), largest first."""
        event = self.peak_device_event if device_only else self.peak_event
        alive = [
            a for a in self.allocations
            if a.is_alive_at(event) and (include_baseline or not a.is_baseline) and not (device_only and a.is_host_at(event))
        ]  # fmt: skip
        return sorted(alive, key=lambda a: a.nbytes, reverse=True)

    def peak_transient_bytes_where(self, predicate: Callable[[Allocation], bool]) -> int:
        """The most bytes that storages made in the block and matching predicate held at any one moment.

        E.g. `lambda a: vocab_size in a.shape` gives what the LM head and the loss held at their
        own peak, which need not be the moment of the step's peak.
        """
        changes: list[tuple[int, int]] = []
        for a in self.allocations:
            if not a.is_baseline and predicate(a):
                changes.append((a.born, a.nbytes))
                if a.freed is not None:
                    changes.append((a.freed, -a.nbytes))
        live = peak = 0
        for _, delta in sorted(changes):  # at equal event numbers a free (negative) sorts first
            live += delta
            peak = max(peak, live)
        return peak

    def peak_breakdown(self, top: int = 10, device_only: bool = False) -> list[dict]:
        """Transient bytes alive at the peak (device_only: on the device at its own peak) grouped by (op, shape, dtype), largest group first."""
        groups: dict[tuple, dict] = {}
        for a in self.allocations_at_peak(device_only=device_only):
            key = (a.op, a.shape, a.dtype)
            group = groups.setdefault(key, {"op": a.op, "shape": list(a.shape), "dtype": a.dtype, "count": 0, "bytes": 0})
            group["count"] += 1
            group["bytes"] += a.nbytes
        return sorted(groups.values(), key=lambda g: g["bytes"], reverse=True)[:top]

    def summary(self, top: int = 10) -> dict:
        """The figures as one JSON-able dict."""
        return {
            "peak_bytes": self.peak_bytes,
            "baseline_bytes": self.baseline_bytes,
            "found_baseline_bytes": self.found_baseline_bytes,
            "peak_transient_bytes": self.peak_transient_bytes,
            "peak_device_bytes": self.peak_device_bytes,
            "peak_host_bytes": self.peak_host_bytes,
            "end_bytes": self.end_bytes,
            "storages_seen": len(self.allocations),
            "peak_breakdown": self.peak_breakdown(top),
        }

    # --- the mode

    def __enter__(self) -> "MemoryMeter":
        if self._closed:
            raise RuntimeError("a MemoryMeter measures one block; make a new one for the next")
        _RUNNING_METERS.append(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        _RUNNING_METERS.remove(self)
        with self._lock:
            self.end_bytes = self.live_bytes
            self._closed = True
            # Dropping the weakrefs drops their callbacks: nothing changes after the block.
            self._live.clear()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        # Inputs first: a storage read here that the meter has not seen was alive before the block.
        for tensor in _tensors_in((args, kwargs)):
            self._track(tensor, "baseline (found)", found=True)
        out = func(*args, **(kwargs or {}))
        op = str(func)
        for tensor in _tensors_in(out):
            self._track(tensor, op, found=False)
        return out

    def start_phase(self, name: str) -> None:
        """From now on, device peaks also count toward phase `name` (phase_peaks), e.g. the forward, then the backward."""
        with self._lock:
            self.phase = name
            self.phase_peaks[name] = self.live_bytes - self.live_host_bytes

    # --- bookkeeping

    def move(self, tensor: torch.Tensor, on_host: bool) -> None:
        """tensor's storage now counts as host (on_host) or device memory; a host copy not seen yet is tracked from now."""
        with self._lock:
            live = self._live.get((str(tensor.device), tensor.untyped_storage().data_ptr()))
            if live is None or live.ref() is not tensor.untyped_storage():
                if on_host:
                    self._track(tensor, "offload (host copy)", found=False, host=True)
                return
            if live.record.on_host == on_host:
                return
            self._event += 1
            live.record.moves.append((self._event, on_host))
            self.live_host_bytes += live.record.nbytes if on_host else -live.record.nbytes
            self._add(0)

    def _track(self, tensor: torch.Tensor, op: str, found: bool, host: bool = False) -> None:
        if self.device_type is not None and tensor.device.type != self.device_type and not host:
            return
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, nested or meta-like tensors own no plain storage
            return
        nbytes = count_allocated_bytes(storage.nbytes(), tensor.device)
        if nbytes == 0 or tensor.device.type == "meta":
            return
        try:
            pointer = storage.data_ptr()
        except RuntimeError:  # a wrapper subclass (FSDP2's DTensor parameters): its local tensor's ops are counted instead
            return
        key = (str(tensor.device), pointer)
        with self._lock:
            live = self._live.get(key)
            if live is not None and live.ref() is storage:
                if live.record.nbytes != nbytes:  # an out= op or resize_ grew it in place
                    self._add(nbytes - live.record.nbytes, live.record.on_host)
                    live.record.nbytes = nbytes
                return
            if live is not None:  # its memory was reused before the old storage's callback ran
                self._free(key, live)
            self._event += 1
            born = -1 if op.startswith("baseline") else self._event
            record = Allocation(op, tuple(tensor.shape), str(tensor.dtype).removeprefix("torch."), str(tensor.device), nbytes, born)
            entry = _Live(record, weakref.ref(storage, lambda _ref, key=key: self._on_storage_freed(key, _ref)))
            if host:
                record.moves.append((self._event, True))
            self._live[key] = entry
            self.allocations.append(record)
            if born < 0:
                self.baseline_bytes += nbytes
            if found:
                # Alive at every earlier moment too: each earlier total grows by nbytes, the peak with them.
                self.found_baseline_bytes += nbytes
                self.peak_bytes += nbytes
                self.peak_device_bytes += nbytes
                self.phase_peaks = {name: peak + nbytes for name, peak in self.phase_peaks.items()}
            self._add(nbytes, host)

    def _add(self, nbytes: int, host: bool = False) -> None:
        self.live_bytes += nbytes
        if host:
            self.live_host_bytes += nbytes
        if self.live_bytes > self.peak_bytes or self.peak_event < 0:
            self.peak_bytes, self.peak_event = max(self.live_bytes, self.peak_bytes), self._event
        self.peak_host_bytes = max(self.peak_host_bytes, self.live_host_bytes)
        device = self.live_bytes - self.live_host_bytes
        self.phase_peaks[self.phase] = max(self.phase_peaks[self.phase], device)
        if device > self.peak_device_bytes or self.peak_device_event < 0:
            self.peak_device_bytes, self.peak_device_event = max(device, self.peak_device_bytes), self._event

    def _on_storage_freed(self, key: tuple[str, int], ref: weakref.ref) -> None:
        with self._lock:
            live = self._live.get(key)
            if live is not None and live.ref is ref:
                self._free(key, live)

    def _free(self, key: tuple[str, int], live: _Live) -> None:
        del self._live[key]
        self._event += 1
        live.record.freed = self._event
        self.live_bytes -= live.record.nbytes
        if live.record.on_host:
            self.live_host_bytes -= live.record.nbytes


def count_allocated_bytes(nbytes: int, device: torch.device) -> int:
    """Bytes an allocation of nbytes takes: rounded up to the CUDA allocator's block on a GPU, exact elsewhere."""
    if device.type == "cuda":
        return math.ceil(nbytes / CUDA_BLOCK_BYTES) * CUDA_BLOCK_BYTES
    return nbytes


def iter_held_tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor that obj keeps alive: a module's parameters, buffers, gradients and 4-bit
    quant state; an optimizer's state; the tensors in a dict, list or tuple; a tensor itself."""
    if isinstance(obj, torch.Tensor):
        yield obj
        if obj.is_leaf and obj.grad is not None:  # .grad of a non-leaf warns and is always None
            yield obj.grad
        if is_quantized_parameter(obj) and getattr(obj, "quant_state", None) is not None:
            yield from quant_constants(obj.quant_state)
    elif isinstance(obj, nn.Module):
        for tensor in [*obj.parameters(), *obj.buffers()]:
            yield from iter_held_tensors(tensor)
    elif isinstance(obj, torch.optim.Optimizer):
        for group in obj.param_groups:
            yield from iter_held_tensors(group["params"])
        yield from iter_held_tensors(list(obj.state.values()))
    elif isinstance(obj, dict) or (hasattr(obj, "keys") and hasattr(obj, "values")):  # BatchEncoding too
        for value in obj.values():
            yield from iter_held_tensors(value)
    elif isinstance(obj, (list, tuple, set)):
        for item in obj:
            yield from iter_held_tensors(item)


def _tensors_in(tree) -> list[torch.Tensor]:
    return [x for x in tree_flatten(tree)[0] if isinstance(x, torch.Tensor)]


def format_peak_breakdown(meter: MemoryMeter, top: int = 8) -> str:
    """Lines naming the largest storages alive at the meter's peak."""
    lines = [
        f"peak {meter.peak_bytes / GIB:.3f} GiB = baseline {meter.baseline_bytes / GIB:.3f} GiB "
        f"+ transient {meter.peak_transient_bytes / GIB:.3f} GiB; largest transient storages at the peak:"
    ]
    for g in meter.peak_breakdown(top):
        shape = "x".join(str(d) for d in g["shape"])
        lines.append(f"  {g['bytes'] / 2**20:10.1f} MiB  {g['count']:3d} x {g['op']} {g['dtype']}[{shape}]")
    return "\n".join(lines)
