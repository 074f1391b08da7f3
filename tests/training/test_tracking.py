"""tracking: metrics.jsonl and the experiment trackers get the same numbers, read back from the trackers' own files."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from qlora_lite.config import RecipeConfig, config_to_dict
from qlora_lite.errors import TrackingError
from qlora_lite.training.tracking import (
    MetricsLog,
    check_trackers_installed,
    flatten_config,
    open_run_log,
    read_records,
    tracker_scalars,
    tracker_texts,
)
from tests.helpers import read_tensorboard

MEMORY = {
    "event": "memory", "when": "start",
    "params": {"trainable": 32768, "frozen": 361088, "total": 393856, "trainable_pct": 8.32},
    "bytes_by_dtype": {"float32": 395776, "nf4/fp4 (packed uint8)": 147456},
    "device_memory": {"kind": "cpu process RSS", "rss_gib": 0.65, "peak_rss_gib": 0.66},
}  # fmt: skip


def make_cfg(out: Path, report_to: list[str], run_name: str | None = None) -> RecipeConfig:
    cfg = RecipeConfig()
    cfg.output_dir = str(out)
    cfg.train.report_to = report_to
    cfg.train.run_name = run_name
    cfg.train.lr = 3e-3
    cfg.lora.target_modules = ["q_proj", "v_proj"]
    out.mkdir(parents=True, exist_ok=True)
    return cfg


def write_run(log: MetricsLog, steps: range, loss_offset: float = 0.0) -> None:
    """The records fit() writes, in its order, with values that differ at every step."""
    log.write({"event": "environment", "python": "3.11.7"})
    log.write(dict(MEMORY))
    log.write({"event": "eval", "step": steps.start - steps.step, "eval_loss": 4.971, "exact_match": 0.0})
    for step in steps:
        log.write({"step": step, "loss": 3.0 / step + loss_offset, "lr": 1e-3 * (1 - step / 100), "grad_norm": 0.1 * step + 0.01, "tokens_per_s": 20000.0 + step / 7})
    log.write({"event": "eval", "step": steps[-1], "eval_loss": 0.0147, "exact_match": 1.0})
    log.write({"event": "samples", "step": steps[-1], "samples": [{"prompt": "rot13(ABCDE) =", "answer": "NOPQS", "reference": "NOPQR"}]})
    log.write({**MEMORY, "when": "end", "device_memory": {"kind": "cpu process RSS", "rss_gib": 0.66, "peak_rss_gib": 0.7}})


def expected_series(records: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What every tracker should hold: each record's scalars at its step (or the last step before it)."""
    series: dict[str, list[tuple[int, float]]] = {}
    step = 0
    for record in records:
        step = record.get("step", step)
        for tag, value in tracker_scalars(record).items():
            series.setdefault(tag, []).append((step, value))
    return series


def test_record_kinds_map_to_tracker_tags():
    step = {"time": 1.0, "step": 10, "loss": 3.8, "lr": 2.7e-3, "grad_norm": 1.89, "tokens_per_s": 20285.9}
    assert tracker_scalars(step) == {"train/loss": 3.8, "train/lr": 2.7e-3, "train/grad_norm": 1.89, "train/tokens_per_s": 20285.9}
    assert tracker_scalars({"event": "eval", "step": 0, "eval_loss": 4.97, "exact_match": 0.0}) == {"eval/eval_loss": 4.97, "eval/exact_match": 0.0}
    memory = tracker_scalars(MEMORY)
    assert len(memory) == 4 + 2 + 2  # params, bytes_by_dtype, device_memory's numbers (its kind is text)
    assert memory["memory/params.trainable"] == 32768 and memory["memory/bytes_by_dtype.nf4_fp4_packed_uint8"] == 147456
    assert memory["memory/device_memory.peak_rss_gib"] == 0.66
    assert tracker_scalars({"event": "plan_check", "estimated_peak_gib": 0.76, "note": "cpu"}) == {"plan/estimated_peak_gib": 0.76}
    for text_only in ({"event": "note", "step": 3, "note": "x"}, {"event": "environment", "python": "3.11"}, {"event": "summary", "steps": 300, "final_eval_loss": 0.01}):
        assert tracker_scalars(text_only) == {}
    samples = [{"prompt": "a|b", "answer": "c\nd", "reference": "c d"}, {"prompt": "e", "answer": "f"}]  # a record of old: no reference
    assert tracker_texts({"event": "samples", "step": 5, "samples": samples}) == {
        "samples": "| prompt | answer | reference |\n| --- | --- | --- |\n| a\\|b | c<br>d | c d |\n| e | f |  |"
    }
    assert json.loads(tracker_texts({"event": "note", "step": 3, "note": "x", "time": 1.0})["events/note"]) == {"event": "note", "step": 3, "note": "x"}
    assert tracker_texts({"event": "summary", "steps": 3}) == {} and tracker_texts(step) == {}


def test_hyper_parameters_are_the_recipe_flattened_to_dotted_keys(tmp_path):
    flat = flatten_config({"train": {"lr": 2e-4, "run_name": None, "report_to": ["wandb"]}, "output_dir": "runs/x"})
    assert flat == {"train.lr": 2e-4, "train.run_name": None, "train.report_to": '["wandb"]', "output_dir": "runs/x"}


def test_tensorboard_event_files_hold_the_values_of_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run-a"
    cfg = make_cfg(out, ["tensorboard"], run_name="lr-3e-3")
    log = open_run_log(out, cfg)
    write_run(log, range(10, 60, 10))
    log.close()

    records = read_records(out / "metrics.jsonl")
    assert len(records) == 11
    expected = expected_series(records)
    assert len(expected) == 4 + 2 + 8  # train, eval, memory tags
    assert expected["train/loss"][0] == (10, 0.3) and expected["memory/device_memory.peak_rss_gib"] == [(0, 0.66), (50, 0.7)]
    folder = out / "trackers" / "tensorboard" / "lr-3e-3"  # train.run_name names the run
    got = read_tensorboard(folder)
    assert sorted(got) == sorted(expected)
    for tag, points in expected.items():
        # TensorBoard stores scalars as float32: exactly the float32 nearest to metrics.jsonl's number.
        assert got[tag] == [(step, float(np.float32(value))) for step, value in points], tag
    texts = read_tensorboard(folder, texts=True)
    assert sorted(texts) == ["events/environment/text_summary", "hparams/text_summary", "samples/text_summary"]
    # the expected answer beside the model's, so a wrong answer shows as one
    assert texts["samples/text_summary"] == [(50, "| prompt | answer | reference |\n| --- | --- | --- |\n| rot13(ABCDE) = | NOPQS | NOPQR |")]
    hparams = read_tensorboard_hparams(folder)
    assert hparams["train.lr"] == 3e-3 and hparams["lora.target_modules"] == '["q_proj", "v_proj"]' and hparams["train.run_name"] == "lr-3e-3"
    assert hparams["model.gradient_checkpointing"] is True and "data.eval_path" not in hparams  # a bool stays one; None is left out
    [(step, table)] = texts["hparams/text_summary"]
    lines = table.splitlines()
    assert step == 0 and lines[:2] == ["| hyper-parameter | value |", "| --- | --- |"] and len(lines) == 2 + len(flatten_config(config_to_dict(cfg)))
    assert "| train.lr | 0.003 |" in lines and '| lora.target_modules | ["q_proj", "v_proj"] |' in lines and "| data.eval_path | null |" in lines


def read_tensorboard_hparams(folder: Path) -> dict:
    """The hyper-parameters TensorBoard's HParams tab shows for a run folder (its session start info)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    events = EventAccumulator(str(folder))
    events.Reload()
    content = events.PluginTagToContent(metadata.PLUGIN_NAME)[metadata.SESSION_START_INFO_TAG]
    info = metadata.parse_session_start_info_plugin_data(content)
    return {key: getattr(value, value.WhichOneof("kind")) for key, value in info.hparams.items()}


def tensorboard_runs(root: Path) -> list[str]:
    """The runs TensorBoard lists under `root`: every folder holding an event file."""
    return sorted(str(path.parent.relative_to(root)) for path in root.rglob("events.out.tfevents.*"))


def test_tensorboard_resume_hides_the_killed_runs_steps_past_the_checkpoint(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run-b"
    cfg = make_cfg(out, ["tensorboard"])
    log = open_run_log(out, cfg)
    write_run(log, range(10, 60, 10))  # killed after step 50; its last checkpoint was step 30
    log.close()
    log = open_run_log(out, cfg, resume_step=30)
    assert log.last_step == 30
    for step in (40, 50):
        log.write({"step": step, "loss": 9.0 + step, "lr": 1e-4, "grad_norm": 1.0, "tokens_per_s": 1.0})
    log.close()

    steps = [(r["step"], r["loss"]) for r in read_records(out / "metrics.jsonl") if "loss" in r]
    assert steps == [(10, 0.3), (20, 0.15), (30, 0.1), (40, 49.0), (50, 59.0)]
    got = read_tensorboard(out / "trackers" / "tensorboard" / "run-b")  # no run_name: the folder's name
    assert got["train/loss"] == [(s, float(np.float32(v))) for s, v in steps]


def test_tensorboard_shows_a_run_and_its_resumes_as_one_run_with_its_hyper_parameters(tmp_path):
    pytest.importorskip("tensorboard")
    out = tmp_path / "run-i"
    cfg = make_cfg(out, ["tensorboard"])
    log = open_run_log(out, cfg)
    write_run(log, range(10, 60, 10))
    log.close()
    cfg.train.lr = 1e-3  # a resume may change the LR for the rest of the run
    log = open_run_log(out, cfg, resume_step=30)
    log.write({"step": 40, "loss": 0.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1.0})
    log.close()

    root = out / "trackers" / "tensorboard"
    assert tensorboard_runs(root) == ["run-i", "run-i"]  # two event files (start, resume) of one run, no sub-run
    assert [p.name for p in (root / "run-i").iterdir() if p.is_dir()] == []
    assert read_tensorboard_hparams(root / "run-i")["train.lr"] == 3e-3  # the HParams tab: the start's values
    tables = read_tensorboard(root / "run-i", texts=True)["hparams/text_summary"]
    assert [(step, "| train.lr | 0.003 |" in table, "| train.lr | 0.001 |" in table) for step, table in tables] == [(0, True, False), (30, False, True)]


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file (a LevelDB-style log of 32 KiB blocks after a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, position, chunk = [], 7, b""
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


@pytest.fixture
def wandb_offline(monkeypatch, tmp_path):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")  # leave pytest's capture of stdout alone
    monkeypatch.setenv("WANDB_ERROR_REPORTING", "false")
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    yield
    import wandb

    wandb.teardown()  # stop wandb's background service


def test_wandb_offline_writes_its_run_folder_with_the_values_of_metrics_jsonl(tmp_path, wandb_offline):
    out = tmp_path / "run-c"
    cfg = make_cfg(out, ["wandb"])
    log = open_run_log(out, cfg)
    write_run(log, range(10, 60, 10))
    log.close()
    import wandb

    wandb.teardown()  # run.finish() returns before wandb's service has written everything; its shutdown waits

    runs = list((out / "trackers" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    records = read_wandb_records(next(runs[0].glob("*.wandb")))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name) == ("qlora-lite", "run-c")
    config = {}  # wandb.init's config, then store_init_configuration's update
    for record in records:
        kind = record.WhichOneof("record_type")
        updates = record.run.config.update if kind == "run" else record.config.update if kind == "config" else []
        config.update({item.key: json.loads(item.value_json) for item in updates})
    assert config["train.lr"] == 3e-3 and config["lora.r"] == 16 and config["output_dir"] == str(out)
    got: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                key = item.key or "/".join(item.nested_key)  # wandb stores `train/loss` as the path train, loss
                if key.split("/")[0] in ("train", "eval", "memory"):
                    got.setdefault(key, []).append((record.history.step.num, json.loads(item.value_json)))
    expected = expected_series(read_records(out / "metrics.jsonl"))
    assert got == expected  # wandb keeps float64: the very numbers of metrics.jsonl
    assert len(got["train/loss"]) == 5 and got["eval/eval_loss"] == [(0, 4.971), (50, 0.0147)]
    [table] = (runs[0] / "files" / "media" / "table").glob("samples_50_*.table.json")  # the sample answers, as a table
    assert json.loads(table.read_text()) == {"columns": ["step", "prompt", "answer", "reference"], "data": [[50, "rot13(ABCDE) =", "NOPQS", "NOPQR"]]}


def test_wandb_without_a_login_is_a_one_line_error_naming_both_fixes(tmp_path, wandb_offline, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    out = tmp_path / "run-d"
    with pytest.raises(TrackingError) as err:
        open_run_log(out, make_cfg(out, ["wandb"]))
    message = str(err.value)
    assert "\n" not in message and message.startswith("train.report_to wandb could not start its run")
    assert "wandb login" in message and "WANDB_MODE=offline" in message


@pytest.mark.parametrize("name", ["tensorboard", "wandb", "mlflow", "trackio"])
def test_a_missing_tracker_package_is_one_line_naming_the_extra(monkeypatch, tmp_path, name):
    monkeypatch.setitem(sys.modules, name, None)  # `import name` now fails as if it were not installed
    with pytest.raises(TrackingError) as err:
        check_trackers_installed(["tensorboard", name] if name != "tensorboard" else [name])
    assert str(err.value) == f"train.report_to {name} needs the {name} package: pip install 'qlora-lite[{name}]'"
    out = tmp_path / "run-e"
    with pytest.raises(TrackingError, match=f"qlora-lite\\[{name}\\]"):
        open_run_log(out, make_cfg(out, [name]))


def test_no_trackers_writes_metrics_jsonl_only(tmp_path):
    out = tmp_path / "run-f"
    log = open_run_log(out, make_cfg(out, []))
    write_run(log, range(10, 30, 10))
    log.close()
    assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl"]
    assert len(read_records(out / "metrics.jsonl")) == 6 + 2  # 2 steps


class FlakyTracker:
    """Stands for a tracker whose server goes away after `ok` calls."""

    name = "mlflow"

    def __init__(self, ok: int) -> None:
        self.ok, self.logged, self.finished = ok, [], 0

    def log(self, values: dict, step: int) -> None:
        if len(self.logged) == self.ok:
            raise ConnectionError("server gone")
        self.logged.append((step, values))

    def finish(self) -> None:
        self.finished += 1


def test_a_tracker_that_fails_mid_run_is_reported_once_and_dropped(tmp_path, capsys):
    flaky, steady = FlakyTracker(ok=2), FlakyTracker(ok=10**6)
    log = MetricsLog(tmp_path / "metrics.jsonl", trackers=[flaky, steady])
    write_run(log, range(10, 60, 10))
    log.close()
    assert len(read_records(tmp_path / "metrics.jsonl")) == 11
    assert len(flaky.logged) == 2 and len(steady.logged) == 9  # memory, eval, 5 steps, eval, memory (text goes nowhere for mlflow)
    assert steady.logged[0][0] == 0 and steady.logged[-1][0] == 50  # the end's memory record goes at the last step
    assert capsys.readouterr().out.count("warning: train.report_to mlflow failed (ConnectionError: server gone)") == 1
    assert (flaky.finished, steady.finished) == (0, 1)


def test_drop_steps_after_also_drops_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "environment"}\n{"step": 10, "loss": 1.0}\n{"step": 20, "loss": 0.5}\n{"step": 30, "lo')
    assert [r.get("step") for r in read_records(path)] == [None, 10, 20]  # a running run's partial line is skipped
    MetricsLog(path).drop_steps_after(10)
    assert path.read_text() == '{"event": "environment"}\n{"step": 10, "loss": 1.0}\n'


# MLflow and trackio are not in the test extra (their dependencies clash with the tested set's
# pins); these run where they are installed.


def test_mlflow_run_holds_the_values_of_metrics_jsonl(tmp_path, monkeypatch):
    mlflow = pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    out = tmp_path / "run-g"
    log = open_run_log(out, make_cfg(out, ["mlflow"], run_name="ml"))
    write_run(log, range(10, 60, 10))
    log.close()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{out / 'trackers' / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("qlora-lite").experiment_id])[0]
    assert run.info.run_name == "ml" and float(run.data.params["train.lr"]) == 3e-3
    expected = expected_series(read_records(out / "metrics.jsonl"))
    for tag in ("train/loss", "train/tokens_per_s", "eval/eval_loss", "memory/device_memory.peak_rss_gib"):
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)] == expected[tag]


def test_trackio_run_holds_the_values_of_metrics_jsonl(tmp_path, monkeypatch):
    if "trackio" not in sys.modules:
        monkeypatch.setenv("TRACKIO_DIR", str(tmp_path / "trackio"))  # read when trackio is imported
    trackio = pytest.importorskip("trackio")
    out = tmp_path / "run-h"
    log = open_run_log(out, make_cfg(out, ["trackio"], run_name="tk"))
    write_run(log, range(10, 60, 10))
    log.close()
    from trackio.sqlite_storage import SQLiteStorage

    logs = SQLiteStorage.get_logs(project="qlora-lite", run="tk")
    got = [(row["step"], row["train/loss"]) for row in logs if "train/loss" in row]
    expected = expected_series(read_records(out / "metrics.jsonl"))
    assert got == expected["train/loss"], trackio.__version__
