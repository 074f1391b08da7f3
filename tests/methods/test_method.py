"""The `Method` type and the five entries built from it: their recipe sections, `modify_in_place`,
a save/load round trip through the table's `attach_method` / `save_method` / `load_method`,
`Method.load`'s two paths, `build_table`'s checks, and the planner facts each entry states."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn
from transformers import AutoConfig

from qlora_lite.config import METHODS, BottleneckConfig, LoRAConfig, PromptConfig, RecipeConfig, SelectiveConfig, load_recipe
from qlora_lite.methods.bottleneck import BOTTLENECK_METHOD
from qlora_lite.methods.full import FULL_METHOD
from qlora_lite.methods.lora import LORA_METHOD
from qlora_lite.methods.method import Method, modify_in_place
from qlora_lite.methods.prompt_tuning import PROMPT_TUNING_METHOD, SoftPromptModel
from qlora_lite.methods.selective import SELECTIVE_METHOD
from qlora_lite.methods.table import TABLE, attach_method, build_table, get_method, load_method, save_method
from qlora_lite.planner import build_meta_model
from tests.helpers import load, logits

SETTINGS_CLASS = {"lora": LoRAConfig, "prompt_tuning": PromptConfig, "selective": SelectiveConfig, "adapter": BottleneckConfig, "full": None}


# --- the recipe side --------------------------------------------------------------------------------


def test_each_entry_reads_its_own_recipe_section_and_full_reads_none():
    cfg = load_recipe(None, ["lora.r=4", "prompt.num_virtual_tokens=5", "bottleneck.size=8"])
    fields = {f.name for f in dataclasses.fields(RecipeConfig)}
    assert {m.name: m.section for m in TABLE} == {
        "lora": "lora", "prompt_tuning": "prompt", "selective": "selective", "adapter": "bottleneck", "full": None,
    }
    for method in TABLE:
        if method.section is None:
            assert method.settings(cfg) is None
            continue
        assert method.section in fields
        assert type(getattr(cfg, method.section)) is SETTINGS_CLASS[method.name]
        # The very object of the recipe, not a copy: what attach is given is what the user set.
        assert method.settings(cfg) is getattr(cfg, method.section)
    assert (cfg.lora.r, cfg.prompt.num_virtual_tokens, cfg.bottleneck.size) == (4, 5, 8)


def test_modify_in_place_calls_the_change_once_and_trains_the_base_itself():
    calls = []
    model, settings = nn.Linear(2, 2), object()
    # What the change returns (apply_lora's wrapped paths, say) is not the model to train.
    attach = modify_in_place(lambda m, s: calls.append((m, s)) or ["a.path"])
    assert attach(model, settings, "tokenizer") is model
    assert len(calls) == 1 and calls[0][0] is model and calls[0][1] is settings


# --- a save/load round trip through the table ----------------------------------------------------------

# method -> (overrides, trained tensor count on the tiny Llama: hidden 64, 2 layers, kv 32, MLP 128, vocab 256)
ROUND_TRIP = {
    # r x (in + out) over q,k,v,o,gate,up,down = 4 x 1024 per layer, 2 layers
    "lora": (["lora.r=4", "lora.dropout=0.0"], 8192),
    # n x H
    "prompt_tuning": (["prompt.num_virtual_tokens=5"], 5 * 64),
    # two layer norms per layer and the final norm, 64 each
    "selective": (["selective.patterns=[norm]"], 5 * 64),
    # layers x placements x (2 H size + size + H)
    "adapter": (["bottleneck.size=8"], 2 * 2 * (2 * 64 * 8 + 8 + 64)),
    # embed + lm_head (256 x 64 each), final norm, 2 x (linears 36864 + norms 128)
    "full": (["quant.load_in_4bit=false"], 2 * 16384 + 64 + 2 * 36992),
}


def trainable(model: nn.Module) -> dict[str, int]:
    return {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", list(ROUND_TRIP))
def test_what_save_method_wrote_loads_back_to_the_same_logits_and_trainable_tensors(tiny_llama_dir, tokenizer, tmp_path, name):
    overrides, expected_count = ROUND_TRIP[name]
    cfg = load_recipe(None, [f"method={name}", *overrides])
    method = get_method(name)
    base = load(tiny_llama_dir)
    counted = sum(method.count_trainable(method.settings(cfg), base))
    model = attach_method(base, cfg, tokenizer)
    assert isinstance(model, SoftPromptModel) == (name == "prompt_tuning")
    names = trainable(model)
    assert sum(names.values()) == counted == expected_count

    before = logits(model)
    # A fresh adapter is the identity (LoRA's B and the adapters' up are zero): move every trained
    # tensor so the round trip has something to carry.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
    trained = logits(model)
    assert (trained[:, -16:] - before[:, -16:]).abs().max() > 1e-4
    save_method(model, cfg, tmp_path / "out", str(tiny_llama_dir))

    loaded = load_method(load(tiny_llama_dir), cfg, tmp_path / "out", trainable=True)
    assert type(loaded) is type(model)
    assert torch.allclose(logits(loaded), trained, atol=1e-6, rtol=0)
    assert trainable(loaded) == names
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}

    frozen = load_method(load(tiny_llama_dir), cfg, tmp_path / "out", trainable=False)
    assert trainable(frozen) == {}
    assert torch.allclose(logits(frozen), trained, atol=1e-6, rtol=0)


# --- Method.load's two paths ------------------------------------------------------------------------------


def stub_method(**fields) -> Method:
    return Method(name="stub", section=None, peft_type=None, attach=modify_in_place(lambda m, s: None), save=lambda *a: None, **fields)


def test_load_reads_the_folder_and_applies_its_weights_on_the_models_device(tmp_path):
    calls = {}

    def read(folder, allow_pickle):
        calls["read"] = (folder, allow_pickle)
        return "settings", {"w": torch.ones(3)}  # read from disk: on the CPU

    def apply(model, settings, weights, trainable):
        calls["apply"] = (model, settings, weights, trainable)
        return "the model to run"

    # A base on the meta device shows the move without a GPU: every weight must arrive there.
    with torch.device("meta"):
        model = nn.Linear(3, 3)
    assert stub_method(read=read, apply=apply).load(model, tmp_path, True) == "the model to run"
    assert calls["read"] == (tmp_path, False)  # a checkpoint is never unpickled
    got_model, settings, weights, flag = calls["apply"]
    assert (got_model is model, settings, list(weights), flag) == (True, "settings", ["w"], True)
    assert weights["w"].device.type == "meta" and weights["w"].shape == (3,)


def test_load_uses_load_checkpoint_instead_of_read_when_the_entry_has_one(tmp_path):
    calls = []
    result = nn.Identity()

    def load_checkpoint(model, folder, trainable):
        calls.append((model, folder, trainable))
        return result

    def read(folder, allow_pickle):
        raise AssertionError("read must not be called when load_checkpoint is set")

    model = nn.Linear(2, 2)
    method = dataclasses.replace(FULL_METHOD, load_checkpoint=load_checkpoint, read=read)
    assert method.load(model, tmp_path, False) is result
    assert len(calls) == 1 and calls[0][0] is model and calls[0][1:] == (tmp_path, False)


# --- build_table -----------------------------------------------------------------------------------------


def test_build_table_refuses_a_missing_entry_an_unknown_name_and_a_shared_peft_type():
    with pytest.raises(RuntimeError, match=r"has entries \['lora', 'prompt_tuning', 'selective', 'adapter'\]"):
        build_table(TABLE[:4])
    ia3 = dataclasses.replace(LORA_METHOD, name="ia3", peft_type="IA3")
    with pytest.raises(RuntimeError, match=r"'full', 'ia3'\] \(peft_types"):
        build_table((*TABLE, ia3))
    # Two entries answering to the LORA folder: find_saved_method could not tell them apart.
    twin = dataclasses.replace(BOTTLENECK_METHOD, peft_type="LORA")
    with pytest.raises(RuntimeError, match=r"peft_types \['LORA', 'PROMPT_TUNING', 'SELECTIVE', 'LORA'\]"):
        build_table((LORA_METHOD, PROMPT_TUNING_METHOD, SELECTIVE_METHOD, twin, FULL_METHOD))
    # Two entries of one name, and none of another.
    with pytest.raises(RuntimeError, match="the table of methods has entries"):
        build_table((LORA_METHOD, LORA_METHOD, SELECTIVE_METHOD, BOTTLENECK_METHOD, FULL_METHOD))


def test_build_table_returns_the_entries_in_the_recipe_methods_order():
    assert list(METHODS) == ["lora", "prompt_tuning", "selective", "adapter", "full"]
    shuffled = (FULL_METHOD, SELECTIVE_METHOD, LORA_METHOD, BOTTLENECK_METHOD, PROMPT_TUNING_METHOD)
    for entries in (shuffled, tuple(reversed(TABLE))):
        table = build_table(entries)
        assert [m.name for m in table] == list(METHODS)
        assert all(a is b for a, b in zip(table, TABLE))


# --- planner facts, on a model with shapes and no storage ------------------------------------------------


@pytest.fixture
def meta_llama(tiny_llama_dir):
    model = build_meta_model(AutoConfig.from_pretrained(str(tiny_llama_dir)))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    return model


def test_each_entry_counts_its_trained_tensors_on_a_meta_model(meta_llama):
    cfg = load_recipe(None, ["lora.r=4", "prompt.num_virtual_tokens=5", "bottleneck.size=8", "selective.patterns=[norm]"])
    head = meta_llama.get_output_embeddings()
    linears = [m for m in meta_llama.modules() if isinstance(m, nn.Linear) and m is not head]
    assert len(linears) == 14  # 7 per layer, lm_head left out of all-linear
    lora = LORA_METHOD.count_trainable(cfg.lora, meta_llama)
    assert len(lora) == 28 and sum(lora) == sum(4 * (m.in_features + m.out_features) for m in linears) == 8192
    bottleneck = BOTTLENECK_METHOD.count_trainable(cfg.bottleneck, meta_llama)
    assert len(bottleneck) == 2 * 2 * 4 and sum(bottleneck) == 2 * 2 * (2 * 64 * 8 + 8 + 64) == 4384
    attn_only = dataclasses.replace(cfg.bottleneck, placement="attn")
    assert sum(BOTTLENECK_METHOD.count_trainable(attn_only, meta_llama)) == 2 * 1 * (2 * 64 * 8 + 8 + 64)
    assert PROMPT_TUNING_METHOD.count_trainable(cfg.prompt, meta_llama) == [5 * 64]
    assert SELECTIVE_METHOD.count_trainable(cfg.selective, meta_llama) == [64] * 5
    assert sum(FULL_METHOD.count_trainable(None, meta_llama)) == 2 * 16384 + 64 + 2 * 36992


def test_trained_dtype_follows_the_settings_where_the_method_adds_tensors():
    cfg = load_recipe(None, ["lora.dtype=float16", "prompt.dtype=bfloat16", "bottleneck.dtype=float16"])
    dtypes = {m.name: m.trainable_dtype(m.settings(cfg)) for m in TABLE}
    # Selective and full train the base's own tensors, which keep the compute dtype.
    assert dtypes == {"lora": "float16", "prompt_tuning": "bfloat16", "selective": "bfloat16", "adapter": "float16", "full": "bfloat16"}
    defaults = RecipeConfig()
    assert [m.trainable_dtype(m.settings(defaults)) for m in TABLE] == ["bfloat16", "float32", "bfloat16", "float32", "bfloat16"]


def test_only_prompt_tuning_adds_virtual_tokens():
    cfg = load_recipe(None, ["prompt.num_virtual_tokens=7"])
    assert {m.name: m.virtual_tokens(m.settings(cfg)) for m in TABLE} == {
        "lora": 0, "prompt_tuning": 7, "selective": 0, "adapter": 0, "full": 0,
    }
