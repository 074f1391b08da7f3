"""Merge an adapter into its base and export a plain Hugging Face model folder.

Two kinds of adapter fold into the base's weights: LoRA (each target weight gains the
delta (alpha/r) B A) and selective (each trained tensor replaces the base's tensor of the
same name). Bottleneck adapters and soft prompts cannot: one is nonlinear, the other is
input rather than weights; both are refused with a message that says to serve base + adapter.

For LoRA, the default merge adds each delta, (alpha/r) B A, to the base's original full-precision
weights, re-read from its safetensors shards, not to the NF4 weights the adapter was trained
against: NF4 rounding is then not baked into the exported model. It works one shard at a
time (read a shard, add the deltas that belong to it, write it), so peak memory is about one
shard plus the adapter, whatever the size of the model.

`from_4bit=True` instead merges into the dequantized NF4 weights, for users who no longer
have the original weights (or whose base is a pre-quantized checkpoint). That output equals
the QLoRA model as trained, and differs from base+adapter in full precision by the NF4
rounding error, which it measures and prints.

The result is written to a temporary folder and renamed into place, optionally after
checking that merged logits equal base+adapter logits on a few probe prompts. A selective
merge takes the same paths (shard by shard, or --from-4bit), writing each trained tensor in
place of the base's.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import LoRAConfig, ModelConfig, QuantConfig
from ..data.formats import find_end_of_turn_id
from ..errors import AdapterError, ExportError, ShardError
from ..folders import find_write_problem, write_atomically
from ..memory import read_peak_rss_bytes
from ..methods.folder import PROMPT_INFO_NAME, find_base_model, read_adapter_json, read_adapter_weights
from ..methods.lora import LORA_METHOD, attach_adapter, check_adapter_fits, collect_lora_pairs, compute_delta, read_adapter_config
from ..methods.selective import SELECTIVE_METHOD, attach_selective, check_selective_fits, read_selective
from ..methods.table import find_saved_method
from ..quant import DTYPES, dequantize_weight, is_4bit_linear, load_base_model, load_tokenizer, save_tokenizer, set_4bit_compute_dtype
from ..safetensors_io import SAFE_INDEX_NAME, SAFETENSORS_DTYPES, ShardWriter, iter_tensors, read_header, write_tensors
from ..verify import MERGE_REL_TOL, PROBE_PROMPTS, decide_verify, describe_skipped_check

SAFE_SINGLE_NAME = "model.safetensors"
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", **{name: name for name in DTYPES}}
MAX_SHARD_BYTES = 5 * 1024**3  # shard size for --from-4bit output (the default path keeps the base's shards)


@dataclass
class MergeReport:
    """What merge_adapter did and measured."""

    out_dir: Path
    dtype: str
    num_shards: int
    merged_modules: int  # LoRA layers merged, or base tensors replaced (SELECTIVE)
    num_parameters: int
    from_4bit: bool
    max_logit_diff: float | None = None  # merged vs base+adapter (the check --verify makes)
    threshold: float | None = None
    nf4_logit_diff: float | None = None  # --from-4bit: merged vs full-precision base+adapter
    peak_rss_bytes: int = 0
    num_probes: int = len(PROBE_PROMPTS)
    notes: list[str] = field(default_factory=list)
    peft_type: str = LORA_METHOD.peft_type  # the adapter kind merged (its entry in the table of methods says how to report it)


def merge_adapter(
    adapter_dir: str | Path,
    out_dir: str | Path,
    base: str | None = None,
    dtype: str = "auto",
    from_4bit: bool = False,
    verify: bool | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> MergeReport:
    """Merge the adapter in adapter_dir into its base and write a plain HF model to out_dir.

    Args:
        adapter_dir: a PEFT-format LoRA adapter folder (ours or PEFT's), or a selective one.
            Bottleneck adapters and soft prompts are refused (ExportError): they cannot be merged.
        out_dir: the folder to create; refused if it exists and is not empty, unless overwrite.
        base: the base model folder or hub id; default: the adapter's base_model_name_or_path.
        dtype: bf16 / fp16 / fp32 (or the long names), or auto = the base checkpoint's dtype.
        from_4bit: merge into dequantized NF4 weights instead of the original ones (lossy).
        verify: compare logits of merged vs base+adapter on probe prompts and fail above a
            threshold; None = only for bases of at most verify.AUTO_VERIFY_MAX_PARAMS parameters.
        overwrite: replace a non-empty out_dir (only once the new folder is complete).
        allow_pickle: accept an adapter whose weights are only in adapter_model.bin.
    """
    adapter_dir = Path(adapter_dir)
    out_dir = Path(out_dir)
    plan = plan_merge(adapter_dir, allow_pickle)
    base_path = download_base(find_base_model(adapter_dir, plan.peft_config, base))
    check_out_dir(out_dir, overwrite, [base_path, adapter_dir])
    checkpoint = read_checkpoint_layout(base_path)
    tokenizer_dir = find_tokenizer_dir(adapter_dir, base_path)
    num_parameters = checkpoint.num_parameters
    out_dtype = resolve_out_dtype(dtype, base_path)
    if not from_4bit:
        check_full_precision(checkpoint)
        plan.check_checkpoint(checkpoint)
    verify = decide_verify(verify, num_parameters)
    report = MergeReport(out_dir, out_dtype, 0, plan.num_merged, num_parameters, from_4bit, peft_type=plan.peft_type)
    if not verify:
        report.notes.append(describe_skipped_check(num_parameters, "logits (holds the model in fp32 twice)"))

    def write(tmp: Path) -> None:
        if from_4bit:
            report.num_shards = write_merged_from_4bit(base_path, plan, out_dtype, tmp)
        else:
            report.num_shards = write_merged_shards(checkpoint, plan.merge_tensor, out_dtype, tmp)
        write_model_files(base_path, tokenizer_dir, out_dtype, tmp, adapter_dir)
        if from_4bit:
            report.nf4_logit_diff = measure_nf4_loss(base_path, checkpoint, plan, tmp)
        if verify:
            report.max_logit_diff, report.threshold = verify_merge(base_path, plan, tmp, out_dtype, from_4bit)
            if report.max_logit_diff > report.threshold:
                raise ExportError(
                    f"merged model answers differently from base+adapter: max |logit difference| {report.max_logit_diff:.3g} "
                    f"> threshold {report.threshold:.3g}; nothing was written to {out_dir}. Check that --base is the model "
                    "the adapter was trained on, or try --dtype fp32"
                )
        report.peak_rss_bytes = read_peak_rss_bytes()

    write_atomically(out_dir, write)
    return report


# --- what the adapter does to the base ---------------------------------------------------------


@dataclass
class MergePlan:
    """One adapter as merge sees it, whatever its kind: how it changes base tensors, how to check and attach it."""

    peft_type: str  # the adapter's peft_type (a mergeable method's)
    peft_config: dict[str, Any]  # adapter_config.json
    num_merged: int  # LoRA layers merged, or base tensors replaced
    merge_tensor: Callable[[str, torch.Tensor], torch.Tensor]  # (tensor name, base tensor) -> merged tensor
    check_checkpoint: Callable[[CheckpointLayout], None]  # every target is in the checkpoint with fitting shapes
    check_model: Callable[[nn.Module], None]  # the same against the loaded NF4 base (--from-4bit)
    attach: Callable[[nn.Module], None]  # turns a loaded base into base+adapter: the reference logits
    skip_modules: list[str] = field(default_factory=list)  # linear layers an NF4 base must keep unquantized


def plan_merge(adapter_dir: Path, allow_pickle: bool) -> MergePlan:
    """Read the adapter and decide how it merges; refuse the kinds that cannot be folded into weights."""
    method = find_saved_method(adapter_dir)  # an unknown peft_type goes to LoRA's reader, which refuses it
    if method.merge_refusal is not None:
        raise ExportError(method.merge_refusal.format(adapter_dir=adapter_dir))
    # Two ways to fold an adapter in: replace base tensors (selective), or add a delta (LoRA).
    if method.replaces_base_tensors:
        return plan_selective_merge(adapter_dir, allow_pickle, method.peft_type)
    return plan_lora_merge(adapter_dir, allow_pickle, method.peft_type)


def plan_lora_merge(adapter_dir: Path, allow_pickle: bool, peft_type: str = LORA_METHOD.peft_type) -> MergePlan:
    cfg, raw = read_adapter_config(adapter_dir)
    weights = read_adapter_weights(adapter_dir, allow_pickle=allow_pickle)
    pairs = collect_lora_pairs(weights)
    return MergePlan(
        peft_type=peft_type,
        peft_config=raw,
        num_merged=len(pairs),
        merge_tensor=partial(add_lora_delta, pairs, cfg),
        check_checkpoint=partial(check_adapter_matches_checkpoint, pairs),
        check_model=partial(check_adapter_fits, cfg=cfg, weights=weights),
        attach=partial(attach_lora_in_fp32, cfg=cfg, weights=weights),
    )


def plan_selective_merge(adapter_dir: Path, allow_pickle: bool, peft_type: str = SELECTIVE_METHOD.peft_type) -> MergePlan:
    cfg, weights = read_selective(adapter_dir, allow_pickle=allow_pickle)
    return MergePlan(
        peft_type=peft_type,
        peft_config=read_adapter_json(adapter_dir),
        num_merged=len(weights),
        merge_tensor=partial(replace_tensor, weights),
        check_checkpoint=partial(check_selective_matches_checkpoint, weights),
        check_model=partial(check_selective_fits, cfg=cfg, weights=weights),
        # The reference base is loaded in fp32, and copying casts each tensor to its parameter's dtype.
        attach=partial(attach_selective, cfg=cfg, weights=weights),
        # A layer trained unquantized must stay so in the NF4 base, or its tensor would not fit there.
        skip_modules=cfg.unquantized_modules,
    )


def add_lora_delta(pairs: dict, cfg: LoRAConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A LoRA target's weight plus its delta, in fp32; any other tensor unchanged."""
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and module in pairs:
        return tensor.float() + compute_delta(pairs[module], cfg)
    return tensor


def replace_tensor(weights: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A selective adapter's trained tensor where it has one; the base tensor otherwise."""
    return weights.get(name, tensor)


def attach_lora_in_fp32(model: nn.Module, cfg: LoRAConfig, weights: dict[str, torch.Tensor]) -> None:
    attach_adapter(model, replace(cfg, dtype="float32"), {k: v.float() for k, v in weights.items()})


def check_selective_matches_checkpoint(weights: dict[str, torch.Tensor], checkpoint: CheckpointLayout) -> None:
    """Every replaced tensor must exist in the checkpoint with the same shape; checked before writing."""
    for name, tensor in sorted(weights.items()):
        if name not in checkpoint.shapes:
            raise AdapterError(
                f"adapter replaces {name}, but the base checkpoint in {checkpoint.folder} has no such tensor: the adapter "
                "was made for a different base model (check base_model_name_or_path in adapter_config.json, or pass --base)"
            )
        if tuple(tensor.shape) != tuple(checkpoint.shapes[name]):
            raise AdapterError(
                f"adapter tensor {name} has shape {tuple(tensor.shape)} but the base checkpoint's {name} has shape "
                f"{checkpoint.shapes[name]}: the adapter was made for a different base model"
            )


# --- inputs ---------------------------------------------------------------------------------


def download_base(name_or_path: str) -> str:
    """A local folder for the base: as given, or a hub snapshot of its weights, config and tokenizer."""
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"])
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; all mean the same to the user
        raise ExportError(
            f"base {name_or_path!r} is not a local folder and could not be downloaded ({type(err).__name__}: {str(err)[:200]}); "
            "download it (huggingface-cli download) and pass --base DIR"
        ) from err


def check_out_dir(out_dir: Path, overwrite: bool, protected: list) -> None:
    """Refuse a non-empty out_dir without overwrite, and never one that holds the inputs."""
    for path in protected:
        path = Path(path).resolve()
        if out_dir.resolve() == path or out_dir.resolve() in path.parents:
            raise ExportError(f"--out {out_dir} would replace {path}, an input of this merge; choose another folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {out_dir} is a file; choose a folder name")
    problem = find_write_problem(out_dir)
    if problem:
        raise ExportError(f"--out {out_dir} cannot be written: {problem}; choose a folder you can write")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ExportError(f"--out {out_dir} exists and is not empty; choose a new folder or pass --overwrite to replace it")


@dataclass
class CheckpointLayout:
    """Where each tensor of a safetensors checkpoint lives, and its shape (read from headers only)."""

    folder: Path
    shard_of: dict[str, str]  # tensor name -> shard file name
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]
    indexed: bool

    @property
    def shard_names(self) -> list[str]:
        return sorted(set(self.shard_of.values()))

    @property
    def num_parameters(self) -> int:
        """Every tensor's element count summed: the model's size, read from the headers alone."""
        return sum(numel(shape) for shape in self.shapes.values())


def read_checkpoint_layout(base_path: str) -> CheckpointLayout:
    folder = Path(base_path)
    index = folder / SAFE_INDEX_NAME
    if index.is_file():
        shard_of = json.loads(index.read_text())["weight_map"]
        indexed = True
    elif (folder / SAFE_SINGLE_NAME).is_file():
        shard_of, indexed = {}, False
    else:
        found = sorted(p.name for p in folder.iterdir())[:8]
        raise ExportError(
            f"{folder} holds no safetensors weights ({SAFE_SINGLE_NAME} or {SAFE_INDEX_NAME}; found {found}); merge reads "
            "the base's safetensors shards. Re-save the base with save_pretrained(safe_serialization=True), or use --from-4bit"
        )
    shapes, dtypes = {}, {}
    for shard in sorted(set(shard_of.values())) or [SAFE_SINGLE_NAME]:
        try:
            entries, _ = read_header(folder / shard)
        except (OSError, ShardError) as err:
            raise ExportError(f"cannot read the base checkpoint shard {folder / shard} ({err}); re-download the base model") from err
        for entry in entries:
            shapes[entry.name], dtypes[entry.name] = entry.shape, entry.dtype
            shard_of.setdefault(entry.name, shard)
    return CheckpointLayout(folder, shard_of, shapes, dtypes, indexed)


def find_tokenizer_dir(adapter_dir: Path, base_path: str) -> Path:
    """The adapter's folder when it holds the tokenizer it was trained with (chat template included), else the base's."""
    for folder in (adapter_dir, Path(base_path)):
        if any((folder / name).is_file() for name in ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")):
            return folder
    raise ExportError(
        f"no tokenizer in {adapter_dir} or {base_path}, so the merged folder could not be served; "
        "copy the base model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into the adapter folder"
    )


def is_quantized(checkpoint: CheckpointLayout) -> bool:
    """A bitsandbytes 4/8-bit checkpoint stores its weights as packed integers."""
    return any(dtype in ("U8", "I8") for dtype in checkpoint.dtypes.values())


def check_full_precision(checkpoint: CheckpointLayout) -> None:
    if is_quantized(checkpoint):
        raise ExportError(
            f"the base in {checkpoint.folder} is a quantized checkpoint: it has no full-precision weights to merge into. "
            "Pass --base with the original model, or --from-4bit to merge into its dequantized weights (lossy)"
        )


def numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def resolve_out_dtype(name: str, base_path: str) -> str:
    """bf16/fp16/fp32 to torch names; auto = the dtype config.json records for the base (bf16 if none)."""
    if name == "auto":
        config = json.loads((Path(base_path) / "config.json").read_text())
        recorded = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
        return recorded if recorded in DTYPES else "bfloat16"
    if name not in DTYPE_ALIASES:
        raise ExportError(f"--dtype {name!r} is not one of bf16, fp16, fp32 (or auto)")
    return DTYPE_ALIASES[name]


def check_adapter_matches_checkpoint(pairs: dict, checkpoint: CheckpointLayout) -> None:
    """Every adapter module must be a 2-D weight in the checkpoint with matching shapes; checked before writing."""
    for module, (a, b) in sorted(pairs.items()):
        key = f"{module}.weight"
        if key not in checkpoint.shapes:
            raise AdapterError(
                f"adapter targets {module}, but the base checkpoint in {checkpoint.folder} has no tensor {key}: "
                "the adapter was made for a different base model (check base_model_name_or_path in adapter_config.json, or pass --base)"
            )
        want = checkpoint.shapes[key]
        for part, got, need in (("A", a.shape, (a.shape[0], want[-1])), ("B", b.shape, (want[0], b.shape[-1]))):
            if len(want) != 2 or tuple(got) != tuple(need) or a.shape[0] != b.shape[1]:
                raise AdapterError(
                    f"adapter tensor {module}.lora_{part}.weight has shape {tuple(got)} but base weight {key} has shape {want}: "
                    "the adapter was made for a different base model"
                )


# --- writing ----------------------------------------------------------------------------------


def cast_for_export(name: str, tensor: torch.Tensor, dtype: str) -> torch.Tensor:
    """Floating tensors to the output dtype (integer ones untouched); fp16 overflow is an error, not inf."""
    if not tensor.is_floating_point():
        return tensor
    out = tensor.to(DTYPES[dtype])
    if dtype == "float16" and not torch.isfinite(out).all() and torch.isfinite(tensor).all():
        raise ExportError(f"{name} has values beyond fp16's range (65504) after merging; export with --dtype bf16 or fp32")
    return out.contiguous()


def write_merged_shards(
    checkpoint: CheckpointLayout, merge_tensor: Callable[[str, torch.Tensor], torch.Tensor], out_dtype: str, tmp: Path
) -> int:
    """Copy the base checkpoint shard by shard, passing each tensor through merge_tensor; returns the shard count.

    Tensors are read, merged, cast and written one at a time, so memory holds about one
    tensor (and the adapter), not one shard.
    """
    total_bytes = 0
    for shard in tqdm(checkpoint.shard_names or [SAFE_SINGLE_NAME], desc="merging shards", unit="shard"):
        entries, _ = read_header(checkpoint.folder / shard)
        layout = [(e.name, export_dtype(e.dtype, out_dtype), e.shape) for e in entries]
        with ShardWriter(tmp / shard, layout) as writer:
            for key, tensor in iter_tensors(checkpoint.folder / shard):
                writer.write(key, cast_for_export(key, merge_tensor(key, tensor), out_dtype))
        total_bytes += writer.data_bytes
    if checkpoint.indexed:
        write_index(tmp, checkpoint.shard_of, total_bytes)
    return max(1, len(checkpoint.shard_names))


def export_dtype(stored: str, out_dtype: str) -> torch.dtype:
    """The dtype a stored tensor is written in: out_dtype for floating tensors, unchanged otherwise."""
    if stored not in SAFETENSORS_DTYPES:
        raise ExportError(f"the base checkpoint stores tensors as {stored}, which merge cannot read; use a bf16/fp16/fp32 base")
    dtype = SAFETENSORS_DTYPES[stored]
    return DTYPES[out_dtype] if dtype.is_floating_point else dtype


def write_index(folder: Path, shard_of: dict[str, str], total_bytes: int) -> None:
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(shard_of.items()))}
    (folder / SAFE_INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def write_merged_from_4bit(base_path: str, plan: MergePlan, out_dtype: str, tmp: Path) -> int:
    """Load the base in NF4, dequantize every 4-bit weight, merge the adapter, and write shards.

    Holds the merged model in memory (this path cannot stream: the NF4 weights exist only once
    quantized). Returns the shard count.
    """
    model = load_nf4_base(base_path, plan.skip_modules)
    plan.check_model(model)
    state = collect_dequantized_state(model, plan.merge_tensor, out_dtype)
    del model
    shards = split_into_shards(state, MAX_SHARD_BYTES)
    if len(shards) == 1:
        write_tensors(tmp / SAFE_SINGLE_NAME, shards[0])
        return 1
    shard_of = {}
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_tensors(tmp / name, shard)
        shard_of.update(dict.fromkeys(shard, name))
    write_index(tmp, shard_of, sum(t.numel() * t.element_size() for t in state.values()))
    return len(shards)


def load_nf4_base(base_path: str, skip_modules: list[str] | None = None) -> nn.Module:
    """The base as QLoRA trained against it: NF4 weights (but skip_modules), fp32 compute (exact dequantized matmuls)."""
    model = load_base_model(
        ModelConfig(name_or_path=base_path), QuantConfig(compute_dtype="float32"), torch.device("cpu"), base_path, skip_modules=skip_modules
    )
    set_4bit_compute_dtype(model, torch.float32)
    return model


def collect_dequantized_state(
    model: nn.Module, merge_tensor: Callable[[str, torch.Tensor], torch.Tensor], out_dtype: str
) -> dict[str, torch.Tensor]:
    """A plain state dict: NF4 weights dequantized, passed through merge_tensor, everything cast to out_dtype.

    named_parameters skips tied duplicates (lm_head tied to the embeddings), as checkpoints do.
    """
    modules = dict(model.named_modules())
    state = {}
    for name, param in model.named_parameters():
        module_path, _, leaf = name.rpartition(".")
        module = modules[module_path]
        tensor = dequantize_weight(module).float() if leaf == "weight" and is_4bit_linear(module) else param.detach()
        state[name] = cast_for_export(name, merge_tensor(name, tensor), out_dtype)
    for module_path, module in modules.items():
        for leaf, buffer in module.named_buffers(recurse=False):
            if buffer is not None and leaf not in module._non_persistent_buffers_set:
                name = f"{module_path}.{leaf}" if module_path else leaf
                state[name] = cast_for_export(name, buffer, out_dtype)
    return state


def split_into_shards(state: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


# --- checking -----------------------------------------------------------------------------------


def verify_merge(base_path: str, plan: MergePlan, merged_dir: Path, out_dtype: str, from_4bit: bool) -> tuple[float, float]:
    """Max |logit difference| between base+adapter and the merged model on the probes, and the allowed maximum.

    Both run in fp32, so the difference is the merge's own rounding (to out_dtype), not compute
    noise. The reference base is the full-precision one, or the NF4 one for --from-4bit.
    """
    base = load_nf4_base(base_path, plan.skip_modules) if from_4bit else load_plain_model(base_path)
    diff, scale = compare_with_merged(base, plan, merged_dir)
    return diff, MERGE_REL_TOL[out_dtype] * scale


def measure_nf4_loss(base_path: str, checkpoint: CheckpointLayout, plan: MergePlan, merged_dir: Path) -> float | None:
    """--from-4bit: max |logit difference| of the merged model vs full-precision base+adapter.

    None when the base checkpoint is itself quantized: without the original weights the NF4
    rounding cannot be measured.
    """
    if is_quantized(checkpoint):
        return None
    return compare_with_merged(load_plain_model(base_path), plan, merged_dir)[0]


def compare_with_merged(base: nn.Module, plan: MergePlan, merged_dir: Path) -> tuple[float, float]:
    """(max |logit difference|, max(1, max |reference logit|)) of base+adapter (fp32) vs the merged model."""
    probes = tokenize_probes(merged_dir)
    plan.attach(base)
    reference = run_probes(base, probes)
    del base  # free it before loading the merged model: only one model in memory at a time
    merged = run_probes(load_plain_model(str(merged_dir)), probes)
    scale = max(1.0, max(r.abs().max().item() for r in reference))
    return max((m - r).abs().max().item() for m, r in zip(merged, reference)), scale


def load_plain_model(path: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokenize_probes(folder: Path) -> list[torch.Tensor]:
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(folder)), str(folder))
    return [torch.tensor([tokenizer(text)["input_ids"]]) for text in PROBE_PROMPTS]


@torch.no_grad()
def run_probes(model: nn.Module, probes: list[torch.Tensor]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    return [model(input_ids=ids.to(device), use_cache=False).logits.float().cpu() for ids in probes]


def write_model_files(base_path: str, tokenizer_dir: Path, out_dtype: str, tmp: Path, adapter_dir: Path | None = None) -> None:
    """config.json (dtype updated, no quantization_config), generation_config.json, the tokenizer, and the adapter's qlora_lite.json.

    A SentencePiece `tokenizer.model` is copied as well (from the tokenizer's folder, else the
    base's; quant.save_tokenizer says why).
    qlora_lite.json records the format the adapter was trained on, which `generate --format auto`
    and `export-gguf` (its chat template) read.
    """
    from transformers import AutoConfig, GenerationConfig

    config = json.loads((Path(base_path) / "config.json").read_text())
    config.pop("quantization_config", None)  # the merged weights are plain tensors
    config["dtype"] = out_dtype
    if "torch_dtype" in config:
        config["torch_dtype"] = out_dtype
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    generation = Path(base_path) / "generation_config.json"
    if generation.is_file():
        shutil.copyfile(generation, tmp / "generation_config.json")
    else:
        GenerationConfig.from_model_config(AutoConfig.from_pretrained(str(tmp))).save_pretrained(str(tmp))
    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(tokenizer_dir)), str(tokenizer_dir))
    save_tokenizer(tokenizer, tmp, [tokenizer_dir, Path(base_path)])
    if adapter_dir is not None and (adapter_dir / PROMPT_INFO_NAME).is_file():
        shutil.copyfile(adapter_dir / PROMPT_INFO_NAME, tmp / PROMPT_INFO_NAME)
    add_eos_ids(tmp / "generation_config.json", [tokenizer.eos_token_id, find_end_of_turn_id(tokenizer)])


def add_eos_ids(generation_config: Path, eos_ids: list[int | None]) -> None:
    """Add ids to generation_config.json's eos_token_id (after those it lists), so that servers stop there.

    A chat adapter ends its answers with the template's end-of-turn token (Llama-3 <|eot_id|>);
    a base model's generation config names only its EOS (<|end_of_text|>), so vLLM, TGI and
    transformers would otherwise run on past the end of the turn.
    """
    config = json.loads(generation_config.read_text())
    listed = config.get("eos_token_id")
    listed = listed if isinstance(listed, list) else [listed] if listed is not None else []
    merged = list(dict.fromkeys([*listed, *(i for i in eos_ids if i is not None)]))
    if merged != listed:
        config["eos_token_id"] = merged if len(merged) > 1 else merged[0]
        generation_config.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
