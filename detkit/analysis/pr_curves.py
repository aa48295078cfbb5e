"""Precision-recall curves per class, read from pycocotools' accumulated ``eval['precision']``."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from detkit.analysis.plotting import COLOURS, new_figure, save_figure

#: Above this many classes the per-class curves are drawn thin and grey, without a legend entry each.
MAX_LEGEND = 16


def pr_curve_data(coco_eval: Any) -> dict[str, np.ndarray]:
    """The curves COCO's AP integrates, for area ``all`` and 100 detections per image.

    Returns ``recall (R,)`` (pycocotools' 101 recall points), ``iou50 (K, R)`` = ``precision[t=0.5, :, k]``,
    ``iou50_95 (K, R)`` = the mean of ``precision[t, :, k]`` over the 10 IoU thresholds, and ``ap50 (K,)``,
    ``ap (K,)`` their means over R, which are COCO's per-class AP50 and AP. Classes without ground
    truth (pycocotools' -1) are NaN.
    """
    precision = np.asarray(coco_eval.eval["precision"], dtype=np.float64)[:, :, :, 0, -1]  # (T, R, K)
    precision = np.where(precision > -1, precision, np.nan).transpose(2, 0, 1)  # (K, T, R)
    t50 = int(np.argmin(np.abs(np.asarray(coco_eval.params.iouThrs) - 0.5)))
    iou50_95 = nanmean(precision, axis=1)
    return {"recall": np.asarray(coco_eval.params.recThrs, dtype=np.float64), "iou50": precision[:, t50],
            "iou50_95": iou50_95, "ap50": nanmean(precision[:, t50], axis=1), "ap": nanmean(iou50_95, axis=1)}


def nanmean(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    """``np.nanmean`` that gives NaN for an all-NaN slice without a RuntimeWarning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(values, axis=axis)


def plot_pr_curves(data: dict[str, np.ndarray] | None, classes: Sequence[str], path: str | Path,
                   title: str = "") -> Path:
    """Two panels, IoU 0.5 and IoU 0.5:0.95 (mean precision over the 10 thresholds), one line per
    class (AP in the legend) and a thick black mean over the classes. ``data`` None: no detections."""
    fig = new_figure(11, 4.8)
    axes = fig.subplots(1, 2)
    fig.suptitle(f"precision-recall per class{f' - {title}' if title else ''} (area all, 100 detections/image)")
    panels = (("iou50", "ap50", "IoU 0.5", "AP50"), ("iou50_95", "ap", "IoU 0.5:0.95", "AP"))
    for ax, (curve_key, ap_key, name, metric) in zip(axes, panels):
        ax.set(xlim=(0, 1), ylim=(0, 1.02), xlabel="recall", ylabel="precision", title=name)
        ax.grid(alpha=0.3)
        if data is None:
            ax.text(0.5, 0.5, "no detections", ha="center", va="center", transform=ax.transAxes)
            continue
        many = len(classes) > MAX_LEGEND
        for k, curve in enumerate(data[curve_key]):
            if np.isnan(curve).all():
                continue
            label = None if many else f"{classes[k]} {metric} {data[ap_key][k]:.3f}"
            ax.plot(data["recall"], curve, lw=0.8 if many else 1.6, label=label,
                    color="#b0b0b0" if many else COLOURS[k % len(COLOURS)])
        valid = ~np.isnan(data[curve_key]).all(axis=1)
        if valid.any():
            ax.plot(data["recall"], data[curve_key][valid].mean(axis=0), lw=3, color="black",
                    label=f"all {int(valid.sum())} classes {metric} {data[ap_key][valid].mean():.3f}")
        ax.legend(loc="lower left", fontsize=8)
    return save_figure(fig, path)
