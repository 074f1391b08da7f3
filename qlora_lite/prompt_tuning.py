"""Prompt tuning: a trainable soft prompt prepended to every input of a frozen base model.

    inputs_embeds = [P ; E(x)]        P: (n, H) trainable, E: the base's frozen input embeddings

P holds n "virtual tokens" that live anywhere in the embedding space (Lester et al., 2021).
Every part of the base stays frozen; only P gets gradients. The attention mask is extended
with n ones and the labels with n ignored positions, so the loss is over the real targets only.

Everything here follows PEFT's PeftModelForCausalLM prompt-learning path (peft 0.21): the same
inputs_embeds, mask and labels reach the base, the soft prompt is cast to the embeddings'
dtype, the initial prompt for TEXT / SAMPLE_VOCAB / RANDOM is drawn the way PEFT draws it,
and the folder is PEFT's PROMPT_TUNING format (adapter_config.json plus
adapter_model.safetensors holding one tensor, ``prompt_embeddings`` of shape (n, H)). PEFT
loads ours and we load PEFT's.

Soft prompts are not words, but the vocabulary tokens nearest to each virtual token (cosine
similarity) give a hint of what it learned: ``inspect_prompt`` reads only the base's
embedding matrix from its safetensors files to show them, without loading the model.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from .adapters import CONFIG_NAME, WEIGHTS_NAME, AdapterError, find_base_model, read_adapter_json, read_adapter_weights
from .config import ConfigError, ModelConfig, PromptConfig, RecipeConfig
from .data import IGNORE_INDEX
from .method_entry import Method
from .quant import DTYPES, load_tokenizer
from .shards import SAFETENSORS_DTYPES, ShardError, read_header

PEFT_TYPE = "PROMPT_TUNING"
PROMPT_KEY = "prompt_embeddings"
"""The one tensor of a PEFT prompt-tuning file: the soft prompt, (num_virtual_tokens, token_dim)."""
PEFT_INITS = {"text": "TEXT", "sample_vocab": "SAMPLE_VOCAB", "random": "RANDOM"}
# Input-embedding tensor names in Hugging Face checkpoints: Llama, Mistral, Qwen, Gemma, Phi-3
# (embed_tokens), GPT-2 (wte), BLOOM / Falcon (word_embeddings), GPT-NeoX / Pythia (embed_in).
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
SAFE_INDEX_NAME = "model.safetensors.index.json"
PACKING_MESSAGE = (
    "the batch carries position_ids without an attention_mask, which is how packed batches (data.packing: true) "
    "arrive; prompt tuning prepends the soft prompt to each row and a packed row holds several examples: "
    "set data.packing: false for prompt tuning"
)


class PromptTuningError(AdapterError):
    """A soft prompt cannot be built, read or used as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# The model: a frozen base with the soft prompt in front
# ---------------------------------------------------------------------------------------------


class SoftPromptModel(nn.Module):
    """A frozen causal LM whose every input starts with a soft prompt: inputs_embeds = [P ; E(x)].

    The base is kept as ``base_model`` and is not changed by wrapping (freezing it is
    ``apply_prompt_tuning``'s job). Outputs cover the n virtual tokens too: logits are
    (B, n + T, V), as PEFT returns them.
    """

    # Read through to the base, so the training loop, generation helpers and accelerate see
    # the wrapper as the model it wraps (accelerate keeps a 4-bit model where it was loaded by
    # reading is_loaded_in_4bit / hf_device_map). A name the base lacks stays missing here too.
    PASSED_THROUGH = frozenset({"config", "generation_config", "hf_device_map", "is_loaded_in_4bit", "is_loaded_in_8bit", "dtype"})

    def __init__(self, base_model: nn.Module, prompt: torch.Tensor, trainable: bool = True) -> None:
        """Wrap base_model with the soft prompt (n, H); the tensor becomes the ``prompt`` parameter."""
        super().__init__()
        if prompt.dim() != 2:
            raise PromptTuningError(f"a soft prompt is (num_virtual_tokens, hidden), got shape {tuple(prompt.shape)}")
        self.base_model = base_model
        self.prompt = nn.Parameter(prompt, requires_grad=trainable)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in SoftPromptModel.PASSED_THROUGH:
                return getattr(self.base_model, name)
            raise

    @property
    def num_virtual_tokens(self) -> int:
        return self.prompt.shape[0]

    @property
    def device(self) -> torch.device:
        return self.base_model.get_input_embeddings().weight.device

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    def embed_with_prompt(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[P ; E(input_ids)] for every row: (B, T) ids -> (B, n + T, H) in the embeddings' dtype."""
        embeds = self.base_model.get_input_embeddings()(input_ids)  # (B, T, H)
        # PEFT casts the (fp32) prompt to the embeddings' dtype: bf16 on a bf16 base, and the
        # gradient flows back through the cast into the fp32 parameter.
        prompt = self.prompt.to(embeds.dtype).unsqueeze(0).expand(embeds.shape[0], -1, -1)  # (B, n, H)
        return torch.cat((prompt, embeds), dim=1)

    def extend_attention_mask(self, attention_mask: torch.Tensor | None, input_ids: torch.Tensor) -> torch.Tensor:
        """The mask with n ones in front (every row attends to the whole soft prompt); all ones when None."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        prefix = attention_mask.new_ones((attention_mask.shape[0], self.num_virtual_tokens))  # (B, n)
        return torch.cat((prefix, attention_mask), dim=1)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """The base's output for [P ; E(input_ids)]; labels get n IGNORE_INDEX positions in front.

        Raises:
            PromptTuningError: A packed batch (position_ids and no attention mask), or no input_ids.
        """
        return self.base_model(**self.build_base_inputs(input_ids, attention_mask, labels, position_ids, **kwargs))

    def build_base_inputs(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """The keyword arguments forward passes to the base: [P ; E(x)] embeddings, the extended mask and labels.

        A method of its own so that the chunked loss (qlora_lite.loss), which runs the base's
        decoder body itself, feeds it exactly what forward would.

        Raises:
            PromptTuningError: A packed batch (position_ids and no attention mask), or no input_ids.
        """
        if input_ids is None:
            raise PromptTuningError("SoftPromptModel needs input_ids (the soft prompt is prepended to their embeddings)")
        if kwargs.get("inputs_embeds") is not None:
            raise PromptTuningError("pass input_ids, not inputs_embeds: SoftPromptModel embeds the ids and prepends the soft prompt itself")
        kwargs.pop("inputs_embeds", None)
        if position_ids is not None:
            if attention_mask is None:
                raise PromptTuningError(PACKING_MESSAGE)
            # PEFT drops position ids for prompt tuning with this warning: they would have to count
            # the virtual tokens too. The base numbers the n + T positions itself.
            warnings.warn("Position ids are not supported for parameter efficient tuning. Ignoring position ids.")
        if labels is not None:
            prefix = labels.new_full((labels.shape[0], self.num_virtual_tokens), IGNORE_INDEX)  # (B, n)
            labels = torch.cat((prefix, labels), dim=1)  # (B, n + T): no loss on the virtual tokens
        return {
            "inputs_embeds": self.embed_with_prompt(input_ids),
            "attention_mask": self.extend_attention_mask(attention_mask, input_ids),
            "labels": labels,
            **kwargs,
        }

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        """Generate after [P ; E(input_ids)]; returns ``cat(input_ids, new_tokens)`` like a plain decoder-only generate.

        The soft prompt is prepended once: the base's KV cache carries it through every later
        step. Callers slice ``[:, input_ids.shape[1]:]`` for the answer, as with any base model.
        """
        if kwargs.get("inputs_embeds") is not None:
            raise PromptTuningError("pass input_ids, not inputs_embeds: SoftPromptModel embeds the ids and prepends the soft prompt itself")
        kwargs.pop("inputs_embeds", None)
        output = self.base_model.generate(
            inputs_embeds=self.embed_with_prompt(input_ids),
            attention_mask=self.extend_attention_mask(attention_mask, input_ids),
            **kwargs,
        )
        # Generating from inputs_embeds alone, transformers returns only the new tokens (B, new).
        if isinstance(output, torch.Tensor):
            return torch.cat((input_ids, output), dim=1)
        output.sequences = torch.cat((input_ids, output.sequences), dim=1)  # return_dict_in_generate=True
        return output


# ---------------------------------------------------------------------------------------------
# Building the soft prompt
# ---------------------------------------------------------------------------------------------


def apply_prompt_tuning(model: nn.Module, cfg: PromptConfig, tokenizer: Any) -> SoftPromptModel:
    """Freeze every base parameter and wrap the model with a fresh, trainable soft prompt.

    Args:
        model: A causal LM (plain or 4-bit), gradient checkpointing already enabled if wanted.
        cfg: Length, initialisation (text, sample_vocab, random) and storage dtype of the prompt.
        tokenizer: Tokenizes ``cfg.init_text`` for the text initialisation.

    Returns:
        The SoftPromptModel to train; its only trainable parameter is ``prompt``.
    """
    model.requires_grad_(False)
    prompt = build_initial_prompt(model.get_input_embeddings(), cfg, tokenizer)
    return SoftPromptModel(model, prompt, trainable=True)


@torch.no_grad()
def build_initial_prompt(embeddings: nn.Module, cfg: PromptConfig, tokenizer: Any) -> torch.Tensor:
    """The starting soft prompt (n, H) in cfg.dtype, drawn as PEFT's PromptEmbedding draws it.

    With the same torch seed and settings, PEFT's PromptTuningConfig gives the same tensor.
    """
    n = cfg.num_virtual_tokens
    if n <= 0:
        raise PromptTuningError(f"prompt.num_virtual_tokens must be a positive integer, got {n}; typical values are 20 to 100")
    weight = embeddings.weight
    hidden = weight.shape[-1]
    # PEFT first builds nn.Embedding(n, H), whose default init is N(0, 1): that is the RANDOM
    # init, and for the other two it still consumes these draws before sampling ids. Drawing
    # them here too keeps "same seed, same prompt" true for SAMPLE_VOCAB.
    prompt = torch.empty(n, hidden).normal_()
    if cfg.init == "sample_vocab":
        ids = torch.randint(0, weight.shape[0], (n,), dtype=torch.long)
        # Through the module, as PEFT does: models that scale embeddings in forward (Gemma) scale these too.
        prompt = embeddings(ids.to(weight.device)).detach().float()
    elif cfg.init == "text":
        ids = tokenize_init_text(cfg.init_text, tokenizer, n)
        prompt = embeddings(torch.tensor(ids, device=weight.device)).detach().float()
    elif cfg.init != "random":
        raise PromptTuningError(f"prompt.init {cfg.init!r} is not one of text, sample_vocab, random")
    return prompt.to(device=weight.device, dtype=DTYPES[cfg.dtype]).clone()


def tokenize_init_text(text: str, tokenizer: Any, num_virtual_tokens: int) -> list[int]:
    """The init text's token ids, repeated and cut to num_virtual_tokens, exactly as PEFT's TEXT init.

    PEFT calls ``tokenizer(init_text)["input_ids"]`` with the tokenizer's default special
    tokens, so a tokenizer that adds BOS (Llama's) puts BOS first, and BOS again at each repeat.
    We do the same, so a PEFT PromptTuningConfig with this text starts from the same prompt.
    """
    ids = tokenizer(text)["input_ids"]
    if not ids:
        raise PromptTuningError(f"prompt.init_text {text!r} tokenizes to no tokens; give some text, or use prompt.init: sample_vocab")
    repeats = math.ceil(num_virtual_tokens / len(ids))
    return (ids * repeats)[:num_virtual_tokens]


# ---------------------------------------------------------------------------------------------
# PEFT's on-disk format
# ---------------------------------------------------------------------------------------------


def build_prompt_peft_config(model: SoftPromptModel, cfg: PromptConfig, base_model_name_or_path: str) -> dict[str, Any]:
    """adapter_config.json content: the keys peft 0.21 writes for PROMPT_TUNING (less peft_version).

    peft_version is left out as in our LoRA configs: PEFT fills it in on load.
    """
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    is_text = cfg.init == "text"
    return {
        "peft_type": PEFT_TYPE,
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": model.num_virtual_tokens,
        "token_dim": model.prompt.shape[1],
        "num_transformer_submodules": 1,
        "num_attention_heads": getattr(text_config, "num_attention_heads", None),
        "num_layers": getattr(text_config, "num_hidden_layers", None),
        "modules_to_save": None,
        "prompt_tuning_init": PEFT_INITS[cfg.init],
        "prompt_tuning_init_text": cfg.init_text if is_text else None,
        # PEFT refuses a TEXT config without a tokenizer; training tokenized with the base's.
        "tokenizer_name_or_path": base_model_name_or_path if is_text else None,
        "tokenizer_kwargs": None,
    }


def save_soft_prompt(model: SoftPromptModel, cfg: PromptConfig, out_dir: str | Path, base_model_name_or_path: str) -> Path:
    """Write the soft prompt and its adapter_config.json to out_dir in PEFT's PROMPT_TUNING format."""
    if not isinstance(model, SoftPromptModel):
        raise PromptTuningError(f"save_soft_prompt needs a SoftPromptModel (from apply_prompt_tuning), got {type(model).__name__}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {PROMPT_KEY: model.prompt.detach().cpu().contiguous()}
    save_file(tensors, str(out_dir / WEIGHTS_NAME), metadata={"format": "pt"})
    config = build_prompt_peft_config(model, cfg, base_model_name_or_path)
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return out_dir


def is_soft_prompt(adapter_dir: str | Path) -> bool:
    """True when the folder's adapter_config.json says peft_type PROMPT_TUNING."""
    return read_adapter_json(adapter_dir).get("peft_type") == PEFT_TYPE


def read_prompt_config(adapter_dir: str | Path) -> tuple[PromptConfig, dict[str, Any]]:
    """Parse a PROMPT_TUNING adapter_config.json into our PromptConfig (plus the raw dict).

    Raises:
        PromptTuningError: Not a prompt-tuning config, or one made for what we do not compute.
    """
    raw = read_adapter_json(adapter_dir)
    path = Path(adapter_dir) / CONFIG_NAME
    if raw.get("peft_type") != PEFT_TYPE:
        raise PromptTuningError(
            f"{path}: peft_type is {raw.get('peft_type')!r}, not {PEFT_TYPE}: the folder is not a soft prompt "
            "(LoRA adapters load with method lora / load_adapter)"
        )
    if raw.get("task_type") not in ("CAUSAL_LM", None):
        raise PromptTuningError(f"{path}: task_type is {raw['task_type']!r}; qlora-lite runs soft prompts for causal LMs only (task_type CAUSAL_LM)")
    if raw.get("num_transformer_submodules") not in (1, None):
        raise PromptTuningError(
            f"{path}: num_transformer_submodules is {raw['num_transformer_submodules']}; a causal LM's soft prompt has 1 "
            "(2 is for encoder-decoder models)"
        )
    n = raw.get("num_virtual_tokens")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise PromptTuningError(f"{path}: num_virtual_tokens must be a positive integer, got {n!r}; the file is corrupt, re-save the adapter")
    init = {peft: ours for ours, peft in PEFT_INITS.items()}.get(raw.get("prompt_tuning_init"), "random")
    cfg = PromptConfig(num_virtual_tokens=n, init=init, init_text=raw.get("prompt_tuning_init_text") or "")
    return cfg, raw


def read_soft_prompt(adapter_dir: str | Path, allow_pickle: bool = False) -> tuple[PromptConfig, torch.Tensor]:
    """The folder's PromptConfig and soft prompt (n, H), in the dtype it was saved in.

    Raises:
        PromptTuningError / AdapterError: Missing, corrupt or inconsistent files, or not a soft prompt.
    """
    cfg, raw = read_prompt_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir, allow_pickle=allow_pickle)
    if PROMPT_KEY not in weights:
        raise PromptTuningError(
            f"{Path(adapter_dir) / WEIGHTS_NAME} holds no {PROMPT_KEY!r} tensor (found {sorted(weights)[:4]}); "
            "it is not a soft prompt written by PEFT or qlora-lite, re-save the adapter"
        )
    prompt = weights[PROMPT_KEY]
    want = (cfg.num_virtual_tokens, raw.get("token_dim", prompt.shape[-1]))
    if tuple(prompt.shape) != want:
        raise PromptTuningError(
            f"{adapter_dir}: {PROMPT_KEY} has shape {tuple(prompt.shape)} but adapter_config.json says "
            f"num_virtual_tokens x token_dim = {want}; the folder is inconsistent, re-save the adapter"
        )
    if prompt.dtype not in DTYPES.values():
        prompt = prompt.float()
    cfg.dtype = next(name for name, dtype in DTYPES.items() if dtype == prompt.dtype)
    return cfg, prompt


def check_prompt_fits(model: nn.Module, prompt: torch.Tensor) -> None:
    """Refuse a soft prompt whose width is not this base's hidden size."""
    hidden = model.get_input_embeddings().weight.shape[-1]
    if prompt.shape[-1] != hidden:
        raise PromptTuningError(
            f"the soft prompt has token_dim {prompt.shape[-1]} but this base's embeddings have hidden size {hidden}: "
            "it was made for a different base model (check base_model_name_or_path in adapter_config.json, or pass --base)"
        )


def load_soft_prompt(model: nn.Module, adapter_dir: str | Path, trainable: bool = False, allow_pickle: bool = False) -> SoftPromptModel:
    """Wrap a loaded base with the soft prompt of a PEFT PROMPT_TUNING folder (ours or PEFT's).

    The base is frozen; the prompt keeps its saved dtype and trains only when trainable
    (``fit`` resumes from a checkpoint this way). Nothing is changed if the folder does not fit.
    """
    _, prompt = read_soft_prompt(adapter_dir, allow_pickle=allow_pickle)
    check_prompt_fits(model, prompt)
    model.requires_grad_(False)
    return SoftPromptModel(model, prompt.to(model.get_input_embeddings().weight.device), trainable=trainable)


# ---------------------------------------------------------------------------------------------
# What a soft prompt is near: the vocabulary tokens closest to each virtual token
# ---------------------------------------------------------------------------------------------


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


def read_tensor(path: str | Path, name: str) -> torch.Tensor:
    """One named tensor of a safetensors file, reading only its bytes (a 5 GB shard is not mapped or read whole)."""
    entries, data_start = read_header(path)
    entry = next((e for e in entries if e.name == name), None)
    if entry is None:
        raise ShardError(f"{path} has no tensor {name}")
    if entry.dtype not in SAFETENSORS_DTYPES:
        raise ShardError(f"{path}: tensor {name} has dtype {entry.dtype}, which qlora-lite cannot read")
    buffer = torch.empty(entry.end - entry.start, dtype=torch.uint8)
    with open(path, "rb") as f:
        f.seek(data_start + entry.start)
        if f.readinto(memoryview(buffer.numpy())) != buffer.numel():
            raise ShardError(f"{path} is truncated: tensor {name} runs past the end of the file")
    return buffer.view(SAFETENSORS_DTYPES[entry.dtype]).reshape(entry.shape)


# --- the prompt-tuning entry in the table of methods (methods.py) -----------------------------


def attach_prompt_method(model: nn.Module, cfg: RecipeConfig, tokenizer) -> nn.Module:
    return apply_prompt_tuning(model, cfg.prompt, tokenizer)


def save_prompt_method(model: nn.Module, cfg: RecipeConfig, folder: Path, base_path: str) -> None:
    save_soft_prompt(model, cfg.prompt, folder, base_path)


def load_prompt_method(model: nn.Module, cfg: RecipeConfig, folder: Path, trainable: bool) -> nn.Module:
    return load_soft_prompt(model, folder, trainable=trainable)


def validate_prompt_recipe(cfg: RecipeConfig) -> None:
    if cfg.data.packing:
        raise ConfigError("method prompt_tuning prepends the soft prompt to each example, which packed rows cannot take: set data.packing: false")
    if cfg.prompt.num_virtual_tokens <= 0:
        raise ConfigError(f"prompt.num_virtual_tokens must be a positive integer, got {cfg.prompt.num_virtual_tokens}; typical values are 20 to 100")
    if cfg.prompt.init == "text" and not cfg.prompt.init_text.strip():
        raise ConfigError("prompt.init is text but prompt.init_text is empty: give the text to start from, or use prompt.init: sample_vocab")


def read_prompt_weights(adapter_dir: Path, allow_pickle: bool) -> tuple[PromptConfig, dict[str, torch.Tensor]]:
    cfg, prompt = read_soft_prompt(adapter_dir, allow_pickle)
    return cfg, {PROMPT_KEY: prompt}


def check_prompt_weights_fit(model: nn.Module, cfg: PromptConfig, weights: dict[str, torch.Tensor]) -> None:
    check_prompt_fits(model, weights[PROMPT_KEY])


def apply_prompt_weights(model: nn.Module, cfg: PromptConfig, weights: dict[str, torch.Tensor]) -> nn.Module:
    # A new wrapper around the same base: it holds the in-memory prompt, no copy of the base.
    return SoftPromptModel(model, weights[PROMPT_KEY], trainable=False)


PROMPT_TUNING_METHOD = Method(
    name="prompt_tuning",
    peft_type=PEFT_TYPE,
    attach=attach_prompt_method,
    save=save_prompt_method,
    load=load_prompt_method,
    validate=validate_prompt_recipe,
    count_trainable=lambda cfg, model: [cfg.prompt.num_virtual_tokens * model.config.hidden_size],
    trainable_dtype=lambda cfg: cfg.prompt.dtype,
    virtual_tokens=lambda cfg: cfg.prompt.num_virtual_tokens,
    read_config=lambda adapter_dir: read_prompt_config(adapter_dir)[1],
    read=read_prompt_weights,
    check_fits=check_prompt_weights_fit,
    apply=apply_prompt_weights,
    merge_refusal=(
        "{adapter_dir} holds a soft prompt: vectors prepended to the input, not a change to any weight, so there is "
        "nothing to merge into the base. Serve the base + adapter instead (qlora-lite generate {adapter_dir})"
    ),
)
