"""Activations: the bytes a training step keeps per token, by where they live and how long.

The planner adds these up (planner.assemble); training's long-context pieces (training/offload.py,
training/tiled_mlp.py) change which of them exist. Every count is per token of a micro-batch, in
units of the compute dtype's element size, as multiples of the model's widths (hidden, the key/value
width, intermediate), calibrated against what memory.MemoryMeter measures on the CPU (see the
constants and benchmarks/long_context.py):

- without gradient checkpointing, every layer's saved activations (ACTIVATION_TERMS per layer);
- with it, each layer's input (hidden per layer; with activation offload only OFFLOAD_DEVICE_LAYERS
  of them stay on the device, the rest wait in pinned host memory) + the one layer recomputed and
  differentiated at a time (CHECKPOINT_BACKWARD_TERMS; with the tiled MLP, TILED_BACKWARD_TERMS per
  token and TILE_TERMS per token of one tile);
- the attention mask transformers builds for sdpa and eager where it cannot use the causal kernel.
"""

from __future__ import annotations

from .config import RecipeConfig

# Bytes per token per layer kept for backward without checkpointing, in units of the compute
# dtype's element size, as multiples of (hidden, kv width, intermediate): the residual stream and
# norm outputs (~6 hidden), q/k/v after RoPE and the attention output, the MLP's gate, up,
# activation and product (4 intermediate). Calibrated against saved-tensor bytes on CPU.
ACTIVATION_TERMS = {"hidden": 6, "kv": 2, "intermediate": 4}
# With gradient checkpointing, the peak inside the one layer being recomputed and differentiated:
# its recomputed activations plus the gradients of its MLP and attention alive at once. Measured
# with memory.MemoryMeter (one NF4 + bf16-autocast LoRA step on the CPU, chunked loss, 2 layers,
# micro-batch 1): the device peak's slope between 4,096 and 8,192 tokens, less the 2 checkpointed
# inputs, fitted over (hidden, kv, intermediate) = (256, 64, 688), (512, 128, 1024), (384, 384,
# 1536), (256, 256, 2048): 7.03 hidden + 2.00 kv + 6.00 intermediate elements + 244 (the rotary
# cos/sin, positions, the norms' rstd) per token, exact at all four to 0.1%. That is with
# training/rms_norm.py's lean RMSNorm; transformers' own keeps fp32 copies of its input and makes
# seven in its backward (HF_NORM_TERMS more: the 2026-12-01 fit, 2 x 1024 tokens, gave 11 hidden).
CHECKPOINT_BACKWARD_TERMS = {"hidden": 7, "kv": 2, "intermediate": 6, "fixed": 244}
# With the tiled MLP (training/tiled_mlp.py) the MLP's intermediates exist for one tile of tokens at a time:
# per token of the sequence only the hidden- and kv-wide terms remain (the same fit with tiles of hidden_size
# tokens: 7.03 hidden + 2.00 kv + 0 intermediate + 212), and per token of one tile the MLP's.
TILED_BACKWARD_TERMS = {"hidden": 7, "kv": 2, "intermediate": 0, "fixed": 212}
TILE_TERMS = {"hidden": 0, "kv": 0, "intermediate": 6, "fixed": 0}
# Models whose RMSNorm is not Llama's keep transformers' (training/rms_norm.py leaves them): its fp32 copies add
# hidden-wide terms to the recomputed layer (seven fp32 tensors in its backward: 14 elements at bf16) and to the loss.
HF_NORM_TERMS = {"hidden": 14, "kv": 0, "intermediate": 0, "fixed": 0}
# The RMSNorm class of each model_type whose forward is Llama's, the one training/rms_norm.py replaces.
LEAN_RMS_NORMS = {
    "llama": "LlamaRMSNorm", "mistral": "MistralRMSNorm", "ministral": "MinistralRMSNorm", "qwen2": "Qwen2RMSNorm",
    "qwen3": "Qwen3RMSNorm", "phi3": "Phi3RMSNorm", "smollm3": "SmolLM3RMSNorm",
}  # fmt: skip
# Activation offload (training/offload.py) keeps on the device the input of the layer being recomputed and of the one
# prefetched for it; the other layers' inputs wait in pinned host memory.
OFFLOAD_DEVICE_LAYERS = 2
MLP_TILE_MIN_TOKENS = 64


def compute_element_bytes(cfg: RecipeConfig) -> int:
    """Bytes per value of the unquantized parts: the compute dtype, bf16/fp16 on a GPU for `auto`."""
    return 4 if cfg.quant.compute_dtype == "float32" else 2


def choose_mlp_tile_tokens(model_config) -> int:
    """Tokens per tile of the tiled MLP: hidden_size (at least MLP_TILE_MIN_TOKENS), as unsloth tiles; a tile's three
    intermediates then weigh about as much as one of the MLP's weight matrices in bf16 (0.33 GiB at Llama-3.1-8B's widths)."""
    return max(MLP_TILE_MIN_TOKENS, model_config.hidden_size)


def estimate_activation_bytes(
    model_config, micro_batch: int, seq_len: int, checkpointing: bool, element_bytes: int = 2, offload: bool = False, tile_tokens: int = 0
) -> int:
    """Device bytes kept for the backward pass by the decoder layers (not the logits), at their own peak.

    With checkpointing: the checkpointed inputs (one hidden vector per token and layer; with offload only
    OFFLOAD_DEVICE_LAYERS of them stay on the device) + the one layer recomputed and differentiated at a
    time (estimate_recomputed_bytes). Without: every layer's saved activations.
    """
    tokens = micro_batch * seq_len
    layers = model_config.num_hidden_layers
    if checkpointing:
        kept = min(layers, OFFLOAD_DEVICE_LAYERS) if offload else layers
        return tokens * kept * model_config.hidden_size * element_bytes + estimate_recomputed_bytes(model_config, tokens, element_bytes, tile_tokens)
    return tokens * layers * count_layer_bytes(model_config, ACTIVATION_TERMS, element_bytes)


def estimate_recomputed_bytes(model_config, tokens: int, element_bytes: int, tile_tokens: int = 0) -> int:
    """The peak inside the one layer gradient checkpointing recomputes and differentiates; its MLP tiled when tile_tokens is set."""
    norms = 0 if has_lean_norm(model_config) else count_layer_bytes(model_config, HF_NORM_TERMS, element_bytes)
    if not tile_tokens or tokens <= tile_tokens:
        return tokens * (count_layer_bytes(model_config, CHECKPOINT_BACKWARD_TERMS, element_bytes) + norms)
    per_token = count_layer_bytes(model_config, TILED_BACKWARD_TERMS, element_bytes) + norms
    return tokens * per_token + tile_tokens * count_layer_bytes(model_config, TILE_TERMS, element_bytes)


def estimate_mask_bytes(cfg: RecipeConfig, micro_batch: int, seq_len: int) -> int:
    """The attention mask transformers builds for packed or padded micro-batches: only flash_attention_2 keeps examples apart from position_ids alone; for sdpa
    and eager, transformers builds a (micro_batch, 1, T, T) mask in the compute dtype (and a boolean one first), kept for the
    whole step. Without packing, a micro-batch of one needs none (sdpa's causal kernel); a padded micro-batch of several
    a boolean (micro_batch, 1, T, T) one."""
    if cfg.model.attn_implementation == "flash_attention_2":
        return 0
    if cfg.data.packing:
        return micro_batch * seq_len * seq_len * (compute_element_bytes(cfg) + 1)
    return micro_batch * seq_len * seq_len if micro_batch > 1 else 0


def estimate_offload_host_bytes(model_config, micro_batch: int, seq_len: int, element_bytes: int) -> int:
    """Pinned host memory activation offload needs: every layer's input but the last (which stays on the device)."""
    return micro_batch * seq_len * max(model_config.num_hidden_layers - 1, 0) * model_config.hidden_size * element_bytes


def count_layer_bytes(model_config, terms: dict[str, int], element_bytes: int) -> int:
    """Bytes per token of one decoder layer: terms are multiples of (hidden, kv width, intermediate)."""
    hidden = model_config.hidden_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv = (getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    return element_bytes * (terms["hidden"] * hidden + terms["kv"] * kv + terms["intermediate"] * model_config.intermediate_size + terms.get("fixed", 0))


def has_lean_norm(model_config) -> bool:
    """True where training replaces the model's RMSNorm by the lean one (training/rms_norm.py)."""
    return getattr(model_config, "model_type", None) in LEAN_RMS_NORMS

