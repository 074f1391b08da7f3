"""Tests for qlora_lite.tiny: the tiny random models and tokenizers built offline.

The fixtures, the demo and the GGUF export all trust these builders, so the tests pin
exact parameter counts, shard layouts, special-token ids and token ids rather than "it runs".
"""

import json
import random

import pytest
import sentencepiece
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qlora_lite.tiny import (
    SPECIAL_TOKENS,
    TINY_ARCHITECTURES,
    build_sentencepiece_tokenizer,
    build_tiny_model,
    build_tokenizer,
)

# Biases each architecture adds to the attention projections; a new entry in TINY_ARCHITECTURES
# must be added here, so its parameter count is derived by hand rather than trusted.
QKV_BIAS = {"llama": False, "qwen2": True, "phi3": False}

# Random words over a few letters: enough distinct merges for a 256-piece BPE vocabulary,
# and a corpus small enough that either tokenizer trains in a fraction of a second.
_rng = random.Random(0)
_WORDS = ["".join(_rng.choice("etaoinshrdlcumwfgypbvk") for _ in range(_rng.randint(2, 7))) for _ in range(120)]
TEXTS = [" ".join(_rng.choice(_WORDS) for _ in range(_rng.randint(3, 8))) for _ in range(300)]
# Training words plus characters seen only through the alphabet (capitals, digits, punctuation, newline).
SENTENCES = [TEXTS[0], " ".join(_WORDS[:5]), "Hello, World! 123\nok", "a  b c.", "x\n\ny"]


def expected_parameter_count(config, architecture):
    """A Llama-style decoder's parameters from its config (Phi3 fuses q/k/v and gate/up: same count)."""
    hidden, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    head_dim = hidden // config.num_attention_heads
    q_out = config.num_attention_heads * head_dim
    kv_out = config.num_key_value_heads * head_dim
    attention = hidden * q_out + 2 * hidden * kv_out + q_out * hidden  # q, k, v, o
    if QKV_BIAS[architecture]:
        attention += q_out + 2 * kv_out
    mlp = 3 * hidden * inter  # gate, up, down
    norms = 2 * hidden  # input and post-attention RMSNorm
    lm_head = 0 if config.tie_word_embeddings else vocab * hidden
    return vocab * hidden + config.num_hidden_layers * (attention + mlp + norms) + hidden + lm_head


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_tiny_model_saves_sharded_and_reloads_with_the_derived_parameter_count(tmp_path, architecture):
    build_tiny_model(tmp_path, architecture=architecture, vocab_size=256, initializer_range=0.1, max_shard_size="200KB")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    config = model.config

    assert config.model_type == TINY_ARCHITECTURES[architecture]["model_type"] == architecture
    assert type(model).__name__ == config.architectures[0]
    assert config.vocab_size == 256
    assert tuple(model.get_input_embeddings().weight.shape) == (256, 64)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 2, 128)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert (config.pad_token_id, config.bos_token_id, config.eos_token_id) == (0, 2, 3)
    expected = expected_parameter_count(config, architecture)
    # 2 layers of hidden 64: 106,816 parameters, plus 2 * (64 + 32 + 32) q/k/v biases for Qwen2.
    assert expected == (107_072 if QKV_BIAS[architecture] else 106_816)
    assert sum(p.numel() for p in model.parameters()) == expected

    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(shards) > 1
    assert shards == sorted(set(index["weight_map"].values()))
    assert set(index["weight_map"]) == set(model.state_dict())
    assert index["metadata"]["total_size"] == 4 * expected  # fp32 on disk


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_tied_embeddings_drop_exactly_the_lm_head_parameters(tmp_path, architecture):
    model = build_tiny_model(tmp_path, architecture=architecture, tie_word_embeddings=True)
    assert model.config.tie_word_embeddings is True
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    untied = expected_parameter_count(model.config, architecture) + 256 * 64
    assert sum(p.numel() for p in model.parameters()) == untied - 256 * 64


def test_same_seed_gives_bitwise_identical_weights_whatever_the_global_rng_state(tmp_path):
    first = build_tiny_model(tmp_path / "a", seed=7)
    # build_tiny_model seeds torch itself, so disturbing the global generator must not matter.
    torch.manual_seed(12345)
    torch.rand(1000)
    second = build_tiny_model(tmp_path / "b", seed=7)
    other = build_tiny_model(tmp_path / "c", seed=8)

    a, b, c = first.state_dict(), second.state_dict(), other.state_dict()
    assert list(a) == list(b) == list(c)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A different seed really changes the random matrices (norm weights are ones either way).
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])
    assert torch.equal(a["model.norm.weight"], torch.ones(64))


def test_bpe_tokenizer_reloads_with_llama_special_ids_and_round_trips_text(tmp_path):
    build_tokenizer(TEXTS, tmp_path, vocab_size=256)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))

    assert SPECIAL_TOKENS == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == SPECIAL_TOKENS
    assert (tokenizer.pad_token, tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == tuple(SPECIAL_TOKENS)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2, 3)
    assert len(tokenizer) == 256
    for text in SENTENCES:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert 1 not in ids  # every character is in the alphabet, so nothing maps to <unk>
        assert tokenizer.decode(ids) == text


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sentencepiece")
    build_sentencepiece_tokenizer(TEXTS, path, vocab_size=200)
    return path


def test_sentencepiece_model_is_written_beside_the_hugging_face_files(sentencepiece_dir):
    names = {p.name for p in sentencepiece_dir.iterdir()}
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= names


def test_sentencepiece_and_hugging_face_vocabularies_agree_piece_by_piece(sentencepiece_dir):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    vocab = json.loads((sentencepiece_dir / "tokenizer.json").read_text())["model"]["vocab"]
    tokenizer = AutoTokenizer.from_pretrained(str(sentencepiece_dir))

    assert sp.get_piece_size() == len(vocab) == len(tokenizer) == 200
    assert vocab == {sp.id_to_piece(i): i for i in range(200)}
    assert [sp.id_to_piece(i) for i in range(4)] == SPECIAL_TOKENS
    assert (sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2, 3)
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2, 3)


def test_sentencepiece_and_hugging_face_encode_texts_to_the_same_ids(sentencepiece_dir):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(str(sentencepiece_dir))

    # Both put the word-start mark "▁" in front of the text (SentencePiece's add_dummy_prefix).
    assert sp.encode("the", out_type=str)[0].startswith("▁")
    for text in SENTENCES + TEXTS[:20]:
        ids = sp.encode(text)
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == ids
        # The Hugging Face side adds bos (id 2) in front and no eos, as Llama does.
        assert tokenizer(text)["input_ids"] == [2] + ids
        assert 1 not in ids
        assert sp.decode(ids) == tokenizer.decode(ids) == text


@pytest.mark.xfail(strict=True, reason="tiny.py bug: Metaspace adds no word-start mark when the text already starts with a space")
def test_a_text_starting_with_a_space_encodes_the_same_in_both(sentencepiece_dir):
    # SentencePiece prefixes "▁" to every text, so " the" is "▁" + "▁the"; tokenizers' Metaspace
    # (prepend_scheme "always") skips the prefix when the text already starts with "▁".
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_dir / "tokenizer.model"))
    tokenizer = AutoTokenizer.from_pretrained(str(sentencepiece_dir))
    assert tokenizer(" the", add_special_tokens=False)["input_ids"] == sp.encode(" the")


def test_control_then_user_defined_symbols_follow_the_special_ids(tmp_path):
    controls, user_defined = ["<|im_start|>", "<|im_end|>"], ["Q"]
    tokenizer = build_sentencepiece_tokenizer(TEXTS, tmp_path, vocab_size=200, control_symbols=controls, user_defined_symbols=user_defined)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))

    expected = SPECIAL_TOKENS + controls + user_defined
    assert [sp.id_to_piece(i) for i in range(7)] == tokenizer.convert_ids_to_tokens(list(range(7))) == expected
    assert set(tokenizer.all_special_ids) == {0, 1, 2, 3, 4, 5}  # user-defined pieces stay plain vocabulary
    # A user-defined piece is never merged, and a control marker stays one token in the text.
    assert tokenizer("Quiz", add_special_tokens=False)["input_ids"] == sp.encode("Quiz")
    assert sp.encode("Quiz", out_type=str)[1] == "Q"
    ids = tokenizer("<|im_start|>user<|im_end|>", add_special_tokens=False)["input_ids"]
    assert (ids[0], ids[-1]) == (4, 5)
