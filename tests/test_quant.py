"""Base loading: real bitsandbytes NF4 with double quantization, frozen, and clear load errors."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from qlora_lite.config import ModelConfig, QuantConfig
from qlora_lite.errors import ModelLoadError
from qlora_lite.quant import build_bnb_config, dequantize_weight, load_base_model, load_tokenizer, resolve_compute_dtype

CPU = torch.device("cpu")


def test_compute_dtype_auto_on_cpu_is_fp32_and_names_pass_through():
    assert resolve_compute_dtype("auto", CPU) == torch.float32
    assert resolve_compute_dtype("bfloat16", CPU) == torch.bfloat16
    assert resolve_compute_dtype("float16", CPU) == torch.float16


def test_bnb_config_is_qlora_nf4_double_quant():
    cfg = build_bnb_config(QuantConfig(), torch.bfloat16)
    assert cfg.load_in_4bit and cfg.bnb_4bit_quant_type == "nf4" and cfg.bnb_4bit_use_double_quant
    assert cfg.bnb_4bit_compute_dtype == torch.bfloat16


def test_4bit_load_quantizes_every_block_linear_and_freezes(tiny_model_dir):
    model = load_base_model(ModelConfig(name_or_path=str(tiny_model_dir)), QuantConfig(compute_dtype="float32"))
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 14  # 2 layers x 7 projections; lm_head stays dense
    assert not isinstance(model.lm_head, bnb.nn.Linear4bit)
    state = linears[0].weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantization
    assert not any(p.requires_grad for p in model.parameters())
    assert model.config.use_cache is False


def test_nf4_weights_are_close_to_the_originals(tiny_llama_dir):
    dense = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), QuantConfig(load_in_4bit=False, compute_dtype="float32"))
    quant = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), QuantConfig(compute_dtype="float32"))
    w = dense.model.layers[0].mlp.down_proj.weight
    wq = dequantize_weight(quant.model.layers[0].mlp.down_proj)
    assert wq.shape == w.shape
    # NF4 (16 levels per 64-weight block): relative error of a Gaussian weight matrix is ~10%.
    rel = ((wq.float() - w).norm() / w.norm()).item()
    assert 0.02 < rel < 0.15


def test_plain_load_keeps_nn_linear(tiny_llama_dir):
    model = load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), QuantConfig(load_in_4bit=False, compute_dtype="bfloat16"))
    assert type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16


def test_missing_folder_is_explained(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "nope")), QuantConfig())


def test_unreachable_hub_id_is_explained(monkeypatch):
    import huggingface_hub.constants

    # The hub library reads HF_HUB_OFFLINE at import: set the constant, or the test waits on retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="hub.*download it first.*local folder"):
        load_tokenizer(ModelConfig(name_or_path="some-org/some-model-that-is-not-cached"))


def test_remote_code_is_off_unless_asked(tiny_llama_dir, monkeypatch):
    import transformers

    seen = {}
    real = transformers.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy)
    load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), QuantConfig(compute_dtype="float32"))
    assert seen["trust_remote_code"] is False
    assert ModelConfig().trust_remote_code is False


@pytest.fixture
def avx512_bf16_cpu(monkeypatch):
    """bitsandbytes as it behaves on a CPU with AVX512-BF16, on any CPU.

    Linear4bit reads `has_avx512bf16()` once, in `__init__`, to decide whether an eval-mode
    forward may repack its weight in place; forcing it here makes every machine take that path,
    so the tests below fail without `keep_4bit_layout` whatever CPU runs them.
    """
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


def _lora_grads_after(model_dir, eval_pass_first: bool) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    from qlora_lite.config import LoRAConfig
    from qlora_lite.methods.lora import apply_lora

    model = load_base_model(ModelConfig(name_or_path=str(model_dir)), QuantConfig(compute_dtype="float32"))
    torch.manual_seed(1)
    apply_lora(model, LoRAConfig(r=4, alpha=8.0))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero, which would zero every lora_A gradient
            param.data.normal_(0, 0.1)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    if eval_pass_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=ids)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return grads, model


def test_eval_pass_leaves_4bit_training_exact_on_an_avx512_bf16_cpu(tiny_model_dir, avx512_bf16_cpu):
    reference, _ = _lora_grads_after(tiny_model_dir, eval_pass_first=False)
    grads, model = _lora_grads_after(tiny_model_dir, eval_pass_first=True)
    assert len(grads) == 14 * 2  # lora_A and lora_B of every projection
    for name, grad in grads.items():
        # Same weights, same input, same fp32 kernels: only summation order may differ.
        torch.testing.assert_close(grad, reference[name], rtol=1e-5, atol=1e-7, msg=name)
        assert grad.abs().sum() > 0, name
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 14
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)


def test_eval_pass_leaves_dequantized_weights_unchanged(tiny_model_dir, avx512_bf16_cpu):
    model = load_base_model(ModelConfig(name_or_path=str(tiny_model_dir)), QuantConfig(compute_dtype="float32"))
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    before = [dequantize_weight(m).clone() for m in linears]
    shapes = [tuple(m.weight.shape) for m in linears]
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 12]]))
    assert [tuple(m.weight.shape) for m in linears] == shapes
    for m, weight in zip(linears, before):
        assert torch.equal(dequantize_weight(m), weight)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_is_one_clear_error(tmp_path, damage):
    from qlora_lite.tiny import build_tiny_model

    build_tiny_model(tmp_path, architecture="llama", vocab_size=256)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=r"the weights in .* are corrupt or truncated \(safetensors: .*\); download or copy the model again"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path)), QuantConfig(compute_dtype="float32"))


def test_local_model_path_resolves_to_an_absolute_folder(tiny_llama_dir, monkeypatch):
    from qlora_lite.model_paths import resolve_model_path

    monkeypatch.chdir(tiny_llama_dir.parent)
    assert resolve_model_path(ModelConfig(name_or_path=tiny_llama_dir.name)) == str(tiny_llama_dir.resolve())
    assert resolve_model_path(ModelConfig(name_or_path="some-org/some-model")) == "some-org/some-model"  # hub ids as given
