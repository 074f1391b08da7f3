"""fit(): loss falls, accumulation is exact, checkpoints resume to the same adapter after SIGKILL,
NaN and out-of-memory stop cleanly, and an earlier run is never overwritten by accident."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qlora_lite.config import load_recipe
from qlora_lite.data.batching import select_micro_batch
from qlora_lite.errors import TrainingError
from qlora_lite.training.checkpoints import find_latest_checkpoint
from qlora_lite.training.fit import fit
from tests.helpers import read_metrics, recipe_overrides


def adapter_tensors(folder) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


def test_loss_falls_on_4bit_base_and_outputs_are_written(tiny_model_dir, tmp_path):
    cfg = load_recipe(None, recipe_overrides(tmp_path, tiny_model_dir, **{"train.max_steps": 12, "train.lr": 1e-2}))
    summary = fit(cfg)
    run = tmp_path / "run"
    # The response tokens of this task come from a 12-word vocabulary: even a frozen random base
    # with LoRA learns their distribution. Measured: eval loss falls ~30% in 12 steps; assert 20%.
    assert summary["final_eval_loss"] < 0.8 * summary["initial_eval_loss"]
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "qlora_lite.json", "tokenizer.json", "tokenizer_config.json"]
    metrics = read_metrics(run)
    steps = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 13))
    assert all(m["tokens_per_s"] > 0 and m["lr"] > 0 or m["step"] == 12 for m in steps)
    assert [m["when"] for m in metrics if m.get("event") == "memory"] == ["start", "end"]
    assert load_recipe(run / "config.yaml").train.max_steps == 12


def test_gradient_accumulation_equals_one_big_batch(tiny_llama_dir, tmp_path):
    # random batching: grouped batching would give the micro-batches of 2 and of 4 different examples
    common = {"lora.dtype": "float32", "train.optimizer": "adamw", "train.max_steps": 3, "data.eval_fraction": 0.0, "train.batching": "random"}
    fit(load_recipe(None, recipe_overrides(tmp_path / "a", tiny_llama_dir, **common, **{"train.micro_batch_size": 2, "train.grad_accum_steps": 2}))) if (tmp_path / "a").mkdir() is None else None
    fit(load_recipe(None, recipe_overrides(tmp_path / "b", tiny_llama_dir, **common, **{"train.micro_batch_size": 4, "train.grad_accum_steps": 1}))) if (tmp_path / "b").mkdir() is None else None
    a, b = adapter_tensors(tmp_path / "a" / "run" / "adapter"), adapter_tensors(tmp_path / "b" / "run" / "adapter")
    # Same 4 examples per step, each micro-batch weighted by its share of target tokens: the
    # adapters agree to fp32 rounding (the padded lengths differ, so not bitwise).
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5


def test_micro_batches_are_a_pure_function_of_position():
    examples = [{"id": i} for i in range(10)]
    first_epoch = [select_micro_batch(examples, i, 3, seed=7, batching="random") for i in range(3)]
    assert sorted(e["id"] for batch in first_epoch for e in batch) == sorted(e["id"] for e in examples if e["id"] in {x["id"] for b in first_epoch for x in b})
    assert len({e["id"] for batch in first_epoch for e in batch}) == 9  # 3 full batches, the 10th example waits
    assert select_micro_batch(examples, 4, 3, seed=7, batching="random") == select_micro_batch(examples, 4, 3, seed=7, batching="random")
    assert select_micro_batch(examples, 3, 3, seed=7, batching="random") != select_micro_batch(examples, 0, 3, seed=7, batching="random")  # new epoch, new order


def run_cli(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "qlora_lite.cli", *args], capture_output=True, text=True, env=env, timeout=600)


def test_sigkill_then_resume_matches_uninterrupted_run(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    common = {"train.max_steps": 6, "train.save_every": 2, "lora.dropout": 0.1, "data.eval_fraction": 0.0}
    straight = run_cli(["train", str(recipe), *recipe_overrides(tmp_path, tiny_llama_dir, **common, output_dir=str(tmp_path / "straight"))])
    assert straight.returncode == 0, straight.stderr[-2000:]

    killed = run_cli(["train", str(recipe), *recipe_overrides(tmp_path, tiny_llama_dir, **common, output_dir=str(tmp_path / "killed"))], {"QLORA_LITE_KILL_AT_STEP": "5"})
    assert killed.returncode == -9  # SIGKILL after step 5: the step-4 checkpoint is the newest complete one
    assert find_latest_checkpoint(tmp_path / "killed").name == "step-0000004"
    assert not (tmp_path / "killed" / "adapter").exists()
    # A checkpoint torn mid-write is never picked up.
    (tmp_path / "killed" / "checkpoints" / ".step-0000006.tmp").mkdir()
    (tmp_path / "killed" / "checkpoints" / "step-0000008").mkdir()  # no trainer_state.pt: incomplete
    resumed = run_cli(["train", str(recipe), "--resume", *recipe_overrides(tmp_path, tiny_llama_dir, **common, output_dir=str(tmp_path / "killed"))])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "step-0000004" in resumed.stdout

    a, b = adapter_tensors(tmp_path / "straight" / "adapter"), adapter_tensors(tmp_path / "killed" / "adapter")
    assert set(a) == set(b)
    # Same data position, optimizer state, LR schedule and dropout RNG: bitwise equal on the CPU.
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_llama_dir, tmp_path):
    # An absurd LR blows the adapter up after the first step; the loss of step 2 is not finite.
    cfg = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"train.lr": 1e30, "train.warmup_steps": 0, "train.save_every": 1, "train.max_grad_norm": 0.0, "train.optimizer": "adamw"}))
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step 2.*last good checkpoint is .*step-0000001"):
        fit(cfg)
    assert find_latest_checkpoint(tmp_path / "run").name == "step-0000001"
    assert not (tmp_path / "run" / "adapter").exists()


def test_out_of_memory_names_the_fix(tiny_llama_dir, tmp_path, monkeypatch):
    import qlora_lite.training.fit as fit_module

    def explode(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fit_module, "clip_gradients", explode)
    with pytest.raises(TrainingError, match=r"out of GPU memory at step 1.*train.micro_batch_size.*train.max_seq_len"):
        fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir)))


def test_existing_run_is_not_overwritten_without_flag(tiny_llama_dir, tmp_path):
    cfg = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"train.max_steps": 1, "data.eval_fraction": 0.0}))
    fit(cfg)
    before = (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes()
    with pytest.raises(TrainingError, match="already holds a run; it has finished; pass --overwrite"):
        fit(cfg)
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").read_bytes() == before
    fit(cfg, overwrite=True)
    assert len([m for m in read_metrics(tmp_path / "run") if "loss" in m]) == 1  # the old metrics were replaced


def test_resume_and_overwrite_together_are_refused_before_anything_is_touched(tiny_llama_dir, tmp_path):
    """Issue 22: the pair silently resumed a finished run (and said "pass --overwrite" when there was no checkpoint)."""
    cfg = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"train.max_steps": 1, "data.eval_fraction": 0.0}))
    fit(cfg)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(TrainingError) as err:
        fit(cfg, resume=True, overwrite=True)
    assert str(err.value) == f"--resume continues the run in {tmp_path / 'run'} and --overwrite deletes it to start over; pass one of them"
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics  # no second summary appended


# What the kernel answers differs: /proc takes no new folders even from root, other users are refused.
@pytest.mark.parametrize("folder, problem", [
    ("/proc/qlora-run", r"cannot create /proc/qlora-run \((the file system of /proc takes no new folders|permission denied)\)"),
    ("/sys/kernel/qlora", r"cannot create /sys/kernel/qlora \((permission denied|read-only file system)\)"),
])  # fmt: skip
def test_an_output_folder_that_cannot_be_written_is_one_line_before_the_model_loads(tiny_llama_dir, tmp_path, monkeypatch, capsys, folder, problem):
    """Issue 22: /proc gave a FileNotFoundError traceback, /sys a PermissionError one, from prepare_output_dir."""
    import qlora_lite.training.fit as fit_module
    from qlora_lite import cli

    monkeypatch.setattr(fit_module, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded before output_dir was checked"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    code = cli.main(["train", str(recipe), *recipe_overrides(tmp_path, tiny_llama_dir, output_dir=folder)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert re.fullmatch(f"error: output_dir {folder} cannot be written: {problem}; choose a folder you can write with output_dir=\\.\\.\\.\n", err), err
    assert not Path(folder).exists()


def test_resume_without_checkpoint_is_explained(tiny_llama_dir, tmp_path):
    with pytest.raises(TrainingError, match="no complete checkpoint"):
        fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir)), resume=True)


def test_cli_reports_user_errors_without_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  learning_rate: 1e-4\n")
    result = run_cli(["train", str(recipe)])
    assert result.returncode == 2
    assert "error: unknown recipe key 'train.learning_rate'; did you mean 'train.lr'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_resume_refuses_changed_lora_and_applies_a_lower_lr(tiny_llama_dir, tmp_path):
    base = {"train.max_steps": 2, "train.save_every": 1, "data.eval_fraction": 0.0, "train.lr_scheduler": "constant", "train.warmup_steps": 0}
    fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **base)))
    with pytest.raises(TrainingError, match=r"trained with different lora.alpha.*recipe and overrides it was started with"):
        fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{**base, "lora.alpha": 64, "train.max_steps": 4})), resume=True)
    fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{**base, "train.lr": 1e-6, "train.max_steps": 4})), resume=True)
    steps = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert [m["lr"] for m in steps] == pytest.approx([5e-3, 5e-3, 1e-6, 1e-6])
    summary = read_metrics(tmp_path / "run")[-1]
    assert summary["event"] == "summary" and summary["steps"] == 4


def test_resumed_run_forgets_steps_past_its_checkpoint_and_keeps_initial_eval(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    args = recipe_overrides(tmp_path, tiny_llama_dir, **{"train.max_steps": 5, "train.save_every": 2})
    killed = run_cli(["train", str(recipe), *args], {"QLORA_LITE_KILL_AT_STEP": "3"})
    assert killed.returncode == -9
    assert [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m] == [1, 2, 3]
    resumed = run_cli(["train", str(recipe), "--resume", *args])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    metrics = read_metrics(tmp_path / "run")
    assert [m["step"] for m in metrics if "loss" in m] == [1, 2, 3, 4, 5]  # step 3 once, from the resumed run
    summary = metrics[-1]
    first_eval = next(m for m in metrics if m.get("event") == "eval")
    assert summary["initial_eval_loss"] == first_eval["eval_loss"]  # carried in the checkpoint
    # each run (the killed one, then the resumed one) recorded how its data was prepared (the
    # resumed one from the cache), then its environment
    data_lines = [i for i, m in enumerate(metrics) if m.get("event") == "data"]
    assert data_lines == [0, 7] and metrics[7]["cache"] == "hit" and metrics[7]["kept"] == metrics[0]["kept"] == 48
    assert [i for i, m in enumerate(metrics) if m.get("event") == "environment"] == [1, 8]
    assert [m.get("event") for m in metrics[2:5]] == ["memory", "eval", "samples"]
    assert metrics[1]["packages"]["torch"] == torch.__version__ and metrics[1]["bitsandbytes"]["error"] is None
    assert "eval_loss: " in resumed.stdout and " -> " in resumed.stdout
    # the last step is always checkpointed, so resuming a finished run has nothing left to redo
    assert find_latest_checkpoint(tmp_path / "run").name == "step-0000005"


def test_failed_run_without_checkpoint_is_rerun_without_overwrite(tiny_llama_dir, tmp_path, capsys):
    bad = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"train.lr": 1e30, "train.warmup_steps": 0, "train.max_grad_norm": 0.0, "train.optimizer": "adamw"}))
    with pytest.raises(TrainingError, match=r"no checkpoint had been written yet; after the fix, run the same command again \(it starts over\)"):
        fit(bad)
    assert (tmp_path / "run" / "metrics.jsonl").is_file() and not (tmp_path / "run" / "checkpoints").exists()
    fixed = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"train.max_steps": 2}))
    assert fit(fixed)["steps"] == 2  # no --overwrite needed: nothing was worth protecting
    assert "stopped before its first checkpoint; starting it over" in capsys.readouterr().out
    assert any(json.loads(line).get("event") == "environment" for line in (tmp_path / "run" / "metrics.previous.jsonl").read_text().splitlines())
    with pytest.raises(TrainingError, match="already holds a run; it has finished; pass --overwrite"):
        fit(fixed)  # a finished run is still protected


# ---------------------------------------------------------------------------- cheap checks first


def test_bad_record_fails_before_the_model_loads_and_writes_nothing(tiny_llama_dir, tmp_path, monkeypatch):
    import qlora_lite.training.fit as fit_module
    from qlora_lite.errors import DataError

    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"instruction": "Repeat.", "output": "a"}) + "\n" + json.dumps({"instruction": "Repeat."}) + "\n")
    monkeypatch.setattr(fit_module, "load_base_model", lambda *a, **k: pytest.fail("the model was loaded before the data was checked"))
    with pytest.raises(DataError, match="record 1 has no 'output' field"):
        fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"data.path": str(data), "data.eval_fraction": 0.0})))
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file_is_one_clear_error(tiny_llama_dir, tmp_path):
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(TrainingError, match=r"output_dir .*run is a file, not a folder; choose another folder with output_dir=\.\.\. or move the file away"):
        fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir)))
    assert (tmp_path / "run").read_text() == "not a folder"


def test_auto_micro_batch_is_capped_by_the_data(tiny_llama_dir, tmp_path, capsys):
    cfg = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{
        "train.micro_batch_size": "auto", "data.max_examples": 6, "data.eval_fraction": 0.0, "train.max_steps": 1,
    }))  # fmt: skip
    fit(cfg)
    assert cfg.train.micro_batch_size == 6
    out = capsys.readouterr().out
    assert "train.micro_batch_size auto -> 6 (the planner fits" in out and "but there are only 6 training examples)" in out
    assert load_recipe(str(tmp_path / "run" / "config.yaml")).train.micro_batch_size == 6  # the run records what it used


def test_epochs_set_max_steps_from_the_data(tiny_llama_dir, tmp_path, capsys):
    # 48 records, 12 held out: 36 training examples; micro-batch 4 x 1 -> 9 steps per epoch
    cfg = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"train.epochs": 0.5}))
    assert fit(cfg)["steps"] == 5  # ceil(0.5 x 36 / 4)
    assert "train.epochs 0.5 -> train.max_steps 5 (36 training examples / (micro-batch 4 x 1 accumulated) = 9.0 steps per epoch)" in capsys.readouterr().out


def test_resume_takes_new_cpu_threads_and_says_when_the_schedule_is_rebuilt(tiny_llama_dir, tmp_path, capsys):
    common = {"train.save_every": 2, "train.lr_scheduler": "cosine"}
    fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **common, **{"train.max_steps": 4})))
    longer = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **common, **{"train.max_steps": 8, "train.cpu_threads": 1}))
    assert fit(longer, resume=True)["steps"] == 8
    out = capsys.readouterr().out
    assert "note: train.max_steps changed from 4 to 8: the cosine schedule is rebuilt over the new length, so the LR at step 4 is now" in out
    notes = [m for m in read_metrics(tmp_path / "run") if m.get("event") == "note"]
    assert len(notes) == 1 and notes[0]["step"] == 4


def test_relative_base_path_is_stored_absolute_in_the_adapter(tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_llama_dir.parent)
    cfg = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"model.name_or_path": tiny_llama_dir.name, "train.max_steps": 1}))
    fit(cfg)
    stored = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert stored == str(tiny_llama_dir.resolve())


def test_corrupt_base_weights_are_one_line_in_train(tiny_llama_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_llama_dir, broken)
    for shard in broken.glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:100])
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    result = run_cli(["train", str(recipe), *recipe_overrides(tmp_path, broken)])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: the weights in {broken} are corrupt or truncated (safetensors:")


# ---------------------------------------------------------------------------- stopping and full disks


def start_long_run(tmp_path, tiny_llama_dir) -> subprocess.Popen:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    args = recipe_overrides(tmp_path, tiny_llama_dir, **{"train.max_steps": 100000, "train.save_every": 1000})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "qlora_lite.cli", "train", str(recipe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for_steps(run_dir, n: int, proc: subprocess.Popen, timeout_s: float = 300) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.exists() and sum('"loss"' in line for line in path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"the run did not reach {n} steps in {timeout_s} s")


@pytest.mark.parametrize("signum,exit_code", [(2, 130), (15, 143)])  # SIGINT (Ctrl-C), SIGTERM
def test_signal_finishes_the_step_checkpoints_and_resumes(tiny_llama_dir, tmp_path, signum, exit_code):
    proc = start_long_run(tmp_path, tiny_llama_dir)
    wait_for_steps(tmp_path / "run", 3, proc)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == exit_code, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    checkpoint = find_latest_checkpoint(tmp_path / "run")
    step = int(checkpoint.name.removeprefix("step-"))
    assert last == f"stopped at step {step}; checkpoint {checkpoint}; continue with --resume"
    # every step that finished was kept: the checkpoint is the last logged step
    steps = [m["step"] for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert step >= 3 and steps[-1] == step
    stopped = [m for m in read_metrics(tmp_path / "run") if m.get("event") == "stopped"]
    assert stopped == [{**stopped[0], "step": step, "signal": {2: "SIGINT", 15: "SIGTERM"}[signum], "checkpoint": str(checkpoint)}]
    recipe = tmp_path / "recipe.yaml"
    resumed = run_cli(["train", str(recipe), "--resume", *recipe_overrides(tmp_path, tiny_llama_dir, **{"train.max_steps": step + 2, "train.save_every": 1000})])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {checkpoint} at step {step}" in resumed.stdout


def test_second_ctrl_c_stops_at_once(tmp_path):
    import signal

    from qlora_lite.errors import TrainingStopped
    from qlora_lite.training.stopping import StopRequest

    stop = StopRequest(tmp_path)
    stop.handle(signal.SIGINT, None)
    assert stop.signum == signal.SIGINT  # the first only asks
    with pytest.raises(TrainingStopped, match="stopped at once by a second Ctrl-C") as err:
        stop.handle(signal.SIGINT, None)
    assert err.value.exit_code == 130


def test_full_disk_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tiny_llama_dir, tmp_path, monkeypatch):
    from qlora_lite.training import checkpoints

    real_save = torch.save
    calls = {"n": 0}

    def save_until_the_disk_fills(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second checkpoint meets a full disk, as torch's zip writer reports it
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 996736 vs 996624")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoints.torch, "save", save_until_the_disk_fills)
    cfg = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"train.save_every": 2, "train.max_steps": 6}))
    with pytest.raises(TrainingError) as err:
        fit(cfg)
    message = str(err.value)
    first = tmp_path / "run" / "checkpoints" / "step-0000002"
    assert message.startswith(f"disk full while writing step-0000004 in {tmp_path / 'run' / 'checkpoints'}: it needs about ")
    assert f"MiB are free; the last complete checkpoint is {first}." in message
    assert "train.keep_checkpoints" in message and "train.save_every" in message and "output_dir" in message and "\n" not in message
    assert find_latest_checkpoint(tmp_path / "run") == first
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]  # no half-written folder


def test_short_disk_is_warned_at_start(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    import collections

    from qlora_lite.training import checkpoints

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(checkpoints.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2**20, 2**20))  # 1 MiB free
    fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"train.max_steps": 1})))
    err = capsys.readouterr().err
    assert "warning: " in err and "has 1 MiB free but this run needs about" in err and "lower train.keep_checkpoints" in err


def test_checkpoint_from_before_the_new_settings_resumes_as_it_was_trained(tiny_llama_dir, tmp_path):
    from qlora_lite.training.checkpoints import STATE_NAME

    common = {"train.save_every": 2, "train.batching": "random", "data.truncation": "keep", "train.loss": "hf"}
    fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **common, **{"train.max_steps": 2})))
    checkpoint = find_latest_checkpoint(tmp_path / "run")
    state = torch.load(checkpoint / STATE_NAME, weights_only=True)
    for section, key in (("train", "batching"), ("train", "loss"), ("train", "loss_chunk_tokens"), ("data", "truncation")):
        del state["config"][section][key]  # as an older qlora-lite wrote it
    torch.save(state, checkpoint / STATE_NAME)
    with pytest.raises(TrainingError, match="trained with different data.truncation, train.batching"):  # new defaults: drop, grouped
        fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{"train.save_every": 2, "train.max_steps": 4})), resume=True)
    resumed = load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **{**common, "train.loss": "chunked"}, **{"train.max_steps": 4}))
    assert fit(resumed, resume=True)["steps"] == 4  # the loss path may change: both compute the same loss


def test_a_run_reports_to_tensorboard_draws_its_curves_and_records_sample_answers(tiny_llama_dir, tmp_path):
    from tests.helpers import read_tensorboard

    extra = {"train.report_to": ["tensorboard"], "train.sample_prompts": 2, "train.eval_every": 3, "train.max_steps": 6, "train.exact_match_examples": 2}
    fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **extra)))
    run = tmp_path / "run"
    metrics = read_metrics(run)
    # TensorBoard holds the losses of metrics.jsonl at their steps (float32 in the event file).
    scalars = read_tensorboard(run / "trackers" / "tensorboard" / "run")
    losses = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    assert [step for step, _ in scalars["train/loss"]] == [step for step, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in scalars["train/loss"]] == pytest.approx([value for _, value in losses], rel=1e-6)
    assert [step for step, _ in scalars["eval/eval_loss"]] == [0, 3, 6]
    # The same 2 eval prompts answered at each eval (start, step 3, end).
    samples = [m for m in metrics if m.get("event") == "samples"]
    assert [m["step"] for m in samples] == [0, 3, 6]
    assert all(len(m["samples"]) == 2 for m in samples)
    assert len({tuple(s["prompt"] for s in m["samples"]) for m in samples}) == 1
    assert all(set(s) == {"prompt", "answer", "reference"} and "### Response:" in s["prompt"] for m in samples for s in m["samples"])
    # The curves are drawn at the end.
    assert (run / "curves.png").stat().st_size > 10_000


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_folder_a_run_writes_carries_the_sentencepiece_model_so_it_exports(tmp_path, method):
    """Issue 22: a method=full run's folder had no tokenizer.model, so export-gguf refused it (merge's folders had one)."""
    from qlora_lite.tiny import build_sentencepiece_tokenizer, build_tiny_model

    base = tmp_path / "sp-base"
    tokenizer = build_sentencepiece_tokenizer(["Repeat the word. cat dog sun tree book fish bird moon star rain lamp door"] * 10, base, vocab_size=150)
    build_tiny_model(base, architecture="llama", vocab_size=len(tokenizer))
    extra = {"method": method, "quant.load_in_4bit": method != "full", "train.max_steps": 1, "data.eval_fraction": 0.0}
    fit(load_recipe(None, recipe_overrides(tmp_path, base, **extra)))
    written = tmp_path / "run" / "adapter"
    assert (written / "tokenizer.model").read_bytes() == (base / "tokenizer.model").read_bytes()
    assert (written / ("config.json" if method == "full" else "adapter_config.json")).is_file()


def test_eval_lines_start_their_own_line_in_a_log_that_holds_the_progress_bar_too(tiny_llama_dir, tmp_path):
    """Issue 22: with stdout and stderr in one file, `...tok_s=8909]step 100: eval_loss 0.0135` glued eval lines to the bar."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("{}\n")
    overrides = recipe_overrides(tmp_path, tiny_llama_dir, **{"train.max_steps": 4, "train.eval_every": 2, "train.log_every": 1})
    result = subprocess.run(
        [sys.executable, "-m", "qlora_lite", "train", str(recipe), *overrides], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
    lines = [line.split("\r")[-1] for line in result.stdout.split("\n")]  # what a terminal or `less -r` shows of each line
    evals = [line for line in result.stdout.split("\n") if "eval_loss" in line and not line.startswith("  ")]
    assert [line.partition(":")[0] for line in evals] == ["step 0", "step 2", "step 4"], evals
    assert all(line.startswith("step ") for line in evals)
    assert sum(line.startswith("step ") for line in lines) == 3


def test_the_first_step_is_logged_so_the_warmup_shows_on_the_curves(tiny_llama_dir, tmp_path):
    """Issue 22: with log_every 10 the first logged learning rate was step 10's, and curves.png drew no warm-up."""
    overrides = {"train.max_steps": 12, "train.log_every": 10, "train.warmup_steps": 4, "train.lr": 1e-3, "data.eval_fraction": 0.0}
    fit(load_recipe(None, recipe_overrides(tmp_path, tiny_llama_dir, **overrides)))
    logged = [(m["step"], m["lr"]) for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [step for step, _ in logged] == [1, 10, 12]
    assert logged[0][1] == pytest.approx(1e-3 * 1 / 5)  # the warm-up's first LR: (step + 1) / (warmup + 1) of the peak
