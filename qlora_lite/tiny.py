"""Tiny models and tokenizers built offline, for the demo and the tests.

Nothing here touches the network: the tokenizer is a byte-pair model trained in code on
the texts you pass (a second or less), and the models are random-weight configs of real
architectures, small enough that a CPU trains them in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<unk>", "<s>", "</s>"]  # ids 0..3, as in Llama's sentencepiece models
# Every printable ASCII character is in the alphabet so that no test text maps to <unk>.
ALPHABET = [chr(c) for c in range(32, 127)] + ["\n"]

# Architecture-specific knobs of the tiny configs; the shared sizes are in build_tiny_model.
TINY_ARCHITECTURES = {
    "llama": {"model_type": "llama"},
    "qwen2": {"model_type": "qwen2"},  # q/k/v projections carry biases: exercises LoRA over biased linears
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
