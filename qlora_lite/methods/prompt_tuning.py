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

What a learned soft prompt is near in the vocabulary: ``inspect_prompt.py``.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import PromptConfig
from ..data.formats import IGNORE_INDEX
from ..errors import PromptTuningError
from ..quant import DTYPE_NAMES, DTYPES
from .folder import CONFIG_NAME, WEIGHTS_NAME, read_adapter_json, read_adapter_weights, write_adapter_files
from .method import Method

PEFT_TYPE = "PROMPT_TUNING"
PROMPT_KEY = "prompt_embeddings"
"""The one tensor of a PEFT prompt-tuning file: the soft prompt, (num_virtual_tokens, token_dim)."""
PEFT_INITS = {"text": "TEXT", "sample_vocab": "SAMPLE_VOCAB", "random": "RANDOM"}
PACKING_MESSAGE = (
    "the batch carries position_ids without an attention_mask, which is how packed batches (data.packing: true) "
    "arrive; prompt tuning prepends the soft prompt to each row and a packed row holds several examples: "
    "set data.packing: false for prompt tuning"
)


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

        A method of its own so that the chunked loss (training/loss.py), which runs the base's
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
    config = build_prompt_peft_config(model, cfg, base_model_name_or_path)
    return write_adapter_files(out_dir, {PROMPT_KEY: model.prompt}, config)


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
    if prompt.dtype not in DTYPE_NAMES:
        prompt = prompt.float()
    cfg.dtype = DTYPE_NAMES[prompt.dtype]
    return cfg, prompt


def read_prompt_adapter(adapter_dir: str | Path, allow_pickle: bool = False) -> tuple[PromptConfig, dict[str, torch.Tensor]]:
    """read_soft_prompt as the table of methods reads every folder: (settings, {PROMPT_KEY: prompt})."""
    cfg, prompt = read_soft_prompt(adapter_dir, allow_pickle=allow_pickle)
    return cfg, {PROMPT_KEY: prompt}


def check_prompt_fits(model: nn.Module, cfg: PromptConfig, weights: dict[str, torch.Tensor]) -> None:
    """Refuse a soft prompt whose width is not this base's hidden size."""
    prompt = weights[PROMPT_KEY]
    hidden = model.get_input_embeddings().weight.shape[-1]
    if prompt.shape[-1] != hidden:
        raise PromptTuningError(
            f"the soft prompt has token_dim {prompt.shape[-1]} but this base's embeddings have hidden size {hidden}: "
            "it was made for a different base model (check base_model_name_or_path in adapter_config.json, or pass --base)"
        )


def attach_soft_prompt(model: nn.Module, cfg: PromptConfig, weights: dict[str, torch.Tensor], trainable: bool = False) -> SoftPromptModel:
    """A SoftPromptModel around the frozen base with this prompt (checked first); the base is not copied.

    The prompt keeps its saved dtype and trains only when trainable (``fit`` resumes from a checkpoint this way).
    """
    check_prompt_fits(model, cfg, weights)
    model.requires_grad_(False)
    return SoftPromptModel(model, weights[PROMPT_KEY].to(model.get_input_embeddings().weight.device), trainable=trainable)


def load_soft_prompt(model: nn.Module, adapter_dir: str | Path, trainable: bool = False, allow_pickle: bool = False) -> SoftPromptModel:
    """Wrap a loaded base with the soft prompt of a PEFT PROMPT_TUNING folder (ours or PEFT's).

    Nothing is changed if the folder does not fit.
    """
    cfg, weights = read_prompt_adapter(adapter_dir, allow_pickle=allow_pickle)
    return attach_soft_prompt(model, cfg, weights, trainable)


def unwrap_base(model: nn.Module) -> nn.Module:
    """The transformers model under any wrapper (accelerate's DDP, or the soft-prompt one)."""
    model = getattr(model, "module", model)
    return model.base_model if isinstance(model, SoftPromptModel) else model


# --- the prompt-tuning entry in the table of methods (table.py) -----------------------------------


PROMPT_TUNING_METHOD = Method(
    name="prompt_tuning",
    section="prompt",
    peft_type=PEFT_TYPE,
    attach=apply_prompt_tuning,
    save=save_soft_prompt,
    count_trainable=lambda cfg, model: [cfg.num_virtual_tokens * model.config.hidden_size],
    trainable_dtype=lambda cfg: cfg.dtype,
    virtual_tokens=lambda cfg: cfg.num_virtual_tokens,
    read_config=lambda adapter_dir: read_prompt_config(adapter_dir)[1],
    read=read_prompt_adapter,
    check_fits=check_prompt_fits,
    apply=attach_soft_prompt,
    merge_refusal=(
        "{adapter_dir} holds a soft prompt: vectors prepended to the input, not a change to any weight, so there is "
        "nothing to merge into the base. Serve the base + adapter instead (qlora-lite generate {adapter_dir})"
    ),
)
