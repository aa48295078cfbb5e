"""Training curves from a run's ``metrics.jsonl`` (written by :class:`~detkit.engine.writers.JsonlWriter`:
one ``{"type": "train" | "eval" | ..., "iter": ..., ...}`` object per line): ``results.png`` of one run,
or several runs overlaid key by key."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from detkit.analysis import AnalysisError
from detkit.analysis.plotting import COLOURS, margins, new_figure, save_figure
from detkit.engine.writers import TRAIN_META, read_jsonl, scalars
from detkit.registry import suggestion

#: Eval metrics drawn by default after the loss terms, total and lr.
DEFAULT_EVAL_KEYS = ("AP", "AP50")
#: Counters of the records, not curves.
COUNTERS = ("epoch", "iter", "step", "steps", "num_images")


@dataclass
class RunMetrics:
    """One run's records: ``train`` and ``eval`` as ``{key: [(iter, value), ...]}`` (nested keys
    flattened as ``per_class/circle``), plus the loss-term names in the order the run logged them."""

    name: str
    train: dict[str, list[tuple[int, float]]]
    eval: dict[str, list[tuple[int, float]]]
    terms: list[str]


def read_metrics(run_dir: str | Path) -> RunMetrics:
    """Parse ``run_dir/metrics.jsonl``; :class:`AnalysisError` when the folder or file is missing or unreadable."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise AnalysisError(f"run folder not found: {run_dir}")
    if not path.is_file():
        raise AnalysisError(f"{run_dir} has no metrics.jsonl (is it a training work dir with JsonlWriter in "
                            f"train.writers?)")
    series: dict[str, dict[str, list[tuple[int, float]]]] = {"train": {}, "eval": {}}
    terms: list[str] = []
    try:
        records = read_jsonl(path)
    except ValueError as err:
        raise AnalysisError(str(err)) from None
    for record in records:
        kind = record.pop("type", None)
        if kind not in series or not isinstance(record.get("iter"), int):
            continue
        if kind == "train":
            terms += [k for k, v in record.items() if k not in TRAIN_META and isinstance(v, float) and k not in terms]
        for key, value in scalars({k: (math.nan if v is None else v) for k, v in record.items() if k not in COUNTERS}):
            series[kind].setdefault(key, []).append((record["iter"], value))
    return RunMetrics(run_dir.name, series["train"], series["eval"], terms)


def default_keys(run: RunMetrics) -> list[str]:
    """Each loss term, ``total``, ``lr``, then AP and AP50 where the run has evaluations."""
    keys = [*run.terms, "total", "lr", *(k for k in DEFAULT_EVAL_KEYS if k in run.eval)]
    return [k for k in keys if k in run.train or k in run.eval]


def check_keys_known(runs: Sequence[RunMetrics], keys: Sequence[str]) -> None:
    """Every key is logged by at least one run, else :class:`AnalysisError` with the known keys."""
    known = sorted({k for r in runs for k in (*r.train, *r.eval)})
    for key in keys:
        if key not in known:
            raise AnalysisError(f"unknown key '{key}'.{suggestion(key, known)} The runs logged: {', '.join(known)}")


def plot_curves(runs: Sequence[RunMetrics], path: str | Path, keys: Sequence[str] | None = None,
                title: str = "") -> Path:
    """One panel per key (default: :func:`default_keys` of all runs), x = optimizer iteration, one
    colour per run; evaluation values are drawn with markers at the iteration they were taken."""
    keys = list(keys) if keys else list(dict.fromkeys(k for r in runs for k in default_keys(r)))
    if not keys:
        raise AnalysisError(f"{', '.join(r.name for r in runs)}: metrics.jsonl holds no train or eval records yet")
    check_keys_known(runs, keys)
    cols = min(len(keys), 4)
    rows = math.ceil(len(keys) / cols)
    legend = 0.45 * math.ceil(len(runs) / 4) if len(runs) > 1 else 0.0
    fig = new_figure(4 * cols, 3 * rows + legend + 0.3, layout=None)  # drawn every evaluation: fixed margins
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    margins(fig, left=0.75, right=0.2, top=0.75 if title else 0.4, bottom=0.55 + legend, hspace=0.55, wspace=0.35)
    if title:
        fig.suptitle(title)
    for ax, key in zip(axes, keys):
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        for i, run in enumerate(runs):
            points = run.train.get(key) or run.eval.get(key) or []
            if not points:
                continue
            xs, ys = zip(*points)
            marker = "o" if key not in run.train or len(points) < 3 else None
            ax.plot(xs, ys, color=COLOURS[i % len(COLOURS)], marker=marker, ms=4, lw=1.4, label=run.name)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    if len(runs) > 1:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncols=min(len(runs), 4), frameon=False)
    return save_figure(fig, path)


def write_results_png(run_dir: str | Path) -> Path:
    """``run_dir/results.png`` from the run's own ``metrics.jsonl``."""
    run = read_metrics(run_dir)
    return plot_curves([run], Path(run_dir) / "results.png", title=f"{run.name}: training curves")
