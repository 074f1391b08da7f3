"""Optimizer choice (with the CPU fallback of paged optimizers) and LR schedules by formula."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch

from qlora_lite.training.optim import build_optimizer, build_scheduler, lr_multiplier


@pytest.mark.parametrize(
    "name, cls",
    [("paged_adamw_8bit", bnb.optim.AdamW8bit), ("adamw_8bit", bnb.optim.AdamW8bit), ("paged_adamw_32bit", torch.optim.AdamW), ("adamw", torch.optim.AdamW)],
)
def test_cpu_builds_unpaged_twin_with_note(name, cls, capsys):
    param = torch.nn.Parameter(torch.zeros(8192))
    opt = build_optimizer([param], name, lr=1e-3, weight_decay=0.0, device=torch.device("cpu"))
    assert type(opt) is cls
    printed = capsys.readouterr().out
    assert ("needs a CUDA GPU" in printed) == name.startswith("paged")


def test_adamw_8bit_step_moves_weights_like_adam():
    torch.manual_seed(0)
    start = torch.randn(8192)
    p8, p32 = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    grad = torch.randn(8192)
    opt8 = build_optimizer([p8], "adamw_8bit", 1e-3, 0.0, torch.device("cpu"))
    opt32 = build_optimizer([p32], "adamw", 1e-3, 0.0, torch.device("cpu"))
    for _ in range(3):
        p8.grad, p32.grad = grad.clone(), grad.clone()
        opt8.step()
        opt32.step()
    # Three Adam steps move each weight by ~3 lr against the gradient. 8-bit state is blockwise
    # quantized, so tiny gradients get coarse second moments: measured mean error 1%, 99th pct 8%.
    moved8, moved32 = p8.detach() - start, p32.detach() - start
    assert moved32.abs().max() == pytest.approx(3e-3, rel=0.01)
    error = (moved8 - moved32).abs()
    assert error.mean() < 0.02 * 3e-3
    assert torch.quantile(error, 0.99) < 0.15 * 3e-3


def test_warmup_then_cosine_linear_constant():
    assert lr_multiplier(0, "cosine", 9, 100) == pytest.approx(0.1)
    assert lr_multiplier(8, "cosine", 9, 100) == pytest.approx(0.9)
    assert lr_multiplier(9, "cosine", 9, 100) == pytest.approx(1.0)
    mid = 9 + (100 - 9) / 2
    assert lr_multiplier(mid, "cosine", 9, 100) == pytest.approx(0.5)
    assert lr_multiplier(mid, "linear", 9, 100) == pytest.approx(0.5)
    assert lr_multiplier(100, "cosine", 9, 100) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(100, "linear", 9, 100) == pytest.approx(0.0)
    assert lr_multiplier(57, "constant", 9, 100) == 1.0
    assert lr_multiplier(0, "constant", 0, 100) == 1.0


def test_scheduler_applies_multiplier_to_peak_lr():
    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([param], lr=2e-4)
    sched = build_scheduler(opt, "cosine", warmup_steps=0, max_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(2e-4)
    assert lrs[5] == pytest.approx(2e-4 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
