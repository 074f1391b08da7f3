"""Loading the base layer by layer into FSDP2 shards, so that loading never holds more than the step.

Under `dist.strategy: fsdp` each process would otherwise quantize the whole base onto its device and
attach LoRA before FSDP shards it: a 70B's 38.6 GiB per GPU before the first step, whatever the
number of GPUs. Here the base is built on the meta device (quant.build_empty_base_model: the same
modules, Linear4bit already in place, no storage), then one unit at a time, in the order the
whole-model path builds them:

  1. its weights read from the checkpoint, one tensor at a time (safetensors_io.CheckpointReader:
     plain reads, nothing mapped, so a process holds one tensor of the checkpoint, not the file);
  2. quantized to NF4 exactly as transformers quantizes them while loading (quant.materialize_weights),
     so the bytes are those of load_base_model;
  3. given its LoRA (lora.apply_lora on its own targets, in the whole model's order: the same random
     initial A, from the same seed), or the saved A and B of the checkpoint or init_adapter,
     broadcast from rank 0 as fit() broadcasts the whole adapter;
  4. sharded with fully_shard, which keeps this process's 1/N and frees the rest before the next unit.

Every process reads the checkpoint itself rather than rank 0 reading and broadcasting: measured at
70B widths on 2 processes (benchmarks/fsdp_readers.py), 2.25 s per layer from a cold page cache
against 3.02 s for rank 0 and a broadcast, the same disk bytes (on one machine the second reader is
served by the page cache) and the same memory (one tensor at a time on each process either way).
After each layer the freed pages go back to the system (memory.release_freed_memory), so resident
memory grows by the layer's shards, not by the reads freed between them. The final norm and head come last, whole until build_engine shards the root's
FSDP unit; the input embeddings (their own unit) are built and sharded first. The rotary embeddings'
inv_freq is computed, not read: those modules are rebuilt.

Only for LoRA on a 4-bit base (sharding.loads_layer_by_layer); the other methods load whole before
sharding, as before. A pre-quantized base stays refused under FSDP (distributed.check_recipe): its
uint8 storage cannot be sharded as the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..memory import release_freed_memory
from ..methods.lora import apply_lora, check_adapter_fits, collect_lora_pairs, read_lora_adapter, resolve_targets
from ..quant import build_empty_base_model, is_prequantized, materialize_weights, restore_rotary_embeddings
from ..safetensors_io import CheckpointReader
from ..sharding import loads_layer_by_layer
from .distributed import broadcast_parameters, shard_unit


def loads_run_layer_by_layer(run) -> bool:
    """Whether fit() loads this run's base layer by layer: FSDP over several processes, what sharding.loads_layer_by_layer says (LoRA on a 4-bit base), not pre-quantized."""
    return bool(run.sharded and loads_layer_by_layer(run.cfg) and not is_prequantized(run.base_path))


def load_layer_by_layer(run, adapter_dir: Path | None, prepare: Callable[[nn.Module], None]) -> nn.Module:
    """The base with LoRA attached (fresh, or adapter_dir's), its decoder layers already FSDP2 shards; the root is sharded by build_engine.

    prepare: what fit() does to a loaded base before the method wraps it (checkpointing, the lean
    norm, tiles), done here on the meta model, before any weight exists.
    """
    cfg = run.cfg
    base = build_empty_base_model(cfg.model, cfg.quant, run.base_path, run.compute_dtype)
    prepare(base)
    lora_cfg, saved = cfg.lora, None
    if adapter_dir is not None:
        lora_cfg, weights = read_lora_adapter(adapter_dir)
        check_adapter_fits(base, lora_cfg, weights)  # a wrong adapter for this base is one line, before any layer loads
        saved = collect_lora_pairs(weights)
    targets = resolve_targets(base, lora_cfg.target_modules)  # the whole model's, in its order
    names = {module: name for name, module in base.named_modules()}
    reader = CheckpointReader(run.base_path)
    embeddings, head = base.get_input_embeddings(), base.get_output_embeddings()
    if head is None or embeddings.weight is not head.weight:  # untied: its own FSDP unit (distributed.shard_with_fsdp), sharded at once
        materialize_weights(embeddings, names[embeddings] + ".", reader.read, run.device, run.compute_dtype)
        shard_unit(embeddings, run.compute_dtype, cfg.dist.cpu_offload)
    for layer in base.get_decoder().layers:
        prefix = names[layer] + "."
        materialize_weights(layer, prefix, reader.read, run.device, run.compute_dtype)
        mine = [name.removeprefix(prefix) for name in targets if name.startswith(prefix)]
        apply_lora(layer, lora_cfg, targets=mine)
        if saved is not None:
            copy_saved_pairs(layer, prefix, mine, saved)
        broadcast_parameters([p for p in layer.parameters() if p.requires_grad])
        shard_unit(layer, run.compute_dtype, cfg.dist.cpu_offload)
        release_freed_memory()  # the layer's bf16 reads and unsharded NF4 are freed; give their pages back before the next
    materialize_weights(base, "", reader.read, run.device, run.compute_dtype)  # the root's: final norm, head (and tied embeddings)
    if getattr(base.config, "tie_word_embeddings", False):
        base.tie_weights()
    restore_rotary_embeddings(base, run.device)
    return base


@torch.no_grad()
def copy_saved_pairs(layer: nn.Module, prefix: str, targets: list[str], saved: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A resumed (or init_adapter) run: this layer's LoRA A and B from the saved adapter, in the adapter's dtype."""
    for name in targets:
        a, b = saved[prefix + name]
        lora = layer.get_submodule(name)
        lora.lora_A.weight.copy_(a)
        lora.lora_B.weight.copy_(b)
