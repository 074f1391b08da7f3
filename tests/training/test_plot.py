"""plot: curves.png from metrics.jsonl, read back from the figure it draws; `qlora-lite plot` and its errors."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import pytest
import yaml

from qlora_lite.cli import main
from qlora_lite.errors import PlotError
from qlora_lite.training.plot import (
    Curves,
    build_figure,
    choose_smoothing,
    describe_run,
    format_age,
    plot_run,
    read_curves,
    read_run_settings,
    smooth,
    smooth_loss,
)
from qlora_lite.training.tracking import MetricsLog, read_records

pytest.importorskip("matplotlib")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_demo_like_run(run: Path, steps: range, evals: bool = True, finished: bool = True) -> None:
    """The records fit() writes (as the demo's: the loss falls from ~4 to ~0.014), and config.yaml."""
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 300, "max_grad_norm": 1.0, "log_every": steps.step, "run_name": None}}))
    log = MetricsLog(run / "metrics.jsonl")
    log.write({"event": "environment", "python": "3.11.7"})
    log.write({"event": "memory", "when": "start", "params": {"trainable": 32768}})
    if evals:
        log.write({"event": "eval", "step": 0, "eval_loss": 4.971, "exact_match": 0.0})
    for step in steps:
        log.write({"step": step, "loss": 4.0 * math.exp(-step / 30) + 0.014, "lr": 3e-3 * (1 - step / 300), "grad_norm": 80.0 / step**1.5, "tokens_per_s": 20000.0 + step})
        if evals and step % 100 == 0:
            log.write({"event": "eval", "step": step, "eval_loss": 0.5 / step, **({"exact_match": 1.0} if step == steps[-1] else {})})
    if finished:
        log.write({"event": "summary", "steps": steps[-1]})


def lines_by_label(ax) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines()}


def test_smoothing_is_a_debiased_ema_whose_weight_follows_the_run_length():
    assert smooth([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 2.125 / 0.875], rel=1e-12)
    assert smooth([5.0, 1.0], 0.0) == [5.0, 1.0]
    # the loss is averaged in log space: the geometric mean's EMA
    assert smooth_loss([1.0, 100.0], 0.5) == pytest.approx([1.0, math.exp(0.5 * math.log(100.0) / 0.75)], rel=1e-12)
    assert [choose_smoothing(n) for n in (10, 20, 30, 100, 200, 5000)] == [0.0, 0.0, 0.33, 0.8, 0.9, 0.9]


def test_curves_png_is_written_with_four_panels_holding_the_logged_values(tmp_path):
    run = tmp_path / "tiny-demo"
    write_demo_like_run(run, range(10, 310, 10))
    path = plot_run(run)
    assert path == run / "curves.png"
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20_000
    assert not list(run.glob(".*.tmp"))

    records = read_records(run / "metrics.jsonl")
    figure = build_figure(read_curves(records), read_run_settings(run))
    loss_ax, lr_ax, grad_ax, speed_ax = figure.axes
    assert len(figure.axes) == 4
    assert [ax.get_title() for ax in figure.axes] == [
        "loss (mean per target token), log scale", "learning rate", "gradient norm (before clipping), log scale", "throughput (tokens/s)",
    ]  # fmt: skip
    assert figure.get_suptitle() == "tiny-demo: step 300 of 300, finished\neval loss 4.971 -> 0.001667, exact match 0% -> 100%"
    steps = [r for r in records if "loss" in r]
    loss_lines = lines_by_label(loss_ax)
    assert list(loss_lines) == ["train (every 10 steps)", "train, smoothed (EMA 0.33 of log loss)", "eval (held-out data)"]
    assert loss_lines["train (every 10 steps)"] == ([r["step"] for r in steps], [r["loss"] for r in steps])
    assert loss_lines["eval (held-out data)"] == ([0, 100, 200, 300], [4.971, 0.005, 0.0025, 0.5 / 300])
    eval_line = loss_ax.get_lines()[2]
    assert (eval_line.get_linestyle(), eval_line.get_marker()) == ("None", "o")  # measurements as dots: no line drawn between two evals
    smoothed = loss_lines["train, smoothed (EMA 0.33 of log loss)"][1]
    assert len(smoothed) == 30 and smoothed[0] == pytest.approx(steps[0]["loss"]) and smoothed[-1] == pytest.approx(steps[-1]["loss"], rel=0.01)  # no lag left at the end
    assert lines_by_label(lr_ax).popitem()[1] == ([r["step"] for r in steps], [r["lr"] for r in steps])
    grad_lines = lines_by_label(grad_ax)
    assert list(grad_lines) == ["grad norm", "clipped to 1 (train.max_grad_norm)"] and grad_lines["grad norm"][1] == [r["grad_norm"] for r in steps]
    assert len(speed_ax.get_lines()) == 1 and speed_ax.get_ylim()[0] == 0
    # the whole run's length, so a running run shows how far it got, with 2% to each side: a dot at step 0 or 300 is drawn whole
    assert [ax.get_xlim() for ax in figure.axes] == [(-6, 306)] * 4


def test_the_learning_rate_is_drawn_as_logged_from_its_first_logged_step_marked(tmp_path):
    run = tmp_path / "warm"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 300, "warmup_steps": 10, "lr_scheduler": "cosine", "log_every": 10}}))
    log = MetricsLog(run / "metrics.jsonl")
    steps = [1, *range(10, 310, 10)]  # fit() logs step 1 too: the warm-up's first LR, 1/11 of the peak
    lrs = [3e-3 / 11, *(3e-3 * (0.5 + 0.5 * math.cos(math.pi * max(step - 11, 0) / 290)) for step in steps[1:])]
    for step, lr in zip(steps, lrs):
        log.write({"step": step, "loss": 1.0, "lr": lr, "grad_norm": 1.0, "tokens_per_s": 100.0})
    lr_ax = build_figure(read_curves(read_records(run / "metrics.jsonl")), read_run_settings(run)).axes[1]
    [line] = lr_ax.get_lines()
    # Only what was logged: no point at step 0 (no step ran at LR 0; the schedule in config.yaml may have changed on resume).
    assert (list(line.get_xdata()), list(line.get_ydata())) == (steps, lrs)
    assert (line.get_marker(), line.get_markevery()) == ("o", [0])  # the first logged point as a dot, clear of the axis at step 0
    assert lr_ax.get_xlim()[0] == -6


def test_the_title_writes_each_kind_of_number_in_one_format():
    curves = Curves(steps=[1200], eval_steps=[0, 1200], eval_loss=[4.0, 0.0147], exact_match=[(0, 0.0), (1200, 0.5)], last_time=1000.0)
    title = describe_run(curves, {"run_name": "big", "max_steps": 3200}, now=1000.0 + 3 * 3600 + 12 * 60 + 20)
    # losses with 4 significant digits, steps with thousands separators, exact match in whole percent, ages in whole units
    assert title == "big: step 1,200 of 3,200, not finished, last record 3 h 12 min ago\neval loss 4.000 -> 0.01470, exact match 0% -> 50%"
    for loss, text in ((0.00004321, "0.00004321"), (0.5 / 300, "0.001667"), (0.99996, "1.000"), (12.0, "12.00"), (4.971, "4.971")):
        assert describe_run(Curves(eval_steps=[0], eval_loss=[loss], status="finished"), {"run_name": "r"}) == f"r: step 0, finished\neval loss {text}"
    ages = (12.4, 89, 90, 5399, 5400, 3 * 3600 + 12 * 60 + 20, 2 * 86400 + 4 * 3600 + 100)
    assert [format_age(seconds) for seconds in ages] == ["12 s", "89 s", "2 min", "90 min", "1 h 30 min", "3 h 12 min", "2 days 4 h"]


def test_a_running_run_with_a_half_written_line_and_no_eval_is_drawn(tmp_path):
    run = tmp_path / "live"
    write_demo_like_run(run, range(5, 125, 5), evals=False, finished=False)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"event": "resume", "step": 60}\n{"step": 125, "loss": 0.3')  # the line being written now
    assert plot_run(run).read_bytes()[:8] == PNG_MAGIC

    curves = read_curves(read_records(run / "metrics.jsonl"))
    assert len(curves.steps) == 24 and curves.last_step == 120 and curves.resumed_at == [60]
    figure = build_figure(curves, read_run_settings(run))
    loss_ax = figure.axes[0]
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train (every 5 steps)", "train, smoothed (EMA 0.17 of log loss)", "resumed here"]
    short = build_figure(read_curves(read_records(run / "metrics.jsonl")[:12]), read_run_settings(run))
    assert [line.get_label() for line in short.axes[0].get_lines()] == ["train (every 5 steps)"]  # 10 points: too few to smooth
    resume_marks = [line for ax in figure.axes for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert [list(line.get_xdata()) for line in resume_marks] == [[60, 60]] * 4  # in every panel
    title = figure.get_suptitle()
    assert title.startswith("live: step 120 of 300, not finished, last record ") and title.endswith(" s ago") and "eval" not in title


def test_a_run_that_logged_no_step_yet_still_gets_a_picture(tmp_path):
    run = tmp_path / "starting"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"event": "environment", "time": time.time()}) + "\n")
    assert plot_run(run).stat().st_size > 10_000
    figure = build_figure(read_curves(read_records(run / "metrics.jsonl")), read_run_settings(run))
    assert [text.get_text() for text in figure.axes[0].texts] == ["no step logged yet"]
    assert figure.get_suptitle().startswith("starting: step 0, not finished, last record ")


def test_without_matplotlib_the_run_gets_a_one_line_note_and_plot_an_error(tmp_path, monkeypatch, capsys):
    run = tmp_path / "r"
    write_demo_like_run(run, range(10, 40, 10))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot_run(run) is None
    assert capsys.readouterr().out == f"note: no curves.png: the curves need matplotlib: pip install 'qlora-lite[plot]', then `qlora-lite plot {run}`\n"
    assert not (run / "curves.png").exists()
    with pytest.raises(PlotError):
        plot_run(run, missing_ok=False)
    assert main(["plot", str(run)]) == 2
    assert capsys.readouterr().err == "error: the curves need matplotlib: pip install 'qlora-lite[plot]'\n"


def test_plot_command_writes_the_picture_and_refuses_what_is_not_a_run(tmp_path, capsys):
    run = tmp_path / "r"
    write_demo_like_run(run, range(10, 40, 10))
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out == f"wrote {run / 'curves.png'}\n" and (run / "curves.png").stat().st_size > 10_000
    assert main(["plot", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'missing'} does not exist; pass a run's output folder (the recipe's output_dir), e.g. runs/tiny-demo\n"
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    with pytest.raises(PlotError, match="has no metrics.jsonl"):
        plot_run(tmp_path / "empty")


def test_a_preference_run_adds_the_reward_panels_with_trls_metrics(tmp_path):
    run = tmp_path / "tiny-dpo"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"train": {"max_steps": 20, "max_grad_norm": 1.0, "log_every": 10, "run_name": None}}))
    log = MetricsLog(run / "metrics.jsonl")
    zero = {"rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/margins": 0.0, "rewards/accuracies": 0.0}
    log.write({"event": "eval", "step": 0, "eval_loss": 0.6931, **{f"eval_{k}": v for k, v in zero.items()}})
    for step, margin in ((10, 1.5), (20, 3.0)):
        rewards = {"rewards/chosen": -0.1, "rewards/rejected": -0.1 - margin, "rewards/margins": margin, "rewards/accuracies": margin / 3.2}
        log.write({"step": step, "loss": 0.7 / step, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 5000.0, **rewards})
    log.write({"event": "eval", "step": 20, "eval_loss": 0.147, "eval_rewards/margins": 3.42, "eval_rewards/accuracies": 0.99})
    figure = build_figure(read_curves(read_records(run / "metrics.jsonl")), read_run_settings(run))
    assert len(figure.axes) == 6
    rewards_ax, accuracy_ax = figure.axes[4:]
    assert rewards_ax.get_title() == "rewards (beta x log-ratio to the reference)"
    margins = lines_by_label(rewards_ax)
    assert margins["train margins"] == ([10, 20], [1.5, 3.0]) and margins["eval margins"] == ([0, 20], [0.0, 3.42])
    assert margins["train rejected"][1] == [-1.6, -3.1]
    assert lines_by_label(accuracy_ax)["eval accuracies"] == ([0, 20], [0.0, 0.99])
    assert figure.get_suptitle().endswith("eval loss 0.6931 -> 0.1470, reward accuracy 0% -> 99%")
