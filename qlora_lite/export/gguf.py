"""Export to GGUF for llama.cpp, LM Studio and Ollama, converted and checked by llama.cpp itself.

The steps of `qlora-lite export-gguf`; the calls into llama.cpp (its converter, its quantize API, a
GGUF loaded to check it) are llama_cpp.py's, the chat template and Modelfile templates.py's.

    export_gguf(adapter or model folder, out.gguf, gguf_type)
      1. refuse early what cannot work: a file that exists, an adapter that cannot merge,
         an architecture the converter does not list, a missing extra;
      2. merge an adapter into a temporary folder (merge.merge_adapter), as `merge` does;
      3. stage the model folder for the converter (weights linked, not copied): the chat
         template the adapter was trained with, tokenizer.model where only a sibling
         folder has it;
      4. convert; quantize; set the end-of-turn stop token (gguf-py's gguf_new_metadata.py);
      5. verify: llama.cpp must tokenize probe prompts to transformers' ids (always; it reads
         the vocabulary only), and give the same last-token logits within the type's
         tolerance (verify.GGUF_REL_TOL; by default for models up to 1B parameters); llama.cpp
         runs in a child process, so a file it crashes on is a one-line error;
      6. move the file into place (and write an Ollama Modelfile): nothing is left half-written.

What a server needs is in the file: `tokenizer.chat_template` (the alpaca layout for an
alpaca adapter, the tokenizer's template for a chat one, a plain concatenation for text)
and the stop tokens: EOS, and `tokenizer.ggml.eot_token_id` when a chat template ends its
turns with another token (Llama-3 `<|eot_id|>`, ChatML `<|im_end|>`).

An adapter trained on a GGUF base (gguf_base.py: the adapter's base is the dequantized cache folder)
goes back to the file it came from, checked to be the very file (its sha256):
  --lora-only   the LoRA for the original, unchanged GGUF (`llama-server -m ORIGINAL --lora OUT`): every
                LoRA tensor must have its tensor, of the same shape, in the original's tensor table
                (what llama.cpp requires); verify runs llama.cpp on the original with the LoRA against
                transformers on the cache folder with the adapter; --ollama writes FROM the original
                (the Ollama model by name when it came from Ollama) and ADAPTER the LoRA.
  merged        converted from the cache folder as for any base, with the original's vocabulary: the
                cache holds transformers' rebuild of it (tokenizer.json, no tokenizer.model), from which
                the converter would rebuild a SentencePiece vocabulary without its scores.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ..errors import ExportError, GGUFError
from ..folders import find_write_problem
from ..gguf_base import (
    OLLAMA_HOST,
    OLLAMA_NAMESPACE,
    OLLAMA_PREFIX,
    GGUFHeader,
    compute_last_logits,
    describe_file_type,
    find_gguf_file,
    hash_file,
    parse_ollama_name,
    read_gguf_header,
    read_gguf_source,
)
from ..methods.folder import CONFIG_NAME, WEIGHTS_NAME, find_base_model, read_adapter_json, read_prompt_info
from ..methods.lora import LORA_METHOD, lora_scale
from ..methods.table import find_saved_method
from ..llama_cpp import (
    GGUF_TYPES,
    LLAMA_CPP_PYTHON_VERSION,
    LORA_TYPES,
    LlamaCppCrash,
    check_architecture,
    check_binding_installed,
    copy_vocabulary,
    convert_lora,
    convert_model,
    find_converter,
    last_logits_in_child,
    read_binding_version,
    tokenize_in_child,
)
from .merge import download_base, load_plain_model, merge_adapter, plan_lora_merge, read_checkpoint_layout
from .templates import PromptLayout, build_modelfile, find_prompt_layout
from ..verify import GGUF_REL_TOL, PROBE_PROMPTS, decide_verify, describe_skipped_check, relative_logit_difference

PROBE_CONVERSATION = [{"role": "user", "content": "Name a colour, then stop."}]


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
    base_gguf: Path | None = None  # --lora-only on a GGUF base: the original file the LoRA runs on (and verify ran)
    base_file_type: str | None = None  # its quantization (Q4_K_M), which sets the threshold
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
            None = for models of at most verify.AUTO_VERIFY_MAX_PARAMS parameters. (Their tokenization is
            always compared.)
        overwrite: Replace an existing out (and Modelfile), only once the new one is complete.
        allow_pickle: Accept an adapter whose weights are only in adapter_model.bin.
    """
    source, out = Path(source), Path(out)
    check_binding_installed()
    check_gguf_type(gguf_type, lora_only)
    is_adapter = (source / CONFIG_NAME).is_file()
    if lora_only and ollama and not is_adapter:
        refuse_ollama_lora()
    if is_adapter:
        check_adapter_exports(source, lora_only)
    elif lora_only:
        raise GGUFError(f"--lora-only needs an adapter folder (with adapter_config.json); {source} is not one")
    else:
        check_model_folder(source)
    base_name = find_adapter_base(source, base) if is_adapter else None
    gguf_source = read_gguf_source(base_name) if base_name else None
    if lora_only and ollama and gguf_source is None:
        refuse_ollama_lora()
    modelfile = out.with_suffix(".Modelfile") if ollama else None
    check_out_file(out, overwrite, modelfile)
    original = find_original_gguf(base_name, gguf_source) if gguf_source else None
    converter = find_converter(llama_cpp_dir)
    installed = read_binding_version()

    base_path = download_base(base_name) if is_adapter else None
    model_dir = Path(base_path) if is_adapter else source
    check_architecture(converter, model_dir)
    tokenizer_dirs = [source, *([Path(base_path)] if base_path else [])]
    layout = find_prompt_layout(source, tokenizer_dirs, prompt_format)
    modelfile_base = name_modelfile_base(gguf_source, original) if ollama and lora_only and original else None
    modelfile_text = build_modelfile(out.name, layout, base=modelfile_base) if ollama else None
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
            staged_base = stage_model_dir(model_dir, work / "base", tokenizer_dirs, layout)
            staged_adapter = stage_lora_adapter(source, work / "adapter")
            written = convert_lora(converter, staged_adapter, staged_base, gguf_type, work, f"adapter {source}")
            if original is None:
                report.notes.append(
                    f"serve it on the base as GGUF: qlora-lite export-gguf {base_path} --out BASE.gguf --format {layout.data_format}, "
                    f"then llama-server -m BASE.gguf --lora {out}"
                )
            else:
                check_lora_on_original(written, original, staged_base, source, layout, verify, report)
        else:
            if is_adapter:
                try:
                    merge_adapter(source, work / "merged", base=base_path, allow_pickle=allow_pickle)
                except ExportError as err:
                    raise GGUFError(f"cannot merge {source} before the GGUF export: {err}") from err
                model_dir = work / "merged"
            staged = stage_model_dir(model_dir, work / "stage", tokenizer_dirs, layout)
            end_of_turn = layout.end_of_turn_id if layout.end_of_turn_id != layout.eos_id else None
            written = convert_merged(converter, staged, gguf_type, end_of_turn, work, original)
            probes = check_tokenization(written, staged, layout, out.name)  # always: it reads the vocabulary only
            report.num_probes = len(probes)
            num_parameters = count_parameters(staged)
            if decide_verify(verify, num_parameters):
                report.max_logit_diff = verify_logits(written, staged, probes, out.name)
                report.threshold = GGUF_REL_TOL[gguf_type]
                if report.max_logit_diff > report.threshold:
                    raise GGUFError(
                        f"llama.cpp's logits on {out.name} differ from transformers' by {report.max_logit_diff:.3g} (relative to the "
                        f"largest logit; allowed for {gguf_type}: {report.threshold:.3g}); nothing was written. "
                        "Try --type f16, or report the model and this number"
                    )
            else:
                report.notes.append(describe_skipped_check(num_parameters, "llama.cpp with transformers (holds the model in fp32)"))
        report.size_bytes = written.stat().st_size
        os.replace(written, out)  # the same folder, so the file appears whole or not at all
        if modelfile is not None:
            (work / "Modelfile").write_text(modelfile_text)
            os.replace(work / "Modelfile", modelfile)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return report


def refuse_ollama_lora() -> None:
    """--ollama with --lora-only on an ordinary base: Ollama would need the base as a GGUF, which this export does not write."""
    raise GGUFError(
        "--ollama writes a Modelfile for a whole model; with --lora-only, export the base model too and add "
        "'ADAPTER ./LORA.gguf' under its FROM line yourself, or drop --lora-only"
    )


def check_gguf_type(gguf_type: str, lora_only: bool) -> None:
    allowed = LORA_TYPES if lora_only else GGUF_TYPES
    if gguf_type not in allowed:
        what = "a GGUF LoRA" if lora_only else "a GGUF model"
        raise GGUFError(f"--type {gguf_type!r} is not one llama.cpp writes for {what}; choose one of {', '.join(allowed)}")


def check_adapter_exports(adapter_dir: Path, lora_only: bool) -> None:
    """Refuse adapters a GGUF cannot hold, before any work: soft prompts and bottleneck adapters, and non-LoRA with --lora-only."""
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
    config = read_adapter_json(adapter_dir)
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
    # Asked now, not when the file is moved into place after a merge and a conversion that can take minutes.
    problem = find_write_problem(out.parent)
    if problem:
        raise GGUFError(f"--out {out} cannot be written: {problem}; choose a folder you can write")
    out.parent.mkdir(parents=True, exist_ok=True)


def find_adapter_base(adapter_dir: Path, base: str | None) -> str:
    return find_base_model(adapter_dir, read_adapter_json(adapter_dir), base)


def count_parameters(model_dir: Path) -> int:
    return read_checkpoint_layout(str(model_dir)).num_parameters


# ---------------------------------------------------------------------------------------------
# An adapter on a GGUF base: back to the original file
# ---------------------------------------------------------------------------------------------

# A LoRA on the original GGUF vs the adapter on the cache folder: both sides hold the same weight values (the cache
# is the original dequantized, rounded to bf16), so what differs is llama.cpp's kernels on the quantized file (k-quant
# and q8_0 dot products quantize the activations too) and the LoRA's own rounding to its --type. The merged export's
# tolerance of the original's type bounds that (it bounds the weight rounding too, absent here), and of the LoRA's type
# its rounding. Measured on the demo (trained 90 steps on each file; original / LoRA type): F16 / f16 1.8e-3 (allowed
# 1e-2), F16 / q8_0 2.4e-3 (5e-2), Q8_0 / f16 1.3e-2 (5e-2), Q8_0 / q8_0 8.9e-3, Q4_K_M / f16 8.2e-3 (0.25), Q4_K_M / bf16
# 6.0e-3, Q4_K_M / q8_0 8.4e-3. Other file types (Q5_K_M, Q6_K, Q4_0, ...) get Q4_K_M's.
FILE_TYPE_TOLERANCE_KEYS = {"ALL_F32": "f16", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0"}


def find_original_gguf(base_dir: str, source: dict) -> Path:
    """The GGUF a GGUF base was dequantized from (gguf_source.json's file), refused unless it is the very file trained on."""
    path = Path(source["file"])
    if not path.is_file():
        raise GGUFError(
            f"the adapter's base {base_dir} was dequantized from {path} ({source['source']}), which is no longer there; "
            "put that file back and export again (the export reads its vocabulary and tensor table)"
        )
    digest = hash_file(path)
    if digest != source["sha256"]:
        raise GGUFError(
            f"{path} has changed since the adapter's base was dequantized from it into {base_dir} (sha256 {source['sha256'][:12]} "
            f"then, {digest[:12]} now), so the adapter was trained on another model; put the earlier file back, or train on this one"
        )
    return path


def name_modelfile_base(source: dict, original: Path) -> str:
    """What a LoRA's Modelfile builds FROM: the Ollama model by name when it came from Ollama and that name still means the
    file trained on (Ollama has it already, and keeps its own template and parameters), else the original's absolute path."""
    name = source["source"]
    if name.startswith(OLLAMA_PREFIX):
        try:
            current = find_gguf_file(name).resolve()
        except GGUFError:  # the store moved or the model was removed: the file itself still works
            current = None
        if current == original.resolve():
            host, namespace, model, tag = parse_ollama_name(name[len(OLLAMA_PREFIX) :])
            prefix = "" if (host, namespace) == (OLLAMA_HOST, OLLAMA_NAMESPACE) else f"{host}/{namespace}/"
            return f"{prefix}{model}:{tag}"
    return str(original.absolute())


def check_lora_on_original(
    lora: Path, original: Path, base_dir: Path, adapter_dir: Path, layout: PromptLayout, verify: bool | None, report: GGUFReport
) -> None:
    """A GGUF LoRA for an original GGUF: llama.cpp will load it there (names, shapes, architecture), and it answers as the
    adapter does (verify); the report says how to serve it."""
    header = read_gguf_header(original)
    check_lora_fits(read_gguf_header(lora), header, report.out.name)
    report.base_gguf, report.base_file_type = original, describe_file_type(header)
    num_parameters = count_parameters(base_dir)
    if decide_verify(verify, num_parameters):
        report.max_logit_diff, report.num_probes = verify_lora_logits(original, lora, base_dir, adapter_dir, layout)
        report.threshold = choose_lora_threshold(report.base_file_type, report.gguf_type)
        if report.max_logit_diff > report.threshold:
            raise GGUFError(
                f"llama.cpp running {original.name} with the LoRA differs from transformers running the base with the adapter by "
                f"{report.max_logit_diff:.3g} (relative to the largest logit; allowed on {report.base_file_type}: {report.threshold:.3g}); "
                "nothing was written. Export the merged model instead (drop --lora-only), and report the model and this number"
            )
    else:
        report.notes.append(describe_skipped_check(num_parameters, "llama.cpp on the original GGUF with the LoRA against transformers"))
    report.notes.append(f"serve it on the original GGUF, unchanged: llama-server -m {original} --lora {report.out}")


def check_lora_fits(lora: GGUFHeader, base: GGUFHeader, name: str) -> None:
    """What llama.cpp requires of a LoRA on a base (llama_adapter_lora_init): the same architecture, and for each
    `X.lora_a` / `X.lora_b` a base tensor X whose rows are a's and whose columns are b's (shapes in ggml's order)."""
    theirs, ours = base.metadata.get("general.architecture"), lora.metadata.get("general.architecture")
    if ours != theirs:
        raise GGUFError(
            f"the LoRA {name} is for llama.cpp architecture {ours} and {base.path.name} holds a {theirs} model, so llama.cpp "
            "would refuse it; nothing was written. Export the merged model instead (drop --lora-only)"
        )
    for tensor in lora.tensors.values():
        if not tensor.name.endswith(".lora_a"):
            continue
        target = tensor.name.removesuffix(".lora_a")
        found, b = base.tensors.get(target), lora.tensors.get(target + ".lora_b")
        if found is None:
            raise GGUFError(
                f"{base.path.name} has no tensor {target}, which the LoRA {name} changes, so llama.cpp would refuse it; nothing was "
                "written. Export the merged model instead (drop --lora-only)"
            )
        if b is None or found.shape[:2] != (tensor.shape[0], b.shape[1]):
            got = f"{tensor.shape[0]} x {b.shape[1]}" if b is not None else "a missing lora_b"
            raise GGUFError(
                f"{base.path.name}'s tensor {target} is {found.shape[0]} x {found.shape[1]} and the LoRA {name} has {got} for it, "
                "so llama.cpp would refuse it; nothing was written. Check that the adapter was trained on this file"
            )


def choose_lora_threshold(file_type: str | None, lora_type: str) -> float:
    """The larger of the original's type's tolerance and the LoRA's (see FILE_TYPE_TOLERANCE_KEYS)."""
    original = GGUF_REL_TOL[FILE_TYPE_TOLERANCE_KEYS.get(file_type or "", "q4_k_m")]
    return max(original, GGUF_REL_TOL[lora_type])


def verify_lora_logits(original: Path, lora: Path, base_dir: Path, adapter_dir: Path, layout: PromptLayout) -> tuple[float, int]:
    """(max relative last-token logit difference, probes): llama.cpp on the original with the LoRA vs transformers on the
    base folder with the adapter attached, both in fp32 (llama.cpp first, in a child process, so one model at a time)."""
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    probes = [tokenizer(text)["input_ids"] for text in render_probe_texts(tokenizer, layout)]
    theirs = last_logits_in_child(original, probes, f"computing the probe prompts' logits of {original.name} with the LoRA", lora_path=lora)
    model = load_plain_model(str(base_dir))
    plan_lora_merge(adapter_dir, allow_pickle=False).attach(model)
    ours = compute_last_logits(model, probes)
    return max(relative_logit_difference(r, t) for r, t in zip(ours, theirs)), len(probes)


def convert_merged(converter, staged: Path, gguf_type: str, end_of_turn: int | None, work: Path, original: Path | None) -> Path:
    """convert_model; on a GGUF base, with the original's vocabulary put back (copy_vocabulary)."""
    if original is None:
        return convert_model(converter, staged, gguf_type, end_of_turn, work)
    try:
        written = convert_model(converter, staged, gguf_type, end_of_turn, work)
    except GGUFError as err:
        if not str(err).startswith("llama.cpp's converter refused"):
            raise
        # A byte-pair vocabulary the converter knows by the hash of a released model's tokenizer, and transformers'
        # rebuild of it from the GGUF hashes otherwise: the LoRA needs no vocabulary.
        raise GGUFError(
            f"llama.cpp's converter does not recognise the tokenizer transformers rebuilt from {original.name} (it knows byte-pair "
            "tokenizers by the hash of released models'); export the adapter alone and serve it on the original: "
            f"--lora-only, then llama-server -m {original} --lora LORA.gguf"
        ) from err
    return copy_vocabulary(written, original, work / "vocabulary.gguf")


# ---------------------------------------------------------------------------------------------
# Staging the folder the converter reads
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
    path = tokenizer_dir / "tokenizer.json"
    if not path.is_file():
        return True
    vocab = json.loads(path.read_text()).get("model", {}).get("vocab")
    if not isinstance(vocab, dict):
        return False
    sp = spm.SentencePieceProcessor(model_file=str(model_file))
    return all(vocab.get(sp.id_to_piece(i)) == i for i in range(sp.get_piece_size()))


# ---------------------------------------------------------------------------------------------
# Checking: llama.cpp against transformers
# ---------------------------------------------------------------------------------------------


def stage_lora_adapter(adapter_dir: Path, stage: Path) -> Path:
    """A folder convert_lora_to_gguf.py reads: the adapter's weights linked, its scale written as llama.cpp's alpha / r.

    rsLoRA scales by alpha / sqrt(r); llama.cpp always by alpha / r, so alpha becomes lora_scale * r.
    """
    stage.mkdir()
    config = read_adapter_json(adapter_dir)
    if config.get("use_rslora"):
        config["lora_alpha"] = lora_scale(config["lora_alpha"], config["r"], use_rslora=True) * config["r"]
        config["use_rslora"] = False
    (stage / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        raise GGUFError(f"{adapter_dir} has no {WEIGHTS_NAME}; convert_lora_to_gguf.py reads only safetensors adapters")
    os.symlink(weights.resolve(), stage / WEIGHTS_NAME)
    return stage


def check_tokenization(gguf_path: Path, model_dir: Path, layout: PromptLayout, name: str) -> list[list[int]]:
    """The probe prompts' ids, after checking that llama.cpp tokenizes each as transformers does.

    BOS, special tokens and all: the bugs that make an exported model answer differently or
    never stop. The probes are export.PROBE_PROMPTS and a conversation rendered by the chat
    template written into the file. Loads the GGUF's vocabulary only, so it is cheap at any size;
    in a child process, as llama.cpp aborts on some vocabularies. `name`: the file's name in messages
    (gguf_path is a temporary file).
    """
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = render_probe_texts(tokenizer, layout)

    def explain(crash: LlamaCppCrash) -> str | None:
        return explain_tokenizer_crash(crash, tokenizer, texts[crash.step] if crash.step is not None else "".join(texts))

    all_theirs = tokenize_in_child(gguf_path, texts, f"tokenizing the probe prompts of {name}", explain)
    probes = []
    for text, theirs in zip(texts, all_theirs):
        ids = tokenizer(text)["input_ids"]
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


def render_probe_texts(tokenizer, layout: PromptLayout) -> list[str]:
    """PROBE_PROMPTS and a conversation rendered by the layout's chat template (set on the tokenizer)."""
    tokenizer.chat_template = layout.chat_template
    return [*PROBE_PROMPTS, tokenizer.apply_chat_template(PROBE_CONVERSATION, add_generation_prompt=True, tokenize=False)]


def explain_tokenizer_crash(crash: LlamaCppCrash, tokenizer, text: str) -> str | None:
    """Why llama.cpp crashed tokenizing `text`, when it is the known cause: a character with neither a piece nor a byte token.

    llama.cpp's SentencePiece tokenizer spells a character it has no piece for with byte tokens
    <0xXX>, and throws std::out_of_range when the vocabulary has none (sentencepiece's default
    byte_fallback=False); nothing catches it, so the process aborts, a server's too.
    """
    vocab = tokenizer.get_vocab()
    if "out_of_range" not in crash.how or any(f"<0x{byte:02X}>" in vocab for byte in range(256)):
        return None
    plain = text
    for special in tokenizer.get_added_vocab():  # split out of the text as whole tokens, never spelled
        plain = plain.replace(special, "")
    missing = [c for c in dict.fromkeys(plain) if c.replace(" ", "\u2581") not in vocab]
    if not missing:
        return None
    return (
        f"its vocabulary has no byte tokens <0x00>..<0xFF> (a SentencePiece model trained without byte_fallback) and no "
        f"piece for {', '.join(map(repr, missing[:8]))} (in {text[:40]!r}), and on such text llama.cpp aborts instead of "
        "writing <unk>, so a llama.cpp server would crash too; nothing was written. Train the model with a tokenizer that "
        "has byte tokens (SentencePiece byte_fallback=True), or serve it with transformers or vLLM (qlora-lite merge)"
    )


def verify_logits(gguf_path: Path, model_dir: Path, probes: list[list[int]], name: str) -> float:
    """Max over the probes of |llama.cpp - transformers| on the last token's logits / max(1, max |transformers' logit|).

    transformers runs model_dir in fp32, so the difference is the GGUF's rounding (and llama.cpp's
    kernels), not two roundings compounded. llama.cpp runs in a child process (a crash is one
    GGUFError), first, so the two models are never in memory together. `name`: the file's name in messages
    (gguf_path is a temporary file).
    """
    doing = f"computing the probe prompts' logits of {name}"
    all_logits = last_logits_in_child(gguf_path, probes, doing)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    worst = 0.0
    for ids, logits in zip(probes, all_logits):
        with torch.no_grad():
            reference = model(input_ids=torch.tensor([ids])).logits[0, -1].float().numpy()
        worst = max(worst, relative_logit_difference(reference, logits))
    return worst


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def format_gguf_report(report: GGUFReport) -> str:
    what = "GGUF LoRA" if report.lora_only else "GGUF"
    lines = [f"wrote {report.out} ({what}, {report.gguf_type}, {format_size(report.size_bytes)}) with {report.converter}"]
    if report.layout is not None and not report.lora_only:
        layout = report.layout
        stops = f"{layout.end_of_turn!r} (id {layout.end_of_turn_id})"
        if layout.end_of_turn_id != layout.eos_id:
            stops += f" and EOS {layout.eos_token!r} (id {layout.eos_id})"
        lines.append(f"  chat template: {layout.data_format}; stops at {stops}")
    if report.base_gguf is not None and report.max_logit_diff is not None:
        lines.append(
            f"  verify: llama.cpp on {report.base_gguf.name} with the LoRA vs transformers on the base with the adapter, "
            f"{report.num_probes} probe prompts: max |logit difference| {report.max_logit_diff:.3g} of the largest logit "
            f"(allowed on {report.base_file_type}: {report.threshold:.3g}) ok"
        )
    elif report.num_probes:
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


def format_size(num_bytes: int) -> str:
    """The size in the largest binary unit it reaches, one decimal: 812 B, 52.0 KiB, 729.6 KiB, 4.6 GiB.

    In MiB alone a LoRA of tens of KiB read "0.0 MiB" and an 8B model "4,692.1 MiB".
    """
    if num_bytes < 1024:
        return f"{num_bytes} B"
    value = float(num_bytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if round(value, 1) < 1024:  # as printed: 1023.96 KiB reads 1.0 MiB, not 1024.0 KiB
            break
    return f"{value:.1f} {unit}"  # TiB has no next unit: any larger size reads in TiB
