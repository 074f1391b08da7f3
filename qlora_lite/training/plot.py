"""curves.png: a run's curves as a person looks at them, drawn from its metrics.jsonl.

Four panels against the optimizer step: the loss (train as logged, train smoothed, eval as dots:
each evaluation is one measurement), the learning rate, the gradient norm before clipping (with
the clip level), and tokens/s; a preference run (its records carry TRL's rewards/*) adds two: the
rewards of the chosen and rejected answers and their margin, and the reward accuracy. Only logged points are drawn: the LR curve starts at the first
logged step (a dot marks it), not at an assumed 0 at step 0. Written at the end of every run and
by `qlora-lite plot RUN_DIR` at any time, also while the run is going: a half-written last line
is skipped. matplotlib is an optional extra (`qlora-lite[plot]`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import PlotError
from .tracking import read_records

PLOT_NAME = "curves.png"
# The train loss is smoothed by an exponential moving average, debiased at the start as in
# TensorBoard's smoothing slider, whose weight per logged point follows the run's length:
# 1 - SMOOTHING_POINTS / points, between 0 and MAX_SMOOTHING. An EMA of weight w lags by about
# w / (1 - w) points, so the smoothed curve trails by at most ~5% of the run (0.8 at 100 points,
# 0.9 from 200); a fixed 0.8 on the demo's 30 points sat 3x above the raw loss while it fell.
# It averages the log of the loss (a geometric mean), for the same reason: a loss falling from 5
# to 0.01 would otherwise drag the smoothed line far above the raw one.
SMOOTHING_POINTS = 20
MAX_SMOOTHING = 0.9
# A panel whose positive values span more than this factor is drawn on a log scale.
LOG_SCALE_RATIO = 30.0
# Room on each side of the step axis, as a share of the run's length: a dot at step 0 or at the
# last step is drawn whole, not cut in half by the frame.
X_MARGIN = 0.02
MISSING_MATPLOTLIB = "the curves need matplotlib: pip install 'qlora-lite[plot]'"


@dataclass
class Curves:
    """What metrics.jsonl holds, as series against the step."""

    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    tokens_per_s: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    eval_loss: list[float] = field(default_factory=list)
    exact_match: list[tuple[int, float]] = field(default_factory=list)
    rewards: dict[str, list[tuple[int, float]]] = field(default_factory=dict)  # "rewards/chosen" -> (step, value); "eval_rewards/..." too
    resumed_at: list[int] = field(default_factory=list)
    status: str = ""  # finished, stopped by SIGINT; empty while the run goes on (or was killed)
    last_time: float | None = None  # when the last record was written

    @property
    def last_step(self) -> int:
        return max(self.steps[-1:] + self.eval_steps[-1:] + self.resumed_at[-1:] + [0])


def read_curves(records: list[dict]) -> Curves:
    curves = Curves()
    for record in records:
        event = record.get("event")
        curves.last_time = record.get("time", curves.last_time)
        if event is None and "loss" in record:
            curves.steps.append(int(record["step"]))
            for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
                getattr(curves, key).append(float(record.get(key, math.nan)))
            add_rewards(curves, record, "")
        elif event == "eval" and "eval_loss" in record:
            curves.eval_steps.append(int(record["step"]))
            curves.eval_loss.append(float(record["eval_loss"]))
            if "exact_match" in record:
                curves.exact_match.append((int(record["step"]), float(record["exact_match"])))
            add_rewards(curves, record, "eval_")
        elif event == "resume":
            curves.resumed_at.append(int(record["step"]))
            curves.status = ""
        elif event == "stopped":
            curves.status = f"stopped by {record.get('signal', 'a signal')}"
        elif event == "summary":
            curves.status = "finished"
    return curves


def add_rewards(curves: Curves, record: dict, prefix: str) -> None:
    """A preference run's rewards/* of one train line (prefix "") or eval line ("eval_")."""
    for name in REWARD_SERIES:
        if prefix + name in record:
            curves.rewards.setdefault(prefix + name, []).append((int(record["step"]), float(record[prefix + name])))


REWARD_SERIES = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")


def choose_smoothing(points: int) -> float:
    """The EMA weight for a curve of this many logged points (see SMOOTHING_POINTS)."""
    return round(min(MAX_SMOOTHING, max(0.0, 1 - SMOOTHING_POINTS / max(points, 1))), 2)


def smooth(values: list[float], weight: float) -> list[float]:
    """Debiased exponential moving average: m_t = w m_(t-1) + (1 - w) x_t, divided by 1 - w^t."""
    out, average = [], 0.0
    for t, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**t))
    return out


def smooth_loss(values: list[float], weight: float) -> list[float]:
    """smooth() of log(loss), exponentiated back (the loss as plain values if any is not positive)."""
    if not all(v > 0 for v in values):
        return smooth(values, weight)
    return [math.exp(v) for v in smooth([math.log(v) for v in values], weight)]


def plot_run(run_dir: str | Path, missing_ok: bool = True) -> Path | None:
    """Draw RUN_DIR/curves.png from RUN_DIR/metrics.jsonl and return its path.

    Without matplotlib: with missing_ok (the end of a run) print a one-line note and return None,
    else raise PlotError. A folder without metrics.jsonl raises PlotError.
    """
    run = Path(run_dir)
    if not run.is_dir():
        what = "is a file, not a folder" if run.exists() else "does not exist"
        raise PlotError(f"{run} {what}; pass a run's output folder (the recipe's output_dir), e.g. runs/tiny-demo")
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise PlotError(f"{run} has no metrics.jsonl; pass a run's output folder (the recipe's output_dir), e.g. runs/tiny-demo")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        if not missing_ok:
            raise PlotError(MISSING_MATPLOTLIB) from None
        print(f"note: no {PLOT_NAME}: {MISSING_MATPLOTLIB}, then `qlora-lite plot {run}`")
        return None
    settings = read_run_settings(run)
    curves = read_curves(read_records(metrics))
    figure = build_figure(curves, settings)
    path = run / PLOT_NAME
    tmp = run / f".{PLOT_NAME}.tmp"  # renamed when complete: a viewer never sees half a picture
    figure.savefig(tmp, format="png", dpi=100)
    tmp.replace(path)
    return path


def read_run_settings(run: Path) -> dict:
    """The few settings the picture names (from config.yaml, when the run has written it)."""
    train = {}
    try:
        train = (yaml.safe_load((run / "config.yaml").read_text()) or {}).get("train", {}) or {}
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return {
        "run_name": train.get("run_name") or run.resolve().name,
        "max_steps": train.get("max_steps"),
        "max_grad_norm": train.get("max_grad_norm"),
        "log_every": train.get("log_every"),
    }


def build_figure(curves: Curves, settings: dict):
    """The matplotlib Figure of curves.png: 2 x 2 panels (loss, learning rate, grad norm, tokens/s)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    rows = 3 if curves.rewards else 2
    figure = Figure(figsize=(10, 3.2 * rows), layout="constrained")
    figure.suptitle(describe_run(curves, settings), fontsize=11)
    loss_ax, lr_ax, grad_ax, speed_ax, *reward_axes = figure.subplots(rows, 2, sharex=True).flat
    every = f"every {settings['log_every']} steps" if settings.get("log_every") else "as logged"

    # --- loss: what the run learns
    loss_ax.set_title("loss (mean per target token)" if not curves.rewards else "loss (the objective's, mean per pair or example)")
    weight = choose_smoothing(len(curves.loss))
    if curves.steps and weight > 0:
        loss_ax.plot(curves.steps, curves.loss, color="C0", alpha=0.35, linewidth=1, label=f"train ({every})")
        loss_ax.plot(curves.steps, smooth_loss(curves.loss, weight), color="C0", linewidth=2, label=f"train, smoothed (EMA {weight:g} of log loss)")
    elif curves.steps:  # too few points to smooth: the raw curve is the clearest
        loss_ax.plot(curves.steps, curves.loss, color="C0", linewidth=1.5, label=f"train ({every})")
    if curves.eval_steps:
        # Dots, no line: two evaluations are two measurements, not the straight path between them.
        loss_ax.plot(curves.eval_steps, curves.eval_loss, color="C1", linestyle="none", marker="o", markersize=6, zorder=3, label="eval (held-out data)")
    if not curves.steps and not curves.eval_steps:
        loss_ax.text(0.5, 0.5, "no step logged yet", transform=loss_ax.transAxes, ha="center", va="center", color="0.4")
    set_scale(loss_ax, curves.loss + curves.eval_loss)

    # --- learning rate: the schedule as it ran, at the logged steps only (a warm-up shows from
    # step 1 when it is logged); the first logged point is a dot, so where the log starts is plain
    lr_ax.set_title("learning rate")
    if curves.steps:
        lr_ax.plot(curves.steps, curves.lr, color="C2", linewidth=1.5, marker="o", markersize=4, markevery=[0])
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))

    # --- grad norm: before clipping, so spikes show
    grad_ax.set_title("gradient norm (before clipping)")
    if curves.steps:
        grad_ax.plot(curves.steps, curves.grad_norm, color="C3", linewidth=1.2, label="grad norm")
        clip = settings.get("max_grad_norm")
        if clip:
            grad_ax.axhline(clip, color="0.3", linestyle="--", linewidth=1, label=f"clipped to {clip:g} (train.max_grad_norm)")
    set_scale(grad_ax, curves.grad_norm)

    # --- throughput: non-pad tokens per second over each logging window
    speed_ax.set_title("throughput (tokens/s)")
    if curves.steps:
        speed_ax.plot(curves.steps, curves.tokens_per_s, color="C4", linewidth=1.5)
        speed_ax.set_ylim(bottom=0)
    speed_ax.yaxis.set_major_formatter(EngFormatter(sep=""))

    if reward_axes:
        draw_rewards(curves, *reward_axes)
    for ax in (loss_ax, lr_ax, grad_ax, speed_ax, *reward_axes):
        for step in curves.resumed_at:
            ax.axvline(step, color="0.5", linestyle=":", linewidth=1, label="resumed here" if ax is loss_ax else None)
        ax.grid(True, alpha=0.3)
        if settings.get("max_steps"):
            length = max(settings["max_steps"], curves.last_step)
            ax.set_xlim(-X_MARGIN * length, (1 + X_MARGIN) * length)
    for ax in (reward_axes or [grad_ax, speed_ax]):
        ax.set_xlabel("optimizer step")
    for ax in (loss_ax, grad_ax, *reward_axes):
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
    return figure


def draw_rewards(curves: Curves, rewards_ax, accuracy_ax) -> None:
    """The preference panels: beta x log-ratio of the chosen and rejected answers and their margin; the share of pairs ranked right (train lines, eval dots)."""
    rewards_ax.set_title("rewards (beta x log-ratio to the reference)")
    accuracy_ax.set_title("reward accuracy (chosen above rejected)")
    for name, color in (("rewards/chosen", "C2"), ("rewards/rejected", "C3"), ("rewards/margins", "C0"), ("rewards/accuracies", "C4")):
        ax = accuracy_ax if name == "rewards/accuracies" else rewards_ax
        label = name.split("/")[1]
        if curves.rewards.get(name):
            steps, values = zip(*curves.rewards[name])
            ax.plot(steps, values, color=color, linewidth=1.5, label=f"train {label}")
        if curves.rewards.get("eval_" + name):
            steps, values = zip(*curves.rewards["eval_" + name])
            ax.plot(steps, values, color=color, linestyle="none", marker="o", markersize=6, label=f"eval {label}")
    accuracy_ax.set_ylim(-0.02, 1.02)


def set_scale(ax, values: list[float]) -> None:
    """Log scale when the positive values span more than LOG_SCALE_RATIO (a loss falling from 5 to 0.01)."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    if len(positive) == len([v for v in values if math.isfinite(v)]) and positive and max(positive) / min(positive) > LOG_SCALE_RATIO:
        ax.set_yscale("log")
        ax.set_title(ax.get_title() + ", log scale")


def describe_run(curves: Curves, settings: dict, now: float | None = None) -> str:
    """Title: the run, how far it got, and the eval figures from first to last.

    One format per kind of number: steps with thousands separators (1,200), losses with 4
    significant digits, never in e-notation (4.000, 0.01470), exact match in whole percent, ages
    in whole units (3 h 12 min).
    """
    of = f" of {settings['max_steps']:,}" if settings.get("max_steps") else ""
    status = curves.status
    if not status:  # running, or killed: how long ago it last wrote tells which
        status = "not finished"
        if curves.last_time is not None:
            status += f", last record {format_age((now or time.time()) - curves.last_time)} ago"
    lines = [f"{settings['run_name']}: step {curves.last_step:,}{of}, {status}"]
    figures = []
    if curves.eval_loss:
        first, last = format_loss(curves.eval_loss[0]), format_loss(curves.eval_loss[-1])
        figures.append(f"eval loss {first} -> {last}" if len(curves.eval_loss) > 1 else f"eval loss {first}")
    if curves.exact_match:
        first, last = curves.exact_match[0][1], curves.exact_match[-1][1]
        figures.append(f"exact match {first:.0%} -> {last:.0%}" if len(curves.exact_match) > 1 else f"exact match {first:.0%}")
    accuracy = curves.rewards.get("eval_rewards/accuracies")
    if accuracy:
        figures.append(f"reward accuracy {accuracy[0][1]:.0%} -> {accuracy[-1][1]:.0%}" if len(accuracy) > 1 else f"reward accuracy {accuracy[0][1]:.0%}")
    if figures:
        lines.append(", ".join(figures))
    return "\n".join(lines)


def format_loss(value: float) -> str:
    """4 significant digits, trailing zeros kept, in plain notation: 4.000, 0.01470, 0.00004321, 1234."""
    text = f"{value:#.4g}"  # '#' keeps the trailing zeros
    if "e" in text:  # .4g's e-notation, below 1e-4 or from 1e4: the same digits written out
        exponent = int(text.split("e")[1])
        return f"{value:.{3 - exponent}f}" if exponent < 0 else f"{value:,.0f}"
    return text.rstrip(".")


def format_age(seconds: float) -> str:
    """Whole units: 12 s, 5 min, 3 h 12 min, 2 days 4 h."""
    seconds = max(seconds, 0.0)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        minutes = round(seconds / 60)
        return f"{minutes // 60} h {minutes % 60} min"
    hours = round(seconds / 3600)
    return f"{hours // 24} days {hours % 24} h"
