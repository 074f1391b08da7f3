"""Evaluation during a run: the eval loss, exact match of greedy answers, and sample answers.

Every process takes its share of the eval batches or prompts and the results are summed over all
of them. Answers are generated as `generate` answers a user (generate.build_generate_kwargs): they
stop at EOS or at the chat template's end of turn, whichever the model writes first.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from ..config import RecipeConfig
from ..data.batching import collate_batch
from ..data.formats import IGNORE_INDEX
from ..errors import TrainingError
from ..generate import GenerationSettings, build_generate_kwargs, collect_eos_ids, cut_at_stop
from .distributed import World, gather_objects, resolve_mixed_precision, sum_across
from .objective import as_training_module, unwrap_training_module
from .objectives import add_sums

EVAL_BAR_BATCHES = 20  # evaluations of at least this many batches (per process) show their own progress bar


def share_of(items: list, world: World) -> tuple[list, int]:
    """This process's items (every world.size-th) and the rounds every process runs: the most any has.

    Under FSDP each forward gathers shards from all processes, so all must make the same number
    of calls; a process with fewer items repeats the first item in the rounds it lacks, and drops its result.
    """
    return items[world.rank :: world.size], math.ceil(len(items) / world.size)


def evaluate_loss(model, examples: list[dict], cfg: RecipeConfig, pad_id: int, device: torch.device, world: World = World()) -> float:
    """Mean loss per target token (per pair, per example for a preference objective) over the eval examples, over every process."""
    return evaluate_objective(model, examples, cfg, pad_id, device, world)[0]


@torch.no_grad()
def evaluate_objective(
    model, examples: list[dict], cfg: RecipeConfig, pad_id: int, device: torch.device, world: World = World()
) -> tuple[float, dict[str, float]]:
    """The objective's mean loss over the eval examples (or the first eval_max_batches batches) and its metrics (reward accuracy...), over every process."""
    runner = as_training_module(model, cfg)
    objective = unwrap_training_module(runner).objective
    runner.eval()
    size = cfg.train.micro_batch_size
    starts = list(range(0, len(examples), size))
    if cfg.train.eval_max_batches is not None:
        starts = starts[: cfg.train.eval_max_batches]
    mine, rounds = share_of(starts, world)
    # A long evaluation gets its own bar (rank 0's), under the training bar.
    rounds_bar = tqdm(range(rounds), desc="eval", leave=False, dynamic_ncols=True, disable=not world.is_main or rounds < EVAL_BAR_BATCHES)
    # accelerate autocasts the model's forward; the chunked loss runs the model's body and head
    # itself, so evaluation sets the autocast that training's loop sets.
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_mixed_precision(cfg.train.mixed_precision, device))
    total_loss, total_targets, sums = 0.0, 0, {}
    for round_ in rounds_bar:
        start = mine[round_] if round_ < len(mine) else starts[0]
        batch = {k: v.to(device) for k, v in collate_batch(examples[start : start + size], pad_id).items()}
        n = objective.count_units(batch) if round_ < len(mine) else 0
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = runner(batch).float().item()
        last = unwrap_training_module(runner).last_sums
        # A repeated batch (a process short of batches) adds zeros: every process must sum the same keys.
        add_sums(sums, last if n else dict.fromkeys(last, 0.0))
        if n:
            total_loss += loss * n
            total_targets += n
    keys = sorted(sums)
    total_loss, total_targets, *values = sum_across([total_loss, total_targets, *(sums[key] for key in keys)], device)
    return total_loss / max(total_targets, 1), objective.summarize(dict(zip(keys, values)))


def exact_match(model, tokenizer, examples: list[dict], device: torch.device, world: World = World(), lockstep: bool = False) -> float:
    """Share of examples whose greedy answer equals the reference answer exactly (after strip), over every process."""
    answers = generate_answers(model, tokenizer, examples, device, world, lockstep)
    return sum(a["answer"] == a["reference"] for a in answers) / max(len(answers), 1)


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[dict], device: torch.device, world: World = World(), lockstep: bool = False) -> list[dict]:
    """Greedy answers to the examples' prompts: [{"prompt", "answer", "reference"}] in the examples' order, on every process.

    The prompt is the tokens before the first target token; the reference is the first run of
    target tokens, up to the first token an answer stops at (EOS, or the chat template's end of
    turn: generate.collect_eos_ids), and the answer stops at the same tokens. Works for every
    format with a prompt, from tokenized examples alone. The processes answer every
    world.size-th example each. lockstep (FSDP): every process generates the same number of
    tokens for every example (the longest any needs, without stopping; the answer is cut at the
    stop tokens after), since each forward is a collective call.
    """
    runner = as_training_module(model, None)
    runner.eval()
    inner = unwrap_training_module(runner).model
    stop_ids = collect_eos_ids(tokenizer, inner)
    prompts = [split_prompt_and_reference(example, stop_ids) for example in examples]
    longest = max((len(reference) for _, reference in prompts), default=0) + 8
    indices, rounds = share_of(list(range(len(prompts))), world)
    mine: list[tuple[int, dict]] = []
    for round_ in range(rounds):
        index = indices[round_] if round_ < len(indices) else 0
        prompt_ids, reference_ids = prompts[index]
        settings = GenerationSettings(max_new_tokens=longest if lockstep else len(reference_ids) + 8)
        kwargs = build_generate_kwargs(settings, tokenizer, inner, stop_ids)
        if lockstep:
            kwargs["eos_token_id"] = None  # every process makes every forward; the answer is cut below
        prompt = torch.tensor([prompt_ids], device=device)
        generated = runner(generate=dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), **kwargs))
        answer_ids = cut_at_stop(generated[0, prompt.shape[1] :].tolist(), stop_ids)
        if round_ < len(indices):
            mine.append((index, {
                "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True),
                "answer": tokenizer.decode(answer_ids, skip_special_tokens=True).strip(),
                "reference": tokenizer.decode(reference_ids, skip_special_tokens=True).strip(),
            }))  # fmt: skip
    gathered = sorted((pair for part in gather_objects(mine) for pair in part), key=lambda pair: pair[0])
    return [answer for _, answer in gathered]


def split_prompt_and_reference(example: dict, stop_ids: list[int]) -> tuple[list[int], list[int]]:
    """An eval example's prompt (the tokens before the first target) and reference answer (the first run of targets, up to a stop token)."""
    ids, labels = list(example["input_ids"]), list(example["labels"])
    start = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)  # examples with no target are dropped by data
    if start == 0:
        raise TrainingError("exact match needs a prompt before the answer; use it with data.format alpaca or chat, not text")
    end = start
    while end < len(labels) and labels[end] != IGNORE_INDEX and labels[end] not in stop_ids:
        end += 1
    return ids[:start], ids[start:end]
