"""Recipes: YAML files mapped onto typed dataclasses, with dotted overrides.

A recipe has a method (lora, prompt_tuning, selective, adapter or full) and the sections
model, quant, lora, prompt, selective, bottleneck, data, train, dist, plus output_dir. Every key is
a field below with a docstring-style comment; an unknown key is an error that names the
nearest valid key, so a typo never silently falls back to a default.

Everything that can be checked from the recipe alone is checked here, when it is built: each
method's settings by the check beside its section (`METHODS` lists the methods with their checks),
value ranges, choices. This module imports nothing of the package but its errors: the methods,
data and training wings read these dataclasses, never the other way.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError


@dataclass
class ModelConfig:
    name_or_path: str = ""
    """Local folder or Hugging Face hub id of the base model; `demo:tiny` builds the offline demo base; a GGUF (`x.gguf`, `ollama:NAME[:TAG]`, an LM Studio folder) is dequantized once into the cache (see "Start from a GGUF")."""
    revision: str | None = None
    """Hub revision (branch, tag or commit) to pin."""
    trust_remote_code: bool = False
    """Run model code shipped with the checkpoint. Off unless you trust its author."""
    attn_implementation: str = "sdpa"
    """`sdpa` (default), `eager`, or `flash_attention_2` when installed."""
    gradient_checkpointing: bool = True
    """Recompute activations in the backward pass (non-reentrant): slower, far less memory."""
    activation_offload: bool | str = "auto"
    """Keep each checkpointed layer's input in pinned host memory from the forward to the backward, copied on a side CUDA stream: `auto` (on where the planner says the step does not fit this GPU without it), `true`, `false`. Needs gradient_checkpointing."""
    tiled_mlp: bool | str = "auto"
    """Run each layer's MLP over tiles of hidden_size tokens, so its intermediates exist for one tile at a time (one more MLP forward per step): `auto` (on where the planner says the step does not fit without it), `true`, `false`."""
    init_adapter: str | None = None
    """An adapter folder (a finished run's `adapter/`, in PEFT's format) to start training from instead of a fresh one, e.g. an SFT adapter continued with objective dpo; its method must be the recipe's. With a preference objective the reference is then base + this adapter as it starts."""


@dataclass
class QuantConfig:
    load_in_4bit: bool = True
    """Load the frozen base in 4-bit through bitsandbytes. False gives plain bf16 LoRA."""
    quant_type: str = "nf4"
    """`nf4` (QLoRA paper) or `fp4`."""
    double_quant: bool = True
    """Quantize the quantization constants too: saves ~0.37 bit per parameter."""
    compute_dtype: str = "auto"
    """Dtype of the 4-bit matmuls: `auto` (bf16 where supported, fp16 on older GPUs such as T4), `bfloat16`, `float16`, `float32`."""


@dataclass
class LoRAConfig:
    r: int = 16
    """Rank of the update B A. Must be > 0."""
    alpha: float = 32.0
    """Scale numerator: the update is multiplied by alpha/r (alpha/sqrt(r) with use_rslora)."""
    dropout: float = 0.05
    """Dropout on the LoRA branch input, in [0, 1)."""
    target_modules: list[str] | str = "all-linear"
    """Module names or suffixes to wrap (e.g. [q_proj, v_proj]), or `all-linear` (never lm_head)."""
    use_rslora: bool = False
    """Rank-stabilised scaling alpha/sqrt(r), which keeps the update's size steady as r grows."""
    dtype: str = "bfloat16"
    """Dtype of the adapter weights."""


def check_lora_recipe(cfg: RecipeConfig) -> None:
    """method lora: nothing beyond the lora.* checks every recipe gets (validate_config)."""


@dataclass
class PromptConfig:
    num_virtual_tokens: int = 20
    """method prompt_tuning: soft-prompt length, prepended to every input (typical 20-100)."""
    init: str = "sample_vocab"
    """Soft-prompt start: `text` (embeddings of prompt.init_text), `sample_vocab` (random vocabulary embeddings) or `random`."""
    init_text: str = ""
    """With prompt.init=text: the text whose token embeddings start the soft prompt (repeated or cut to length)."""
    dtype: str = "float32"
    """Storage dtype of the soft prompt (it is tiny; fp32 keeps small updates)."""


def check_prompt_tuning_recipe(cfg: RecipeConfig) -> None:
    if cfg.data.packing:
        raise ConfigError("method prompt_tuning prepends the soft prompt to each example, which packed rows cannot take: set data.packing: false")
    if cfg.prompt.num_virtual_tokens <= 0:
        raise ConfigError(f"prompt.num_virtual_tokens must be a positive integer, got {cfg.prompt.num_virtual_tokens}; typical values are 20 to 100")
    if cfg.prompt.init == "text" and not cfg.prompt.init_text.strip():
        raise ConfigError("prompt.init is text but prompt.init_text is empty: give the text to start from, or use prompt.init: sample_vocab")


@dataclass
class SelectiveConfig:
    patterns: list[str] = field(default_factory=lambda: ["norm"])
    """method selective: train the parameters whose name matches any of these regexes (re.search), e.g. `norm`, `bias`, `layers\\.1\\.mlp`."""
    unquantized_modules: list[str] = field(default_factory=list)
    """Linear layers to load in full precision instead of NF4 so a pattern can select them (e.g. `down_proj`)."""


def check_selective_recipe(cfg: RecipeConfig) -> None:
    if not cfg.selective.patterns:
        raise ConfigError("selective.patterns is empty: name what to train, e.g. [norm] or [bias, norm]")


@dataclass
class BottleneckConfig:
    size: int = 16
    """method adapter: width of each bottleneck adapter (down-project to this size, then back up)."""
    placement: str = "both"
    """Where adapters go in each layer: after the `attn` output, after the `mlp` output, or `both` (Houlsby)."""
    activation: str = "gelu"
    """Nonlinearity between the down and up projections: `gelu`, `relu` or `silu`."""
    dtype: str = "float32"
    """Storage dtype of the adapter weights."""


def check_bottleneck_recipe(cfg: RecipeConfig) -> None:
    if cfg.bottleneck.size <= 0:
        raise ConfigError(f"bottleneck.size must be a positive integer, got {cfg.bottleneck.size}; typical values are 8 to 64")


def check_full_recipe(cfg: RecipeConfig) -> None:
    if cfg.quant.load_in_4bit:
        raise ConfigError("method full trains every weight, which 4-bit weights cannot hold: set quant.load_in_4bit: false (or use method lora)")


# The recipe's methods (its `method:` key), each with the check of the settings it reads. This is the
# one list of their names: each is implemented by one entry of the table of methods (methods/table.py),
# which refuses to load if an entry is missing or names a method not listed here.
METHODS: dict[str, Callable[[RecipeConfig], None]] = {
    "lora": check_lora_recipe,
    "prompt_tuning": check_prompt_tuning_recipe,
    "selective": check_selective_recipe,
    "adapter": check_bottleneck_recipe,
    "full": check_full_recipe,
}

# The data formats (data.format), each with what its records must hold (quoted in errors); data/formats.py
# renders them, `generate --format` and an adapter's qlora_lite.json name them.
DATA_FORMATS: dict[str, str] = {
    "alpaca": "instruction, output; input optional",
    "chat": "messages (or ShareGPT's conversations): a list of {role, content} (or {from, value}) ending with an assistant turn",
    "text": "{text_field}; set data.text_field to the column holding the text",
    "preference": "prompt, chosen, rejected: strings, or conversations (lists of {role, content}); chosen and rejected may hold the prompt's turns too",
    "unpaired": "prompt, completion (strings or conversations) and label (true: desirable, false: undesirable)",
}


@dataclass
class DataConfig:
    path: str = ""
    """Local json/jsonl/csv/parquet file or folder, or a hub dataset id."""
    format: str = "alpaca"
    """`alpaca` (instruction/input/output), `chat` (messages list), `text` (plain LM), `preference` (prompt/chosen/rejected pairs, for objectives dpo, orpo, simpo) or `unpaired` (prompt/completion/label, for kto)."""
    split: str = "train"
    """Split of a hub dataset (or a multi-split local folder) to train on."""
    eval_path: str | None = None
    """Separate evaluation file; otherwise eval_fraction of the training data is held out."""
    eval_fraction: float = 0.0
    """Fraction of the training records held out for evaluation when eval_path is not given."""
    text_field: str = "text"
    """Field holding the text for format `text`."""
    packing: bool = False
    """Pack several short examples into one max_seq_len sequence; attention stays inside each example."""
    max_examples: int | None = None
    """Use only the first N training records (quick experiments)."""
    truncation: str = "drop"
    """Examples whose answer does not fit in `max_seq_len`: `drop` them (a cut answer has no EOS and teaches the model not to stop) or `keep` the cut answer (its EOS is lost). Either way the run reports how many and the tokens lost; see "Answers that do not fit"."""
    num_proc: int | None = None
    """Processes that tokenize the data the first time (None: one per 5,000 records, at most one per CPU core and 8); the result is cached on disk and reused."""
    cache_dir: str | None = None
    """Where tokenized data is cached (None: `$QLORA_LITE_DATA_CACHE`, else `data` in qlora-lite's cache, `$QLORA_LITE_CACHE` or `~/.cache/qlora-lite`); relative: from where the command runs."""


@dataclass
class TrainConfig:
    max_steps: int = 1000
    """Optimizer steps (each one is micro_batch_size x grad_accum_steps sequences)."""
    epochs: float | None = None
    """Passes over the training data; when set, `max_steps` = ceil(epochs x examples / (micro_batch_size x grad_accum_steps)), printed at the start."""
    lr: float = 2e-4
    """Peak learning rate. LoRA tolerates ~10x the LR of full fine-tuning."""
    micro_batch_size: int | str = 1
    """Sequences per forward pass, or `auto`: the largest the memory planner says fits this device (at most 64)."""
    grad_accum_steps: int = 16
    """Micro-batches accumulated before each optimizer step."""
    max_seq_len: int = 2048
    """Longer examples are truncated to this many tokens."""
    optimizer: str = "paged_adamw_8bit"
    """`paged_adamw_8bit`, `adamw_8bit`, `paged_adamw_32bit` or `adamw` (torch)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the adapter weights."""
    lr_scheduler: str = "cosine"
    """`cosine`, `linear` or `constant`, each after a linear warmup."""
    warmup_steps: int = 10
    """Optimizer steps of linear warmup from 0 to lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    mixed_precision: str = "auto"
    """accelerate mixed precision: `auto` (bf16 on GPUs that have it, fp16 otherwise, none on CPU), `bf16`, `fp16`, `no`."""
    eval_every: int = 100
    """Evaluate every N optimizer steps (0: only at the start and the end)."""
    eval_max_batches: int | None = None
    """Cap the batches of one evaluation (None: the whole eval split)."""
    exact_match_examples: int = 0
    """At the start and the end, greedily generate answers for this many eval prompts and report exact match."""
    save_every: int = 200
    """Write a resumable checkpoint every N optimizer steps (0: only the final adapter)."""
    keep_checkpoints: int = 2
    """Newest complete checkpoints to keep on disk."""
    log_every: int = 10
    """Write a metrics line every N optimizer steps."""
    seed: int = 42
    """Seed for data order, dropout and adapter init."""
    cpu_threads: int | None = None
    """Torch threads when training on the CPU (None: torch's default). 1 is fastest for tiny models."""
    loss: str = "chunked"
    """`chunked`: fused linear cross-entropy over the labelled tokens only, chunk by chunk, never holding the whole batch's logits; `hf`: transformers' loss (for comparison)."""
    loss_chunk_tokens: int = 512
    """Tokens per chunk of the chunked loss: the head's logits for this many tokens are the largest tensor it holds (6 bytes per token x vocab under bf16: 0.36 GiB at 512 for a 128k vocabulary, 1/19 of the hf loss's 6.9 GiB for 2 x 2048 tokens; 1024 doubles it and was no faster, measured on a CPU)."""
    batching: str = "grouped"
    """`grouped`: micro-batches of similar lengths (sorted within windows, windows shuffled; deterministic), so little is padding; `random`: examples in random order, padded to the longest."""
    report_to: list[str] = field(default_factory=list)
    """Experiment trackers that receive the records of metrics.jsonl: any of `tensorboard`, `wandb`, `mlflow`, `trackio` (each an optional extra)."""
    run_name: str | None = None
    """The run's name in the trackers (None: the output folder's name)."""
    sample_prompts: int = 3
    """At each eval, greedy answers to this many fixed eval prompts go to metrics.jsonl and the trackers (0: none)."""


@dataclass
class ObjectiveConfig:
    name: str = "sft"
    """What a step minimizes: `sft` (the answer's cross-entropy), `dpo`, `orpo`, `simpo` (pairs: data.format preference) or `kto` (data.format unpaired). See "Preference tuning"."""
    beta: float = 0.1
    """dpo, kto: strength of the pull toward the reference; orpo: weight of the odds-ratio term (lambda); simpo: reward scale. TRL's default 0.1 for each (the SimPO paper used 2.0 to 10)."""
    label_smoothing: float = 0.0
    """dpo, simpo: the share of pairs assumed mislabelled (conservative DPO), in [0, 0.5)."""
    simpo_gamma: float = 0.5
    """simpo: the target reward margin gamma."""
    cpo_alpha: float = 0.0
    """simpo: weight of an added NLL term on the chosen answers (TRL's CPO-SimPO); 0 is the paper's SimPO (TRL's default for CPO is 1.0)."""
    desirable_weight: float = 1.0
    """kto: weight of the desirable examples' losses."""
    undesirable_weight: float = 1.0
    """kto: weight of the undesirable examples' losses."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """What the recipe, the data and the planner must know of an objective; training/objectives/ implements it."""

    formats: tuple[str, ...]
    """The data formats it trains on."""
    sequences: int
    """Sequences per example that a training forward runs with gradients (2: chosen and rejected)."""
    reference: bool
    """Whether it compares with a reference policy, whose log-probs are computed once before the first step."""
    settings: tuple[str, ...]
    """The objective.* keys it reads."""


# The recipe's objectives (objective.name), the one list of their names: each is implemented by one
# entry of the table of objectives (training/objectives/table.py), which refuses to load otherwise.
OBJECTIVES: dict[str, ObjectiveSpec] = {
    "sft": ObjectiveSpec(("alpaca", "chat", "text"), 1, False, ()),
    "dpo": ObjectiveSpec(("preference",), 2, True, ("beta", "label_smoothing")),
    "orpo": ObjectiveSpec(("preference",), 2, False, ("beta",)),
    "simpo": ObjectiveSpec(("preference",), 2, False, ("beta", "label_smoothing", "simpo_gamma", "cpo_alpha")),
    "kto": ObjectiveSpec(("unpaired",), 1, True, ("beta", "desirable_weight", "undesirable_weight")),
}


def check_objective(cfg: RecipeConfig) -> None:
    """The objective's name, its data format, and the ranges of the settings it reads."""
    objective = cfg.objective
    if objective.name not in OBJECTIVES:
        raise ConfigError(f"objective.name: {objective.name!r} is not one of {', '.join(OBJECTIVES)}")
    spec = OBJECTIVES[objective.name]
    if cfg.data.format not in spec.formats:
        wanted = " or ".join(spec.formats)
        raise ConfigError(
            f"objective {objective.name} trains on data.format {wanted}, but data.format is {cfg.data.format}: "
            + ("set data.format: " + spec.formats[0] if len(spec.formats) == 1 else f"set objective.name to one for {cfg.data.format} data")
        )
    if not (math.isfinite(objective.beta) and objective.beta > 0):
        raise ConfigError(f"objective.beta must be a positive number, got {objective.beta}; TRL's default is 0.1")
    if not 0.0 <= objective.label_smoothing < 0.5:
        raise ConfigError(f"objective.label_smoothing must be in [0, 0.5), got {objective.label_smoothing}")
    for key in ("simpo_gamma", "cpo_alpha", "desirable_weight", "undesirable_weight"):
        value = getattr(objective, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"objective.{key} must be >= 0, got {value}")
    if objective.name != "sft" and cfg.data.packing:
        raise ConfigError(f"objective {objective.name} scores whole answers, one per row: set data.packing: false")


@dataclass
class DistConfig:
    strategy: str = "ddp"
    """With several processes (torchrun, accelerate launch): `ddp` (each process holds the whole 4-bit base and the adapter) or `fsdp` (FSDP2 shards the base and the adapter across processes: a model that does not fit one GPU). One process ignores it. See "More than one GPU"."""
    cpu_offload: bool = False
    """With `fsdp`: keep each process's shards (4-bit base, adapter, optimizer state) in CPU RAM and bring them to the GPU one layer at a time; the optimizer steps on the CPU. Slower; a 70B's training step then needs 17.40 GiB per GPU on two, and loading, layer by layer, 3.97 GiB (see "More than one GPU")."""


@dataclass
class RecipeConfig:
    method: str = "lora"
    """What is trained: `lora`, `prompt_tuning` (soft prompt), `selective` (named base parameters), `adapter` (bottleneck adapters) or `full` (every weight; needs quant.load_in_4bit false)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    selective: SelectiveConfig = field(default_factory=SelectiveConfig)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    output_dir: str = "runs/default"
    """Where config.yaml, metrics.jsonl, checkpoints/ and adapter/ are written; relative: from where the command runs."""

    def __post_init__(self) -> None:
        validate_config(self)


CHOICES = {
    "prompt.init": ("text", "sample_vocab", "random"),
    "prompt.dtype": ("bfloat16", "float16", "float32"),
    "bottleneck.placement": ("attn", "mlp", "both"),
    "bottleneck.activation": ("gelu", "relu", "silu"),
    "bottleneck.dtype": ("bfloat16", "float16", "float32"),
    "quant.quant_type": ("nf4", "fp4"),
    "quant.compute_dtype": ("auto", "bfloat16", "float16", "float32"),
    "lora.dtype": ("bfloat16", "float16", "float32"),
    "data.format": tuple(DATA_FORMATS),
    "data.truncation": ("drop", "keep"),
    "train.optimizer": ("paged_adamw_8bit", "adamw_8bit", "paged_adamw_32bit", "adamw"),
    "train.lr_scheduler": ("cosine", "linear", "constant"),
    "train.mixed_precision": ("auto", "bf16", "fp16", "no"),
    "train.loss": ("chunked", "hf"),
    "train.batching": ("grouped", "random"),
    "dist.strategy": ("ddp", "fsdp"),
}

TRACKERS = ("tensorboard", "wandb", "mlflow", "trackio")


def validate_config(cfg: RecipeConfig) -> None:
    """Check values that have a fixed range; raise ConfigError naming the key and the fix."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method: {cfg.method!r} is not one of {', '.join(METHODS)}")
    METHODS[cfg.method](cfg)
    for key, allowed in CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")
    check_objective(cfg)
    for key in ("activation_offload", "tiled_mlp"):
        if isinstance(getattr(cfg.model, key), str) and getattr(cfg.model, key) != "auto":
            raise ConfigError(f"model.{key} must be auto, true or false, got {getattr(cfg.model, key)!r}")
    if cfg.model.activation_offload is True and not cfg.model.gradient_checkpointing:
        raise ConfigError(
            "model.activation_offload offloads the layer inputs gradient checkpointing keeps: set model.gradient_checkpointing=true, "
            "or model.activation_offload=false"
        )
    if cfg.lora.r <= 0:
        raise ConfigError(f"lora.r must be a positive integer, got {cfg.lora.r}; typical values are 8, 16 or 64")
    if not 0.0 <= cfg.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {cfg.lora.dropout}")
    if isinstance(cfg.train.micro_batch_size, str) and cfg.train.micro_batch_size != "auto":
        raise ConfigError(f"train.micro_batch_size must be a positive integer or auto, got {cfg.train.micro_batch_size!r}")
    for key in ("max_steps", "micro_batch_size", "grad_accum_steps", "max_seq_len"):
        if getattr(cfg.train, key) == "auto":
            continue
        if getattr(cfg.train, key) <= 0:
            raise ConfigError(f"train.{key} must be a positive integer, got {getattr(cfg.train, key)}")
    if not (math.isfinite(cfg.train.lr) and cfg.train.lr > 0):
        raise ConfigError(f"train.lr must be a positive number, got {cfg.train.lr}; LoRA typically uses 1e-4 to 2e-4")
    if not (math.isfinite(cfg.lora.alpha) and cfg.lora.alpha > 0):
        raise ConfigError(f"lora.alpha must be a positive number, got {cfg.lora.alpha}; a common choice is 2 x lora.r")
    # A negative clip norm would flip the gradients' sign inside clip_grad_norm_: training would ascend.
    for key in ("max_grad_norm", "warmup_steps", "eval_every", "save_every", "exact_match_examples", "weight_decay"):
        value = getattr(cfg.train, key)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"train.{key} must be >= 0, got {value}")
    if cfg.train.epochs is not None and not (math.isfinite(cfg.train.epochs) and cfg.train.epochs > 0):
        raise ConfigError(f"train.epochs must be a positive number or null (use train.max_steps), got {cfg.train.epochs}")
    if cfg.train.eval_max_batches is not None and cfg.train.eval_max_batches <= 0:
        raise ConfigError(f"train.eval_max_batches must be positive or null (the whole eval split), got {cfg.train.eval_max_batches}")
    if cfg.train.exact_match_examples and cfg.data.format == "text":
        raise ConfigError("train.exact_match_examples needs prompts and answers: use it with data.format alpaca or chat, or set it to 0")
    if cfg.train.cpu_threads is not None and cfg.train.cpu_threads <= 0:
        raise ConfigError(f"train.cpu_threads must be positive or null, got {cfg.train.cpu_threads}")
    for key in ("log_every", "keep_checkpoints", "loss_chunk_tokens"):
        if getattr(cfg.train, key) <= 0:
            raise ConfigError(f"train.{key} must be a positive integer, got {getattr(cfg.train, key)}")
    unknown = [name for name in cfg.train.report_to if name not in TRACKERS]
    if unknown:
        raise ConfigError(f"train.report_to: {', '.join(map(repr, unknown))} is not one of {', '.join(TRACKERS)}")
    if cfg.train.sample_prompts < 0:
        raise ConfigError(f"train.sample_prompts must be >= 0, got {cfg.train.sample_prompts}")
    if cfg.data.num_proc is not None and cfg.data.num_proc <= 0:
        raise ConfigError(f"data.num_proc must be a positive integer or null (one per core), got {cfg.data.num_proc}")
    if not 0.0 <= cfg.data.eval_fraction < 1.0:
        raise ConfigError(f"data.eval_fraction must be in [0, 1), got {cfg.data.eval_fraction}")
    targets = cfg.lora.target_modules
    if (isinstance(targets, str) and targets != "all-linear") or not targets:
        raise ConfigError(f"lora.target_modules must be a non-empty list of module names or 'all-linear', got {targets!r}")


class DuplicateKey(Exception):
    """A mapping of the recipe gives one key twice (RecipeLoader); load_recipe names the file."""


class RecipeLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML silently keeps the last).

    Keys that a merge (`<<: *anchor`) brings in are not duplicates: YAML lets the mapping's own keys
    override them. Overrides on the command line are another matter: there the last one wins.
    """

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self.key_paths: dict[int, str] = {}  # id(mapping node) -> its dotted key plus "." ("" for the top)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        prefix = self.key_paths.get(id(node), "")
        seen: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader refuses it itself ("found unhashable key")
            line = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                self.key_paths.setdefault(id(value_node), f"{prefix}{key}.")
            if key in seen:
                lines = f"line {line}" if seen[key] == line else f"lines {seen[key]} and {line}"
                raise DuplicateKey(f"key {prefix}{key} is given twice ({lines}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None) -> RecipeConfig:
    """Read a recipe YAML (or start from defaults) and apply `key.sub=value` overrides."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {path} does not exist; pass the path of a YAML file such as recipes/tiny-demo.yaml")
        try:
            raw = yaml.load(path.read_text(), Loader=RecipeLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"recipe {path} is not valid YAML: {err}") from err
        except DuplicateKey as err:
            raise ConfigError(f"recipe {path}: {err}") from err
        if not isinstance(raw, dict):
            raise ConfigError(f"recipe {path} must be a mapping of sections (model:, lora:, ...), got {type(raw).__name__}")
    for item in overrides or []:
        apply_override(raw, item)
    cfg = build_config(raw)
    if path is not None:
        resolve_data_paths(cfg.data, path.parent)
    return cfg


def resolve_data_paths(data: DataConfig, recipe_dir: Path) -> None:
    """data.path and data.eval_path not found from where the command runs are read beside the recipe,
    so `qlora-lite train recipes/tiny-demo.yaml` works from any directory.

    Every other folder setting (data.cache_dir, output_dir) is read from where the command runs, with
    `~` expanded, where it is used; a data path found nowhere stays as given (a hub dataset id, or a
    missing file the data reader then names).
    """
    for key in ("path", "eval_path"):
        value = getattr(data, key)
        if value and not Path(value).expanduser().exists() and (recipe_dir / value).exists():
            setattr(data, key, str(recipe_dir / value))


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply one `a.b=value` override to the raw recipe mapping; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value, e.g. train.lr=1e-4")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(text) if text.strip() else None


def valid_keys() -> list[str]:
    """Every dotted key a recipe may set, e.g. `train.lr`."""
    keys = []
    for f in dataclasses.fields(RecipeConfig):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            keys += [f"{f.name}.{sub.name}" for sub in dataclasses.fields(f.default_factory)]
        else:
            keys.append(f.name)
    return keys


# Names users bring from transformers' TrainingArguments, PEFT's LoraConfig, TRL and axolotl,
# which string similarity alone would map badly (`learning_rate` is closer to `weight_decay`
# than to `lr`).
FAMILIAR_NAMES = {
    "learning_rate": "lr",
    "per_device_train_batch_size": "micro_batch_size",
    "batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "max_seq_length": "max_seq_len",
    "max_length": "max_seq_len",
    "sequence_len": "max_seq_len",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "lr_scheduler_type": "lr_scheduler",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "logging_steps": "log_every",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "rank": "r",
    "lora_r": "r",
    "warmup": "warmup_steps",
    "model_name": "name_or_path",
    "base_model": "name_or_path",
    "dataset": "path",
}
# How alike (difflib ratio) a typo must be to be suggested: 0.6 takes `max_step` -> `max_steps`
# and `modle` -> `model`, and leaves `foo` with no suggestion rather than a random one.
CLOSE_MATCH = 0.6


def suggest_key(key: str) -> str | None:
    """The valid key a user most likely meant by an unknown `key`, or None when nothing is close."""
    section, _, name = key.rpartition(".")
    name = name.lower()
    familiar = difflib.get_close_matches(name, FAMILIAR_NAMES, n=1, cutoff=0.85)  # `lerning_rate` too
    wanted = FAMILIAR_NAMES[familiar[0]] if familiar else name
    # A known name (or its translation) anywhere: prefer the section the user wrote it in.
    exact = sorted((k for k in valid_keys() if k.rpartition(".")[2] == wanted), key=lambda k: not k.startswith(section + "."))
    if exact:
        return exact[0]
    if section:  # a typo inside a section: compare names within it, not whole dotted keys
        names = [k.rpartition(".")[2] for k in valid_keys() if k.startswith(section + ".")]
        close = difflib.get_close_matches(name, names, n=1, cutoff=CLOSE_MATCH)
        return f"{section}.{close[0]}" if close else None
    close = difflib.get_close_matches(name, [f.name for f in dataclasses.fields(RecipeConfig)], n=1, cutoff=CLOSE_MATCH)
    return close[0] if close else None


def _unknown_key_error(key: str) -> ConfigError:
    nearest = suggest_key(key)
    hint = f"; did you mean {nearest!r}?" if nearest else ""
    return ConfigError(f"unknown recipe key {key!r}{hint} (all keys are listed in the README's config table)")


def build_config(raw: dict[str, Any]) -> RecipeConfig:
    """Turn a nested mapping into a RecipeConfig, rejecting unknown keys and mistyped values."""
    kwargs: dict[str, Any] = {}
    top = {f.name: f for f in dataclasses.fields(RecipeConfig)}
    for name, value in raw.items():
        if name not in top:
            raise _unknown_key_error(str(name))
        section_cls = top[name].default_factory
        if dataclasses.is_dataclass(section_cls):
            if not isinstance(value, dict):
                raise ConfigError(f"{name} must be a section (a mapping of keys), got {value!r}")
            kwargs[name] = _build_section(name, section_cls, value)
        else:
            kwargs[name] = _coerce(name, value, top[name].type)
    return RecipeConfig(**kwargs)


def _build_section(section: str, cls: type, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise _unknown_key_error(f"{section}.{key}")
        kwargs[key] = _coerce(f"{section}.{key}", value, fields[key].type)
    return cls(**kwargs)


_TYPES = {"str": str, "int": int, "float": float, "bool": bool}
# A list setting given one name takes it as a one-element list, except these words, which such a
# setting (annotated `list[str] | str`) keeps as they are. lora.target_modules matches names exactly or
# as a dotted suffix, never as a regex, so `q_proj` can only mean [q_proj].
LIST_WORDS = {"lora.target_modules": ("all-linear",)}


def _coerce(key: str, value: Any, annotation: str) -> Any:
    """Check a value against its field's annotation (a string under `from __future__ import annotations`)."""
    allowed = [a.strip() for a in annotation.split("|")]
    if value is None:
        if "None" in allowed:
            return None
        raise ConfigError(f"{key} must not be empty")
    if isinstance(value, str) and value and any(a.startswith("list[") for a in allowed) and value not in LIST_WORDS.get(key, ()):
        return [value]  # one name: `report_to: tensorboard` is [tensorboard]
    for a in allowed:
        if a.startswith("list[") and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        typ = _TYPES.get(a)
        if typ is bool and isinstance(value, bool):
            return value
        if typ is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if typ is float and isinstance(value, str):
            try:  # YAML 1.1 reads `2e-4` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if typ is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if typ is str and isinstance(value, str):
            return value
        if typ is str and isinstance(value, bool) and ("yes" if value else "no") in CHOICES.get(key, ()):
            return "yes" if value else "no"  # YAML 1.1 reads an unquoted `no` as false: train.mixed_precision: no
    raise ConfigError(f"{key} must be {annotation.replace('|', 'or')}, got {value!r} ({type(value).__name__})")


def config_to_dict(cfg: RecipeConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: RecipeConfig, path: str | Path) -> None:
    """Write the resolved recipe (defaults filled in, overrides applied) as YAML."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
