"""Shared fixtures: tiny random-weight models of two architectures and a locally trained tokenizer."""

from __future__ import annotations

import os

# Tests never reach the hub: set before transformers / huggingface_hub read it at import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# Tiny models train fastest on one thread, and the CLI subprocesses of the tests inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from qlora_lite.tiny import build_tiny_model, build_tokenizer  # noqa: E402

TOKENIZER_TEXTS = [
    "Below is an instruction that describes a task. Write a response that completes the request.",
    "### Instruction:\nName a colour.\n\n### Response:\nBlue is a colour.",
    "the quick brown fox jumps over the lazy dog 0123456789",
    "user: hello there\nassistant: hi! how can I help you today?",
] * 20


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(TOKENIZER_TEXTS, path, vocab_size=256)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))


def _save_tiny(tmp_path_factory, tokenizer_dir, architecture: str):
    path = tmp_path_factory.mktemp(f"tiny-{architecture}")
    # initializer_range 0.1 (not HF's 0.02): random weights large enough that a LoRA update moves
    # the logits within a few steps, so training tests can assert a loss drop in seconds.
    # max_shard_size: saved in 3 shards plus an index, so merge is tested shard by shard.
    build_tiny_model(path, architecture=architecture, vocab_size=256, initializer_range=0.1, max_shard_size="200KB")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer_dir):
    """A saved 2-layer Llama (hidden 64, vocab 256, fp32 weights in 3 shards) with its tokenizer."""
    return _save_tiny(tmp_path_factory, tokenizer_dir, "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, tokenizer_dir):
    """A saved 2-layer Qwen2 (biased q/k/v projections) with its tokenizer."""
    return _save_tiny(tmp_path_factory, tokenizer_dir, "qwen2")


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model_dir(request):
    """Each test using this runs once per architecture."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory):
    """Tokenized data is cached on disk; the tests' cache lives in a temporary folder, never in ~/.cache."""
    import os

    os.environ["QLORA_LITE_DATA_CACHE"] = str(tmp_path_factory.mktemp("data-cache"))
