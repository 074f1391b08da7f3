"""What one GPU holds of a run on several processes: DDP's copies, FSDP2's shards, and FSDP2's loading.

The planner's per-GPU rows (planner.assemble) come from here: `shard_static` splits the
batch-independent parts of a one-GPU plan by the strategy, `estimate_load_peak_bytes` is the peak
while an fsdp run loads, layer by layer where training/layerwise.py does (`loads_layer_by_layer`).
"""

from __future__ import annotations

import math

from .activations import compute_element_bytes
from .config import RecipeConfig

GIB = 1024**3
# NCCL's communicator buffers per GPU with more than one process: 4 MiB per channel and connection for
# the simple protocol plus the LL/LL128 buffers; a ring over PCIe uses a few channels (~0.1 GiB),
# NVLink up to 32 (~0.5 GiB and more). An allowance, not a measurement.
NCCL_BYTES = int(0.25 * GIB)
FSDP_UNSHARDED_LAYERS = 2  # the layer running and the one FSDP2 prefetches (all-gathered ahead)
FSDP_REDUCE_ELEMENT_BYTES = 4  # distributed.shard_with_fsdp reduces gradients in fp32


def loads_layer_by_layer(cfg: RecipeConfig) -> bool:
    """What training/layerwise.py loads so under fsdp: LoRA on a 4-bit base (a pre-quantized base, which it loads whole, is not known here)."""
    return cfg.method == "lora" and cfg.quant.load_in_4bit


def estimate_load_peak_bytes(cfg: RecipeConfig, parts: dict[str, int], gpus: int, context_bytes: int) -> int:
    """Per-GPU peak while an fsdp run of several processes loads its model; 0 for one GPU and ddp (their step holds it all).

    LoRA on a 4-bit base loads layer by layer (training/layerwise.py): each decoder layer is quantized,
    given its LoRA and sharded before the next, so a GPU holds at most
      its shards of every layer and of the embeddings (NF4, unquantized, LoRA: / N; in CPU RAM with
      dist.cpu_offload) + every layer's quantization constants (never sharded)
      + the larger of: the layer being built (its NF4 and LoRA whole, and the bf16 copy of its largest
        weight, on the device while it is quantized), or the root built last (head and final norm, whole
        until build_engine shards it)
      + the CUDA context (context_bytes) + NCCL.
    Other methods load the whole base on each GPU first: NF4 + constants + unquantized + trainable, whatever N.
    """
    if gpus == 1 or cfg.dist.strategy != "fsdp":
        return 0
    if not loads_layer_by_layer(cfg):
        return parts["nf4"] + parts["constants"] + parts["unquantized"] + parts["trainable_bytes"] + context_bytes + NCCL_BYTES
    sharded = 0 if cfg.dist.cpu_offload else math.ceil((parts["nf4"] + parts["unquantized"] - parts["root_frozen_bytes"] + parts["trainable_bytes"]) / gpus)
    layer = parts["largest_layer_frozen_bytes"] + parts["layer_trainable_params"] * parts["trainable_element_bytes"] + parts["largest_linear_bytes"]
    return sharded + parts["constants"] + max(layer, parts["root_frozen_bytes"]) + context_bytes + NCCL_BYTES


def forward_start_gather_bytes(root_bytes: int, embed_bytes: int) -> int:
    """What FSDP2 holds all-gathered at the start of a forward beyond the root's unsharded parameters.

    FSDP2 (torch 2.13, FSDPParamGroup.wait_for_unshard) keeps a unit's all-gather output alive in the forward
    until the next unit's copy-out has returned (the previous state is bound to a local name there, so
    clearing the attribute frees nothing until the function ends). At the input embeddings' copy-out a
    GPU then holds the root's unsharded parameters and its all-gather output, and the embeddings' output
    and unsharded copy: 4 x 1.96 GiB for a 70B (measured: 7.83 GiB transient on each of 2 processes,
    benchmarks/results/fsdp-loading-70b-step-cpu.md). Tied embeddings are in the root: its output alone.
    """
    return root_bytes + 2 * embed_bytes


def shard_static(cfg: RecipeConfig, parts: dict[str, int], gpus: int) -> dict[str, int]:
    """One GPU's share of the batch-independent parts: as planned for one GPU, for `ddp`, or for `fsdp` (FSDP2).

    fsdp (distributed.shard_with_fsdp: param_dtype the compute dtype, gradients reduced in fp32), with
    N = gpus and T the trainable parameters:
      NF4 / N, unquantized / N, constants whole (bitsandbytes' quant state is not a parameter: never sharded);
      trainable: T x dtype / N; optimizer: T x 8 (torch AdamW, fp32 moments) / N;
      gradients: T x dtype / N, but with grad_accum_steps > 1, T x 4: the micro-batches before a step's
        last run without gradient sync (distributed.gradient_sync), and FSDP2 then keeps every layer's
        gradient unsharded, accumulated in the reduce dtype (fp32), until the last one reduce-scatters it;
      gathered: the root (lm_head, final norm) whole, unsharded for the whole step, + the larger of
        2 decoder layers whole (frozen bytes, and their trainable part cast to the compute dtype), one running
        and one prefetched, and the forward's start (forward_start_gather_bytes: the root's all-gather output
        and the input embeddings' output and unsharded copy, all alive at once);
      unsharded gradients: one layer's, in the compute dtype and their fp32 copy for the reduce-scatter,
        and the root's (reduce-scattered only at the end of the backward).
    fsdp with dist.cpu_offload: the rows above that FSDP shards (NF4 / N, unquantized / N, trainable / N,
      the reduce-scattered gradients / N, optimizer / N) move to CPU RAM (`cpu`, per process, pinned) and are 0
      on the GPU; the constants, gathered, unsharded gradients and, with grad_accum_steps > 1, the unsharded
      fp32 accumulation (T x 4, still on the GPU) stay as they are.
    ddp: as one GPU, + buckets (one more copy of the gradients, in their dtype).
    Both: + NCCL's buffers (NCCL_BYTES).
    `cpu` is empty except under fsdp with dist.cpu_offload.
    """
    one = {
        "nf4": parts["nf4"], "constants": parts["constants"], "unquantized": parts["unquantized"],
        "trainable_bytes": parts["trainable_bytes"], "gradient_bytes": parts["gradient_bytes"], "optimizer_bytes": parts["optimizer_bytes"],
        "gathered": 0, "unsharded_gradients": 0, "buckets": 0, "nccl": 0, "cpu": {},
    }  # fmt: skip
    if gpus == 1:
        return one
    if cfg.dist.strategy == "ddp":
        return {**one, "buckets": parts["gradient_bytes"], "nccl": NCCL_BYTES}
    gathered_element = compute_element_bytes(cfg)  # FSDP's param_dtype
    gradient_element = gathered_element + FSDP_REDUCE_ELEMENT_BYTES  # computed in param_dtype, copied to fp32 for the reduce-scatter
    layer_params, root_params = parts["layer_trainable_params"], parts["root_trainable_params"]
    gathered_layers = parts["gathered_layers_frozen_bytes"] + min(FSDP_UNSHARDED_LAYERS, parts["layers"]) * layer_params * gathered_element
    accumulated = parts["trainable_params"] * FSDP_REDUCE_ELEMENT_BYTES if cfg.train.grad_accum_steps > 1 else 0
    sharded = {
        "nf4": math.ceil(parts["nf4"] / gpus), "unquantized": math.ceil(parts["unquantized"] / gpus),
        "trainable_bytes": math.ceil(parts["trainable_bytes"] / gpus), "gradient_bytes": math.ceil(parts["gradient_bytes"] / gpus),
        "optimizer_bytes": math.ceil(parts["adamw_optimizer_bytes"] / gpus),
    }  # fmt: skip
    if cfg.dist.cpu_offload:
        on_gpu = {key: 0 for key in sharded} | {"gradient_bytes": accumulated}
        cpu = {
            "weights": sharded["nf4"] + sharded["unquantized"], "trainable": sharded["trainable_bytes"],
            "gradients": sharded["gradient_bytes"], "optimizer": sharded["optimizer_bytes"],
        }  # fmt: skip
    else:
        on_gpu, cpu = {**sharded, "gradient_bytes": accumulated or sharded["gradient_bytes"]}, {}
    root = parts["root_frozen_bytes"] + root_params * gathered_element
    return {
        **on_gpu, "constants": parts["constants"],
        "gathered": root + max(gathered_layers, forward_start_gather_bytes(root, parts["embed_frozen_bytes"])),
        "unsharded_gradients": (layer_params + root_params) * gradient_element, "buckets": 0, "nccl": NCCL_BYTES, "cpu": cpu,
    }  # fmt: skip
