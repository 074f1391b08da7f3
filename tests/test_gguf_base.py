"""A GGUF as the base (gguf_base.py): names resolved, the config read from the header, dequantized once, the round trip measured.

The GGUFs are our own exports (export_gguf, llama.cpp's converter) of tiny random models whose
weights are rounded to bf16 first: every such value is exact in f16 and in the bf16 cache, so an
f16 GGUF must give back the original logits to fp32 rounding (1e-5).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qlora_lite import cli, gguf_base
from qlora_lite.errors import GGUFError
from qlora_lite.gguf_base import (
    ensure_gguf_base,
    find_gguf_file,
    format_round_trip,
    measure_round_trip,
    read_gguf_config,
    read_gguf_header,
    read_gguf_source,
)
from qlora_lite.tiny import build_sentencepiece_tokenizer, build_tiny_model
from qlora_lite.verify import GGUF_REL_TOL, PROBE_PROMPTS

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
    reason="needs the gguf extra: pip install 'qlora-lite[gguf]'",
)
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
TEXTS = ["the quick brown fox jumps over the lazy dog", "The capital of France is Paris.", "Hello, world! 123 456", *PROBE_PROMPTS] * 10
CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
               "intermediate_size", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id")  # fmt: skip


def build_bf16_exact_model(folder: Path, architecture: str = "llama", hidden: int = 64, **kwargs) -> Path:
    """A tiny model whose weights are bf16 values, saved in fp32, with a SentencePiece tokenizer and a ChatML template."""
    tokenizer = build_sentencepiece_tokenizer(TEXTS, folder, vocab_size=256, control_symbols=["<|im_start|>", "<|im_end|>"], chat_template=CHATML)
    model = build_tiny_model(folder, architecture=architecture, vocab_size=len(tokenizer), hidden_size=hidden, num_heads=4, num_kv_heads=2,
                             intermediate_size=2 * hidden, **kwargs)  # fmt: skip
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    model.save_pretrained(folder)
    return folder


def export(folder: Path, out: Path, gguf_type: str) -> Path:
    from qlora_lite.export.gguf import export_gguf

    export_gguf(folder, out, gguf_type, prompt_format="chat", verify=False)  # the export's own check is test_gguf.py's; here the base's is measured
    return out


def convert_directly(folder: Path, out: Path, gguf_type: str) -> Path:
    """llama.cpp's converter without export-gguf's checks: transformers' Qwen2Tokenizer rebuilds a SentencePiece
    vocabulary as byte-level BPE, so the export refuses a Qwen2 folder with tokenizer.model (its tokenization check)."""
    from qlora_lite.llama_cpp import convert_model, find_converter

    shutil.move(convert_model(find_converter(), folder, gguf_type, None, out.parent), out)
    return out


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    """Each test module's own cache of dequantized bases (the converter stays in the shared cache)."""
    folder = tmp_path_factory.mktemp("gguf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf_base, "cache_root", lambda: folder)
        yield folder


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory, gguf_cache):
    """A tiny Llama (hidden 256: real Q4_K rows) at f16, q8_0 and q4_k_m, and a tiny Qwen2 at q8_0."""
    root = tmp_path_factory.mktemp("ggufs")
    llama = build_bf16_exact_model(root / "llama-hf", hidden=256)
    qwen2 = build_bf16_exact_model(root / "qwen2-hf", architecture="qwen2")
    files = {t: export(llama, root / f"llama-{t}.gguf", t) for t in ("f16", "q8_0", "q4_k_m")}
    files["qwen2-q8_0"] = convert_directly(qwen2, root / "qwen2-q8_0.gguf", "q8_0")
    return {"llama": llama, "qwen2": qwen2, **files}


def logits_of(folder: Path, ids: list[int]) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


# ---------------------------------------------------------------------------- the config, from the header alone


@pytest.mark.parametrize("name, original", [("f16", "llama"), ("q4_k_m", "llama"), ("qwen2-q8_0", "qwen2")])
def test_the_config_comes_from_the_header_as_transformers_reads_it_and_nothing_is_dequantized(ggufs, gguf_cache, name, original):
    path = ggufs[name]
    ours = read_gguf_config(str(path))
    theirs = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    source = AutoConfig.from_pretrained(str(ggufs[original]))
    for key in CONFIG_KEYS:
        assert getattr(ours, key, None) == getattr(theirs, key, None), key
        expected = getattr(source, key, None)
        if key != "model_type" and expected is not None:  # GGUF stores floats in 32 bits: eps 1e-6 comes back as 9.99999997e-07
            assert getattr(ours, key, None) == pytest.approx(expected, rel=1e-7), key
    assert ours.model_type == source.model_type
    assert not (gguf_cache / "gguf").exists() or not any((gguf_cache / "gguf").glob("*-bf16"))  # the planner's read dequantizes nothing


def test_the_planner_plans_a_gguf_base_from_its_metadata(ggufs, gguf_cache, capsys):
    assert cli.main(["plan", str(REPO / "recipes" / "tiny-demo.yaml"), f"model.name_or_path={ggufs['q4_k_m']}"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for" in out and "fits" in out
    assert not any((gguf_cache / "gguf").glob("*-bf16"))


def test_the_header_reader_keeps_the_vocabulary_as_its_length(ggufs):
    header = read_gguf_header(ggufs["f16"])
    tokenizer = AutoTokenizer.from_pretrained(str(ggufs["llama"]))
    assert header.metadata["tokenizer.ggml.tokens"] == len(tokenizer)
    assert header.metadata["tokenizer.chat_template"] == CHATML
    assert header.metadata["general.architecture"] == "llama"
    layers = AutoConfig.from_pretrained(str(ggufs["llama"])).num_hidden_layers
    assert len(header.tensors) == 2 + layers * 9 + 1  # token_embd, output_norm, output + 9 per block (4 attn, 3 ffn, 2 norms)
    assert header.tensors["blk.0.ffn_down.weight"].shape == (512, 256)  # ggml order: the row (in_features) first


# ---------------------------------------------------------------------------- dequantized once, the round trip


def test_an_f16_gguf_base_gives_the_original_logits_and_tokenizer(ggufs, gguf_cache):
    folder = ensure_gguf_base(str(ggufs["f16"]))
    assert folder.parent == gguf_cache / "gguf" and folder.name == hashlib.sha256(ggufs["f16"].read_bytes()).hexdigest()[:32] + "-bf16"
    source = read_gguf_source(folder)
    assert source["file_type"] == "F16" and source["tensor_types"] == {"F16": 2 + 2 * 7, "F32": 2 * 2 + 1} and source["probes"] == len(PROBE_PROMPTS)
    original, ours = AutoTokenizer.from_pretrained(str(ggufs["llama"])), AutoTokenizer.from_pretrained(str(folder))
    texts = [*PROBE_PROMPTS, original.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True, tokenize=False)]
    for text in texts:  # the chat text too: the word-start mark after <|im_start|>, as llama.cpp and sentencepiece put it
        assert ours(text)["input_ids"] == original(text)["input_ids"], text
    assert ours.chat_template == CHATML and source["tokenization_differs"] == []
    ids = original(PROBE_PROMPTS[2])["input_ids"]
    difference = (logits_of(folder, ids) - logits_of(ggufs["llama"], ids)).abs().max().item()
    assert difference < 1e-5, difference  # bf16-exact weights survive f16 and the bf16 cache bit for bit
    assert source["dequantized_vs_llama_cpp"] < GGUF_REL_TOL["f16"]
    assert ensure_gguf_base(str(ggufs["f16"])) == folder  # the second time: the cache, nothing rebuilt
    assert (folder / "gguf_source.json").stat().st_mtime_ns == (folder / "gguf_source.json").stat().st_mtime_ns


@pytest.mark.parametrize("name, types", [("q8_0", {"Q8_0": 16, "F32": 5}), ("q4_k_m", {"Q4_K": 13, "Q6_K": 3, "F32": 5})])
def test_quantized_ggufs_report_the_round_trip_of_the_dequantized_and_the_4_bit_base(ggufs, gguf_cache, name, types):
    from qlora_lite.config import ModelConfig, QuantConfig
    from qlora_lite.quant import load_base_model

    folder = ensure_gguf_base(str(ggufs[name]))
    source = read_gguf_source(folder)
    assert source["tensor_types"] == types
    model = load_base_model(ModelConfig(name_or_path=str(folder)), QuantConfig(compute_dtype="float32"), torch.device("cpu"), str(folder))
    result = measure_round_trip(model, folder)
    print(name, format_round_trip(result))
    assert result["event"] == "gguf_round_trip" and result["source"] == str(ggufs[name]) and result["file_type"] == name.upper()
    # dequantizing: the GGUF's own values, rounded to bf16; llama.cpp differs by its activation rounding
    assert 0 < result["dequantized_vs_llama_cpp"] < GGUF_REL_TOL[name]
    # quantizing again to NF4 (random weights, std 0.02, 2 layers): measured 0.168 (q8_0) and 0.198 (q4_k_m)
    assert result["dequantized_vs_llama_cpp"] < result["loaded_vs_llama_cpp"] < 0.3


def test_llama3_rope_scaling_is_recovered_from_rope_freqs(tmp_path, gguf_cache):
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}  # fmt: skip
    folder = build_bf16_exact_model(tmp_path / "hf", hidden=256)  # head_dim 64: frequencies inside the smoothed band, which fix low, high, orig
    config = AutoConfig.from_pretrained(str(folder))
    config.rope_parameters = rope
    config.save_pretrained(folder)
    path = export(folder, tmp_path / "rope.gguf", "f16")
    assert "rope_freqs.weight" in read_gguf_header(path).tensors  # llama.cpp's only record of the scaling
    assert AutoConfig.from_pretrained(str(tmp_path), gguf_file="rope.gguf").rope_parameters["rope_type"] == "default"  # transformers drops it
    assert read_gguf_config(str(path)).rope_parameters == rope
    cached = ensure_gguf_base(str(path))
    assert json.loads((cached / "config.json").read_text())["rope_parameters"] == rope
    ids = [2] + torch.randint(4, 200, (300,), generator=torch.Generator().manual_seed(0)).tolist()  # past 64: the scaling matters
    assert (logits_of(cached, ids) - logits_of(folder, ids)).abs().max().item() < 1e-5


def test_fit_on_a_gguf_base_logs_the_round_trip(ggufs, gguf_cache, tmp_path):
    from qlora_lite.config import load_recipe
    from qlora_lite.training.fit import fit

    cfg = load_recipe(REPO / "recipes" / "tiny-demo.yaml", [
        f"model.name_or_path={ggufs['q4_k_m']}", f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=0",
        "train.exact_match_examples=0", "train.save_every=0", "train.max_seq_len=256",  # this tokenizer spells the demo's words in more pieces
    ])  # fmt: skip
    fit(cfg)
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    trip = [e for e in events if e.get("event") == "gguf_round_trip"]
    assert len(trip) == 1 and trip[0]["file_type"] == "Q4_K_M" and 0 < trip[0]["loaded_vs_llama_cpp"] < 0.3
    adapter = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == ensure_gguf_base(str(ggufs["q4_k_m"]))  # the cached folder: PEFT loads it too


# ---------------------------------------------------------------------------- names: Ollama, LM Studio


def write_ollama_store(root: Path, gguf: Path, name: str = "library/tiny", tag: str = "latest", host: str = "registry.ollama.ai") -> str:
    digest = hashlib.sha256(gguf.read_bytes()).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    shutil.copy(gguf, root / "blobs" / f"sha256-{digest}")
    manifest = root / "manifests" / host / name / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layers = [{"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": gguf.stat().st_size},
              {"mediaType": "application/vnd.ollama.image.template", "digest": "sha256:" + "0" * 64, "size": 10}]  # fmt: skip
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": layers}))
    return digest


def test_ollama_names_resolve_through_the_manifest(ggufs, tmp_path, monkeypatch):
    store = tmp_path / "ollama"
    digest = write_ollama_store(store, ggufs["q8_0"])
    write_ollama_store(store, ggufs["f16"], name="user/Tiny-GGUF", tag="F16", host="hf.co")
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    blob = store / "blobs" / f"sha256-{digest}"
    assert find_gguf_file("ollama:tiny") == find_gguf_file("ollama:tiny:latest") == find_gguf_file("ollama:library/tiny") == blob
    assert find_gguf_file("ollama:hf.co/user/Tiny-GGUF:F16").read_bytes() == ggufs["f16"].read_bytes()
    assert gguf_base.hash_file(blob) == digest  # an Ollama blob's name is its sha256: nothing to hash
    with pytest.raises(GGUFError, match=r"Ollama has no model tiny:q4 in .* \(it has: hf.co/user/Tiny-GGUF:F16, tiny:latest\); `ollama pull tiny:q4` first"):
        find_gguf_file("ollama:tiny:q4")
    (store / "blobs" / f"sha256-{digest}").unlink()
    with pytest.raises(GGUFError, match=r"ollama:tiny: its model file .* is missing from the store; `ollama pull tiny:latest` again"):
        find_gguf_file("ollama:tiny")
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "latest"
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": []}))
    with pytest.raises(GGUFError, match="names no model file"):
        find_gguf_file("ollama:tiny")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "nowhere"))
    with pytest.raises(GGUFError, match=r"there is no Ollama model store at .*nowhere \(no manifests folder\); set OLLAMA_MODELS"):
        find_gguf_file("ollama:tiny")
    with pytest.raises(GGUFError, match="is not an Ollama model name"):
        find_gguf_file("ollama:a/b/c/d")


def test_an_lm_studio_folder_means_its_one_model(ggufs, tmp_path):
    folder = tmp_path / "lmstudio" / "publisher" / "Tiny-GGUF"
    folder.mkdir(parents=True)
    shutil.copy(ggufs["q8_0"], folder / "tiny-q8_0.gguf")
    shutil.copy(ggufs["f16"], folder / "mmproj-tiny-f16.gguf")  # a vision projector's name: left out
    assert gguf_base.is_gguf_name(str(folder)) and find_gguf_file(str(folder)) == folder / "tiny-q8_0.gguf"
    shutil.copy(ggufs["q4_k_m"], folder / "tiny-q4_k_m.gguf")
    with pytest.raises(GGUFError, match=r"holds 2 GGUF models \(tiny-q4_k_m.gguf, tiny-q8_0.gguf\); name the one to train"):
        find_gguf_file(str(folder))


# ---------------------------------------------------------------------------- what cannot work, in one line


def write_gguf(path: Path, arch: str, kind: str = "model") -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(kind)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_files_that_cannot_be_a_base_are_refused_in_one_line(ggufs, tmp_path, monkeypatch, capsys):
    (tmp_path / "notes.gguf").write_text("hello")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(ggufs["f16"].read_bytes()[:2000])
    shutil.copy(ggufs["f16"], tmp_path / "model-00001-of-00002.gguf")
    cases = {
        str(tmp_path / "missing.gguf"): r"GGUF file .*missing.gguf does not exist; check model.name_or_path",
        str(tmp_path / "notes.gguf"): r"is not a GGUF file \(it does not start with 'GGUF'\)",
        str(truncated): r"cut.gguf is not a complete GGUF file \(its header is cut short or corrupt: .*\); download it again",
        str(tmp_path / "model-00001-of-00002.gguf"): r"is one part of a split GGUF; merge the parts first \(llama-gguf-split --merge",
        str(write_gguf(tmp_path / "bert.gguf", "bert")): r"holds a 'bert' model; as a GGUF base qlora-lite reads llama, mistral, qwen2",
        str(write_gguf(tmp_path / "lora.gguf", "llama", kind="adapter")): r"lora.gguf is not a model GGUF \(general.type adapter\); name the model file itself",
    }
    for name, message in cases.items():
        with pytest.raises(GGUFError, match=message):
            read_gguf_config(name)
        # the CLI: one line, exit 2, before any model loads
        assert cli.main(["plan", str(REPO / "recipes" / "tiny-demo.yaml"), f"model.name_or_path={name}"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    header = read_gguf_header(ggufs["q4_k_m"])
    header.tensors["blk.0.ffn_down.weight"].ggml_type = 4  # Q4_2: dropped from ggml in 2023, which no gguf release dequantizes
    with pytest.raises(GGUFError, match=r"llama-q4_k_m.gguf has tensors of type 4, which the gguf package \(gguf [0-9.]+\) cannot dequantize; "
                                        r"use a file of another quantization \(Q4_K_M, Q5_K_M, Q8_0, F16 all work\)"):
        gguf_base.check_dequantizable(header)
    gguf_base.check_dequantizable(read_gguf_header(ggufs["q4_k_m"]))  # Q4_K, Q6_K, F32: all readable
    monkeypatch.setitem(__import__("sys").modules, "gguf", None)  # the extra not installed
    with pytest.raises(GGUFError, match=r"dequantized by transformers through the gguf package, which is missing; pip install 'qlora-lite\[gguf\]'"):
        gguf_base.check_dequantizable(read_gguf_header(ggufs["f16"]))
