"""generate: prompts formatted exactly as in training, greedy decoding equal to a hand-written argmax
loop, adapters switched on one base with the same logits as each loaded alone, and the CLI."""

from __future__ import annotations

import copy
import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_lite import cli
from qlora_lite.config import LoRAConfig, ModelConfig, QuantConfig, load_recipe
from qlora_lite.data.formats import ALPACA_PROMPT_NO_INPUT, IGNORE_INDEX
from qlora_lite.data.tokenizing import tokenize_example
from qlora_lite.errors import AdapterError, GenerationError
from qlora_lite.generate import (
    AdapterSwitcher,
    GenerationSettings,
    answer_prompts,
    build_generate_kwargs,
    build_prompt_ids,
    generate_ids,
    open_switcher,
    read_prompt_lines,
    resolve_prompt_format,
    route_prompt,
)
from qlora_lite.methods.folder import PROMPT_INFO_NAME, read_prompt_info, write_prompt_info
from qlora_lite.methods.lora import apply_lora, load_adapter, lora_layers, save_adapter
from qlora_lite.methods.prompt_tuning import SoftPromptModel, load_soft_prompt
from qlora_lite.quant import load_base_model, load_tokenizer
from qlora_lite.tiny import build_tiny_model
from qlora_lite.training.fit import fit
from tests.helpers import ScriptedHead, cli_error, make_soft_prompt, save_llama3_style_tokenizer

BOS, EOS = 2, 3
# Switching re-attaches the same tensors to the same base, so the forward pass is the same
# sequence of fp32 (or NF4-dequantize + fp32) operations as a fresh load: measured 0.0 difference.
SWITCH_ATOL = 1e-6
IDS = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(0))
# Two adapters that differ in rank, alpha and targets: a touches attention, b the MLP and o_proj.
ADAPTER_A = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], dtype="float32")
ADAPTER_B = LoRAConfig(r=8, alpha=32, dropout=0.0, target_modules=["o_proj", "up_proj", "down_proj"], dtype="float32")


def load(model_dir, four_bit: bool):
    return load_base_model(ModelConfig(name_or_path=str(model_dir)), QuantConfig(load_in_4bit=four_bit, compute_dtype="float32")).eval()


def make_adapter(model_dir, out_dir, cfg: LoRAConfig, seed: int, data_format: str | None = None):
    """Save an adapter with random non-zero B (a fresh one would not change the logits)."""
    model = load(model_dir, False)
    apply_lora(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
    save_adapter(model, cfg, out_dir, str(model_dir))
    if data_format:
        write_prompt_info(out_dir, data_format)
    return out_dir


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "a": make_adapter(tiny_llama_dir, root / "a", ADAPTER_A, seed=1, data_format="alpaca"),
        "b": make_adapter(tiny_llama_dir, root / "b", ADAPTER_B, seed=2, data_format="text"),
    }


@pytest.fixture(scope="module")
def other_base_adapter(tmp_path_factory):
    """An adapter made on a narrower Qwen2 (hidden 32): same module names as tiny Llama, other shapes."""
    root = tmp_path_factory.mktemp("other")
    build_tiny_model(root / "base", architecture="qwen2", hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return make_adapter(root / "base", root / "adapter", ADAPTER_A, seed=3)


# ---------------------------------------------------------------------------------------------
# Switching adapters on one base
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("four_bit", [False, True])
def test_switched_adapter_logits_equal_adapter_loaded_alone(tiny_llama_dir, tokenizer, adapter_dirs, four_bit, monkeypatch):
    expected = {None: logits(load(tiny_llama_dir, four_bit))}
    for name, folder in adapter_dirs.items():
        alone = load(tiny_llama_dir, four_bit)
        load_adapter(alone, folder)
        expected[name] = logits(alone)
    # the adapters matter, and differently: otherwise equal logits would prove nothing
    assert (expected["a"] - expected[None]).abs().max() > 0.05
    assert (expected["b"] - expected[None]).abs().max() > 0.05
    assert (expected["a"] - expected["b"]).abs().max() > 0.05

    switcher = AdapterSwitcher(load(tiny_llama_dir, four_bit), tokenizer)
    for name, folder in adapter_dirs.items():
        switcher.add(name, folder)
    model_id = id(switcher.model)
    q_proj = switcher.model.model.layers[0].self_attn.q_proj
    weight_ptr = q_proj.weight.data_ptr()
    # From here on neither the base nor an adapter file may be read again.
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", pytest.fail)
    monkeypatch.setattr("qlora_lite.methods.lora.read_adapter_weights", pytest.fail)
    wrapped_layers = {"a": 2 * 2, "b": 2 * 3, None: 0}
    for name in ["a", "b", "a", None, "b"]:
        switcher.use(name)
        assert (logits(switcher.model) - expected[name]).abs().max().item() <= SWITCH_ATOL
        assert len(lora_layers(switcher.model)) == wrapped_layers[name]
        assert id(switcher.model) == model_id
        layer = switcher.model.model.layers[0].self_attn.q_proj
        assert getattr(layer, "base_layer", layer) is q_proj and q_proj.weight.data_ptr() == weight_ptr
    assert switcher.active == "b"


def test_add_refuses_an_adapter_for_another_base_before_attaching(tiny_llama_dir, tokenizer, adapter_dirs, other_base_adapter):
    switcher = AdapterSwitcher(load(tiny_llama_dir, False), tokenizer)
    switcher.add("a", adapter_dirs["a"])
    switcher.use("a")
    with pytest.raises(AdapterError, match=r"adapter 'wide' \(.*\): .*lora_A.weight has shape \(4, 32\) but this base needs \(4, 64\)"):
        switcher.add("wide", other_base_adapter)
    assert switcher.names == ["a"] and switcher.active == "a" and len(lora_layers(switcher.model)) == 4
    with pytest.raises(GenerationError, match="no adapter named 'c'; added adapters: a, base"):
        switcher.use("c")
    assert switcher.active == "a"  # an unknown name changes nothing
    with pytest.raises(GenerationError, match="'a' is given twice"):
        switcher.add("a", adapter_dirs["b"])
    with pytest.raises(GenerationError, match="'base' is reserved"):
        switcher.add("base", adapter_dirs["b"])


# ---------------------------------------------------------------------------------------------
# Switching soft prompts (PEFT PROMPT_TUNING), and between a soft prompt and LoRA
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prompt_dirs(tiny_llama_dir, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("soft-prompts")
    return {
        "p": make_soft_prompt(tiny_llama_dir, root / "p", tokenizer, seed=1, num_virtual_tokens=4, data_format="text"),
        "q": make_soft_prompt(tiny_llama_dir, root / "q", tokenizer, seed=2, num_virtual_tokens=6, data_format="text"),
    }


@pytest.mark.parametrize("four_bit", [False, True])
def test_switched_soft_prompts_equal_each_loaded_alone_and_switch_with_lora(tiny_llama_dir, tokenizer, adapter_dirs, prompt_dirs, four_bit, monkeypatch):
    expected = {None: logits(load(tiny_llama_dir, four_bit))}
    for name, folder in prompt_dirs.items():
        expected[name] = logits(load_soft_prompt(load(tiny_llama_dir, four_bit), folder))
    alone = load(tiny_llama_dir, four_bit)
    load_adapter(alone, adapter_dirs["a"])
    expected["a"] = logits(alone)
    # the soft prompts matter, and differently (compared on the 12 real positions)
    assert (expected["p"][:, 4:] - expected[None]).abs().max() > 0.05
    assert (expected["q"][:, 6:] - expected["p"][:, 4:]).abs().max() > 0.05

    switcher = AdapterSwitcher(load(tiny_llama_dir, four_bit), tokenizer)
    for name, folder in [*prompt_dirs.items(), ("a", adapter_dirs["a"])]:
        switcher.add(name, folder)
    base_id = id(switcher.model)
    embed_ptr = switcher.model.get_input_embeddings().weight.data_ptr()
    # From here on neither the base nor an adapter file may be read again.
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", pytest.fail)
    monkeypatch.setattr("qlora_lite.methods.lora.read_adapter_weights", pytest.fail)
    monkeypatch.setattr("qlora_lite.methods.prompt_tuning.read_soft_prompt", pytest.fail)
    for name in ["p", "q", "a", "p", None, "q", "a", None]:
        switcher.use(name)
        assert (logits(switcher.active_model) - expected[name]).abs().max().item() <= SWITCH_ATOL
        assert isinstance(switcher.active_model, SoftPromptModel) == (name in prompt_dirs)
        assert len(lora_layers(switcher.model)) == (4 if name == "a" else 0)  # LoRA is off while a soft prompt answers
        assert id(switcher.model) == base_id and switcher.model.get_input_embeddings().weight.data_ptr() == embed_ptr
        if name in prompt_dirs:
            assert switcher.active_model.base_model is switcher.model


def test_add_refuses_a_soft_prompt_for_another_base(tiny_llama_dir, tokenizer, prompt_dirs, tmp_path):
    build_tiny_model(tmp_path / "narrow", hidden_size=32, num_heads=4, num_kv_heads=2, intermediate_size=64)
    narrow_prompt = make_soft_prompt(tmp_path / "narrow", tmp_path / "pt", tokenizer, seed=3)
    switcher = AdapterSwitcher(load(tiny_llama_dir, False), tokenizer)
    switcher.add("p", prompt_dirs["p"])
    switcher.use("p")
    with pytest.raises(AdapterError, match=r"adapter 'narrow' \(.*\): the soft prompt has token_dim 32 but this base's embeddings have hidden size 64: it was made for a different base model"):
        switcher.add("narrow", narrow_prompt)
    assert switcher.names == ["p"] and switcher.active == "p"


def test_cli_generates_with_soft_prompts_by_name_and_by_folder(tiny_llama_dir, adapter_dirs, prompt_dirs, capsys, monkeypatch):
    named = {**prompt_dirs, "a": adapter_dirs["a"]}
    switcher = open_switcher(named, str(tiny_llama_dir), load_in_4bit=False)
    settings = GenerationSettings(max_new_tokens=5)
    prompts = ["the quick brown fox", "Name a colour."]
    expected = {(n, p): switcher.generate(p, adapter=n, settings=settings) for n in ("p", "q", "a", None) for p in prompts}
    assert len({expected[(n, "the quick brown fox")] for n in ("p", "q", "a", None)}) == 4  # routing is observable

    lines = ["q: the quick brown fox", "p: Name a colour.", "a: the quick brown fox", "base: Name a colour.", "p: the quick brown fox"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    argv = ["generate", "--base", str(tiny_llama_dir), *[f"--adapter={n}={d}" for n, d in named.items()]]
    assert cli.main([*argv, "--no-4bit", "--max-new-tokens", "5"]) == 0
    want = [("q", prompts[0]), ("p", prompts[1]), ("a", prompts[0]), (None, prompts[1]), ("p", prompts[0])]
    assert capsys.readouterr().out == "".join(f"[{n or 'base'}] {expected[(n, p)]}\n" for n, p in want)

    # a single soft-prompt folder: base from its adapter_config.json, format from its qlora_lite.json
    assert cli.main(["generate", str(prompt_dirs["q"]), "the quick brown fox", "--no-4bit", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == expected[("q", "the quick brown fox")] + "\n"


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def test_greedy_generation_equals_argmax_of_full_forwards(tiny_llama_dir, tokenizer, adapter_dirs):
    switcher = AdapterSwitcher(load(tiny_llama_dir, False), tokenizer)
    switcher.add("b", adapter_dirs["b"])
    switcher.use("b")
    assert switcher.model.config.use_cache is True  # load_base_model turned it off for training
    prompt = build_prompt_ids("the quick brown fox", "text", tokenizer)
    new_tokens = 10
    got = generate_ids(switcher.model, tokenizer, prompt, GenerationSettings(max_new_tokens=new_tokens))
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            # no KV cache: every step recomputes the whole sequence, an independent reference
            next_id = int(switcher.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1].argmax())
            ids.append(next_id)
            if next_id == EOS:
                break
    assert got == ids[len(prompt) :]
    assert len(got) == new_tokens  # measured: this prompt runs the full 10 tokens without EOS


def test_sampling_settings_and_seeded_reproducibility(tiny_llama_dir, tokenizer):
    model = AdapterSwitcher(load(tiny_llama_dir, False), tokenizer).model
    greedy = build_generate_kwargs(GenerationSettings(), tokenizer, model)
    assert greedy == {"max_new_tokens": 256, "use_cache": True, "eos_token_id": [EOS], "pad_token_id": 0, "do_sample": False}
    settings = GenerationSettings(max_new_tokens=12, temperature=1.5, top_p=0.9)
    sampled = build_generate_kwargs(settings, tokenizer, model)
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"], sampled["top_k"]) == (True, 1.5, 0.9, 0)
    prompt = build_prompt_ids("the quick brown fox", "text", tokenizer)
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(generate_ids(model, tokenizer, prompt, settings))
    greedy_ids = generate_ids(model, tokenizer, prompt, GenerationSettings(max_new_tokens=12))
    assert runs[0] == runs[1]  # same seed, same sample
    assert runs[0] != runs[2] and runs[0] != greedy_ids  # sampling really samples


# A Llama-3-style template: every turn ends in <|eot_id|>, while the *base* tokenizer's EOS is another token.
def test_generation_stops_at_the_chat_templates_end_of_turn(adapter_dirs, tmp_path):
    folder = copy_adapter(adapter_dirs["a"], tmp_path / "chat")
    eot = save_llama3_style_tokenizer(folder)
    switcher = open_switcher({"chat": folder}, load_in_4bit=False)  # the tokenizer saved beside the adapter
    switcher.use("chat")
    assert build_generate_kwargs(GenerationSettings(), switcher.tokenizer, switcher.model)["eos_token_id"] == [EOS, eot]
    words = switcher.tokenizer(" quick brown fox", add_special_tokens=False)["input_ids"]
    script = [*words, eot, *words]  # an answer, the end of the turn, then what an unstopped model rambles on with
    switcher.model.lm_head = ScriptedHead(script)
    prompt = build_prompt_ids("Name a colour.", "chat", switcher.tokenizer)
    assert generate_ids(switcher.model, switcher.tokenizer, prompt, GenerationSettings(max_new_tokens=12)) == [*words, eot]
    switcher.model.lm_head = ScriptedHead(script)
    answer = switcher.generate("Name a colour.", adapter="chat", settings=GenerationSettings(max_new_tokens=12), fmt="chat")
    assert answer == switcher.tokenizer.decode(words) and answer.strip() == "quick brown fox"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_new_tokens": 0}, r"--max-new-tokens must be at least 1, got 0"),
        ({"temperature": -0.1}, r"--temperature must be >= 0 \(0 = greedy\), got -0.1"),
        ({"top_p": 0.0}, r"--top-p must be in \(0, 1\], got 0.0"),
    ],
)
def test_bad_generation_settings_are_explained(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        GenerationSettings(**kwargs)


# ---------------------------------------------------------------------------------------------
# Prompt formats
# ---------------------------------------------------------------------------------------------


def training_prompt_ids(record: dict, fmt: str, tokenizer) -> list[int]:
    example = tokenize_example(record, fmt, tokenizer, max_seq_len=1024)
    start = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    return example["input_ids"][:start]


def bos_copy(tokenizer):
    bos_tokenizer = copy.deepcopy(tokenizer)
    bos_tokenizer.add_bos_token = True
    return bos_tokenizer


@pytest.mark.parametrize("adds_bos", [False, True])
def test_alpaca_prompt_ids_equal_the_prompt_ids_of_training(tokenizer, adds_bos):
    tok = bos_copy(tokenizer) if adds_bos else tokenizer
    instruction = "Name a colour."
    ids = build_prompt_ids(instruction, "alpaca", tok)
    assert ids == training_prompt_ids({"instruction": instruction, "output": "Blue is a colour."}, "alpaca", tok)
    template_ids = tokenizer(ALPACA_PROMPT_NO_INPUT.format(instruction=instruction), add_special_tokens=False)["input_ids"]
    assert ids == ([BOS] if adds_bos else []) + template_ids


def test_alpaca_input_field_uses_the_with_input_template(tokenizer):
    from qlora_lite.data.formats import ALPACA_PROMPT_WITH_INPUT

    ids = build_prompt_ids("Apply rot13 to this word.", "alpaca", tokenizer, input_text="HELLO")
    assert ids == training_prompt_ids({"instruction": "Apply rot13 to this word.", "input": "HELLO", "output": "URYYB"}, "alpaca", tokenizer)
    template = ALPACA_PROMPT_WITH_INPUT.format(instruction="Apply rot13 to this word.", input="HELLO")
    assert ids == tokenizer(template, add_special_tokens=False)["input_ids"]
    with pytest.raises(GenerationError, match="--input is the alpaca format's input field"):
        build_prompt_ids("hi", "chat", tokenizer, input_text="HELLO")


def test_chat_prompt_uses_the_template_with_the_generation_prompt(tokenizer):
    # no template of its own: the default one, as in training ("<|user|>\n{content}</s>\n<|assistant|>\n")
    ids = build_prompt_ids("Hi there", "chat", tokenizer)
    assert ids == tokenizer("<|user|>\nHi there</s>\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert ids.count(EOS) == 1
    templated = bos_copy(tokenizer)
    templated.chat_template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
    ids = build_prompt_ids("Hi there", "chat", templated)
    assert ids == tokenizer("<s>[user] Hi there\n[assistant] ", add_special_tokens=False)["input_ids"]
    assert ids.count(BOS) == 1  # the template writes BOS; it is not added a second time
    record = {"messages": [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello"}]}
    assert ids == training_prompt_ids(record, "chat", templated)


# ChatML with Qwen's default system prompt, written whenever the conversation brings none.
QWEN_STYLE_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_system_message_replaces_the_templates_default(tokenizer):
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = QWEN_STYLE_TEMPLATE
    default = build_prompt_ids("Hi there", "chat", templated)
    assert default == tokenizer("<|im_start|>system\nYou are Qwen, a helpful assistant.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    ids = build_prompt_ids("Hi there", "chat", templated, system="Answer as a pirate.")
    text = "<|im_start|>system\nAnswer as a pirate.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert "You are Qwen" not in templated.decode(ids) and "Answer as a pirate." in templated.decode(ids)
    # exactly the prompt training put before the answer of a record with that system message
    record = {"messages": [{"role": "system", "content": "Answer as a pirate."}, {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Arr"}]}
    assert ids == training_prompt_ids(record, "chat", templated)
    # no template of its own: the default one renders the system turn like any other
    assert build_prompt_ids("Hi there", "chat", tokenizer, system="Be brief.") == tokenizer(
        "<|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n", add_special_tokens=False
    )["input_ids"]
    for fmt in ("alpaca", "text"):
        with pytest.raises(GenerationError, match=rf"--system is the chat format's system message, but prompts are formatted as {fmt}; drop --system or pass --format chat"):
            build_prompt_ids("Hi there", fmt, tokenizer, system="Be brief.")


def test_cli_system_message(tiny_llama_dir, adapter_dirs, capsys, monkeypatch):
    switcher = open_switcher({"a": adapter_dirs["a"]}, load_in_4bit=False)
    settings = GenerationSettings(max_new_tokens=5)
    with_system = switcher.generate("Name a colour.", adapter="a", settings=settings, fmt="chat", system="Answer in French.")
    assert with_system != switcher.generate("Name a colour.", adapter="a", settings=settings, fmt="chat")  # the system message is seen
    argv = ["generate", str(adapter_dirs["a"]), "Name a colour.", "--no-4bit", "--max-new-tokens", "5"]
    assert cli.main([*argv, "--format", "chat", "--system", "Answer in French."]) == 0
    assert capsys.readouterr().out == with_system + "\n"
    # adapter a was trained on alpaca records: a system message has no place in its prompts
    err = cli_error([*argv, "--system", "Answer in French."], capsys)
    assert "error: --system is the chat format's system message, but prompts are formatted as alpaca; drop --system or pass --format chat" in err
    monkeypatch.setattr(AdapterSwitcher, "from_base", pytest.fail)  # an explicit format is checked before the slow load
    err = cli_error([*argv, "--format", "text", "--system", "Answer in French."], capsys)
    assert "error: --system is the chat format's system message, but prompts are formatted as text" in err


def test_text_prompt_is_the_raw_text(tokenizer):
    raw = tokenizer("the quick brown fox", add_special_tokens=False)["input_ids"]
    assert build_prompt_ids("the quick brown fox", "text", tokenizer) == raw
    assert build_prompt_ids("the quick brown fox", "text", bos_copy(tokenizer)) == [BOS] + raw
    with pytest.raises(GenerationError, match="the prompt is empty"):
        build_prompt_ids("  ", "text", tokenizer)


def test_auto_format_follows_training_then_the_tokenizer(tokenizer, tmp_path):
    templated = copy.deepcopy(tokenizer)
    templated.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert resolve_prompt_format("auto", "alpaca", templated) == "alpaca"
    assert resolve_prompt_format("auto", None, templated) == "chat"
    assert resolve_prompt_format("auto", None, tokenizer) == "text"
    assert resolve_prompt_format("text", "chat", templated) == "text"  # an explicit format wins
    assert read_prompt_info(tmp_path) == {}
    write_prompt_info(tmp_path, "chat")
    assert json.loads((tmp_path / PROMPT_INFO_NAME).read_text()) == {"data_format": "chat"}
    (tmp_path / PROMPT_INFO_NAME).write_text('{"data_format": "sharegpt"}')
    with pytest.raises(AdapterError, match=r"data_format must be one of alpaca, chat, text.*delete the file and pass --format"):
        read_prompt_info(tmp_path)


def test_route_prompt_by_name_prefix():
    assert route_prompt("math: 2 + 2?", ["math", "sql"]) == ("math", "2 + 2?")
    assert route_prompt("base: hello", ["math", "sql"]) == (None, "hello")
    assert route_prompt("keep it short", ["math"]) == ("math", "keep it short")  # one adapter takes a line with no prefix
    assert route_prompt("math: Note: keep it short", ["math"]) == ("math", "Note: keep it short")  # a colon after the prefix is text
    with pytest.raises(GenerationError) as err:
        route_prompt("keep it short", ["math", "sql"])
    assert str(err.value) == "prompt 'keep it short' names no adapter; start each line with one of math, sql, base and a colon, e.g. 'base: keep it short'"


@pytest.mark.parametrize(
    "line, names, message",
    [
        # one adapter: a mistyped prefix is not sent to it with the typo left in the prompt
        ("dmo: hello", ["demo"], ("prompt 'dmo: hello' starts with 'dmo:', which names no adapter; known: demo, base "
                                  "(a prompt that really starts with a word and a colon: prefix it with 'demo: ')")),
        ("Note: keep it short", ["math"], ("prompt 'Note: keep it short' starts with 'Note:', which names no adapter; known: math, base "
                                           "(a prompt that really starts with a word and a colon: prefix it with 'math: ')")),
        ("  dmo : hello", ["demo"], ("prompt '  dmo : hello' starts with 'dmo:', which names no adapter; known: demo, base "
                                     "(a prompt that really starts with a word and a colon: prefix it with 'demo: ')")),
        # several adapters: the same rule, the fix names the first one as the example
        ("Note: keep it short", ["math", "sql"], ("prompt 'Note: keep it short' starts with 'Note:', which names no adapter; known: math, sql, base "
                                                  "(a prompt that really starts with a word and a colon: prefix it with its adapter's name, e.g. 'math: ')")),
    ],
)
def test_route_prompt_refuses_a_prefix_that_names_no_adapter(line, names, message):
    with pytest.raises(GenerationError) as err:
        route_prompt(line, names)
    assert str(err.value) == message


def test_read_prompt_lines_reads_a_file_or_pipe_whole_and_a_terminal_line_by_line():
    assert read_prompt_lines(io.StringIO("a: one\n\n   \nb: two\r\n")) == ["a: one", "b: two"]  # a list: all read before any answer
    terminal = TerminalInput("a: one\nb: two\n")
    lines = read_prompt_lines(terminal)
    assert terminal.tell() == 0  # nothing read yet: a terminal's lines are read as they are typed
    assert next(lines) == "a: one" and terminal.tell() == len("a: one\n")
    assert list(lines) == ["b: two"]


# ---------------------------------------------------------------------------------------------
# Training records the format; the command line
# ---------------------------------------------------------------------------------------------


def test_trained_adapter_generates_from_its_folder_alone(tiny_llama_dir, tmp_path, capsys):
    """fit -> `generate ADAPTER_DIR PROMPT`: base, tokenizer and alpaca format all come from the adapter folder."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": "Repeat the word.", "input": w, "output": f"{w} {w}"}) + "\n" for w in ["cat", "dog", "sun", "tree"]))
    overrides = [
        f"model.name_or_path={tiny_llama_dir}", f"data.path={data}", "train.max_steps=2", "train.micro_batch_size=2",
        "train.grad_accum_steps=1", "train.save_every=0", "train.eval_every=0", "lora.r=4", f"output_dir={tmp_path / 'run'}",
    ]
    fit(load_recipe(None, overrides))
    adapter_dir = tmp_path / "run" / "adapter"
    assert json.loads((adapter_dir / PROMPT_INFO_NAME).read_text()) == {"data_format": "alpaca"}

    switcher = open_switcher({"adapter": adapter_dir})
    assert switcher.prompt_format("adapter") == "alpaca"
    expected = switcher.generate("Repeat the word.", adapter="adapter", settings=GenerationSettings(max_new_tokens=6))
    assert expected.strip()  # a real answer, so the CLI comparison below can fail
    capsys.readouterr()
    assert cli.main(["generate", str(adapter_dir), "Repeat the word.", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@pytest.fixture
def expected_answers(tiny_llama_dir, adapter_dirs):
    """What each adapter (and the base) answers to each prompt, from the Python API, full precision."""
    switcher = open_switcher(dict(adapter_dirs), str(tiny_llama_dir), load_in_4bit=False)
    settings = GenerationSettings(max_new_tokens=5)
    prompts = ["Name a colour.", "the quick brown fox"]
    return {(name, p): switcher.generate(p, adapter=name, settings=settings) for name in ("a", "b", None) for p in prompts}


def test_cli_answers_prompt_argument_and_stdin(adapter_dirs, expected_answers, capsys, monkeypatch):
    common = ["--no-4bit", "--max-new-tokens", "5"]
    assert cli.main(["generate", str(adapter_dirs["a"]), "Name a colour.", *common]) == 0
    assert capsys.readouterr().out == expected_answers[("a", "Name a colour.")] + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a colour.\n\n   \nthe quick brown fox\n"))
    assert cli.main(["generate", str(adapter_dirs["a"]), *common]) == 0
    answers = [expected_answers[("a", p)] for p in ("Name a colour.", "the quick brown fox")]
    assert capsys.readouterr().out == "".join(a + "\n" for a in answers)  # blank lines skipped


def test_cli_routes_each_prompt_to_its_adapter(tiny_llama_dir, adapter_dirs, expected_answers, capsys, monkeypatch):
    lines = ["b: the quick brown fox", "a: Name a colour.", "base: Name a colour.", "a:the quick brown fox"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    argv = ["generate", "--base", str(tiny_llama_dir), "--adapter", f"a={adapter_dirs['a']}", "--adapter", f"b={adapter_dirs['b']}"]
    assert cli.main([*argv, "--no-4bit", "--max-new-tokens", "5"]) == 0
    want = [("b", "the quick brown fox"), ("a", "Name a colour."), (None, "Name a colour."), ("a", "the quick brown fox")]
    assert capsys.readouterr().out == "".join(f"[{n or 'base'}] {expected_answers[(n, p)]}\n" for n, p in want)
    # the answers differ between adapters, so the routing above is really observed
    assert len({expected_answers[(n, "Name a colour.")] for n in ("a", "b", None)}) == 3


class TerminalInput(io.StringIO):
    """Stdin as a terminal: isatty() is true, so lines are read (and checked) one at a time as they come."""

    def isatty(self) -> bool:
        return True


def run_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one CLI run."""
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_one_named_adapter_refuses_a_mistyped_prefix_before_answering(tiny_llama_dir, adapter_dirs, expected_answers, capsys, monkeypatch):
    """With --adapter (routed), `dmo: hello` for an adapter named demo is an error, not a prompt `dmo: hello` to demo;
    a line with no prefix still goes to the only adapter, and without --adapter `Note: ...` is just text."""
    argv = ["generate", "--base", str(tiny_llama_dir), "--adapter", f"demo={adapter_dirs['a']}", "--no-4bit", "--max-new-tokens", "5"]
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a colour.\ndmo: hello\n"))
    assert run_cli(argv, capsys) == (
        2,
        "",  # the first line was not answered: every line is checked before any is answered
        (
            "error: prompt 'dmo: hello' starts with 'dmo:', which names no adapter; known: demo, base "
            "(a prompt that really starts with a word and a colon: prefix it with 'demo: ')\n"
        ),
    )
    assert run_cli([*argv, "dmo: hello"], capsys)[:2] == (2, "")  # a PROMPT argument is checked the same way

    # no prefix: the only adapter; its name as prefix keeps a word and a colon in the prompt
    switcher = open_switcher({"demo": adapter_dirs["a"]}, str(tiny_llama_dir), load_in_4bit=False)
    note = switcher.generate("Note: be brief", adapter="demo", settings=GenerationSettings(max_new_tokens=5))
    monkeypatch.setattr("sys.stdin", io.StringIO("Name a colour.\ndemo: Note: be brief\n"))
    assert run_cli(argv, capsys) == (0, f"[demo] {expected_answers[('a', 'Name a colour.')]}\n[demo] {note}\n", "")

    # unrouted (a positional ADAPTER_DIR): no prefixes at all, `Note: be brief` is the prompt
    unrouted = ["generate", str(adapter_dirs["a"]), "--no-4bit", "--max-new-tokens", "5"]
    assert run_cli([*unrouted, "Note: be brief"], capsys) == (0, note + "\n", "")
    monkeypatch.setattr("sys.stdin", io.StringIO("Note: be brief\n"))
    assert run_cli(unrouted, capsys) == (0, note + "\n", "")


INPUT_FOR_BASE = (
    "prompt 'base: Name a colour.': --input is the alpaca format's input field, but prompts are formatted as text; "
    "drop --input or pass --format alpaca"
)


def test_answer_prompts_checks_every_line_before_answering_any(tiny_llama_dir, adapter_dirs, capsys):
    """--input belongs to alpaca prompts (adapter a); the base formats prompts as text, so a `base:` line
    with --input fails, and it fails before the lines ahead of it are answered."""
    switcher = open_switcher(dict(adapter_dirs), str(tiny_llama_dir), load_in_4bit=False)
    settings = GenerationSettings(max_new_tokens=5)
    capsys.readouterr()
    cases = [
        (["a: Name a colour.", "base: Name a colour."], {"input_text": "HELLO"}, INPUT_FOR_BASE),
        (["a: Name a colour.", "b: the quick brown fox", "c: hello"], {},
         ("prompt 'c: hello' starts with 'c:', which names no adapter; known: a, b, base "
          "(a prompt that really starts with a word and a colon: prefix it with its adapter's name, e.g. 'a: ')")),
        (["a: Name a colour.", "b:"], {}, "prompt 'b:': the prompt is empty; pass some text to answer"),
        (["b: the quick brown fox", "a: Name a colour."], {"system": "Be brief."},
         ("prompt 'b: the quick brown fox': --system is the chat format's system message, but prompts are formatted as text; "
          "drop --system or pass --format chat")),
    ]
    for lines, options, message in cases:
        with pytest.raises(GenerationError) as err:
            answer_prompts(switcher, lines, settings, routed=True, **options)
        assert str(err.value) == message
        assert capsys.readouterr().out == "", lines  # not one answer, not even its `[a] ` label
    # the same lines with --input on alpaca lines only are answered
    assert answer_prompts(switcher, ["a: Name a colour.", "a: Name a colour."], settings, routed=True, input_text="HELLO") == 2
    with_input = switcher.generate("Name a colour.", adapter="a", settings=settings, input_text="HELLO")
    assert capsys.readouterr().out == f"[a] {with_input}\n" * 2


def test_cli_checks_all_piped_lines_first_and_a_terminals_lines_as_they_come(tiny_llama_dir, adapter_dirs, expected_answers, capsys, monkeypatch):
    argv = ["generate", "--base", str(tiny_llama_dir), "--adapter", f"a={adapter_dirs['a']}", "--no-4bit", "--max-new-tokens", "5", "--input", "HELLO"]
    lines = "a: Name a colour.\nbase: Name a colour.\n"
    # a file or a pipe: read whole and checked before the first answer
    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert run_cli(argv, capsys) == (2, "", f"error: {INPUT_FOR_BASE}\n")
    # a PROMPT argument: checked before the model answers, so not even the `[base] ` label is printed
    assert run_cli([*argv, "base: Name a colour."], capsys) == (2, "", f"error: {INPUT_FOR_BASE}\n")
    # a terminal: nothing to check ahead, each line is checked when it is typed, the earlier answers stand
    switcher = open_switcher({"a": adapter_dirs["a"]}, str(tiny_llama_dir), load_in_4bit=False)
    with_input = switcher.generate("Name a colour.", adapter="a", settings=GenerationSettings(max_new_tokens=5), input_text="HELLO")
    capsys.readouterr()
    monkeypatch.setattr("sys.stdin", TerminalInput(lines))
    assert run_cli(argv, capsys) == (2, f"[a] {with_input}\n", f"error: {INPUT_FOR_BASE}\n")


def copy_adapter(source, folder, **config_changes):
    """A copy of an adapter folder, with adapter_config.json keys changed (e.g. a base that has moved)."""
    folder.mkdir()
    for path in source.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    raw = json.loads((source / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**raw, **config_changes}))
    return folder


def test_cli_adapter_with_base_override(tiny_llama_dir, adapter_dirs, expected_answers, tmp_path, capsys, monkeypatch):
    """`generate ADAPTER_DIR --base PATH [PROMPT]` puts the adapter on that base; the prompt comes as an argument or on stdin."""
    common = ["--no-4bit", "--max-new-tokens", "5"]
    prompts = ["Name a colour.", "the quick brown fox"]
    # the adapter's answers are not the base's, so an ignored adapter cannot pass
    assert all(expected_answers[("a", p)] != expected_answers[(None, p)] for p in prompts)
    assert cli.main(["generate", str(adapter_dirs["a"]), prompts[0], *common]) == 0  # no --base: the recorded base
    without_base = capsys.readouterr().out
    assert without_base == expected_answers[("a", prompts[0])] + "\n"

    # the recorded base has moved: only --base can find it
    moved = copy_adapter(adapter_dirs["a"], tmp_path / "moved", base_model_name_or_path=str(tmp_path / "gone"))
    for argv in (
        ["generate", str(moved), "--base", str(tiny_llama_dir), prompts[0], *common],
        ["generate", "--base", str(tiny_llama_dir), str(moved), prompts[0], *common],
        ["generate", str(adapter_dirs["a"]), prompts[0], "--base", str(tiny_llama_dir), *common],
    ):
        assert cli.main(argv) == 0, argv
        assert capsys.readouterr().out == without_base, argv

    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(prompts) + "\n"))
    assert cli.main(["generate", str(moved), "--base", str(tiny_llama_dir), *common]) == 0
    assert capsys.readouterr().out == "".join(expected_answers[("a", p)] + "\n" for p in prompts)

    # --base with one positional that is not a folder: a prompt to the plain base, as before
    assert cli.main(["generate", "--base", str(tiny_llama_dir), prompts[1], *common]) == 0
    assert capsys.readouterr().out == expected_answers[(None, prompts[1])] + "\n"


def test_cli_errors_name_cause_and_fix(tiny_llama_dir, adapter_dirs, other_base_adapter, tmp_path, capsys, monkeypatch):
    two = ["--adapter", f"a={adapter_dirs['a']}", "--adapter", f"b={adapter_dirs['b']}", "--no-4bit"]
    monkeypatch.setattr("sys.stdin", io.StringIO("c: hello\n"))
    assert cli_error(["generate", *two], capsys) == (
        "error: prompt 'c: hello' starts with 'c:', which names no adapter; known: a, b, base "
        "(a prompt that really starts with a word and a colon: prefix it with its adapter's name, e.g. 'a: ')\n"
    )
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))
    assert cli_error(["generate", *two], capsys) == "error: prompt 'hello' names no adapter; start each line with one of a, b, base and a colon, e.g. 'base: hello'\n"

    err = cli_error(["generate", "--base", str(tiny_llama_dir), "--adapter", f"wide={other_base_adapter}", "--no-4bit", "hi"], capsys)
    assert "error: adapter 'wide'" in err and "has shape (4, 32) but this base needs (4, 64): the adapter was made for a different base model" in err

    err = cli_error(["generate", str(tmp_path / "nope"), "hi"], capsys)
    assert f"error: adapter folder {tmp_path / 'nope'} does not exist; pass the folder training wrote" in err

    err = cli_error(["generate", "--base", str(tiny_llama_dir), "--adapter", str(adapter_dirs["a"]), "hi"], capsys)
    assert "argument --adapter: expected NAME=DIR, got" in err and "e.g. --adapter math=runs/math/adapter" in err

    assert "'base' is reserved" in cli_error(["generate", "--adapter", f"base={adapter_dirs['a']}", "hi"], capsys)
    assert "--top-p must be in (0, 1]" in cli_error(["generate", str(adapter_dirs["a"]), "hi", "--top-p", "2"], capsys)
    assert "unrecognized arguments: lora.r=4" in cli_error(["generate", str(adapter_dirs["a"]), "hi", "lora.r=4"], capsys)
    err = cli_error(["generate", "--adapter", f"a={adapter_dirs['a']}", str(adapter_dirs["b"]), "hi"], capsys)
    assert "error: with --adapter, the only positional argument is the prompt; add an adapter folder as --adapter NAME=DIR" in err
    err = cli_error(["generate", "runs/typo/adapter", "--base", str(tiny_llama_dir)], capsys)
    assert "error: adapter folder runs/typo/adapter does not exist; pass the folder training wrote (e.g. runs/NAME/adapter), or, to prompt the plain --base model with this text, give it on stdin" in err
    assert "nothing to load: pass an adapter folder, or --base PATH" in cli_error(["generate"], capsys)

    moved = tmp_path / "moved"
    moved.mkdir()
    raw = json.loads((adapter_dirs["a"] / "adapter_config.json").read_text())
    (moved / "adapter_config.json").write_text(json.dumps({**raw, "base_model_name_or_path": str(tmp_path / "gone")}))
    err = cli_error(["generate", str(moved), "hi"], capsys)
    assert err == (
        f"error: the adapter's base {tmp_path / 'gone'} ({moved}/adapter_config.json base_model_name_or_path) is not a folder here; "
        "it may have moved: pass --base PATH\n"
    )
    err = cli_error(["generate", str(moved), "hi", "--base", str(tmp_path / "gone-too")], capsys)
    assert f"error: --base names base model {tmp_path / 'gone-too'}, which does not exist on this machine; pass --base PATH" in err


def test_tokenizer_comes_from_the_adapter_folder_when_saved_there(tiny_llama_dir, adapter_dirs, tmp_path):
    folder = tmp_path / "with-tokenizer"
    folder.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (folder / name).write_bytes((adapter_dirs["a"] / name).read_bytes())
    tok = load_tokenizer(ModelConfig(name_or_path=str(tiny_llama_dir)))
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.save_pretrained(str(folder))
    assert open_switcher({"x": folder}, load_in_4bit=False).tokenizer.chat_template == tok.chat_template
    assert open_switcher({"x": adapter_dirs["a"]}, load_in_4bit=False).tokenizer.chat_template is None


def test_peft_made_adapter_generates_as_in_peft(tiny_qwen2_dir, tokenizer, tmp_path):
    """An adapter saved by peft itself (pickle .bin only, as older PEFT wrote) answers as PeftModel does."""
    peft = pytest.importorskip("peft")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir), dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(base, config).eval()
    peft_model.save_pretrained(str(tmp_path / "peft"), safe_serialization=False)
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["README.md", "adapter_config.json", "adapter_model.bin"]
    with pytest.raises(AdapterError, match="--allow-pickle"):
        open_switcher({"p": tmp_path / "peft"}, base=str(tiny_qwen2_dir), load_in_4bit=False)
    switcher = open_switcher({"p": tmp_path / "peft"}, base=str(tiny_qwen2_dir), load_in_4bit=False, allow_pickle=True)
    switcher.use("p")
    assert (logits(switcher.model) - logits(peft_model)).abs().max().item() <= 1e-5
    prompt_ids = build_prompt_ids("the quick brown", "text", tokenizer)
    settings = GenerationSettings(max_new_tokens=8)
    ours = generate_ids(switcher.model, tokenizer, prompt_ids, settings)
    with torch.no_grad():
        theirs = peft_model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=8, do_sample=False, eos_token_id=EOS, pad_token_id=0)
    assert ours == theirs[0, len(prompt_ids) :].tolist() and len(ours) >= 1


def test_switching_covers_bottleneck_and_selective_adapters(tiny_llama_dir, tokenizer, adapter_dirs, tmp_path):
    """LoRA, bottleneck and selective adapters on one NF4 base (down_proj kept unquantized for the
    selective one): each switch equals that adapter loaded alone, and going back to the base
    restores the tensors a selective adapter overwrote."""
    from qlora_lite.config import BottleneckConfig, SelectiveConfig
    from qlora_lite.methods.bottleneck import apply_bottleneck, load_bottleneck, save_bottleneck
    from qlora_lite.methods.selective import apply_selective, load_selective, save_selective

    def load4(skip=None):
        return load_base_model(ModelConfig(name_or_path=str(tiny_llama_dir)), QuantConfig(compute_dtype="float32"), skip_modules=skip).eval()

    def randomize(model, seed):
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(torch.randn(p.shape, generator=gen) * 0.1)

    bottleneck_cfg = BottleneckConfig(size=8)
    model = load(tiny_llama_dir, False)
    apply_bottleneck(model, bottleneck_cfg)
    randomize(model, 7)
    save_bottleneck(model, bottleneck_cfg, tmp_path / "bn", str(tiny_llama_dir))
    selective_cfg = SelectiveConfig(patterns=["norm", "down_proj"], unquantized_modules=["down_proj"])
    model = load(tiny_llama_dir, False)
    apply_selective(model, selective_cfg)
    randomize(model, 8)
    save_selective(model, selective_cfg, tmp_path / "sel", str(tiny_llama_dir))

    alone = {None: logits(load4(["down_proj"]))}
    lora_alone = load4(["down_proj"])
    load_adapter(lora_alone, adapter_dirs["a"])
    alone["a"] = logits(lora_alone)
    bn_alone = load4(["down_proj"])
    load_bottleneck(bn_alone, tmp_path / "bn")
    alone["bn"] = logits(bn_alone)
    sel_alone = load4(["down_proj"])
    load_selective(sel_alone, tmp_path / "sel")
    alone["sel"] = logits(sel_alone)
    assert min((alone[k] - alone[None]).abs().max().item() for k in ("a", "bn", "sel")) > 0.05

    switcher = open_switcher({"a": adapter_dirs["a"], "bn": tmp_path / "bn", "sel": tmp_path / "sel"}, base=str(tiny_llama_dir))
    for name in ["sel", "bn", "a", "sel", None, "bn", "sel", "a", None]:
        switcher.use(name)
        assert (logits(switcher.active_model) - alone[name]).abs().max().item() <= SWITCH_ATOL, name


def test_corrupt_base_weights_are_one_line_in_generate(tiny_llama_dir, adapter_dirs, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken-base"
    shutil.copytree(tiny_llama_dir, broken)
    for shard in broken.glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:100])
    err = cli_error(["generate", str(adapter_dirs["a"]), "--base", str(broken), "hello"], capsys)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: the weights in {broken} are corrupt or truncated (safetensors: ")
    assert lines[0].endswith("; download or copy the model again")
