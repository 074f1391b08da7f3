"""Records: raw examples read from a local file or folder, or from the Hugging Face hub.

`load_records` turns a `.json`/`.jsonl`/`.csv`/`.parquet` file, a folder of them, or a hub dataset id
into a `datasets.Dataset`, and every way that can fail into one `DataError` line naming the file, the
line and the fix (an empty file, a malformed JSON line, a missing split, an unreachable hub).
`split_indices` holds out the eval records of `data.eval_fraction`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import datasets

from ..errors import DataError

# Extension -> datasets' packaged builder. .jsonl is read by the json builder.
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def load_records(path: str, split: str = "train", cache_dir: str | None = None) -> datasets.Dataset:
    """Load raw records from a local file or folder, or from the Hugging Face hub.

    Args:
        path: A ``.json``/``.jsonl``/``.csv``/``.parquet`` file, a folder of such files (split
            names come from the file names, e.g. ``train.jsonl`` and ``test.jsonl``), or a hub
            dataset id such as ``tatsu-lab/alpaca``.
        split: Split to read from a folder or a hub dataset. A single file has one split and
            ignores this.
        cache_dir: Where datasets writes the Arrow copy of local files (default: its own cache).
            datasets reuses a copy while the file keeps its path, size and modification time,
            even when its content changed; ``prepare_datasets`` passes a fresh folder.

    Returns:
        The records as a ``datasets.Dataset``.

    Raises:
        DataError: The local file does not exist, cannot be parsed or holds no records; the
            split does not exist; or the hub cannot be reached for a hub id.
    """
    if looks_local(path):
        records = _load_local_records(Path(path).expanduser(), split, cache_dir)
    else:
        records = _load_hub_records(path, split)
    if len(records) == 0:
        raise DataError(f"{path} (split {split!r}) holds no records; check the file is not empty")
    return records


def looks_local(path: str) -> bool:
    # A hub id is "name" or "owner/name"; anything with a data-file suffix or a filesystem
    # prefix is meant as a local path, so a typo there says "file not found", not "hub unreachable".
    return Path(path).expanduser().exists() or Path(path).suffix in LOCAL_BUILDERS or path.startswith(("/", ".", "~"))


def _load_local_records(path: Path, split: str, cache_dir: str | None = None) -> datasets.Dataset:
    if not path.exists():
        raise DataError(
            f"data file {path} does not exist; check data.path (absolute, or relative to where you run qlora-lite, "
            "else to the recipe's folder)"
        )
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix in LOCAL_BUILDERS)
    elif path.suffix not in LOCAL_BUILDERS:
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(LOCAL_BUILDERS)}")
    else:
        files = [path]
    # datasets 5.2 reads an empty file as StopIteration (json) or a pandas EmptyDataError (csv),
    # so a file with nothing in it is caught before datasets sees it.
    for file in files:
        if _is_blank(file):
            reason = "the file is empty" if file.stat().st_size == 0 else "the file has only blank lines"
            raise DataError(_no_records_message(file, reason))
    try:
        if path.is_dir():
            records = datasets.load_dataset(str(path), split=split, cache_dir=cache_dir)
        else:
            # A single file is one split, which datasets names "train" whatever the file is for.
            records = datasets.load_dataset(LOCAL_BUILDERS[path.suffix], data_files=str(path), split="train", cache_dir=cache_dir)
    except (datasets.exceptions.DatasetsError, OSError, ValueError, StopIteration) as err:
        if path.is_dir() and isinstance(err, ValueError) and "split" in str(err).lower():
            raise DataError(f"{path} has no split {split!r} ({err}); set data.split to one of the listed splits") from err
        raise _explain_unreadable(path, files, err) from err
    if len(records) == 0 and not path.is_dir():
        raise DataError(_no_records_message(path, "it has no rows"))
    return records


RECORD_LAYOUTS = {
    ".jsonl": "one JSON object per line",
    ".json": "a JSON list of objects (or one object per line)",
    ".csv": "rows under a header row (one per record)",
    ".parquet": "one row per record",
}


def _no_records_message(path: Path, reason: str) -> str:
    return f"{path} holds no records ({reason}); add {RECORD_LAYOUTS[path.suffix]}, or point data.path at your data file"


def _is_blank(path: Path) -> bool:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def _explain_unreadable(path: Path, files: list[Path], err: BaseException) -> DataError:
    """The DataError for a local file or folder that datasets failed to read: which file, which line, why."""
    for file in files:
        problem = _find_json_problem(file) if file.suffix in (".json", ".jsonl") else None
        if problem:
            return DataError(problem)
    # datasets 5.2 says 'Instruction "train" corresponds to no data!' for a file whose records
    # are all missing: "[]", a CSV header alone, a parquet schema without rows.
    if isinstance(err, StopIteration) or "corresponds to no data" in str(err):
        for file in files:
            reason = _find_missing_records(file)
            if reason:
                return DataError(_no_records_message(file, reason))
        return DataError(f"{path} holds no records; check that its files are not empty")
    kind = path.suffix.lstrip(".") if path.is_file() else "data"
    return DataError(f"could not read {path}: {_root_cause(err)}; check the file is valid {kind}")


def _find_json_problem(path: Path) -> str | None:
    """The first syntax problem of a JSON or JSON Lines file, naming its line, or None."""
    text = path.read_bytes().decode("utf-8", errors="replace")
    if text.lstrip().startswith("["):  # one JSON document: a list of records
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"{path} is not valid JSON: {_json_reason(err)} at line {err.lineno} column {err.colno}; fix the file there"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return f"{path} line {number} is not valid JSON: {_json_reason(err)} at column {err.colno}; fix or remove that line"
        if not isinstance(value, dict):
            kind = {list: "list", str: "string"}.get(type(value), "number or constant")
            return f"{path} line {number} is a JSON {kind}, not an object; write one record per line as a JSON object"
    return None


def _json_reason(err: json.JSONDecodeError) -> str:
    # The json module ends some messages with "at" ("Unterminated string starting at") and adds the position itself.
    return err.msg.removesuffix(" at")


def _find_missing_records(path: Path) -> str | None:
    """Why a non-blank file holds no records, or None when it seems to hold some."""
    if path.suffix == ".csv":
        rows = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
        return "it has a header row but no data rows" if len(rows) <= 1 else None
    if path.suffix == ".json":
        try:
            value = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if value == []:
            return "its JSON list is empty"
        return "its JSON is an object, not a list of records" if isinstance(value, dict) else None
    if path.suffix == ".parquet":
        return "it has no rows"
    return None


def _root_cause(err: BaseException) -> str:
    # datasets wraps the parser's error ("An error occurred while generating the dataset"); the
    # innermost one says what is wrong. One line, since the CLI prints it after "error: ".
    while err.__cause__ is not None:
        err = err.__cause__
    return " ".join(str(err).split()) or type(err).__name__


def _load_hub_records(dataset_id: str, split: str) -> datasets.Dataset:
    try:
        return datasets.load_dataset(dataset_id, split=split)
    except datasets.exceptions.DatasetNotFoundError as err:
        raise DataError(
            f"{dataset_id!r} is neither a local file nor a dataset on the Hugging Face hub; "
            "pass a local .jsonl/.json/.csv/.parquet file or a valid hub id"
        ) from err
    except ConnectionError as err:
        raise DataError(
            f"the Hugging Face hub is unreachable, so dataset {dataset_id!r} cannot be downloaded ({err}); "
            "check the network, or pass a local .jsonl/.json/.csv/.parquet file as data.path"
        ) from err
    except OSError as err:  # a download that started and then failed
        raise DataError(
            f"dataset {dataset_id!r} could not be downloaded from the Hugging Face hub ({err}); "
            "check the network, or pass a local .jsonl/.json/.csv/.parquet file as data.path"
        ) from err
    except ValueError as err:
        if "split" in str(err).lower():
            raise DataError(f"dataset {dataset_id!r} has no split {split!r} ({err}); set data.split") from err
        raise


def split_indices(n_records: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out ``round(n_records * eval_fraction)`` (at least 1) records, chosen by a seeded shuffle.

    Returns:
        ``(train_indices, eval_indices)``, each in ascending order so the training order
        stays the file's order.

    Raises:
        DataError: The fraction would leave no training record.
    """
    n_eval = max(1, round(n_records * eval_fraction))
    if n_eval >= n_records:
        raise DataError(
            f"data.eval_fraction={eval_fraction} holds out {n_eval} of {n_records} records, leaving none to train on; "
            "lower it or pass data.eval_path"
        )
    order = list(range(n_records))
    random.Random(seed).shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])
