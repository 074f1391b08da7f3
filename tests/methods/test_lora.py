"""LoRALinear maths, targeting, freezing and errors, on plain and 4-bit tiny bases."""

from __future__ import annotations

import math

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from qlora_lite.config import LoRAConfig, ModelConfig, QuantConfig
from qlora_lite.errors import LoRAError
from qlora_lite.methods.lora import LoRALinear, apply_lora, find_linear_names, lora_state_dict, merge_lora, resolve_targets, unmerge_lora
from qlora_lite.quant import load_base_model


def load(model_dir, four_bit: bool):
    return load_base_model(ModelConfig(name_or_path=str(model_dir)), QuantConfig(load_in_4bit=four_bit, compute_dtype="float32"))


def test_forward_matches_formula_on_plain_linear():
    base = nn.Linear(16, 8)
    layer = LoRALinear(base, r=4, alpha=8, dtype=torch.float32)
    nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 16)
    expected = base(x) + (8 / 4) * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_rslora_scaling_is_alpha_over_sqrt_r():
    layer = LoRALinear(nn.Linear(16, 8), r=16, alpha=8, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / math.sqrt(16))
    assert LoRALinear(nn.Linear(16, 8), r=16, alpha=8).scaling == pytest.approx(0.5)


def test_init_b_zero_so_fresh_adapter_is_identity_and_a_is_kaiming_bounded():
    base = nn.Linear(64, 32)
    layer = LoRALinear(base, r=8, alpha=16)
    assert layer.lora_B.weight.abs().max().item() == 0.0
    bound = 1 / math.sqrt(64)  # kaiming_uniform with a=sqrt(5) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    assert 0.5 * bound < layer.lora_A.weight.abs().max().item() <= bound + 1e-3
    assert layer.lora_A.weight.dtype == torch.bfloat16
    x = torch.randn(5, 64)
    assert torch.equal(layer(x), base(x))


def test_forward_on_4bit_linear_matches_dequantized_formula():
    torch.manual_seed(0)
    dense = nn.Linear(64, 32, bias=False)
    q = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")._quantize("cpu")
    x = torch.randn(4, 64)
    base_out = q(x)
    layer = LoRALinear(q, r=4, alpha=4, dtype=torch.float32)
    nn.init.normal_(layer.lora_B.weight)
    expected = base_out + x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert torch.allclose(layer(x), expected, atol=1e-4)
    # NF4 keeps the weight close but not exact: relative error of the base output under 15%.
    assert (base_out - dense(x)).norm() / dense(x).norm() < 0.15


@pytest.mark.parametrize("four_bit", [False, True])
def test_apply_lora_all_linear_counts_and_freezes(tiny_model_dir, four_bit):
    model = load(tiny_model_dir, four_bit)
    targets = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules="all-linear"))
    # 2 layers x (q, k, v, o, gate, up, down); lm_head never wrapped.
    assert len(targets) == 14
    assert not any("lm_head" in t for t in targets)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == set(lora_state_dict(model))
    # hidden 64, intermediate 128, 4 heads of 16, 2 kv heads -> k/v out 32.
    # per layer: q (64+64) + k (64+32) + v (64+32) + o (64+64) + gate (64+128) + up (64+128) + down (128+64), times r=4
    per_layer = 4 * ((64 + 64) + (64 + 32) * 2 + (64 + 64) + (64 + 128) * 2 + (128 + 64))
    assert sum(p.numel() for p in trainable.values()) == 2 * per_layer


@pytest.mark.parametrize("four_bit", [False, True])
def test_only_lora_receives_gradients_with_checkpointing(tiny_llama_dir, four_bit):
    from qlora_lite.quant import enable_gradient_checkpointing

    model = load(tiny_llama_dir, four_bit)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"]))
    enable_gradient_checkpointing(model)
    model.train()
    ids = torch.randint(4, 256, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(grads) == set(lora_state_dict(model))
    # B starts at zero, so A's gradient is zero on the first step and B's is not.
    assert all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def test_suffix_and_exact_targets(tiny_llama_dir):
    model = load(tiny_llama_dir, False)
    assert resolve_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert resolve_targets(model, ["model.layers.1.mlp.down_proj"]) == ["model.layers.1.mlp.down_proj"]
    assert "lm_head" not in find_linear_names(model)


def test_unknown_target_lists_existing_linear_names(tiny_llama_dir):
    model = load(tiny_llama_dir, False)
    with pytest.raises(LoRAError, match=r"'qkv_proj' matches no module.*'down_proj'.*'q_proj'"):
        apply_lora(model, LoRAConfig(target_modules=["qkv_proj"]))


def test_non_linear_target_is_rejected(tiny_llama_dir):
    model = load(tiny_llama_dir, False)
    with pytest.raises(LoRAError, match="input_layernorm.*not a linear layer"):
        apply_lora(model, LoRAConfig(target_modules=["input_layernorm"]))


def test_lm_head_target_is_rejected(tiny_llama_dir):
    model = load(tiny_llama_dir, False)
    with pytest.raises(LoRAError, match="output head"):
        apply_lora(model, LoRAConfig(target_modules=["lm_head"]))


@pytest.mark.parametrize("r", [0, -2])
def test_bad_rank_is_rejected(r):
    with pytest.raises(LoRAError, match="positive integer"):
        LoRALinear(nn.Linear(8, 8), r=r, alpha=8)


def test_merge_unmerge_roundtrip_on_plain_base(tiny_llama_dir):
    model = load(tiny_llama_dir, False)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, dtype="float32"))
    for n, p in model.named_parameters():
        if "lora_B" in n:
            nn.init.normal_(p, std=0.05)
    model.eval()
    ids = torch.randint(4, 256, (1, 10))
    with torch.no_grad():
        unmerged = model(ids).logits
        merge_lora(model)
        merged = model(ids).logits
        unmerge_lora(model)
        again = model(ids).logits
    assert (merged - unmerged).abs().max() < 1e-4
    assert (again - unmerged).abs().max() < 1e-4


def test_merge_into_4bit_refused(tiny_llama_dir):
    model = load(tiny_llama_dir, True)
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    with pytest.raises(LoRAError, match="qlora-lite merge"):
        merge_lora(model)


def test_model_without_linear_layers_is_explained(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).save_pretrained(str(tmp_path))
    model = load(tmp_path, False)
    with pytest.raises(LoRAError, match="no layer to wrap.*Conv1D"):
        apply_lora(model, LoRAConfig(r=4, alpha=8))
