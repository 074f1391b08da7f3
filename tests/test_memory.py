"""Parameter accounting matches PEFT and the formulas; device memory is reported and labelled."""

from __future__ import annotations

import pytest
import torch

from qlora_lite.config import LoRAConfig, ModelConfig, QuantConfig
from qlora_lite.lora import apply_lora
from qlora_lite.memory import build_memory_report, bytes_by_dtype, count_parameters, format_memory_report, get_device_memory
from qlora_lite.quant import load_base_model

peft = pytest.importorskip("peft")

# Parameters of the tiny fixtures: vocab 256, hidden 64, 2 layers, intermediate 128, kv width 32, untied head.
EMBED = 256 * 64
HEAD = 256 * 64
LINEAR_PER_LAYER = 64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3  # q, o, k, v, gate, up, down
NORMS = 64 * (2 * 2 + 1)
QWEN_BIASES_PER_LAYER = 64 + 32 + 32


def load(model_dir, four_bit):
    return load_base_model(ModelConfig(name_or_path=str(model_dir)), QuantConfig(load_in_4bit=four_bit, compute_dtype="float32"))


@pytest.mark.parametrize("four_bit", [False, True])
def test_counts_match_formula_and_peft(tiny_model_dir, four_bit):
    model = load(tiny_model_dir, four_bit)
    frozen_expected = EMBED + HEAD + 2 * LINEAR_PER_LAYER + NORMS
    if "qwen2" in str(tiny_model_dir):
        frozen_expected += 2 * QWEN_BIASES_PER_LAYER
    assert count_parameters(model).frozen == frozen_expected
    apply_lora(model, LoRAConfig(r=8, alpha=16))
    counts = count_parameters(model)
    lora_expected = 8 * 2 * ((64 + 64) * 2 + (64 + 32) * 2 + (64 + 128) * 3)
    assert counts.trainable == lora_expected
    assert counts.frozen == frozen_expected

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)} if four_bit else {}
    reference = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, **kwargs),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    trainable, total = reference.get_nb_trainable_parameters()  # what print_trainable_parameters prints
    assert (counts.trainable, counts.total) == (trainable, total)


def test_bytes_by_dtype_4bit_is_half_a_byte_per_weight_plus_constants(tiny_llama_dir):
    model = load(tiny_llama_dir, True)
    by_dtype = bytes_by_dtype(model)
    linear_weights = 2 * LINEAR_PER_LAYER
    assert by_dtype["nf4/fp4 (packed uint8)"] == linear_weights // 2
    # double quant: one uint8 scale per 64-weight block, plus fp32 second-level scales and two 256-entry codebooks per layer
    assert linear_weights // 64 <= by_dtype["quant constants"] <= linear_weights // 64 + 14 * (4 * 8 + 2 * 1024 + 4)
    assert by_dtype["float32"] == (EMBED + HEAD + NORMS) * 4


def test_report_labels_cpu_rss_and_formats(tiny_llama_dir):
    model = load(tiny_llama_dir, True)
    report = build_memory_report(model, torch.device("cpu"))
    mem = report["device_memory"]
    assert mem["kind"] == "cpu process RSS"
    assert 0.01 < mem["rss_gib"] <= mem["peak_rss_gib"] < 24
    text = format_memory_report(report)
    assert "CPU process RSS" in text and f"frozen {report['params']['frozen']:,}" in text
    assert get_device_memory(torch.device("cpu"))["kind"] == "cpu process RSS"
