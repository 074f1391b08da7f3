"""Tiny models and tokenizers built offline, for the demo and the tests.

Nothing here touches the network: the tokenizers are byte-pair models trained in code on
the texts you pass (a second or less), either with `tokenizers` (build_tokenizer) or as a
real SentencePiece model (build_sentencepiece_tokenizer, the kind llama.cpp's converter
accepts), and the models are random-weight configs of real architectures, small enough
that a CPU trains them in seconds.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0..3, as in Llama's sentencepiece models
# Every printable ASCII character is in the alphabet so that no test text maps to <unk>.
ALPHABET = [chr(c) for c in range(32, 127)] + ["\n"]

# Architecture-specific knobs of the tiny configs; the shared sizes are in build_tiny_model.
TINY_ARCHITECTURES = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2"},  # q/k/v projections carry biases: exercises LoRA over biased linears
    # Fused qkv_proj and gate_up_proj; its transformers tokenizer class reads tokenizer.json as it is, so a
    # SentencePiece tokenizer keeps its layout (Qwen2's class rebuilds a byte-level one from the vocabulary).
    "phi3": {"model_type": "phi3"},
}


def build_tokenizer(texts: Iterable[str], out_dir: str | Path, vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """Train a small byte-pair tokenizer on ``texts`` and save it as a Hugging Face tokenizer.

    pad is id 0 and eos id 3, so padding never silently equals EOS.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=ALPHABET, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


def build_sentencepiece_tokenizer(
    texts: Iterable[str],
    out_dir: str | Path,
    vocab_size: int = 256,
    user_defined_symbols: Iterable[str] = (),
    control_symbols: Iterable[str] = (),
    split_by_whitespace: bool = True,
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Train a SentencePiece BPE model on ``texts`` and save it with its Hugging Face files.

    Writes ``tokenizer.model`` (what llama.cpp's converter reads) beside ``tokenizer.json`` and
    ``tokenizer_config.json`` (what transformers reads), which encode every text to the same ids.
    Special ids are those of SPECIAL_TOKENS and build_tiny_model's config: pad 0, unk 1, bos 2
    (added in front of every text), eos 3; ``control_symbols`` (chat markers such as
    ``<|im_end|>``) follow as special tokens, then ``user_defined_symbols``.

    The settings are Llama's, for the reasons llama.cpp needs them: BPE (llama.cpp's
    SentencePiece tokenizer merges by piece score, which is BPE; a unigram model would
    tokenize differently there), no normalization, a word-start mark in front of the text and
    after every special token written in it (as llama.cpp tokenizes), whitespace kept as it is.
    Every character of ALPHABET is in the vocabulary, so no test text maps to <unk>.

    Args:
        user_defined_symbols: Pieces SentencePiece never merges with anything (each stays one token).
        split_by_whitespace: False lets pieces span words, so a fixed template costs few tokens.
        chat_template: Saved with the tokenizer when given.
    """
    import io

    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    user_defined = list(user_defined_symbols)
    controls = list(control_symbols)
    pad, unk, bos, eos = SPECIAL_TOKENS
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        hard_vocab_limit=False,  # a small corpus may hold fewer merges than asked for
        pad_id=0, unk_id=1, bos_id=2, eos_id=3, pad_piece=pad, unk_piece=unk, bos_piece=bos, eos_piece=eos,
        control_symbols=controls,
        user_defined_symbols=user_defined,
        # The space is SentencePiece's word-start mark, not a character it takes here.
        required_chars="".join(c for c in ALPHABET if c != " " and c not in user_defined),
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        allow_whitespace_only_pieces=True,
        split_by_whitespace=split_by_whitespace,
        max_sentencepiece_length=64,
        num_threads=1,
        minloglevel=2,
    )  # fmt: skip
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())
    tokenizer = convert_sentencepiece_bpe(out_dir / "tokenizer.model", controls)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(str(out_dir))
    # transformers 5.24's LlamaTokenizer rebuilds its pre-tokenizer when loaded and does not save
    # `legacy`, so a reload (and every save after it, such as the adapter's) would put the word-start
    # mark at the start of the text only. TokenizersBackend, its generic class, runs tokenizer.json as saved.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "TokenizersBackend"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return AutoTokenizer.from_pretrained(str(out_dir))


def convert_sentencepiece_bpe(model_file: Path, control_symbols: list[str]) -> LlamaTokenizer:
    """The Hugging Face tokenizer of a SentencePiece BPE model: its pieces as the vocabulary, merges by piece score.

    SentencePiece BPE merges, among adjacent pieces, the pair whose concatenation scores
    highest; a Hugging Face BPE merges the pair of lowest rank. Ranking every split of every
    piece by that piece's score makes the two agree. Built here from the sentencepiece
    library alone because transformers 5.24 reads a ``tokenizer.model`` through protobuf,
    which qlora-lite does not depend on; and user-defined pieces stay plain vocabulary (no
    merge contains them), where transformers' converter would make them added tokens, split
    out of the text before the word-start mark is placed.
    """
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    ranked = []
    for piece, index in vocab.items():
        if sp.is_control(index) or sp.is_unknown(index):
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-sp.get_score(index), vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]
    pad, unk, bos, eos = SPECIAL_TOKENS
    # legacy: the word-start mark goes in front of every piece of text between special tokens
    # (Metaspace prepend_scheme "always"), as SentencePiece encodes each piece and as llama.cpp
    # does (it adds a space after every special token); "first" would differ after `<|im_start|>`.
    return LlamaTokenizer(
        vocab=vocab, merges=merges, unk_token=unk, bos_token=bos, eos_token=eos, pad_token=pad,
        add_bos_token=True, add_eos_token=False, extra_special_tokens=control_symbols, legacy=True, add_prefix_space=True,
    )  # fmt: skip


def build_tiny_model(
    out_dir: str | Path,
    architecture: str = "llama",
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    max_position_embeddings: int = 512,
    seed: int = 0,
    initializer_range: float = 0.02,
    max_shard_size: str | None = None,
    tie_word_embeddings: bool = False,
) -> torch.nn.Module:
    """Build a random-weight causal LM of a real architecture and save it (fp32 safetensors)."""
    if architecture not in TINY_ARCHITECTURES:
        raise ValueError(f"unknown tiny architecture {architecture!r}; choose one of {sorted(TINY_ARCHITECTURES)}")
    spec = dict(TINY_ARCHITECTURES[architecture])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,  # small real models (Llama-3.2-1B, Qwen2.5-1.5B) tie them
        initializer_range=initializer_range,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), **kwargs)
    return model
