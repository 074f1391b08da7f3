"""fit() with a preference objective: DPO starts at ln 2 and learns, the reference log-probs are computed once
and read back (a second run, a resume), every objective trains on the 4-bit base, SFT -> DPO continues an
adapter, and the user's mistakes are one line before a model loads."""

from __future__ import annotations

import json
import math

import pytest
import torch

from qlora_lite.config import load_recipe
from qlora_lite.errors import TrainingError
from qlora_lite.training.fit import fit
from tests.helpers import WORDS, cli_error, read_metrics, recipe_overrides

TRL_PAIR_METRICS = ["logps/chosen", "logps/rejected", "rewards/accuracies", "rewards/chosen", "rewards/margins", "rewards/rejected"]


def write_pairs(folder, n: int = 48) -> str:
    """Prompt "Is it a word: w" as written; chosen "yes w", rejected "no w": a preference a random tiny base can learn in a few steps."""
    path = folder / "pairs.jsonl"
    rows = [{"prompt": f"Is it a word: {WORDS[i % 12]}\n", "chosen": f"yes {WORDS[i % 12]}", "rejected": f"no {WORDS[i % 12]}"} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_unpaired(folder, n: int = 48) -> str:
    path = folder / "unpaired.jsonl"
    rows = [{"prompt": f"Is it a word: {WORDS[i % 12]}\n", "completion": f"{'no' if i % 2 else 'yes'} {WORDS[i % 12]}", "label": i % 2 == 0} for i in range(n)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def preference_recipe(tmp_path, model_dir, objective: str = "dpo", **extra):
    data = write_unpaired(tmp_path) if objective == "kto" else write_pairs(tmp_path)
    fmt = "unpaired" if objective == "kto" else "preference"
    values = {"data.path": data, "data.format": fmt, "objective.name": objective, "train.max_steps": 12, "train.lr": 1e-2,
              "train.eval_every": 0, "lora.dtype": "float32", "train.optimizer": "adamw"} | extra  # fmt: skip
    return load_recipe(None, recipe_overrides(tmp_path, model_dir, **values))


def events(run_dir, name: str) -> list[dict]:
    return [m for m in read_metrics(run_dir) if m.get("event") == name]


def test_dpo_starts_at_ln2_learns_logs_trls_metrics_and_its_adapter_loads_in_peft(tiny_llama_dir, tmp_path):
    summary = fit(preference_recipe(tmp_path, tiny_llama_dir, **{"objective.beta": 0.5}))
    run = tmp_path / "run"
    steps = [m for m in read_metrics(run) if "loss" in m and "event" not in m]
    # A fresh LoRA (B = 0) is its reference: the first step's loss and the first eval are ln 2 exactly (fp32).
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-6 and abs(summary["initial_eval_loss"] - math.log(2)) < 1e-6
    assert summary["initial_eval_rewards/margins"] == 0.0
    assert sorted(k for k in steps[-1] if "/" in k) == TRL_PAIR_METRICS
    # Measured: eval loss 0.693 -> 0.0008, every held-out pair ranked right, margin 7.4 in 12 steps; asserted with margin.
    assert summary["final_eval_loss"] < 0.4 and summary["final_eval_rewards/accuracies"] >= 0.9
    assert summary["final_eval_rewards/margins"] > 1.0
    assert events(run, "reference")[0]["reference"] == "computed"

    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from qlora_lite.methods.lora import load_adapter
    from tests.helpers import IDS, load

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, str(run / "adapter")).eval()
    ours = load(tiny_llama_dir)
    load_adapter(ours, run / "adapter")
    with torch.no_grad():
        assert (theirs(input_ids=IDS).logits - ours.eval()(input_ids=IDS).logits).abs().max().item() < 1e-5

    # It merges as an SFT adapter does, and generate answers with it (a string-prompt adapter: prompts as written).
    from qlora_lite.export.merge import merge_adapter
    from qlora_lite.generate import AdapterSwitcher, GenerationSettings

    report = merge_adapter(run / "adapter", tmp_path / "merged", verify=True, overwrite=True)
    assert report.merged_modules == 14 and report.max_logit_diff <= report.threshold
    switcher = AdapterSwitcher.from_base(str(tiny_llama_dir))
    switcher.add("dpo", run / "adapter")
    assert switcher.prompt_format("dpo") == "text"  # the test tokenizer has no chat template
    assert isinstance(switcher.generate("Is it a word: cat\n", adapter="dpo", settings=GenerationSettings(max_new_tokens=3)), str)


def test_the_reference_is_read_back_by_a_second_run_and_a_resume_and_never_recomputed_from_a_checkpoint(tiny_llama_dir, tmp_path, capsys):
    extra = {"train.max_steps": 4, "train.save_every": 4, "data.cache_dir": str(tmp_path / "cache")}  # its own cache: nothing computed before
    fit(preference_recipe(tmp_path, tiny_llama_dir, **extra))
    first = events(tmp_path / "run", "reference")[0]
    fit(preference_recipe(tmp_path, tiny_llama_dir, **extra), overwrite=True)
    second = events(tmp_path / "run", "reference")[0]
    assert (first["reference"], second["reference"]) == ("computed", "cached")
    assert first["reference_file"] == second["reference_file"]
    fit(preference_recipe(tmp_path, tiny_llama_dir, **{**extra, "train.max_steps": 6}), resume=True)
    assert events(tmp_path / "run", "reference")[-1]["reference"] == "cached"
    # Without the file a resume stops: the trained checkpoint is not the reference.
    __import__("os").remove(second["reference_file"])
    with pytest.raises(TrainingError, match="cannot be recomputed from a trained checkpoint"):
        fit(preference_recipe(tmp_path, tiny_llama_dir, **{**extra, "train.max_steps": 8}), resume=True)


@pytest.mark.parametrize("objective", ["orpo", "simpo", "kto"])
def test_every_objective_trains_on_the_4bit_base(tiny_llama_dir, tmp_path, objective):
    extra = {"objective.beta": 2.0 if objective == "simpo" else 0.5, "quant.load_in_4bit": True}
    summary = fit(preference_recipe(tmp_path, tiny_llama_dir, objective, **extra))
    metrics = read_metrics(tmp_path / "run")
    steps = [m for m in metrics if "loss" in m and "event" not in m]
    # Measured (12 steps, lr 1e-2, fp32 base): orpo 6.35 -> 3.27, simpo 1.32 -> 0.011, kto 0.50 -> 0.031; asserted: at least 25% down.
    assert summary["final_eval_loss"] < 0.75 * summary["initial_eval_loss"], (summary["initial_eval_loss"], summary["final_eval_loss"])
    assert "rewards/chosen" in steps[-1] and "logps/rejected" in steps[-1]
    assert bool(events(tmp_path / "run", "reference")) == (objective == "kto")  # only KTO of these has a reference
    if objective == "kto":
        assert steps[-1]["kl"] >= 0.0
    if objective == "orpo":
        assert {"nll_loss", "log_odds_ratio", "log_odds_chosen"} <= steps[-1].keys()


def test_dpo_continues_an_sft_adapter_which_is_then_the_reference(tiny_llama_dir, tmp_path):
    sft = load_recipe(None, recipe_overrides(tmp_path / "sft", tiny_llama_dir, **{"train.max_steps": 6, "lora.dtype": "float32", "output_dir": str(tmp_path / "sft-run")})) if (tmp_path / "sft").mkdir() is None else None
    fit(sft)
    adapter = tmp_path / "sft-run" / "adapter"
    continued = fit(preference_recipe(tmp_path, tiny_llama_dir, **{"model.init_adapter": str(adapter), "train.max_steps": 2}))
    fresh = fit(preference_recipe(tmp_path, tiny_llama_dir, **{"train.max_steps": 2, "output_dir": str(tmp_path / "fresh")}))
    # Policy = reference at the start either way (ln 2), but the reference differs: base + the SFT adapter.
    assert abs(continued["initial_eval_loss"] - math.log(2)) < 1e-6
    assert abs(continued["initial_eval_logps/chosen"] - fresh["initial_eval_logps/chosen"]) > 0.1


def test_preference_mistakes_are_one_line_before_the_model_loads(tiny_llama_dir, tmp_path, capsys, monkeypatch):
    import qlora_lite.training.fit as fit_module

    monkeypatch.setattr(fit_module, "load_base_model", lambda *a, **k: pytest.fail("the model loaded"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("method: lora\n")
    base = ["train", str(recipe), "--overwrite"]
    pairs = write_pairs(tmp_path)
    common = recipe_overrides(tmp_path, tiny_llama_dir, **{"data.path": pairs, "data.format": "preference", "objective.name": "dpo"})
    err = cli_error(base + common + ["model.init_adapter=" + str(tmp_path / "nowhere")], capsys)
    assert "model.init_adapter" in err and "adapter_config.json" in err and len(err.strip().splitlines()) == 1
    err = cli_error(base + common + ["objective.name=kto"], capsys)
    assert "objective kto trains on data.format unpaired" in err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "Repeat: cat\n", "chosen": "cat"}) + "\n")
    err = cli_error(base + common + [f"data.path={broken}", "data.eval_fraction=0"], capsys)
    last = err.strip().splitlines()[-1]  # above it only datasets' reading bars
    assert last.startswith("error: ") and "'rejected'" in last and "record 0" in last
