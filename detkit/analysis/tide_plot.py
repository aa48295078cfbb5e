"""A :class:`~detkit.analysis.tide.TideReport` for people: ``tide.md`` (tables), ``tide.json`` (every number)
and ``tide.png`` (bar chart by size, heat map by class)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from detkit.analysis.plotting import COLOURS, margins, new_figure, save_figure
from detkit.analysis.tide import AREAS, ERRORS, TideReport

#: One line per error type: what it is and what its oracle does (tide.md and tide.json).
MEANINGS = {
    "Cls": "IoU >= t_f with an object of another class; fix: make it that class",
    "Loc": "right class, IoU in [t_b, t_f] with an object; fix: make it a match of that object",
    "Both": "wrong class and IoU in [t_b, t_f) (every other false positive); fix: remove it",
    "Dupl": "IoU >= t_f with an object its class already matched; fix: remove it",
    "Bkg": "IoU <= t_b with every object; fix: remove it",
    "Miss": "an object no detection matched and no Cls/Loc error points at; fix: remove it from the GT",
}


def _value(x: float) -> float | None:
    """JSON-safe fraction: NaN -> None, else rounded to 4 digits."""
    return None if np.isnan(x) else round(float(x), 4)


def tide_dict(report: TideReport) -> dict[str, Any]:
    """Everything in ``report`` as JSON-ready nesting: per size, ``AP50``, ``gt``, ``dAP`` and ``count`` per
    error type, each with the class ``mean`` (``total`` for counts) and ``per_class`` values (fractions)."""
    areas = {}
    for a, area in enumerate(AREAS):
        areas[area] = {
            "AP50": {"mean": _value(report.ap_mean[a]),
                     "per_class": {c: _value(v) for c, v in zip(report.classes, report.ap[a])}},
            "gt": {"total": int(report.num_gt[a].sum()),
                   "per_class": {c: int(n) for c, n in zip(report.classes, report.num_gt[a])}},
            "dAP": {e: {"mean": _value(report.dap_mean[a, j]),
                        "per_class": {c: _value(v) for c, v in zip(report.classes, report.dap[a, j])}}
                    for j, e in enumerate(ERRORS)},
            "count": {e: {"total": int(report.counts[a, j].sum()),
                          "per_class": {c: int(n) for c, n in zip(report.classes, report.counts[a, j])}}
                      for j, e in enumerate(ERRORS)},
        }
    return {"method": "TIDE (Bolya et al., ECCV 2020): dAP = AP50 after fixing one error type alone - AP50",
            "ap": f"pycocotools' AP50: matching at IoU {report.fg_iou:g}, {report.max_dets} detections per image "
                  "per class, 101 recall points, mean over the classes with ground truth",
            "fg_iou": report.fg_iou, "bg_iou": report.bg_iou, "num_images": report.num_images,
            "errors": MEANINGS, "classes": report.classes, "areas": areas}


def _points(x: float) -> str:
    return "-" if np.isnan(x) else f"{100 * x:.1f}"


def tide_markdown(report: TideReport) -> str:
    """Tables in AP points: by size (class mean), then per class for each size; each error's count in brackets."""
    head = "| {} | GT | AP50 | " + " | ".join(ERRORS) + " |"
    rule = "|---|---|---|" + "---|" * len(ERRORS)
    lines = ["# Where the AP goes: TIDE error types", "",
             f"dAP: AP50 points gained by fixing one error type alone (Bolya et al., ECCV 2020; t_f = "
             f"{report.fg_iou:g}, t_b = {report.bg_iou:g}); in brackets how many errors of that type (detections "
             f"by predicted class, Miss by the object's class). AP50 is pycocotools' (IoU {report.fg_iou:g}, "
             f"{report.max_dets} detections per image), on {report.num_images} images; sizes are COCO's area ranges. "
             "'-': no ground truth there.", ""]
    lines += [f"- **{e}**: {m}" for e, m in MEANINGS.items()]
    lines += ["", "## By size (mean over classes)", "", head.format("size"), rule]
    for a, area in enumerate(AREAS):
        cells = [f"{_points(report.dap_mean[a, j])} ({report.counts[a, j].sum()})" for j in range(len(ERRORS))]
        lines.append(f"| {area} | {report.num_gt[a].sum()} | {_points(report.ap_mean[a])} | {' | '.join(cells)} |")
    for a, area in enumerate(AREAS):
        lines += ["", f"## Per class, size {area}", "", head.format("class"), rule]
        for k, name in enumerate(report.classes):
            cells = [f"{_points(report.dap[a, j, k])} ({report.counts[a, j, k]})" for j in range(len(ERRORS))]
            lines.append(f"| {name} | {report.num_gt[a, k]} | {_points(report.ap[a, k])} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def plot_tide(report: TideReport, path: str | Path) -> Path:
    """Left: dAP of each error type, one bar per size (class mean); right: dAP per class and error type
    (size all) as a heat map, in AP points."""
    num_cls = len(report.classes)
    height = min(max(4.0, 0.3 * num_cls + 1.6), 24)
    fig = new_figure(13, height, layout=None)
    gap = 0.6 + 0.075 * max((len(c) for c in report.classes), default=4)  # inches for the heat map's labels
    margins(fig, left=0.7, right=0.9, top=0.8, bottom=0.6, hspace=0.3, wspace=gap / ((13 - 1.6 - gap) / 2))
    bars, heat = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.3, 1]})
    aps = ", ".join(f"{area} {_points(report.ap_mean[a])}" for a, area in enumerate(AREAS))
    fig.suptitle(f"where the AP goes (TIDE dAP, AP50 points; t_f {report.fg_iou:g}, t_b {report.bg_iou:g}) - "
                 f"AP50 {aps}")
    x, width = np.arange(len(ERRORS)), 0.8 / len(AREAS)
    for a, area in enumerate(AREAS):
        values = np.nan_to_num(100 * report.dap_mean[a])
        drawn = bars.bar(x + (a - (len(AREAS) - 1) / 2) * width, values, width, color=COLOURS[a], label=area)
        bars.bar_label(drawn, [f"{v:.1f}" if v >= 0.05 else "" for v in values], fontsize=7, rotation=90, padding=2)
    bars.set_xticks(x, ERRORS)
    bars.set(ylabel="dAP (AP50 points)", title="by size, mean over classes")
    bars.margins(y=0.15)  # room for the value labels
    bars.legend(title="size", fontsize=8)
    bars.grid(axis="y", alpha=0.3)
    values = 100 * report.dap[0].T  # (K, E)
    shown = np.nan_to_num(values)
    image = heat.imshow(shown, cmap="Reds", vmin=0, vmax=max(float(shown.max()), 1e-9), aspect="auto")
    heat.set_xticks(x, ERRORS)
    heat.set_yticks(range(num_cls), report.classes, fontsize=9 if num_cls <= 30 else 6)
    heat.set_title("per class, size all")
    fig.colorbar(image, ax=heat, label="dAP (AP50 points)")
    if num_cls <= 30:
        for (k, j), v in np.ndenumerate(values):
            heat.text(j, k, "-" if np.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                      color="white" if shown[k, j] > 0.6 * shown.max() else "black")
    return save_figure(fig, path)


def write_tide(report: TideReport, out_dir: str | Path) -> list[Path]:
    """Write ``tide.json``, ``tide.md`` and ``tide.png`` into ``out_dir`` (created; those three replaced)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tide.json").write_text(json.dumps(tide_dict(report), indent=1) + "\n")
    (out / "tide.md").write_text(tide_markdown(report))
    return [out / "tide.json", out / "tide.md", plot_tide(report, out / "tide.png")]
