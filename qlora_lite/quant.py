"""Loading the frozen base model, in 4-bit NF4 through bitsandbytes or in plain bf16.

This is the only module that touches bitsandbytes' quantization: the BitsAndBytesConfig,
the device and dtype choices, and dequantizing a 4-bit weight back to a dense tensor.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn

from .config import ModelConfig, QuantConfig
from .errors import ModelLoadError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # a saved tensor's dtype back to its config name

# bitsandbytes 0.50, on import on an AVX512-BF16 CPU, warns that it could not load the
# kernels-community CPU gemm and asks for `pip install kernels`. That kernel only serves the packed
# inference layout that `keep_4bit_layout` turns off, so the advice is noise on every command.
# A filter on the (not yet created) logger works whenever bitsandbytes is imported after this module.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward from kernels-community" not in record.getMessage()
)


def pick_device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """Turn `quant.compute_dtype` into a torch dtype for this device.

    `auto` is bf16 on GPUs that support it, fp16 on older ones (T4, V100), and fp32 on the
    CPU, where bf16 matmuls are slower than fp32 ones on most processors.
    """
    if name != "auto":
        dtype = DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ModelLoadError(
                f"quant.compute_dtype=bfloat16 but {torch.cuda.get_device_name(device)} has no bf16 support; "
                "use quant.compute_dtype=float16 (or auto)"
            )
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def build_bnb_config(
    quant: QuantConfig, compute_dtype: torch.dtype, skip_modules: list[str] | None = None, storage: torch.dtype = torch.uint8
):
    """The BitsAndBytesConfig of QLoRA: NF4 storage, double quantization, matmuls in compute_dtype.

    skip_modules (module names or name suffixes) stay in compute_dtype instead of NF4, so that
    selective tuning can train them; lm_head is always kept, as transformers does by default.
    storage: the dtype the packed 4-bit bytes are viewed as. uint8 by default; FSDP needs a
    float dtype equal to its param_dtype, so that it can shard the packed weight like any other
    parameter (the bytes are the same, only their view changes).
    """
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=storage,
        llm_int8_skip_modules=["lm_head", *(skip_modules or [])] if skip_modules else None,
    )


def require_model_path(model: ModelConfig) -> str:
    """The recipe's name as given, for callers that did not resolve it (model_paths.py does that)."""
    if not model.name_or_path:
        raise ModelLoadError("model.name_or_path is empty; set it to a local model folder or a hub id")
    return model.name_or_path


def load_tokenizer(model: ModelConfig, path: str | None = None):
    """The base model's tokenizer, with a pad token that is not EOS where one can be had."""
    from transformers import AutoTokenizer

    path = path or require_model_path(model)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_explain_load_failure(path, err)) from err
    if tok.pad_token_id is None:
        # Labels are masked by position, not by id, so a pad equal to EOS would be safe for the
        # loss; a distinct pad still keeps batches readable. unk is the usual spare token.
        tok.pad_token = tok.unk_token if tok.unk_token is not None else tok.eos_token
    return tok


def save_tokenizer(tokenizer, folder: Path, sources: list[Path]) -> None:
    """The tokenizer's files into folder, and the SentencePiece `tokenizer.model` of the first source folder that has one.

    save_pretrained of a fast tokenizer writes tokenizer.json but not tokenizer.model, and llama.cpp's
    converter reads a SentencePiece vocabulary from the latter (without it, it rebuilds one that
    tokenizes differently): every folder training or merge writes carries it, so each one exports.
    """
    tokenizer.save_pretrained(str(folder))
    for source in sources:
        if (Path(source) / "tokenizer.model").is_file() and not (Path(folder) / "tokenizer.model").is_file():
            shutil.copyfile(Path(source) / "tokenizer.model", Path(folder) / "tokenizer.model")


def load_base_model(
    model: ModelConfig,
    quant: QuantConfig,
    device: torch.device | None = None,
    path: str | None = None,
    skip_modules: list[str] | None = None,
    shardable: bool = False,
) -> nn.Module:
    """Load the base model frozen: NF4 + double quant through bitsandbytes, or plain weights.

    skip_modules: linear layers (names or suffixes) to keep unquantized in a 4-bit load.
    shardable: store the packed 4-bit weights as the compute dtype instead of uint8, as FSDP
    needs (see build_bnb_config); the weights and their values are the same.

    The non-quantized parts (embeddings, norms, lm_head), and the whole model when
    load_in_4bit is false, are kept in the compute dtype (bf16 on modern GPUs).
    """
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    compute_dtype = resolve_compute_dtype(quant.compute_dtype, device)
    path = path or require_model_path(model)
    kwargs = dict(
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        attn_implementation=model.attn_implementation,
    )
    if quant.load_in_4bit:
        # A pre-quantized checkpoint (e.g. a *-bnb-4bit repo) carries its own settings, which win.
        if not is_prequantized(path):
            storage = compute_dtype if shardable else torch.uint8
            kwargs["quantization_config"] = build_bnb_config(quant, compute_dtype, skip_modules, storage)
        # Quantize each weight as it lands on the GPU instead of materialising the bf16 model first.
        kwargs["device_map"] = {"": device}
    try:
        base = AutoModelForCausalLM.from_pretrained(path, dtype=compute_dtype, **kwargs)
    except torch.OutOfMemoryError as err:
        raise ModelLoadError(
            f"out of GPU memory while loading {path}: the base does not fit on this GPU even in 4-bit; "
            "run `qlora-lite plan` for an estimate, close other GPU processes, or pick a smaller model"
        ) from err
    except SafetensorError as err:  # a truncated download or a disk that filled while copying
        raise ModelLoadError(
            f"the weights in {path} are corrupt or truncated (safetensors: {err}); download or copy the model again"
        ) from err
    except (OSError, ValueError) as err:
        raise ModelLoadError(_explain_load_failure(path, err)) from err
    if not quant.load_in_4bit:
        base.to(device)
    keep_4bit_layout(base)
    base.requires_grad_(False)
    base.config.use_cache = False  # the KV cache is useless in training and costs memory
    return base


def build_empty_base_model(model: ModelConfig, quant: QuantConfig, path: str, compute_dtype: torch.dtype, skip_modules: list[str] | None = None) -> nn.Module:
    """What load_base_model(shardable=True) builds, on the meta device: the modules, no weights.

    The linear layers are already bitsandbytes' Linear4bit (NF4, storage = compute dtype, as FSDP
    needs), built by the same transformers call that from_pretrained makes; `materialize_weights` then
    fills them a module at a time (training/layerwise.py).
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    kwargs = dict(revision=model.revision, trust_remote_code=model.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelLoadError(_explain_load_failure(path, err)) from err
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(config, dtype=compute_dtype, attn_implementation=model.attn_implementation, trust_remote_code=model.trust_remote_code)
    bnb_config = build_bnb_config(quant, compute_dtype, skip_modules, storage=compute_dtype)
    base = replace_with_bnb_linear(base, modules_to_not_convert=["lm_head", *(skip_modules or [])], quantization_config=bnb_config)
    keep_4bit_layout(base)
    base.requires_grad_(False)
    base.config.use_cache = False
    return base


def materialize_weights(module: nn.Module, prefix: str, read: Callable[[str], torch.Tensor], device: torch.device, compute_dtype: torch.dtype) -> None:
    """Each parameter of module still on the meta device, read from the checkpoint (read(prefix + name)) onto device.

    A Linear4bit weight is quantized to NF4 exactly as transformers quantizes it while loading
    (bitsandbytes' Params4bit with the layer's settings, moved to the device), so the bytes equal
    load_base_model's; every other weight is cast to the compute dtype, as from_pretrained(dtype=...) does.
    """
    import bitsandbytes as bnb

    for name, param in list(module.named_parameters()):
        if param.device.type != "meta":
            continue
        owner_name, _, attr = name.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        value = read(prefix + name).to(compute_dtype)
        if isinstance(param, bnb.nn.Params4bit):
            owner._parameters[attr] = bnb.nn.Params4bit(value, requires_grad=False, **param.__dict__).to(device)
        else:
            owner._parameters[attr] = nn.Parameter(value.to(device), requires_grad=False)


def restore_rotary_embeddings(base: nn.Module, device: torch.device) -> None:
    """Rebuild the rotary embedding modules built on the meta device: their inv_freq is computed in __init__, not read from the checkpoint."""
    for name, module in list(base.named_modules()):
        buffers = list(module.buffers(recurse=False))
        if buffers and any(b.device.type == "meta" for b in buffers) and hasattr(module, "inv_freq") and hasattr(module, "config"):
            rebuilt = type(module)(config=module.config).to(device)
            owner_name, _, attr = name.rpartition(".")
            setattr(base.get_submodule(owner_name) if owner_name else base, attr, rebuilt)
    left = [name for name, buffer in base.named_buffers() if buffer.device.type == "meta"]
    if left:
        raise ModelLoadError(f"cannot load {type(base).__name__} layer by layer: buffers {left[:3]} are computed at build time; set dist.strategy ddp or open an issue")


def read_prequantized_storage(path: str) -> str | None:
    """bnb_4bit_quant_storage of a pre-quantized local checkpoint (uint8 when unrecorded), or None when it is not one."""
    config = Path(path).expanduser() / "config.json"
    try:
        quantization = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    except (OSError, ValueError):
        return None
    return str(quantization.get("bnb_4bit_quant_storage", "uint8")) if isinstance(quantization, dict) else None


def is_prequantized(path: str) -> bool:
    """True for a local checkpoint whose config.json records a quantization_config."""
    config = Path(path).expanduser() / "config.json"
    try:
        return config.is_file() and "quantization_config" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def _explain_load_failure(path: str, err: Exception) -> str:
    if Path(path).expanduser().exists():
        return f"could not load the model from {path}: {err}. Check that the folder holds config.json and safetensors weights."
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        return f"model folder {path} does not exist; set model.name_or_path to a folder holding config.json, or to a hub id"
    return (
        f"could not load {path!r} from the Hugging Face hub ({type(err).__name__}: {str(err)[:300]}). "
        "If the hub is unreachable or the model is gated, download it first and set model.name_or_path to the local folder."
    )


def enable_gradient_checkpointing(model: nn.Module, checkpoint: Callable | None = None) -> None:
    """Non-reentrant checkpointing, with input gradients on so that LoRA layers inside a
    checkpointed block still get gradients when every base weight is frozen.

    checkpoint: the function each decoder layer is checkpointed with instead of torch's
    (training.offload.ActivationOffload.checkpoint), called as checkpoint(function, *args, use_reentrant=False).
    """
    kwargs = {"use_reentrant": False}
    # transformers 5.2x renamed it activation_checkpointing_enable and warns (FutureWarning) on the old name.
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()
    if checkpoint is not None:
        # transformers calls module._gradient_checkpointing_func(function, *args) in every layer it checkpoints.
        for module in model.modules():
            if hasattr(module, "_gradient_checkpointing_func"):
                module._gradient_checkpointing_func = functools.partial(checkpoint, **kwargs)


def is_4bit_linear(module: nn.Module) -> bool:
    import bitsandbytes as bnb

    return isinstance(module, bnb.nn.Linear4bit)


def keep_4bit_layout(model: nn.Module) -> None:
    """Turn off bitsandbytes' in-place CPU repacking on every Linear4bit of model.

    bitsandbytes 0.50 (`Linear4bit.forward`): on a CPU with AVX512-BF16, in eval mode with an
    input that does not require grad, it rewrites `weight.data` and its `quant_state` into a
    CPU-only packed layout (`quant_state.packing_format_for_cpu`) and never converts back. From
    then on `matmul_4bit` sends every call, training ones too, to `gemv_4bit`, which has no
    autograd formula: gradients through the layer are silently wrong, biased layers (Qwen2's
    q/k/v) crash, `dequantize_4bit` reads the packed bytes as garbage, and the kernel refuses
    out_features not divisible by 32. Its inverse is lossy (the double-quantized absmax went
    through bf16 and is quantized again). Our bases are trained after an eval pass, merged by
    dequantizing, and shared between adapters, so we keep the plain layout everywhere and give
    up only that CPU inference speed-up. The flag is read per module, set in `__init__` from
    `has_avx512bf16()`.
    """
    for module in model.modules():
        if is_4bit_linear(module):
            module.support_avx512bf16_for_cpu = False


def dequantize_weight(linear: nn.Module) -> torch.Tensor:
    """The dense weight a layer computes with: dequantized NF4 for Linear4bit, the weight itself otherwise."""
    if is_4bit_linear(linear):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(linear.weight.data, linear.weight.quant_state)
    return linear.weight.data


def set_4bit_compute_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    """Make every Linear4bit compute in dtype (a pre-quantized checkpoint brings its own, often bf16)."""
    for module in model.modules():
        if is_4bit_linear(module):
            module.compute_dtype = dtype


def is_quantized_parameter(param: torch.Tensor) -> bool:
    return type(param).__name__ == "Params4bit"


def quantized_numel(param: torch.Tensor) -> int:
    """Weights a packed 4-bit parameter holds: two per byte of storage (as PEFT counts them)."""
    storage = getattr(param, "quant_storage", torch.uint8)
    return param.numel() * 2 * torch.empty((), dtype=storage).element_size()


def describe_bitsandbytes(device: torch.device) -> dict:
    """What bitsandbytes loaded, and whether NF4 really works on device.

    Returns version, backend (CUDA, ROCm, XPU or CPU), the native library it loaded, whether its
    CPU code has AVX512-BF16, the relative error of an NF4 + double-quant round trip of a random
    64x64 matrix on device (about 0.1 when healthy), and `error`: None, or the one-line cause
    when bitsandbytes cannot quantize here.
    """
    facts: dict = {"version": None, "backend": None, "native_library": None, "cpu_avx512_bf16": None,
                   "nf4_roundtrip_rel_error": None, "error": None}  # fmt: skip
    try:
        import bitsandbytes as bnb
        import bitsandbytes.cextension as cext
        import bitsandbytes.functional as bnbf
    except Exception as err:  # an import can fail in many ways: missing, or built for another torch
        facts["error"] = f"bitsandbytes does not import ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        return facts
    facts.update(version=bnb.__version__, backend=cext.BNB_BACKEND, cpu_avx512_bf16=bool(bnbf.has_avx512bf16()))
    if isinstance(cext.lib, cext.ErrorHandlerMockBNBNativeLibrary):
        # bitsandbytes keeps importing without its compiled library and fails on the first 4-bit call.
        cause = str(getattr(cext.lib, "error_msg", "")).strip().splitlines()[:1]
        facts["error"] = f"bitsandbytes could not load its {cext.BNB_BACKEND} native library" + (f" ({cause[0][:200]})" if cause else "")
        return facts
    facts["native_library"] = Path(getattr(getattr(cext.lib, "_lib", None), "_name", "") or "?").name
    try:
        weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0)).to(device)
        packed, state = bnbf.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
        restored = bnbf.dequantize_4bit(packed, state).float()
        facts["nf4_roundtrip_rel_error"] = round(((restored - weight).norm() / weight.norm()).item(), 4)
    except Exception as err:
        facts["error"] = f"bitsandbytes NF4 quantization fails on {device} ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
        return facts
    if not facts["nf4_roundtrip_rel_error"] < 0.2:  # NF4 on a Gaussian matrix: ~0.1
        facts["error"] = f"bitsandbytes NF4 round trip on {device} is off by {facts['nf4_roundtrip_rel_error']} (expected about 0.1)"
    return facts
