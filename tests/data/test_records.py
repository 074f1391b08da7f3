"""Records: local files in each format, folders and splits, the hub, and what each read failure says.

The tokenizer fixture has pad id 0, bos id 2, eos id 3 (`</s>`), no chat template, and does
not add BOS by itself; tests that need BOS or a template set them on a copy.
"""

from __future__ import annotations

import json

import datasets
import huggingface_hub.constants
import pytest

from qlora_lite.data.records import load_records
from qlora_lite.errors import DataError
from tests.helpers import alpaca_records, write_csv, write_jsonl

# ----------------------------------------------------------------------------- loading


@pytest.mark.parametrize("suffix", ["jsonl", "json", "csv", "parquet"])
def test_load_records_reads_each_local_format(tmp_path, suffix):
    records = alpaca_records(5)
    path = tmp_path / f"data.{suffix}"
    if suffix == "jsonl":
        write_jsonl(path, records)
    elif suffix == "json":
        path.write_text(json.dumps(records))
    elif suffix == "csv":
        write_csv(path, records)
    else:
        datasets.Dataset.from_list(records).to_parquet(str(path))

    loaded = load_records(str(path))

    assert len(loaded) == 5
    assert loaded[3]["output"] == "Blue 3 is the quick fox."
    assert loaded[3]["instruction"] == "Name colour 3."


def test_load_records_reads_named_split_of_a_folder(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", alpaca_records(3))
    write_jsonl(tmp_path / "test.jsonl", alpaca_records(2))

    assert len(load_records(str(tmp_path), split="train")) == 3
    assert len(load_records(str(tmp_path), split="test")) == 2
    with pytest.raises(DataError, match="no split 'validation'"):
        load_records(str(tmp_path), split="validation")


def test_load_records_missing_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "train.jsonl"
    with pytest.raises(DataError, match="does not exist") as err:
        load_records(str(missing))
    # Issue 22: it named where the command runs but not the recipe's folder, where data.path is looked up too.
    assert str(err.value) == (
        f"data file {missing} does not exist; check data.path (absolute, or relative to where you run qlora-lite, "
        "else to the recipe's folder)"
    )


def test_load_records_unreachable_hub_says_pass_a_local_file(monkeypatch):
    # Offline mode fails the same way as a dead network, without waiting for retries.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="hub is unreachable") as err:
        load_records("someone/some-dataset")
    assert "local .jsonl" in str(err.value)


NO_RECORDS_FIX = {
    "jsonl": "add one JSON object per line, or point data.path at your data file",
    "json": "add a JSON list of objects (or one object per line), or point data.path at your data file",
    "csv": "add rows under a header row (one per record), or point data.path at your data file",
    "parquet": "add one row per record, or point data.path at your data file",
}


@pytest.mark.parametrize("suffix, content, reason", [
    ("jsonl", "", "the file is empty"),
    ("json", "", "the file is empty"),
    ("csv", "", "the file is empty"),
    ("parquet", "", "the file is empty"),
    ("jsonl", "\n  \n\n", "the file has only blank lines"),
    ("csv", "\n\n", "the file has only blank lines"),
    ("json", "[]\n", "its JSON list is empty"),
    ("csv", "instruction,output\n", "it has a header row but no data rows"),
    ("parquet", None, "it has no rows"),
], ids=["0-byte-jsonl", "0-byte-json", "0-byte-csv", "0-byte-parquet", "blank-jsonl", "blank-csv", "empty-list-json",
        "header-only-csv", "0-row-parquet"])
def test_file_without_records_says_it_holds_none(tmp_path, suffix, content, reason):
    path = tmp_path / f"data.{suffix}"
    if content is None:
        datasets.Dataset.from_dict({"instruction": [], "output": []}).to_parquet(str(path))
    else:
        path.write_text(content)

    with pytest.raises(DataError) as err:
        load_records(str(path))

    assert str(err.value) == f"{path} holds no records ({reason}); {NO_RECORDS_FIX[suffix]}"


@pytest.mark.parametrize("suffix, lines, message", [
    ("jsonl", ['{"instruction": "a", "output": "b"}', "", '{"instruction": "a", output: "b"}'],
     "line 3 is not valid JSON: Expecting property name enclosed in double quotes at column 22; fix or remove that line"),
    ("jsonl", ['{"instruction": "a", "output": "b"}', '{"instruction": "a", "out'],
     "line 2 is not valid JSON: Unterminated string starting at column 22; fix or remove that line"),
    ("jsonl", ['{"instruction": "a", "output": "b"}', "[1, 2]"],
     "line 2 is a JSON list, not an object; write one record per line as a JSON object"),
    ("json", ['{"instruction": "a", "output": "b"}', '{"instruction": "a" "output": "b"}'],
     "line 2 is not valid JSON: Expecting ',' delimiter at column 21; fix or remove that line"),
    ("json", ['[{"instruction": "a", "output": "b"},', '{"instruction": "a", "output": "b"},', "]"],
     "is not valid JSON: Expecting value at line 3 column 1; fix the file there"),
], ids=["jsonl-bad-key", "jsonl-cut-line", "jsonl-array-line", "json-lines-bad-line", "json-list-trailing-comma"])
def test_malformed_json_names_the_line(tmp_path, suffix, lines, message):
    path = tmp_path / f"data.{suffix}"
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataError) as err:
        load_records(str(path))

    assert str(err.value) == f"{path} {message}"


def test_malformed_csv_gives_the_parser_cause(tmp_path):
    path = tmp_path / "data.csv"
    path.write_text("instruction,output\na,b\nc,d,e\n")

    with pytest.raises(DataError) as err:
        load_records(str(path))

    assert str(err.value) == (
        f"could not read {path}: Error tokenizing data. C error: Expected 2 fields in line 3, saw 3; check the file is valid csv"
    )


