"""Tiled MLP: each decoder layer's MLP (and the LoRA layers inside it) runs over tiles of tokens.

A Llama MLP makes three tensors of tokens x intermediate_size (gate, up, their product; 28 KiB
per token each at Llama-3.1-8B's widths, in bf16) and its backward as many gradients: the largest
per-token cost of the layer that gradient checkpointing recomputes. `TiledMLP` runs the MLP on
`tile_tokens` tokens at a time and keeps only its input for the backward, which recomputes and
differentiates one tile at a time, so those tensors exist for one tile only, in the forward, the
recompute and the backward alike. The price is one more forward of the MLP in the backward.

The gradients are exact: each tile's input gradient is its own rows of the whole one, and the
trainable parameters' gradients are sums over tiles (accumulated in fp32, then cast to the
parameter's dtype, as one matmul would). Parameters reach the backward as inputs of the autograd
function, so autograd accumulates their gradients itself and DDP's and FSDP's hooks see them as
they would without tiling. Dropout draws the same random numbers in the backward's recompute as in
the forward (the RNG state is saved and restored), though not the ones an untiled MLP would draw.

Learned from unsloth's Tiled MLP (split the sequence, recompute per tile in the backward); written
with torch.autograd.grad per tile instead of a nested backward, for the hooks' sake.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from ..planner import find_decoder_layers_prefix


class TiledMLP(torch.autograd.Function):
    """out = mlp(x) computed tile by tile, saving x only. Inputs: the MLP's untiled forward, the tile size, x (..., H), its trainable parameters."""

    @staticmethod
    def forward(ctx, run_mlp: Callable, tile_tokens: int, x: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        ctx.run_mlp, ctx.tile_tokens, ctx.params = run_mlp, tile_tokens, params  # parameters are leaves: holding them costs nothing
        ctx.save_for_backward(x)
        device_type = x.device.type
        ctx.autocast = (device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.rng = save_rng_state(x.device)
        with torch.no_grad():
            return run_tiles(run_mlp, x, tile_tokens)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        (x,) = ctx.saved_tensors
        params = ctx.params
        wants = [ctx.needs_input_grad[2]] + [ctx.needs_input_grad[3 + i] for i in range(len(params))]
        flat_x = x.reshape(-1, x.shape[-1])  # (N, H)
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1])  # (N, H_out)
        grad_x = torch.empty_like(flat_x) if wants[0] else None
        sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) if want else None for p, want in zip(params, wants[1:])]
        device_type, enabled, dtype = ctx.autocast
        with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else [], device_type=device_type):
            restore_rng_state(ctx.rng, x.device)  # the forward's dropout masks again
            for start in range(0, flat_x.shape[0], ctx.tile_tokens):
                end = start + ctx.tile_tokens
                tile = flat_x[start:end].detach().requires_grad_(wants[0])
                with torch.enable_grad(), torch.autocast(device_type, enabled=enabled, dtype=dtype):
                    out = ctx.run_mlp(tile)  # (tile, H_out)
                inputs = [t for t, want in zip([tile, *params], wants) if want]
                grads = iter(torch.autograd.grad(out, inputs, flat_grad[start:end], allow_unused=True))
                if wants[0]:
                    grad_x[start:end] = next(grads)
                for total in sums:
                    grad = next(grads) if total is not None else None
                    if grad is not None:
                        total += grad
        grad_params = [None if total is None else total.to(p.dtype) for total, p in zip(sums, params)]
        return (None, None, None if grad_x is None else grad_x.view_as(x), *grad_params)


def run_tiles(run_mlp: Callable, x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """run_mlp over x's tokens, tile_tokens at a time, into one output tensor: no tile's intermediates outlive it."""
    flat = x.reshape(-1, x.shape[-1])  # (N, H)
    out = None
    for start in range(0, flat.shape[0], tile_tokens):
        part = run_mlp(flat[start : start + tile_tokens])  # (tile, H_out)
        if out is None:
            out = part.new_empty((flat.shape[0], part.shape[-1]))
        out[start : start + tile_tokens] = part
    return out.view(*x.shape[:-1], out.shape[-1])


def save_rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def restore_rng_state(state: tuple, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def forward_tiled(mlp: nn.Module, run_mlp: Callable, tile_tokens: int, x: torch.Tensor) -> torch.Tensor:
    """The MLP's forward once tiled: unchanged up to tile_tokens tokens, tile by tile above."""
    if x.numel() // x.shape[-1] <= tile_tokens:
        return run_mlp(x)
    params = [p for p in mlp.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or not (x.requires_grad or params):
        return run_tiles(run_mlp, x, tile_tokens)  # evaluation: nothing to keep, tiles only bound the peak
    return TiledMLP.apply(run_mlp, tile_tokens, x, *params)


def find_mlps(model: nn.Module) -> list[nn.Module]:
    """Each decoder layer's `mlp` module (Llama, Mistral, Qwen, Gemma and Phi-3 name it so); [] when there is none."""
    prefix = find_decoder_layers_prefix(model)
    if prefix is None:
        return []
    return [layer.mlp for layer in model.get_submodule(prefix) if isinstance(getattr(layer, "mlp", None), nn.Module)]


def apply_tiled_mlp(model: nn.Module, tile_tokens: int) -> int:
    """Make every decoder layer's MLP run over tiles of tile_tokens tokens; returns how many MLPs were tiled."""
    mlps = find_mlps(model)
    for mlp in mlps:
        run_mlp = mlp.__dict__.get("_untiled_forward") or mlp.forward  # tiling twice re-tiles, never nests
        mlp._untiled_forward = run_mlp
        mlp.forward = functools.partial(forward_tiled, mlp, run_mlp, tile_tokens)
    return len(mlps)
