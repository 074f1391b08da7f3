"""Every method trains through the same fit(), and what it saves loads back to the same logits."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from qlora_lite.config import load_recipe
from qlora_lite.errors import MethodError
from qlora_lite.methods.full import load_full_weights
from qlora_lite.methods.table import load_method
from qlora_lite.quant import load_base_model, load_tokenizer
from qlora_lite.training.fit import fit
from tests.helpers import read_metrics, recipe_overrides

IDS = torch.randint(4, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def train(tmp_path, model_dir, method: str, **extra):
    cfg = load_recipe(None, recipe_overrides(tmp_path, model_dir, method=method, **extra))
    return cfg, fit(cfg)


def test_full_fine_tuning_trains_every_weight_and_saves_a_plain_model(tiny_llama_dir, tmp_path):
    cfg, summary = train(tmp_path, tiny_llama_dir, "full", **{"quant.load_in_4bit": False, "train.lr": 3e-3, "train.optimizer": "adamw"})
    # Measured: eval loss 5.70 -> 3.72 in 8 steps (-35%); assert at least -25%.
    assert summary["final_eval_loss"] < 0.75 * summary["initial_eval_loss"]
    out = tmp_path / "run" / "adapter"
    trained = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    changed = [n for n, p in base.named_parameters() if not torch.equal(p, dict(trained.named_parameters())[n])]
    assert len(changed) == len(list(base.named_parameters())) == 21  # 2 layers x 9 + embed, norm, lm_head
    # load_method (what --resume uses) on a fresh base gives the saved model's logits.
    fresh = load_base_model(cfg.model, cfg.quant, torch.device("cpu"))
    assert torch.equal(logits(load_method(fresh, cfg, out, trainable=False)), logits(trained))
    assert load_tokenizer(cfg.model, str(out)).eos_token_id == 3  # the folder is a complete model
    assert read_metrics(tmp_path / "run")[-1]["event"] == "summary"


def test_full_weights_from_another_base_are_refused(tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    AutoModelForCausalLM.from_pretrained(str(tiny_qwen2_dir)).save_pretrained(str(tmp_path / "qwen"))
    llama = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir))
    with pytest.raises(MethodError, match="which this base model does not have: the checkpoint was made for another base"):
        load_full_weights(llama, tmp_path / "qwen")
    with pytest.raises(MethodError, match="holds no safetensors weights"):
        load_full_weights(llama, tmp_path)


METHOD_OVERRIDES = {
    "lora": {},
    "selective": {"selective.patterns": ["norm", "down_proj"], "selective.unquantized_modules": ["down_proj"]},
    "adapter": {"bottleneck.size": 8},
    "prompt_tuning": {"prompt.num_virtual_tokens": 8, "train.lr": 3e-2},
    "full": {"quant.load_in_4bit": False, "train.lr": 3e-3},
}


@pytest.mark.parametrize("method", list(METHOD_OVERRIDES))
def test_each_method_trains_and_its_saved_output_reproduces_the_final_eval(tiny_llama_dir, tmp_path, method):
    """fit() with each method lowers the eval loss, and loading what it saved onto a fresh base
    gives that same final eval loss: the save/load round trip is exact end to end."""
    from qlora_lite.data.cache import build_datasets
    from qlora_lite.training.evaluate import evaluate_loss

    cfg, summary = train(tmp_path, tiny_llama_dir, method, **METHOD_OVERRIDES[method])
    assert summary["final_eval_loss"] < 0.95 * summary["initial_eval_loss"]
    tokenizer = load_tokenizer(cfg.model, str(tiny_llama_dir))
    unquantized = cfg.selective.unquantized_modules if method == "selective" else None
    fresh = load_base_model(cfg.model, cfg.quant, torch.device("cpu"), skip_modules=unquantized)
    model = load_method(fresh, cfg, tmp_path / "run" / "adapter", trainable=False)
    _, eval_examples = build_datasets(cfg.data, tokenizer, cfg.train.max_seq_len, cfg.train.seed)
    reloaded = evaluate_loss(model, eval_examples, cfg, tokenizer.pad_token_id, torch.device("cpu"))
    assert reloaded == pytest.approx(summary["final_eval_loss"], abs=1e-5)


# --- the table of methods -------------------------------------------------------------------------


def test_every_recipe_method_has_one_entry_and_every_entry_is_a_recipe_method():
    from qlora_lite.config import METHODS
    from qlora_lite.methods.table import TABLE, get_method

    assert sorted(m.name for m in TABLE) == sorted(METHODS)
    assert len({m.name for m in TABLE}) == len(TABLE) == 5
    for name in METHODS:
        assert get_method(name).name == name


def test_peft_types_round_trip_and_both_lookups_agree(tmp_path):
    from qlora_lite.methods.table import TABLE, find_saved_method, get_method, get_method_by_peft_type

    with_folder = [m for m in TABLE if m.peft_type is not None]
    assert sorted(m.peft_type for m in with_folder) == ["BOTTLENECK", "LORA", "PROMPT_TUNING", "SELECTIVE"]
    for method in with_folder:
        assert get_method_by_peft_type(method.peft_type) is method
        assert get_method(method.name) is get_method_by_peft_type(method.peft_type)
        folder = tmp_path / method.name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(f'{{"peft_type": "{method.peft_type}"}}')
        assert find_saved_method(folder) is method
        # an adapter folder can be served: the switcher's capabilities are all there
        assert None not in (method.read_config, method.read, method.check_fits, method.apply)
    # full fine-tuning writes a plain checkpoint, not an adapter folder: no peft_type
    assert get_method("full").peft_type is None


def test_each_entry_merges_or_says_why_not():
    from qlora_lite.methods.table import TABLE

    for method in TABLE:
        if method.peft_type is None:
            continue
        assert (method.merge_refusal is None) == bool(method.merge_summary), method.name
        if method.merge_refusal is not None:
            assert "{adapter_dir}" in method.merge_refusal and "Serve the base + adapter instead" in method.merge_refusal
    assert [m.name for m in TABLE if m.merge_refusal] == ["prompt_tuning", "adapter"]


def test_unknown_names_and_peft_types_are_clear_errors():
    from qlora_lite.methods.table import get_method, get_method_by_peft_type

    with pytest.raises(MethodError, match=r"method 'ia3' is unknown; known methods: lora, prompt_tuning, selective, adapter, full"):
        get_method("ia3")
    with pytest.raises(MethodError, match=r"peft_type 'IA3' is not one qlora-lite reads; known: LORA, PROMPT_TUNING, SELECTIVE, BOTTLENECK"):
        get_method_by_peft_type("IA3")
    with pytest.raises(MethodError, match="peft_type None"):
        get_method_by_peft_type(None)
