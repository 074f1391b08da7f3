"""The `qlora-lite` command itself (qlora_lite/cli.py): --help and --version answer without the heavy
libraries, a user error is one `error:` line with exit 2, a stopped run exits 128 + signal (prefixed by
its rank under torchrun), key=value overrides reach the recipe from before or after flags and are refused
elsewhere, and the pure helpers (summaries, reports, generate's positionals) print exact lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import qlora_lite
from qlora_lite import cli
from qlora_lite.errors import GenerationError, PlanError, TrainingStopped
from qlora_lite.export.merge import MergeReport
from tests.helpers import cli_error

ROOT = Path(__file__).resolve().parents[1]
UNKNOWN_KEY = "unknown recipe key 'train.lrr'; did you mean 'train.lr'? (all keys are listed in the README's config table)"
STOPPED = "stopped at step 3; checkpoint kept in runs/x/checkpoint-3; --resume continues"


def run_python(*args: str) -> subprocess.CompletedProcess:
    # COLUMNS fixes argparse's wrapping, so the usage lines compared below do not depend on the terminal.
    env = {**os.environ, "COLUMNS": "100"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def recipe(tmp_path) -> str:
    """A minimal valid recipe: load_recipe never touches the model, so any name will do."""
    path = tmp_path / "recipe.yaml"
    path.write_text("model: {name_or_path: x}\n")
    return str(path)


# --- startup ----------------------------------------------------------------------------------------


def test_help_imports_no_torch():
    # The point of deferring each command's imports: --help must not pay seconds for torch & co.
    code = (
        "import contextlib, io, json, sys\n"
        "from qlora_lite import cli\n"
        "out, codes = io.StringIO(), []\n"
        "for argv in (['--help'], ['train', '--help']):\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(out): cli.main(argv)\n"
        "    except SystemExit as exit_:\n"
        "        codes.append(exit_.code)\n"
        "cli.build_parser().format_help()\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'datasets') if m in sys.modules)\n"
        "usage = [line for line in out.getvalue().splitlines() if line.startswith('usage:')]\n"
        "print(json.dumps([codes, heavy, usage]))\n"
    )
    result = run_python("-c", code)
    assert result.returncode == 0, result.stderr
    codes, heavy, usage = json.loads(result.stdout.splitlines()[-1])
    assert codes == [0, 0]
    assert heavy == []
    assert usage == [
        "usage: qlora-lite [-h] [--version]",
        "usage: qlora-lite train [-h] [--resume] [--overwrite] recipe [key=value ...]",
    ]


def test_module_version_prints_the_package_version():
    result = run_python("-m", "qlora_lite", "--version")
    assert (result.returncode, result.stdout, result.stderr) == (0, f"qlora-lite {qlora_lite.__version__}\n", "")
    assert qlora_lite.__version__ == "0.1.0"


# --- errors and stopped runs -------------------------------------------------------------------------


def test_missing_recipe_is_one_error_line_with_exit_2(tmp_path, capsys):
    missing = tmp_path / "nonexistent.yaml"
    err = cli_error(["plan", str(missing)], capsys)
    assert err == f"error: recipe {missing} does not exist; pass the path of a YAML file such as recipes/tiny-demo.yaml\n"


def test_unknown_recipe_key_fails_before_training_starts(tmp_path, monkeypatch, capsys):
    path = tmp_path / "typo.yaml"
    path.write_text("model: {name_or_path: x}\ntrain: {lrr: 1}\n")

    def must_not_run(*args, **kwargs):
        raise AssertionError("fit ran although the recipe is invalid")

    monkeypatch.setattr("qlora_lite.training.fit.fit", must_not_run)
    assert cli_error(["train", str(path)], capsys) == f"error: {UNKNOWN_KEY}\n"


@pytest.mark.parametrize(
    "signum, rank, code, prefix",
    [(signal.SIGTERM, None, 143, ""), (signal.SIGINT, None, 130, ""), (signal.SIGTERM, "1", 143, "rank 1: ")],
)
def test_stopped_run_exits_128_plus_signal_without_error_prefix(recipe, monkeypatch, capsys, signum, rank, code, prefix):
    def stop(cfg, resume, overwrite):
        raise TrainingStopped(STOPPED, signum)

    monkeypatch.setattr("qlora_lite.training.fit.fit", stop)
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    # run_train points sys.stdout at /dev/null on a non-zero rank; monkeypatch puts capsys' back after.
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    assert cli.main(["train", recipe]) == code
    if rank is not None:
        assert sys.stdout.name == os.devnull  # only rank 0 reports
        sys.stdout.close()
    captured = capsys.readouterr()
    assert captured.err == f"{prefix}{STOPPED}\n"
    assert captured.out == ""


def test_error_on_a_nonzero_rank_names_the_rank(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK", "3")
    assert cli_error(["plan", str(tmp_path / "r.yaml")], capsys).startswith(f"rank 3: error: recipe {tmp_path / 'r.yaml'} does not exist;")


# --- overrides ---------------------------------------------------------------------------------------


def test_train_takes_overrides_before_and_after_flags(recipe, monkeypatch, capsys):
    seen = {}

    def fake_fit(cfg, resume, overwrite):
        seen.update(lr=cfg.train.lr, r=cfg.lora.r, resume=resume, overwrite=overwrite)
        return {"steps": 3, "adapter_dir": "runs/x/adapter"}

    monkeypatch.setattr("qlora_lite.training.fit.fit", fake_fit)
    monkeypatch.delenv("RANK", raising=False)
    assert cli.main(["train", recipe, "train.lr=1e-4", "--resume", "lora.r=4"]) == 0
    assert seen == {"lr": 1e-4, "r": 4, "resume": True, "overwrite": False}
    assert capsys.readouterr().out == "done: 3 steps; adapter written to runs/x/adapter\n"


def test_plan_override_after_a_flag_reaches_the_recipe(recipe, monkeypatch, capsys):
    seen = {}

    def fake_plan(cfg, vram_bytes, gpus):
        seen.update(seq=cfg.train.max_seq_len, name=cfg.model.name_or_path, vram=vram_bytes, gpus=gpus)
        raise PlanError("no config.json for y")  # stop here: the rest of run_plan needs a real plan

    monkeypatch.setattr("qlora_lite.planner.plan_memory", fake_plan)
    argv = ["plan", recipe, "model.name_or_path=y", "--vram", "8GiB", "train.max_seq_len=4096", "--gpus", "2"]
    assert cli_error(argv, capsys) == "error: no config.json for y\n"
    assert seen == {"seq": 4096, "name": "y", "vram": 8 * 2**30, "gpus": 2}
    assert cli_error(["plan", recipe, "--vram", "8GiB", "train.lrr=1"], capsys) == f"error: {UNKNOWN_KEY}\n"


@pytest.mark.parametrize(
    "argv, leftover",
    [
        (["merge", "adapter", "--out", "merged", "a=1"], "a=1"),
        (["plot", "runs/x", "train.lr=1"], "train.lr=1"),
        (["doctor", "x=1", "y=2"], "x=1 y=2"),
        (["train", "r.yaml", "--resume", "typo"], "typo"),  # train takes key=value only
        (["plan", "r.yaml", "--gpus", "2", "--vram=8GiB", "--x=1"], "--x=1"),  # a flag is never an override
    ],
)
def test_leftover_arguments_are_refused(argv, leftover, capsys):
    assert cli_error(argv, capsys).splitlines()[-1] == f"qlora-lite: error: unrecognized arguments: {leftover}"


# --- pure helpers ------------------------------------------------------------------------------------


def test_format_summary_shows_before_and_after():
    summary = {"steps": 8, "adapter_dir": "runs/x/adapter", "initial_eval_loss": 7.1, "final_eval_loss": 0.00914,
               "initial_exact_match": 0.0, "final_exact_match": 1.0}  # fmt: skip
    assert cli.format_summary(summary).splitlines() == [
        "done: 8 steps; adapter written to runs/x/adapter",
        "  eval_loss: 7.1000 -> 0.0091",
        "  exact_match: 0.0% -> 100.0%",
    ]
    # No first eval (e.g. resumed past it): the final value alone; no eval set: the first line alone.
    assert cli.format_summary({"steps": 2, "adapter_dir": "a", "final_exact_match": 0.25}) == "done: 2 steps; adapter written to a\n  exact_match: 25.0%"
    assert cli.format_summary({"steps": 0, "adapter_dir": "a"}) == "done: 0 steps; adapter written to a"


def test_format_prompt_neighbours_reprs_tokens_and_aligns_indices():
    rows = [[(" the", 5, 0.981), ("a", 7, 0.4149)], *[[("\n", 1, 0.5)]] * 10]
    lines = cli.format_prompt_neighbours(rows).splitlines()
    assert lines[0] == "nearest vocabulary tokens (cosine similarity) of 11 virtual tokens:"
    assert lines[1] == "   0: ' the' 0.98 | 'a' 0.41"  # 11 rows: indices two wide
    assert lines[11] == "  10: '\\n' 0.50"
    assert len(lines) == 12


def test_looks_like_folder(tmp_path):
    spaced = tmp_path / "my adapter"
    spaced.mkdir()
    assert cli.looks_like_folder(str(spaced)) is True  # an existing folder, spaces and all
    assert cli.looks_like_folder("runs/missing/adapter") is True  # path-shaped
    assert cli.looks_like_folder("What is 2 / 3?") is False  # whitespace: a prompt
    assert cli.looks_like_folder("hello") is False


def split(*argv: str):
    return cli.split_generate_inputs(cli.build_parser().parse_args(["generate", *argv]))


def test_split_generate_inputs_reads_the_positionals(tmp_path):
    adapter = str(tmp_path)
    assert split(adapter, "Name a colour.") == ({"adapter": adapter}, "Name a colour.")
    assert split(adapter) == ({"adapter": adapter}, None)  # prompts from stdin
    assert split("--base", "B", "Name a colour.") == ({}, "Name a colour.")  # the plain base answers
    assert split("--base", "B", adapter) == ({"adapter": adapter}, None)  # an existing folder is the adapter
    assert split("--base", "B") == ({}, None)
    assert split("--adapter", f"a={adapter}", "--adapter", "b=B", "a: hi") == ({"a": adapter, "b": "B"}, "a: hi")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--adapter", "a=D", "runs/x/adapter", "hi"], ("with --adapter, the only positional argument is the prompt; "
         "add an adapter folder as --adapter NAME=DIR instead of a positional ADAPTER_DIR")),
        ([], "nothing to load: pass an adapter folder, or --base PATH (with --adapter NAME=DIR to add adapters)"),
        (["--base", "B", "runs/missing/adapter"], ("adapter folder runs/missing/adapter does not exist; pass the folder "
         "training wrote (e.g. runs/NAME/adapter), or, to prompt the plain --base model with this text, give it on stdin")),
        (["--adapter", "base=D", "hi"], "adapter name 'base' is reserved for the plain base model; choose another name"),
    ],
)  # fmt: skip
def test_split_generate_inputs_refuses_ambiguous_input(argv, message):
    with pytest.raises(GenerationError) as raised:
        split(*argv)
    assert str(raised.value) == message


def test_malformed_named_adapter_is_an_argparse_error(capsys):
    err = cli_error(["generate", "--adapter", "math", "hi"], capsys)
    assert err.splitlines()[-1] == (
        "qlora-lite generate: error: argument --adapter: expected NAME=DIR, got 'math'; e.g. --adapter math=runs/math/adapter"
    )


def test_format_merge_report_lora_and_selective():
    report = MergeReport(out_dir=Path("OUT"), dtype="bfloat16", num_shards=3, merged_modules=14,
                         num_parameters=1_234_567, from_4bit=False, peak_rss_bytes=3 * 2**29)  # fmt: skip
    assert cli.format_merge_report(report).splitlines() == [
        "merged 14 LoRA layers into the base's original weights: 1.2M parameters, 3 shard(s), bfloat16 -> OUT",
        "  peak RSS 1.50 GiB",
    ]
    report = MergeReport(out_dir=Path("m"), dtype="float16", num_shards=1, merged_modules=6, num_parameters=7_241_732_096,
                         from_4bit=True, max_logit_diff=0.001234, threshold=0.01, num_probes=4, notes=["kept lm_head"],
                         peft_type="SELECTIVE")  # fmt: skip
    assert cli.format_merge_report(report).splitlines() == [
        "replaced 6 tensors of the base's dequantized NF4 weights: 7,241.7M parameters, 1 shard(s), float16 -> m",
        "  lossy: merged into NF4-rounded weights; max |logit difference| vs full-precision base+adapter: not measurable: "
        + "the base is itself quantized",
        "  verify: max |logit difference| merged vs base+adapter on 4 probe prompts: 0.00123 (threshold 0.01) ok",
        "  note: kept lm_head",
        "  peak RSS 0.00 GiB",
    ]
