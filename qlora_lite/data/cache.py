"""Prepared data: tokenized once, in parallel, into a memory-mapped Arrow cache on disk.

Preparation (``prepare_datasets``): the records are tokenized once, by ``datasets.map`` over
``data.num_proc`` processes, into Arrow files in a cache folder named by a hash of everything that
changes the examples (the data's bytes, the tokenizer and chat template, the data wing's source, the
format, ``max_seq_len``, truncation, packing, the held-out split); a later run and a resumed run open
those files memory-mapped (``TokenizedExamples``) and read an example only when a batch needs it, so
memory stays flat as the data grows. On 200,000 alpaca records (100 MB): benchmarks/data_prep.py.

Truncation (``DataConfig.truncation``): an example whose response and closing EOS do not fit in
``max_seq_len`` is dropped (``drop``, the default) or kept cut, without its EOS (``keep``); one with
no response token left is always dropped. ``prepare_datasets`` prints one line per split saying how
many did not fit and how many response tokens were cut, and returns them in its stats. A
``preference`` example is a pair, cut as one: ``drop`` drops it when either answer loses a learned
token, ``keep`` keeps it cut while both answers keep one; its length is its longer sequence's.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import hashlib
import itertools
import json
import operator
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import pyarrow as pa

from ..config import CHOICES, DataConfig
from ..errors import DataError
from ..folders import apply_umask, cache_root
from .batching import merge_pack, plan_packs
from .formats import CHAT_READINGS, IGNORE_INDEX, PREFERENCE_FORMATS
from .records import LOCAL_BUILDERS, load_records, looks_local, split_indices
from .tokenizing import require_eos_id, tokenize_records


@dataclass
class TruncationStats:
    """How ``max_seq_len`` cut one split's examples (``build_datasets_with_stats``)."""

    split: str
    """``train`` or ``eval``."""
    examples: int
    """Examples tokenized, before any was dropped (format preference: pairs)."""
    truncated: int
    """Examples whose response, with the EOS (or end-of-turn token) closing it, did not fit (a pair: either answer)."""
    fully_cut: int
    """Of those, the examples with no response token left (a pair: in either answer); always dropped."""
    response_tokens_cut: int
    """Learned tokens (response and end tokens) past ``max_seq_len``, summed over the truncated examples (a pair: both answers)."""
    dropped: int
    """Examples removed: every truncated one (``drop``), or the fully cut ones (``keep``)."""
    longest_tokens: int
    """Length of the longest example before the cut (0 for an empty split)."""
    max_seq_len: int
    policy: str
    """``data.truncation``: ``drop`` or ``keep``."""


def format_truncation_stats(stats: TruncationStats) -> str:
    """One report line, e.g. ``train: 3 of 40 examples did not fit in max_seq_len=128 (...); dropped them (...)``."""
    if not stats.truncated:
        return (
            f"{stats.split}: all {stats.examples} examples fit in max_seq_len={stats.max_seq_len} "
            f"(longest example {stats.longest_tokens} tokens)"
        )
    line = (
        f"{stats.split}: {stats.truncated} of {stats.examples} examples did not fit in max_seq_len={stats.max_seq_len} "
        f"({stats.response_tokens_cut} response tokens cut, longest example {stats.longest_tokens} tokens); "
    )
    kept = stats.truncated - stats.dropped
    if stats.policy == "drop":
        action = "dropped them"
    elif not stats.fully_cut:
        action = f"kept {kept} with a cut response and no EOS"
    elif not kept:
        action = f"dropped {stats.dropped} with no response token left"
    else:
        action = f"kept {kept} with a cut response and no EOS, dropped {stats.fully_cut} with no response token left"
    return line + f"{action} (data.truncation={stats.policy})"


def build_datasets(cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int) -> tuple[TokenizedExamples, TokenizedExamples]:
    """``prepare_datasets`` as ``(train, eval)``; it prints the same report lines."""
    prepared = prepare_datasets(cfg, tokenizer, max_seq_len, seed)
    return prepared.train, prepared.eval


def build_datasets_with_stats(
    cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int
) -> tuple[TokenizedExamples, TokenizedExamples, dict[str, TruncationStats]]:
    """``prepare_datasets`` as ``(train, eval, {"train": TruncationStats, "eval": TruncationStats})``."""
    prepared = prepare_datasets(cfg, tokenizer, max_seq_len, seed)
    return prepared.train, prepared.eval, prepared.truncation


DATA_CACHE_ENV = "QLORA_LITE_DATA_CACHE"
"""Environment variable naming the data cache folder when ``data.cache_dir`` is not set."""

MAX_AUTO_NUM_PROC = 8

RECORDS_PER_PROCESS = 5_000
"""With ``data.num_proc`` unset, one tokenizing process per this many records (and per core, at most
``MAX_AUTO_NUM_PROC``): starting workers costs about half a second (4,000 alpaca records: 0.8 s in
this process, 1.4 s over 2), what this process takes for a few thousand records."""

_MANIFEST = "manifest.json"

# One row per record of a data file, in file order. A dropped record keeps its row (its statistics
# columns say why it was dropped) with empty token lists. int32 halves the size of the cache.
_PREPARED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.List(datasets.Value("int32")),
        "labels": datasets.List(datasets.Value("int32")),
        "length": datasets.Value("int32"),  # tokens kept: len(input_ids); a pair: its longer sequence's
        "whole_length": datasets.Value("int32"),  # tokens before the cut to max_seq_len (a pair: the longer sequence's)
        "cut_tokens": datasets.Value("int32"),  # learned tokens past max_seq_len
        "learnable": datasets.Value("bool"),  # a learned token is left within max_seq_len
        "kept": datasets.Value("bool"),  # an example of its split (data.truncation decided)
        "chat_read_as": datasets.Value("int8"),  # chat: bit i set when the record was read as formats.CHAT_READINGS[i] says
    }
)

# The columns a format adds to those rows; the other formats' rows stay as they were.
_FORMAT_FEATURES = {
    "preference": {
        "rejected_input_ids": datasets.List(datasets.Value("int32")),  # prompt + rejected, as input_ids is prompt + chosen
        "rejected_labels": datasets.List(datasets.Value("int32")),
        "tokens": datasets.Value("int32"),  # tokens kept in both sequences, which the data report counts
    },
    "unpaired": {"desirable": datasets.Value("bool")},
}

_EXAMPLE_SCALARS = ("desirable",)
"""Columns of one value per row that an example holds beside its token lists (as ints)."""


def _prepared_features(fmt: str) -> datasets.Features:
    return datasets.Features({**_PREPARED_FEATURES, **_FORMAT_FEATURES.get(fmt, {})})


class TokenizedExamples(Sequence):
    """Examples read on demand from a memory-mapped Arrow table: RAM does not grow with the data.

    ``examples[i]`` is a fresh ``{"input_ids": [...], "labels": [...]}`` of Python ints (packed:
    ``position_ids`` too, the pack built as ``pack_examples`` builds it); a slice is a list of them.
    Format preference adds ``rejected_input_ids`` and ``rejected_labels``, format unpaired
    ``desirable`` (1 or 0). ``lengths`` holds every example's token count (a pair's: its longer
    sequence's), so ``select_micro_batch`` plans an epoch without reading a single example.
    """

    def __init__(self, table: pa.Table | None, rows: np.ndarray, pack_bounds: np.ndarray | None = None):
        """
        Args:
            table: The tokenized records (``_PREPARED_FEATURES``); None when ``rows`` is empty.
            rows: The table row of each example, in order.
            pack_bounds: Packed only: pack ``j`` holds the examples ``rows[pack_bounds[j]:pack_bounds[j + 1]]``.
        """
        self._rows = rows
        self._pack_bounds = pack_bounds
        # Per column: each chunk's first row, offsets and values as numpy views of the mapped file.
        # Reading an example through them takes 8 us (440 tokens), through pyarrow scalars 22 us.
        self._columns: dict[str, tuple[list[int], list[np.ndarray], list[np.ndarray]]] = {}
        self._scalars: dict[str, np.ndarray] = {}
        row_lengths = np.zeros(0, dtype=np.int64)
        if table is not None and len(rows):
            for name in ("input_ids", "labels", "rejected_input_ids", "rejected_labels"):
                if name not in table.column_names:
                    continue  # the rejected answer: format preference only
                chunks = table.column(name).chunks
                starts = np.cumsum([0] + [len(chunk) for chunk in chunks[:-1]]).tolist()
                self._columns[name] = (starts, [c.offsets.to_numpy() for c in chunks], [c.values.to_numpy() for c in chunks])
            self._scalars = {name: table.column(name).to_numpy() for name in _EXAMPLE_SCALARS if name in table.column_names}
            row_lengths = table.column("length").to_numpy().astype(np.int64)[rows]
        self.lengths: np.ndarray = row_lengths if pack_bounds is None else np.add.reduceat(row_lengths, pack_bounds[:-1])
        """Tokens in each example (each pack when packed), as ``len(examples[i]["input_ids"])``."""

    @property
    def packed(self) -> bool:
        return self._pack_bounds is not None

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        if self._pack_bounds is None:
            return self._read_row(int(self._rows[index]))
        start, end = self._pack_bounds[index], self._pack_bounds[index + 1]
        return merge_pack([self._read_row(int(row)) for row in self._rows[start:end]])

    def __repr__(self) -> str:
        return f"TokenizedExamples({len(self)} {'packs' if self.packed else 'examples'})"

    def _read_row(self, row: int) -> dict[str, Any]:
        example: dict[str, Any] = {}
        for name, (starts, offsets, values) in self._columns.items():
            chunk = bisect.bisect_right(starts, row) - 1
            local = row - starts[chunk]
            example[name] = values[chunk][offsets[chunk][local] : offsets[chunk][local + 1]].tolist()
        for name, values in self._scalars.items():
            example[name] = int(values[row])
        return example


@dataclass
class PreparedData:
    """What ``prepare_datasets`` returns: the examples of each split and how they were prepared."""

    train: TokenizedExamples
    eval: TokenizedExamples
    stats: dict[str, Any]
    """JSON-able: see ``prepare_datasets``."""

    @property
    def truncation(self) -> dict[str, TruncationStats]:
        """``{"train": TruncationStats, "eval": TruncationStats}`` (``build_datasets_with_stats``)."""
        return _truncation_stats(self.stats)


def _truncation_stats(stats: dict[str, Any]) -> dict[str, TruncationStats]:
    names = [field.name for field in dataclasses.fields(TruncationStats)]
    return {split: TruncationStats(**{name: stats[split][name] for name in names}) for split in ("train", "eval")}


def prepare_datasets(cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int) -> PreparedData:
    """Load, split, tokenize and (optionally) pack the examples once, and cache them on disk.

    The first run tokenizes the records with ``datasets.map`` over ``data.num_proc`` processes
    into Arrow files under ``data.cache_dir`` (``resolve_data_cache_dir``); a later run with the
    same key, and a resumed run, only opens them (memory-mapped, so the examples stay on disk until
    read). The key is everything that changes the examples: the content of the data files (a hash
    of their bytes; a hub dataset's fingerprint), the tokenizer (its vocabulary, merges, pre- and
    post-processing, special tokens and chat template), the data wing's source (the prompt templates
    and the masking rules), ``data.format``, ``text_field`` (format text), ``split`` (of a folder or a
    hub dataset), ``max_examples``,
    ``eval_path``, ``eval_fraction`` with ``seed`` when it holds records out, ``max_seq_len``,
    ``truncation`` and ``packing``; not ``num_proc``, which changes no example. A cache folder
    appears whole or not at all (written under a temporary name, then renamed), so processes that
    prepare the same data at once, as the ranks of a distributed run may, never read half of one.

    An example whose response does not fit in ``max_seq_len`` with the EOS that ends it is
    dropped (``cfg.truncation="drop"``, the default: a cut response would teach the model that
    some answers never stop) or kept with its first ``max_seq_len`` tokens (``"keep"``). An
    example with no response token left is dropped either way. A preference pair is one example:
    dropped (``drop``) when either sequence loses a learned token, kept cut (``keep``) while both
    keep one. Printed, on every run: one line per non-empty split (``format_truncation_stats``),
    then one line saying how the data was prepared (``format_preparation_stats``).

    Args:
        cfg: The recipe's data section.
        tokenizer: The model's tokenizer.
        max_seq_len: Longest sequence in tokens; packs fill up to it.
        seed: Seeds the shuffle that picks the held-out records for ``cfg.eval_fraction``.

    Returns:
        ``PreparedData``: ``train`` and ``eval``, sequences of examples (``TokenizedExamples``) with
        ``input_ids`` and ``labels``, in file order (packed training examples also carry
        ``position_ids``; evaluation examples are never packed; format preference adds
        ``rejected_input_ids`` and ``rejected_labels``, format unpaired ``desirable``). The eval split comes from
        ``cfg.eval_path`` (read with ``cfg.split``; a single file ignores it), else from
        ``round(n * cfg.eval_fraction)`` (at least 1) held-out training records, else it is empty.
        ``stats``, JSON-able: ``records`` (read, both splits), ``kept``, ``dropped``, ``truncated``
        and ``tokens`` (of the kept examples; of a pair, both sequences'), each summed over both splits; ``train`` and ``eval``:
        the split's ``TruncationStats`` fields plus ``kept``, ``tokens`` and ``sequences`` (packs
        when packed); ``max_seq_len``, ``truncation``, ``packing``; ``num_proc`` and
        ``tokenize_seconds`` of the run that tokenized; ``chat_read_as`` (records per reading of
        ``formats.CHAT_READINGS`` taken, e.g. ``{"human->user": 1200}``; empty when none was) and
        ``chat_records_read_as`` (records that took any), over both splits; ``seconds`` this call
        took, ``cache`` (``"hit"`` or ``"miss"``) and ``cache_path``.

    Raises:
        DataError: Files cannot be read, a record lacks a required field (message gives the
            split, file, record index and field), no training example is left, the cache
            folder is damaged, or packing is asked of a format that ranks or labels answers.
    """
    started = time.perf_counter()
    if cfg.truncation not in CHOICES["data.truncation"]:
        raise DataError(f"data.truncation={cfg.truncation!r} is not one of {', '.join(CHOICES['data.truncation'])}")
    if cfg.packing and cfg.format in PREFERENCE_FORMATS:
        # config refuses this recipe too; a DataConfig built by hand meets it here, before any tokenizing.
        raise DataError(f"data.format {cfg.format} scores whole answers, one per row, which packing would merge: set data.packing: false")
    require_eos_id(tokenizer)
    train_source = _fingerprint_source(cfg.path, cfg.split)
    eval_source = _fingerprint_source(cfg.eval_path, cfg.split) if cfg.eval_path else None
    key = _describe_cache_key(cfg, tokenizer, max_seq_len, seed, train_source[0], eval_source and eval_source[0])
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    folder = resolve_data_cache_dir(cfg) / f"{_folder_stem(cfg.path)}-{digest}"
    cache = "hit"
    if not (folder / _MANIFEST).is_file():
        cache = "miss"
        _write_prepared(folder, key, cfg, tokenizer, max_seq_len, seed, train_source[1], eval_source and eval_source[1])
    prepared = _open_prepared(folder)
    prepared.stats.update(seconds=round(time.perf_counter() - started, 3), cache=cache, cache_path=str(folder))
    _print_truncation_lines(prepared.stats)
    print(format_preparation_stats(prepared.stats))
    return prepared


def resolve_data_cache_dir(cfg: DataConfig) -> Path:
    """``data.cache_dir``, else ``$QLORA_LITE_DATA_CACHE``, else ``data`` in qlora-lite's cache (``$QLORA_LITE_CACHE``, default ``~/.cache/qlora-lite``)."""
    # Absolute: the cache's files are named relative to it (a relative one was read from a moving point).
    return Path(cfg.cache_dir or os.environ.get(DATA_CACHE_ENV) or cache_root() / "data").expanduser().absolute()


def format_preparation_stats(stats: dict[str, Any]) -> str:
    """One report line, e.g. ``data: 200000 records -> 199973 examples (27 dropped), ...; read from the cache ...``."""
    line = (
        f"data: {stats['records']} records -> {stats['kept']} examples ({stats['dropped']} dropped), {stats['tokens']} tokens"
    )
    if stats["packing"]:
        line += f", {stats['train']['sequences']} packed training sequences"
    if stats.get("chat_read_as"):
        # Said once per run: an alias taken in silence is how a `bot` answer went unlearned (issue 22).
        line += f"; chat read as: {', '.join(stats['chat_read_as'])} ({stats['chat_records_read_as']} records)"
    if stats["cache"] == "hit":
        return line + f"; read from the cache in {stats['seconds']:.2f} s ({stats['cache_path']})"
    processes = "1 process" if stats["num_proc"] == 1 else f"{stats['num_proc']} processes"
    return line + f"; tokenized with {processes} in {stats['seconds']:.1f} s, cached in {stats['cache_path']}"


def _print_truncation_lines(stats: dict[str, Any]) -> None:
    truncation = _truncation_stats(stats)
    for split in ("train", "eval"):
        if truncation[split].examples:
            print(format_truncation_stats(truncation[split]))


def _fingerprint_source(path: str, split: str) -> tuple[str, datasets.Dataset | None]:
    """A fingerprint of a data file, folder or hub dataset, and its records when they had to be loaded for it.

    Local data is hashed byte for byte (an edited record changes it; size and mtime would not
    always), which reads 100 MB in about 0.1 s. A hub dataset is loaded, from datasets' own cache
    after the first download, and its ``_fingerprint`` names it.
    """
    if not looks_local(path):
        records = load_records(path, split)
        return f"hub:{split}:{records._fingerprint}", records
    root = Path(path).expanduser()
    if root.is_dir():
        files = sorted(f for f in root.rglob("*") if f.is_file() and f.suffix in LOCAL_BUILDERS)
    else:
        files = [root] if root.is_file() and root.suffix in LOCAL_BUILDERS else []
    if not files:
        load_records(path, split)  # raises the DataError that says what is wrong with the path
    digest = hashlib.sha256(f"folder, split {split}\0".encode() if root.is_dir() else b"file\0")  # a file has one split
    for file in files:
        digest.update(f"{file.relative_to(root) if root.is_dir() else file.suffix}\0".encode())
        content = hashlib.sha256()  # hashlib.file_digest would do, from Python 3.11
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                content.update(chunk)
        digest.update(content.digest())
    return f"sha256:{digest.hexdigest()}", None


def fingerprint_tokenizer(tokenizer: Any) -> str:
    """A hash of everything in a tokenizer that changes the ids or the masks it gives.

    A fast tokenizer's ``backend_tokenizer.to_str()`` holds its vocabulary, merges, normalizer,
    pre-tokenizer, post-processor (the BOS it adds) and added tokens; to that come the special
    tokens and the chat template, which live on the transformers side. Another tokenizer is saved
    to a temporary folder and its files hashed.
    """
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        with tempfile.TemporaryDirectory() as folder:
            tokenizer.save_pretrained(folder)
            for file in sorted(Path(folder).iterdir()):
                digest.update(file.name.encode() + b"\0" + file.read_bytes())
    names = ("bos_token", "eos_token", "pad_token", "unk_token", "bos_token_id", "eos_token_id", "pad_token_id", "split_special_tokens")
    extra = {name: getattr(tokenizer, name, None) for name in names}
    extra.update(type=type(tokenizer).__name__, chat_template=getattr(tokenizer, "chat_template", None))
    digest.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return digest.hexdigest()


@functools.cache
def _source_fingerprint() -> str:
    # The data wing's source: the record readers, prompt templates, masking, truncation and packing
    # rules all live in it, so a cache never outlives the code that wrote it.
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _describe_cache_key(
    cfg: DataConfig, tokenizer: Any, max_seq_len: int, seed: int, data: str, eval_data: str | None
) -> dict[str, Any]:
    holds_out = not cfg.eval_path and cfg.eval_fraction > 0
    return {
        "data": data,
        "max_examples": cfg.max_examples,
        "eval_data": eval_data,
        "eval_fraction": cfg.eval_fraction if holds_out else None,
        "seed": seed if holds_out else None,
        "format": cfg.format,
        "text_field": cfg.text_field if cfg.format == "text" else None,
        "tokenizer": fingerprint_tokenizer(tokenizer),
        "max_seq_len": max_seq_len,
        "truncation": cfg.truncation,
        "packing": cfg.packing,
        "code": _source_fingerprint(),
    }


def _folder_stem(path: str) -> str:
    # Readable cache folder names: the data file's stem, or the hub id.
    stem = Path(path).stem if looks_local(path) else path
    return re.sub(r"[^A-Za-z0-9._]+", "-", stem).strip("-.")[:60] or "data"


def _choose_num_proc(requested: int | None, n_records: int) -> int:
    if requested is not None:
        return max(1, min(requested, n_records))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, MAX_AUTO_NUM_PROC, n_records // RECORDS_PER_PROCESS))


def _write_prepared(
    folder: Path,
    key: dict[str, Any],
    cfg: DataConfig,
    tokenizer: Any,
    max_seq_len: int,
    seed: int,
    train_records: datasets.Dataset | None,
    eval_records: datasets.Dataset | None,
) -> None:
    """Tokenize, split, drop and pack into a temporary folder, then rename it to ``folder``."""
    started = time.perf_counter()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        # Local records are converted afresh into this folder (removed before the rename): the key
        # says their content changed, which datasets' own cache would not see (see load_records).
        records_dir = str(tmp / "records")
        if train_records is None:
            train_records = load_records(cfg.path, cfg.split, cache_dir=records_dir)
        if cfg.max_examples is not None:
            train_records = train_records.select(range(min(cfg.max_examples, len(train_records))))
        if cfg.eval_path and eval_records is None:
            eval_records = load_records(cfg.eval_path, cfg.split, cache_dir=records_dir)
        num_proc = _choose_num_proc(cfg.num_proc, len(train_records))
        tables = {"train": _tokenize_to_arrow(train_records, tmp, "train", cfg, tokenizer, max_seq_len, num_proc, key)}
        if eval_records is not None:
            tables["eval"] = _tokenize_to_arrow(eval_records, tmp, "eval", cfg, tokenizer, max_seq_len, num_proc, key)

        train_rows = np.arange(len(train_records), dtype=np.int64)
        eval_rows = np.arange(len(eval_records) if eval_records is not None else 0, dtype=np.int64)
        if not cfg.eval_path and cfg.eval_fraction > 0:
            train_indices, eval_indices = split_indices(len(train_records), cfg.eval_fraction, seed)
            train_rows, eval_rows = np.array(train_indices, dtype=np.int64), np.array(eval_indices, dtype=np.int64)
        eval_table = "eval" if eval_records is not None else "train"
        train_kept, train_stats = _select_split("train", tables["train"][1], train_rows, max_seq_len, cfg.truncation)
        eval_kept, eval_stats = _select_split("eval", tables[eval_table][1], eval_rows, max_seq_len, cfg.truncation)
        train_stats["sequences"] = train_stats["kept"]
        np.save(tmp / "train_rows.npy", train_kept)
        np.save(tmp / "eval_rows.npy", eval_kept)
        if cfg.packing and len(train_kept):
            bounds = np.array(plan_packs(tables["train"][1]["length"][train_kept].tolist(), max_seq_len), dtype=np.int64)
            np.save(tmp / "train_pack_bounds.npy", bounds)
            train_stats["sequences"] = len(bounds) - 1
        splits = (train_stats, eval_stats)
        read_as = np.concatenate([columns["chat_read_as"] for _, columns in tables.values()]).astype(np.int64)
        stats = {
            "records": len(train_records) + (len(eval_records) if eval_records is not None else 0),
            **{name: sum(split[name] for split in splits) for name in ("kept", "dropped", "truncated", "tokens")},
            "train": train_stats,
            "eval": eval_stats,
            "max_seq_len": max_seq_len,
            "truncation": cfg.truncation,
            "packing": cfg.packing,
            "num_proc": num_proc,
            "tokenize_seconds": round(time.perf_counter() - started, 3),
            # Every record read, both splits, as "records" counts them (dropped ones too: they were read so).
            "chat_read_as": {name: int(count) for i, name in enumerate(CHAT_READINGS) if (count := ((read_as >> i) & 1).sum())},
            "chat_records_read_as": int((read_as != 0).sum()),
        }
        if not len(train_kept):
            _print_truncation_lines(stats)
            raise DataError(_no_training_examples_message(cfg.path, _truncation_stats(stats)["train"]))
        manifest = {
            "key": key,
            "tables": {name: files for name, (files, _) in tables.items()},
            "eval_table": eval_table,
            "stats": stats,
        }
        shutil.rmtree(records_dir, ignore_errors=True)
        # Written last: a folder with a manifest is complete, even before the rename.
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        # mkdtemp made tmp 0o700: another user or a serving container could not read the cache.
        apply_umask(tmp)
        try:
            tmp.rename(folder)
        except OSError:
            if not (folder / _MANIFEST).is_file():
                raise
            # Another process prepared the same data first; its folder is the same data.
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _describe_records(name: str, path: str, split: str) -> str:
    """Where a split's records come from, as an error names it: ``eval file /x/eval.jsonl``, ``train data org/set (split 'test')``."""
    if looks_local(path) and Path(path).expanduser().is_file():
        return f"{name} file {path}"  # a file has one split
    return f"{name} data {path} (split {split!r})"


def _tokenize_to_arrow(
    records: datasets.Dataset, tmp: Path, name: str, cfg: DataConfig, tokenizer: Any, max_seq_len: int, num_proc: int, key: dict
) -> tuple[list[str], dict[str, np.ndarray]]:
    """Tokenize the records into Arrow files under ``tmp/name``; their names and the small columns as arrays."""
    (tmp / name).mkdir()
    path = cfg.path if name == "train" else cfg.eval_path
    try:
        mapped = records.map(
            _tokenize_batch,
            batched=True,
            with_indices=True,  # each worker gets the file's row numbers, quoted in errors
            # datasets runs num_proc=1 in a worker process too; in this one it skips sending the tokenizer.
            num_proc=min(num_proc, len(records)) if num_proc > 1 else None,
            remove_columns=records.column_names,
            features=_prepared_features(cfg.format),
            fn_kwargs={"fmt": cfg.format, "tokenizer": tokenizer, "text_field": cfg.text_field, "max_seq_len": max_seq_len, "truncation": cfg.truncation},
            cache_file_name=str(tmp / name / "tokens.arrow"),
            # Our key names the result: datasets need not hash the tokenizer (seconds, and a warning when it cannot).
            new_fingerprint=hashlib.sha256(json.dumps([key, name], sort_keys=True).encode()).hexdigest()[:32],
            load_from_cache_file=False,
            desc=f"tokenizing {name} ({Path(path).name})",
        )
    except DataError as err:
        # A worker's error names the record's row; only here is it known which file (and split) that row is in.
        raise DataError(f"{_describe_records(name, path, cfg.split)}, {err}") from err
    files = [str(Path(f["filename"]).relative_to(tmp)) for f in mapped.cache_files]
    # The per-row numbers (not the token lists), read into memory for the statistics and the split.
    columns = [name for name, feature in mapped.features.items() if not isinstance(feature, datasets.List)]
    small = {column: mapped.data.column(column).to_numpy() for column in columns}
    return files, small


def _tokenize_batch(
    batch: dict[str, list], indices: list[int], fmt: str, tokenizer: Any, text_field: str, max_seq_len: int, truncation: str
) -> pa.Table:
    """``datasets.map`` function: a batch of records -> one row of ``_prepared_features(fmt)`` each."""
    records = [dict(zip(batch, values)) for values in zip(*batch.values())]
    features = _prepared_features(fmt)
    columns: dict[str, list] = {name: [] for name in features}
    examples = tokenize_records(records, indices, fmt, tokenizer, text_field)
    for whole in examples:
        sequences = [(whole["input_ids"], whole["labels"])]
        if "rejected_input_ids" in whole:
            sequences.append((whole["rejected_input_ids"], whole["rejected_labels"]))
        # A pair is cut as one: it teaches the difference of its answers, which a lost EOS on one side skews.
        cuts = [_cut_sequence(input_ids, labels, max_seq_len) for input_ids, labels in sequences]
        cut = sum(lost for _, _, lost, _ in cuts)
        learnable = all(learned for _, _, _, learned in cuts)
        kept = learnable and not (cut and truncation == "drop")
        kept_sequences = [(input_ids, labels) if kept else ([], []) for input_ids, labels, _, _ in cuts]
        columns["input_ids"].append(kept_sequences[0][0])
        columns["labels"].append(kept_sequences[0][1])
        if "rejected_input_ids" in columns:
            columns["rejected_input_ids"].append(kept_sequences[1][0])
            columns["rejected_labels"].append(kept_sequences[1][1])
            columns["tokens"].append(sum(len(input_ids) for input_ids, _ in kept_sequences))
        if "desirable" in columns:
            columns["desirable"].append(bool(whole["desirable"]))
        columns["length"].append(max(len(input_ids) for input_ids, _ in kept_sequences))
        columns["whole_length"].append(max(len(input_ids) for input_ids, _ in sequences))
        columns["cut_tokens"].append(cut)
        columns["learnable"].append(learnable)
        columns["kept"].append(kept)
        columns["chat_read_as"].append(whole["chat_read_as"])
    # An Arrow table, not lists: pyarrow converts lists of Python ints element by element, 30 times
    # slower than numpy's fromiter, and datasets would convert them again to infer their type.
    arrays = {name: _to_list_array(values) if isinstance(features[name], datasets.List) else values for name, values in columns.items()}
    return pa.table(arrays, schema=features.arrow_schema)


def _cut_sequence(input_ids: list[int], labels: list[int], max_seq_len: int) -> tuple[list[int], list[int], int, bool]:
    """A sequence's first ``max_seq_len`` ids and labels, the learned tokens past them, and whether a learned token is left."""
    kept_labels, beyond = labels[:max_seq_len], labels[max_seq_len:]
    # Every sequence ends in a learned token (EOS or end of turn), so any cut loses learned tokens.
    cut = len(beyond) - beyond.count(IGNORE_INDEX)
    learnable = kept_labels.count(IGNORE_INDEX) < len(kept_labels)
    return input_ids[:max_seq_len], kept_labels, cut, learnable


def _to_list_array(lists: list[list[int]]) -> pa.ListArray:
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum([len(ids) for ids in lists], out=offsets[1:])
    values = np.fromiter(itertools.chain.from_iterable(lists), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))


def _select_split(
    split: str, columns: dict[str, np.ndarray], rows: np.ndarray, max_seq_len: int, policy: str
) -> tuple[np.ndarray, dict[str, Any]]:
    """The kept rows among ``rows`` and the split's statistics (``TruncationStats`` fields, kept, tokens)."""
    cut = columns["cut_tokens"][rows].astype(np.int64)
    kept = rows[columns["kept"][rows]]
    stats = TruncationStats(
        split=split,
        examples=len(rows),
        truncated=int((cut > 0).sum()),
        fully_cut=int(((cut > 0) & ~columns["learnable"][rows]).sum()),
        response_tokens_cut=int(cut.sum()),
        dropped=len(rows) - len(kept),
        longest_tokens=int(columns["whole_length"][rows].max()) if len(rows) else 0,
        max_seq_len=max_seq_len,
        policy=policy,
    )
    # A pair's tokens are both its sequences'; length, which batching reads, is only the longer one's.
    tokens = columns.get("tokens", columns["length"])[kept].astype(np.int64).sum()
    return kept, {**dataclasses.asdict(stats), "kept": len(kept), "tokens": int(tokens)}


def _open_prepared(folder: Path) -> PreparedData:
    try:
        manifest = json.loads((folder / _MANIFEST).read_text())
        tables = {name: _read_arrow([folder / file for file in files]) for name, files in manifest["tables"].items()}
        train_rows, eval_rows = np.load(folder / "train_rows.npy"), np.load(folder / "eval_rows.npy")
        bounds_file = folder / "train_pack_bounds.npy"
        bounds = np.load(bounds_file) if bounds_file.exists() else None
    except (OSError, ValueError, KeyError, pa.ArrowException) as err:
        raise DataError(f"the data cache {folder} is damaged ({err}); delete that folder and run again to rebuild it") from err
    train = TokenizedExamples(tables["train"], train_rows, bounds)
    evaluation = TokenizedExamples(tables[manifest["eval_table"]], eval_rows)
    return PreparedData(train, evaluation, manifest["stats"])


def _read_arrow(files: list[Path]) -> pa.Table:
    # datasets writes Arrow IPC streams; reading one from a memory map copies nothing.
    tables = [pa.ipc.open_stream(pa.memory_map(str(file))).read_all() for file in files]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _no_training_examples_message(path: str, stats: TruncationStats) -> str:
    if stats.truncated > stats.fully_cut and stats.policy == "drop":
        return (
            f"no training examples left from {path}: all {stats.examples} did not fit in max_seq_len={stats.max_seq_len}; "
            "raise train.max_seq_len, or set data.truncation=keep to train on the cut responses"
        )
    return (
        f"no training examples left from {path}: all {stats.examples} had no response token left within "
        f"max_seq_len={stats.max_seq_len}; raise train.max_seq_len or shorten the prompts"
    )
