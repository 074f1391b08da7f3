"""Model names: `demo:` names, local folders made absolute, hub ids kept as given, and what the hub offline says.

`find_base_model` and the online answers of `find_hub_problem` are tested in depth in
tests/methods/test_folder.py; this file covers the name rules they build on.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import constants

from qlora_lite import model_paths
from qlora_lite.config import ModelConfig
from qlora_lite.errors import ModelLoadError, QloraLiteError
from qlora_lite.methods.folder import find_base_model
from qlora_lite.model_paths import HUB_ID, find_hub_problem, is_demo_name, resolve_model_path


def resolve(name: str) -> str:
    return resolve_model_path(ModelConfig(name_or_path=name))


@pytest.fixture
def demo_calls(tmp_path, monkeypatch):
    """Stands in for the demo base: building the real one takes a minute. Records each call's arguments."""
    calls = []

    def fake_ensure_demo_base(*args, **kwargs):
        calls.append((args, kwargs))
        return tmp_path / "demo-base"

    monkeypatch.setattr(model_paths, "ensure_demo_base", fake_ensure_demo_base)
    return calls


def test_only_names_that_start_with_demo_colon_ask_for_the_demo_base():
    names = ["demo:tiny", "demo:anything", "demo:", "demo", "models/demo:tiny", "", "Demo:tiny", " demo:tiny"]
    # a prefix test: case and leading spaces count, and a folder whose path merely contains "demo:" is a folder
    assert [name for name in names if is_demo_name(name)] == ["demo:tiny", "demo:anything", "demo:"]


def test_a_relative_local_folder_comes_back_absolute_and_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    assert resolve("models/tiny") == str((tmp_path / "models/tiny").resolve())
    assert resolve("./models/../models/tiny") == str((tmp_path / "models/tiny").resolve())


def test_a_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home" / "models" / "tiny").mkdir(parents=True)
    assert resolve("~/models/tiny") == str((tmp_path / "home/models/tiny").resolve())


def test_hub_ids_and_files_are_returned_as_given(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert resolve("gpt2") == "gpt2"
    # a file is no model folder: left for the loader to refuse, not made absolute
    (tmp_path / "weights.safetensors").write_bytes(b"")
    assert resolve("weights.safetensors") == "weights.safetensors"


def test_a_demo_name_builds_the_demo_base_once_and_returns_its_folder(demo_calls, tmp_path):
    assert resolve("demo:tiny") == str(tmp_path / "demo-base")
    assert demo_calls == [((), {})]  # the default cache and spec: every demo name means the one demo base


def test_an_adapter_recording_a_demo_base_is_put_on_the_demo_base(demo_calls, tmp_path):
    # not covered in test_folder.py: find_base_model sends demo names through resolve_model_path
    assert find_base_model(tmp_path / "adapter", {"base_model_name_or_path": "demo:tiny"}) == str(tmp_path / "demo-base")
    assert demo_calls == [((), {})]


def test_an_empty_name_is_refused_with_the_fix():
    with pytest.raises(ModelLoadError) as err:
        resolve("")
    assert str(err.value) == "model.name_or_path is empty; set it to a local model folder or a hub id"
    # a QloraLiteError: the CLI prints the message and exits 2 instead of a traceback
    assert isinstance(err.value, QloraLiteError)
    assert err.value.exit_code == 2


def test_hub_id_pattern_takes_name_or_owner_slash_name_and_no_path():
    accepted = ["gpt2", "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-7B", "a_b.c-d/e.f"]
    refused = ["/abs/path", "./rel", "~/x", "a/b/c", "owner/", "-x", "a//b", ""]
    names = accepted + refused
    assert [name for name in names if HUB_ID.fullmatch(name)] == accepted


def test_find_hub_problem_offline_says_the_hub_was_not_asked(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "hub").mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))  # empty: nothing downloaded before
    assert find_hub_problem("meta-llama/Llama-3.1-8B") == "HF_HUB_OFFLINE is set, so the hub was not asked"


def test_find_hub_problem_refuses_ids_the_hub_cannot_have_before_asking(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert find_hub_problem("a//b") == "not a valid hub id"
    # HUB_ID lets "a..b" through (it only rules out paths); the hub's own validation refuses it
    assert HUB_ID.fullmatch("a..b") is not None
    assert find_hub_problem("a..b") == "not a valid hub id"


def test_a_resolved_folder_means_the_same_folder_from_any_working_directory(tmp_path, monkeypatch):
    # adapters record the resolved base; read from elsewhere, a relative one would name another folder or a hub id
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "models" / "tiny").mkdir(parents=True)
    elsewhere.mkdir()
    monkeypatch.chdir(project)
    recorded = resolve("models/tiny")
    monkeypatch.chdir(elsewhere)
    assert resolve("../project/models/tiny") == recorded == str((project / "models/tiny").resolve())
    assert resolve(recorded) == recorded
    assert Path(recorded).is_absolute() and Path(recorded).is_dir()
    # the relative name, read here, is no folder: it would go to the loader as a hub id
    assert resolve("models/tiny") == "models/tiny"
