"""The reference policy of DPO and KTO: the model fit() starts from, its log-probs computed once and cached.

No second model is loaded. Before the first step fit() evaluates the model it is about to train
on every training and evaluation example (eval mode, no gradients) and keeps each example's
reference log-probs beside it: from then on the reference costs no memory and no forward. The
model fit() starts from is the reference the papers mean:
  * a fresh LoRA (B = 0) or bottleneck adapter (its up-projection starts at 0) adds exactly
    nothing, so the reference is the 4-bit base itself, as TRL's adapter-disabled pass;
  * with model.init_adapter (SFT -> DPO) it is base + that adapter as it was at the start;
  * selective and full fine-tuning: the unchanged base; prompt tuning: the base with the initial
    soft prompt (the policy it starts from).

The log-probs are stored with the tokenized data (`<data cache folder>/reference/<key>.npz`),
keyed by the data folder (the data, the tokenizer, the format, max_seq_len), the base's files,
the quantization, the method and its settings, the seed, the starting adapter's files, the
objective and the compute precision: a second run with the same key, and every resume, reads
them back instead of recomputing (TRL #3985). A resume never recomputes them from the trained
model: without the file it stops and says so.

KTO's KL term pairs example i's prompt with example i-1's completion (TRL's rotation by one),
fixed here once by index so that the reference's log-probs of that pair are cached too.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ...config import RecipeConfig
from ...data.batching import collate_batch
from ...data.formats import IGNORE_INDEX
from ...errors import TrainingError
from ...methods.table import get_method
from ..distributed import World, gather_objects, resolve_mixed_precision
from .table import Objective

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")
FINGERPRINT_HEAD_BYTES = 1 << 20  # of each weight file: a re-saved or replaced file differs within its header and first tensors


class ReferencedExamples(Sequence):
    """Examples with what the objective reads beside the tokens: KTO's KL sequence, the reference's ``ref_*`` log-probs.

    Reads through to the tokenized examples (memory-mapped) one at a time; ``lengths`` is theirs, so
    batching plans read no example.
    """

    def __init__(self, examples: Sequence[dict], with_kl: bool, max_seq_len: int, columns: dict[str, np.ndarray] | None = None) -> None:
        self.examples, self.with_kl, self.max_seq_len = examples, with_kl, max_seq_len
        self.columns = columns or {}
        self.lengths = getattr(examples, "lengths", None)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = index + len(self) if index < 0 else index
        example = dict(self.examples[index])
        if self.with_kl:
            example.update(build_kl_sequence(example, self.examples[(index - 1) % len(self)], self.max_seq_len))
        example.update({key: float(values[index]) for key, values in self.columns.items()})
        return example


def build_kl_sequence(example: dict, other: dict, max_seq_len: int) -> dict[str, list[int]]:
    """KTO's mismatched pair: example's prompt followed by other's completion (labelled), cut to max_seq_len."""
    start, other_start = first_answer_token(example["labels"]), first_answer_token(other["labels"])
    ids = example["input_ids"][:start] + other["input_ids"][other_start:]
    labels = [IGNORE_INDEX] * start + other["labels"][other_start:]
    return {"kl_input_ids": ids[:max_seq_len], "kl_labels": labels[:max_seq_len]}


def first_answer_token(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(labels))


def attach_reference(run: Any, evaluator: nn.Module, objective: Objective) -> dict[str, Any]:
    """Give run.data.train and run.data.eval what the objective reads: KL sequences, and the reference's log-probs (cached).

    Returns what the log's ``reference`` line says: where the file is, whether it was read or computed, the seconds it took.
    """
    cfg = run.cfg
    splits = {"train": ReferencedExamples(run.data.train, objective.kl_sequences, cfg.train.max_seq_len),
              "eval": ReferencedExamples(run.data.eval, objective.kl_sequences, cfg.train.max_seq_len)}  # fmt: skip
    info: dict[str, Any] = {}
    if objective.reference is not None:
        path = reference_file(run)
        info = {"reference_file": str(path), "reference": "cached"}
        if path.is_file():
            arrays = read_reference_file(path, {name: len(examples) for name, examples in splits.items()})
        elif run.state:
            raise TrainingError(
                f"the reference log-probs this run started from are not in the data cache ({path}); they cannot be recomputed "
                "from a trained checkpoint: restore that file, or start the run over with --overwrite"
            )
        else:
            arrays = {name: compute_reference(evaluator, examples, objective, cfg, run.tokenizer.pad_token_id, run.device, run.world, name)
                      for name, examples in splits.items()}  # fmt: skip
            if run.world.is_main:
                write_reference_file(path, arrays)
            info["reference"] = "computed"
        for name, examples in splits.items():
            examples.columns = arrays[name]
    run.data.train, run.data.eval = splits["train"], splits["eval"]
    return info


@torch.no_grad()
def compute_reference(
    evaluator: nn.Module, examples: Sequence[dict], objective: Objective, cfg: RecipeConfig, pad_id: int, device: torch.device, world: World, split: str
) -> dict[str, np.ndarray]:
    """Each example's reference log-probs, (n,) fp32 per key: micro-batches shared over the processes, in eval mode, under the training autocast."""
    if not len(examples):
        return {key: np.zeros(0, dtype=np.float32) for key in objective.reference_keys}
    evaluator.eval()
    size = cfg.train.micro_batch_size
    starts = list(range(0, len(examples), size))
    mine = starts[world.rank :: world.size]
    rounds = -(-len(starts) // world.size)  # every process makes as many forwards (FSDP gathers shards in each)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_mixed_precision(cfg.train.mixed_precision, device))
    parts: list[tuple[int, dict[str, np.ndarray]]] = []
    for round_ in tqdm(range(rounds), desc=f"reference log-probs ({split})", dynamic_ncols=True, disable=not world.is_main):
        start = mine[round_] if round_ < len(mine) else starts[0]
        batch = {k: v.to(device) for k, v in collate_batch(examples[start : start + size], pad_id).items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            values = evaluator(reference=batch)
        if round_ < len(mine):
            parts.append((start, {key: value.float().cpu().numpy() for key, value in values.items()}))
    ordered = sorted((part for process in gather_objects(parts) for part in process), key=lambda part: part[0])
    evaluator.train()
    return {key: np.concatenate([values[key] for _, values in ordered]) for key in ordered[0][1]}


def reference_file(run: Any) -> Path:
    """``<data cache folder>/reference/<objective>-<key>.npz``: the key as the module docstring says."""
    cfg = run.cfg
    method = get_method(cfg.method)
    settings = method.settings(cfg)
    key = {
        "data": Path(run.data.stats["cache_path"]).name,
        "base": fingerprint_files(run.base_path, WEIGHT_SUFFIXES, head_only=True),
        "model": {k: v for k, v in dataclasses.asdict(cfg.model).items() if k in ("name_or_path", "revision", "attn_implementation")},
        "quant": dataclasses.asdict(cfg.quant),
        "method": cfg.method,
        "settings": dataclasses.asdict(settings) if dataclasses.is_dataclass(settings) else repr(settings),
        "seed": cfg.train.seed,
        "init_adapter": fingerprint_files(cfg.model.init_adapter, None) if cfg.model.init_adapter else None,
        "objective": cfg.objective.name,
        "precision": [resolve_mixed_precision(cfg.train.mixed_precision, run.device), str(run.compute_dtype)],  # not train.loss: a resume may change it, and hf and chunked agree
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return Path(run.data.stats["cache_path"]) / "reference" / f"{cfg.objective.name}-{digest}.npz"


def fingerprint_files(folder: str, suffixes: tuple[str, ...] | None, head_only: bool = False) -> str:
    """A hash of a folder's files (those with the suffixes; all when None): names, sizes and contents (the first MiB of each with head_only)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        return f"name:{folder}"  # a hub id: transformers pins what it downloads by the revision, in the key too
    digest = hashlib.sha256()
    for file in sorted(f for f in root.rglob("*") if f.is_file() and (suffixes is None or f.suffix in suffixes or f.name == "config.json")):
        digest.update(f"{file.relative_to(root)}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(FINGERPRINT_HEAD_BYTES) if head_only and file.suffix in WEIGHT_SUFFIXES else handle.read())
    return digest.hexdigest()


def write_reference_file(path: Path, arrays: dict[str, dict[str, np.ndarray]]) -> None:
    """Written under a temporary name, then renamed: a file there is whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        np.savez(handle, **{f"{split}/{key}": values for split, columns in arrays.items() for key, values in columns.items()})
    os.replace(tmp, path)


def read_reference_file(path: Path, sizes: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
    """The arrays write_reference_file wrote, checked against the splits' sizes; a damaged file is a one-line error."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays: dict[str, dict[str, np.ndarray]] = {split: {} for split in sizes}
            for name in stored.files:
                split, key = name.split("/", 1)
                arrays[split][key] = stored[name]
    except (OSError, ValueError, KeyError) as err:
        raise TrainingError(f"the cached reference log-probs {path} cannot be read ({err}); delete that file and run again to recompute them") from err
    for split, size in sizes.items():
        if any(len(values) != size for values in arrays[split].values()):
            raise TrainingError(f"the cached reference log-probs {path} do not match the {split} split ({size} examples); delete that file and run again")
    return arrays
