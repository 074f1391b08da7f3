"""Export to GGUF for llama.cpp, LM Studio and Ollama, converted and checked by llama.cpp itself.

The one module that knows llama.cpp. The conversion is llama.cpp's own converter
(`convert_hf_to_gguf.py`, `convert_lora_to_gguf.py` and the `gguf-py` they import), run
as a subprocess, never a rewrite of it: taken from a llama.cpp checkout the user points to
(`--llama-cpp DIR` or `$QLORA_LITE_LLAMA_CPP`), or else from the llama-cpp-python source
distribution of the version we tested (LLAMA_CPP_PYTHON_VERSION, checked by its sha256),
downloaded once with pip and cached. Quantization types the converter does not write
(q4_k_m) go through llama.cpp's quantize API in the Python binding, and the binding also
loads the result to check it (LlamaCppModel).

    export_gguf(adapter or model folder, out.gguf, gguf_type)
      1. refuse early what cannot work: a file that exists, an adapter that cannot merge,
         an architecture the converter does not list, a missing extra;
      2. merge an adapter into a temporary folder (export.merge_adapter), as `merge` does;
      3. stage the model folder for the converter (weights linked, not copied): the chat
         template the adapter was trained with, tokenizer.model where only a sibling
         folder has it;
      4. convert; quantize; set the end-of-turn stop token (gguf-py's gguf_new_metadata.py);
      5. verify: llama.cpp must tokenize probe prompts to transformers' ids (always; it reads
         the vocabulary only), and give the same last-token logits within the type's
         tolerance (VERIFY_REL_TOL; by default for models up to 1B parameters);
      6. move the file into place (and write an Ollama Modelfile): nothing is left half-written.

What a server needs is in the file: `tokenizer.chat_template` (the alpaca layout for an
alpaca adapter, the tokenizer's template for a chat one, a plain concatenation for text)
and the stop tokens: EOS, and `tokenizer.ggml.eot_token_id` when a chat template ends its
turns with another token (Llama-3 `<|eot_id|>`, ChatML `<|im_end|>`).
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

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
# Allowed max |logit difference| / max(1, max |logit|), llama.cpp on the GGUF vs transformers on the
# merged fp32 folder, last token of each probe. A gate against a wrong conversion (a tensor mapped
# or rotated wrongly moves logits by about their own size), not a quality bar. Measured on the
# probes: the demo f16 2.4e-4, bf16 3.9e-3, q8_0 4.7e-3, q4_k_m 1.2e-2; a random-weight Phi-3
# (tests/test_gguf.py) f16 2.0e-3. bf16 keeps 8 mantissa bits, q4_k_m about 4.5 bits per weight.
VERIFY_REL_TOL = {"f16": 1e-2, "bf16": 5e-2, "q8_0": 5e-2, "q4_k_m": 0.25}
AUTO_VERIFY_MAX_PARAMS = 1_000_000_000  # as merge: above this, verification (a second full model in fp32) is opt-in
PROBE_CONVERSATION = [{"role": "user", "content": "Name a colour, then stop."}]
TEXT_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
"""The chat template of a text-format adapter: the prompt continued as it stands, as training saw it."""


class GGUFError(ValueError):
    """The export cannot be done as asked; the message says why and what to do."""


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


@dataclass
class PromptLayout:
    """How the exported model is prompted: the chat template written into the GGUF, and where turns end."""

    data_format: str  # alpaca, chat or text: how the adapter was trained (or --format)
    chat_template: str
    eos_token: str
    eos_id: int
    end_of_turn: str  # the token an answer ends with (EOS unless the chat template closes turns with another)
    end_of_turn_id: int


@dataclass
class GGUFReport:
    """What export_gguf wrote and measured."""

    out: Path
    gguf_type: str
    size_bytes: int
    converter: str
    lora_only: bool = False
    layout: PromptLayout | None = None
    modelfile: Path | None = None
    max_logit_diff: float | None = None  # verify: llama.cpp vs transformers, last token of each probe
    threshold: float | None = None
    num_probes: int = 0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_gguf(
    source: str | Path,
    out: str | Path,
    gguf_type: str = "f16",
    llama_cpp_dir: str | Path | None = None,
    prompt_format: str = "auto",
    ollama: bool = False,
    lora_only: bool = False,
    base: str | None = None,
    verify: bool | None = None,
    overwrite: bool = False,
    allow_pickle: bool = False,
) -> GGUFReport:
    """Write source (a merged model folder, any plain HF model folder, or an adapter folder) as one GGUF file.

    Args:
        source: A model folder (config.json + safetensors), or an adapter folder, which is merged
            into its base first (in a temporary folder, as `qlora-lite merge` does).
        out: The .gguf file to write; refused if it exists, unless overwrite.
        gguf_type: f16, bf16, q8_0 (written by the converter) or q4_k_m (llama.cpp's quantize API).
        llama_cpp_dir: A llama.cpp checkout whose converter to use; default `$QLORA_LITE_LLAMA_CPP`,
            else the tested one from llama-cpp-python's source distribution (downloaded once).
        prompt_format: The chat template to write: auto (as the adapter was trained, from its
            qlora_lite.json; else the tokenizer's template if it has one, else text), alpaca, chat or text.
        ollama: Also write `<out stem>.Modelfile` beside the GGUF for `ollama create`.
        lora_only: Write the adapter alone as a GGUF LoRA (llama-server --lora) instead of a merged model.
        base: The adapter's base folder, if not the one its adapter_config.json names.
        verify: Load the GGUF in llama.cpp and compare its logits with transformers' on probe prompts;
            None = for models of at most AUTO_VERIFY_MAX_PARAMS parameters. (Their tokenization is
            always compared.)
        overwrite: Replace an existing out (and Modelfile), only once the new one is complete.
        allow_pickle: Accept an adapter whose weights are only in adapter_model.bin.
    """
    from .adapters import read_prompt_info
    from .export import ExportError, download_base, merge_adapter

    source, out = Path(source), Path(out)
    require_binding()
    check_gguf_type(gguf_type, lora_only)
    is_adapter = (source / "adapter_config.json").is_file()
    if lora_only and ollama:
        raise GGUFError(
            "--ollama writes a Modelfile for a whole model; with --lora-only, export the base model too and add "
            "'ADAPTER ./LORA.gguf' under its FROM line yourself, or drop --lora-only"
        )
    if is_adapter:
        check_adapter_exports(source, lora_only)
    elif lora_only:
        raise GGUFError(f"--lora-only needs an adapter folder (with adapter_config.json); {source} is not one")
    else:
        check_model_folder(source)
    modelfile = out.with_suffix(".Modelfile") if ollama else None
    check_out_file(out, overwrite, modelfile)
    converter = find_converter(llama_cpp_dir)
    installed = read_binding_version()

    base_path = download_base(find_adapter_base(source, base)) if is_adapter else None
    model_dir = Path(base_path) if is_adapter else source
    check_architecture(converter, model_dir)
    tokenizer_dirs = [source, *([Path(base_path)] if base_path else [])]
    layout = find_prompt_layout(source, tokenizer_dirs, prompt_format)
    modelfile_text = build_modelfile(out.name, layout) if ollama else None
    report = GGUFReport(out, gguf_type, 0, converter.origin, lora_only=lora_only, layout=layout, modelfile=modelfile)
    if prompt_format == "auto" and not read_prompt_info(source):
        report.notes.append(
            f"{source} records no training format (qlora_lite.json), so the {layout.data_format} chat template was guessed "
            "from its tokenizer; pass --format alpaca|chat|text if the model was trained otherwise"
        )
    if installed != LLAMA_CPP_PYTHON_VERSION:
        report.notes.append(f"llama-cpp-python {installed} checks the file; the tested one is {LLAMA_CPP_PYTHON_VERSION}")

    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        if lora_only:
            written = convert_lora(converter, source, stage_model_dir(model_dir, work / "base", tokenizer_dirs, layout), gguf_type, work)
            report.notes.append(
                f"serve it on the base as GGUF: qlora-lite export-gguf {base_path} --out BASE.gguf --format {layout.data_format}, "
                f"then llama-server -m BASE.gguf --lora {out}"
            )
        else:
            if is_adapter:
                try:
                    merge_adapter(source, work / "merged", base=base_path, allow_pickle=allow_pickle)
                except ExportError as err:
                    raise GGUFError(f"cannot merge {source} before the GGUF export: {err}") from err
                model_dir = work / "merged"
            staged = stage_model_dir(model_dir, work / "stage", tokenizer_dirs, layout)
            written = convert_model(converter, staged, gguf_type, layout, work)
            probes = check_tokenization(written, staged, layout)  # always: it reads the vocabulary only
            report.num_probes = len(probes)
            num_parameters = count_parameters(staged)
            if verify or (verify is None and num_parameters <= AUTO_VERIFY_MAX_PARAMS):
                report.max_logit_diff = verify_logits(written, staged, probes)
                report.threshold = VERIFY_REL_TOL[gguf_type]
                if report.max_logit_diff > report.threshold:
                    raise GGUFError(
                        f"llama.cpp's logits on {out.name} differ from transformers' by {report.max_logit_diff:.3g} (relative to the "
                        f"largest logit; allowed for {gguf_type}: {report.threshold:.3g}); nothing was written. "
                        "Try --type f16, or report the model and this number"
                    )
            else:
                report.notes.append(
                    f"verification skipped: {num_parameters / 1e9:.2f}B parameters (> {AUTO_VERIFY_MAX_PARAMS / 1e9:.0f}B); "
                    "pass --verify to compare llama.cpp with transformers (holds the model in fp32)"
                )
        report.size_bytes = written.stat().st_size
        os.replace(written, out)  # the same folder, so the file appears whole or not at all
        if modelfile is not None:
            (work / "Modelfile").write_text(modelfile_text)
            os.replace(work / "Modelfile", modelfile)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def check_gguf_type(gguf_type: str, lora_only: bool) -> None:
    allowed = LORA_TYPES if lora_only else GGUF_TYPES
    if gguf_type not in allowed:
        what = "a GGUF LoRA" if lora_only else "a GGUF model"
        raise GGUFError(f"--type {gguf_type!r} is not one llama.cpp writes for {what}; choose one of {', '.join(allowed)}")


def check_adapter_exports(adapter_dir: Path, lora_only: bool) -> None:
    """Refuse adapters a GGUF cannot hold, before any work: soft prompts and bottleneck adapters, and non-LoRA with --lora-only."""
    from .adapters import LORA_METHOD
    from .methods import find_saved_method

    method = find_saved_method(adapter_dir)
    if method.merge_refusal is not None:
        raise GGUFError(
            "cannot export to GGUF: " + method.merge_refusal.format(adapter_dir=adapter_dir)
            + "; a GGUF holds weights, and llama.cpp has no such adapter"
        )
    if lora_only and method.peft_type != LORA_METHOD.peft_type:
        raise GGUFError(
            f"--lora-only writes LoRA A/B pairs, and {adapter_dir} is a {method.name} adapter (it replaces whole tensors); "
            "drop --lora-only to export the merged model"
        )
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if lora_only and (config.get("alpha_pattern") or config.get("use_dora")):
        raise GGUFError(
            f"{adapter_dir}: a GGUF LoRA has one alpha and no DoRA magnitudes, and this adapter uses "
            "alpha_pattern or DoRA; drop --lora-only to export the merged model"
        )


def check_model_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise GGUFError(f"{folder} is not a folder; pass a model folder (config.json + safetensors) or an adapter folder")
    if not (folder / "config.json").is_file():
        raise GGUFError(
            f"{folder} holds neither adapter_config.json (an adapter) nor config.json (a model); pass runs/NAME/adapter "
            "or a merged model folder (qlora-lite merge)"
        )


def check_out_file(out: Path, overwrite: bool, modelfile: Path | None) -> None:
    if out.suffix != ".gguf":
        raise GGUFError(f"--out {out} should end in .gguf (llama.cpp, LM Studio and Ollama look for that name)")
    if out.is_dir():
        raise GGUFError(f"--out {out} is a folder; name the file to write, e.g. {out / 'model-f16.gguf'}")
    for path in (out, modelfile):
        if path is not None and path.exists() and not overwrite:
            raise GGUFError(f"{path} exists; choose another --out or pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)


def find_adapter_base(adapter_dir: Path, base: str | None) -> str:
    from .adapters import find_base_model, read_adapter_json

    return find_base_model(adapter_dir, read_adapter_json(adapter_dir), base)


def require_binding():
    """llama.cpp's Python binding (quantize, and loading a GGUF to check it); the gguf extra brings it."""
    try:
        import llama_cpp
    except ImportError as err:
        raise GGUFError(f"export-gguf needs llama.cpp's Python binding (llama-cpp-python): {GGUF_EXTRA}") from err
    return llama_cpp


def read_binding_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:  # a binding on sys.path without its metadata
        return "unknown"


def count_parameters(model_dir: Path) -> int:
    from .export import numel, read_checkpoint_layout

    return sum(numel(shape) for shape in read_checkpoint_layout(str(model_dir)).shapes.values())


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


# ---------------------------------------------------------------------------------------------
# Prompt layout: the chat template and stop tokens that go into the file
# ---------------------------------------------------------------------------------------------


def find_prompt_layout(source: Path, tokenizer_dirs: list[Path], prompt_format: str) -> PromptLayout:
    """The chat template and end-of-turn token of the exported model, as the adapter was trained.

    alpaca: a template rendering a user message in the Alpaca no-input layout and an answer
    followed by EOS (what training learned). chat: the tokenizer's template, or the default one
    training used when it had none. text: the messages' text as it stands.
    """
    from .adapters import read_prompt_info
    from .data import DEFAULT_CHAT_TEMPLATE, find_end_of_turn_token
    from .generate import GenerationError, resolve_prompt_format

    tokenizer = load_tokenizer_from(tokenizer_dirs)
    if tokenizer.eos_token_id is None:
        raise GGUFError(f"the tokenizer in {tokenizer_dirs[0]} has no EOS token, so no server could tell where an answer ends; set eos_token")
    try:
        data_format = resolve_prompt_format(prompt_format, read_prompt_info(source).get("data_format"), tokenizer)
    except GenerationError as err:
        raise GGUFError(str(err).replace("prompt format", "--format")) from err
    if data_format == "alpaca":
        template = build_alpaca_template()
    elif data_format == "chat":
        template = tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE
    else:
        template = TEXT_TEMPLATE
    tokenizer.chat_template = template
    end = find_end_of_turn_token(tokenizer) if data_format == "chat" else None
    end = end or tokenizer.eos_token
    return PromptLayout(data_format, template, tokenizer.eos_token, tokenizer.eos_token_id, end, tokenizer.convert_tokens_to_ids(end))


def load_tokenizer_from(folders: list[Path]):
    from transformers import AutoTokenizer

    for folder in folders:
        if any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            return AutoTokenizer.from_pretrained(str(folder))
    raise GGUFError(f"no tokenizer in {' or '.join(map(str, folders))}; copy the base model's tokenizer files into {folders[0]}")


def build_alpaca_template() -> str:
    """A chat template that renders a user message as training's Alpaca prompt (no input) and an answer + EOS."""
    from .data import ALPACA_PROMPT_NO_INPUT

    before, after = ALPACA_PROMPT_NO_INPUT.split("{instruction}")
    # Literal text between tags, never right after a block tag: transformers renders with trim_blocks.
    return (
        "{% for message in messages %}{% if message['role'] == 'user' %}" + before + "{{ message['content'] }}" + after
        + "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    )


# ---------------------------------------------------------------------------------------------
# Staging and converting
# ---------------------------------------------------------------------------------------------


def stage_model_dir(model_dir: Path, stage: Path, tokenizer_dirs: list[Path], layout: PromptLayout) -> Path:
    """A folder the converter reads: model_dir's files (weights linked), the layout's chat template, a tokenizer.model.

    merge writes the tokenizer through transformers, which saves tokenizer.json but not a
    SentencePiece tokenizer.model; the converter needs the latter for SentencePiece models, so
    it comes from the adapter's or the base's folder when it matches the vocabulary.
    """
    stage.mkdir(parents=True)
    for path in model_dir.iterdir():
        if path.is_file():
            if path.suffix == ".safetensors":
                os.symlink(path.resolve(), stage / path.name)
            else:
                shutil.copyfile(path, stage / path.name)
    if not (stage / "tokenizer.model").is_file():
        for folder in tokenizer_dirs:
            if (folder / "tokenizer.model").is_file() and sentencepiece_matches(folder / "tokenizer.model", stage):
                shutil.copyfile(folder / "tokenizer.model", stage / "tokenizer.model")
                break
    config_path = stage / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config.pop("chat_template", None)  # one source: chat_template.jinja, which gguf-py reads
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (stage / "chat_template.jinja").write_text(layout.chat_template)
    return stage


def sentencepiece_matches(model_file: Path, tokenizer_dir: Path) -> bool:
    """Whether a tokenizer.model has the same pieces at the same ids as the folder's tokenizer.json."""
    import sentencepiece as spm

    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return True
    vocab = json.loads(path.read_text()).get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        return False
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return all(vocab.get(sp.id_to_piece(i)) == i for i in range(sp.get_piece_size()))


def convert_model(converter: Converter, staged: Path, gguf_type: str, layout: PromptLayout, work: Path) -> Path:
    """The converter's GGUF of the staged folder, quantized if asked, with the end-of-turn token set."""
    outtype = gguf_type if gguf_type in CONVERTER_TYPES else "f16"
    converted = work / f"converted-{outtype}.gguf"
    run_script(converter.model_script, [str(staged), "--outfile", str(converted), "--outtype", outtype], str(staged.name))
    if gguf_type in QUANTIZED_TYPES:
        quantized = work / f"quantized-{gguf_type}.gguf"
        quantize_gguf(converted, quantized, QUANTIZED_TYPES[gguf_type])
        converted.unlink()
        converted = quantized
    if layout.end_of_turn_id != layout.eos_id:
        # The converter writes EOS but not a chat template's own end of turn; gguf-py's metadata tool adds it.
        marked = work / "final.gguf"
        run_script(
            converter.metadata_script,
            [str(converted), str(marked), "--special-token-by-id", "eot", str(layout.end_of_turn_id), "--force"],
            "setting the end-of-turn token",
        )
        converted.unlink()
        converted = marked
    return converted


def quantize_gguf(source: Path, dest: Path, ftype: int) -> None:
    llama_cpp = require_binding()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    with quiet_llama_cpp_logs():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(dest).encode(), ctypes.byref(params))
    if status != 0 or not dest.is_file():
        raise GGUFError(f"llama.cpp's quantize failed on {source.name} (status {status}); try --type q8_0 or f16")


def convert_lora(converter: Converter, adapter_dir: Path, staged_base: Path, gguf_type: str, work: Path) -> Path:
    """The adapter as a GGUF LoRA (convert_lora_to_gguf.py), its scale made llama.cpp's alpha / r."""
    adapter = work / "adapter"
    adapter.mkdir()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_rslora"):
        # llama.cpp scales by alpha / r; rsLoRA by alpha / sqrt(r): the same scale as alpha * sqrt(r) / r.
        config["lora_alpha"] = config["lora_alpha"] * config["r"] ** 0.5
        config["use_rslora"] = False
    (adapter / "adapter_config.json").write_text(json.dumps(config, indent=2))
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise GGUFError(f"{adapter_dir} has no adapter_model.safetensors; convert_lora_to_gguf.py reads only safetensors adapters")
    os.symlink(weights.resolve(), adapter / weights.name)
    written = work / "lora.gguf"
    run_script(
        converter.lora_script,
        [str(adapter), "--base", str(staged_base), "--outfile", str(written), "--outtype", gguf_type],
        f"adapter {adapter_dir}",
    )
    return written


# ---------------------------------------------------------------------------------------------
# Checking: llama.cpp against transformers
# ---------------------------------------------------------------------------------------------


def check_tokenization(gguf_path: Path, model_dir: Path, layout: PromptLayout) -> list[list[int]]:
    """The probe prompts' ids, after checking that llama.cpp tokenizes each as transformers does.

    BOS, special tokens and all: the bugs that make an exported model answer differently or
    never stop. The probes are export.PROBE_PROMPTS and a conversation rendered by the chat
    template written into the file. Loads the GGUF's vocabulary only, so it is cheap at any size.
    """
    from transformers import AutoTokenizer

    from .export import PROBE_PROMPTS

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.chat_template = layout.chat_template
    texts = [*PROBE_PROMPTS, tokenizer.apply_chat_template(PROBE_CONVERSATION, add_generation_prompt=True, tokenize=False)]
    probes = []
    with LlamaCppModel(gguf_path, vocab_only=True) as gguf_model:
        for text in texts:
            ids, theirs = tokenizer(text)["input_ids"], gguf_model.tokenize(text)
            if ids != theirs:
                at = next((i for i, (a, b) in enumerate(zip(ids, theirs)) if a != b), min(len(ids), len(theirs)))
                hint = (
                    "Check the special tokens (BOS/EOS ids in config.json, generation_config.json and the tokenizer)"
                    if (model_dir / "tokenizer.model").is_file()
                    else "The model folder has no SentencePiece tokenizer.model, so the "
                    "converter rebuilt the vocabulary from tokenizer.json: copy the base model's tokenizer.model into the "
                    "folder, or export from the adapter folder"
                )
                raise GGUFError(
                    f"llama.cpp tokenizes {text[:40]!r} differently from transformers (first difference at token {at}: "
                    f"{ids[at:at + 3]} vs {theirs[at:at + 3]}), so the GGUF would answer differently; nothing was written. {hint}"
                )
            probes.append(ids)
    return probes


def verify_logits(gguf_path: Path, model_dir: Path, probes: list[list[int]]) -> float:
    """Max over the probes of |llama.cpp - transformers| on the last token's logits / max(1, max |transformers' logit|).

    transformers runs model_dir in fp32, so the difference is the GGUF's rounding (and llama.cpp's
    kernels), not two roundings compounded.
    """
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    worst = 0.0
    with LlamaCppModel(gguf_path) as gguf_model:
        for ids in probes:
            with torch.no_grad():
                reference = model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
            logits = gguf_model.last_logits(ids)
            worst = max(worst, float(abs(logits - reference).max()) / max(1.0, float(abs(reference).max())))
    return worst


_LOG_SINK = None  # the C callback that drops llama.cpp's log lines; kept alive here


def quiet_llama_cpp_logs():
    """Silence llama.cpp's per-load log lines (hundreds) on stderr; its errors reach us as return codes."""
    import contextlib

    global _LOG_SINK
    llama_cpp = require_binding()
    if _LOG_SINK is None:
        _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, data: None)
        llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p(0))
    return contextlib.nullcontext()


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

    def token_text(self, token_id: int) -> str:
        return self.llama_cpp.llama_vocab_get_text(self.vocab, token_id).decode(errors="replace")

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
# Ollama
# ---------------------------------------------------------------------------------------------

# Message texts that no template writes, to find where each role's content goes in a rendering.
MARKERS = {"system": "QLORAxSYSTEMx1", "user": "QLORAxUSERx1", "assistant": "QLORAxASSISTANTx1", "user2": "QLORAxUSERx2"}


@dataclass
class TurnPieces:
    """A chat template as Ollama's TEMPLATE can say it: text before all messages, around each role's content, the generation prompt."""

    head: str
    around: dict[str, tuple[str, str]]  # role -> (before content, after content)
    generation: str  # after the last message when it is not the assistant's
    default_system: str | None  # what the template says when no system message is given


def build_modelfile(gguf_name: str, layout: PromptLayout) -> str:
    """An Ollama Modelfile: FROM the GGUF beside it, TEMPLATE (Go) equal to the chat template, stop parameters, SYSTEM.

    The Go template walks .Messages and writes each role's pieces, which are read off the Jinja
    template by rendering conversations of marker strings; the result is checked by rendering
    several conversations both ways. A template that is not a message-by-message
    concatenation (one that rewrites earlier turns) cannot be written so and is refused.
    """
    pieces = split_template(layout)
    lines = [
        f"# Written by qlora-lite export-gguf. Create the model with: ollama create NAME -f {Path(gguf_name).with_suffix('.Modelfile')}",
        f"FROM ./{gguf_name}",
        f'TEMPLATE """{build_go_template(pieces)}"""',
    ]
    if pieces.default_system:
        lines.append(f'SYSTEM """{pieces.default_system}"""')
    for token in dict.fromkeys([layout.end_of_turn, layout.eos_token]):
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    text = "\n".join(lines) + "\n"
    if text.count('"""') != 2 * (2 if pieces.default_system else 1):
        raise GGUFError('--ollama: the chat template contains """, which a Modelfile cannot quote; write its TEMPLATE by hand')
    return text


def split_template(layout: PromptLayout) -> TurnPieces:
    from jinja2 import TemplateError

    try:
        return _split_template(layout)
    except (ValueError, TemplateError) as err:
        raise GGUFError(
            f"--ollama: the {layout.data_format} chat template cannot be written as an Ollama TEMPLATE ({err}); drop --ollama "
            "(the GGUF carries the template for llama.cpp and LM Studio) or write the Modelfile's TEMPLATE by hand"
        ) from err


def _split_template(layout: PromptLayout) -> TurnPieces:
    """Read the pieces off renderings of marker conversations (the model: head, then per message
    before + content + after, then the generation prompt), then check them on longer conversations."""
    from jinja2 import TemplateError

    system, user, assistant, user2 = (MARKERS[k] for k in ("system", "user", "assistant", "user2"))

    def render(conversation: list[tuple[str, str]], generation: bool) -> str:
        return render_template(layout, [{"role": r, "content": c} for r, c in conversation], generation)

    def cut(text: str, marker: str) -> tuple[str, str]:
        if text.count(marker) != 1:
            raise ValueError(f"a message's text appears {text.count(marker)} times in its rendering")
        before, _, after = text.partition(marker)
        return before, after

    asked = render([("user", user)], True)  # head + user_before + U + user_after + generation
    opening, closing = cut(asked, user)
    answered = render([("user", user), ("assistant", assistant)], False)  # ... U + user_after + assistant_before + A + assistant_after
    if not answered.startswith(opening + user):
        raise ValueError("the first user message renders differently once it is answered")
    between, assistant_after = cut(answered[len(opening + user) :], assistant)
    followed = render([("user", user), ("assistant", assistant), ("user", user2)], True)
    if not followed.startswith(answered):
        raise ValueError("an answer renders differently once another message follows it")
    user_before, rest = cut(followed[len(answered) :], user2)
    if rest != closing or not opening.endswith(user_before):
        raise ValueError("a later user message is laid out differently from the first")
    # Seen so far: user_after + generation (closing) and user_after + assistant_before (between).
    # Two user messages in a row show user_after + user_before; templates that refuse them get the
    # common start of the two, which renders every alternating conversation the same.
    user_after = os.path.commonprefix([closing, between])
    try:
        twice = render([("user", user), ("user", user2)], True)
        joint = twice[len(opening + user) : twice.index(user2)] if twice.startswith(opening + user) and user2 in twice else ""
        if joint.endswith(user_before) and closing.startswith(joint[: len(joint) - len(user_before)]):
            candidate = joint[: len(joint) - len(user_before)]
            if between.startswith(candidate):
                user_after = candidate
    except TemplateError:
        pass
    generation, assistant_before = closing[len(user_after) :], between[len(user_after) :]
    head = opening[: len(opening) - len(user_before)]
    around = {"user": (user_before, user_after), "assistant": (assistant_before, assistant_after)}
    default_system = None
    try:
        with_system = render([("system", system), ("user", user)], True)
    except TemplateError:  # templates that refuse a system role (raise_exception) simply have none
        with_system = ""
    if system in with_system:
        system_before, system_rest = cut(with_system, system)
        system_after = system_rest[: system_rest.index(user)]
        if not system_after.endswith(user_before):
            raise ValueError("the first user message is introduced differently after a system message")
        system_after = system_after[: len(system_after) - len(user_before)]
        start = len(os.path.commonprefix([asked, with_system]))
        stop = len(os.path.commonprefix([asked[::-1], with_system[::-1]]))
        if with_system[start : len(with_system) - stop] == system and asked.startswith(system_before):
            # The template writes a default system message when none is given (Qwen2.5): Ollama's SYSTEM line.
            default_system = asked[start : len(asked) - stop]
            head = ""
        elif not system_before.startswith(head):
            raise ValueError("a system message changes the text before the first message")
        around["system"] = (system_before[len(head) :], system_after)
    pieces = TurnPieces(head, around, generation, default_system)
    conversations = [
        [("user", user)],
        [("user", user), ("assistant", assistant)],
        [("user", user), ("assistant", assistant), ("user", user2)],
    ]
    if "system" in around:
        conversations.append([("system", system), ("user", user), ("assistant", assistant), ("user", user2)])
    for conversation in conversations:
        generation_prompt = conversation[-1][0] != "assistant"
        if render_pieces(pieces, conversation) != render(conversation, generation_prompt):
            raise ValueError(f"it renders a {len(conversation)}-message conversation differently from message by message")
    return pieces


def render_template(layout: PromptLayout, messages: list[dict[str, str]], generation: bool) -> str:
    """The chat template rendered as transformers renders it (Jinja, trim_blocks, eos_token and bos_token set)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations=[messages], chat_template=layout.chat_template, add_generation_prompt=generation,
        eos_token=layout.eos_token, bos_token="",
    )  # fmt: skip
    return rendered[0]


def render_pieces(pieces: TurnPieces, conversation: list[tuple[str, str]]) -> str:
    """What the Go template of build_go_template renders for a conversation (Ollama puts SYSTEM first when none is given)."""
    if pieces.default_system is not None and conversation[0][0] != "system":
        conversation = [("system", pieces.default_system), *conversation]
    text = pieces.head
    for role, content in conversation:
        before, after = pieces.around[role]
        text += before + content + after
    return text + (pieces.generation if conversation[-1][0] != "assistant" else "")


def build_go_template(pieces: TurnPieces) -> str:
    """Ollama's Go template for the pieces: .Messages in order, the generation prompt after the last non-assistant one."""
    branches = []
    for index, role in enumerate(role for role in ("system", "user", "assistant") if role in pieces.around):
        before, after = pieces.around[role]
        keyword = "if" if index == 0 else "else if"
        branches.append(f'{{{{ {keyword} eq .Role "{role}" }}}}{go_literal(before)}{{{{ .Content }}}}{go_literal(after)}')
    loop, generation = "{{ range .Messages }}", ""
    if pieces.generation:  # Ollama's own templates find the last message this way
        loop = "{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
        generation = f'{{{{ if and $last (ne .Role "assistant") }}}}{go_literal(pieces.generation)}{{{{ end }}}}'
    return go_literal(pieces.head) + loop + "".join(branches) + "{{ end }}" + generation + "{{ end }}"


def go_literal(text: str) -> str:
    """Text for a Go template: literal, except the action delimiters."""
    return text.replace("{{", '{{ "{{" }}')


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def format_gguf_report(report: GGUFReport) -> str:
    what = "GGUF LoRA" if report.lora_only else "GGUF"
    lines = [f"wrote {report.out} ({what}, {report.gguf_type}, {report.size_bytes / 2**20:,.1f} MiB) with {report.converter}"]
    if report.layout is not None and not report.lora_only:
        layout = report.layout
        stops = f"{layout.end_of_turn!r} (id {layout.end_of_turn_id})"
        if layout.end_of_turn_id != layout.eos_id:
            stops += f" and EOS {layout.eos_token!r} (id {layout.eos_id})"
        lines.append(f"  chat template: {layout.data_format}; stops at {stops}")
    if report.num_probes:
        line = f"  verify: llama.cpp tokenizes {report.num_probes} probe prompts as transformers does"
        if report.max_logit_diff is not None:
            line += (
                f"; max |logit difference| {report.max_logit_diff:.3g} of the largest logit "
                f"(allowed for {report.gguf_type}: {report.threshold:.3g}) ok"
            )
        lines.append(line)
    if report.modelfile is not None:
        lines.append(f"  ollama: {report.modelfile}; run: ollama create NAME -f {report.modelfile}")
    lines += [f"  note: {note}" for note in report.notes]
    return "\n".join(lines)
