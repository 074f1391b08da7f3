"""The offline demo: its data is what the repo ships, its base is built once and cached atomically."""

from __future__ import annotations

import json
import random
from pathlib import Path

import sentencepiece as spm
from transformers import AutoTokenizer

from qlora_lite.config import load_recipe
from qlora_lite.demo import (
    LETTERS,
    MARKER_FILE,
    PRETRAIN_FORMATS,
    DemoBaseSpec,
    apply_rot13,
    build_demo_tokenizer,
    ensure_demo_base,
    format_demo_prompt,
    make_demo_records,
    make_pretraining_text,
    write_demo_data,
)

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
    cfg = load_recipe(REPO / "recipes/tiny-demo.yaml")
    assert cfg.model.name_or_path == "demo:tiny"
    assert cfg.quant.load_in_4bit and cfg.quant.quant_type == "nf4" and cfg.quant.double_quant
    assert Path(cfg.data.path).is_file() and Path(cfg.data.eval_path).is_file()
    assert cfg.train.exact_match_examples >= 50


def test_base_is_built_once_and_an_unfinished_build_is_ignored(tmp_path, capsys):
    first = ensure_demo_base(tmp_path, SMALL)
    marker = json.loads((first / MARKER_FILE).read_text())
    assert (first / "model.safetensors").is_file() and (first / "tokenizer.json").is_file()
    assert (first / "tokenizer.model").is_file()  # what llama.cpp's converter reads
    assert marker["num_params"] > 0
    config = json.loads((first / "config.json").read_text())
    generation = json.loads((first / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(first))
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert config[key] == generation[key] == getattr(tok, key), key
    assert "building the demo base" in capsys.readouterr().out

    assert ensure_demo_base(tmp_path, SMALL) == first
    assert "using the cached demo base" in capsys.readouterr().out

    (first / MARKER_FILE).unlink()  # as if the build had been killed before its last write
    assert ensure_demo_base(tmp_path, SMALL) == first
    assert "building the demo base" in capsys.readouterr().out
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary folder left behind


def test_demo_tokenizer_is_sentencepiece_and_transformers_agrees_with_it(tmp_path):
    build_demo_tokenizer(tmp_path)
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == sp.get_piece_size() == 256
    # One set of special ids everywhere (llama.cpp reads tokenizer.model, transformers the json files).
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    train, evaluation = make_demo_records()
    texts = [format_demo_prompt(r) + r["output"] for r in train + evaluation] + [r["output"] for r in evaluation]
    texts += [make_pretraining_text(random.Random(seed), 10, set()) for seed in range(50)]
    mismatched = [t for t in texts if tok(t)["input_ids"] != [sp.bos_id(), *sp.encode(t)]]
    assert not mismatched, f"{len(mismatched)} of {len(texts)} texts, first: {mismatched[0]!r}"


def test_demo_tokenizer_never_merges_a_task_letter(tmp_path):
    tok = build_demo_tokenizer(tmp_path)
    pieces = tok.get_vocab()
    assert not [p for p in pieces if len(p) > 1 and any(c in LETTERS for c in p)]
    assert not [p for p in pieces if len(p) > 1 and p.endswith("\u2581")]  # the space before an answer is its own token
    # So an answer is the word-start mark and five letters in every format, and alone (as the data module tokenizes it).
    for layout in PRETRAIN_FORMATS:
        tokens = tok.convert_ids_to_tokens(tok(layout.format(word="QWERT", answer="DJREG"), add_special_tokens=False)["input_ids"])
        answer = tokens.index("D")
        assert tokens[answer - 1 : answer + 5] == ["\u2581", *"DJREG"], layout
    assert tok.convert_ids_to_tokens(tok("DJREG", add_special_tokens=False)["input_ids"]) == ["\u2581", *"DJREG"]
    prompt = format_demo_prompt({"instruction": "Apply rot13 to this word.", "input": "QWERT"})
    assert len(tok(prompt)["input_ids"]) <= 40  # pieces span the template's words: the longest example stays well under max_seq_len 64
