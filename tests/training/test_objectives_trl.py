"""The preference objectives against TRL's own trainers as oracles: DPOTrainer (loss_type sigmoid), ORPOTrainer,
CPOTrainer (loss_type simpo, without and with CPO's NLL term) and KTOTrainer (loss_type kto).

Both sides hold the same tiny random fp32 Llama and the same LoRA: TRL wraps the base in a PEFT LoRA
(r 4, alpha 8, every linear layer of the blocks), whose B is then set to small seeded non-zero values;
ours loads PEFT's saved folder. TRL tokenizes a small in-memory dataset and its own dataloader makes one
batch; ours is built from that batch's token ids, so both see identical sequences. One loss, its
backward and the logged metrics are compared, for train.loss chunked (several chunks per batch) and hf.
DPO's and KTO's reference is the base: TRL disables the adapter, ours runs the bare base model; the two
sides' reference log-probs are compared too. Measured differences are printed: run with -s.

What the comparison relies on in TRL 1.16:
  * TRL's DPO sigmoid loss ignores label_smoothing (it feeds only robust, exo_pair and aot); ours is
    conservative DPO there, so DPO is compared at label_smoothing 0 only. The smoothed logistic loss
    itself (shared by DPO and SimPO) is compared through CPOTrainer's simpo, which still applies it.
  * ORPO's NLL is the token mean over every real token of the chosen sequences after the first, prompt
    included; CPO's NLL (cpo_alpha) is over the chosen answers only.
  * ORPOTrainer and CPOTrainer put a BOS first whatever the tokenizer does; DPOTrainer and KTOTrainer add
    one only where the tokenizer does (not this one). Ours is built from TRL's ids, so this is not compared.
  * KTO's KL rows: TRL rotates completions by one inside each batch of per_device_train_batch_size, in
    dataset order; ours (objectives/reference.py) rotates over the whole split. On a dataset of one batch the pairing is
    the same (test_kto_kl_sequences_are_trls_rotation).
  * Given a PeftModel rather than a peft_config, DPOTrainer and KTOTrainer copy its adapter into a frozen
    "ref" adapter: the reference is base + the starting adapter, as ours with model.init_adapter
    (test_dpo_from_a_starting_adapter_equals_trl).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

from qlora_lite.config import LoRAConfig, ObjectiveConfig, TrainConfig  # noqa: E402
from qlora_lite.data.formats import IGNORE_INDEX  # noqa: E402
from qlora_lite.methods.lora import apply_lora, load_adapter  # noqa: E402
from qlora_lite.training.objectives import get_objective  # noqa: E402
from qlora_lite.training.objectives.reference import build_kl_sequence  # noqa: E402

TOL = 1e-5
EOS = 3  # the test tokenizer's </s> (conftest)
LOSSES = {"chunked": TrainConfig(loss="chunked", loss_chunk_tokens=5), "hf": TrainConfig(loss="hf")}  # 5: several chunks per batch
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Made-up texts in the test tokenizer's words (conftest.TOKENIZER_TEXTS): prompts and answers of different lengths.
PROMPTS = ["Name a colour.", "the quick brown fox jumps over", "user: hello there\nassistant:"]
CHOSEN = [" Blue is a colour.", " the lazy dog", " hi! how can I help you today?"]
REJECTED = [" dog", " the quick brown fox jumps over the lazy dog 0123", " hello"]
DESIRABLE = [True, True, False]  # KTO: the first two chosen answers, the last rejected one

# Settings away from TRL's defaults, so that one read from the wrong place shows.
CASES = {
    "dpo": ObjectiveConfig(name="dpo", beta=0.2),
    "orpo": ObjectiveConfig(name="orpo", beta=0.25),
    "simpo": ObjectiveConfig(name="simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=0.0),
    "simpo-cpo": ObjectiveConfig(name="simpo", beta=2.0, simpo_gamma=0.7, cpo_alpha=1.0),
    "simpo-smoothed": ObjectiveConfig(name="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=0.1),  # logistic_loss's eps, DPO's too
    "kto": ObjectiveConfig(name="kto", beta=0.3, desirable_weight=1.3, undesirable_weight=0.8),
}
PAIR_METRICS = ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected"]
METRICS = {  # compared per case; TRL's KTOTrainer logs no rewards/accuracies
    "dpo": PAIR_METRICS,
    "orpo": PAIR_METRICS + ["nll_loss", "log_odds_ratio", "log_odds_chosen"],
    "simpo": PAIR_METRICS,
    "simpo-cpo": PAIR_METRICS + ["nll_loss"],
    "simpo-smoothed": PAIR_METRICS,
    "kto": [name for name in PAIR_METRICS if name != "rewards/accuracies"] + ["kl"],
}


# ---------------------------------------------------------------------------- the models


def build_base() -> torch.nn.Module:
    """A 2-layer random Llama in fp32 without dropout, on the test tokenizer's 256 ids (initializer 0.1: logits far from uniform)."""
    config = AutoConfig.for_model(
        "llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, initializer_range=0.1, tie_word_embeddings=False, pad_token_id=0,
        attention_dropout=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def peft_lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")


def randomize_lora_b(peft_model) -> None:
    """PEFT's B starts at 0: small seeded values make the log-ratios and every gradient non-trivial."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)


def load_ours(base: torch.nn.Module, peft_model, folder) -> torch.nn.Module:
    """Our model: the same base with PEFT's saved default adapter loaded into our LoRA layers."""
    peft_model.save_pretrained(str(folder), selected_adapters=["default"])
    load_adapter(base, folder, trainable=True)
    return base.train()


def our_name(peft_name: str) -> str:
    """PEFT's `base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight` -> ours `model.layers.0.self_attn.q_proj.lora_A.weight`."""
    return peft_name.removeprefix("base_model.model.").replace(".default.", ".")


# ---------------------------------------------------------------------------- TRL's side


def trl_args(config_class, folder, **settings):
    return config_class(
        output_dir=str(folder), report_to=[], per_device_train_batch_size=len(PROMPTS), gradient_checkpointing=False,
        bf16=False, fp16=False, use_cpu=True, seed=0, **settings,
    )  # fmt: skip


def build_trainer(case: str, model, tokenizer, folder, peft_config: LoraConfig | None):
    """The TRL trainer of the case on a dataset of exactly one batch."""
    cfg = CASES[case]
    pairs = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    common = {"model": model, "train_dataset": pairs, "processing_class": tokenizer, "peft_config": peft_config}
    if case == "dpo":
        return DPOTrainer(args=trl_args(DPOConfig, folder, loss_type=["sigmoid"], beta=cfg.beta), **common)
    if case == "orpo":  # remove_unused_columns False: what their padding collator needs (they would set it, with a warning)
        return ORPOTrainer(args=trl_args(ORPOConfig, folder, beta=cfg.beta, remove_unused_columns=False), **common)
    if case.startswith("simpo"):
        args = trl_args(CPOConfig, folder, loss_type="simpo", beta=cfg.beta, simpo_gamma=cfg.simpo_gamma, cpo_alpha=cfg.cpo_alpha, label_smoothing=cfg.label_smoothing, remove_unused_columns=False)
        return CPOTrainer(args=args, **common)
    common["train_dataset"] = Dataset.from_dict({"prompt": PROMPTS, "completion": [c if d else r for c, r, d in zip(CHOSEN, REJECTED, DESIRABLE)], "label": DESIRABLE})
    args = trl_args(KTOConfig, folder, loss_type="kto", beta=cfg.beta, desirable_weight=cfg.desirable_weight, undesirable_weight=cfg.undesirable_weight)
    return KTOTrainer(args=args, **common)


def run_trl(case: str, tokenizer, folder, starting_adapter: bool = False) -> dict:
    """TRL's loss, LoRA gradients (under our names), logged metrics and reference log-probs on one batch of its dataloader,
    with our model (same weights) and our batch (same token ids) beside them.

    starting_adapter: TRL is given a PeftModel whose adapter is already non-zero (its reference: base + that adapter);
    otherwise the base and a peft_config (its reference: the base, adapter disabled), B set after it wrapped the base.
    """
    base = build_base()
    ours, bare_base = copy.deepcopy(base), copy.deepcopy(base).eval()
    if starting_adapter:
        peft_model = get_peft_model(base, peft_lora())
        randomize_lora_b(peft_model)
        trainer = build_trainer(case, peft_model, tokenizer, folder / "trl", peft_config=None)
    else:
        trainer = build_trainer(case, base, tokenizer, folder / "trl", peft_config=peft_lora())
        randomize_lora_b(trainer.model)
    model = trainer.model.train()
    ours = load_ours(ours, model, folder / "adapter")
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(model, inputs)
    loss.backward()
    grads = {our_name(name): p.grad.detach().clone() for name, p in model.named_parameters() if ".default." in name and p.requires_grad}
    logged = trainer._metrics["train"] if hasattr(trainer, "_metrics") else trainer._stored_metrics["train"]  # DPO, KTO / ORPO, CPO
    metrics = {key: values[-1] for key, values in logged.items()}
    ref = [values.detach().clone() for values in trainer.compute_ref_log_probs(model, inputs)] if case in ("dpo", "kto") else None
    batch = to_our_batch(case, trainer, inputs)
    return {"loss": loss.item(), "grads": grads, "metrics": metrics, "ref": ref, "batch": batch, "ours": ours, "base": bare_base}


# ---------------------------------------------------------------------------- TRL's batch in our layout


def masked_labels(input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
    return input_ids.masked_fill(completion_mask == 0, IGNORE_INDEX)


def to_our_batch(case: str, trainer, inputs: dict) -> dict[str, torch.Tensor]:
    """Our batch from the same token ids: (2B, T) chosen rows then rejected rows, labels -100 off the answers; KTO's KL rows."""
    if case in ("dpo", "kto"):  # TRL's collators: right-padded rows (DPO: chosen then rejected) with a completion mask
        batch = {"input_ids": inputs["input_ids"], "labels": masked_labels(inputs["input_ids"], inputs["completion_mask"]),
                 "attention_mask": inputs["attention_mask"]}  # fmt: skip
        if case == "kto":
            batch |= {
                "desirable": inputs["label"].bool(),
                "kl_input_ids": inputs["KL_input_ids"],
                "kl_labels": masked_labels(inputs["KL_input_ids"], inputs["KL_completion_mask"]),
                "kl_attention_mask": inputs["KL_attention_mask"],
            }
    else:  # ORPO / CPO: chosen_* and rejected_* with labels; TRL's own concatenation pads both halves to one width
        both = trainer.concatenated_inputs(inputs, is_encoder_decoder=False, padding_value=trainer.processing_class.pad_token_id)
        batch = {"input_ids": both["concatenated_input_ids"], "labels": both["concatenated_labels"], "attention_mask": both["concatenated_attention_mask"]}
    for prefix in ("", "kl_") if case == "kto" else ("",):
        check_layout(batch[f"{prefix}input_ids"], batch[f"{prefix}labels"], batch[f"{prefix}attention_mask"])
    return batch


def check_layout(input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> None:
    """As collate_batch lays rows out: right padding, a -100 prompt then a labelled answer that ends with EOS, nothing labelled after."""
    for ids, row_labels, row_mask in zip(input_ids, labels, mask):
        length = int(row_mask.sum())
        assert row_mask[:length].all() and not row_mask[length:].any()
        labelled = (row_labels != IGNORE_INDEX).nonzero().flatten().tolist()
        assert labelled == list(range(labelled[0], length)) and labelled[0] > 0
        assert row_labels[labelled].tolist() == ids[labelled].tolist() and ids[length - 1] == EOS


# ---------------------------------------------------------------------------- comparing


def gap(got: float, expected: float) -> float:
    """|got - expected|, relative where |expected| > 1 (summed log-probs are tens of nats)."""
    return abs(got - expected) / max(1.0, abs(expected))


def grad_gap(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> float:
    """The largest |difference| over every LoRA gradient, relative to the largest |gradient|."""
    assert got.keys() == expected.keys() and len(expected) == 2 * 2 * len(TARGETS)  # 2 blocks x 7 layers x A and B
    scale = max(g.abs().max().item() for g in expected.values())
    assert scale > 0 and all(g.any() for g in expected.values())
    return max((got[k] - expected[k]).abs().max().item() for k in expected) / scale


def run_ours(result: dict, case: str, train: TrainConfig, reference_model: torch.nn.Module) -> dict:
    """Our loss, gradients and metrics on the batch (the reference log-probs from reference_model first), and their gaps to TRL's."""
    cfg = CASES[case]
    objective = get_objective(cfg.name)
    batch, model = dict(result["batch"]), result["ours"]
    gaps = {}
    if objective.reference is not None:
        refs = objective.reference(reference_model.eval(), batch, train)
        gaps["reference"] = max(gap(a, b) for key, values in zip(objective.reference_keys, result["ref"]) for a, b in zip(refs[key].tolist(), values.tolist()))
        batch |= refs
    model.train().zero_grad(set_to_none=True)
    step = objective.compute(model, batch, train, cfg)
    step.loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    metrics = objective.summarize(step.sums)
    gaps["loss"], gaps["gradients"] = gap(step.loss.item(), result["loss"]), grad_gap(grads, result["grads"])
    gaps["metrics"] = {name: gap(metrics[name], result["metrics"][name]) for name in METRICS[case]}
    return {"loss": step.loss.item(), "gaps": gaps}


def report(label: str, ours: dict, trl_loss: float) -> None:
    gaps = ours["gaps"]
    worst = max(gaps["metrics"], key=gaps["metrics"].get)
    print(f"\n{label}: loss {ours['loss']:.7f} (TRL {trl_loss:.7f}) gap {gaps['loss']:.1e}; gradients gap {gaps['gradients']:.1e}; "
          f"worst metric {worst} {gaps['metrics'][worst]:.1e}" + (f"; reference log-probs gap {gaps['reference']:.1e}" if "reference" in gaps else ""))  # fmt: skip
    assert gaps.get("reference", 0.0) <= TOL
    assert gaps["loss"] <= TOL
    assert gaps["gradients"] <= TOL
    assert max(gaps["metrics"].values()) <= TOL, gaps["metrics"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, tokenizer):
    """TRL's results per case, computed once and shared by the chunked and hf runs of our side."""
    results: dict[tuple[str, bool], dict] = {}

    def get(case: str, starting_adapter: bool = False) -> dict:
        if (case, starting_adapter) not in results:
            results[case, starting_adapter] = run_trl(case, tokenizer, tmp_path_factory.mktemp(case), starting_adapter)
        return results[case, starting_adapter]

    return get


# ---------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("case", list(CASES))
def test_objective_equals_trl(oracle, case, loss):
    """Loss and every metric within 1e-5 (absolute; relative above 1 in size), every LoRA gradient within 1e-5 of the
    largest, and DPO's and KTO's reference log-probs (ours from the bare base) within 1e-5 of TRL's adapter-disabled ones."""
    result = oracle(case)
    if case in ("dpo", "kto"):  # the reference is not the policy: non-zero log-ratios and, for KTO, a KL above its clamp
        assert abs(result["metrics"]["rewards/margins"]) > 1e-3 and result["metrics"].get("kl", 1.0) > 1e-3
    report(f"{case}/{loss}", run_ours(result, case, LOSSES[loss], result["base"]), result["loss"])


@pytest.mark.parametrize("loss", list(LOSSES))
def test_dpo_from_a_starting_adapter_equals_trl(oracle, loss):
    """A PeftModel with a trained adapter: TRL's reference is base + a frozen copy of it ("ref"), ours the model fit()
    starts from (model.init_adapter). The log-ratios are 0, the loss ln 2 on both sides; the gradients are not 0."""
    result = oracle("dpo", starting_adapter=True)
    assert abs(result["loss"] - math.log(2)) <= 1e-6
    report(f"dpo from a starting adapter/{loss}", run_ours(result, "dpo", LOSSES[loss], result["ours"]), result["loss"])


def test_kto_kl_sequences_are_trls_rotation(oracle):
    """reference.build_kl_sequence pairs example i's prompt with example i-1's completion: TRL's KL rows on a one-batch dataset."""
    batch = oracle("kto")["batch"]
    examples = [{"input_ids": ids[mask.bool()].tolist(), "labels": labels[mask.bool()].tolist()}
                for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"])]  # fmt: skip
    for i, example in enumerate(examples):
        kl = build_kl_sequence(example, examples[i - 1], max_seq_len=1024)
        mask = batch["kl_attention_mask"][i].bool()
        assert kl["kl_input_ids"] == batch["kl_input_ids"][i][mask].tolist()
        assert kl["kl_labels"] == batch["kl_labels"][i][mask].tolist()


@pytest.mark.parametrize("loss", list(LOSSES))
def test_dpo_step_zero_of_a_fresh_lora_is_ln2(oracle, loss):
    """B = 0 and the reference computed from the same model: every log-ratio is 0, the loss ln 2 (1e-7 in fp32), every reward 0."""
    train = LOSSES[loss]
    model = build_base()
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, dtype="float32"))
    objective = get_objective("dpo")
    batch = dict(oracle("dpo")["batch"])
    batch |= objective.reference(model.eval(), batch, train)
    step = objective.compute(model.train(), batch, train, CASES["dpo"])
    metrics = objective.summarize(step.sums)
    rewards = {key: metrics[key] for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")}
    print(f"\ndpo step 0/{loss}: loss - ln 2 = {step.loss.item() - math.log(2):.1e}; {rewards}")
    assert abs(step.loss.item() - math.log(2)) <= 1e-7
    assert all(value == 0.0 for value in rewards.values())
