"""Will it fit? GPU memory of a QLoRA run estimated from the model's config.json alone.

The model is built on PyTorch's meta device (shapes, no storage), so every parameter's name
and shape are the real ones for any architecture transformers knows, and the recipe's
targets are resolved exactly as training resolves them; no weight is downloaded or loaded.
The estimate adds up:

- weights as loaded: NF4 linear weights at 4 bits plus their quantization constants
  (bitsandbytes blocks of 64: an fp32 scale each, or with double quantization a uint8 scale
  each plus an fp32 scale per 256 of those), and what stays unquantized (embeddings, lm_head,
  norms, biases) in the compute dtype;
- the trainable part (LoRA A/B, soft prompt, ...), its gradients, and the optimizer's two
  moments (1 byte each for 8-bit AdamW on tensors of 4096+ elements, 4 bytes otherwise);
- activations kept for the backward pass, per token and layer: with gradient checkpointing
  only each layer's input plus one layer's worth recomputed at a time, without it every layer's;
- the head and the loss (`train.loss`): transformers' loss (`hf`) holds three fp32 tensors of
  micro_batch x seq x vocab at once (for 128k-vocabulary models this rivals the weights); the
  chunked loss (the default) one chunk's logits, fp32 and bf16, plus the labelled hidden states
  and their gradient (see estimate_loss_bytes);
- with gradient checkpointing the loss's buffers are freed before the backward recomputes the
  first layer, so only the larger of the two counts (the `overlap_bytes` row takes the smaller off);
- a fixed allowance for the CUDA context and cuBLAS workspaces.

With several GPUs (`gpus` > 1, `dist.strategy`) the plan is per GPU (see plan_memory):

- `ddp`: every GPU holds what one GPU would, plus DDP's gradient buckets (a second copy of the
  trainable gradients) and NCCL's buffers;
- `fsdp` (FSDP2 `fully_shard` on each decoder layer, on embed_tokens unless tied to the head,
  then on the root that holds the head and the final norm): each GPU keeps 1/N of the 4-bit
  weights (stored as bf16, the same bytes), of the unquantized ones, of the trainable part, its
  gradients (but between the micro-batches of one step FSDP accumulates them unsharded, in fp32)
  and torch AdamW's fp32 moments; the quantization constants are not sharded. During the step
  the root stays all-gathered (the bf16 lm_head) and two decoder layers are (the one running and
  the one prefetched), and one layer's gradients exist unsharded before their reduce-scatter.
  Activations are those of one GPU at the same micro-batch.
- `fsdp` with `dist.cpu_offload` (FSDP2's CPUOffloadPolicy on every unit): the shards (4-bit and
  bf16 weights, the trainable part), their sharded gradients and AdamW's moments live in each
  process's CPU RAM, pinned, and AdamW steps there; the GPU keeps the quantization constants
  (whole: not parameters, never offloaded), the units all-gathered for the step (copied from the
  CPU first), the unsharded gradients and what does not depend on the weights' place. The plan
  adds the CPU RAM each process needs (`cpu_ram_bytes`).
- `fsdp`, loading (`load_peak_bytes`): train.fit loads the base with device_map {"": device} on every
  process, so each GPU first holds the WHOLE 4-bit base as one GPU loads it (weights as loaded of the
  gpus=1 plan), then the whole trainable part attached to it, with the CUDA context and NCCL's buffers
  (the starting adapter is broadcast before sharding); only then does shard_with_fsdp shard (and
  offload) it. That peak does not shrink with N, so `fits` needs both it and the step's peak to fit.
  Layer-by-layer loading (quantize a layer, shard it, free it) would remove it; it is not built yet.
  With one GPU or ddp the step holds the whole base anyway: load_peak_bytes is 0 there.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .activations import (
    choose_mlp_tile_tokens,
    compute_element_bytes,
    estimate_activation_bytes,
    estimate_mask_bytes,
    estimate_offload_host_bytes,
    estimate_recomputed_bytes,
    has_lean_norm,
)
from .config import OBJECTIVES, ModelConfig, RecipeConfig
from .errors import PlanError
from .memory import read_available_ram_bytes
from .methods.lora import find_linear_names
from .methods.table import get_method
from .gguf_base import is_gguf_name, read_gguf_config
from .model_paths import resolve_model_path
from .sharding import FSDP_UNSHARDED_LAYERS, estimate_load_peak_bytes, loads_layer_by_layer, shard_static

GIB = 1024**3
NF4_BLOCK = 64  # weights per quantization block (bitsandbytes' default for 4-bit)
DOUBLE_QUANT_BLOCK = 256  # first-level scales per second-level block
CUDA_CONTEXT_BYTES = int(0.75 * GIB)  # CUDA context + cuBLAS/cuDNN workspaces, measured ~0.5-0.9 GiB on recent GPUs
BNB_8BIT_MIN_SIZE = 4096  # bitsandbytes keeps 32-bit optimizer state for smaller tensors
# train.loss hf, bytes per token x vocab at its peak (the backward of the loss), measured with the
# meter: the fp32 log-softmax saved by the forward, nll_loss's fp32 gradient and log-softmax's fp32
# gradient. The bf16 logits and their fp32 copy are gone by then (only the loss leaves the model).
LOGIT_BYTES = 4 + 4 + 4
# train.loss chunked, bytes per token x vocab of one chunk (loss.compute_chunk): the fp32 logits,
# softmaxed in place, and one copy in the compute dtype (the bf16 logits, then the bf16 gradient).
CHUNK_LOGIT_BYTES = 4 + 2
CHUNK_SOFTCAP_BYTES = 2  # Gemma's softcapping keeps tanh (fp32) and makes its own bf16 cast: measured 8 in all
NORM_FP32_BYTES = 4  # the final RMSNorm's fp32 input, kept for its backward while the loss runs

KNOWN_CONFIGS_DIR = Path(__file__).parent / "known_configs"


@dataclass
class MemoryPlan:
    """Estimated peak GPU memory of one training step, by part (bytes)."""

    weights_bytes: int  # the frozen base as loaded (NF4 + constants + unquantized parts)
    nf4_bytes: int
    quant_constant_bytes: int
    unquantized_bytes: int
    trainable_params: int
    trainable_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    logits_bytes: int  # the head and the loss at their own peak (train.loss: hf or chunked)
    overlap_bytes: int  # <= 0: with checkpointing, the loss's peak and the recomputed layer's never coincide; the smaller is taken off
    cuda_context_bytes: int
    total_bytes: int
    vram_bytes: int
    fits: bool
    micro_batch_size: int  # with micro_batch_auto, what auto picks (auto_micro_batch), or 1 where training refuses auto
    max_seq_len: int
    largest_micro_batch: int = 0
    largest_seq_len: int = 0
    context_len: int | None = None  # the model's max_position_embeddings: largest_seq_len never exceeds it
    seq_len_capped_by_context: bool = False  # memory would allow more than the model's context
    loss: str = "chunked"  # train.loss the logits row is for
    loss_chunk_tokens: int = 512
    notes: list[str] = field(default_factory=list)
    # Several GPUs: every other field is then per GPU. Zero with one GPU.
    gpus: int = 1
    strategy: str | None = None  # dist.strategy when gpus > 1
    grad_accum_steps: int = 1
    gathered_bytes: int = 0  # fsdp: parameters all-gathered at the peak (the root with lm_head, 2 decoder layers)
    unsharded_gradient_bytes: int = 0  # fsdp: one layer's (and the root's) gradients before their reduce-scatter
    bucket_bytes: int = 0  # ddp: the gradient buckets the all-reduce runs on
    nccl_bytes: int = 0
    # fsdp with dist.cpu_offload: what each process keeps in CPU RAM (pinned) instead of on its GPU. Zero otherwise.
    cpu_offload: bool = False
    cpu_weights_bytes: int = 0  # 1/N of the 4-bit (stored as the compute dtype) and unquantized weights
    cpu_trainable_bytes: int = 0  # 1/N of the trainable part
    cpu_gradient_bytes: int = 0  # 1/N of its gradients (reduce-scattered, copied to the CPU)
    cpu_optimizer_bytes: int = 0  # 1/N of torch AdamW's two fp32 moments (the step runs on the CPU)
    cpu_ram_bytes: int = 0  # the sum of the four: CPU RAM per process
    # fsdp with several GPUs: the per-GPU peak while loading, before FSDP shards anything (see estimate_load_peak_bytes).
    # Zero with one GPU and under ddp, whose step already holds the whole base.
    load_peak_bytes: int = 0
    load_base_bytes: int = 0  # of which the whole base as one GPU loads it (the weights as loaded of the gpus=1 plan)
    step_fits: bool = True  # total_bytes <= vram_bytes (the training step); `fits` also needs load_peak_bytes <= vram_bytes
    micro_batch_auto: bool = False  # the recipe says train.micro_batch_size auto: micro_batch_size is what training would pick for vram_bytes
    # Long context (model.activation_offload, model.tiled_mlp), as resolved for this plan.
    mask_bytes: int = 0  # of activation_bytes, the (micro_batch, 1, T, T) attention mask transformers builds for sdpa and eager
    activation_offload: bool = False
    host_ram_bytes: int = 0  # pinned host memory the offloaded layer inputs need
    mlp_tile_tokens: int = 0  # tokens per tile of the tiled MLP; 0: not tiled
    longest_context: int = 0  # the longest sequence at micro-batch 1 without activation offload (model.tiled_mlp as set)
    longest_context_offloaded: int = 0  # the same with activation offload
    sequences_per_example: int = 1  # 2 for a pair objective: chosen and rejected run in one forward (config.OBJECTIVES)
    load_layerwise: bool = False  # fsdp loading builds one decoder layer at a time (LoRA on a 4-bit base: training/layerwise.py)

    def to_dict(self) -> dict:
        return asdict(self)


def read_model_config(name_or_path: str):
    """A transformers config from a local folder, a shipped known config, or the hub (where reachable).

    The name is resolved as training resolves it (resolve_model_path): an empty one is refused in the same
    words, `demo:...` is the demo base's folder.
    """
    from transformers import AutoConfig

    if is_gguf_name(name_or_path):  # from the file's metadata: nothing dequantized
        return read_gguf_config(name_or_path)
    local = Path(resolve_model_path(ModelConfig(name_or_path=name_or_path)))
    known = KNOWN_CONFIGS_DIR / (name_or_path.split("/")[-1] + ".json")
    if (local / "config.json").is_file():
        return AutoConfig.from_pretrained(str(local))
    if known.is_file():
        raw = json.loads(known.read_text())
        return AutoConfig.for_model(raw.pop("model_type"), **raw)
    try:
        return AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        shipped = sorted(p.stem for p in KNOWN_CONFIGS_DIR.glob("*.json"))
        raise PlanError(
            f"cannot read the config of {name_or_path!r} ({type(err).__name__}); pass a local folder with config.json "
            f"or one of the shipped configs: {', '.join(shipped)}"
        ) from err


def build_meta_model(model_config) -> nn.Module:
    """The model with shapes and names but no storage: nothing is allocated or downloaded."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def plan_memory(cfg: RecipeConfig, model_config=None, vram_bytes: int = 24 * GIB, gpus: int = 1) -> MemoryPlan:
    """Estimate the peak GPU memory of training cfg, and whether it fits in vram_bytes.

    With train.micro_batch_size auto, the plan is made at the micro-batch training would pick for
    vram_bytes and gpus (auto_micro_batch, as choose_micro_batch does), or at 1 where training would
    refuse auto (nothing fits, or an fsdp run's loading does not); micro_batch_auto says so. With gpus > 1 the
    plan is per GPU, for cfg.dist.strategy (each process runs its own micro-batches of
    train.micro_batch_size); vram_bytes is then one GPU's memory. gpus 1 plans one process,
    whatever dist.strategy says.
    """
    if gpus < 1:
        raise PlanError(f"--gpus {gpus}: the number of GPUs (processes) must be at least 1")
    if cfg.dist.cpu_offload and cfg.dist.strategy != "fsdp":
        raise PlanError(
            f"dist.cpu_offload moves FSDP's shards to the CPU; it needs dist.strategy=fsdp (the recipe says {cfg.dist.strategy}, "
            "which keeps the whole model on every GPU, and training refuses it)"
        )
    model_config = model_config if model_config is not None else read_model_config(cfg.model.name_or_path)
    model = build_meta_model(model_config)
    parts = estimate_static(cfg, model)

    def plan_at(micro_batch: int, seq_len: int, offload: bool = False, tiled: bool = False) -> MemoryPlan:
        return assemble(cfg, model_config, parts, micro_batch, seq_len, vram_bytes, gpus, offload, tiled)

    def plan_as_set(micro_batch: int, seq_len: int) -> MemoryPlan:
        """The step with model.tiled_mlp and model.activation_offload as set; `auto` turns one on only where the step does
        not fit without it: the tiled MLP first (it costs a recompute of the MLP), then the offload (host copies). With
        several processes auto stays off (neither is yet measured under DDP or FSDP2; `true` turns them on)."""
        offload_setting, tiled_setting = cfg.model.activation_offload, cfg.model.tiled_mlp
        offload_auto = offload_setting == "auto" and gpus == 1
        tiled_auto = tiled_setting == "auto" and gpus == 1
        tiles, offload = tiled_setting is True, offload_setting is True
        plan = plan_at(micro_batch, seq_len, offload, tiles)
        for more_tiles, more_offload in ((tiled_auto, False), (tiled_auto, offload_auto)):
            if plan.step_fits or not (more_tiles or more_offload):
                break
            candidate = plan_at(micro_batch, seq_len, offload or more_offload, tiles or more_tiles)
            if candidate.step_fits:
                return candidate
        return plan

    auto = cfg.train.micro_batch_size == "auto"
    batch = 1 if auto else cfg.train.micro_batch_size
    plan = plan_as_set(batch, cfg.train.max_seq_len)
    # The largest micro-batch and the longest sequence are the step's: loading does not depend on them. `auto` never
    # tiles or offloads to buy a larger micro-batch (each slows every step; accumulate instead), only a step that would not fit.
    largest = search_largest(lambda b: plan_at(b, cfg.train.max_seq_len, cfg.model.activation_offload is True, cfg.model.tiled_mlp is True).step_fits)
    plan.largest_micro_batch = largest = max(largest, batch if plan.step_fits else 0)  # at least the step as set, autos on where needed
    if auto:
        batch = auto_micro_batch(plan) or 1
        plan = plan_as_set(batch, cfg.train.max_seq_len)
        plan.largest_micro_batch, plan.micro_batch_auto = largest, True
    # A model cannot attend past its context length, whatever memory would allow.
    plan.context_len = getattr(model_config, "max_position_embeddings", None)
    seq_limit = plan.context_len or 1 << 20

    def fits_seq(seq_len: int) -> bool:
        return plan_as_set(batch, seq_len).step_fits

    plan.largest_seq_len = search_largest(fits_seq, step=64, limit=seq_limit)
    if plan.context_len and plan.largest_seq_len and fits_seq(plan.context_len):
        plan.largest_seq_len, plan.seq_len_capped_by_context = plan.context_len, True
    if cfg.model.gradient_checkpointing:  # at micro-batch 1, the MLP tiled where needed (unless tiled_mlp is false)
        tiles = cfg.model.tiled_mlp is not False
        plan.longest_context = search_largest(lambda t: plan_at(1, t, False, tiles).step_fits, step=64, limit=seq_limit)
        plan.longest_context_offloaded = search_largest(lambda t: plan_at(1, t, True, tiles).step_fits, step=64, limit=seq_limit)
    if get_method(cfg.method).plan_note:
        plan.notes.append(f"method {cfg.method}: {get_method(cfg.method).plan_note}")
    if OBJECTIVES[cfg.objective.name].reference:  # its log-probs come from a no-grad pass before step 1: below the step's peak
        plan.notes.append(f"objective {cfg.objective.name}: no reference model; its log-probs are computed once before the first step and cached")
    if cfg.train.batching == "grouped" and not cfg.data.packing:
        plan.notes.append("planned for every sequence at max_seq_len (the worst micro-batch); grouped batching pads ~5%, so most steps need less")
    plan.notes += describe_distributed_notes(cfg, plan)
    return plan


def describe_distributed_notes(cfg: RecipeConfig, plan: MemoryPlan) -> list[str]:
    """What a per-GPU plan assumes, and a one-GPU plan of an fsdp recipe leaves out."""
    if plan.gpus == 1:
        if cfg.dist.strategy == "fsdp":
            offload = " (and dist.cpu_offload offloads only shards)" if cfg.dist.cpu_offload else ""
            return [f"dist.strategy fsdp shards only with several processes{offload}: this is one GPU's plan (add --gpus N for the per-GPU one)"]
        return []
    known = not plan.micro_batch_auto or auto_micro_batch(plan) > 0  # auto that training refuses has no size
    batch = f"{plan.micro_batch_size}" if known else "micro-batch"
    notes = [
        f"effective batch: {batch} x {cfg.train.grad_accum_steps} accumulation steps x {plan.gpus} processes"
        + (f" = {plan.micro_batch_size * cfg.train.grad_accum_steps * plan.gpus} sequences per optimizer step" if known else "")
    ]
    if plan.strategy == "fsdp" and cfg.train.optimizer != "adamw":
        notes.append(f"dist.strategy fsdp runs torch AdamW (bitsandbytes' 8-bit and paged optimizers do not take sharded tensors): planned with fp32 moments; set train.optimizer=adamw (the recipe says {cfg.train.optimizer})")
    return notes


def estimate_static(cfg: RecipeConfig, model: nn.Module) -> dict[str, int]:
    """Weight, trainable-parameter, gradient and optimizer bytes (independent of batch and sequence)."""
    method = get_method(cfg.method)
    settings = method.settings(cfg)
    compute = compute_element_bytes(cfg)
    quantized = set(find_linear_names(model)) if cfg.quant.load_in_4bit else set()
    if method.unquantized_modules(settings):
        quantized = {n for n in quantized if not any(n == m or n.endswith("." + m) for m in method.unquantized_modules(settings))}
    nf4 = constants = unquantized = largest_linear = 0
    unit_of = find_fsdp_unit_of(model)
    unit_bytes: dict[str, int] = {}  # frozen bytes (NF4 + unquantized) per FSDP unit: root, embed, layer.<i>
    seen: set[int] = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied embeddings are stored once
            continue
        seen.add(id(param))
        module_name, _, leaf = name.rpartition(".")
        if module_name in quantized and leaf == "weight":
            stored = param.numel() // 2
            largest_linear = max(largest_linear, param.numel())
            nf4 += stored
            constants += count_quant_constant_bytes(param.numel(), cfg.quant.double_quant)
        else:
            stored = param.numel() * compute
            unquantized += stored
        unit = unit_of(name)
        unit_bytes[unit] = unit_bytes.get(unit, 0) + stored
    trainable = method.count_trainable(settings, model)
    dtype_bytes = {"bfloat16": 2, "float16": 2, "float32": 4}
    trainable_dtype = method.trainable_dtype(settings)
    trainable_bytes = sum(trainable) * dtype_bytes[trainable_dtype]
    optimizer = estimate_optimizer_bytes(trainable, cfg.train.optimizer)
    head = model.get_output_embeddings()
    head_names = [n for n, p in model.named_parameters(remove_duplicate=False) if head is not None and p is head.weight]
    head_trains = method.trains_head(settings, head_names)
    # FSDP: the trainable part of the root (a trained head) and of one decoder layer (the rest, spread evenly).
    layer_units = sorted((b for u, b in unit_bytes.items() if u.startswith("layer.")), reverse=True)
    root_trainable = head.weight.numel() if head_trains and head is not None else 0
    layer_trainable = math.ceil((sum(trainable) - root_trainable) / max(len(layer_units), 1))
    return {
        "head_trains": head_trains,
        "nf4": nf4, "constants": constants, "unquantized": unquantized, "trainable_params": sum(trainable),
        "trainable_bytes": trainable_bytes, "gradient_bytes": trainable_bytes, "optimizer_bytes": optimizer,
        "adamw_optimizer_bytes": estimate_optimizer_bytes(trainable, "adamw"),
        "root_frozen_bytes": unit_bytes.get("root", 0), "embed_frozen_bytes": unit_bytes.get("embed", 0),
        "gathered_layers_frozen_bytes": sum(layer_units[:FSDP_UNSHARDED_LAYERS]), "layers": len(layer_units),
        "root_trainable_params": root_trainable, "layer_trainable_params": layer_trainable,
        "largest_layer_frozen_bytes": layer_units[0] if layer_units else 0, "largest_linear_bytes": largest_linear * compute,
        "trainable_element_bytes": dtype_bytes[trainable_dtype],
    }  # fmt: skip


def find_fsdp_unit_of(model: nn.Module):
    """A function from parameter name to the FSDP2 unit that shards it, as distributed training wraps the model:
    `layer.<i>` for each decoder layer, `embed` for the input embeddings (unless tied to the head), `root` for
    everything else (lm_head, the final norm)."""
    layers_prefix = find_decoder_layers_prefix(model)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = head is not None and embed is not None and head.weight is embed.weight
    embed_names = set() if tied or embed is None else {n for n, p in model.named_parameters() if p is embed.weight}

    def unit_of(name: str) -> str:
        if layers_prefix is not None and name.startswith(layers_prefix + "."):
            return "layer." + name[len(layers_prefix) + 1 :].split(".", 1)[0]
        return "embed" if name in embed_names else "root"

    return unit_of


def find_decoder_layers_prefix(model: nn.Module) -> str | None:
    """The module path of the decoder layers (`model.layers` for Llama): the ModuleList of num_hidden_layers blocks."""
    count = getattr(model.config, "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name
    return None


def count_quant_constant_bytes(numel: int, double_quant: bool) -> int:
    """Bytes of bitsandbytes' per-block scales and code tables for one NF4 weight of numel values."""
    blocks = math.ceil(numel / NF4_BLOCK)
    code = 16 * 4  # the 16 NF4 levels, fp32
    if not double_quant:
        return blocks * 4 + code
    second = math.ceil(blocks / DOUBLE_QUANT_BLOCK)
    return blocks + code + second * 4 + 256 * 4 + 4  # uint8 scales, their fp32 scales, 8-bit code table, offset


def estimate_loss_bytes(cfg: RecipeConfig, model_config, micro_batch: int, seq_len: int, head_trains: bool = False) -> int:
    """Bytes the LM head and the loss hold at their peak, for train.loss (loss.py), every token labelled.

    hf:      tokens x (LOGIT_BYTES x vocab + 4 x hidden)
    chunked: min(N, chunk) x vocab x 6 (8 with softcapping) + 2 x N x hidden x element bytes
             + tokens x 4 x hidden [+ vocab x hidden x element bytes when the head trains]

    tokens = micro_batch x seq_len positions the decoder runs (soft prompt included); N =
    micro_batch x max_seq_len labelled ones (the worst case; prompt tokens and padding are
    dropped before the head). The chunked loss's 2 x N x hidden are the labelled hidden states
    (a copy made by the boolean selection) and their gradient, computed in the forward and kept
    for the backward; the head's weight gradient is accumulated there too when it trains.
    Both paths keep the final norm's fp32 input (NORM_FP32_BYTES x hidden per token), except where training
    uses the lean RMSNorm (activations.has_lean_norm), which keeps the bf16 input and an fp32 rstd per token.
    """
    element = compute_element_bytes(cfg)
    vocab, hidden = model_config.vocab_size, model_config.hidden_size
    tokens = micro_batch * seq_len
    norm = 0 if has_lean_norm(model_config) else tokens * hidden * NORM_FP32_BYTES
    if cfg.train.loss == "hf":
        return tokens * vocab * LOGIT_BYTES + norm
    labelled = micro_batch * cfg.train.max_seq_len
    per_logit = CHUNK_LOGIT_BYTES + (CHUNK_SOFTCAP_BYTES if getattr(model_config, "final_logit_softcapping", None) else 0)
    chunk = min(labelled, cfg.train.loss_chunk_tokens) * vocab * per_logit
    head_grad = vocab * hidden * element if head_trains else 0
    return chunk + 2 * labelled * hidden * element + norm + head_grad


def assemble(
    cfg: RecipeConfig, model_config, parts: dict[str, int], micro_batch: int, seq_len: int, vram_bytes: int, gpus: int = 1,
    offload: bool = False, tiled: bool = False,
) -> MemoryPlan:  # fmt: skip
    method = get_method(cfg.method)
    virtual = method.virtual_tokens(method.settings(cfg))
    tokens_seq = seq_len + virtual
    element = compute_element_bytes(cfg)
    checkpointing = cfg.model.gradient_checkpointing
    offload = offload and checkpointing
    plan_batch = micro_batch
    # A pair objective runs chosen and rejected of each pair in one forward: twice the rows of the micro-batch.
    micro_batch *= OBJECTIVES[cfg.objective.name].sequences
    tokens = micro_batch * tokens_seq
    tile_tokens = choose_mlp_tile_tokens(model_config) if tiled else 0
    tile_tokens = tile_tokens if tokens > tile_tokens else 0  # one tile or less: the MLP runs whole
    activations = estimate_activation_bytes(model_config, micro_batch, tokens_seq, checkpointing, element, offload, tile_tokens)
    loss_cfg = cfg if seq_len == cfg.train.max_seq_len else _with_max_seq_len(cfg, seq_len)
    logits = estimate_loss_bytes(loss_cfg, model_config, micro_batch, tokens_seq, parts.get("head_trains", False))
    # With checkpointing the loss runs (forward and, for hf, backward) before the backward
    # recomputes the last layer, and frees its buffers first: the two peaks never coincide
    # (measured with the meter). Without it every layer's activations are alive during the loss.
    mask = estimate_mask_bytes(cfg, micro_batch, tokens_seq)
    activations += mask  # built before the first layer, read by every one, kept to the end of the backward
    recomputed = estimate_recomputed_bytes(model_config, tokens, element, tile_tokens)
    overlap = -min(recomputed, logits) if checkpointing else 0
    static = shard_static(cfg, parts, gpus)
    load_peak = estimate_load_peak_bytes(cfg, parts, gpus, CUDA_CONTEXT_BYTES)
    layerwise = bool(load_peak) and loads_layer_by_layer(cfg)
    cpu = static["cpu"]
    weights = static["nf4"] + static["constants"] + static["unquantized"]
    total = (
        weights + static["trainable_bytes"] + static["gradient_bytes"] + static["optimizer_bytes"] + activations + logits + overlap + CUDA_CONTEXT_BYTES
        + static["gathered"] + static["unsharded_gradients"] + static["buckets"] + static["nccl"]
    )  # fmt: skip
    return MemoryPlan(
        weights_bytes=weights, nf4_bytes=static["nf4"], quant_constant_bytes=static["constants"], unquantized_bytes=static["unquantized"],
        trainable_params=parts["trainable_params"], trainable_bytes=static["trainable_bytes"], gradient_bytes=static["gradient_bytes"],
        optimizer_bytes=static["optimizer_bytes"], activation_bytes=activations, logits_bytes=logits, overlap_bytes=overlap,
        cuda_context_bytes=CUDA_CONTEXT_BYTES, total_bytes=total, vram_bytes=vram_bytes, fits=total <= vram_bytes and load_peak <= vram_bytes,
        micro_batch_size=plan_batch, max_seq_len=seq_len, loss=cfg.train.loss, loss_chunk_tokens=cfg.train.loss_chunk_tokens,
        gpus=gpus, strategy=cfg.dist.strategy if gpus > 1 else None, grad_accum_steps=cfg.train.grad_accum_steps, gathered_bytes=static["gathered"],
        unsharded_gradient_bytes=static["unsharded_gradients"], bucket_bytes=static["buckets"], nccl_bytes=static["nccl"],
        cpu_offload=bool(cpu), cpu_weights_bytes=cpu.get("weights", 0), cpu_trainable_bytes=cpu.get("trainable", 0),
        cpu_gradient_bytes=cpu.get("gradients", 0), cpu_optimizer_bytes=cpu.get("optimizer", 0), cpu_ram_bytes=sum(cpu.values()),
        load_peak_bytes=load_peak, load_base_bytes=parts["nf4"] + parts["constants"] + parts["unquantized"] if load_peak and not layerwise else 0, step_fits=total <= vram_bytes,
        activation_offload=offload, mlp_tile_tokens=tile_tokens, mask_bytes=mask, sequences_per_example=micro_batch // plan_batch, load_layerwise=layerwise,
        host_ram_bytes=estimate_offload_host_bytes(model_config, micro_batch, tokens_seq, element) if offload else 0,
    )  # fmt: skip


def _with_max_seq_len(cfg: RecipeConfig, seq_len: int) -> RecipeConfig:
    """cfg planned at another sequence length (the search for the longest one)."""
    import copy

    other = copy.copy(cfg)
    other.train = copy.copy(cfg.train)
    other.train.max_seq_len = seq_len
    return other


def estimate_optimizer_bytes(numels: list[int], optimizer: str) -> int:
    """AdamW's two moments for tensors of these sizes: 1 byte each in 8-bit (bitsandbytes keeps
    small tensors in 32-bit), else 4."""
    eight_bit = "8bit" in optimizer
    return sum(2 * n * (1 if eight_bit and n >= BNB_8BIT_MIN_SIZE else 4) for n in numels)


def search_largest(fits, step: int = 1, limit: int = 1 << 20) -> int:
    """The largest multiple of step (up to limit) for which fits() holds; 0 when even step does not fit."""
    if not fits(step):
        return 0
    low, high = 1, 2
    while high * step <= limit and fits(high * step):
        low, high = high, high * 2
    high = min(high, limit // step + 1)  # never test past the limit
    while high - low > 1:  # fits(low * step) holds, fits(high * step) does not (or is past the limit)
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid * step) else (low, mid)
    return low * step


AUTO_MAX_MICRO_BATCH = 64  # beyond this, more sequences per pass rarely speed anything up; accumulate instead


def read_device_memory_bytes(device: torch.device) -> int:
    """Memory a run may plan for: the GPU's total, or on the CPU the RAM available now."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    available = read_available_ram_bytes()
    if available is None:
        raise PlanError("train.micro_batch_size auto on the CPU needs the available RAM (/proc/meminfo), which this system does not show; set a number")
    return available


def auto_micro_batch(plan: MemoryPlan) -> int:
    """train.micro_batch_size auto for a plan's vram_bytes and gpus: the largest micro-batch whose step fits,
    at most AUTO_MAX_MICRO_BATCH; 0 where training refuses auto (even 1 does not fit, or loading does not)."""
    if plan.load_peak_bytes > plan.vram_bytes or plan.largest_micro_batch == 0:
        return 0
    return min(plan.largest_micro_batch, AUTO_MAX_MICRO_BATCH)


def describe_auto_micro_batch(plan: MemoryPlan) -> str:
    """The line that says what train.micro_batch_size auto becomes for this plan's memory, and why."""
    memory = f"{plan.vram_bytes / GIB:.1f} GiB" + (" per GPU" if plan.gpus > 1 else "")
    size = auto_micro_batch(plan)
    if plan.load_peak_bytes > plan.vram_bytes:
        why = f"none: loading does not fit {memory} (the loading peak below); training refuses auto (planned below at 1)"
    elif size == 0:
        why = f"none: not even 1 sequence of {plan.max_seq_len} tokens fits {memory}; training refuses auto (planned below at 1)"
    elif size < plan.largest_micro_batch:
        why = f"{size}: the most auto takes ({plan.largest_micro_batch} would fit {memory})"
    else:
        why = f"{size}: the largest that fits {memory}"
    return f"train.micro_batch_size auto -> {why}"


def choose_micro_batch(cfg: RecipeConfig, device: torch.device, base_path: str | None = None, gpus: int = 1) -> tuple[int, MemoryPlan]:
    """train.micro_batch_size auto: the largest micro-batch the planner says fits this device (auto_micro_batch).

    gpus: the number of processes (the world size) the run is split over, each planned per GPU.
    """
    vram = read_device_memory_bytes(device)
    plan = plan_memory(cfg, read_model_config(base_path or cfg.model.name_or_path), vram, gpus=gpus)
    if plan.load_peak_bytes > vram:
        raise PlanError(f"train.micro_batch_size auto: {describe_load_limit(plan)}; this device has {vram / GIB:.1f} GiB (run qlora-lite plan for the breakdown)")
    if plan.largest_micro_batch == 0:
        raise PlanError(
            f"train.micro_batch_size auto: even one sequence of {cfg.train.max_seq_len} tokens needs an estimated "
            f"{plan.total_bytes / GIB:.1f} GiB and this device has {vram / GIB:.1f} GiB; lower train.max_seq_len or use a "
            "smaller model (run qlora-lite plan for the breakdown)"
        )
    return auto_micro_batch(plan), plan


@dataclass
class LongContext:
    """What a run does for long sequences: model.activation_offload and model.tiled_mlp as the planner resolves them."""

    activation_offload: bool
    mlp_tile_tokens: int  # 0: the MLP is not tiled
    host_ram_bytes: int = 0  # pinned host memory the offloaded inputs need


def plan_long_context(cfg: RecipeConfig, model_config, vram_bytes: int | None, gpus: int = 1, available_ram_bytes: int | None = None) -> LongContext:
    """model.activation_offload and model.tiled_mlp resolved for a run, and a step the plan says cannot fit refused.

    vram_bytes: the GPU's memory; None on the CPU, where nothing is refused and `auto` offload stays off (there is no
    other memory to move to). available_ram_bytes: the host RAM the offloaded inputs may take (checked on a GPU).
    """
    plan = plan_memory(cfg, model_config, vram_bytes if vram_bytes is not None else 1 << 60, gpus=gpus)
    if vram_bytes is not None and not plan.step_fits:
        raise PlanError(describe_too_long(cfg, plan))
    # With no memory limit the step fits as set, so auto stays off and only `true` turns offload on.
    offload, host = plan.activation_offload, plan.host_ram_bytes
    if offload and vram_bytes is not None and available_ram_bytes is not None and host > available_ram_bytes:
        raise PlanError(
            f"model.activation_offload keeps {host / GIB:.1f} GiB of layer inputs in pinned host memory at micro-batch {plan.micro_batch_size} x "
            f"{plan.max_seq_len} tokens, and this machine has {available_ram_bytes / GIB:.1f} GiB of RAM available; lower train.max_seq_len "
            "or the micro-batch, or free RAM"
        )
    return LongContext(offload, plan.mlp_tile_tokens, host)


def describe_too_long(cfg: RecipeConfig, plan: MemoryPlan) -> str:
    """The one-line refusal of a step the planner says does not fit: the estimate, the longest that fits, and the fix."""
    at_one = f"at micro-batch 1: {plan.longest_context:,} tokens without activation offload, {plan.longest_context_offloaded:,} with it"
    fix = "lower train.max_seq_len" + (" or train.micro_batch_size" if plan.micro_batch_size > 1 else "")
    if cfg.model.activation_offload is False and plan.longest_context_offloaded > plan.longest_context:
        fix += ", or set model.activation_offload=auto"
    return (
        f"train.max_seq_len {plan.max_seq_len:,} at micro-batch {plan.micro_batch_size} needs an estimated {plan.total_bytes / GIB:.1f} GiB "
        f"and this GPU has {plan.vram_bytes / GIB:.1f} GiB; the longest that fits is {plan.largest_seq_len:,} tokens ({at_one}); {fix} "
        "(qlora-lite plan shows the breakdown)"
    )


def parse_bytes(text: str) -> int:
    """`24GiB`, `24GB`, `80g`, `16000MiB` -> bytes (GB read as GiB, as GPU makers' labels mean it)."""
    units = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": 2**20, "mb": 2**20, "mib": 2**20, "t": 1024 * GIB, "tb": 1024 * GIB, "tib": 1024 * GIB}
    number = text.strip().lower()
    digits = "".join(c for c in number if c.isdigit() or c == ".")
    unit = number[len(digits):].strip()
    if not digits or unit not in units:
        raise PlanError(f"--vram {text!r} is not a size such as 24GiB, 16GB or 80g")
    return int(float(digits) * units[unit])


def describe_loss(plan: MemoryPlan) -> str:
    """The detail of the "logits and loss" row: which loss, and what it holds."""
    if plan.loss == "hf":
        return "train.loss hf: micro-batch x seq x vocab, 3 fp32 tensors (log-softmax and two gradients)"
    return f"train.loss chunked: {plan.loss_chunk_tokens} labelled tokens x vocab at a time, fp32 + bf16; hidden gradients"


def describe_sharding(plan: MemoryPlan) -> dict[str, str]:
    """Per row, what a per-GPU plan holds of it: sharded 1/N (fsdp), whole on every GPU (ddp), or nothing to add (one GPU)."""
    n = plan.gpus
    if n == 1:
        return {}
    if plan.strategy == "ddp":
        return {
            "weights as loaded": "; the whole base on every GPU (DDP replicates)",
            "trainable parameters": ", whole on every GPU",
        }
    accumulated = "fp32, unsharded: accumulated by FSDP between micro-batches until the step's last reduce-scatters them"
    if plan.cpu_offload:
        offloaded = f"1/{n} per process in CPU RAM (dist.cpu_offload)"
        return {
            "weights as loaded": (
                f"quantization constants, whole on every GPU; the NF4 and bf16 weights ({plan.cpu_weights_bytes / GIB:.2f} GiB) offloaded: {offloaded}"
            ),
            "all-gathered weights": ", copied from CPU RAM for their all-gather",
            "trainable parameters": f", offloaded: {offloaded}",
            "their gradients": (f"{accumulated}; the reduce-scattered ones offloaded" if plan.grad_accum_steps > 1 else f"reduce-scattered and offloaded: {offloaded}"),
            "optimizer state": f" (torch AdamW, fp32; it steps on the CPU), offloaded: {offloaded}",
        }
    return {
        "weights as loaded": f"; 1/{n} per GPU (FSDP shards), constants whole",
        "trainable parameters": f", 1/{n} per GPU",
        "their gradients": accumulated if plan.grad_accum_steps > 1 else f"1/{n} per GPU (reduce-scattered)",
        "optimizer state": f" (torch AdamW, fp32), 1/{n} per GPU",
    }


def describe_load_limit(plan: MemoryPlan) -> str:
    """Why loading an fsdp run needs more than its step, and what it takes, in one clause."""
    trainable = plan.load_peak_bytes - plan.load_base_bytes - plan.cuda_context_bytes - plan.nccl_bytes
    needs = f"needs GPUs of at least {max(plan.load_peak_bytes, plan.total_bytes) / GIB:.2f} GiB"
    if plan.load_layerwise:
        return f"loading layer by layer holds this GPU's shards, every layer's quantization constants and one layer whole; {needs}"
    return (
        f"loading puts the whole 4-bit base ({plan.load_base_bytes / GIB:.2f} GiB) and trainable part ({trainable / GIB:.2f} GiB) on each GPU before FSDP shards them; "
        f"{needs} (layer-by-layer loading covers LoRA on a 4-bit base)"
    )


def format_plan(plan: MemoryPlan, model_name: str) -> str:
    def gib(n: int) -> str:
        return f"{n / GIB:6.2f} GiB"

    shard = describe_sharding(plan)
    weights = f"NF4 {plan.nf4_bytes / GIB:.2f} + constants {plan.quant_constant_bytes / GIB:.2f} + unquantized {plan.unquantized_bytes / GIB:.2f} GiB"
    rows = [
        ("weights as loaded", plan.weights_bytes, shard["weights as loaded"] if plan.cpu_offload else weights + shard.get("weights as loaded", "")),
        ("all-gathered weights", plan.gathered_bytes, "the root (lm_head, final norm) for the whole step + the larger of 2 decoder layers (running, prefetched) and the forward's start (the root's and the input embeddings' all-gather buffers)" + shard.get("all-gathered weights", "")),
        ("trainable parameters", plan.trainable_bytes, f"{plan.trainable_params:,} parameters" + shard.get("trainable parameters", "")),
        ("their gradients", plan.gradient_bytes, shard.get("their gradients", "")),
        ("unsharded gradients", plan.unsharded_gradient_bytes, "one layer's, in the compute dtype and in fp32 for the reduce-scatter"),
        ("gradient buckets", plan.bucket_bytes, "DDP's all-reduce buckets: a second copy of the gradients"),
        ("optimizer state", plan.optimizer_bytes, "two AdamW moments" + shard.get("optimizer state", "")),
        ("activations", plan.activation_bytes, f"micro-batch {plan.micro_batch_size}{' pairs x 2 sequences' if plan.sequences_per_example == 2 else ''} x {plan.max_seq_len} tokens" + (" on each GPU" if plan.gpus > 1 else "") + describe_long_context(plan)),
        ("logits and loss", plan.logits_bytes, describe_loss(plan)),
        ("not at the same time", plan.overlap_bytes, "the loss's buffers are freed before the backward recomputes a layer"),
        ("CUDA context", plan.cuda_context_bytes, "fixed allowance"),
        ("NCCL buffers", plan.nccl_bytes, "allowance for the communicator"),
    ]
    optional = {"not at the same time", "all-gathered weights", "unsharded gradients", "gradient buckets", "NCCL buffers"}
    lines = [describe_auto_micro_batch(plan)] if plan.micro_batch_auto else []
    if plan.gpus == 1:
        lines.append(f"memory plan for {model_name}:")
    else:
        lines.append(f"memory plan for {model_name}, per GPU of {plan.gpus} (dist.strategy {plan.strategy}):")
    lines += [f"  {name:<22}{gib(value)}  {detail}".rstrip() for name, value, detail in rows if value or name not in optional]
    verdict = "fits" if plan.step_fits else "does NOT fit"
    where = f"{plan.vram_bytes / GIB:.0f} GiB" + (f" per GPU ({plan.gpus} GPUs)" if plan.gpus > 1 else "")
    the_step = "the training step " if plan.step_fits and not plan.fits else ""
    lines.append(f"  {'estimated peak' + (' per GPU' if plan.gpus > 1 else ''):<22}{gib(plan.total_bytes)}  -> {the_step}{verdict} in {where}")
    if plan.load_peak_bytes:
        loading = "the whole 4-bit base and the trainable part on each GPU before FSDP shards them, + CUDA context and NCCL"
        if plan.load_layerwise:
            loading = "layer by layer: this GPU's shards, every layer's quantization constants, one layer (or the root) whole while built, + CUDA context and NCCL"
        if plan.load_peak_bytes > plan.vram_bytes:
            loading = f"-> does NOT fit{'' if plan.step_fits else ' either'}: {describe_load_limit(plan)}"
        lines.append(f"  {'loading peak per GPU':<22}{gib(plan.load_peak_bytes)}  {loading}")
    if plan.activation_offload:
        lines.append(f"  {'pinned host RAM':<22}{gib(plan.host_ram_bytes)}  the offloaded layer inputs (model.activation_offload)")
    if plan.cpu_offload:
        lines.append(
            f"  {'CPU RAM per process':<22}{gib(plan.cpu_ram_bytes)}  pinned, needed by each of the {plan.gpus} processes (dist.cpu_offload): "
            f"weights {plan.cpu_weights_bytes / GIB:.2f} + LoRA {plan.cpu_trainable_bytes / GIB:.2f} + gradients {plan.cpu_gradient_bytes / GIB:.2f} "
            f"+ AdamW moments {plan.cpu_optimizer_bytes / GIB:.2f} GiB; {plan.gpus} on one machine: {plan.gpus * plan.cpu_ram_bytes / GIB:.2f} GiB"
        )
    lines.append(
        f"  largest micro-batch at {plan.max_seq_len} tokens: {plan.largest_micro_batch or 'none'}; "
        f"longest sequence at micro-batch {plan.micro_batch_size}: {plan.largest_seq_len or 'none'}"
        + (" (the model's context length binds, not memory)" if plan.seq_len_capped_by_context else "")
        + (" (the training step's, once loaded)" if plan.step_fits and not plan.fits else "")
    )
    if plan.longest_context:
        lines.append(
            f"  longest context at micro-batch 1: {plan.longest_context:,} tokens without activation offload, "
            f"{plan.longest_context_offloaded:,} with it" + (f" (the model's context is {plan.context_len:,})" if plan.context_len else "")
        )
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


def describe_long_context(plan: MemoryPlan) -> str:
    """What the activations row holds with activation offload and the tiled MLP."""
    parts = ["each layer's input on the host but 2 (activation offload)"] if plan.activation_offload else []
    parts += [f"MLP in tiles of {plan.mlp_tile_tokens} tokens"] if plan.mlp_tile_tokens else []
    if plan.mask_bytes >= GIB // 100:
        parts.append(f"a T x T attention mask of {plan.mask_bytes / GIB:.2f} GiB (packing or padding under sdpa; flash_attention_2 needs none)")
    return f"; {', '.join(parts)}" if parts else ""


def check_plan_against_peak(cfg: RecipeConfig, base_path: str, device: torch.device, processes: int = 1) -> dict:
    """The planner's estimate (per GPU of `processes`) next to the measured peak: every GPU run checks the planner (metrics.jsonl's plan_check)."""
    try:
        plan = plan_memory(cfg, read_model_config(base_path), gpus=processes)
    except (PlanError, ValueError, OSError) as err:  # an architecture the meta build cannot make: report, never fail the run
        return {"estimated_peak_gib": None, "note": f"planner unavailable: {err}"}
    record = {"estimated_peak_gib": plan.total_bytes / GIB, "estimated_weights_gib": plan.weights_bytes / GIB}
    if device.type == "cuda":
        # PyTorch's counters do not see the CUDA context, so it is left out of both sides of the ratio.
        measured = torch.cuda.max_memory_reserved(device)
        record["measured_peak_reserved_gib"] = measured / GIB
        record["estimate_over_measured"] = (plan.total_bytes - plan.cuda_context_bytes) / max(measured, 1)
    else:
        record["note"] = "the estimate is for a GPU (bf16 compute); a CPU run has no device peak to compare"
    return record
