"""Selective tuning: only the matched base parameters train, they round-trip through the folder, errors are clear."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qlora_lite.config import LoRAConfig, SelectiveConfig
from qlora_lite.errors import AdapterError, SelectiveError
from qlora_lite.methods.lora import apply_lora, save_adapter
from qlora_lite.methods.selective import SELECTIVE_METHOD, apply_selective, load_selective, save_selective
from qlora_lite.quant import is_4bit_linear
from qlora_lite.tiny import build_tiny_model
from tests.helpers import load, logits, snapshot, train_steps

NORMS = [
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.norm.weight",
]
DOWN_PROJ = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"]
# Saved and reloaded tensors are copied bit for bit; the bound leaves room for nothing else.
ROUND_TRIP_ATOL = 1e-6


@pytest.mark.parametrize("four_bit", [False, True])
def test_only_matched_parameters_train(tiny_model_dir, four_bit):
    model = load(tiny_model_dir, four_bit)
    before = snapshot(model)
    names = apply_selective(model, SelectiveConfig(patterns=["norm"]))
    assert names == NORMS
    # 2 layers x 2 norms + the final norm, 64 numbers each.
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 5 * 64
    first, last = train_steps(model)
    # Measured: -3.6% to -4.6% after 5 steps (llama/qwen2, fp32/NF4); norms alone move the loss little.
    assert last < 0.98 * first
    after = snapshot(model)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == sorted(NORMS)  # every other tensor, 4-bit codes included, is bit-identical


def test_unquantized_modules_let_a_pattern_train_linear_weights(tiny_llama_dir, tmp_path):
    with pytest.raises(SelectiveError, match=r"4-bit NF4 weight.*\['down_proj'\] to selective.unquantized_modules"):
        apply_selective(load(tiny_llama_dir, four_bit=True), SelectiveConfig(patterns=["down_proj"]))

    cfg = SelectiveConfig(patterns=["down_proj"], unquantized_modules=["down_proj"])
    model = load(tiny_llama_dir, four_bit=True, skip_modules=cfg.unquantized_modules)
    assert not is_4bit_linear(model.model.layers[0].mlp.down_proj) and is_4bit_linear(model.model.layers[0].mlp.up_proj)
    before = snapshot(model)
    assert apply_selective(model, cfg) == DOWN_PROJ
    first, last = train_steps(model)
    assert last < 0.7 * first  # measured -59% after 5 steps: two 64x128 weights do move the loss
    after = snapshot(model)
    assert sorted(k for k in before if not torch.equal(before[k], after[k])) == DOWN_PROJ

    save_selective(model, cfg, tmp_path / "adapter", str(tiny_llama_dir))
    fresh = load(tiny_llama_dir, four_bit=True, skip_modules=["down_proj"])
    assert load_selective(fresh, tmp_path / "adapter") == cfg
    assert (logits(fresh) - logits(model)).abs().max().item() <= ROUND_TRIP_ATOL
    # Without skip_modules those weights are NF4 in the fresh base: the loader says how to load it.
    with pytest.raises(SelectiveError, match=r"4-bit NF4: load the base with skip_modules=\['down_proj'\]"):
        load_selective(load(tiny_llama_dir, four_bit=True), tmp_path / "adapter")


def test_biases_of_4bit_layers_can_train(tiny_qwen2_dir):
    """Qwen2's q/k/v biases live beside NF4 weights but are plain tensors."""
    model = load(tiny_qwen2_dir, four_bit=True)
    names = apply_selective(model, SelectiveConfig(patterns=[r"q_proj\.bias"]))
    assert names == ["model.layers.0.self_attn.q_proj.bias", "model.layers.1.self_attn.q_proj.bias"]
    with pytest.raises(SelectiveError, match=r"'q_proj' matches 2 4-bit NF4 weight\(s\) such as model.layers.0.self_attn.q_proj.weight"):
        apply_selective(model, SelectiveConfig(patterns=["q_proj"]))


def test_pattern_errors_name_the_cause(tiny_llama_dir, tmp_path):
    model = load(tiny_llama_dir)
    with pytest.raises(SelectiveError, match=r"'layernorm_bias' matches no parameter.*'model.layers.N.input_layernorm.weight'"):
        apply_selective(model, SelectiveConfig(patterns=["norm", "layernorm_bias"]))
    assert not any(p.requires_grad for p in model.parameters())  # a failed apply leaves nothing half-unfrozen
    with pytest.raises(SelectiveError, match=r"'mlp\(' is not a valid regular expression"):
        apply_selective(model, SelectiveConfig(patterns=["mlp("]))
    with pytest.raises(SelectiveError, match="patterns is empty"):
        apply_selective(model, SelectiveConfig(patterns=[]))
    # lm_head tied to the embeddings is one tensor, stored under the embedding's name.
    build_tiny_model(tmp_path / "tied", tie_word_embeddings=True)
    tied = load(tmp_path / "tied")
    with pytest.raises(SelectiveError, match="matches only lm_head.weight, which is tied to model.embed_tokens.weight .*select model.embed_tokens.weight instead"):
        apply_selective(tied, SelectiveConfig(patterns=["lm_head"]))


def test_save_then_load_into_a_fresh_base_gives_equal_logits(tiny_model_dir, tmp_path):
    cfg = SelectiveConfig(patterns=["norm", r"layers\.1\.self_attn\.v_proj"])
    model = load(tiny_model_dir)
    names = apply_selective(model, cfg)
    train_steps(model, steps=3)
    save_selective(model, cfg, tmp_path / "adapter", str(tiny_model_dir))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config == {
        "peft_type": "SELECTIVE", "qlora_lite_format": 1, "base_model_name_or_path": str(tiny_model_dir),
        "patterns": cfg.patterns, "unquantized_modules": [], "parameters": names,
    }  # fmt: skip
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sorted(saved) == sorted(names) and all(saved[n].dtype == torch.float32 for n in names)

    fresh = load(tiny_model_dir)
    base_logits = logits(fresh)
    assert load_selective(fresh, tmp_path / "adapter") == cfg
    assert (logits(fresh) - logits(model)).abs().max().item() <= ROUND_TRIP_ATOL
    assert (base_logits - logits(model)).abs().max().item() > 100 * ROUND_TRIP_ATOL  # training moved them
    assert not any(p.requires_grad for p in fresh.parameters())
    # Resume: the same tensors train again, nothing else does.
    load_selective(fresh, tmp_path / "adapter", trainable=True)
    assert sorted(n for n, p in fresh.named_parameters() if p.requires_grad) == sorted(names)


def test_adapter_for_another_base_names_tensor_and_shapes(tiny_llama_dir, tmp_path):
    other = tmp_path / "other-base"
    build_tiny_model(other, hidden_size=32, intermediate_size=64)
    small = load(other)
    apply_selective(small, SelectiveConfig())
    save_selective(small, SelectiveConfig(), tmp_path / "adapter", str(other))
    model = load(tiny_llama_dir)
    before = snapshot(model)
    with pytest.raises(SelectiveError, match=r"model.layers.0.input_layernorm.weight has shape \(32,\) but this base's .* has shape \(64,\).*different base"):
        load_selective(model, tmp_path / "adapter")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-applied

    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    renamed = {k.replace("input_layernorm", "pre_norm"): v for k, v in weights.items()}
    save_file(renamed, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    config["parameters"] = sorted(renamed)
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(SelectiveError, match=r"model.layers.0.pre_norm.weight \(and 1 more\) is not a parameter of this base model.*different base"):
        load_selective(model, tmp_path / "adapter")


def test_loader_refuses_other_folders_with_the_cause(tiny_llama_dir, tmp_path):
    model = load(tiny_llama_dir)
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_selective(model, tmp_path / "nowhere")
    lora = load(tiny_llama_dir)
    apply_lora(lora, LoRAConfig(r=2, target_modules=["q_proj"]))
    save_adapter(lora, LoRAConfig(r=2, target_modules=["q_proj"]), tmp_path / "lora", str(tiny_llama_dir))
    with pytest.raises(AdapterError, match="peft_type is 'LORA', but this loader reads SELECTIVE adapters"):
        load_selective(model, tmp_path / "lora")

    adapter = tmp_path / "adapter"
    apply_selective(model, SelectiveConfig())
    save_selective(model, SelectiveConfig(), adapter, str(tiny_llama_dir))
    config = json.loads((adapter / "adapter_config.json").read_text())
    cases = [
        ({**config, "qlora_lite_format": 2}, "qlora_lite_format is 2.*upgrade qlora-lite"),
        ({k: v for k, v in config.items() if k != "patterns"}, "patterns must be of type list, got None"),
        ({**config, "parameters": config["parameters"][:-1]}, "holds 5 tensors but adapter_config.json lists 4 parameters, and model.norm.weight"),
    ]
    for broken, message in cases:
        (adapter / "adapter_config.json").write_text(json.dumps(broken))
        with pytest.raises(AdapterError, match=message):
            load_selective(model, adapter)
    (adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="is not valid JSON"):
        load_selective(model, adapter)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "parameters": []}))
    save_file({}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="holds no tensors; the file is incomplete"):
        load_selective(model, adapter)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_selective(model, adapter)


def test_method_read_config_refuses_a_config_without_unquantized_modules(tiny_llama_dir, tmp_path):
    # generate reads every adapter's config through Method.read_config before loading the base, then
    # indexes raw["unquantized_modules"]: a missing key must be a clear AdapterError here, not a KeyError there.
    model = load(tiny_llama_dir)
    apply_selective(model, SelectiveConfig())
    save_selective(model, SelectiveConfig(), tmp_path / "adapter", str(tiny_llama_dir))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    del config["unquantized_modules"]
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="unquantized_modules must be of type list, got None"):
        SELECTIVE_METHOD.read_config(tmp_path / "adapter")
