"""PNG plots of a run: accuracy vs attempts (before vs after), pass@k, training curves.

Figures are drawn on matplotlib's Agg canvas through `matplotlib.figure.Figure`, never
pyplot, so importing this module changes no global backend (safe in notebooks and on
headless hosts). Inputs are the rows of `eval.jsonl` and `metrics.jsonl`.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from absl import logging
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator, ScalarFormatter

from mar.evaluation import report
from mar.metrics import METRICS_FILE, read_jsonl

PLOTS_DIR = "plots"
_BEFORE_STYLE = dict(color="0.45", linestyle="--", marker="o", linewidth=1.5)
_AFTER_STYLE = dict(color="C3", linestyle="-", marker="o", linewidth=2.5)


def plots_dir(workdir: str | os.PathLike) -> str:
    """`<workdir>/plots`, created."""
    path = os.path.join(os.fspath(workdir), PLOTS_DIR)
    os.makedirs(path, exist_ok=True)
    return path


def _grid(n_panels: int, ncols: int = 3, size: tuple[float, float] = (4.2, 3.3)):
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(nrows, ncols, i + 1) for i in range(n_panels)]
    return fig, axes


def _save(fig: Figure, out_path: str | os.PathLike) -> str:
    out_path = os.fspath(out_path)
    os.makedirs(os.path.dirname(out_path) or ".", exist_ok=True)
    fig.savefig(out_path, format="png", dpi=110)
    logging.info("Wrote %s", out_path)
    return out_path


def _step_style(step: int, steps: list[int]) -> dict[str, Any]:
    """First step grey dashed ('before'), last step bold ('after'), others thin in between."""
    if len(steps) > 1 and step == steps[0]:
        return dict(_BEFORE_STYLE, label=f"before (step {step})")
    if step == steps[-1]:
        label = f"after (step {step})" if len(steps) > 1 else f"step {step}"
        return dict(_AFTER_STYLE, label=label)
    frac = steps.index(step) / (len(steps) - 1)
    return dict(color=(0.3 + 0.5 * frac, 0.55, 0.85 - 0.5 * frac), linewidth=1.0, alpha=0.6,
                marker=".", label=f"step {step}")


def _curves(
    rows: Sequence[dict], kind: str, x_key: str, y_key: str
) -> dict[str, dict[int, dict[int, float]]]:
    """{panel: {step: {x: y}}} for rows of one kind, with an 'average' panel over benchmarks."""
    out: dict[str, dict[int, dict[int, float]]] = {}
    for row in rows:
        if report.row_kind(row) != kind:
            continue
        out.setdefault(row["benchmark"], {}).setdefault(row["step"], {})[row[x_key]] = row[y_key]
    benchmarks = list(out)
    if len(benchmarks) > 1:
        avg: dict[int, dict[int, float]] = {}
        for step in sorted({s for b in benchmarks for s in out[b]}):
            xs = set.intersection(*[set(out[b].get(step, {})) for b in benchmarks])
            if xs:
                avg[step] = {x: sum(out[b][step][x] for b in benchmarks) / len(benchmarks) for x in xs}
        if avg:
            out[report.AVERAGE] = avg
    return out


def _plot_curves(
    curves: dict[str, dict[int, dict[int, float]]], out_path: str | os.PathLike,
    xlabel: str, ylabel: str, title: str, log2_x: bool = False,
) -> str:
    fig, axes = _grid(len(curves))
    for ax, (panel, by_step) in zip(axes, curves.items()):
        steps = sorted(by_step)
        for step in steps:  # first and last are drawn on top of the others
            pts = sorted(by_step[step].items())
            style = _step_style(step, steps)
            zorder = 3 if step in (steps[0], steps[-1]) else 2
            ax.plot([p[0] for p in pts], [100.0 * p[1] for p in pts], zorder=zorder, **style)
        ax.set_title(panel, fontweight="bold" if panel == report.AVERAGE else None)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if log2_x:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted({x for pts in by_step.values() for x in pts}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_locator(NullLocator())
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, out_path)


def plot_attempt_curves(eval_rows: Sequence[dict], out_path: str | os.PathLike) -> str | None:
    """Accuracy (%) vs attempts allowed, a panel per benchmark (+ average), a line per step.

    The first evaluated step is drawn grey dashed ("before"), the last bold ("after").
    Returns the PNG path, or None when there are no attempt rows.
    """
    curves = _curves(eval_rows, "attempts", "attempts", "accuracy")
    if not curves:
        logging.info("No attempt-curve rows; skipping %s", out_path)
        return None
    return _plot_curves(curves, out_path, "attempts allowed", "accuracy (%)",
                        "Accuracy with k attempts: before vs after training")


def plot_passk(eval_rows: Sequence[dict], out_path: str | os.PathLike) -> str | None:
    """pass@k (%) vs k (log2 axis), a panel per benchmark (+ average), first vs last step."""
    curves = _curves(eval_rows, report.PASSK_METRIC, "k", "value")
    if not curves:
        logging.info("No pass@k rows; skipping %s", out_path)
        return None
    return _plot_curves(curves, out_path, "k (samples)", "pass@k (%)", "pass@k: before vs after training",
                        log2_x=True)


def _numeric_series(rows: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and "step" in row:
            xs.append(int(row["step"]))
            ys.append(float(v))
    return xs, ys


# TensorBoard's default smoothing weight: the training plots' trend line.
TRAINING_SMOOTHING = 0.6


def _ema(ys: list[float], smoothing: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average divided by its weights' sum
    (1 - smoothing**n), so the first points are not pulled toward 0 or the first value.
    Non-finite points are drawn as they are and left out of the average."""
    out, acc, n = [], 0.0, 0
    for y in ys:
        if not math.isfinite(y):
            out.append(y)
            continue
        acc, n = smoothing * acc + (1.0 - smoothing) * y, n + 1
        out.append(acc / (1.0 - smoothing**n))
    return out


def plot_training_curves(
    metrics_rows: Sequence[dict], keys: Sequence[str], out_path: str | os.PathLike,
    smoothing: float = 0.0,
) -> str | None:
    """One panel per metric key vs step; with `smoothing` in (0, 1) the raw points are faint
    and TensorBoard's smoothed line (`_ema`) is drawn over them, so the trend shows through
    the step-to-step noise. Keys with no numbers are skipped."""
    series = {k: _numeric_series(metrics_rows, k) for k in keys}
    series = {k: v for k, v in series.items() if v[0]}
    missing = [k for k in keys if k not in series]
    if missing:
        logging.info("No numeric values for %s; not plotted.", missing)
    if not series:
        return None
    fig, axes = _grid(len(series), ncols=3, size=(4.2, 2.9))
    for ax, (key, (xs, ys)) in zip(axes, series.items()):
        if 0.0 < smoothing < 1.0:
            ax.plot(xs, ys, color="C0", alpha=0.3, linewidth=1.0,
                    marker="." if len(xs) < 50 else None, label="raw")
            ax.plot(xs, _ema(ys, smoothing), color="C0", linewidth=1.8,
                    label=f"smoothed ({smoothing:g})")
            ax.legend(fontsize="x-small")
        else:
            ax.plot(xs, ys, color="C0", linewidth=1.5, marker="." if len(xs) < 50 else None)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves")
    return _save(fig, out_path)


def default_training_keys(metrics_rows: Sequence[dict], limit: int = 12) -> list[str]:
    """Numeric metric keys in first-seen order, wall-clock splits last, at most `limit`."""
    keys: list[str] = []
    for row in metrics_rows:
        for k, v in row.items():
            if k != "step" and k not in keys and isinstance(v, (int, float)) and not isinstance(v, bool):
                keys.append(k)
    keys.sort(key=lambda k: k.startswith("time/"))
    return keys[:limit]


def plot_all(workdir: str | os.PathLike, training_keys: Sequence[str] | None = None) -> list[str]:
    """Writes training.png (raw points and a smoothed line), attempts.png and passk.png under
    `<workdir>/plots` from the run's metrics.jsonl and eval.jsonl (whichever exist); returns
    the paths written."""
    workdir = os.fspath(workdir)
    out = plots_dir(workdir)
    written = []
    metrics_rows = read_jsonl(os.path.join(workdir, METRICS_FILE))
    if metrics_rows:
        keys = list(training_keys) if training_keys else default_training_keys(metrics_rows)
        written.append(plot_training_curves(metrics_rows, keys, os.path.join(out, "training.png"),
                                            smoothing=TRAINING_SMOOTHING))
    eval_file = report.eval_path(workdir)
    if os.path.exists(eval_file):
        rows = report.read_eval_rows(eval_file)
        written.append(plot_attempt_curves(rows, os.path.join(out, "attempts.png")))
        written.append(plot_passk(rows, os.path.join(out, "passk.png")))
    return [p for p in written if p]
