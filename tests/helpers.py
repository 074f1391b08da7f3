"""Helpers several test files share: a tiny training run's recipe and data, a model's logits and a few
training steps, the CLI's error line, and data records. Fixtures are in conftest.py."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch import nn

from qlora_lite import cli
from qlora_lite.config import ModelConfig, PromptConfig, QuantConfig
from qlora_lite.data.formats import IGNORE_INDEX
from qlora_lite.methods.folder import write_prompt_info
from qlora_lite.methods.prompt_tuning import apply_prompt_tuning, save_soft_prompt
from qlora_lite.quant import keep_4bit_layout, load_base_model
from qlora_lite.tiny import build_tokenizer

# --- a tiny training run ------------------------------------------------------------------------------


WORDS = ["cat", "dog", "sun", "tree", "book", "fish", "bird", "moon", "star", "rain", "lamp", "door"]


def write_data(folder, words: list[str] = WORDS) -> str:
    path = folder / "train.jsonl"
    with path.open("w") as f:
        for i in range(48):
            word = words[i % len(words)]
            f.write(json.dumps({"instruction": "Repeat the word.", "input": word, "output": f"{word} {word}"}) + "\n")
    return str(path)


def recipe_overrides(tmp_path, model_dir, **extra) -> list[str]:
    values = {
        "model.name_or_path": str(model_dir),
        "model.gradient_checkpointing": True,
        "data.path": write_data(tmp_path),
        "data.eval_fraction": 0.25,
        "lora.r": 8,
        "lora.alpha": 16,
        "lora.dropout": 0.0,
        "train.max_steps": 8,
        "train.micro_batch_size": 4,
        "train.grad_accum_steps": 1,
        "train.max_seq_len": 256,
        "train.lr": 5e-3,
        "train.warmup_steps": 1,
        "train.log_every": 1,
        "train.eval_every": 0,
        "train.save_every": 0,
        "output_dir": str(tmp_path / "run"),
    }
    values.update(extra)
    return [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()]


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- a model's outputs and a few training steps -------------------------------------------------------


IDS = torch.randint(4, 256, (2, 16), generator=torch.Generator().manual_seed(0))


def load(model_dir, four_bit: bool = False, skip_modules: list[str] | None = None):
    quant = QuantConfig(load_in_4bit=four_bit, compute_dtype="float32")
    return load_base_model(ModelConfig(name_or_path=str(model_dir)), quant, skip_modules=skip_modules)


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=IDS).logits.float()


def loss_of(model) -> float:
    with torch.no_grad():
        return model(input_ids=IDS, labels=IDS).loss.item()


def train_steps(model, steps: int = 5, lr: float = 1e-2) -> tuple[float, float]:
    """A few AdamW steps on one fixed batch; returns the loss before and after."""
    model.train()
    before = loss_of(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return before, loss_of(model)


def snapshot(model) -> dict[str, torch.Tensor]:
    # state_dict, not named_parameters: it also holds 4-bit layers' quantization constants.
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- the command line -----------------------------------------------------------------------------------


def cli_error(argv: list[str], capsys) -> str:
    """Run the CLI expecting exit code 2 (returned, or from argparse); return stderr."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


# --- data records (the test tokenizer: pad 0, BOS 2, EOS 3 `</s>`, no chat template) -----------------------


EOS = 3

BOS = 2

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a colour.\n\n### Input:\nthe sky\n\n### Response:\n"
)

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nName a colour.\n\n### Response:\n"
)

# ChatML-like, closing each turn with the tokenizer's EOS and opening with BOS, as Llama 3 and
# Qwen2 templates do with their own tokens.
CHATML_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] + eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SINGLE_TURN = {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue is a colour."}]}


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def alpaca_records(n: int) -> list[dict]:
    """n distinct records, every third one with an input."""
    return [
        {"instruction": f"Name colour {i}.", "input": f"hint {i}" if i % 3 == 0 else "", "output": f"Blue {i} is the quick fox."}
        for i in range(n)
    ]


def write_jsonl(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_csv(path, records: list[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    return path


def learned_predictions(examples: list[dict]) -> int:
    """Labels the shifted causal-LM loss scores: every one but the first of each example."""
    return sum(sum(label != IGNORE_INDEX for label in ex["labels"][1:]) for ex in examples)


# --- models and adapters made for a test ----------------------------------------------------------------


def load_hf(model_dir, four_bit: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if four_bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32
        )
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    # The same 4-bit kernels as ours: without this, an AVX512-BF16 CPU repacks PEFT's side for its
    # bf16 inference kernel and the two differ by bf16 rounding, not by anything the adapter did.
    keep_4bit_layout(model)
    return model.eval()

def make_soft_prompt(model_dir, out_dir, tokenizer, seed: int, num_virtual_tokens: int = 4, data_format: str | None = None):
    """Save a soft prompt drawn as PEFT's RANDOM init (N(0, 1), far from the vocabulary: it changes the answers)."""
    torch.manual_seed(seed)
    cfg = PromptConfig(num_virtual_tokens=num_virtual_tokens, init="random")
    save_soft_prompt(apply_prompt_tuning(load(model_dir, False), cfg, tokenizer), cfg, out_dir, str(model_dir))
    if data_format:
        write_prompt_info(out_dir, data_format)
    return out_dir

LLAMA3_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def save_llama3_style_tokenizer(folder) -> int:
    """Save into folder (beside an adapter, as training does) a tokenizer like Llama-3's base one, for the tiny
    models: EOS </s> (id 3, the models' eos_token_id), chat turns closed by <|eot_id|>. Returns <|eot_id|>'s id."""
    tok = build_tokenizer(["the quick brown fox jumps over the lazy dog", "Name a colour. Blue is a colour."] * 20, folder, vocab_size=200)
    tok.add_tokens(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], special_tokens=True)
    tok.chat_template = LLAMA3_STYLE_TEMPLATE
    tok.save_pretrained(str(folder))
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert tok.eos_token_id == EOS and EOS < eot < 256  # a token the tiny models (vocab 256) can emit
    return eot

class ScriptedHead(nn.Module):
    """An LM head that picks script[k] at the k-th decoding step (the last one from then on)."""

    def __init__(self, script: list[int], vocab_size: int = 256) -> None:
        super().__init__()
        self.script, self.vocab_size, self.calls = script, vocab_size, 0

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, T, V)
        token = self.script[min(self.calls, len(self.script) - 1)]
        self.calls += 1
        logits = torch.zeros(*hidden.shape[:-1], self.vocab_size, dtype=hidden.dtype, device=hidden.device)
        logits[..., token] = 10.0
        return logits


# --- reading what a run wrote ----------------------------------------------------------------------------


def read_tensorboard(folder: Path, texts: bool = False) -> dict[str, list[tuple[int, float | str]]]:
    """Scalars (or, with texts, the text summaries) of a TensorBoard run folder: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    if texts:
        return {tag: [(e.step, make_ndarray(e.tensor_proto).item().decode()) for e in events.Tensors(tag)] for tag in events.Tags()["tensors"]}
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
