"""Merge and export: merged logits equal base+adapter, the folder is a plain HF model, errors are clear."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from qlora_lite.config import BottleneckConfig, LoRAConfig, ModelConfig, QuantConfig, SelectiveConfig
from qlora_lite.errors import AdapterError, ExportError
from qlora_lite import verify
from qlora_lite.export.merge import merge_adapter
from qlora_lite.methods.bottleneck import apply_bottleneck, save_bottleneck
from qlora_lite.methods.lora import apply_lora, load_adapter, save_adapter
from qlora_lite.methods.selective import apply_selective, load_selective, save_selective
from qlora_lite.quant import load_base_model
from qlora_lite.tiny import build_tiny_model

peft = pytest.importorskip("peft")

IDS = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(0))
# Merged vs base+adapter, both computed in fp32. An fp32 merge differs only by summation
# order; a bf16 merge rounds every weight once (relative error <= 2^-9 = 0.2%), which moves
# these tiny models' logits (max |logit| ~3) by at most ~0.05.
FP32_ATOL = 1e-5
BF16_ATOL = 0.1
# NF4 base + adapter vs the model merged into dequantized NF4: the same weights, fp32.
NF4_MERGE_ATOL = 1e-4


def make_adapter(base_dir, out_dir, r: int = 4, alpha: float = 8, targets="all-linear", seed: int = 1, std: float = 0.05, **extra):
    """Our LoRA on an fp32 base with random (non-zero) B, saved in PEFT format."""
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = LoRAConfig(r=r, alpha=alpha, dropout=0.0, target_modules=targets, dtype="float32", **extra)
    apply_lora(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    save_adapter(model, cfg, out_dir, str(base_dir))
    return out_dir


def adapter_logits(base_dir, adapter_dir, four_bit: bool = False) -> torch.Tensor:
    model = load_base_model(ModelConfig(name_or_path=str(base_dir)), QuantConfig(load_in_4bit=four_bit, compute_dtype="float32"))
    load_adapter(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


def plain_logits(model_dir) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("dtype, atol", [("fp32", FP32_ATOL), ("bf16", BF16_ATOL)])
def test_merged_logits_equal_base_plus_adapter(tiny_model_dir, tmp_path, dtype, atol):
    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", dtype=dtype, verify=False)
    reference = adapter_logits(tiny_model_dir, adapter)
    diff = (plain_logits(tmp_path / "merged") - reference).abs().max().item()
    assert diff <= atol
    # The adapter really moves the logits, so equality above is not trivially base == base.
    assert (plain_logits(tiny_model_dir) - reference).abs().max().item() > 50 * FP32_ATOL
    # Shard by shard: the base's 3 shards and index come out with the same names and keys.
    base_index = json.loads((tiny_model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    merged_index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert merged_index["weight_map"] == base_index and report.num_shards == 3
    tensors = {k: v for shard in set(base_index.values()) for k, v in load_file(str(tmp_path / "merged" / shard)).items()}
    want = torch.float32 if dtype == "fp32" else torch.bfloat16
    assert {t.dtype for t in tensors.values()} == {want}
    assert merged_index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert report.merged_modules == 14  # 2 layers x (q, k, v, o, gate, up, down)


def test_untargeted_weights_are_copied_exactly(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", targets=["q_proj", "v_proj"])
    merge_adapter(adapter, tmp_path / "merged", dtype="fp32", verify=False)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).state_dict()
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).state_dict()
    changed = sorted(k for k in base if not torch.equal(base[k], merged[k]))
    assert changed == [f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(2) for p in ("q", "v")]


def test_verify_reports_difference_and_threshold(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", dtype="fp32")  # verify defaults on for small models
    assert report.max_logit_diff is not None and report.max_logit_diff <= 1e-5
    # threshold = 1e-4 x max(1, max |logit|), and these tiny models' logits stay under 10.
    assert 1e-4 <= report.threshold <= 1e-3


def test_failed_verification_leaves_nothing_behind(tiny_llama_dir, tmp_path, monkeypatch):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    monkeypatch.setitem(verify.MERGE_REL_TOL, "float32", 0.0)
    with pytest.raises(ExportError, match="answers differently from base.adapter.*nothing was written"):
        merge_adapter(adapter, tmp_path / "merged", dtype="fp32", verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_merged_folder_loads_with_plain_transformers_only(tiny_qwen2_dir, tmp_path):
    adapter = make_adapter(tiny_qwen2_dir, tmp_path / "adapter")
    merge_adapter(adapter, tmp_path / "merged", dtype="bf16", verify=False)
    names = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    # A fresh interpreter where qlora_lite and peft look uninstalled (None in sys.modules makes
    # both `import` and importlib.util.find_spec fail): the folder needs neither.
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["qlora_lite"] = sys.modules["peft"] = None
        import logging, io
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging
        stream = io.StringIO()
        hf_logging.get_logger().addHandler(logging.StreamHandler(stream))
        model, info = AutoModelForCausalLM.from_pretrained({str(tmp_path / "merged")!r}, output_loading_info=True)
        AutoTokenizer.from_pretrained({str(tmp_path / "merged")!r})
        import json
        counts = {{k: len(v) for k, v in info.items()}}
        print(json.dumps({{"dtype": str(model.dtype), "counts": counts, "log": stream.getvalue()}}))
        """
    )
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "warning"})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "torch.bfloat16"
    assert {k: n for k, n in result["counts"].items() if n} == {}  # no missing, unexpected or mismatched keys
    assert result["log"] == "", f"transformers warned while loading: {result['log']}"


@pytest.mark.parametrize("use_rslora", [False, True])
def test_merge_of_peft_adapter_equals_peft_merge_and_unload(tiny_model_dir, tmp_path, use_rslora):
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    config = peft.LoraConfig(
        r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0,
        init_lora_weights=False, use_rslora=use_rslora, task_type="CAUSAL_LM",
    )  # fmt: skip
    torch.manual_seed(3)
    peft_model = peft.get_peft_model(base, config)
    peft_model.save_pretrained(str(tmp_path / "peft-adapter"))
    reference = peft_model.merge_and_unload().state_dict()
    merge_adapter(tmp_path / "peft-adapter", tmp_path / "merged", base=str(tiny_model_dir), dtype="fp32", verify=False)
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).state_dict()
    assert sorted(merged) == sorted(reference)
    assert max((merged[k] - reference[k]).abs().max().item() for k in merged) <= 1e-6


def test_from_4bit_equals_nf4_model_and_reports_its_loss(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", from_4bit=True)
    merged = plain_logits(tmp_path / "merged")
    assert (merged - adapter_logits(tiny_llama_dir, adapter, four_bit=True)).abs().max().item() <= NF4_MERGE_ATOL
    # Lossy against the full-precision base + adapter, and the report says by how much.
    nf4_error = (merged - adapter_logits(tiny_llama_dir, adapter)).abs().max().item()
    assert nf4_error > 0.01
    assert report.nf4_logit_diff is not None and report.nf4_logit_diff > 0.01
    assert report.max_logit_diff <= NF4_MERGE_ATOL


def save_prequantized(base_dir, out_dir):
    """An NF4 checkpoint as hub repos like unsloth/*-bnb-4bit ship them: packed weights plus tokenizer."""
    from transformers import AutoTokenizer

    quantized = load_base_model(ModelConfig(name_or_path=str(base_dir)), QuantConfig(compute_dtype="float32"))
    quantized.save_pretrained(str(out_dir))
    AutoTokenizer.from_pretrained(str(base_dir)).save_pretrained(str(out_dir))


def test_from_4bit_merges_a_prequantized_base(tiny_llama_dir, tmp_path):
    save_prequantized(tiny_llama_dir, tmp_path / "nf4-base")
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", base=str(tmp_path / "nf4-base"), dtype="fp32", from_4bit=True)
    assert report.nf4_logit_diff is None  # no original weights to measure the rounding against
    assert not any("quantization_config" in line for line in (tmp_path / "merged" / "config.json").read_text().splitlines())
    assert (plain_logits(tmp_path / "merged") - adapter_logits(tiny_llama_dir, adapter, four_bit=True)).abs().max().item() <= NF4_MERGE_ATOL


def test_default_merge_refuses_a_prequantized_base(tiny_llama_dir, tmp_path):
    save_prequantized(tiny_llama_dir, tmp_path / "nf4-base")
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    with pytest.raises(ExportError, match="quantized.*--from-4bit"):
        merge_adapter(adapter, tmp_path / "merged", base=str(tmp_path / "nf4-base"))
    assert not (tmp_path / "merged").exists()


def test_adapter_for_another_base_names_tensor_and_shapes(tiny_llama_dir, tmp_path):
    other = tmp_path / "other-base"
    build_tiny_model(other, hidden_size=32, intermediate_size=64)
    (tmp_path / "merged").mkdir()  # an empty out folder is fine to fill
    adapter = make_adapter(other, tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"model.layers.0.mlp.down_proj.lora_A.weight has shape \(4, 64\) but base weight .* shape \(64, 128\)"):
        merge_adapter(adapter, tmp_path / "merged", base=str(tiny_llama_dir))
    assert list((tmp_path / "merged").iterdir()) == []


def test_adapter_module_missing_from_base(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", targets=["q_proj"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    weights = {k.replace("self_attn.q_proj", "self_attn.qkv_proj"): v for k, v in weights.items()}
    save_file(weights, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="no tensor model.layers.0.self_attn.qkv_proj.weight.*different base"):
        merge_adapter(adapter, tmp_path / "merged")


def test_out_dir_not_empty_is_refused_then_replaced_with_overwrite(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="exists and is not empty.*--overwrite"):
        merge_adapter(adapter, out)
    assert (out / "notes.txt").read_text() == "keep me"
    merge_adapter(adapter, out, overwrite=True, dtype="fp32", verify=False)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp folders left


def test_out_dir_may_not_be_an_input(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    with pytest.raises(ExportError, match="an input of this merge"):
        merge_adapter(adapter, tiny_llama_dir, overwrite=True)
    assert (tiny_llama_dir / "config.json").is_file()


def test_pickle_adapter_needs_allow_pickle(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    merge_adapter(adapter, tmp_path / "from-safetensors", dtype="fp32", verify=False)
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    torch.save(weights, str(adapter / "adapter_model.bin"))  # what PEFT < 0.7 wrote
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="pickle.*--allow-pickle"):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    merge_adapter(adapter, tmp_path / "merged", dtype="fp32", verify=False, allow_pickle=True)
    assert torch.equal(plain_logits(tmp_path / "merged"), plain_logits(tmp_path / "from-safetensors"))


def test_missing_adapter_files(tiny_llama_dir, tmp_path):
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        merge_adapter(tmp_path / "nowhere", tmp_path / "merged")
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        merge_adapter(adapter, tmp_path / "merged")


def test_missing_tokenizer_is_refused_before_writing(tiny_llama_dir, tmp_path):
    bare = tmp_path / "bare-base"
    build_tiny_model(bare, max_shard_size="200KB")  # weights only, no tokenizer files
    adapter = make_adapter(bare, tmp_path / "adapter")
    with pytest.raises(ExportError, match="no tokenizer.*copy the base model's tokenizer files"):
        merge_adapter(adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()


def test_missing_base_folder_says_pass_base(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    with pytest.raises(AdapterError, match="--base names base model .*gone, which does not exist on this machine"):
        merge_adapter(adapter, tmp_path / "merged", base=str(tmp_path / "gone"))


def test_merged_generation_config_stops_at_the_chat_end_of_turn(tiny_llama_dir, tmp_path):
    """A chat adapter trained on a base tokenizer (EOS </s>, turns closed by <|eot_id|>): the merged model's
    generation_config.json lists both, so transformers (and vLLM, TGI) stop at the end of the turn."""
    from tests.helpers import ScriptedHead, save_llama3_style_tokenizer

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    eot = save_llama3_style_tokenizer(adapter)
    merge_adapter(adapter, tmp_path / "merged", dtype="fp32")
    generation = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [3, eot] and generation["bos_token_id"] == 2  # the base's EOS first, the rest as it was
    assert json.loads((tmp_path / "merged" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    model.lm_head = ScriptedHead([40, 41, eot, 42])
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([[2, 50, 60]]), max_new_tokens=8, do_sample=False)  # its own generation config
    assert out[0, 3:].tolist() == [40, 41, eot]

    # without a chat template the base's generation config is copied as it was
    plain = make_adapter(tiny_llama_dir, tmp_path / "plain")
    merge_adapter(plain, tmp_path / "merged-plain", dtype="fp32", verify=False)
    assert (tmp_path / "merged-plain" / "generation_config.json").read_text() == (tiny_llama_dir / "generation_config.json").read_text()


def test_fp16_overflow_is_an_error_not_inf(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter", std=1e6)  # deltas ~1e5 > 65504
    with pytest.raises(ExportError, match="beyond fp16's range.*--dtype bf16"):
        merge_adapter(adapter, tmp_path / "merged", dtype="fp16", verify=False)
    assert not (tmp_path / "merged").exists()


def test_cli_merge_prints_what_it_did(tiny_llama_dir, tmp_path, capsys):
    from qlora_lite import cli

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    assert cli.main(["merge", str(adapter), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "merged 14 LoRA layers into the base's original weights: 0.1M parameters, 3 shard(s), float32" in out
    assert "verify: max |logit difference| merged vs base+adapter on 3 probe prompts" in out
    assert (plain_logits(tmp_path / "merged") - adapter_logits(tiny_llama_dir, adapter)).abs().max().item() <= FP32_ATOL


def test_cli_merge_errors_exit_2_with_the_cause(tiny_llama_dir, tmp_path, capsys):
    from qlora_lite import cli

    adapter = make_adapter(tiny_llama_dir, tmp_path / "adapter")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    cases = [
        (["merge", str(adapter), "--out", str(tmp_path / "taken")], "exists and is not empty"),
        (["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "m")], "adapter_config.json is missing"),
        (["merge", str(adapter), "--out", str(tmp_path / "m"), "--base", str(tmp_path / "gone")], "does not exist on this machine"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("from_4bit", [False, True])
def test_tied_embeddings_stay_tied(tokenizer, tmp_path, from_4bit):
    """Llama-3.2-1B and Qwen2.5-1.5B tie lm_head to the embeddings: the checkpoint has no lm_head.weight."""
    base = tmp_path / "tied"
    build_tiny_model(base, initializer_range=0.1, max_shard_size="200KB", tie_word_embeddings=True)
    tokenizer.save_pretrained(str(base))
    adapter = make_adapter(base, tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", from_4bit=from_4bit)
    index = tmp_path / "merged" / "model.safetensors.index.json"
    keys = json.loads(index.read_text())["weight_map"] if index.is_file() else load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert "lm_head.weight" not in keys and "model.embed_tokens.weight" in keys
    model, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert report.max_logit_diff <= (NF4_MERGE_ATOL if from_4bit else FP32_ATOL)


# --- selective and bottleneck adapters -------------------------------------------------------

SELECTED = [
    "model.layers.0.input_layernorm.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.post_attention_layernorm.weight",
    "model.layers.1.input_layernorm.weight",
    "model.layers.1.post_attention_layernorm.weight",
    "model.norm.weight",
]


def make_selective_adapter(base_dir, out_dir, seed: int = 1, std: float = 0.05):
    """A selective adapter (norms and one down_proj) on an fp32 base, its tensors moved off the base's values."""
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    cfg = SelectiveConfig(patterns=["norm", r"layers\.0\.mlp\.down_proj"], unquantized_modules=["down_proj"])
    names = apply_selective(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in names:
                p.add_(torch.randn(p.shape, generator=gen) * std)
    save_selective(model, cfg, out_dir, str(base_dir))
    return out_dir


def selective_logits(base_dir, adapter_dir, four_bit: bool = False) -> torch.Tensor:
    quant = QuantConfig(load_in_4bit=four_bit, compute_dtype="float32")
    model = load_base_model(ModelConfig(name_or_path=str(base_dir)), quant, skip_modules=["down_proj"])
    load_selective(model, adapter_dir)
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits


@pytest.mark.parametrize("dtype, atol", [("fp32", FP32_ATOL), ("bf16", BF16_ATOL)])
def test_selective_merge_replaces_the_tensors_and_equals_base_plus_adapter(tiny_model_dir, tmp_path, dtype, atol):
    adapter = make_selective_adapter(tiny_model_dir, tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", dtype=dtype)
    assert report.peft_type == "SELECTIVE" and report.merged_modules == len(SELECTED) and report.num_shards == 3
    # Measured (llama): 0.0 for fp32 (the same tensors, the same maths), 0.04 for bf16 (rounded weights).
    assert report.max_logit_diff <= atol
    reference = selective_logits(tiny_model_dir, adapter)
    assert (plain_logits(tmp_path / "merged") - reference).abs().max().item() <= atol
    assert (plain_logits(tiny_model_dir) - reference).abs().max().item() > 50 * FP32_ATOL  # the adapter matters
    # A plain transformers model: no missing or unexpected keys, and only the selected tensors differ.
    merged, info = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32, output_loading_info=True)
    assert {k: v for k, v in info.items() if v} == {}
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).state_dict()
    if dtype == "fp32":
        assert sorted(k for k, v in merged.state_dict().items() if not torch.equal(v, base[k])) == SELECTED


def test_selective_merge_from_4bit_equals_the_nf4_model(tiny_llama_dir, tmp_path):
    adapter = make_selective_adapter(tiny_llama_dir, tmp_path / "adapter")
    report = merge_adapter(adapter, tmp_path / "merged", dtype="fp32", from_4bit=True)
    merged = plain_logits(tmp_path / "merged")
    # The NF4 base keeps down_proj (the adapter's unquantized_modules) in fp32, as training did. Measured: 0.0.
    assert (merged - selective_logits(tiny_llama_dir, adapter, four_bit=True)).abs().max().item() <= NF4_MERGE_ATOL
    assert report.max_logit_diff <= NF4_MERGE_ATOL
    assert report.nf4_logit_diff is not None and report.nf4_logit_diff > 0.01  # the NF4 rounding of the other weights


def test_selective_adapter_for_another_base_names_tensor_and_shapes(tiny_llama_dir, tmp_path):
    other = tmp_path / "other-base"
    build_tiny_model(other, hidden_size=32, intermediate_size=64)
    adapter = make_selective_adapter(other, tmp_path / "adapter")
    with pytest.raises(AdapterError, match=r"model.layers.0.input_layernorm.weight has shape \(32,\) but the base checkpoint's .* has shape \(64,\)"):
        merge_adapter(adapter, tmp_path / "merged", base=str(tiny_llama_dir))
    assert not (tmp_path / "merged").exists()


def test_merge_refuses_adapters_that_are_not_weights(tiny_llama_dir, tmp_path, capsys):
    from qlora_lite import cli

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    apply_bottleneck(model, BottleneckConfig(size=4))
    save_bottleneck(model, BottleneckConfig(size=4), tmp_path / "bottleneck", str(tiny_llama_dir))
    with pytest.raises(ExportError, match="nonlinear, so they cannot be folded into the base's weights. Serve the base . adapter"):
        merge_adapter(tmp_path / "bottleneck", tmp_path / "merged")
    (tmp_path / "prompt").mkdir()
    (tmp_path / "prompt" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}))
    with pytest.raises(ExportError, match="holds a soft prompt.*nothing to merge"):
        merge_adapter(tmp_path / "prompt", tmp_path / "merged")
    assert cli.main(["merge", str(tmp_path / "bottleneck"), "--out", str(tmp_path / "merged")]) == 2
    assert "cannot be folded" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("out", ["/proc/qlora-merged", "/sys/kernel/qlora-merged"])
def test_merge_into_a_folder_that_cannot_be_written_is_one_line(tiny_llama_dir, tmp_path, out, capsys):
    """Issue 22: `merge --out` on /proc or /sys raised from folders.write_atomically, with a traceback."""
    from qlora_lite import cli

    make_adapter(tiny_llama_dir, tmp_path / "adapter")
    capsys.readouterr()  # the adapter's own loading bars
    code = cli.main(["merge", str(tmp_path / "adapter"), "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1
    assert err.startswith(f"error: --out {out} cannot be written: cannot create {out} (") and err.endswith("); choose a folder you can write\n")
    assert not Path(out).exists()
