"""The preference objectives' numbers: per-token log-probs equal transformers', DPO starts at ln 2, KTO's and ORPO's
formulas, chunked equals hf for every method, and the table is the one place that lists them (TRL as the oracle: test_objectives_trl.py)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from qlora_lite.config import OBJECTIVES, LoRAConfig, ObjectiveConfig, TrainConfig
from qlora_lite.data.formats import IGNORE_INDEX
from qlora_lite.methods.lora import apply_lora
from qlora_lite.training.loss import linear_token_logps
from qlora_lite.training.objectives import TABLE, get_objective
from qlora_lite.training.objectives.logps import compute_token_logps
from qlora_lite.training.objectives.orpo import log1mexp
from qlora_lite.training.objectives.reference import build_kl_sequence
from qlora_lite.training.objectives.table import Objective, build_table

from ..helpers import load
from .test_loss import VOCAB, attach, build_model, make_batch

CHUNKED = TrainConfig(loss="chunked", loss_chunk_tokens=5)
HF = TrainConfig(loss="hf")


def make_pairs(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two pairs as collate_batch lays them out: the chosen rows, then the rejected rows, sharing each pair's prompt."""
    chosen = make_batch(seed, rows=2, length=14)
    rejected = make_batch(seed + 1, rows=2, length=14)
    rejected["input_ids"][:, :6] = chosen["input_ids"][:, :6]  # the prompts (4 and 6 tokens) agree
    batch = {key: torch.cat([chosen[key], rejected[key]]) for key in chosen}
    batch["labels"] = torch.where(batch["labels"] == IGNORE_INDEX, IGNORE_INDEX, batch["input_ids"])  # labels are the ids they learn
    return batch


def with_reference(model, batch: dict, name: str, cfg: TrainConfig = CHUNKED) -> dict:
    return batch | get_objective(name).reference(model, batch, cfg)


def reference_logps(model, batch: dict) -> torch.Tensor:
    """Per-row sums of the answer tokens' log-probs from the model's whole logits (transformers' forward)."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    logps = torch.log_softmax(logits, -1).gather(2, labels.clamp(min=0)[..., None]).squeeze(2)
    return (logps * (labels != IGNORE_INDEX)).sum(1)


# ---------------------------------------------------------------------------- the head's per-token log-probs


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_token_logps_and_every_gradient_equal_autograd(softcap):
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(37, 16, requires_grad=True), torch.randn(50, 16, requires_grad=True), torch.randn(50, requires_grad=True)
    targets, weights = torch.randint(0, 50, (37,)), torch.randn(37)
    got = linear_token_logps(hidden, weight, bias, targets, 8, softcap)
    (got * weights).sum().backward()
    ours = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    logits = hidden @ weight.T + bias
    logits = softcap * torch.tanh(logits / softcap) if softcap else logits
    expected = torch.log_softmax(logits, -1).gather(1, targets[:, None]).squeeze(1)
    (expected * weights).sum().backward()
    assert (got - expected).abs().max().item() < 1e-5
    for mine, theirs in zip(ours, (hidden.grad, weight.grad, bias.grad)):
        assert (mine - theirs).abs().max().item() < 1e-5 * max(theirs.abs().max().item(), 1.0)


@pytest.mark.parametrize("method", ["lora", "prompt_tuning", "adapter", "full"])
@pytest.mark.parametrize("architecture", ["llama", "qwen2"])
def test_chunked_sequence_logps_equal_the_models_logits(architecture, method):
    """The chunked head (5-token chunks) and train.loss hf give transformers' answer log-probs, and the same gradients, per row."""
    model = attach(build_model(architecture, tied=False), method, tied=False)
    batch = make_pairs()
    grads = []
    for cfg in (CHUNKED, HF):
        model.zero_grad(set_to_none=True)
        sums = compute_token_logps(model, batch, cfg).sum_by_row()
        (sums * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad})
        if method != "prompt_tuning":  # a soft prompt is not in the plain forward
            assert (sums.detach() - reference_logps(model, batch)).abs().max().item() < 1e-4
    scale = max(g.abs().max().item() for g in grads[1].values())
    assert max((grads[0][k] - grads[1][k]).abs().max().item() for k in grads[1]) < 1e-5 * max(scale, 1.0)


def test_with_prompt_selects_every_real_token_and_marks_the_answers():
    model = build_model("llama", tied=False)
    batch = make_pairs()
    logps = compute_token_logps(model, batch, CHUNKED, with_prompt=True)
    assert logps.values.shape[0] == int(batch["attention_mask"][:, 1:].sum())  # every real next token
    assert int(logps.answer.sum()) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    answer_only = compute_token_logps(model, batch, CHUNKED)
    assert torch.allclose(logps.sum_by_row(), answer_only.sum_by_row(), atol=1e-5)


# ---------------------------------------------------------------------------- the objectives' formulas


def test_dpo_from_a_fresh_lora_on_the_4bit_base_is_ln2_with_zero_rewards(tiny_llama_dir):
    model = load(tiny_llama_dir, four_bit=True)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, dtype="float32"))
    batch = make_pairs()
    batch["input_ids"] = batch["input_ids"] % 250
    batch["labels"] = torch.where(batch["labels"] == IGNORE_INDEX, batch["labels"], batch["input_ids"])
    model.eval()
    batch = with_reference(model, batch, "dpo")
    result = get_objective("dpo").compute(model, batch, CHUNKED, ObjectiveConfig(name="dpo"))
    assert abs(result.loss.item() - math.log(2)) < 1e-7
    metrics = get_objective("dpo").summarize(result.sums)
    assert metrics["rewards/chosen"] == metrics["rewards/rejected"] == metrics["rewards/margins"] == 0.0
    assert metrics["rewards/accuracies"] == 0.0  # a tie is not a win
    assert result.loss.requires_grad


def test_dpo_loss_is_the_logistic_loss_of_the_scaled_margin():
    model = attach(build_model("llama", tied=False), "lora", tied=False)
    batch = make_pairs()
    sums = reference_logps(model, batch)
    batch |= {"ref_chosen_logps": torch.tensor([-40.0, -30.0]), "ref_rejected_logps": torch.tensor([-35.0, -50.0])}
    objective = ObjectiveConfig(name="dpo", beta=0.3, label_smoothing=0.1)
    result = get_objective("dpo").compute(model, batch, CHUNKED, objective)
    chosen, rejected = sums[:2] - batch["ref_chosen_logps"], sums[2:] - batch["ref_rejected_logps"]
    z = 0.3 * (chosen - rejected)
    expected = (-0.9 * F.logsigmoid(z) - 0.1 * F.logsigmoid(-z)).mean()
    assert abs(result.loss.item() - expected.item()) < 1e-5
    metrics = get_objective("dpo").summarize(result.sums)
    assert abs(metrics["rewards/margins"] - z.mean().item()) < 1e-5
    assert metrics["rewards/accuracies"] == (z > 0).float().mean().item()


def test_orpo_and_simpo_use_the_mean_answer_log_prob():
    model = attach(build_model("llama", tied=False), "lora", tied=False)
    batch = make_pairs()
    answer = batch["labels"][:, 1:] != IGNORE_INDEX
    means = reference_logps(model, batch) / answer.sum(1)
    chosen, rejected = means[:2], means[2:]
    simpo = get_objective("simpo").compute(model, batch, CHUNKED, ObjectiveConfig(name="simpo", beta=2.0, simpo_gamma=0.8))
    assert abs(simpo.loss.item() - (-F.logsigmoid(2.0 * (chosen - rejected) - 0.8)).mean().item()) < 1e-5
    orpo = get_objective("orpo").compute(model, batch, CHUNKED, ObjectiveConfig(name="orpo", beta=0.25))
    log_odds = (chosen - rejected) - (torch.log1p(-chosen.exp()) - torch.log1p(-rejected.exp()))
    with torch.no_grad():  # the NLL term: every real token of the chosen rows, prompt included
        logits = model(input_ids=batch["input_ids"][:2], attention_mask=batch["attention_mask"][:2]).logits[:, :-1]
        targets = batch["input_ids"][:2, 1:].masked_fill(batch["attention_mask"][:2, 1:] == 0, IGNORE_INDEX)
        nll = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    assert abs(orpo.loss.item() - (nll - 0.25 * F.logsigmoid(log_odds).mean()).item()) < 1e-5


def test_log1mexp_is_accurate_on_both_sides_of_its_split():
    x = torch.tensor([-1e-6, -0.5, -0.6931, -0.7, -5.0, -40.0], dtype=torch.float64)
    assert torch.allclose(log1mexp(x.float()).double(), torch.log(-torch.expm1(x)), rtol=1e-6)


def test_kto_weighs_desirable_and_undesirable_against_a_clamped_kl():
    model = attach(build_model("llama", tied=False), "lora", tied=False)
    batch = make_batch(0, rows=3, length=16)
    kl = make_batch(5, rows=3, length=12)
    batch |= {"desirable": torch.tensor([True, False, True]), "kl_input_ids": kl["input_ids"], "kl_labels": kl["labels"], "kl_attention_mask": kl["attention_mask"]}
    logps = reference_logps(model, batch)
    kl_logps = reference_logps(model, kl)
    objective = ObjectiveConfig(name="kto", beta=0.5, desirable_weight=1.5, undesirable_weight=0.7)
    for ref_kl_shift, expected_kl in ((-2.0, 2.0), (+2.0, 0.0)):  # policy above the reference: KL 2; below: clamped to 0
        batch |= {"ref_logps": logps - torch.tensor([1.0, -1.0, 3.0]), "ref_kl_logps": kl_logps + ref_kl_shift}
        result = get_objective("kto").compute(model, batch, CHUNKED, objective)
        ratio = torch.tensor([1.0, -1.0, 3.0])
        losses = torch.stack([1.5 * (1 - torch.sigmoid(0.5 * (ratio[0] - expected_kl))),
                              1.5 * (1 - torch.sigmoid(0.5 * (ratio[2] - expected_kl))),
                              0.7 * (1 - torch.sigmoid(0.5 * (expected_kl - ratio[1])))])  # fmt: skip
        assert abs(result.loss.item() - losses.mean().item()) < 1e-5
        metrics = get_objective("kto").summarize(result.sums)
        assert abs(metrics["kl"] - expected_kl) < 1e-4
        assert abs(metrics["rewards/chosen"] - 0.5 * 2.0) < 1e-5 and abs(metrics["rewards/rejected"] + 0.5) < 1e-5


def test_kl_sequence_is_this_prompt_and_the_other_completion_cut_to_length():
    example = {"input_ids": [1, 5, 6, 7, 8], "labels": [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 7, 8]}
    other = {"input_ids": [1, 9, 10, 11, 12, 13], "labels": [IGNORE_INDEX, IGNORE_INDEX, 10, 11, 12, 13]}
    kl = build_kl_sequence(example, other, max_seq_len=6)
    assert kl == {"kl_input_ids": [1, 5, 6, 10, 11, 12], "kl_labels": [IGNORE_INDEX] * 3 + [10, 11, 12]}


# ---------------------------------------------------------------------------- the table


def test_the_table_is_config_objectives_each_with_what_its_spec_says():
    assert list(TABLE) == list(OBJECTIVES) == ["sft", "dpo", "orpo", "simpo", "kto"]
    for name, entry in TABLE.items():
        assert (entry.reference is not None) == OBJECTIVES[name].reference
        assert bool(entry.reference_keys) == OBJECTIVES[name].reference
    with pytest.raises(RuntimeError, match="table of objectives"):
        build_table(tuple(entry for name, entry in TABLE.items() if name != "kto"))
    with pytest.raises(RuntimeError, match="reference mismatch: \\['dpo'\\]"):
        build_table(tuple(Objective(e.name, e.compute, e.count_units, e.summarize) if e.name == "dpo" else e for e in TABLE.values()))


def test_units_are_tokens_pairs_and_examples():
    batch = make_pairs()
    assert TABLE["sft"].count_units(batch) == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert TABLE["dpo"].count_units(batch) == TABLE["orpo"].count_units(batch) == TABLE["simpo"].count_units(batch) == 2
    assert TABLE["kto"].count_units(batch) == 4
