"""Where a run's records go: `metrics.jsonl` always, and the experiment trackers of `train.report_to`.

`metrics.jsonl` is the record of a run; the trackers (TensorBoard, Weights & Biases, MLflow,
trackio, through accelerate's tracker classes) receive a copy of its numbers, so a run can be
watched and compared in the tools people already use. The copy, record by record:

    record in metrics.jsonl                             tracker tags, at the record's step
    {"step", "loss", "lr", "grad_norm", "tokens_per_s"} train/loss, train/lr, train/grad_norm, train/tokens_per_s
    {"event": "eval", "eval_loss", "exact_match"}       eval/eval_loss, eval/exact_match
    {"event": "memory", "when", ...}                    memory/<key>.<key> of every number (e.g. memory/device_memory.peak_rss_gib),
                                                        start and end as two points of one series
    {"event": "plan_check", ...}                        plan/<key> of every number
    {"event": "samples", "samples": [...]}              text `samples`: prompt | answer | reference (a markdown table; a wandb Table)
    {"event": "environment"|"resume"|"note"|"stopped"}  text events/<event> (the record as JSON)
    {"event": "summary"}                                nothing: its figures are the eval series' first and last points

A record without a step (memory, environment) goes at the last step written. Text reaches only
the trackers that show it (TensorBoard, wandb); MLflow and trackio get the numbers. The
hyper-parameters are the resolved recipe flattened to dotted keys (`train.lr`, `lora.r`).

TensorBoard gets them inside the run's own folder, so one training run, resumes included, is one
run in TensorBoard (accelerate's tracker calls SummaryWriter.add_hparams, which makes a new
timestamped sub-run at every start: three runs listed for a run resumed once). They go in twice,
at the step each start or resume begins: as the HParams plugin's session start, so the HParams
tab lists the run itself beside the other runs, with its own scalars as metric columns to sort
and filter by; and as a text table `hparams` (key | value), which also shows what a resume changed
(TensorBoard's HParams tab keeps a run's first values).

Where each tracker writes, unless its own environment variables say otherwise:
    tensorboard  OUTPUT_DIR/trackers/tensorboard/RUN_NAME/   (`tensorboard --logdir runs` compares runs)
    wandb        project $WANDB_PROJECT or `qlora-lite`, run RUN_NAME; local files in OUTPUT_DIR/trackers/wandb/.
                 Online by default, as wandb is: `wandb login` first, or WANDB_MODE=offline to keep
                 the run on disk and upload it later with `wandb sync OUTPUT_DIR/trackers/wandb/offline-run-*`
    mlflow       $MLFLOW_TRACKING_URI, else sqlite:///OUTPUT_DIR/trackers/mlflow.db; experiment
                 $MLFLOW_EXPERIMENT_NAME or `qlora-lite`, run RUN_NAME
    trackio      trackio's own store ($TRACKIO_DIR, default ~/.cache/huggingface/trackio), project `qlora-lite`, run RUN_NAME
RUN_NAME is `train.run_name`, or the output folder's name. A tracker that fails in the middle of
a run (a server gone) is reported once and dropped; the run and metrics.jsonl go on.
"""

from __future__ import annotations

import importlib
import json
import math
import numbers
import os
import re
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import RecipeConfig, config_to_dict
from ..errors import TrackingError

# The package each tracker imports; the extra that installs it has the tracker's name.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
DEFAULT_PROJECT = "qlora-lite"
# Trackers that show text (sample answers, notes); the others get numbers only.
TEXT_TRACKERS = ("tensorboard", "wandb")
# What to do when a tracker cannot start, by tracker.
START_HINTS = {
    "wandb": "log in with `wandb login`, or set WANDB_MODE=offline to keep the run on disk and `wandb sync` it later",
    "mlflow": "check MLFLOW_TRACKING_URI (unset: a sqlite file in the run's trackers/ folder)",
    "trackio": "check TRACKIO_DIR, or TRACKIO_SPACE_ID / TRACKIO_SERVER_URL if you set them",
    "tensorboard": "check that the output folder is writable",
}


# ---------------------------------------------------------------------------- metrics.jsonl


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl and sends its numbers to the trackers.

    Each line is flushed so a killed run keeps its history. Only the main process writes one.
    """

    def __init__(self, path: Path, trackers: Sequence[Any] = (), step: int = 0) -> None:
        self.path = Path(path)
        self.trackers = list(trackers)
        self.last_step = step  # where records without a step (memory, environment) go

    def write(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}, default=float) + "\n")
        if isinstance(record.get("step"), numbers.Integral):
            self.last_step = int(record["step"])
        for tracker in list(self.trackers):
            try:
                send_record(tracker, record, self.last_step)
            except Exception as err:  # a tracker's server gone must not stop the run: metrics.jsonl has it all
                print(f"warning: train.report_to {tracker.name} failed ({type(err).__name__}: {err}); it gets no more records, metrics.jsonl does")
                self.trackers.remove(tracker)

    def drop_steps_after(self, step: int) -> None:
        """Forget lines of steps past `step` (a killed run's work that the resumed run redoes).

        A line the killed run left half-written is dropped too.
        """
        if not self.path.exists():
            return
        kept = [line for line, record in iter_lines(self.path) if record is not None and record.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)

    def close(self) -> None:
        """Finish every tracker's run (flush and close files, end the wandb / MLflow run)."""
        for tracker in self.trackers:
            try:
                tracker.finish()
            except Exception as err:
                print(f"warning: train.report_to {tracker.name} did not close cleanly ({type(err).__name__}: {err})")
        self.trackers = []


class NullLog:
    """The log of a process that does not write (not rank 0): records are dropped, as the main process writes them all."""

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def iter_lines(path: Path) -> Iterator[tuple[str, dict | None]]:
    """(line, record) for each line of a metrics.jsonl; record is None for a line that is not a JSON
    object (the half-written last line of a killed or still running run)."""
    with Path(path).open(errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            yield line, record if isinstance(record, dict) else None


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, skipping a half-written line (a run may be writing it now)."""
    return [record for _, record in iter_lines(path) if record is not None]


# ---------------------------------------------------------------------------- trackers


def check_trackers_installed(names: Sequence[str]) -> None:
    """Raise TrackingError naming the extra to install for the first tracker whose package does not import.

    Call it before the model loads: a missing package costs seconds, not a model load.
    """
    for name in names:
        package = TRACKER_PACKAGES[name]
        try:
            importlib.import_module(package)
        except ImportError as err:
            broken = "" if isinstance(err, ModuleNotFoundError) and err.name == package else f" (importing it failed: {err})"
            raise TrackingError(f"train.report_to {name} needs the {package} package: pip install 'qlora-lite[{name}]'{broken}") from err


def open_run_log(out_dir: str | Path, cfg: RecipeConfig, resume_step: int | None = None) -> MetricsLog:
    """The run's MetricsLog for OUT_DIR/metrics.jsonl, with cfg.train.report_to's trackers started.

    On resume (resume_step = the checkpoint's step) the log forgets the killed run's lines past the
    checkpoint, and TensorBoard hides that run's events past it too. Call it on the main process
    only, after check_trackers_installed. The trackers log through accelerate's logger, which needs
    accelerate's state: when no Accelerator or PartialState exists yet, a default PartialState is made.
    """
    out = Path(out_dir)
    log = MetricsLog(out / "metrics.jsonl", step=resume_step or 0)
    if resume_step is not None:
        log.drop_steps_after(resume_step)
    if not cfg.train.report_to:
        return log
    check_trackers_installed(cfg.train.report_to)
    from accelerate.state import PartialState

    if not PartialState._shared_state:
        PartialState()
    run_name = cfg.train.run_name or out.resolve().name
    hyper_parameters = flatten_config(config_to_dict(cfg))
    for name in cfg.train.report_to:
        tracker = build_tracker(name, out, run_name, resume_step)
        try:
            tracker.start()
            if name == "tensorboard":
                store_tensorboard_hparams(tracker.writer, hyper_parameters, resume_step or 0)
            else:
                tracker.store_init_configuration(hyper_parameters)
        except Exception as err:
            log.close()  # the ones already started
            raise TrackingError(f"train.report_to {name} could not start its run ({type(err).__name__}: {err}); {START_HINTS[name]}") from err
        log.trackers.append(tracker)
    return log


def build_tracker(name: str, out: Path, run_name: str, resume_step: int | None):
    """accelerate's tracker for `name`, not started, writing where the module docstring says."""
    from accelerate import tracking

    trackers_dir = out / "trackers"
    trackers_dir.mkdir(parents=True, exist_ok=True)
    if name == "tensorboard":
        # purge_step: TensorBoard hides the earlier events at and past this step (the killed run's
        # steps past its checkpoint), as drop_steps_after does for metrics.jsonl.
        purge = {"purge_step": resume_step + 1} if resume_step is not None else {}
        tracker = tracking.TensorBoardTracker(run_name, trackers_dir / "tensorboard", **purge)
    elif name == "wandb":
        # accelerate passes its run_name as wandb's project: the project is ours, the run is named.
        project = os.environ.get("WANDB_PROJECT") or DEFAULT_PROJECT
        tracker = tracking.WandBTracker(project, name=run_name, dir=str(trackers_dir))
    elif name == "mlflow":
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # MLflow 3 refuses a file store by default; a sqlite file keeps the run inside its folder.
            mlflow.set_tracking_uri(f"sqlite:///{(trackers_dir / 'mlflow.db').resolve()}")
        tracker = tracking.MLflowTracker(experiment_name=DEFAULT_PROJECT, run_name=run_name)
    elif name == "trackio":
        tracker = tracking.TrackioTracker(DEFAULT_PROJECT, name=run_name)
    else:
        raise TrackingError(f"train.report_to: unknown tracker {name!r}; one of {', '.join(TRACKER_PACKAGES)}")
    # Only the main process builds trackers, so none of them need to ask accelerate which process this is.
    tracker.main_process_only = False
    return tracker


def store_tensorboard_hparams(writer, values: dict, step: int) -> None:
    """The hyper-parameters into a TensorBoard run's own event files, at `step` (see the module docstring).

    In place of accelerate's store_init_configuration, whose add_hparams makes a sub-run per start.
    """
    from tensorboard.plugins.hparams.summary_v2 import hparams_pb

    session_start = hparams_pb({key: value for key, value in values.items() if value is not None})
    for value in session_start.value:
        value.ClearField("tensor")  # as torch's add_hparams writes it: the plugin's metadata only
    writer.file_writer.add_summary(session_start, step)
    rows = [f"| {escape_cell(key)} | {escape_cell(value if isinstance(value, str) else json.dumps(value))} |" for key, value in values.items()]
    writer.add_text("hparams", "\n".join(["| hyper-parameter | value |", "| --- | --- |", *rows]), global_step=step)
    writer.flush()


def flatten_config(tree: dict, prefix: str = "") -> dict[str, bool | int | float | str | None]:
    """{'train': {'lr': 2e-4}} -> {'train.lr': 2e-4}; lists become their text (hyper-parameters are scalars)."""
    flat: dict[str, bool | int | float | str | None] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=str)
    return flat


# ---------------------------------------------------------------------------- records -> tracker values

# Records whose numbers become scalars, by kind: the tag prefix.
SCALAR_KINDS = {None: "train", "eval": "eval", "memory": "memory", "plan_check": "plan"}
# Keys that describe a record rather than measure something.
NOT_MEASURES = {"time", "step", "event", "when"}
# A sample answer's keys, as the columns of the trackers' table: the expected answer beside the model's.
SAMPLE_COLUMNS = ("prompt", "answer", "reference")


def tracker_scalars(record: dict) -> dict[str, float]:
    """The record's numbers as tracker tags (`train/loss`, `eval/eval_loss`, `memory/params.trainable`)."""
    prefix = SCALAR_KINDS.get(record.get("event"), "")
    if not prefix:
        return {}
    measures = {k: v for k, v in record.items() if k not in NOT_MEASURES}
    return {f"{prefix}/{key}": value for key, value in flatten_numbers(measures).items()}


def flatten_numbers(tree: dict, prefix: str = "") -> dict[str, float]:
    """Every real number of a nested dict under a dotted, tracker-safe key (MLflow allows [A-Za-z0-9_.-/ ])."""
    flat: dict[str, float] = {}
    for key, value in tree.items():
        name = prefix + (re.sub(r"[^A-Za-z0-9_.-]+", "_", str(key)).strip("_") or "_")
        if isinstance(value, dict):
            flat.update(flatten_numbers(value, f"{name}."))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
            flat[name] = float(value)
    return flat


def tracker_texts(record: dict) -> dict[str, str]:
    """The record's text for trackers that show it: sample answers as a markdown table, events as JSON."""
    event = record.get("event")
    if event is None or event in SCALAR_KINDS or event == "summary":
        return {}
    if event == "samples":
        rows = ["| " + " | ".join(escape_cell(s.get(key, "")) for key in SAMPLE_COLUMNS) + " |" for s in record.get("samples", [])]
        return {"samples": "\n".join(["| " + " | ".join(SAMPLE_COLUMNS) + " |", "| --- | --- | --- |", *rows])}
    return {f"events/{event}": json.dumps({k: v for k, v in record.items() if k != "time"}, default=str)}


def escape_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", "<br>")


def send_record(tracker, record: dict, step: int) -> None:
    """Send one metrics.jsonl record to one started tracker, at `step`."""
    scalars = tracker_scalars(record)
    if scalars:
        tracker.log(scalars, step=step)
    if tracker.name not in TEXT_TRACKERS:
        return
    if record.get("event") == "samples" and tracker.name == "wandb":
        rows = [[step, *(s.get(key, "") for key in SAMPLE_COLUMNS)] for s in record.get("samples", [])]
        tracker.log_table("samples", columns=["step", *SAMPLE_COLUMNS], data=rows, step=step)
        return
    texts = tracker_texts(record)
    if texts:
        tracker.log(texts, step=step)
