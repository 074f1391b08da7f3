"""The lean RMSNorm: transformers' forward bitwise, its backward to fp32 rounding, no fp32 copy larger than a tile."""

from __future__ import annotations

import inspect

import pytest
import torch
import transformers
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from qlora_lite.activations import LEAN_RMS_NORMS
from qlora_lite.memory import MemoryMeter
from qlora_lite.training import rms_norm
from qlora_lite.training.rms_norm import apply_lean_rms_norm

HIDDEN, TOKENS = 64, 100


def pair(dtype: torch.dtype) -> tuple[LlamaRMSNorm, LlamaRMSNorm]:
    torch.manual_seed(0)
    plain, lean = LlamaRMSNorm(HIDDEN, eps=1e-5), LlamaRMSNorm(HIDDEN, eps=1e-5)
    plain.weight.data = torch.randn(HIDDEN)
    lean.load_state_dict(plain.state_dict())
    plain, lean = plain.to(dtype), lean.to(dtype)
    assert apply_lean_rms_norm(torch.nn.Sequential(lean)) == 1
    return plain, lean


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_lean_norm_is_transformers_norm(dtype, tolerance, monkeypatch):
    monkeypatch.setattr(rms_norm, "NORM_TILE_TOKENS", 16)  # 100 tokens: 6 full tiles and one of 4
    plain, lean = pair(dtype)
    x = (torch.randn(2, TOKENS // 2, HIDDEN) * 3).to(dtype)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    outs = [norm(t) for norm, t in zip((plain, lean), xs)]
    assert torch.equal(outs[0], outs[1])  # the forward: the same operations, row by row
    grad = torch.randn_like(outs[0])
    for out in outs:
        out.backward(grad)

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    assert rel(xs[1].grad, xs[0].grad) < tolerance
    assert rel(lean.weight.grad, plain.weight.grad) < tolerance


def test_lean_norm_keeps_no_fp32_copy_larger_than_a_tile(monkeypatch):
    monkeypatch.setattr(rms_norm, "NORM_TILE_TOKENS", 16)

    def largest_fp32(norm) -> int:
        x = torch.randn(1, TOKENS, HIDDEN, dtype=torch.bfloat16, requires_grad=True)
        with MemoryMeter(baseline=[norm, x]) as meter:
            norm(x).sum().backward()  # in bf16: the only fp32 tensors are the norm's own
        return max(a.nbytes for a in meter.allocations if not a.is_baseline and a.dtype == "float32" and HIDDEN in a.shape)

    plain, lean = pair(torch.bfloat16)
    assert largest_fp32(plain) == TOKENS * HIDDEN * 4  # transformers': the whole input upcast
    assert largest_fp32(lean) == 16 * HIDDEN * 4  # one tile's


def test_the_classes_replaced_still_have_llamas_forward():
    # A transformers release that changes one of these forwards fails here instead of training on another norm.
    reference = inspect.getsource(LlamaRMSNorm.forward)
    for model_type, name in LEAN_RMS_NORMS.items():
        module = getattr(transformers.models, model_type, None)
        cls = getattr(getattr(module, f"modeling_{model_type}", None), name, None) if module else None
        if cls is None:
            continue  # not in this transformers release
        assert inspect.getsource(cls.forward) == reference, name


def test_every_norm_of_a_llama_is_replaced(tiny_llama_dir):
    from tests.helpers import load

    model = load(tiny_llama_dir)
    assert apply_lean_rms_norm(model) == 2 * 2 + 1  # two per decoder layer and the final one
