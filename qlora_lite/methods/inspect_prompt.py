"""`qlora-lite inspect-prompt`: the vocabulary tokens nearest to each virtual token of a soft prompt.

Soft prompts are not words, but the vocabulary tokens nearest to each virtual token (cosine
similarity) give a hint of what it learned. ``inspect_prompt`` reads only the base's input-embedding
matrix from its safetensors files to show them, without loading the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ModelConfig
from ..errors import PromptTuningError
from ..quant import load_tokenizer
from ..safetensors_io import SAFE_INDEX_NAME, read_header, read_tensor
from .folder import find_base_model
from .prompt_tuning import read_prompt_config, read_soft_prompt

# Input-embedding tensor names in Hugging Face checkpoints: Llama, Mistral, Qwen, Gemma, Phi-3
# (embed_tokens), GPT-2 (wte), BLOOM / Falcon (word_embeddings), GPT-NeoX / Pythia (embed_in).
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


@torch.no_grad()
def nearest_tokens(prompt: torch.Tensor, embeddings: torch.Tensor, top_k: int, chunk_rows: int = 32768) -> tuple[torch.Tensor, torch.Tensor]:
    """The top_k vocabulary rows nearest to each virtual token by cosine similarity.

    Args:
        prompt: (n, H) soft prompt.
        embeddings: (V, H) input-embedding matrix, any float dtype.
        top_k: Neighbours per virtual token (at most V).
        chunk_rows: Vocabulary rows compared at a time, so a 128k x 4096 bf16 matrix is never
            copied to fp32 whole.

    Returns:
        (similarities (n, k) float32, best first; ids (n, k) int64).
    """
    if top_k < 1:
        raise PromptTuningError(f"--top-k must be at least 1, got {top_k}")
    top_k = min(top_k, embeddings.shape[0])
    unit_prompt = F.normalize(prompt.float(), dim=-1)  # (n, H)
    best_sims = torch.empty(prompt.shape[0], 0)
    best_ids = torch.empty(prompt.shape[0], 0, dtype=torch.long)
    for start in range(0, embeddings.shape[0], chunk_rows):
        unit_rows = F.normalize(embeddings[start : start + chunk_rows].float(), dim=-1)  # (c, H)
        sims = unit_prompt @ unit_rows.T  # (n, c)
        ids = torch.arange(start, start + unit_rows.shape[0]).expand_as(sims)
        best_sims, order = torch.cat((best_sims, sims), dim=1).topk(min(top_k, best_sims.shape[1] + sims.shape[1]), dim=1)
        best_ids = torch.cat((best_ids, ids), dim=1).gather(1, order)
    return best_sims, best_ids


def inspect_prompt(
    adapter_dir: str | Path, top_k: int = 5, base: str | None = None, allow_pickle: bool = False
) -> list[list[tuple[str, int, float]]]:
    """For each virtual token, its top_k nearest vocabulary tokens as (text, id, cosine similarity).

    The base's input-embedding matrix is read straight from its safetensors files (the model is
    not loaded); the tokenizer is the adapter folder's when training saved it there, else the base's.

    Args:
        adapter_dir: A PROMPT_TUNING adapter folder.
        top_k: Neighbours per virtual token.
        base: Base model folder (default: the adapter's base_model_name_or_path).

    Raises:
        PromptTuningError: Not a soft prompt, base not found locally, or made for another base.
    """
    adapter_dir = Path(adapter_dir)
    _, raw = read_prompt_config(adapter_dir)
    _, prompt = read_soft_prompt(adapter_dir, allow_pickle=allow_pickle)
    model_dir = resolve_local_model_dir(find_base_model(adapter_dir, raw, base))
    embeddings = read_input_embeddings(model_dir, prompt.shape[1])
    tokenizer_dir = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else model_dir
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(model_dir)), str(tokenizer_dir))
    # Checkpoints often pad the embedding matrix past the vocabulary (to a multiple of 64 or
    # 128); those rows are no token, so they are never shown as a neighbour.
    vocab = min(len(tokenizer), embeddings.shape[0])
    sims, ids = nearest_tokens(prompt, embeddings[:vocab], top_k)
    return [[(decode_token(tokenizer, i), i, s) for i, s in zip(row_ids.tolist(), row_sims.tolist())] for row_ids, row_sims in zip(ids, sims)]


def decode_token(tokenizer: Any, token_id: int) -> str:
    """One token's text with its leading space kept.

    Decoding an id alone drops a sentencepiece token's space ('▁the' -> 'the'), which would
    make ' the' and 'the' look alike; decoded after a reference token, the space survives.
    """
    reference = tokenizer("a", add_special_tokens=False)["input_ids"][:1]
    before = tokenizer.decode(reference, clean_up_tokenization_spaces=False)
    both = tokenizer.decode(reference + [token_id], clean_up_tokenization_spaces=False)
    return both[len(before) :] if reference and both.startswith(before) else tokenizer.decode([token_id])


def resolve_local_model_dir(name_or_path: str) -> Path:
    """A local folder for the base: the path itself, or a hub id's snapshot already in the local cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, local_files_only=True))
    except Exception as err:  # noqa: BLE001 - hub lookups fail in many types; all mean "not here"
        raise PromptTuningError(
            f"base model {name_or_path!r} is not a local folder nor in the Hugging Face cache ({type(err).__name__}); "
            "inspect-prompt reads the base's embedding matrix from disk: download the model and pass --base DIR"
        ) from err


def read_input_embeddings(model_dir: str | Path, token_dim: int) -> torch.Tensor:
    """The base's input-embedding matrix (V, H), read alone from its safetensors files (no model load)."""
    model_dir = Path(model_dir)
    index = model_dir / SAFE_INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else sorted(p.name for p in model_dir.glob("*.safetensors"))
    if not files:
        raise PromptTuningError(f"{model_dir} holds no safetensors weights; inspect-prompt reads the base's embedding matrix from them: pass --base DIR of the saved model")
    found = []  # (name, file, shape)
    for file in files:
        entries, _ = read_header(model_dir / file)
        found += [(e.name, file, e.shape) for e in entries if e.name.endswith(EMBEDDING_SUFFIXES) and len(e.shape) == 2]
    if not found:
        raise PromptTuningError(
            f"{model_dir} has no input-embedding tensor (a name ending in {', '.join(EMBEDDING_SUFFIXES)}); "
            "pass --base DIR with the model the soft prompt was trained on"
        )
    fitting = sorted((f for f in found if f[2][1] == token_dim), key=lambda f: (len(f[0]), f[0]))
    if not fitting:
        name, _, shape = found[0]
        raise PromptTuningError(
            f"the soft prompt has token_dim {token_dim} but {model_dir}'s embeddings ({name}) have hidden size {shape[1]}: "
            "it was made for a different base model (pass --base DIR with the model it was trained on)"
        )
    name, file, _ = fitting[0]
    return read_tensor(model_dir / file, name)
