"""export-gguf of an adapter trained on a GGUF base (issue 26): a LoRA for the original, unchanged file, and the merged model.

The GGUF base is the demo base written as Q4_K_M by llama.cpp (export_gguf). The demo is 128 wide and
K-quants need rows of 256, so llama.cpp falls back on most tensors; measured: Q5_0 12, F32 5, Q8_0 2,
Q4_K 1, Q6_K 1 (printed by the fixture). The demo recipe trains on it (model.name_or_path = the file:
the base is its dequantized cache folder, in a temporary QLORA_LITE_CACHE), and the adapter goes back
to the file as a GGUF LoRA, which llama.cpp runs on the original.

Measured (2 CPU cores, 90 steps): exact match on the 200 held-out prompts 99.5% with `generate`
(NF4 base + adapter) and 99.5% with llama.cpp (original Q4_K_M + LoRA), answers equal on 200 of 200;
97.0% and 97.5% after 60 steps. Verify (llama.cpp on the original + LoRA vs transformers on the cache +
adapter, fp32, relative to the largest logit): 8.2e-3 (allowed 0.25). The merged q8_0 export: 6.0e-3
(allowed 0.05). The original without the LoRA answers 0 of 20: the adapter is what answers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest

from qlora_lite import cli
from qlora_lite.errors import GGUFError
from qlora_lite.export.gguf import check_lora_fits, export_gguf, format_gguf_report, name_modelfile_base
from qlora_lite.gguf_base import GGUFHeader, GGUFTensor, read_gguf_header, read_gguf_source

REPO = Path(__file__).resolve().parents[2]
needs_llama_cpp = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs the gguf extra: pip install 'qlora-lite[gguf]'"
)
TRAIN_STEPS = 90  # measured: 99.5% exact match both ways; 60 steps gave 97.0 / 97.5%
NUM_HELD_OUT = 200  # every held-out prompt
MAX_GAP = 0.05  # the bar: llama.cpp's exact match within 5 points of generate's


# ---------------------------------------------------------------------------------------------
# Fixtures: the demo as a Q4_K_M GGUF, trained on once, its LoRA exported once
# ---------------------------------------------------------------------------------------------


def link_converter(cache: Path) -> None:
    """The tested llama.cpp converter, linked into a fresh cache (it is downloaded once, into the user's cache)."""
    from qlora_lite.llama_cpp import ensure_tested_converter

    folder = ensure_tested_converter().folder.resolve()
    (cache / folder.name).symlink_to(folder)


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory):
    """QLORA_LITE_CACHE in a temporary folder, so the dequantized base is this module's own; demo base and converter linked in."""
    from qlora_lite.demo import ensure_demo_base

    demo = ensure_demo_base().resolve()
    cache = tmp_path_factory.mktemp("qlora-cache")
    link_converter(cache)
    (cache / demo.name).symlink_to(demo)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QLORA_LITE_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def q4_original(gguf_cache, tmp_path_factory):
    """The demo base as the user's GGUF: Q4_K_M, quantized by llama.cpp."""
    from qlora_lite.demo import ensure_demo_base
    from qlora_lite.gguf_base import count_tensor_types, describe_file_type

    out = tmp_path_factory.mktemp("original") / "demo-q4_k_m.gguf"
    export_gguf(ensure_demo_base(), out, "q4_k_m", prompt_format="alpaca", verify=False)
    header = read_gguf_header(out)
    print(f"original {out.name}: {describe_file_type(header)}, tensor types {count_tensor_types(header)}")
    return out


@pytest.fixture(scope="module")
def gguf_adapter(q4_original, tmp_path_factory):
    """`qlora-lite train recipes/tiny-demo.yaml model.name_or_path=demo-q4_k_m.gguf`, shortened to TRAIN_STEPS."""
    from qlora_lite.config import load_recipe
    from qlora_lite.training.fit import fit

    out = tmp_path_factory.mktemp("gguf-run")
    overrides = [
        f"model.name_or_path={q4_original}", f"output_dir={out}", f"train.max_steps={TRAIN_STEPS}",
        f"train.eval_every={TRAIN_STEPS}", "train.exact_match_examples=0", "train.save_every=0",
    ]  # fmt: skip
    fit(load_recipe(REPO / "recipes" / "tiny-demo.yaml", overrides))
    return out / "adapter"


@pytest.fixture(scope="module")
def lora_report(gguf_adapter, tmp_path_factory):
    return export_gguf(gguf_adapter, tmp_path_factory.mktemp("lora") / "demo-lora.gguf", lora_only=True)


def read_error(capsys) -> str:
    """The CLI's stderr less library progress bars: one error line."""
    lines = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines(keepends=True) if "Writing model shards" not in line]
    return "".join(line for line in lines if line.strip())


# ---------------------------------------------------------------------------------------------
# The LoRA on the original file
# ---------------------------------------------------------------------------------------------


@needs_llama_cpp
def test_lora_on_the_original_q4_k_m_answers_as_generate(q4_original, gguf_adapter, lora_report):
    from qlora_lite.demo import format_demo_prompt, make_demo_records
    from qlora_lite.generate import GenerationSettings, build_prompt_ids, collect_eos_ids, cut_at_stop, generate_ids, open_switcher
    from qlora_lite.llama_cpp import LlamaCppModel
    from qlora_lite.methods.folder import read_adapter_json

    report = lora_report
    base = read_adapter_json(gguf_adapter)["base_model_name_or_path"]
    assert read_gguf_source(base)["file"] == str(q4_original)  # trained on the file's dequantized cache folder
    assert report.base_gguf == q4_original and report.base_file_type == "Q4_K_M" and report.num_probes == 4
    assert report.max_logit_diff <= report.threshold == 0.25
    assert report.notes[-1] == f"serve it on the original GGUF, unchanged: llama-server -m {q4_original} --lora {report.out}"
    assert format_gguf_report(report).splitlines()[1].startswith(
        "  verify: llama.cpp on demo-q4_k_m.gguf with the LoRA vs transformers on the base with the adapter, 4 probe prompts"
    )

    held_out = make_demo_records()[1][:NUM_HELD_OUT]
    switcher = open_switcher({"demo": gguf_adapter})  # what `qlora-lite generate ADAPTER` loads: the NF4 base + adapter
    switcher.use("demo")
    tokenizer, settings = switcher.tokenizer, GenerationSettings(max_new_tokens=16)
    stop_ids = collect_eos_ids(tokenizer, switcher.active_model)
    prompts, ours = [], []
    for record in held_out:
        ids = build_prompt_ids(record["instruction"], "alpaca", tokenizer, input_text=record["input"])
        new = generate_ids(switcher.active_model, tokenizer, ids, settings)
        prompts.append(ids)
        ours.append(tokenizer.decode(cut_at_stop(new, stop_ids), skip_special_tokens=True))
    with LlamaCppModel(q4_original, lora_path=report.out) as served:
        assert served.metadata("general.type") == "adapter"
        # a server gets the text: llama.cpp's tokenizer on the original gives generate's ids
        assert all(served.tokenize(format_demo_prompt(r)) == ids for r, ids in zip(held_out, prompts))
        theirs = [served.detokenize(served.generate(ids, max_new_tokens=16)) for ids in prompts]
    with LlamaCppModel(q4_original) as plain:  # the original alone has never seen the format
        plain_right = sum(plain.detokenize(plain.generate(ids, max_new_tokens=16)) == r["output"] for r, ids in zip(held_out[:20], prompts))
    generate_rate = sum(a == r["output"] for a, r in zip(ours, held_out)) / len(held_out)
    llama_rate = sum(a == r["output"] for a, r in zip(theirs, held_out)) / len(held_out)
    same = sum(a == b for a, b in zip(ours, theirs))
    print(
        f"exact match on {len(held_out)} held-out prompts: generate {generate_rate:.1%}, llama.cpp original + LoRA {llama_rate:.1%} "
        f"(same answer {same}); original alone {plain_right}/20; verify {report.max_logit_diff:.3g}"
    )
    assert abs(llama_rate - generate_rate) <= MAX_GAP and llama_rate >= 0.9
    assert plain_right <= 2


@needs_llama_cpp
def test_ollama_modelfile_builds_the_lora_on_the_original_file(q4_original, gguf_adapter, tmp_path):
    report = export_gguf(gguf_adapter, tmp_path / "demo-lora.gguf", lora_only=True, ollama=True, verify=False)
    assert report.modelfile == tmp_path / "demo-lora.Modelfile"
    lines = report.modelfile.read_text().splitlines()
    assert lines[1:3] == [f"FROM {q4_original}", "ADAPTER ./demo-lora.gguf"]
    # the layout the adapter learned (alpaca), whatever template the base carries
    assert lines[3].startswith('TEMPLATE """{{ range') and 'PARAMETER stop "</s>"' in lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo-lora.Modelfile", "demo-lora.gguf"]


def write_ollama_store(store: Path, blob: Path, model: str, tag: str) -> Path:
    """An Ollama model store holding `blob` as library/model:tag (as `ollama pull` lays it out); the blob's path."""
    digest = hashlib.sha256(blob.read_bytes()).hexdigest()
    (store / "blobs").mkdir(parents=True, exist_ok=True)
    stored = store / "blobs" / f"sha256-{digest}"
    shutil.copyfile(blob, stored)
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / model / tag
    manifest.parent.mkdir(parents=True, exist_ok=True)
    layer = {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": blob.stat().st_size}
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [layer]}))
    return stored


@needs_llama_cpp
def test_ollama_modelfile_names_the_ollama_model_it_came_from(q4_original, gguf_adapter, tmp_path, monkeypatch):
    from qlora_lite.gguf_base import ensure_gguf_base

    blob = write_ollama_store(tmp_path / "ollama", q4_original, "tiny", "latest")
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    (tmp_path / "cache").mkdir()
    link_converter(tmp_path / "cache")
    monkeypatch.setenv("QLORA_LITE_CACHE", str(tmp_path / "cache"))  # cached anew, with the Ollama name as its source
    base = ensure_gguf_base("ollama:tiny")
    assert read_gguf_source(base)["source"] == "ollama:tiny" and read_gguf_source(base)["file"] == str(blob)
    report = export_gguf(gguf_adapter, tmp_path / "out" / "tiny-lora.gguf", lora_only=True, ollama=True, base=str(base), verify=False)
    assert report.modelfile.read_text().splitlines()[1:3] == ["FROM tiny:latest", "ADAPTER ./tiny-lora.gguf"]
    assert report.notes[-1] == f"serve it on the original GGUF, unchanged: llama-server -m {blob} --lora {report.out}"
    # Once the name means another file (a newer `ollama pull`), FROM names the file trained on, by path.
    write_ollama_store(tmp_path / "ollama", tmp_path / "out" / "tiny-lora.gguf", "tiny", "latest")
    assert name_modelfile_base(read_gguf_source(base), blob) == str(blob)


@needs_llama_cpp
def test_ollama_with_lora_only_stays_refused_for_an_ordinary_base(gguf_adapter, tmp_path, capsys):
    from qlora_lite.demo import ensure_demo_base

    args = ["export-gguf", str(gguf_adapter), "--out", str(tmp_path / "lora.gguf"), "--lora-only", "--ollama", "--base", str(ensure_demo_base())]
    assert cli.main(args) == 2
    err = read_error(capsys)
    assert err.startswith("error: --ollama writes a Modelfile for a whole model; with --lora-only") and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


@needs_llama_cpp
def test_an_original_that_changed_or_went_is_refused_in_one_line(q4_original, gguf_adapter, tmp_path, capsys):
    from qlora_lite.methods.folder import read_adapter_json

    base = shutil.copytree(read_adapter_json(gguf_adapter)["base_model_name_or_path"], tmp_path / "base")
    changed = tmp_path / "changed.gguf"
    changed.write_bytes(q4_original.read_bytes()[:-1] + b"\x01")  # a different file at the recorded path
    source = read_gguf_source(base) | {"file": str(changed)}
    (base / "gguf_source.json").write_text(json.dumps(source))
    args = ["export-gguf", str(gguf_adapter), "--out", str(tmp_path / "out" / "lora.gguf"), "--lora-only", "--base", str(base)]
    assert cli.main(args) == 2
    err = read_error(capsys)
    digest = hashlib.sha256(changed.read_bytes()).hexdigest()
    assert err == (
        f"error: {changed} has changed since the adapter's base was dequantized from it into {base} (sha256 "
        f"{source['sha256'][:12]} then, {digest[:12]} now), so the adapter was trained on another model; put the earlier file "
        "back, or train on this one\n"
    )
    changed.unlink()
    assert cli.main(args) == 2
    assert read_error(capsys) == (
        f"error: the adapter's base {base} was dequantized from {changed} ({source['source']}), which is no longer there; "
        "put that file back and export again (the export reads its vocabulary and tensor table)\n"
    )
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


# ---------------------------------------------------------------------------------------------
# What llama.cpp requires of a LoRA on a base (no llama.cpp needed)
# ---------------------------------------------------------------------------------------------


def make_header(name: str, architecture: str, shapes: dict[str, tuple[int, ...]]) -> GGUFHeader:
    tensors = {t: GGUFTensor(t, shape, 1, 0) for t, shape in shapes.items()}
    return GGUFHeader(Path(name), {"general.architecture": architecture}, tensors)


ORIGINAL = {"blk.0.attn_q.weight": (128, 128), "blk.0.attn_k.weight": (128, 64), "blk.0.attn_norm.weight": (128,)}


@pytest.mark.parametrize(
    "architecture, lora, message",
    [
        ("llama", {"blk.0.attn_q.weight": (128, 128), "blk.0.attn_k.weight": (128, 64)}, None),
        (
            "llama", {"blk.0.attn_q.weight": (128, 128), "blk.1.attn_q.weight": (128, 128)},
            "orig.gguf has no tensor blk.1.attn_q.weight, which the LoRA lora.gguf changes, so llama.cpp would refuse it; nothing "
            "was written. Export the merged model instead (drop --lora-only)",
        ),
        (
            "llama", {"blk.0.attn_k.weight": (128, 128)},
            "orig.gguf's tensor blk.0.attn_k.weight is 128 x 64 and the LoRA lora.gguf has 128 x 128 for it, so llama.cpp would "
            "refuse it; nothing was written. Check that the adapter was trained on this file",
        ),
        (
            "qwen2", {"blk.0.attn_q.weight": (128, 128)},
            "the LoRA lora.gguf is for llama.cpp architecture qwen2 and orig.gguf holds a llama model, so llama.cpp would refuse "
            "it; nothing was written. Export the merged model instead (drop --lora-only)",
        ),
    ],
)
def test_a_lora_the_original_cannot_take_is_refused_in_one_line(architecture, lora, message):
    # llama.cpp's own rule (llama_adapter_lora_init): base tensor X for X.lora_a / X.lora_b, ne[0] = a's, ne[1] = b's
    r = 8
    pairs = {}
    for target, (rows, cols) in lora.items():
        pairs[f"{target}.lora_a"], pairs[f"{target}.lora_b"] = (rows, r), (r, cols)
    base, adapter = make_header("orig.gguf", "llama", ORIGINAL), make_header("lora.gguf", architecture, pairs)
    if message is None:
        check_lora_fits(adapter, base, "lora.gguf")
        return
    with pytest.raises(GGUFError) as caught:
        check_lora_fits(adapter, base, "lora.gguf")
    assert str(caught.value) == message


# ---------------------------------------------------------------------------------------------
# The merged model, as for any base
# ---------------------------------------------------------------------------------------------


@needs_llama_cpp
def test_merged_export_of_an_adapter_on_a_gguf_base(q4_original, gguf_adapter, tmp_path):
    # The cache folder has transformers' tokenizer.json and no tokenizer.model: the converter alone would write the
    # SentencePiece vocabulary without its scores and llama.cpp would tokenize otherwise; the original's is put back.
    from qlora_lite.demo import format_demo_prompt, make_demo_records
    from qlora_lite.llama_cpp import LlamaCppModel

    report = export_gguf(gguf_adapter, tmp_path / "merged-q8_0.gguf", "q8_0")
    assert report.num_probes == 4 and report.max_logit_diff <= report.threshold == 0.05
    ours, theirs = read_gguf_header(report.out).metadata, read_gguf_header(q4_original).metadata
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.add_space_prefix"):
        assert ours[key] == theirs[key], key
    held_out = make_demo_records()[1][:50]
    with LlamaCppModel(report.out) as model:
        right = sum(model.detokenize(model.generate(model.tokenize(format_demo_prompt(r)), 16)) == r["output"] for r in held_out)
    print(f"merged q8_0: verify {report.max_logit_diff:.3g}, exact match {right}/{len(held_out)}")
    assert right >= 0.9 * len(held_out)


def test_a_tokenizer_the_converter_refuses_points_to_the_lora(monkeypatch, tmp_path):
    # A byte-pair vocabulary rebuilt by transformers may hash as no released tokenizer; the LoRA needs no vocabulary.
    from qlora_lite.export import gguf as export_module
    from qlora_lite.llama_cpp import explain_converter_failure

    def refuse(*args, **kwargs):
        raise GGUFError(explain_converter_failure("NotImplementedError: BPE pre-tokenizer was not recognized", "stage"))

    monkeypatch.setattr(export_module, "convert_model", refuse)
    original = tmp_path / "Qwen2.5-0.5B-Q4_K_M.gguf"
    with pytest.raises(GGUFError) as caught:
        export_module.convert_merged(None, tmp_path / "stage", "f16", None, tmp_path, original)
    assert str(caught.value) == (
        "llama.cpp's converter does not recognise the tokenizer transformers rebuilt from Qwen2.5-0.5B-Q4_K_M.gguf (it knows "
        "byte-pair tokenizers by the hash of released models'); export the adapter alone and serve it on the original: "
        f"--lora-only, then llama-server -m {original} --lora LORA.gguf"
    )
