"""A lean RMSNorm for training: Llama's RMSNorm with the same outputs, keeping bf16 input + one fp32 per token.

transformers' LlamaRMSNorm upcasts its input to fp32 and lets autograd keep the pieces:

    h = x.float() * rsqrt(mean(x.float()^2) + eps);   y = weight * h.to(x.dtype)

autograd saves the fp32 input and the bf16 `h` (6 bytes per hidden value at bf16), and its
backward makes seven fp32 tensors of the whole input (the upcast's and the product's gradients,
the pow, div and mul of the mean's backward): 28 bytes per hidden value, the largest per-token
cost of a long step once the MLP is tiled (measured with memory.MemoryMeter, 8,192 tokens).
`RMSNormFunction` computes the same forward, tile by tile, saving the input (already alive: the
residual stream) and rstd (4 bytes per token); its backward recomputes h per tile and applies

    dx = rstd * (gh - h * mean(gh * h)),   gh = (dy * weight).float(),   dweight = sum(dy * h.to(dtype))

so no fp32 tensor is ever larger than one tile (NORM_TILE_TOKENS tokens). The forward is
bitwise transformers'; the backward agrees to fp32 rounding (tests/training/test_rms_norm.py).

Only for the classes whose forward is exactly the one above (read in transformers 5.24, and the
test re-reads their source); Gemma's (1 + weight, cast after the product) and OLMo-2's (cast
after the product) differ, and are left as they are.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from ..activations import LEAN_RMS_NORMS

NORM_TILE_TOKENS = 1024
LLAMA_RMS_NORMS = frozenset(LEAN_RMS_NORMS.values())  # the planner counts their bytes by model_type (activations.py)


class RMSNormFunction(torch.autograd.Function):
    """y = weight * (x.float() * rsqrt(mean(x.float()^2) + eps)).to(x.dtype), tile by tile; saves x and rstd."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = normalize(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        want_x, want_weight = ctx.needs_input_grad[:2]
        flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, x.shape[-1])  # (N, H)
        grad_x = torch.empty_like(flat_x) if want_x else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        for start in range(0, flat_x.shape[0], NORM_TILE_TOKENS):
            end = start + NORM_TILE_TOKENS
            r = rstd[start:end, None]  # (tile, 1)
            h = flat_x[start:end].float() * r  # (tile, H) fp32, as the forward made it
            dy = flat_grad[start:end]
            if grad_weight is not None:
                grad_weight += (dy * h.to(x.dtype)).float().sum(0)
            if grad_x is not None:
                gh = (dy * weight).float()  # as autograd: the product in the compute dtype, then upcast
                grad_x[start:end] = (r * (gh - h * (gh * h).mean(-1, keepdim=True))).to(x.dtype)
        return None if grad_x is None else grad_x.view_as(x), None if grad_weight is None else grad_weight.to(weight.dtype), None


def normalize(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward, NORM_TILE_TOKENS rows at a time: y as transformers computes it, and rstd (N,) fp32."""
    flat = x.reshape(-1, x.shape[-1])  # (N, H)
    y = torch.empty(flat.shape, dtype=torch.result_type(weight, flat), device=x.device)
    rstd = torch.empty(flat.shape[0], dtype=torch.float32, device=x.device)
    for start in range(0, flat.shape[0], NORM_TILE_TOKENS):
        end = start + NORM_TILE_TOKENS
        x32 = flat[start:end].to(torch.float32)
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (tile, 1)
        rstd[start:end] = r.squeeze(-1)
        y[start:end] = weight * (x32 * r).to(x.dtype)
    return y.view(*x.shape[:-1], y.shape[-1]), rstd


def forward_lean(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and (x.requires_grad or norm.weight.requires_grad):
        return RMSNormFunction.apply(x, norm.weight, norm.variance_epsilon)
    return normalize(x, norm.weight, norm.variance_epsilon)[0]


def apply_lean_rms_norm(model: nn.Module) -> int:
    """Give every RMSNorm of a class in LLAMA_RMS_NORMS the lean forward; returns how many."""
    norms = [m for m in model.modules() if type(m).__name__ in LLAMA_RMS_NORMS and type(m).__module__.startswith("transformers.models.")]
    for norm in norms:
        norm.forward = functools.partial(forward_lean, norm)
    return len(norms)
