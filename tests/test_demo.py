"""The offline demo: its data is what the repo ships, its base is built once and cached atomically."""

from __future__ import annotations

import json
from pathlib import Path

from qlora_lite.config import load_config
from qlora_lite.demo import MARKER_FILE, DemoBaseSpec, apply_rot13, ensure_demo_base, make_demo_records, write_demo_data

REPO = Path(__file__).parent.parent
# A base small enough to build in a second: the cache logic is what is tested here.
SMALL = DemoBaseSpec(hidden_size=32, intermediate_size=64, pretrain_steps=4, batch_size=2, seq_len=32, warmup_steps=1)


def test_rot13_and_held_out_words():
    assert apply_rot13("HELLO") == "URYYB" and apply_rot13(apply_rot13("QWERT")) == "QWERT"
    train, evaluation = make_demo_records()
    assert len(train) == 1200 and len(evaluation) == 200
    train_words = {r["input"] for r in train} | {r["output"] for r in train}
    assert not train_words & {r["input"] for r in evaluation}
    assert all(r["output"] == apply_rot13(r["input"]) for r in train + evaluation)


def test_committed_demo_data_is_what_the_generator_writes(tmp_path):
    train, evaluation = write_demo_data(tmp_path)
    assert train.read_bytes() == (REPO / "recipes/data/tiny-demo/train.jsonl").read_bytes()
    assert evaluation.read_bytes() == (REPO / "recipes/data/tiny-demo/eval.jsonl").read_bytes()


def test_demo_recipe_points_at_the_demo_base_and_data():
    cfg = load_config(REPO / "recipes/tiny-demo.yaml")
    assert cfg.model.name_or_path == "demo:tiny"
    assert cfg.quant.load_in_4bit and cfg.quant.quant_type == "nf4" and cfg.quant.double_quant
    assert Path(cfg.data.path).is_file() and Path(cfg.data.eval_path).is_file()
    assert cfg.train.exact_match_examples >= 50


def test_base_is_built_once_and_an_unfinished_build_is_ignored(tmp_path, capsys):
    first = ensure_demo_base(tmp_path, SMALL)
    marker = json.loads((first / MARKER_FILE).read_text())
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert marker["num_params"] > 0
    assert "building the demo base" in capsys.readouterr().out

    assert ensure_demo_base(tmp_path, SMALL) == first
    assert "using the cached demo base" in capsys.readouterr().out

    (first / MARKER_FILE).unlink()  # as if the build had been killed before its last write
    assert ensure_demo_base(tmp_path, SMALL) == first
    assert "building the demo base" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind
