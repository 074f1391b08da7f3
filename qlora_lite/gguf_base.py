"""A GGUF as the base: the file a user already runs in llama.cpp, Ollama or LM Studio, fine-tuned like any base.

    model.name_or_path: ~/models/Llama-3.2-1B-Instruct-Q4_K_M.gguf        # a file
    model.name_or_path: ollama:llama3.2                                     # pulled by Ollama ([:TAG], default latest)
    model.name_or_path: ~/.lmstudio/models/bartowski/Llama-3.2-1B-Instruct-GGUF   # an LM Studio folder holding one GGUF

find_gguf_file resolves the name to one file. read_gguf_config reads the model's config from the
metadata alone, with our own reader of the GGUF header (the planner: nothing dequantized, a fraction
of a second where the `gguf` package's reader takes ~16 s on a 150k-token vocabulary).
ensure_gguf_base dequantizes the file once, through transformers' GGUF loader (which the `gguf` package
serves), into a plain model folder in the cache, keyed by the file's sha256:

    config.json                 transformers' reading of the metadata, and Llama-3's rope scaling, which
                                llama.cpp keeps only as the rope_freqs.weight tensor (transformers drops it)
    model.safetensors           bf16: a k-quant's or q8_0's values are products of an fp16 scale and a
                                small integer, which bf16 rounds by at most 2^-9 relative; the NF4 load
                                that follows rounds far more
    tokenizer files             from the file's vocabulary, its chat template kept; a SentencePiece
                                vocabulary puts the word-start mark after special tokens, as llama.cpp does
    gguf_source.json            where it came from, and what the round trip cost (below)
    gguf_probes.safetensors     the probe prompts' ids and llama.cpp's last-token logits on the original file

From there the base loads 4-bit like any folder. measure_round_trip compares the loaded base with
llama.cpp on the same probes, so a run says what dequantizing and re-quantizing cost.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import GGUFError
from .folders import cache_root, write_atomically
from .llama_cpp import GGUF_EXTRA, last_logits_in_child, read_binding_version, tokenize_in_child
from .verify import PROBE_PROMPTS, relative_logit_difference

OLLAMA_PREFIX = "ollama:"
OLLAMA_MODELS_ENV = "OLLAMA_MODELS"
OLLAMA_HOST, OLLAMA_NAMESPACE, OLLAMA_TAG = "registry.ollama.ai", "library", "latest"  # Ollama's defaults (types/model/name.go)
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
SOURCE_NAME = "gguf_source.json"
PROBES_NAME = "gguf_probes.safetensors"
CACHE_DTYPE = torch.bfloat16
SPLIT_FILE = re.compile(r"-\d{5}-of-\d{5}\.gguf$", re.IGNORECASE)
# llama.cpp's architecture name -> transformers' model_type, where they differ (as load_gguf_checkpoint maps them)
MODEL_TYPES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
# The causal language models both transformers' GGUF loader and this trainer handle.
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "starcoder2", "stablelm", "nemotron")


def is_gguf_name(name: str) -> bool:
    """Whether a model name asks for a GGUF base: `ollama:...`, a path ending in .gguf, or a folder of GGUFs without config.json."""
    if name.startswith(OLLAMA_PREFIX) or name.lower().endswith(".gguf"):
        return True
    path = Path(name).expanduser()
    return path.is_dir() and not (path / "config.json").is_file() and any(path.glob("*.gguf"))


# ---------------------------------------------------------------------------- the name -> one file


def find_gguf_file(name: str) -> Path:
    """The one GGUF file a name means (an Ollama blob, an LM Studio folder's model, or the file itself); one-line GGUFError otherwise."""
    if name.startswith(OLLAMA_PREFIX):
        return find_ollama_blob(name[len(OLLAMA_PREFIX) :])
    path = Path(name).expanduser().absolute()
    if path.is_dir():
        return find_model_in_folder(path)
    if not path.is_file():
        raise GGUFError(f"GGUF file {path} does not exist; check model.name_or_path")
    if SPLIT_FILE.search(path.name):
        raise GGUFError(
            f"{path.name} is one part of a split GGUF; merge the parts first (llama-gguf-split --merge FIRST-PART OUT.gguf) and train on the result"
        )
    return path


def ollama_models_dir() -> Path:
    """Where Ollama keeps its models: $OLLAMA_MODELS, else ~/.ollama/models (envconfig.Models)."""
    value = os.environ.get(OLLAMA_MODELS_ENV, "").strip().strip("'\"")
    return Path(value).expanduser() if value else Path.home() / ".ollama" / "models"


def parse_ollama_name(name: str) -> tuple[str, str, str, str]:
    """(host, namespace, model, tag) as Ollama reads `[host/][namespace/]model[:tag]` (ParseNameBare)."""
    rest, tag = name, OLLAMA_TAG
    if ":" in name and name.rfind(":") > name.rfind("/"):
        rest, tag = name[: name.rfind(":")], name[name.rfind(":") + 1 :]
    parts = rest.split("/")
    if not rest or len(parts) > 3 or not all(parts) or not tag:
        raise GGUFError(f"ollama:{name} is not an Ollama model name; write ollama:NAME or ollama:NAME:TAG (as `ollama list` shows them)")
    model, namespace, host = parts[-1], (parts[-2] if len(parts) > 1 else OLLAMA_NAMESPACE), (parts[-3] if len(parts) > 2 else OLLAMA_HOST)
    return host, namespace, model, tag


def find_ollama_blob(name: str) -> Path:
    """The model blob an Ollama manifest names: manifests/<host>/<namespace>/<model>/<tag> -> blobs/sha256-<hex>."""
    host, namespace, model, tag = parse_ollama_name(name)
    models = ollama_models_dir()
    if not (models / "manifests").is_dir():
        raise GGUFError(
            f"ollama:{name}: there is no Ollama model store at {models} (no manifests folder); "
            f"set {OLLAMA_MODELS_ENV} to the folder `ollama pull` stores models in"
        )
    manifest = models / "manifests" / host / namespace / model / tag
    if not manifest.is_file():
        known = list_ollama_models(models)
        listed = ", ".join(known[:12]) + (", ..." if len(known) > 12 else "") if known else "none"
        raise GGUFError(f"ollama:{name}: Ollama has no model {model}:{tag} in {models} (it has: {listed}); `ollama pull {model}:{tag}` first")
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except (json.JSONDecodeError, KeyError, TypeError, StopIteration) as err:
        raise GGUFError(
            f"ollama:{name}: the manifest {manifest} names no model file ({OLLAMA_MODEL_LAYER} layer): a cloud model, "
            "or not a GGUF model; pull a local GGUF model"
        ) from err
    blob = models / "blobs" / digest.replace(":", "-")
    if not blob.is_file():
        raise GGUFError(f"ollama:{name}: its model file {blob} is missing from the store; `ollama pull {model}:{tag}` again")
    return blob


def list_ollama_models(models: Path) -> list[str]:
    """The store's models as `ollama list` names them (library ones without host and namespace)."""
    names = []
    for manifest in sorted((models / "manifests").glob("*/*/*/*")):
        host, namespace, model, tag = manifest.parts[-4:]
        prefix = "" if (host, namespace) == (OLLAMA_HOST, OLLAMA_NAMESPACE) else f"{host}/{namespace}/"
        names.append(f"{prefix}{model}:{tag}")
    return names


def find_model_in_folder(folder: Path) -> Path:
    """An LM Studio model folder's one model GGUF (vision projectors, adapters and split parts left out)."""
    files = sorted(p for p in folder.glob("*.gguf") if not p.name.lower().startswith("mmproj"))
    models = [p for p in files if read_gguf_header(p).metadata.get("general.type", "model") == "model"]
    if not models:
        raise GGUFError(f"{folder} holds no GGUF model (only {', '.join(p.name for p in files) or 'no .gguf files'}); name the model file itself")
    if len(models) > 1:
        raise GGUFError(
            f"{folder} holds {len(models)} GGUF models ({', '.join(p.name for p in models)}); name the one to train, "
            f"e.g. model.name_or_path={models[0]}"
        )
    return find_gguf_file(str(models[0]))


# ---------------------------------------------------------------------------- the header, read without the gguf package


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml's order: the row length first
    ggml_type: int
    offset: int  # from the start of the data section


@dataclass
class GGUFHeader:
    """A GGUF file's metadata and tensor table (what the GGUF spec calls the header); string arrays kept as their length."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)
    data_offset: int = 0


# GGUF's value types (gguf.h): scalar ones by struct format; 8 is a string, 9 an array
VALUE_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY_TYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9
LONG_ARRAY = 1024  # a numeric array longer than this (token scores, types) is kept as its length: the config never needs it


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """The metadata and tensor table of a GGUF file (spec v2/v3), reading nothing of the tensor data; GGUFError if it is not one."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data[:4] != b"GGUF":
                raise GGUFError(f"{path} is not a GGUF file (it does not start with 'GGUF'); check model.name_or_path")
            version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
            if version not in (2, 3):
                raise GGUFError(f"{path} is GGUF version {version}; qlora-lite reads versions 2 and 3 (llama.cpp's since 2023)")
            pos, metadata = 24, {}
            for _ in range(n_kv):
                key, pos = _read_string(data, pos)
                (kind,), pos = struct.unpack_from("<I", data, pos), pos + 4
                metadata[key], pos = _read_value(data, pos, kind)
            header = GGUFHeader(path, metadata)
            for _ in range(n_tensors):
                name, pos = _read_string(data, pos)
                (dims,), pos = struct.unpack_from("<I", data, pos), pos + 4
                shape = struct.unpack_from(f"<{dims}Q", data, pos)
                ggml_type, offset = struct.unpack_from("<IQ", data, pos + 8 * dims)
                pos += 8 * dims + 12
                header.tensors[name] = GGUFTensor(name, tuple(shape), ggml_type, offset)
            alignment = int(metadata.get("general.alignment", 32))
            header.data_offset = -(-pos // alignment) * alignment
            return header
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as err:
        raise GGUFError(f"{path} is not a complete GGUF file (its header is cut short or corrupt: {err}); download it again") from err


def _read_string(data, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, pos)
    if pos + 8 + length > len(data):
        raise ValueError(f"a string of {length} bytes runs past the end of the file at byte {pos}")
    return data[pos + 8 : pos + 8 + length].decode("utf-8"), pos + 8 + length


def _read_value(data, pos: int, kind: int) -> tuple[Any, int]:
    if kind == STRING:
        return _read_string(data, pos)
    if kind == ARRAY:
        item, count = struct.unpack_from("<IQ", data, pos)
        pos += 12
        if item == STRING:  # the vocabulary and merges: stepped over, kept as their count
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", data, pos)
                pos += 8 + length
            return count, pos
        if item not in NUMPY_TYPES:
            raise ValueError(f"array of value type {item}")
        values = np.frombuffer(data, dtype=NUMPY_TYPES[item], count=count, offset=pos)
        return (count if count > LONG_ARRAY else values.tolist()), pos + values.nbytes
    if kind not in VALUE_FORMATS:
        raise ValueError(f"value type {kind}")
    (value,) = struct.unpack_from(VALUE_FORMATS[kind], data, pos)
    return value, pos + struct.calcsize(VALUE_FORMATS[kind])


def read_f32_tensor(header: GGUFHeader, name: str) -> np.ndarray | None:
    """A small F32 tensor's values (rope_freqs.weight), or None when the file has no such tensor."""
    tensor = header.tensors.get(name)
    if tensor is None or tensor.ggml_type != 0:
        return None
    with open(header.path, "rb") as f:
        f.seek(header.data_offset + tensor.offset)
        return np.frombuffer(f.read(4 * math.prod(tensor.shape)), dtype="<f4").astype(np.float64)


# ---------------------------------------------------------------------------- the config, from the metadata alone


def read_gguf_config(name: str):
    """The transformers config of a GGUF base from its metadata alone (nothing dequantized): what the planner reads."""
    from transformers import AutoConfig

    path = find_gguf_file(name)
    header = read_gguf_header(path)
    check_architecture(header)
    config = build_config_dict(header)
    return AutoConfig.for_model(config.pop("model_type"), **config)


def find_model_type(header: GGUFHeader) -> str:
    """transformers' model_type for the file's architecture (llama.cpp calls Mistral llama; transformers tells them by name)."""
    arch = header.metadata.get("general.architecture", "")
    if arch == "llama" and "mistral" in str(header.metadata.get("general.name", "")).lower():
        return "mistral"
    return MODEL_TYPES.get(arch, arch)


def check_architecture(header: GGUFHeader) -> None:
    """Refuse what is no model this trainer can train from a GGUF: an adapter, a vision projector, an architecture transformers cannot read."""
    kind, arch = header.metadata.get("general.type", "model"), header.metadata.get("general.architecture")
    if kind != "model" or arch == "clip":
        what = "a vision projector" if arch == "clip" else f"general.type {kind}"
        raise GGUFError(f"{header.path.name} is not a model GGUF ({what}); name the model file itself")
    if find_model_type(header) not in ARCHITECTURES:
        raise GGUFError(
            f"{header.path.name} holds a '{arch}' model; as a GGUF base qlora-lite reads {', '.join(ARCHITECTURES)} "
            "(what transformers' GGUF loader reads and this trainer trains); train from the original safetensors model instead"
        )


def build_config_dict(header: GGUFHeader) -> dict[str, Any]:
    """model_type and config keys as transformers' load_gguf_checkpoint maps them (its own mapping tables), and Llama-3's rope scaling."""
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    metadata, arch, model_type = header.metadata, header.metadata["general.architecture"], find_model_type(header)
    config: dict[str, Any] = {"model_type": model_type, **GGUF_CONFIG_DEFAULTS_MAPPING.get(model_type, {})}
    for key, hf_key in GGUF_CONFIG_MAPPING[model_type].items():
        if hf_key and f"{arch}.{key}" in metadata:
            config[hf_key] = metadata[f"{arch}.{key}"]
    for key, hf_key in GGUF_CONFIG_MAPPING["tokenizer"].items():
        if f"tokenizer.{key}" in metadata:
            config[hf_key] = metadata[f"tokenizer.{key}"]
    config.setdefault("vocab_size", metadata.get("tokenizer.ggml.tokens"))  # the vocabulary's length (kept as a count)
    config["tie_word_embeddings"] = "output.weight" not in header.tensors
    if model_type == "gemma3":
        config["model_type"] = "gemma3_text"  # the file holds the text model only
    rope = recover_llama3_rope(header, config)
    if rope is not None:
        config["rope_parameters"] = rope
    return config


def recover_llama3_rope(header: GGUFHeader, config: dict[str, Any]) -> dict[str, Any] | None:
    """Llama-3's rope scaling from the factors llama.cpp's converter stored in rope_freqs.weight (its only record of it).

    The converter writes, per frequency pair, 1 (short wavelengths), `factor` (long ones) and
    1 / ((1 - s) / factor + s) between, with s = (orig / wavelen - low) / (high - low). factor is the
    largest value; low, high and orig come from the band between (low = 1, as every Llama 3.x has it), else
    Llama 3.1's published 1, 4, 8192. The parameters are accepted only if they give back every stored factor.
    """
    stored = read_f32_tensor(header, "rope_freqs.weight")
    if stored is None:
        return None
    theta = float(config.get("rope_theta", 10000.0))
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    wavelen = 2 * math.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    factor = float(stored.max())
    candidates = [(1.0, 4.0, 8192.0)]
    band = (stored > 1 + 1e-6) & (stored < factor - 1e-6)
    if band.sum() >= 2 and factor > 1:
        smooth = (1 / stored[band] - 1 / factor) / (1 - 1 / factor)  # s = a / wavelen - b, a = orig / (high - low), b = low / (high - low)
        a, minus_b = np.polyfit(1 / wavelen[band], smooth, 1)
        if -minus_b > 0:  # rounded as a config writes them (4.0, not 3.9999994 from the float32 factors)
            high = round(1 + 1 / -minus_b, 3)
            candidates.insert(0, (1.0, high, round(a * (high - 1))))
    for low, high, orig in candidates:
        params = {"rope_type": "llama3", "rope_theta": theta, "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                  "original_max_position_embeddings": int(round(orig))}  # fmt: skip
        if np.allclose(llama3_rope_factors(wavelen, params), stored, rtol=1e-4, atol=1e-5):
            return params
    raise GGUFError(
        f"{header.path.name} stores rope scaling factors (rope_freqs.weight) that are not Llama 3's; qlora-lite cannot rebuild "
        "them for transformers, and training without them would change every position; train from the original model instead"
    )


def llama3_rope_factors(wavelen: np.ndarray, params: dict[str, Any]) -> np.ndarray:
    """The per-frequency factors llama.cpp's converter writes for Llama-3 rope scaling (conversion/llama.py)."""
    factor, low, high, orig = params["factor"], params["low_freq_factor"], params["high_freq_factor"], params["original_max_position_embeddings"]
    smooth = (orig / wavelen - low) / (high - low)
    between = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < orig / high, 1.0, np.where(wavelen > orig / low, factor, between))


# ---------------------------------------------------------------------------- dequantized once, into the cache


def check_dequantizable(header: GGUFHeader) -> None:
    """The gguf package is installed and dequantizes every tensor type of the file (refused in one line, before any slow step)."""
    try:
        import gguf
    except ImportError as err:
        raise GGUFError(f"a GGUF base is dequantized by transformers through the gguf package, which is missing; {GGUF_EXTRA}") from err
    unreadable = set()
    for ggml_type in {t.ggml_type for t in header.tensors.values()}:
        try:  # one block of zeros, dequantized: what transformers will ask of every tensor of this type
            kind = gguf.GGMLQuantizationType(ggml_type)
            gguf.quants.dequantize(np.zeros(gguf.GGML_QUANT_SIZES[kind][1], dtype=np.uint8), kind)
        except (ValueError, KeyError, NotImplementedError):
            unreadable.add(name_ggml_type(ggml_type))
    if unreadable:
        names = ", ".join(sorted(unreadable))
        raise GGUFError(
            f"{header.path.name} has tensors of type {names}, which the gguf package ({gguf_version()}) cannot dequantize; "
            "use a file of another quantization (Q4_K_M, Q5_K_M, Q8_0, F16 all work)"
        )


def gguf_version() -> str:
    from importlib import metadata

    try:
        return "gguf " + metadata.version("gguf")
    except metadata.PackageNotFoundError:
        return "gguf"


def hash_file(path: Path) -> str:
    """The file's sha256: an Ollama blob's name says it; otherwise computed (1.4 s per GiB here) and remembered by path, size and mtime."""
    if re.fullmatch(r"sha256-[0-9a-f]{64}", path.name):
        return path.name.removeprefix("sha256-")
    stat = path.stat()
    memo_file = cache_root() / "gguf" / "sha256.json"
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, json.JSONDecodeError):
        memo = {}
    if key not in memo:
        with open(path, "rb") as f:
            memo[key] = hashlib.file_digest(f, "sha256").hexdigest()
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(memo, indent=1))
        os.replace(tmp, memo_file)
    return memo[key]


def ensure_gguf_base(name: str) -> Path:
    """The cached, dequantized model folder of a GGUF base, built on first use (one-line GGUFError for what cannot work)."""
    path = find_gguf_file(name)
    header = read_gguf_header(path)
    check_architecture(header)
    digest = hash_file(path)
    folder = cache_root() / "gguf" / f"{digest[:32]}-bf16"
    if (folder / SOURCE_NAME).is_file():
        return folder
    check_dequantizable(header)
    print(f"dequantizing {path.name} once into {folder} (transformers' GGUF loader; {path.stat().st_size / 2**30:.2f} GiB)", flush=True)
    write_atomically(folder, lambda tmp: write_dequantized(name, path, header, digest, tmp))
    return folder


def write_dequantized(name: str, path: Path, header: GGUFHeader, digest: str, out: Path) -> None:
    """The model folder of a GGUF: config, bf16 weights, tokenizer, and the round trip against llama.cpp on the probes."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="qlora-gguf-") as stage:
        # A folder of its own, with the file under a .gguf name: a tokenizer_config.json beside the original would win
        # over the file's vocabulary, and transformers picks the dtype of a name without .gguf by unpickling it.
        os.symlink(path, Path(stage) / "model.gguf")
        config = AutoConfig.from_pretrained(stage, gguf_file="model.gguf")
        rope = build_config_dict(header).get("rope_parameters")  # the header's reading: Llama 3's scaling, which transformers drops
        if rope is not None:
            config.rope_parameters = rope
        with quiet_transformers():  # its "weights stay packed" advice is for the architectures it keeps quantized, not these
            model = AutoModelForCausalLM.from_pretrained(stage, gguf_file="model.gguf", config=config, dtype=CACHE_DTYPE).eval()
        tokenizer = AutoTokenizer.from_pretrained(stage, gguf_file="model.gguf")
    match_llama_cpp_word_starts(tokenizer, header)
    model.hf_quantizer.remove_quantization_config(model)  # else save_pretrained refuses: "quantized with gguf, not serializable"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    texts = list(PROBE_PROMPTS)
    probes = [tokenizer(text)["input_ids"] for text in texts]
    report: dict[str, Any] = {
        "source": name, "file": str(path), "sha256": digest, "size_bytes": path.stat().st_size,
        "architecture": header.metadata.get("general.architecture"), "file_type": describe_file_type(header),
        "tensor_types": count_tensor_types(header), "dequantized_dtype": str(CACHE_DTYPE).removeprefix("torch."),
        "probes": len(probes), "dequantized_vs_llama_cpp": None, "tokenization_differs": [], "llama_cpp": None,
    }  # fmt: skip
    try:
        theirs = tokenize_in_child(path, texts, f"tokenizing the probe prompts with llama.cpp on {path.name}")
        logits = last_logits_in_child(path, probes, f"computing the probe prompts' logits with llama.cpp on {path.name}")
    except GGUFError as err:  # the binding missing, or llama.cpp crashing on the file: training can still go on
        report["llama_cpp_error"] = str(err)
    else:
        report["llama_cpp"] = read_binding_version()
        report["tokenization_differs"] = [text for text, ids, their in zip(texts, probes, theirs) if ids != their]
        ours = compute_last_logits(model, probes)
        report["dequantized_vs_llama_cpp"] = max(relative_logit_difference(l, o) for l, o in zip(logits, ours))
        tensors = {f"ids.{i}": torch.tensor(ids) for i, ids in enumerate(probes)}
        tensors |= {f"llama_cpp.{i}": torch.from_numpy(np.array(l, dtype=np.float32)) for i, l in enumerate(logits)}
        save_file(tensors, str(out / PROBES_NAME))
    report["seconds"] = round(time.perf_counter() - start, 1)
    (out / SOURCE_NAME).write_text(json.dumps(report, indent=1) + "\n")


@contextmanager
def quiet_transformers():
    from transformers.utils import logging

    before = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(before)


def match_llama_cpp_word_starts(tokenizer, header: GGUFHeader) -> None:
    """A SentencePiece vocabulary (tokenizer.ggml.model llama) puts the word-start mark after every special token, as
    llama.cpp and sentencepiece do; transformers' rebuild puts it at the text's start only, so text after
    `<|im_start|>` would tokenize differently in training and in serving."""
    from tokenizers import pre_tokenizers

    metadata = header.metadata
    if metadata.get("tokenizer.ggml.model") != "llama" or not metadata.get("tokenizer.ggml.add_space_prefix", True):
        return
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is not None and isinstance(backend.pre_tokenizer, pre_tokenizers.Metaspace):
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False)


def describe_file_type(header: GGUFHeader) -> str | None:
    """general.file_type as llama.cpp names it (MOSTLY_Q4_K_M -> Q4_K_M)."""
    value = header.metadata.get("general.file_type")
    try:
        import gguf

        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_") if value is not None else None
    except (ImportError, ValueError):
        return str(value) if value is not None else None


def name_ggml_type(ggml_type: int) -> str:
    """ggml's name of a tensor type (Q4_K), or its number when the gguf package is missing or does not know it."""
    try:
        import gguf

        return gguf.GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return str(ggml_type)


def count_tensor_types(header: GGUFHeader) -> dict[str, int]:
    """How many tensors of each ggml type (Q4_K 13, Q6_K 3, F32 5, ...)."""
    counts: dict[str, int] = {}
    for tensor in header.tensors.values():
        name = name_ggml_type(tensor.ggml_type)
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------------------- the round trip, measured


def read_gguf_source(folder: str | Path) -> dict[str, Any] | None:
    """What a GGUF base's cached folder says of its source (gguf_source.json), or None for any other folder."""
    path = Path(folder) / SOURCE_NAME
    return json.loads(path.read_text()) if path.is_file() else None


@torch.no_grad()
def compute_last_logits(model: torch.nn.Module, probes: list[list[int]]) -> list[np.ndarray]:
    """The last token's logits of each probe, in fp32, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float().cpu().numpy() for ids in probes]
    model.train(was_training)
    return out


def measure_round_trip(model: torch.nn.Module, base_path: str | Path) -> dict[str, Any] | None:
    """For a GGUF base: the loaded base's (4-bit) logits on the probes against llama.cpp's on the original file; None otherwise.

    Beside it, what the cache recorded for the bf16 dequantized base, so the log shows both steps:
    GGUF -> bf16 (dequantizing) and bf16 -> NF4 (quantizing again), each against llama.cpp.
    """
    from safetensors.torch import load_file

    source = read_gguf_source(base_path)
    if source is None:
        return None
    result = {
        "event": "gguf_round_trip", "source": source["source"], "file_type": source.get("file_type"), "probes": source["probes"],
        "loaded_vs_llama_cpp": None, "dequantized_vs_llama_cpp": source.get("dequantized_vs_llama_cpp"),
        "tokenization_differs": len(source.get("tokenization_differs", [])),
    }  # fmt: skip
    probes_file = Path(base_path) / PROBES_NAME
    if not probes_file.is_file():
        result["note"] = source.get("llama_cpp_error", "llama.cpp did not run when the base was cached")
        return result
    stored = load_file(str(probes_file))
    count = sum(1 for key in stored if key.startswith("ids."))
    probes = [stored[f"ids.{i}"].tolist() for i in range(count)]
    ours = compute_last_logits(model, probes)
    result["loaded_vs_llama_cpp"] = max(relative_logit_difference(stored[f"llama_cpp.{i}"].numpy(), o) for i, o in enumerate(ours))
    return result


def format_round_trip(result: dict[str, Any]) -> str:
    """One line for the run log."""

    def show(value: float | None) -> str:
        return "not measured" if value is None else f"{value:.3g}"

    line = (
        f"GGUF base {result['source']} ({result['file_type']}): relative logit difference from llama.cpp on {result['probes']} probes: "
        f"loaded base {show(result['loaded_vs_llama_cpp'])}, bf16 dequantized {show(result['dequantized_vs_llama_cpp'])}"
    )
    if result.get("tokenization_differs"):
        line += f"; {result['tokenization_differs']} probe(s) tokenize differently in llama.cpp"
    return line + (f" ({result['note']})" if result.get("note") else "")
