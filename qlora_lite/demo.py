"""The offline demo: a tiny base model that knows a skill, and a data set that asks for it.

`qlora-lite train recipes/tiny-demo.yaml` must prove the whole QLoRA path on a laptop with
no network. A frozen random base cannot learn a task through a low-rank adapter, so the
demo base is pretrained here first (full fp32, a plain torch loop, about a minute on one
core) and cached.

The skill is ROT13 on five-letter upper-case words (`HELLO` -> `URYYB`). The base learns it
from lines such as `rot13(JAWPG) = WNJCT` or `The rot13 of JAWPG is WNJCT.`, formats it
never sees again: the fine-tune data asks for the same skill in the alpaca instruction
format and wants the answer followed by EOS. Before the adapter the quantized base scores
0% exact match on held-out words (it has never seen `### Response:`, and it never stops
after an answer, it writes another pretraining line), so the adapter has real work to do:
route the instruction format to the skill and learn to stop.

Why this task:
- ROT13 is a letter-for-letter map plus a copy, which a 2-layer, 0.36M-parameter model
  learns in a few hundred steps, while exact match stays meaningful: there are 26^5
  words, and one wrong letter is a miss;
- upper-case letters are never merged by the demo tokenizer (a SentencePiece model whose
  pieces come from the prompt template only, with A-Z as user-defined symbols, which
  SentencePiece never merges), so every word is five tokens and every answer `▁` + five
  tokens in every context: the skill is about letters, not byte-pair artefacts;
- a fixed word length keeps the copy at one offset within each format, which tiny models
  learn several times faster than variable-length copies (measured: 0.9 vs 0.2 letter
  accuracy after the same 600 steps).
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data.formats import ALPACA_PROMPT_NO_INPUT, ALPACA_PROMPT_WITH_INPUT
from .folders import cache_root
from .tiny import build_sentencepiece_tokenizer, build_tiny_model

# Paraphrases, so the adapter learns what the instruction asks for rather than one string.
DEMO_INSTRUCTIONS = (
    "Encode the word with rot13.",
    "Apply rot13 to this word.",
    "Rotate every letter of the word by 13 places.",
)
WORD_LENGTH = 5
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
# The base's own formats, never the alpaca one. Several, so that the base learns to find
# "the word to encode" by what surrounds it rather than at one fixed offset: that is the
# skill the adapter can re-route to `### Input:`. Every answer follows a space, because the
# data module tokenizes a response on its own, which starts it with the word-start mark
# (`▁WNJCT`), and the base should have learned answers in exactly those tokens.
PRETRAIN_FORMATS = (
    "{word} -> {answer}\n",
    "rot13({word}) = {answer}\n",
    "The rot13 of {word} is {answer}.\n",
    "{word} in rot13: {answer}\n",
)
DATA_SEED = 1234
NUM_TRAIN_EXAMPLES = 1200
NUM_EVAL_EXAMPLES = 200
NUM_PAIRS = 400  # the preference demo's training pairs, from the SFT demo's training words
NUM_EVAL_PAIRS = 100  # and its held-out pairs, from its held-out words

# Bump when anything that changes the built base changes outside DemoBaseSpec (the task,
# the corpus format, the tokenizer texts or kind), so old caches are not reused.
# 3: the tokenizer became a SentencePiece model (tokenizer.model), so llama.cpp can convert the demo;
# 4: its Hugging Face files put the word-start mark after every special token, as llama.cpp does.
DEMO_BASE_VERSION = 4


@dataclass(frozen=True)
class DemoBaseSpec:
    """Sizes and pretraining settings of the demo base; their hash names the cache folder."""

    vocab_size: int = 256
    """Special tokens, the 96 printable characters and ~150 pieces of the template (pieces may
    span words, so the fixed template text costs few tokens): a prompt is ~35 tokens instead
    of ~200 characters."""
    hidden_size: int = 128
    num_layers: int = 2
    """Two layers are the fewest that can learn a copy (previous-token head + copy head)."""
    num_heads: int = 8
    """Eight heads of 16 dims learned the skill from all six seeds tried in 1,000 steps; four
    heads of 32 missed it in two of three at a higher LR."""
    num_kv_heads: int = 4
    intermediate_size: int = 256
    pretrain_steps: int = 1000
    """The skill appears between steps 300 and 500 (seed-dependent); the rest makes it reliable."""
    batch_size: int = 16
    """Sequences per step. Small batches, more steps: the skill emerges after a number of
    updates more than after a number of tokens."""
    seq_len: int = 64
    """Three to four pretraining lines per sequence; the fine-tune examples are ~50 tokens."""
    lr: float = 2e-3
    """3e-3 learns a little sooner when it learns, but stalls more often."""
    warmup_steps: int = 30
    seed: int = 0
    num_threads: int = 1
    """Torch threads while pretraining. One: the matrices are too small to split well, and
    on a shared 2-core machine a second spinning thread can stall the first."""


DEMO_BASE_SPEC = DemoBaseSpec()
MARKER_FILE = "demo_base.json"  # written last: its presence means the folder is complete


# ---------------------------------------------------------------------------------------
# The task
# ---------------------------------------------------------------------------------------


def apply_rot13(word: str) -> str:
    """The skill: rotate each letter by 13 places (`HELLO` -> `URYYB`)."""
    return codecs.encode(word, "rot13")


def make_random_word(rng: random.Random) -> str:
    """One upper-case word of WORD_LENGTH random letters."""
    return "".join(rng.choice(LETTERS) for _ in range(WORD_LENGTH))


def make_demo_records(seed: int = DATA_SEED) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The fine-tune train and eval records (alpaca format); no eval word appears in train."""
    rng = random.Random(seed)
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < NUM_TRAIN_EXAMPLES + NUM_EVAL_EXAMPLES:
        word = make_random_word(rng)
        if word not in seen and apply_rot13(word) not in seen:  # a word and its answer never split across sets
            seen.update((word, apply_rot13(word)))
            words.append(word)
    records = [
        {"instruction": DEMO_INSTRUCTIONS[i % len(DEMO_INSTRUCTIONS)], "input": word, "output": apply_rot13(word)}
        for i, word in enumerate(words)
    ]
    return records[:NUM_TRAIN_EXAMPLES], records[NUM_TRAIN_EXAMPLES:]


def write_demo_data(out_dir: str | Path) -> tuple[Path, Path]:
    """Write the demo's `train.jsonl` and `eval.jsonl` (alpaca records), deterministically.

    The committed copies live in `recipes/data/tiny-demo/`; this regenerates them byte for byte.

    Returns:
        The paths of the train and eval files.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evaluation = make_demo_records()
    paths = (out_dir / "train.jsonl", out_dir / "eval.jsonl")
    for path, records in zip(paths, (train, evaluation)):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def make_demo_pairs(records: list[dict[str, str]], seed: int = DATA_SEED) -> list[dict[str, str]]:
    """Preference pairs for the same skill (data.format preference): the alpaca prompt as written, the right answer
    chosen, a plausible wrong one rejected: the word with one letter of its ROT13 left unrotated (half of them), or
    rotated by 12 instead of 13 (the other half). The wrong answer is never the right one."""
    rng = random.Random(seed + 1)
    pairs = []
    for i, record in enumerate(records):
        word, answer = record["input"], record["output"]
        if i % 2:
            wrong = "".join(LETTERS[(LETTERS.index(c) + 12) % 26] for c in word)
        else:
            position = rng.randrange(WORD_LENGTH)
            wrong = answer[:position] + word[position] + answer[position + 1 :]
            if wrong == answer:  # only if rot13 left that letter as it was, which it never does; kept for safety
                wrong = answer[:position] + LETTERS[(LETTERS.index(answer[position]) + 1) % 26] + answer[position + 1 :]
        pairs.append({"prompt": format_demo_prompt(record), "chosen": answer, "rejected": wrong})
    return pairs


def write_demo_pairs(out_dir: str | Path) -> tuple[Path, Path]:
    """Write the preference demo's `train.jsonl` and `eval.jsonl` (pairs of make_demo_pairs over the SFT demo's words), deterministically.

    The committed copies live in `recipes/data/tiny-dpo/`; this regenerates them byte for byte.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, evaluation = make_demo_records()
    paths = (out_dir / "train.jsonl", out_dir / "eval.jsonl")
    for path, records in zip(paths, (make_demo_pairs(train[:NUM_PAIRS]), make_demo_pairs(evaluation[:NUM_EVAL_PAIRS]))):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return paths


def format_demo_prompt(record: dict[str, str]) -> str:
    """The alpaca prompt of one record (the fine-tune's input; the answer follows it)."""
    if record.get("input"):
        return ALPACA_PROMPT_WITH_INPUT.format(instruction=record["instruction"], input=record["input"])
    return ALPACA_PROMPT_NO_INPUT.format(instruction=record["instruction"])


def make_pretraining_lines(rng: random.Random, num_lines: int, excluded: set[str]) -> list[tuple[str, str]]:
    """`(line, answer)` pairs such as `rot13(JAWPG) = WNJCT`: the skill in the base's own formats."""
    lines = []
    while len(lines) < num_lines:
        word = make_random_word(rng)
        if word not in excluded:  # held-out eval words stay unseen by the base too
            answer = apply_rot13(word)
            lines.append((rng.choice(PRETRAIN_FORMATS).format(word=word, answer=answer), answer))
    return lines


def make_pretraining_text(rng: random.Random, num_lines: int, excluded: set[str]) -> str:
    """A pretraining document: `num_lines` lines of make_pretraining_lines."""
    return "".join(line for line, _ in make_pretraining_lines(rng, num_lines, excluded))


def make_tokenizer_texts() -> list[str]:
    """Texts the demo tokenizer is trained on: the prompt template and instructions only.

    Task words are left out, and the upper-case letters are user-defined symbols of the
    SentencePiece model (build_demo_tokenizer), so each letter stays one token in every context.
    """
    # The placeholder input is lower case so that no merge learned around it involves a task letter.
    texts = [format_demo_prompt({"instruction": text, "input": "word"}) for text in DEMO_INSTRUCTIONS]
    texts += [format_demo_prompt({"instruction": text, "input": ""}) for text in DEMO_INSTRUCTIONS]
    return texts * 10


# ---------------------------------------------------------------------------------------
# The base model
# ---------------------------------------------------------------------------------------


def get_demo_base_hash(spec: DemoBaseSpec = DEMO_BASE_SPEC) -> str:
    """Short hash of everything that determines the built base, so a stale cache is never reused."""
    payload = json.dumps(
        {"version": DEMO_BASE_VERSION, "spec": dataclasses.asdict(spec), "instructions": DEMO_INSTRUCTIONS,
         "formats": PRETRAIN_FORMATS, "word_length": WORD_LENGTH, "data_seed": DATA_SEED},
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:10]


def get_default_cache_dir() -> Path:
    """`$QLORA_LITE_CACHE`, else `~/.cache/qlora-lite` (folders.cache_root)."""
    return cache_root()


def ensure_demo_base(cache_dir: str | Path | None = None, spec: DemoBaseSpec = DEMO_BASE_SPEC) -> Path:
    """Return the folder of the pretrained demo base (safetensors + tokenizer), building it once.

    A folder counts as complete only when its marker file, written last, names the same
    hash; the build writes to a temporary folder and renames it into place, so an
    interrupted build is never mistaken for a finished one.

    Args:
        cache_dir: Parent folder of the cache (default `$QLORA_LITE_CACHE` or `~/.cache/qlora-lite`).
        spec: Model sizes and pretraining settings.

    Returns:
        `<cache_dir>/demo-base-<hash>`, loadable with `AutoModelForCausalLM.from_pretrained`.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else get_default_cache_dir()
    digest = get_demo_base_hash(spec)
    final_dir = cache_dir / f"demo-base-{digest}"
    if is_complete_demo_base(final_dir, digest):
        print(f"using the cached demo base model in {final_dir}")
        return final_dir

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp_dir = cache_dir / f".demo-base-{digest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    print(f"building the demo base model (first run only; cached in {final_dir})", flush=True)
    try:
        report = build_demo_base(tmp_dir, spec)
        report["hash"] = digest
        (tmp_dir / MARKER_FILE).write_text(json.dumps(report, indent=2) + "\n")
        # Another process may have finished the same build meanwhile; its copy is as good as ours.
        if not is_complete_demo_base(final_dir, digest):
            shutil.rmtree(final_dir, ignore_errors=True)  # a folder without its marker is a dead build
            os.replace(tmp_dir, final_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    print(
        f"demo base ready in {report['build_s']:.0f} s: pretraining loss {report['final_loss']:.2f}, "
        f"answer-token accuracy {report['answer_token_accuracy']:.0%} in its own formats",
        flush=True,
    )
    return final_dir


def is_complete_demo_base(path: Path, digest: str) -> bool:
    """True when `path` holds a finished build with this hash (its marker is written last)."""
    marker = path / MARKER_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("hash") == digest
    except (OSError, json.JSONDecodeError):
        return False


def build_demo_base(out_dir: Path, spec: DemoBaseSpec = DEMO_BASE_SPEC) -> dict[str, float]:
    """Train the tokenizer, build the tiny Llama, pretrain it on ROT13 lines and save both.

    Returns:
        A report for the marker file: final loss, answer-token accuracy, parameter count, seconds.
    """
    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(spec.num_threads, os.cpu_count() or 1)))
    try:
        tokenizer = build_demo_tokenizer(out_dir, spec)
        model = build_tiny_model(
            out_dir,
            architecture="llama",
            vocab_size=len(tokenizer),
            hidden_size=spec.hidden_size,
            num_layers=spec.num_layers,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            intermediate_size=spec.intermediate_size,
            seed=spec.seed,
        )
        num_params = sum(p.numel() for p in model.parameters())
        print(
            f"  pretraining a {num_params / 1e6:.2f}M-parameter Llama on ROT13 lines for {spec.pretrain_steps} steps "
            f"(full fp32, {spec.num_threads} thread; about a minute)",
            flush=True,
        )
        sequences = make_pretraining_batches(tokenizer, spec)
        losses = pretrain_demo_model(model, sequences, spec)
        accuracy = measure_answer_accuracy(model, tokenizer, spec)
        model.save_pretrained(str(out_dir))  # safetensors, fp32; overwrites the random weights
    finally:
        torch.set_num_threads(threads_before)
    return {
        "num_params": num_params,
        "final_loss": sum(losses[-20:]) / len(losses[-20:]),
        "answer_token_accuracy": accuracy,
        "build_s": time.perf_counter() - start,
        "spec": dataclasses.asdict(spec),
    }


def build_demo_tokenizer(out_dir: Path, spec: DemoBaseSpec = DEMO_BASE_SPEC):
    """The demo's SentencePiece tokenizer (tokenizer.model and its Hugging Face files) in out_dir.

    The upper-case letters are user-defined symbols, which SentencePiece never merges with
    anything, so no piece holds a task letter: every word is five tokens and every answer `▁`
    + five tokens, whatever surrounds it. (Without that, the template teaches `▁I` from
    ` Instruction` and ` Input`; a response is tokenized on its own, so it starts at a word
    start, and an answer starting with I would be `▁I` + 4 letters while every other is `▁` +
    5 letters. The base copes, but the adapter, which sees ~1 such answer in 26, learns the
    common layout only and fails on those words.) Pieces may span words, since the template
    is fixed text: that keeps a prompt as short as whole-word pieces would, although each
    capitalised template word now costs `▁` + capital + rest. No piece ends with `▁`, so the
    space before an answer is always its own token.

    Special ids agree everywhere (pad 0, unk 1, bos 2, eos 3): in tokenizer.model, the Hugging
    Face files and the model's config and generation config (build_tiny_model).
    """
    return build_sentencepiece_tokenizer(
        make_tokenizer_texts(), out_dir, vocab_size=spec.vocab_size, user_defined_symbols=LETTERS, split_by_whitespace=False
    )


def make_pretraining_batches(tokenizer, spec: DemoBaseSpec) -> torch.Tensor:
    """The pretraining token stream cut into (steps * batch, seq_len + 1) rows, one row per sequence."""
    rng = random.Random(spec.seed)
    _, eval_records = make_demo_records()
    # ROT13 is its own inverse, so an eval answer seen as a pretraining word would leak the pair.
    excluded = {r[key] for r in eval_records for key in ("input", "output")}
    tokens_per_line = 2 * WORD_LENGTH + 5  # 14 to ~20 tokens, so this over-produces
    num_rows = spec.pretrain_steps * spec.batch_size
    num_lines = num_rows * (spec.seq_len + 1) // tokens_per_line + 200
    # Documents of 50 lines each, BOS ... EOS, so EOS is a known token but never follows an answer.
    docs = [make_pretraining_text(rng, 50, excluded) for _ in range(num_lines // 50)]
    stream: list[int] = []
    for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
        stream += [tokenizer.bos_token_id, *ids, tokenizer.eos_token_id]
    width = spec.seq_len + 1  # inputs and the next-token targets shifted by one
    rows = torch.tensor(stream[: (len(stream) // width) * width]).view(-1, width)
    if len(rows) < num_rows:
        raise RuntimeError(f"demo corpus too small: {len(rows)} rows for {num_rows}; raise tokens_per_line's margin")
    return rows[:num_rows]


def pretrain_demo_model(model: torch.nn.Module, rows: torch.Tensor, spec: DemoBaseSpec) -> list[float]:
    """Full fp32 pretraining, nanoGPT style: AdamW, linear warmup, cosine decay to zero."""
    torch.manual_seed(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    losses = []
    for step in range(spec.pretrain_steps):
        batch = rows[step * spec.batch_size : (step + 1) * spec.batch_size]  # (B, T + 1)
        lr = spec.lr * min(1.0, (step + 1) / spec.warmup_steps) * 0.5 * (1 + math.cos(math.pi * step / spec.pretrain_steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(input_ids=batch[:, :-1]).logits  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 200 == 0:
            print(f"  pretraining step {step + 1}/{spec.pretrain_steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return losses


@torch.no_grad()
def measure_answer_accuracy(model: torch.nn.Module, tokenizer, spec: DemoBaseSpec, num_rows: int = 16) -> float:
    """Teacher-forced accuracy on the answer tokens of unseen pretraining lines.

    A cheap check that the skill is there (no generation): near 1.0 when pretraining
    worked, near 1/26 when it did not. Rows are no longer than the pretraining sequences,
    since later positions were never trained.
    """
    rng = random.Random(spec.seed + 1)
    hits: list[bool] = []
    for _ in range(num_rows):
        text, spans = "", []
        for line, answer in make_pretraining_lines(rng, 3, excluded=set()):
            start = len(text) + line.rindex(answer) - 1  # from the space before the answer
            spans.append((start, start + 1 + len(answer)))
            text += line
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = [tokenizer.bos_token_id, *encoded["input_ids"]]
        predictions = model(input_ids=torch.tensor([ids[:-1]])).logits.argmax(-1)[0].tolist()  # predicts ids[1:]
        for i, (begin, end) in enumerate(encoded["offset_mapping"]):
            if any(a <= begin and end <= b for a, b in spans):
                hits.append(predictions[i] == ids[i + 1])  # token i of the text is ids[i + 1]
    return sum(hits) / max(1, len(hits))
