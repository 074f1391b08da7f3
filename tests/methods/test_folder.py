"""PEFT on-disk format: our adapters load in peft with the same logits, and peft's load in ours."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from qlora_lite.config import LoRAConfig, ModelConfig, QuantConfig
from qlora_lite.errors import AdapterError
from qlora_lite.methods.lora import apply_lora, load_adapter, lora_state_dict, save_adapter
from qlora_lite.quant import load_base_model
from qlora_lite.tiny import build_tiny_model
from tests.helpers import load_hf

peft = pytest.importorskip("peft")

# fp32 base: both sides do the same fp32 maths, only summation order differs.
FP32_ATOL = 1e-5
# 4-bit base: identical NF4 weights, but the dequantize+matmul kernels are not bitwise
# reproducible between the two module trees; bf16 adapters add rounding of the LoRA branch.
NF4_ATOL = 1e-3
BF16_ADAPTER_ATOL = 2e-2


def load(model_dir, four_bit: bool):
    model = load_base_model(ModelConfig(name_or_path=str(model_dir)), QuantConfig(load_in_4bit=four_bit, compute_dtype="float32"))
    return model.eval()


def randomize_lora_b(model: nn.Module, std: float = 0.05) -> None:
    """B starts at zero; give it values so the adapter really changes the logits."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


IDS = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def peft_lora_keys(peft_model) -> set[str]:
    return {n.replace(".default", "") for n, _ in peft_model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize(
    "four_bit, lora_dtype, atol",
    [(False, "float32", FP32_ATOL), (False, "bfloat16", BF16_ADAPTER_ATOL), (True, "float32", NF4_ATOL)],
)
def test_our_adapter_loads_in_peft_with_same_logits(tiny_model_dir, tmp_path, four_bit, lora_dtype, atol):
    ours = load(tiny_model_dir, four_bit)
    apply_lora(ours, LoRAConfig(r=4, alpha=8, dropout=0.1, dtype=lora_dtype))
    randomize_lora_b(ours)
    save_adapter(ours, LoRAConfig(r=4, alpha=8, dropout=0.1, dtype=lora_dtype), tmp_path, str(tiny_model_dir))
    expected = logits(ours, IDS)

    theirs = peft.PeftModel.from_pretrained(load_hf(tiny_model_dir, four_bit), str(tmp_path)).eval()
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    # PEFT loads non-strictly: check every LoRA parameter it created came from our file.
    assert peft_lora_keys(theirs) == set(saved)
    assert len(saved) == 2 * 14
    got = logits(theirs, IDS)
    assert (expected - logits(load_hf(tiny_model_dir, four_bit), IDS)).abs().max() > 10 * atol  # the adapter matters
    assert (got - expected).abs().max().item() < atol


@pytest.mark.parametrize("four_bit, atol", [(False, FP32_ATOL), (True, NF4_ATOL)])
def test_peft_adapter_loads_in_ours_with_same_logits(tiny_model_dir, tmp_path, four_bit, atol):
    theirs = peft.get_peft_model(
        load_hf(tiny_model_dir, four_bit),
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM"),
    )
    randomize_lora_b(theirs)
    theirs.eval()
    expected = logits(theirs, IDS)
    theirs.save_pretrained(str(tmp_path))

    ours = load(tiny_model_dir, four_bit)
    cfg = load_adapter(ours, tmp_path)
    assert (cfg.r, cfg.alpha) == (8, 16.0)
    assert len(lora_state_dict(ours)) == 2 * 3 * 2  # 2 layers x 3 targets x (A, B)
    # every tensor in PEFT's file landed in our model with its value
    saved = {k.removeprefix("base_model.model."): v for k, v in load_file(str(tmp_path / "adapter_model.safetensors")).items()}
    ours_state = lora_state_dict(ours)
    assert set(saved) == set(ours_state)
    assert all(torch.equal(saved[k].float(), ours_state[k].float()) for k in saved)
    assert (logits(ours, IDS) - expected).abs().max().item() < atol


def test_rslora_adapter_roundtrip_through_peft(tiny_llama_dir, tmp_path):
    cfg = LoRAConfig(r=16, alpha=8, dropout=0.0, use_rslora=True, dtype="float32", target_modules=["o_proj"])
    ours = load(tiny_llama_dir, False)
    apply_lora(ours, cfg)
    randomize_lora_b(ours)
    save_adapter(ours, cfg, tmp_path, str(tiny_llama_dir))
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_rslora"] is True
    theirs = peft.PeftModel.from_pretrained(load_hf(tiny_llama_dir, False), str(tmp_path)).eval()
    assert (logits(theirs, IDS) - logits(ours, IDS)).abs().max().item() < FP32_ATOL


def test_adapter_config_has_peft_fields(tiny_llama_dir, tmp_path):
    ours = load(tiny_llama_dir, False)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    apply_lora(ours, cfg)
    save_adapter(ours, cfg, tmp_path, "my/base")
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["bias"] == "none"
    assert (raw["r"], raw["lora_alpha"], raw["lora_dropout"], raw["use_rslora"]) == (4, 8.0, 0.05, False)
    assert raw["target_modules"] == ["q_proj", "v_proj"] and raw["base_model_name_or_path"] == "my/base"
    keys = set(load_file(str(tmp_path / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys and len(keys) == 8


def test_adapter_for_other_base_names_tensor_and_shapes(tiny_llama_dir, tmp_path):
    other_dir = tmp_path / "wide"
    build_tiny_model(other_dir, hidden_size=96, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=256)
    other = load(other_dir, False)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj"])
    apply_lora(other, cfg)
    save_adapter(other, cfg, tmp_path / "ad", str(other_dir))
    ours = load(tiny_llama_dir, False)
    with pytest.raises(AdapterError, match=r"q_proj\.lora_A\.weight has shape \(4, 96\).*needs \(4, 64\).*different base"):
        load_adapter(ours, tmp_path / "ad")
    assert lora_state_dict(ours) == {}  # nothing was half-applied


def test_missing_files_and_corrupt_weights(tiny_llama_dir, tmp_path):
    ours = load(tiny_llama_dir, False)
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_adapter(ours, tmp_path)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj"])
    donor = load(tiny_llama_dir, False)
    apply_lora(donor, cfg)
    save_adapter(donor, cfg, tmp_path, "x")
    weights = tmp_path / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated download
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        load_adapter(ours, tmp_path)
    weights.unlink()
    (tmp_path / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(AdapterError, match="pickle"):
        load_adapter(ours, tmp_path)
    (tmp_path / "adapter_model.bin").unlink()
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        load_adapter(ours, tmp_path)
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(ours, tmp_path)


def test_unsupported_peft_options_are_refused(tiny_llama_dir, tmp_path):
    theirs = peft.get_peft_model(load_hf(tiny_llama_dir, False), peft.LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    theirs.save_pretrained(str(tmp_path))
    with pytest.raises(AdapterError, match="use_dora"):
        load_adapter(load(tiny_llama_dir, False), tmp_path)


@pytest.mark.parametrize(
    "key, value",
    [("init_lora_weights", "pissa"), ("alora_invocation_tokens", [5, 6]), ("rank_pattern", {"q_proj": 8}), ("bias", "all"), ("target_parameters", ["mlp.experts"])],
)
def test_adapter_whose_maths_differ_is_refused_by_name(tiny_llama_dir, tmp_path, key, value):
    model = load(tiny_llama_dir, False)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj"])
    apply_lora(model, cfg)
    save_adapter(model, cfg, tmp_path, "x")
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    raw[key] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(raw))
    fresh = load(tiny_llama_dir, False)
    with pytest.raises(AdapterError, match=f"{key}=.*not supported"):
        load_adapter(fresh, tmp_path)
    assert lora_state_dict(fresh) == {}


# ---------------------------------------------------------------------------------------------
# Finding the base an adapter names
# ---------------------------------------------------------------------------------------------


def moved_message(name: str, adapter_dir, where: str = "") -> str:
    return (
        f"the adapter's base {name} ({adapter_dir}/adapter_config.json base_model_name_or_path) is not a folder here{where}; "
        "it may have moved: pass --base PATH"
    )


def folder_or_hub_message(name: str, adapter_dir, cwd, problem: str) -> str:
    return (
        f"the adapter's base {name} ({adapter_dir}/adapter_config.json base_model_name_or_path) is not a folder here "
        f"(relative to {cwd}) nor a model on the Hugging Face hub ({problem}): if it is a folder that moved or was "
        "relative to where training ran, pass --base PATH; if it is a hub id, check its spelling, the network, "
        "or your login (hf auth login) for a private model"
    )


OFFLINE = "HF_HUB_OFFLINE is set, so the hub was not asked"


def test_find_base_model_tells_a_moved_folder_from_a_hub_id(tiny_llama_dir, tmp_path, monkeypatch):
    from qlora_lite.methods import folder
    from qlora_lite.methods.folder import find_base_model

    monkeypatch.chdir(tmp_path)
    adapter = tmp_path / "adapter"

    def find(name: str, base: str | None = None) -> str:
        return find_base_model(adapter, {"base_model_name_or_path": name}, base)

    # a folder, absolute or relative to the current directory: used as it is
    assert find(str(tiny_llama_dir)) == str(tiny_llama_dir)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert find("models/tiny") == "models/tiny"
    assert find(str(tmp_path / "gone"), base="models/tiny") == "models/tiny"  # --base wins
    # a path that cannot be a hub id (absolute, ./, ~, two slashes): the folder has moved
    for name, where in [(str(tmp_path / "gone"), ""), ("./llama/model", f" (relative to {tmp_path})"), ("runs/llama/model", f" (relative to {tmp_path})")]:
        with pytest.raises(AdapterError) as err:
            find(name)
        assert str(err.value) == moved_message(name, adapter, where)
    # "llama/model" may be an old relative path or a hub id: neither is here (tests run offline)
    with pytest.raises(AdapterError) as err:
        find("llama/model")
    assert str(err.value) == folder_or_hub_message("llama/model", adapter, tmp_path, OFFLINE)
    # --base names the culprit itself
    with pytest.raises(AdapterError) as err:
        find(str(tiny_llama_dir), base=str(tmp_path / "gone"))
    assert str(err.value) == f"--base names base model {tmp_path / 'gone'}, which does not exist on this machine; pass --base PATH pointing at the model the adapter was trained on"
    with pytest.raises(AdapterError) as err:
        find(str(tiny_llama_dir), base="llama/model")
    assert str(err.value) == (
        f"--base llama/model is not a folder here (relative to {tmp_path}) nor a model on the Hugging Face hub ({OFFLINE}): "
        "pass the base model's folder, or a hub id the hub has (check its spelling, the network, or your login (hf auth login) for a private model)"
    )
    # a hub id the hub knows goes on to the loader as it is
    monkeypatch.setattr(folder, "find_hub_problem", lambda repo_id: None)
    assert find("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"


def test_find_hub_problem_reads_the_cache_offline_and_asks_the_hub_online(tmp_path, monkeypatch):
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from qlora_lite.model_paths import find_hub_problem

    # a model in the local hub cache is found offline, as transformers would load it
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    snapshot = tmp_path / "hub" / "models--org--cached" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--org--cached" / "refs").mkdir()
    (tmp_path / "hub" / "models--org--cached" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert find_hub_problem("org/cached") is None
    assert find_hub_problem("org/other") == OFFLINE

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    response = SimpleNamespace(headers={}, request=None)  # all the errors read of an HTTP response
    answers = {
        "org/real": None, "org/gated": GatedRepoError("401", response=response),
        "org/typo": RepositoryNotFoundError("404", response=response), "org/net": ConnectionError("down"),
    }  # fmt: skip

    def model_info(self, repo_id, **kwargs):
        assert kwargs.get("timeout") == 10  # a hub that does not answer must not hang the command
        if answers[repo_id] is not None:
            raise answers[repo_id]

    monkeypatch.setattr(HfApi, "model_info", model_info)
    assert find_hub_problem("org/real") is None
    assert find_hub_problem("org/gated") is None  # it exists: the loader says how to get access
    assert find_hub_problem("org/typo") == "the hub has no public model of that id"
    assert find_hub_problem("org/net") == "the hub could not be reached: ConnectionError"


@pytest.mark.parametrize("command", ["generate", "merge", "inspect-prompt"])
def test_cli_says_the_recorded_base_is_not_here(command, tiny_llama_dir, tokenizer, tmp_path, capsys, monkeypatch):
    """Every command that reads base_model_name_or_path says, in one line, that the base is not here and to pass --base."""
    from qlora_lite import cli
    from tests.helpers import cli_error, make_soft_prompt

    adapter = tmp_path / "adapter"
    if command == "inspect-prompt":
        make_soft_prompt(tiny_llama_dir, adapter, tokenizer, seed=1)
    else:
        model = load(tiny_llama_dir, False)
        apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]))
        randomize_lora_b(model)
        save_adapter(model, LoRAConfig(r=4, alpha=8, target_modules=["q_proj"]), adapter, str(tiny_llama_dir))
    argv = {
        "generate": ["generate", str(adapter), "hi", "--no-4bit", "--max-new-tokens", "2"],
        "merge": ["merge", str(adapter), "--out", str(tmp_path / "merged"), "--dtype", "fp32"],
        "inspect-prompt": ["inspect-prompt", str(adapter)],
    }[command]
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()  # the progress bars of making the adapter
    config = json.loads((adapter / "adapter_config.json").read_text())
    cases = [
        (str(tmp_path / "gone"), moved_message(str(tmp_path / "gone"), adapter)),
        ("./llama/model", moved_message("./llama/model", adapter, f" (relative to {tmp_path})")),
        ("llama/model", folder_or_hub_message("llama/model", adapter, tmp_path, OFFLINE)),
    ]
    for name, message in cases:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": name}))
        assert cli_error(argv, capsys) == f"error: {message}\n"
    assert not (tmp_path / "merged").exists()
    # the advice works
    assert cli.main([*argv, "--base", str(tiny_llama_dir)]) == 0
