"""Offloaded checkpoints: the input each checkpointed decoder layer keeps for the backward waits in host memory.

With gradient checkpointing a decoder layer keeps one tensor for the backward, its input
(micro_batch x seq x hidden in the compute dtype: 8 KiB per token at Llama-3.1-8B's widths, x 32
layers = 256 KiB per token, 32 GiB at 131,072 tokens). `ActivationOffload.checkpoint` is the
checkpoint function transformers calls for every layer (quant.enable_gradient_checkpointing
installs it); around torch's non-reentrant checkpoint it sets saved-tensor hooks, and torch's
checkpoint saves exactly the layer's tensor arguments under them (`_CheckpointFrame.save_inputs`,
before it pushes its own hooks for the layer's insides), so the hooks see one tensor per layer:

  forward   pack(layer i's input): kept on the device; layer i-1's input, packed just before,
            starts its copy to pinned host memory on a side CUDA stream (the compute stream goes
            on; the device block is released to the allocator once the copy is done, record_stream).
            The newest input stays on the device: it is the first the backward needs.
  backward  unpack(layer i's input), as the backward recomputes layer i: its copy back (started
            one layer earlier) is waited for on the compute stream, and layer i-1's copy back starts
            on the side stream, so it overlaps the recompute of layer i (double buffering: at most
            two layers' inputs are on the device in the backward).
Tensors under OFFLOAD_MIN_BYTES stay where they are (the copy costs more than it frees).

On the CPU there is no other memory to copy to: the same hooks run, in the same order, and the
store only relabels what it holds (memory.mark_host), so MemoryMeter splits a CPU step into what a
GPU would keep on the device and what would wait on the host, and tests check the order, the
hooks and the exactness without a GPU.

What we took, and why. torchtune's `OffloadActivations` (training/_activation_offloading.py): the
saved_tensors_hooks shape, the side stream with an event per copy, pinned host tensors, and its
use with non-reentrant checkpointing (the checkpoint's saved inputs are the only tensors an outer
hook sees); not its copy-back on demand (it starts the copy when the backward asks for the tensor
and makes the compute stream wait), nor its per-node stashes and autograd-node hooks: we know the
order (layer i, then i-1), so a one-ahead prefetch and record_stream say it in a few lines.
unsloth-zoo's offloaded gradient checkpointing (gradient_checkpointing.py): offload only the
layer's input, not every saved activation (the recompute rebuilds the rest), and keep the last
layer on the device; not its reentrant autograd.Function, which bypasses DDP/FSDP's hooks and
needs the inputs to require gradients, nor its fixed pre-allocated buffers.
transformers' own `activation_checkpointing_enable(offload=True)` (save_on_cpu around the
checkpoint) copies on the compute stream and brings every input back just in time: the step waits
for both copies of every layer; we overlap them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from ..memory import mark_host

OFFLOAD_MIN_BYTES = 1 << 20  # smaller saved inputs (a short sequence, a tiny model) stay on the device


@dataclass
class _Entry:
    """One layer input the store holds between its forward and its backward."""

    tensor: torch.Tensor  # on the device until offloaded, then the host copy (the same tensor on the CPU)
    on_host: bool = False
    back: torch.Tensor | None = None  # the device copy a prefetch started (CUDA)
    back_ready: Any = None  # the CUDA event that ends that copy


class _Handle:
    """What pack() gives autograd for an offloaded tensor: its key. When autograd drops it (the graph
    freed without a backward), the store drops its entry too."""

    __slots__ = ("__weakref__", "key")

    def __init__(self, key: int) -> None:
        self.key = key


class ActivationOffload:
    """Keeps the checkpointed layer inputs in host memory between forward and backward (see the module docstring).

    Args:
        device: the device the step computes on; CUDA copies to pinned host memory, the CPU only relabels.
        min_bytes: inputs smaller than this stay on the device (default OFFLOAD_MIN_BYTES on a GPU, 0 on the CPU).
        log: when a list, every action is appended as (action, key): `keep`, `offload`, `prefetch`,
            `unpack`; tests read the order from it.
    """

    def __init__(self, device: torch.device, min_bytes: int | None = None, log: list | None = None) -> None:
        self.device = torch.device(device)
        self.copies = self.device.type == "cuda"
        # Nothing is copied on the CPU, so there every input is relabelled, however small (the demo's included).
        self.min_bytes = min_bytes if min_bytes is not None else (OFFLOAD_MIN_BYTES if self.copies else 0)
        self.stream = torch.cuda.Stream(self.device) if self.copies else None
        self.entries: dict[int, _Entry] = {}
        self.next_key = 0
        self.log = log

    # --- the checkpoint function transformers calls for every decoder layer

    def checkpoint(self, function: Callable, *args, **kwargs):
        """torch's non-reentrant checkpoint of function(*args), its saved inputs handed to this store."""
        with torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack):
            return torch_checkpoint(function, *args, **kwargs)

    @property
    def host_bytes(self) -> int:
        """Bytes the store holds in host memory now."""
        return sum(e.tensor.numel() * e.tensor.element_size() for e in self.entries.values() if e.on_host)

    # --- the hooks

    def pack(self, tensor: torch.Tensor):
        if tensor.numel() * tensor.element_size() < self.min_bytes or tensor.device.type != self.device.type:
            return tensor
        key = self.next_key
        self.next_key += 1
        self.entries[key] = _Entry(tensor)
        self._note("keep", key)
        previous = self.entries.get(key - 1)
        if previous is not None and not previous.on_host:
            self.send_to_host(key - 1, previous)
        handle = _Handle(key)
        weakref.finalize(handle, self.entries.pop, key, None)
        return handle

    def unpack(self, packed):
        if isinstance(packed, torch.Tensor):
            return packed
        entry = self.entries.pop(packed.key, None)
        if entry is None:
            raise RuntimeError(
                "model.activation_offload: a layer input was read twice (a second backward over one graph); set model.activation_offload=false"
            )
        self._note("unpack", packed.key)
        tensor = self.bring_back(entry)
        earlier = self.entries.get(packed.key - 1)
        if earlier is not None and earlier.on_host and earlier.back is None:
            self.prefetch(packed.key - 1, earlier)
        return tensor

    # --- the copies

    def send_to_host(self, key: int, entry: _Entry) -> None:
        """Start entry's copy to pinned host memory on the side stream (CUDA); on the CPU, relabel it as host."""
        self._note("offload", key)
        source = entry.tensor
        if not self.copies:
            mark_host(source, True)
        else:
            host = torch.empty_like(source, device="cpu", pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))  # the input is complete before it is copied
            with torch.cuda.stream(self.stream):
                host.copy_(source, non_blocking=True)
            # The device block goes back to the allocator when the reference drops, but is not reused before the copy ends.
            source.record_stream(self.stream)
            mark_host(host, True)
            entry.tensor = host
        entry.on_host = True

    def prefetch(self, key: int, entry: _Entry) -> None:
        """Start entry's copy back to the device on the side stream, to overlap the recompute of the layer after it."""
        self._note("prefetch", key)
        if not self.copies:
            mark_host(entry.tensor, False)
            entry.back = entry.tensor
            return
        with torch.cuda.stream(self.stream):
            entry.back = entry.tensor.to(self.device, non_blocking=True)
            entry.back_ready = self.stream.record_event()

    def bring_back(self, entry: _Entry) -> torch.Tensor:
        """The entry's tensor on the device, for the compute stream: prefetched (waited for), copied now, or never offloaded."""
        if not entry.on_host:
            return entry.tensor
        if entry.back is None:  # not prefetched (the first offloaded layer of a backward): copy now
            self.prefetch(-1, entry)
        if not self.copies:
            return entry.back
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(entry.back_ready)
        entry.back.record_stream(compute)  # made on the side stream, used and freed on the compute stream
        return entry.back

    def _note(self, action: str, key: int) -> None:
        if self.log is not None:
            self.log.append((action, key))


def resolve_activation_offload(setting: str, needed: bool, device: torch.device) -> bool:
    """model.activation_offload: `true`/`false` as said; `auto` on where a GPU step needs it (the planner's `needed`)."""
    if setting == "auto":
        return needed and device.type == "cuda"
    return setting == "true"
