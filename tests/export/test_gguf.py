"""export-gguf, checked by llama.cpp itself: the demo's trained adapter answers in llama.cpp as `generate` does.

These tests run llama.cpp for real: its converter (from llama-cpp-python's source distribution,
downloaded once into the qlora-lite cache) and its library through the binding (the gguf extra,
which CI installs). They train the demo (the demo base is built once and cached, as `train`
does) and export it, so they are the slowest file of the suite; see README for the CI time.

Measured on the demo (2-layer Llama, hidden 128, largest |logit| 13.4), llama.cpp on the GGUF
against transformers on the merged fp32 model, last token of the 200 held-out prompts: f16 max
|logit difference| 2.5e-3, q8_0 7.2e-2; greedy answers equal `generate`'s on all 200 at both
types (and are all right). The LoRA GGUF on the f16 base GGUF against the merged
f16 GGUF 3.4e-3; a random-weight Phi-3 at f16 3.0e-3. The tolerances below leave 4-8x room.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qlora_lite import cli
from qlora_lite.data.formats import DEFAULT_CHAT_TEMPLATE
from qlora_lite.errors import GGUFError
from qlora_lite.export.gguf import GGUFReport, export_gguf, format_gguf_report
from qlora_lite.llama_cpp import LlamaCppModel, describe_crash, ensure_tested_converter, tokenize_in_child
from qlora_lite.export.templates import PromptLayout, build_alpaca_template, build_modelfile, render_pieces, split_template
from qlora_lite.tiny import build_sentencepiece_tokenizer, build_tiny_model

REPO = Path(__file__).resolve().parents[2]
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs the gguf extra: pip install 'qlora-lite[gguf]'"
)
# llama.cpp on the GGUF vs transformers on the merged fp32 model, max |last-token logit difference|
# over the held-out prompts (measured 2.5e-3 and 7.2e-2; see the module docstring).
F16_ATOL = 2e-2
Q8_0_ATOL = 0.3
# The LoRA GGUF applied by llama.cpp on the f16 base GGUF vs the merged f16 GGUF: both round the
# weights to f16, one after adding the delta and one before (measured 3.4e-3).
LORA_ATOL = 2e-2
NUM_HELD_OUT = 200  # every held-out prompt, answered both ways
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------------------------
# Fixtures: the demo trained once, exported once per type
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """The demo recipe trained as `qlora-lite train recipes/tiny-demo.yaml` does (its base from the cache)."""
    from qlora_lite.config import load_recipe
    from qlora_lite.training.fit import fit

    out = tmp_path_factory.mktemp("demo-run")
    cfg = load_recipe(REPO / "recipes" / "tiny-demo.yaml", [f"output_dir={out}", "train.exact_match_examples=0", "train.save_every=0"])
    fit(cfg)
    return out / "adapter"


@pytest.fixture(scope="session")
def held_out():
    from qlora_lite.demo import make_demo_records

    return make_demo_records()[1][:NUM_HELD_OUT]


@pytest.fixture(scope="session")
def demo_merged(demo_run, tmp_path_factory):
    """`qlora-lite merge` of the demo adapter: it carries the base's tokenizer.model and the adapter's qlora_lite.json."""
    from qlora_lite.export.merge import merge_adapter
    from qlora_lite.methods.folder import read_adapter_json

    out = tmp_path_factory.mktemp("demo-merged") / "merged"
    merge_adapter(demo_run, out)
    base = Path(read_adapter_json(demo_run)["base_model_name_or_path"])
    assert (out / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    assert json.loads((out / "qlora_lite.json").read_text())["data_format"] == "alpaca"
    return out


@pytest.fixture(scope="session")
def demo_gguf(demo_run, demo_merged, tmp_path_factory):
    """The demo as GGUF: f16 from the adapter folder (merged on the way), q8_0 from the merged folder."""
    folder = tmp_path_factory.mktemp("demo-gguf")
    reports = {
        "f16": export_gguf(demo_run, folder / "demo-f16.gguf", "f16", ollama=True),
        "q8_0": export_gguf(demo_merged, folder / "demo-q8_0.gguf", "q8_0", prompt_format="alpaca"),
    }
    return reports


@pytest.fixture(scope="session")
def generate_answers(demo_run, held_out):
    """What `qlora-lite generate ADAPTER_DIR --input WORD INSTRUCTION` answers: (prompt ids, new ids, text) per record.

    The text as generate_answer makes it from the new ids (cut at the stop token, decoded without special tokens).
    """
    from qlora_lite.generate import GenerationSettings, build_prompt_ids, collect_eos_ids, cut_at_stop, generate_ids, open_switcher

    switcher = open_switcher({"adapter": demo_run})
    switcher.use("adapter")
    settings = GenerationSettings(max_new_tokens=16)
    stop_ids = collect_eos_ids(switcher.tokenizer, switcher.active_model)
    answers = []
    for record in held_out:
        ids = build_prompt_ids(record["instruction"], "alpaca", switcher.tokenizer, input_text=record["input"])
        new = generate_ids(switcher.active_model, switcher.tokenizer, ids, settings)
        answers.append((ids, new, switcher.tokenizer.decode(cut_at_stop(new, stop_ids), skip_special_tokens=True)))
    return answers


def merged_last_logits(merged_dir: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0, -1].numpy() for ids in prompts]


# ---------------------------------------------------------------------------------------------
# The demo in llama.cpp
# ---------------------------------------------------------------------------------------------


@needs_llama_cpp
@pytest.mark.parametrize("gguf_type", ["f16", "q8_0"])
def test_demo_gguf_answers_held_out_prompts_as_generate_does(demo_gguf, generate_answers, held_out, gguf_type):
    from qlora_lite.demo import format_demo_prompt

    same, same_text, right = 0, 0, 0
    with LlamaCppModel(demo_gguf[gguf_type].out) as model:
        for record, (prompt_ids, answer_ids, answer_text) in zip(held_out, generate_answers):
            ids = model.tokenize(format_demo_prompt(record))  # the prompt text, as a server receives it
            assert ids == prompt_ids  # BOS, template and word: llama.cpp's SentencePiece tokenizer agrees
            new = model.generate(ids, max_new_tokens=16)
            same += new == answer_ids
            # llama.cpp's text of its answer, decoded as generate decodes: no word-start space, no EOS
            same_text += model.detokenize(new) == answer_text
            right += model.detokenize(new) == record["output"]
            assert new[-1] == 3 and model.is_end_of_generation(new[-1])  # it stops at EOS, as trained
    assert same == len(held_out), f"{same} of {len(held_out)} answers equal generate's (greedy)"
    assert same_text == len(held_out) and right == len(held_out)


@needs_llama_cpp
def test_demo_gguf_logits_equal_transformers(demo_gguf, demo_merged, generate_answers):
    prompts = [ids for ids, *_ in generate_answers]
    reference = merged_last_logits(demo_merged, prompts)
    largest = max(float(abs(r).max()) for r in reference)
    for gguf_type, atol in (("f16", F16_ATOL), ("q8_0", Q8_0_ATOL)):
        with LlamaCppModel(demo_gguf[gguf_type].out) as model:
            diff = max(float(abs(model.last_logits(ids) - r).max()) for ids, r in zip(prompts, reference))
        print(f"{gguf_type}: max |logit difference| {diff:.3g} (max |logit| {largest:.3g})")
        assert diff <= atol, gguf_type
    assert largest > 5  # a trained model's confident logits, not near-zero ones that would match anything


@needs_llama_cpp
def test_demo_gguf_metadata_holds_template_and_stop_token(demo_gguf):
    report = demo_gguf["f16"]
    assert report.layout.data_format == "alpaca" and report.max_logit_diff <= report.threshold
    with LlamaCppModel(report.out) as model:
        assert model.metadata("tokenizer.chat_template") == build_alpaca_template()
        assert model.metadata("tokenizer.ggml.eos_token_id") == "3" and model.metadata("tokenizer.ggml.bos_token_id") == "2"
        assert model.metadata("tokenizer.ggml.add_bos_token") == "true"
        assert model.metadata("tokenizer.ggml.model") == "llama"  # the SentencePiece path, from tokenizer.model
    # The template renders a user message exactly as training's alpaca prompt (no input) and an answer + EOS.
    layout = report.layout
    rendered = render_pieces(split_template(layout), [("user", "Say hi."), ("assistant", "hi")])
    from qlora_lite.data.formats import ALPACA_PROMPT_NO_INPUT

    assert rendered == ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.") + "hi</s>"


@needs_llama_cpp
def test_demo_modelfile_for_ollama(demo_gguf):
    from qlora_lite.data.formats import ALPACA_PROMPT_NO_INPUT

    report = demo_gguf["f16"]
    text = report.modelfile.read_text()
    assert report.modelfile == report.out.with_suffix(".Modelfile")
    assert "FROM ./demo-f16.gguf\n" in text and 'PARAMETER stop "</s>"' in text and "SYSTEM" not in text
    before, after = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    assert f'{{{{ if eq .Role "user" }}}}{before}{{{{ .Content }}}}{after}' in text
    assert '{{ else if eq .Role "assistant" }}{{ .Content }}</s>' in text


@needs_llama_cpp
def test_merged_folder_without_tokenizer_model_is_refused(demo_merged, tmp_path):
    # Without tokenizer.model the converter rebuilds a SentencePiece vocabulary from tokenizer.json
    # (its llama_hf path), which tokenizes the demo differently: the tokenization check catches it.
    folder = shutil.copytree(demo_merged, tmp_path / "merged")
    (folder / "tokenizer.model").unlink()
    with pytest.raises(GGUFError, match="tokenizes .* differently from transformers .*has no SentencePiece tokenizer.model"):
        export_gguf(folder, tmp_path / "m.gguf", prompt_format="alpaca", verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@needs_llama_cpp
def test_lora_gguf_on_base_gguf_equals_merged_gguf(demo_run, demo_gguf, generate_answers, tmp_path):
    from qlora_lite.methods.folder import read_adapter_json

    base_dir = read_adapter_json(demo_run)["base_model_name_or_path"]
    base = export_gguf(base_dir, tmp_path / "base-f16.gguf", "f16", prompt_format="alpaca")
    lora = export_gguf(demo_run, tmp_path / "lora-f16.gguf", "f16", lora_only=True)
    assert lora.lora_only and lora.size_bytes < base.size_bytes / 4
    # Under 1 MiB the size reads in KiB (it was "0.0 MiB"): the demo's LoRA is about 50 KiB.
    assert lora.size_bytes < 2**20 and format_gguf_report(lora).splitlines()[0] == (
        f"wrote {lora.out} (GGUF LoRA, f16, {lora.size_bytes / 2**10:.1f} KiB) with {lora.converter}"
    )
    prompts = [ids for ids, *_ in generate_answers[:20]]
    with LlamaCppModel(demo_gguf["f16"].out) as merged:
        expected = [merged.last_logits(ids) for ids in prompts]
    with LlamaCppModel(base.out, lora_path=lora.out) as served:
        assert served.metadata("general.type") == "adapter" and float(served.metadata("adapter.lora.alpha")) == 16
        diff = max(float(abs(served.last_logits(ids) - e).max()) for ids, e in zip(prompts, expected))
        answers = [served.generate(ids, max_new_tokens=16) for ids in prompts]
    print(f"LoRA GGUF on base GGUF vs merged GGUF: max |logit difference| {diff:.3g}")
    assert diff <= LORA_ATOL
    assert answers == [new for _, new, _ in generate_answers[:20]]
    with LlamaCppModel(base.out) as plain:  # without the LoRA the base does not know the format: the adapter matters
        assert max(float(abs(plain.last_logits(ids) - e).max()) for ids, e in zip(prompts, expected)) > 1


@needs_llama_cpp
def test_lora_only_folds_the_rslora_scale_into_alpha(sp_llama_dir, tmp_path):
    # llama.cpp scales a LoRA by alpha / r; rsLoRA by alpha / sqrt(r) (twice as much here, r=4).
    from qlora_lite.config import LoRAConfig
    from qlora_lite.methods.lora import apply_lora, save_adapter

    model = AutoModelForCausalLM.from_pretrained(str(sp_llama_dir), dtype=torch.float32)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", dtype="float32", use_rslora=True)
    apply_lora(model, cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(2)) * 0.2)
    save_adapter(model, cfg, tmp_path / "adapter", str(sp_llama_dir))
    merged = export_gguf(tmp_path / "adapter", tmp_path / "merged.gguf", prompt_format="text")
    base = export_gguf(sp_llama_dir, tmp_path / "base.gguf", prompt_format="text")
    lora = export_gguf(tmp_path / "adapter", tmp_path / "lora.gguf", lora_only=True)
    prompts = [[2, 10, 20, 30, 40, 50], [2, 60, 70, 80]]
    with LlamaCppModel(merged.out) as model:
        expected = [model.last_logits(ids) for ids in prompts]
    with LlamaCppModel(base.out) as plain:
        assert max(float(abs(plain.last_logits(ids) - e).max()) for ids, e in zip(prompts, expected)) > 0.05
    with LlamaCppModel(base.out, lora_path=lora.out) as served:
        assert max(float(abs(served.last_logits(ids) - e).max()) for ids, e in zip(prompts, expected)) <= LORA_ATOL


# ---------------------------------------------------------------------------------------------
# A second architecture: Phi-3 (fused qkv and gate_up projections) with a SentencePiece tokenizer and ChatML
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def chat_adapter(tmp_path_factory):
    """A chat-format LoRA (random non-zero B) on a tiny Phi-3 whose tokenizer ends turns with <|im_end|>, not EOS.

    Phi-3, not Qwen2: llama.cpp converts Qwen2 with a SentencePiece tokenizer too, but transformers
    5.24 loads any Qwen2 tokenizer as a byte-level one (Qwen2Tokenizer rebuilds it from the vocabulary),
    so training would not tokenize as the file says.
    """
    from qlora_lite.config import LoRAConfig
    from qlora_lite.methods.folder import write_prompt_info
    from qlora_lite.methods.lora import apply_lora, save_adapter

    base = tmp_path_factory.mktemp("phi3-sp")
    texts = ["<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\nBlue is a colour.<|im_end|>\n"] * 10
    texts += ["the quick brown fox jumps over the lazy dog 0123456789", "Below is an instruction that describes a task."] * 10
    tokenizer = build_sentencepiece_tokenizer(texts, base, vocab_size=200, control_symbols=["<|im_start|>", "<|im_end|>"], chat_template=CHATML)
    build_tiny_model(base, architecture="phi3", vocab_size=len(tokenizer), initializer_range=0.1)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", dtype="float32")
    apply_lora(model, cfg)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    adapter = tmp_path_factory.mktemp("phi3-chat") / "adapter"
    save_adapter(model, cfg, adapter, str(base))
    tokenizer.save_pretrained(str(adapter))  # as training saves it (no tokenizer.model: export finds the base's)
    write_prompt_info(adapter, "chat")
    return adapter


@needs_llama_cpp
def test_second_architecture_phi3_chat_template_and_end_of_turn(chat_adapter, tmp_path):
    from qlora_lite.export.merge import merge_adapter

    report = export_gguf(chat_adapter, tmp_path / "chat-f16.gguf", "f16", ollama=True)
    assert report.layout.end_of_turn == "<|im_end|>" and report.layout.end_of_turn_id != report.layout.eos_id
    merged = merge_adapter(chat_adapter, tmp_path / "merged").out_dir
    tokenizer = AutoTokenizer.from_pretrained(str(chat_adapter))
    conversation = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"}]
    text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    prompts = [tokenizer(text)["input_ids"], tokenizer("the lazy dog")["input_ids"]]
    reference = merged_last_logits(merged, prompts)
    with LlamaCppModel(report.out) as model:
        assert model.metadata("general.architecture") == "phi3"
        assert model.metadata("tokenizer.chat_template") == CHATML
        im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
        assert model.metadata("tokenizer.ggml.eot_token_id") == str(im_end)
        assert model.metadata("tokenizer.ggml.eos_token_id") == str(tokenizer.eos_token_id) == "3"
        assert model.is_end_of_generation(im_end) and model.is_end_of_generation(tokenizer.eos_token_id)
        assert model.tokenize(text) == prompts[0]  # <|im_start|> and <|im_end|> as single special tokens
        diff = max(float(abs(model.last_logits(ids) - r).max()) for ids, r in zip(prompts, reference))
    print(f"phi3 f16: max |logit difference| {diff:.3g}")
    assert diff <= F16_ATOL
    modelfile = report.modelfile.read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and 'PARAMETER stop "</s>"' in modelfile
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in modelfile
    assert '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}' in modelfile


# ---------------------------------------------------------------------------------------------
# Ollama templates read off chat templates (no llama.cpp needed)
# ---------------------------------------------------------------------------------------------

QWEN25 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
REWRITING = "{% for message in messages %}{{ message['role'] + ': ' + message['content'] + ' (of ' + messages | length | string + ')\\n' }}{% endfor %}"


@pytest.mark.parametrize(
    "template, system, stops",
    [(DEFAULT_CHAT_TEMPLATE, None, ["</s>"]), (CHATML, None, ["<|im_end|>", "</s>"]), (QWEN25, "You are a helpful assistant.", ["<|im_end|>", "</s>"])],
)
def test_modelfile_template_renders_conversations_as_the_chat_template(template, system, stops):
    end = stops[0]
    layout = PromptLayout("chat", template, "</s>", 3, end, 3 if end == "</s>" else 7)
    text = build_modelfile("m.gguf", layout)
    assert (f'SYSTEM """{system}"""' in text) == bool(system)
    assert [line.split(" ", 2)[2] for line in text.splitlines() if line.startswith("PARAMETER stop")] == [json.dumps(s) for s in stops]
    pieces = split_template(layout)
    tokenizer_kwargs = {"eos_token": "</s>", "bos_token": ""}
    from transformers.utils.chat_template_utils import render_jinja_template

    for conversation in (
        [("user", "Hi")],
        [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "Bye")],
        [("user", "Hi"), ("assistant", "Hello."), ("user", "Again"), ("assistant", "Hello again.")],
    ):
        messages = [{"role": r, "content": c} for r, c in conversation]
        generation = conversation[-1][0] != "assistant"
        expected = render_jinja_template(conversations=[messages], chat_template=template, add_generation_prompt=generation, **tokenizer_kwargs)[0][0]
        assert render_pieces(pieces, conversation) == expected


def test_modelfile_refuses_a_template_that_rewrites_earlier_turns():
    layout = PromptLayout("chat", REWRITING, "</s>", 3, "</s>", 3)
    with pytest.raises(GGUFError, match="cannot be written as an Ollama TEMPLATE .*drop --ollama"):
        build_modelfile("m.gguf", layout)


# ---------------------------------------------------------------------------------------------
# Bad inputs: one line each, nothing half-written
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def sp_llama_dir(tmp_path_factory):
    """A tiny Llama with a SentencePiece tokenizer: a model folder llama.cpp converts."""
    folder = tmp_path_factory.mktemp("llama-sp")
    tokenizer = build_sentencepiece_tokenizer(["the quick brown fox jumps over the lazy dog"] * 10, folder, vocab_size=150)
    build_tiny_model(folder, architecture="llama", vocab_size=len(tokenizer))
    return folder


def read_error(capsys) -> str:
    """The CLI's stderr less library progress bars (a model saved in the test may draw one): one error line."""
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines(keepends=True) if "Writing model shards" not in line]
    return "".join(line for line in lines if line.strip())


def test_missing_extra_names_it(sp_llama_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were not installed
    with pytest.raises(GGUFError, match=r"needs llama.cpp's Python binding \(llama-cpp-python\): pip install 'qlora-lite\[gguf\]'"):
        export_gguf(sp_llama_dir, tmp_path / "m.gguf")
    assert cli.main(["export-gguf", str(sp_llama_dir), "--out", str(tmp_path / "m.gguf")]) == 2
    err = read_error(capsys)
    assert err.count("\n") == 1 and "pip install 'qlora-lite[gguf]'" in err
    assert not list(tmp_path.iterdir())


@needs_llama_cpp
def test_architecture_llama_cpp_cannot_convert(sp_llama_dir, tmp_path, capsys):
    folder = tmp_path / "opt"
    config = AutoConfig.for_model("opt", vocab_size=150, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64, word_embed_proj_dim=32)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(folder))
    for name in ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(sp_llama_dir / name, folder / name)
    assert cli.main(["export-gguf", str(folder), "--out", str(tmp_path / "opt.gguf")]) == 2
    err = read_error(capsys)
    assert err.startswith("error: llama.cpp cannot convert architecture OPTForCausalLM") and err.count("\n") == 1
    assert "qlora-lite merge" in err and not (tmp_path / "opt.gguf").exists()


@needs_llama_cpp
def test_tokenizer_the_converter_refuses_leaves_nothing(tiny_qwen2_dir, tmp_path, capsys):
    # conftest's tokenizer is a `tokenizers` byte-pair model with no tokenizer.model: llama.cpp knows BPE
    # pre-tokenizers only by the hash of released models', so it refuses it (as it refused the old demo).
    out = tmp_path / "out" / "m.gguf"
    assert cli.main(["export-gguf", str(tiny_qwen2_dir), "--out", str(out), "--ollama"]) == 2
    err = read_error(capsys)
    assert err.startswith("error: llama.cpp's converter refused") and "tokenizer.model" in err and err.count("\n") == 1
    assert list((tmp_path / "out").iterdir()) == []  # no GGUF, no Modelfile, no temporary folder


@needs_llama_cpp
def test_adapters_that_cannot_merge_are_refused(sp_llama_dir, tmp_path):
    from qlora_lite.config import BottleneckConfig
    from qlora_lite.methods.bottleneck import apply_bottleneck, save_bottleneck

    model = AutoModelForCausalLM.from_pretrained(str(sp_llama_dir), dtype=torch.float32)
    apply_bottleneck(model, BottleneckConfig(size=4))
    save_bottleneck(model, BottleneckConfig(size=4), tmp_path / "bottleneck", str(sp_llama_dir))
    with pytest.raises(GGUFError, match="cannot export to GGUF: .*bottleneck adapters.*cannot be folded.*llama.cpp has no such adapter"):
        export_gguf(tmp_path / "bottleneck", tmp_path / "b.gguf")
    (tmp_path / "prompt").mkdir()
    (tmp_path / "prompt" / "adapter_config.json").write_text(json.dumps({"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8}))
    with pytest.raises(GGUFError, match="cannot export to GGUF: .*holds a soft prompt.*nothing to merge"):
        export_gguf(tmp_path / "prompt", tmp_path / "p.gguf", lora_only=True)
    assert not list(tmp_path.glob("*.gguf"))


@needs_llama_cpp
def test_existing_file_is_refused_then_replaced_with_overwrite(sp_llama_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    out.write_text("an older export")
    assert cli.main(["export-gguf", str(sp_llama_dir), "--out", str(out)]) == 2
    assert read_error(capsys) == f"error: {out} exists; choose another --out or pass --overwrite to replace it\n"
    assert out.read_text() == "an older export"
    assert cli.main(["export-gguf", str(sp_llama_dir), "--out", str(out), "--overwrite", "--format", "text"]) == 0
    printed = capsys.readouterr().out
    assert "chat template: text" in printed and "verify: llama.cpp tokenizes 4 probe prompts as transformers does" in printed
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


@pytest.fixture(scope="session")
def no_byte_fallback_dir(tmp_path_factory):
    """A tiny Llama whose SentencePiece tokenizer has no byte tokens and no capitals or punctuation.

    Trained with sentencepiece's default byte_fallback=False on lowercase text, so it writes <unk> for
    'T' and 'F' of the first probe prompt; converted and saved as tiny.build_sentencepiece_tokenizer does.
    """
    import io

    import sentencepiece as spm

    from qlora_lite.tiny import SPECIAL_TOKENS, convert_sentencepiece_bpe

    folder = tmp_path_factory.mktemp("no-byte-fallback")
    pad, unk, bos, eos = SPECIAL_TOKENS
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["the quick brown fox jumps over the lazy dog"] * 10), model_writer=model, model_type="bpe",
        vocab_size=60, hard_vocab_limit=False, byte_fallback=False, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
        pad_piece=pad, unk_piece=unk, bos_piece=bos, eos_piece=eos, num_threads=1, minloglevel=2,
    )  # fmt: skip
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    convert_sentencepiece_bpe(folder / "tokenizer.model", []).save_pretrained(str(folder))
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["tokenizer_class"] = "TokenizersBackend"  # as build_sentencepiece_tokenizer saves it
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    assert "<0x54>" not in vocab and "T" not in vocab and "F" not in vocab  # no byte tokens, no capitals
    build_tiny_model(folder, architecture="llama", vocab_size=len(tokenizer))
    return folder


@needs_llama_cpp
def test_llama_cpp_crash_is_one_line_and_leaves_nothing(no_byte_fallback_dir, tmp_path, capsys):
    # llama.cpp throws std::out_of_range on a character with neither a piece nor a byte token, which aborts
    # its process: the checks run llama.cpp in a child process, so export-gguf lives to say why.
    out = tmp_path / "out" / "model-f16.gguf"
    assert cli.main(["export-gguf", str(no_byte_fallback_dir), "--out", str(out)]) == 2
    assert read_error(capsys) == (
        "error: llama.cpp crashed (SIGABRT, std::out_of_range: unordered_map::at) while tokenizing the probe prompts of "
        "model-f16.gguf: its vocabulary has no byte tokens <0x00>..<0xFF> (a SentencePiece model trained without "
        "byte_fallback) and no piece for 'T', 'F' (in 'The capital of France is'), and on such text llama.cpp aborts "
        "instead of writing <unk>, so a llama.cpp server would crash too; nothing was written. Train the model "
        "with a tokenizer that has byte tokens (SentencePiece byte_fallback=True), or serve it with transformers or vLLM "
        "(qlora-lite merge)\n"
    )
    assert list((tmp_path / "out").iterdir()) == []


@needs_llama_cpp
def test_llama_cpp_child_passes_errors_back(tmp_path):
    (tmp_path / "cut.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(GGUFError) as caught:
        tokenize_in_child(tmp_path / "cut.gguf", ["hello"], "tokenizing the probe prompts of cut.gguf")
    assert str(caught.value) == f"llama.cpp could not load {tmp_path / 'cut.gguf'}; is it a complete GGUF model file?"


@pytest.mark.parametrize(
    "returncode, stderr, expected",
    [
        (-6, "terminate called after throwing an instance of 'std::out_of_range'\n  what():  unordered_map::at\n", "SIGABRT, std::out_of_range: unordered_map::at"),
        (-11, "", "SIGSEGV"),
        (1, "Traceback (most recent call last):\n  ...\nMemoryError\n\n", "exit code 1, MemoryError"),
        (-6, "llama-vocab.cpp:123: GGML_ASSERT(x) failed\n", "SIGABRT, llama-vocab.cpp:123: GGML_ASSERT(x) failed"),
        (-99, "", "signal 99"),
    ],
)
def test_describe_crash(returncode, stderr, expected):
    assert describe_crash(returncode, stderr) == expected


LINUX_ONLY = pytest.mark.skipif(not Path("/proc/self").is_dir() or not Path("/sys/kernel").is_dir(), reason="needs Linux's /proc and /sys")


@needs_llama_cpp
@LINUX_ONLY
@pytest.mark.parametrize(
    "out, created, reasons",
    [
        # /proc takes no new entries even from root (ENOENT); other users are refused (EACCES).
        ("/proc/qlora-run/x.gguf", "/proc/qlora-run", ["the file system of /proc takes no new folders", "permission denied"]),
        ("/sys/kernel/qlora/x.gguf", "/sys/kernel/qlora", ["permission denied", "read-only file system"]),
        ("/proc/x.gguf", "files in /proc", ["the file system of /proc takes no new files", "permission denied"]),
    ],
)
def test_out_that_cannot_be_written_is_one_line(sp_llama_dir, capsys, out, created, reasons):
    assert cli.main(["export-gguf", str(sp_llama_dir), "--out", out]) == 2
    assert read_error(capsys) in [f"error: --out {out} cannot be written: cannot create {created} ({r}); choose a folder you can write\n" for r in reasons]
    assert not Path(out).exists() and (Path(out).parent == Path("/proc") or not Path(out).parent.exists())
    assert not (Path(out).parent.exists() and list(Path(out).parent.glob(".x.gguf.*")))  # no work folder either


@needs_llama_cpp
def test_q4_k_m_is_quantized_by_llama_cpp(sp_llama_dir, tmp_path):
    # q4_k_m is the one type made by llama.cpp's quantize API (in a child process, as the checks).
    report = export_gguf(sp_llama_dir, tmp_path / "m-q4_k_m.gguf", "q4_k_m", prompt_format="text")
    assert report.max_logit_diff <= report.threshold == 0.25
    with LlamaCppModel(report.out) as model:
        assert model.metadata("general.file_type") == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m-q4_k_m.gguf"]


@pytest.mark.parametrize(
    "size, shown",
    [(812, "812 B"), (53_248, "52.0 KiB"), (1_048_575, "1.0 MiB"), (747_110, "729.6 KiB"), (15_032_385_536, "14.0 GiB"), (4_920_000_000, "4.6 GiB")],
)
def test_report_size_reads_right_at_any_scale(size, shown):
    report = GGUFReport(Path("a.gguf"), "f16", size, "llama.cpp 0c1e570", lora_only=True)
    assert format_gguf_report(report) == f"wrote a.gguf (GGUF LoRA, f16, {shown}) with llama.cpp 0c1e570"


@needs_llama_cpp
@pytest.mark.parametrize(
    "args, message",
    [
        (["--lora-only", "--type", "q4_k_m"], "--type 'q4_k_m' is not one llama.cpp writes for a GGUF LoRA; choose one of f16, bf16, q8_0"),
        (["--lora-only"], "--lora-only needs an adapter folder (with adapter_config.json)"),
        (["--lora-only", "--ollama"], "--ollama writes a Modelfile for a whole model"),
        (["--out", "m.bin"], "should end in .gguf"),
    ],
)
def test_option_errors(sp_llama_dir, tmp_path, capsys, args, message):
    assert cli.main(["export-gguf", str(sp_llama_dir), "--out", str(tmp_path / "m.gguf"), *args]) == 2
    err = read_error(capsys)
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


@needs_llama_cpp
def test_not_a_llama_cpp_checkout(sp_llama_dir, tmp_path):
    with pytest.raises(GGUFError, match="is not a llama.cpp checkout: it lacks convert_hf_to_gguf.py"):
        export_gguf(sp_llama_dir, tmp_path / "m.gguf", llama_cpp_dir=tmp_path)


@needs_llama_cpp
def test_lora_converter_failure_names_the_users_adapter(sp_llama_dir, tmp_path):
    # The converter reads a staged copy of the adapter in a temporary folder that is gone by the time the
    # message is read: the message names the folder the user passed. A stand-in checkout whose LoRA
    # converter fails makes the failure without a real conversion.
    from qlora_lite.config import LoRAConfig
    from qlora_lite.methods.lora import apply_lora, save_adapter

    checkout = tmp_path / "llama.cpp"
    (checkout / "gguf-py").mkdir(parents=True)
    (checkout / "convert_hf_to_gguf.py").write_text("print('TEXT models:\\n  - LlamaForCausalLM\\nMMPROJ models:')\n")
    (checkout / "convert_lora_to_gguf.py").write_text("import sys\nsys.exit('ERROR: cannot read this adapter')\n")
    model = AutoModelForCausalLM.from_pretrained(str(sp_llama_dir), dtype=torch.float32)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules="all-linear", dtype="float32")
    apply_lora(model, cfg)
    save_adapter(model, cfg, tmp_path / "adapter", str(sp_llama_dir))
    with pytest.raises(GGUFError) as caught:
        export_gguf(tmp_path / "adapter", tmp_path / "out" / "lora.gguf", lora_only=True, llama_cpp_dir=checkout)
    assert str(caught.value) == (
        f"llama.cpp's converter failed on adapter {tmp_path / 'adapter'}: ERROR: cannot read this adapter; nothing was written"
    )
    assert list((tmp_path / "out").iterdir()) == []


@needs_llama_cpp
def test_tested_converter_is_cached_with_only_its_parts():
    converter = ensure_tested_converter()
    assert sorted(p.name for p in converter.folder.iterdir()) == [
        "LICENSE", "conversion", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py",
    ]  # fmt: skip
    assert "0c1e570" in converter.origin and "0.3.36" in converter.origin


def test_gguf_extra_is_pinned_to_the_tested_converter():
    import tomllib

    from qlora_lite.doctor import read_tested_versions
    from qlora_lite.llama_cpp import LLAMA_CPP_PYTHON_VERSION

    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gguf"]
    assert extra == [f"llama-cpp-python>={LLAMA_CPP_PYTHON_VERSION}", "gguf>=0.10"]  # gguf: transformers dequantizes a GGUF base with it
    # The binding CI installs is the release whose converter export_gguf downloads: one llama.cpp.
    assert read_tested_versions()["llama-cpp-python"] == LLAMA_CPP_PYTHON_VERSION


def test_converter_download_failure_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as offline: pip finds no llama-cpp-python to download
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(GGUFError, match=r"could not download llama.cpp's converter .* pass --llama-cpp DIR .*QLORA_LITE_LLAMA_CPP"):
        ensure_tested_converter(tmp_path / "cache")
    assert list((tmp_path / "cache").iterdir()) == []  # no half-extracted converter


@needs_llama_cpp
def test_the_folder_a_full_fine_tuning_run_writes_exports(sp_llama_dir, tmp_path):
    """Issue 22: export-gguf refused it ("The model folder has no SentencePiece tokenizer.model ..."): training did not copy it."""
    from qlora_lite.config import load_recipe
    from qlora_lite.training.fit import fit
    from tests.helpers import recipe_overrides

    extra = {"method": "full", "quant.load_in_4bit": False, "train.max_steps": 1, "data.eval_fraction": 0.0, "train.exact_match_examples": 0}
    fit(load_recipe(None, recipe_overrides(tmp_path, sp_llama_dir, **extra)))
    report = export_gguf(tmp_path / "run" / "adapter", tmp_path / "full-f16.gguf", "f16")
    assert report.layout.data_format == "alpaca" and report.num_probes == 4
    assert report.max_logit_diff <= report.threshold == 1e-2
