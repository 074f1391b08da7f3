"""llama.cpp, the one module that knows it: its converter scripts, its quantize API, and a GGUF loaded to check it.

The conversion is llama.cpp's own converter (`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py` and
the `gguf-py` they import), run as a subprocess, never a rewrite of it: taken from a llama.cpp
checkout the user points to (`--llama-cpp DIR` or `$QLORA_LITE_LLAMA_CPP`), or else from the
llama-cpp-python source distribution of the version we tested (LLAMA_CPP_PYTHON_VERSION, checked by
its sha256), downloaded once with pip and cached. Quantization types the converter does not write
(q4_k_m) go through llama.cpp's quantize API in the Python binding, and the binding also loads the
result to check it (`LlamaCppModel`). gguf-py, installed as the `gguf` package, rewrites a converted
file's vocabulary (`copy_vocabulary`: an export on a GGUF base takes the original's). The export runs both in a child process (this module run with
`python -m`): llama.cpp aborts its process on some files, and a crash there is one line here, not a
core dump of qlora-lite. Nothing here imports torch: `qlora-lite --help` reads GGUF_TYPES.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from .errors import GGUFError
from .folders import cache_root

GGUF_EXTRA = "pip install 'qlora-lite[gguf]'"

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The llama-cpp-python release whose converter and binding the tests ran (pinned in tested-versions.txt)."""

LLAMA_CPP_COMMIT = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
"""The llama.cpp commit that release vendors (its converter, gguf-py and the compiled library)."""

SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
"""sha256 of llama_cpp_python-0.3.36.tar.gz on PyPI: pip refuses any other file."""

CONVERTER_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
"""What is kept of the source distribution's vendor/llama.cpp: the converters, what they import, the licence."""

LLAMA_CPP_ENV = "QLORA_LITE_LLAMA_CPP"

# --type -> how it is made: the converter writes these outtypes itself; the rest are
# quantized from an f16 conversion by llama.cpp's quantize API (llama_ftype values of llama.h).
CONVERTER_TYPES = ("f16", "bf16", "q8_0")

QUANTIZED_TYPES = {"q4_k_m": 15}  # LLAMA_FTYPE_MOSTLY_Q4_K_M

GGUF_TYPES = (*CONVERTER_TYPES, *QUANTIZED_TYPES)

LORA_TYPES = ("f16", "bf16", "q8_0")  # convert_lora_to_gguf.py's outtypes we offer


@dataclass
class Converter:
    """llama.cpp's converter scripts, where they were found."""

    folder: Path  # holds convert_hf_to_gguf.py, convert_lora_to_gguf.py, conversion/ and gguf-py/
    origin: str  # for the report: which llama.cpp this is

    @property
    def model_script(self) -> Path:
        return self.folder / "convert_hf_to_gguf.py"

    @property
    def lora_script(self) -> Path:
        return self.folder / "convert_lora_to_gguf.py"

    @property
    def metadata_script(self) -> Path:
        return self.folder / "gguf-py" / "gguf" / "scripts" / "gguf_new_metadata.py"


BINDING_MISSING = f"export-gguf needs llama.cpp's Python binding (llama-cpp-python): {GGUF_EXTRA}"


def check_binding_installed() -> None:
    """Refuse early when the binding is missing, without importing it.

    Importing it loads libllama, and the parent process never calls llama.cpp: the child processes do
    (run_in_child).
    """
    if importlib.util.find_spec("llama_cpp") is None:
        raise GGUFError(BINDING_MISSING)


def require_binding():
    """llama.cpp's Python binding (quantize, and loading a GGUF to check it); the gguf extra brings it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise GGUFError(BINDING_MISSING) from err
    return llama_cpp


def read_binding_version() -> str:
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:  # a binding on sys.path without its metadata
        return "unknown"


# ---------------------------------------------------------------------------------------------
# The converter: found, or taken from the tested source distribution
# ---------------------------------------------------------------------------------------------


def find_converter(llama_cpp_dir: str | Path | None = None, cache_dir: Path | None = None) -> Converter:
    """llama.cpp's converter: in llama_cpp_dir (or $QLORA_LITE_LLAMA_CPP), else the tested one, cached."""
    given = llama_cpp_dir or os.environ.get(LLAMA_CPP_ENV)
    if given:
        folder = Path(given).expanduser()
        missing = [part for part in ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/") if not (folder / part).exists()]
        if missing:
            raise GGUFError(
                f"{folder} is not a llama.cpp checkout: it lacks {', '.join(missing)}; pass the folder of a clone of "
                f"https://github.com/ggml-org/llama.cpp (tested: commit {LLAMA_CPP_COMMIT[:7]}), or drop --llama-cpp"
            )
        return Converter(folder, f"llama.cpp checkout {folder} (untested version; tested: {LLAMA_CPP_COMMIT[:7]})")
    return ensure_tested_converter(cache_dir)


def ensure_tested_converter(cache_dir: Path | None = None) -> Converter:
    """The converter of llama-cpp-python LLAMA_CPP_PYTHON_VERSION, extracted once into the cache.

    pip downloads the source distribution, checked against SDIST_SHA256; only CONVERTER_PARTS
    are kept (about 2 MB), in a folder renamed into place once complete.
    """

    cache_dir = Path(cache_dir) if cache_dir is not None else cache_root()
    folder = cache_dir / f"llama.cpp-converter-{LLAMA_CPP_PYTHON_VERSION}"
    origin = f"llama.cpp {LLAMA_CPP_COMMIT[:7]} (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION})"
    if (folder / "convert_hf_to_gguf.py").is_file():
        return Converter(folder, origin)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=cache_dir))
    try:
        print(f"downloading llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} source, 77 MB; once) ...", flush=True)
        sdist = download_sdist(tmp)
        extract_converter(sdist, tmp / "converter")
        if not (folder / "convert_hf_to_gguf.py").is_file():  # another process may have finished first
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp / "converter", folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Converter(folder, origin)


def download_sdist(folder: Path) -> Path:
    requirement = folder / "requirement.txt"
    requirement.write_text(f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} --hash=sha256:{SDIST_SHA256}\n")
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--require-hashes",
        "--quiet", "--dest", str(folder), "-r", str(requirement),
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    found = sorted(folder.glob("llama_cpp_python-*.tar.gz"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise GGUFError(
            f"could not download llama.cpp's converter (llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} source) with pip: {last}; "
            f"pass --llama-cpp DIR (a llama.cpp clone, tested: commit {LLAMA_CPP_COMMIT[:7]}) or set ${LLAMA_CPP_ENV}"
        )
    return found[0]


def extract_converter(sdist: Path, dest: Path) -> None:
    """Only CONVERTER_PARTS of the sdist's vendor/llama.cpp, as plain files (tarfile's data filter)."""
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            relative = member.name.removeprefix(prefix)
            if member.name.startswith(prefix) and any(relative == p or (p.endswith("/") and relative.startswith(p)) for p in CONVERTER_PARTS):
                member.name = relative
                members.append(member)
        archive.extractall(dest, members=members, filter="data")
    if not (dest / "convert_hf_to_gguf.py").is_file():
        raise GGUFError(f"{sdist.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py; pass --llama-cpp DIR (a llama.cpp clone)")


def run_script(script: Path, args: list[str], what: str) -> str:
    """Run one of llama.cpp's Python scripts; its log (stdout + stderr) is returned, or quoted in the error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # every input is local
    env.pop("NO_LOCAL_GGUF", None)  # the scripts must import the gguf-py they ship with
    result = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, check=False)
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise GGUFError(explain_converter_failure(log, what))
    return log


def explain_converter_failure(log: str, what: str) -> str:
    """One line naming why llama.cpp's converter stopped, and what to do."""
    if "pre-tokenizer was not recognized" in log or "BPE pre-tokenizer" in log:
        return (
            f"llama.cpp's converter refused {what}'s tokenizer: it is a byte-pair tokenizer whose pre-tokenizer llama.cpp does "
            "not know (it recognises the tokenizers of released models by hash). Give the model a SentencePiece "
            "tokenizer.model (qlora_lite.tiny.build_sentencepiece_tokenizer) or a released model's tokenizer"
        )
    unsupported = re.search(r"Model (\S+) is not supported", log)
    if unsupported:
        return f"llama.cpp cannot convert architecture {unsupported.group(1)} ({what}); see convert_hf_to_gguf.py --print-supported-models"
    lines = [line for line in log.strip().splitlines() if line.strip() and not line.startswith("INFO:")]
    last = lines[-1].strip() if lines else "no output"
    return f"llama.cpp's converter failed on {what}: {last[:400]}; nothing was written"


_SUPPORTED: dict[Path, set[str]] = {}  # converter folder -> its architectures, listed once per process


def list_supported_architectures(converter: Converter) -> set[str]:
    """The `architectures` names convert_hf_to_gguf.py converts (its --print-supported-models, TEXT section)."""
    if converter.folder not in _SUPPORTED:
        log = run_script(converter.model_script, ["--print-supported-models"], "the list of supported models")
        text = log.split("TEXT models:", 1)[-1].split("MMPROJ models:", 1)[0]
        _SUPPORTED[converter.folder] = set(re.findall(r"^\s*-\s*(\S+)\s*$", text, flags=re.MULTILINE))
    return _SUPPORTED[converter.folder]


def check_architecture(converter: Converter, model_dir: Path) -> None:
    """Refuse an architecture the converter does not list, before a merge that could take minutes."""
    config = json.loads((model_dir / "config.json").read_text())
    architectures = config.get("architectures") or [config.get("model_type", "?")]
    supported = list_supported_architectures(converter)
    if supported and not any(name in supported for name in architectures):
        raise GGUFError(
            f"llama.cpp cannot convert architecture {architectures[0]} ({model_dir / 'config.json'}): its converter "
            f"({converter.origin}) does not list it; export the merged model for vLLM or transformers instead (qlora-lite merge)"
        )


def convert_model(converter: Converter, staged: Path, gguf_type: str, end_of_turn_id: int | None, work: Path) -> Path:
    """The converter's GGUF of the staged folder, quantized if asked, with the end-of-turn token set (None: EOS ends turns)."""
    outtype = gguf_type if gguf_type in CONVERTER_TYPES else "f16"
    converted = work / f"converted-{outtype}.gguf"
    run_script(converter.model_script, [str(staged), "--outfile", str(converted), "--outtype", outtype], str(staged.name))
    if gguf_type in QUANTIZED_TYPES:
        quantized = work / f"quantized-{gguf_type}.gguf"
        quantize_gguf(converted, quantized, QUANTIZED_TYPES[gguf_type], f"quantizing the f16 conversion to {gguf_type}")
        converted.unlink()
        converted = quantized
    if end_of_turn_id is not None:
        # The converter writes EOS but not a chat template's own end of turn; gguf-py's metadata tool adds it.
        marked = work / "final.gguf"
        run_script(
            converter.metadata_script,
            [str(converted), str(marked), "--special-token-by-id", "eot", str(end_of_turn_id), "--force"],
            "setting the end-of-turn token",
        )
        converted.unlink()
        converted = marked
    return converted


def quantize_gguf(source: Path, dest: Path, ftype: int, doing: str) -> None:
    """llama.cpp's quantize API on source, run in a child process (see run_in_child); `doing` names it in a crash."""
    hint = "nothing was written; try --type q8_0 or f16, which the converter writes without llama.cpp's quantize"
    status = run_in_child({"op": "quantize", "source": str(source), "dest": str(dest), "ftype": ftype}, doing, hint)
    if status != 0 or not dest.is_file():
        raise GGUFError(f"llama.cpp's quantize failed on {source.name} (status {status}); try --type q8_0 or f16")


def quantize_here(source: str, dest: str, ftype: int) -> int:
    """llama.cpp's quantize API in this process: its status, 0 when dest was written."""
    llama_cpp = require_binding()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    quiet_llama_cpp_logs()
    return llama_cpp.llama_model_quantize(source.encode(), dest.encode(), ctypes.byref(params))


def convert_lora(converter: Converter, staged_adapter: Path, staged_base: Path, gguf_type: str, work: Path, what: str) -> Path:
    """A PEFT LoRA folder as a GGUF LoRA (convert_lora_to_gguf.py); llama.cpp scales it by lora_alpha / r.

    `what` names the adapter in an error: the user's folder, as staged_adapter is a temporary copy
    that is removed before the message is read.
    """
    written = work / "lora.gguf"
    run_script(
        converter.lora_script,
        [str(staged_adapter), "--base", str(staged_base), "--outfile", str(written), "--outtype", gguf_type],
        what,
    )
    return written


def is_vocabulary_key(key: str) -> bool:
    """The metadata of how text becomes ids (tokens, scores, types, merges, model, pre, space prefix): not which ids are
    special or added, which the export sets from the layout as for any base."""
    special = key.endswith("_token_id") or (key.startswith("tokenizer.ggml.add_") and key.endswith("_token"))
    return key.startswith("tokenizer.ggml.") and not special


def copy_vocabulary(converted: Path, original: Path, dest: Path) -> Path:
    """converted with the original GGUF's vocabulary keys (is_vocabulary_key), tensors and other metadata as they are.

    The cache folder of a GGUF base has transformers' rebuild of the original's vocabulary (tokenizer.json); from it the
    converter writes, for a SentencePiece vocabulary, tokens without their scores (all -1000), so llama.cpp would
    tokenize differently from training. The original file has the vocabulary llama.cpp tokenized with when the base was
    cached. gguf-py (the gguf package a GGUF base is dequantized with) copies the tensors' bytes unchanged.
    """
    try:
        import gguf
    except ImportError as err:
        raise GGUFError(f"an export on a GGUF base reads the original's vocabulary with the gguf package, which is missing; {GGUF_EXTRA}") from err
    ours, theirs = gguf.GGUFReader(converted), gguf.GGUFReader(original)
    writer = gguf.GGUFWriter(dest, ours.get_field("general.architecture").contents(), endianess=ours.endianess)
    kept = [f for f in ours.fields.values() if not (f.name.startswith("GGUF.") or f.name == "general.architecture" or is_vocabulary_key(f.name))]
    for field_ in kept + [f for f in theirs.fields.values() if is_vocabulary_key(f.name)]:
        kind = field_.types[0]
        writer.add_key_value(field_.name, field_.contents(), kind, sub_type=field_.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in ours.tensors:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in ours.tensors:
        writer.write_tensor_data(tensor.data, tensor_endianess=ours.endianess)
    writer.close()
    converted.unlink()
    return dest


# ---------------------------------------------------------------------------------------------
# A GGUF in llama.cpp: tokenize, logits, greedy answers
# ---------------------------------------------------------------------------------------------


_LOG_SINK = None  # the C callback that drops llama.cpp's log lines; kept alive here


def quiet_llama_cpp_logs() -> None:
    """Silence llama.cpp's per-load log lines (hundreds) on stderr, for the rest of the process; its errors reach us as return codes."""
    global _LOG_SINK
    llama_cpp = require_binding()
    if _LOG_SINK is None:
        _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p(0))


class LlamaCppModel:
    """A GGUF loaded by llama.cpp (through the binding's C API): tokenize, last-token logits, greedy answers.

    Loaded without llama.cpp's extra CPU buffer types (weight repacking, AMX): in llama.cpp
    0c1e570 they crash (segfault) on the q8_0 tensors of 128-wide models such as the demo on
    an AMX CPU; without them the same kernels as on any CPU run.

    Example:
        with LlamaCppModel("demo-f16.gguf") as model:
            answer_ids = model.generate(model.tokenize(prompt), max_new_tokens=16)
    """

    def __init__(
        self, path: str | Path, lora_path: str | Path | None = None, n_ctx: int = 512, n_threads: int = 1, vocab_only: bool = False
    ) -> None:
        self.llama_cpp = llama_cpp = require_binding()
        quiet_llama_cpp_logs()
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False
        params.vocab_only = vocab_only
        self.ctx = self.adapter = None
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise GGUFError(f"llama.cpp could not load {path}; is it a complete GGUF model file?")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        if vocab_only:  # tokenize and read metadata only
            return
        context = llama_cpp.llama_context_default_params()
        context.n_ctx = context.n_batch = context.n_ubatch = n_ctx
        context.n_threads = context.n_threads_batch = n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, context)
        if lora_path is not None:
            self.adapter = llama_cpp.llama_adapter_lora_init(self.model, str(lora_path).encode())
            if not self.adapter:
                raise GGUFError(f"llama.cpp could not load the LoRA {lora_path} on {path}; was it converted for this base?")
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(self.adapter)
            llama_cpp.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0))

    def __enter__(self) -> LlamaCppModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.ctx:
            self.llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if self.adapter:
            self.llama_cpp.llama_adapter_lora_free(self.adapter)
            self.adapter = None
        if self.model:
            self.llama_cpp.llama_model_free(self.model)
            self.model = None

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids as a llama.cpp server makes them: BOS if the file says so, special tokens in the text recognised."""
        data = text.encode()
        room = len(data) + 8
        buffer = (self.llama_cpp.llama_token * room)()
        count = self.llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, room, add_special, parse_special)
        if count < 0:
            raise GGUFError(f"llama.cpp could not tokenize {text[:40]!r}")
        return list(buffer[:count])

    def detokenize(self, ids: list[int]) -> str:
        """The text of answer ids as `generate` decodes them (the tokenizer's decode, skip_special_tokens=True).

        llama.cpp's own detokenizer: special tokens (EOS, end of turn) write nothing, and a SentencePiece
        vocabulary's word-start mark on the first token is no space, as SentencePiece and transformers
        decode; the vocabulary's piece texts joined would keep that mark.
        """
        llama_cpp = self.llama_cpp
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        room = 16 + 8 * len(ids)
        for _ in range(2):
            buffer = ctypes.create_string_buffer(room)
            count = llama_cpp.llama_detokenize(self.vocab, tokens, len(ids), buffer, room, False, False)
            if count >= 0:
                return buffer.raw[:count].decode(errors="replace")
            room = -count  # the room it needs
        raise GGUFError(f"llama.cpp could not detokenize {len(ids)} tokens")

    def is_end_of_generation(self, token_id: int) -> bool:
        """Whether llama.cpp stops generating at this token (EOS, EOT and the like)."""
        return bool(self.llama_cpp.llama_vocab_is_eog(self.vocab, token_id))

    def metadata(self, key: str) -> str | None:
        """A GGUF metadata value as text (the model's, or the LoRA adapter's when one is loaded and has the key)."""
        buffer = ctypes.create_string_buffer(1 << 16)
        for owner, read in ((self.adapter, self.llama_cpp.llama_adapter_meta_val_str), (self.model, self.llama_cpp.llama_model_meta_val_str)):
            if owner and read(owner, key.encode(), buffer, len(buffer)) >= 0:
                return buffer.value.decode()
        return None

    def last_logits(self, ids: list[int]):
        """The logits llama.cpp computes after the ids (a fresh sequence), as a numpy array (n_vocab,)."""
        import numpy as np

        self._decode(ids, fresh=True)
        return np.ctypeslib.as_array(self.llama_cpp.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,)).copy()

    def generate(self, ids: list[int], max_new_tokens: int = 32) -> list[int]:
        """Greedy new ids after the prompt ids (llama.cpp's greedy sampler), the end-of-generation token included if it came."""
        llama_cpp = self.llama_cpp
        sampler = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        llama_cpp.llama_sampler_chain_add(sampler, llama_cpp.llama_sampler_init_greedy())
        try:
            self._decode(ids, fresh=True)
            new: list[int] = []
            while len(new) < max_new_tokens:
                token = llama_cpp.llama_sampler_sample(sampler, self.ctx, -1)
                new.append(token)
                if self.is_end_of_generation(token):
                    break
                self._decode([token], fresh=False)
            return new
        finally:
            llama_cpp.llama_sampler_free(sampler)

    def _decode(self, ids: list[int], fresh: bool) -> None:
        llama_cpp = self.llama_cpp
        if fresh:
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        tokens = (llama_cpp.llama_token * len(ids))(*ids)  # referenced until decode returns
        status = llama_cpp.llama_decode(self.ctx, llama_cpp.llama_batch_get_one(tokens, len(ids)))
        if status != 0:
            raise GGUFError(f"llama.cpp could not evaluate {len(ids)} tokens (status {status}); the context holds 512")


# ---------------------------------------------------------------------------------------------
# llama.cpp in a child process
# ---------------------------------------------------------------------------------------------
#
# llama.cpp ends its process on some files instead of returning an error: a C++ exception nobody
# catches (a SentencePiece vocabulary without byte tokens throws std::out_of_range on a character it
# lacks), an assert. In-process that is a core dump of qlora-lite with a gdb backtrace, and the
# temporary folder left behind; in a child it is a return code, said here in one line. The child is
# this module run with `python -m`: one JSON request on stdin; on stdout one JSON line per item it
# starts ({"step": i}, so that a crash says what it was doing), then {"answer": ...} or {"error": "..."}.


@dataclass
class LlamaCppCrash:
    """How a child running llama.cpp ended without an answer."""

    how: str  # describe_crash's words: "SIGABRT, std::out_of_range: unordered_map::at"
    step: int | None  # the index of the item (text, probe) it had started, if any


def run_in_child(request: dict, doing: str, hint: str, explain: Callable[[LlamaCppCrash], str | None] | None = None) -> Any:
    """serve_request(request) in a child process: its answer, its GGUFError raised here, or a crash as one GGUFError.

    The crash's line: "llama.cpp crashed (HOW) while DOING: CAUSE", the cause being explain(crash) when
    it knows one, else hint (which says what to do).
    """
    env = {**os.environ, "GGML_NO_BACKTRACE": "1"}  # else ggml's crash handler attaches gdb: 0.7 s, and 80 lines of backtrace
    env.pop("PYTHONFAULTHANDLER", None)  # its Python traceback would bury llama.cpp's last words on stderr
    # The child imports this very qlora_lite, however the parent found it (an install, a checkout on sys.path).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "qlora_lite.llama_cpp"], input=json.dumps(request), capture_output=True, text=True,
        errors="replace", env=env, check=False,
    )  # fmt: skip
    lines = []
    for line in result.stdout.splitlines():
        with contextlib.suppress(ValueError):
            lines.append(json.loads(line))
    last = lines[-1] if lines else {}
    if result.returncode == 0 and "answer" in last:
        return last["answer"]
    if result.returncode == 0 and "error" in last:
        raise GGUFError(last["error"])
    step = next((line["step"] for line in reversed(lines) if "step" in line), None)
    crash = LlamaCppCrash(describe_crash(result.returncode, result.stderr), step)
    raise GGUFError(f"llama.cpp crashed ({crash.how}) while {doing}: {(explain(crash) if explain else None) or hint}")


def describe_crash(returncode: int, stderr: str) -> str:
    """A crashed child's end in a few words: the signal (or exit code), and llama.cpp's last line on stderr."""
    if returncode < 0:
        try:
            how = signal.Signals(-returncode).name
        except ValueError:
            how = f"signal {-returncode}"
    else:
        how = f"exit code {returncode}"
    # An uncaught C++ exception: "terminate called after throwing an instance of 'T'" then "  what():  message".
    thrown = re.search(r"throwing an instance of '([^']+)'\s*\n\s*what\(\):\s*(.*)", stderr)
    if thrown:
        words = f"{thrown.group(1)}: {thrown.group(2).strip()}"
    else:
        lines = [line.strip() for line in stderr.splitlines() if line.strip()]
        words = lines[-1] if lines else ""
    return f"{how}, {words[:200]}" if words else how


def tokenize_in_child(
    path: str | Path, texts: list[str], doing: str, explain: Callable[[LlamaCppCrash], str | None] | None = None
) -> list[list[int]]:
    """LlamaCppModel(path, vocab_only=True).tokenize of each text, in a child process; a crash's step is the text's index."""
    hint = (
        "nothing was written, and a llama.cpp server would likely crash on this file too; report it to llama.cpp "
        f"(tested: {LLAMA_CPP_COMMIT[:7]}) with the model's tokenizer files"
    )
    return run_in_child({"op": "tokenize", "path": str(path), "texts": texts}, doing, hint, explain)


def last_logits_in_child(path: str | Path, probes: list[list[int]], doing: str, lora_path: str | Path | None = None):
    """LlamaCppModel(path, lora_path=lora_path).last_logits of each probe, in a child process: float32 numpy arrays, bit for bit."""
    import numpy as np

    hint = (
        "nothing was written, and a llama.cpp server would likely crash on this file too; try another --type, or report "
        f"it to llama.cpp (tested: {LLAMA_CPP_COMMIT[:7]}) with the model's config.json"
    )
    request = {"op": "last_logits", "path": str(path), "probes": probes, "lora": None if lora_path is None else str(lora_path)}
    answer = run_in_child(request, doing, hint)
    return [np.frombuffer(base64.b64decode(text), dtype="<f4") for text in answer]


def serve_request(request: dict, announce: Callable[[int], None]) -> Any:
    """What the child does for one request (run_in_child's); announce(i) before item i."""
    if request["op"] == "quantize":
        return quantize_here(request["source"], request["dest"], request["ftype"])
    if request["op"] == "tokenize":
        with LlamaCppModel(request["path"], vocab_only=True) as model:
            ids = []
            for i, text in enumerate(request["texts"]):
                announce(i)
                ids.append(model.tokenize(text))
            return ids
    if request["op"] == "last_logits":
        with LlamaCppModel(request["path"], lora_path=request.get("lora")) as model:
            answer = []
            for i, ids in enumerate(request["probes"]):
                announce(i)
                answer.append(base64.b64encode(model.last_logits(ids).astype("<f4").tobytes()).decode())  # exact floats
            return answer
    raise ValueError(f"unknown request {request['op']!r}")


def main() -> None:
    """The child: one request from stdin, the answer on stdout; whatever llama.cpp prints goes to stderr."""
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # llama.cpp's (C) prints on stdout would mix into the answer

    def send(message: dict) -> None:
        answers.write(json.dumps(message) + "\n")
        answers.flush()  # a step must be out before llama.cpp may crash

    request = json.load(sys.stdin)
    try:
        send({"answer": serve_request(request, lambda step: send({"step": step}))})
    except GGUFError as err:
        send({"error": str(err)})


if __name__ == "__main__":
    main()
