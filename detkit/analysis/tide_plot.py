"""A :class:`~detkit.analysis.tide.TideReport` for people: ``tide.md`` (tables), ``tide.json`` (every number)
and ``tide.png`` (bar chart by size, heat map by class); several reports of the same ground truth side by side
(``tide_compare.md/json/png``, ``detkit analyze tide``). Files are replaced only once complete."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from detkit.analysis.plotting import COLOURS, margins, new_figure
from detkit.analysis.tide import AREAS, ERRORS, TideReport
from detkit.files import replaced_on_success

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


#: What each report is written as, in this order (:func:`tide_paths`).
SUFFIXES = (".json", ".md", ".png")
HEAD = "| {} | GT | AP50 | " + " | ".join(ERRORS) + " |"
RULE = "|---|---|---|" + "---|" * len(ERRORS)


def _row(name: str, gt: int, ap: float, dap: np.ndarray, count: np.ndarray) -> str:
    """One table row in AP points: ``dap (E,)`` each followed by ``count (E,)`` in brackets."""
    cells = [f"{_points(d)} ({n})" for d, n in zip(dap, count)]
    return f"| {name} | {gt} | {_points(ap)} | {' | '.join(cells)} |"


def _size_row(name: str, report: TideReport, a: int) -> str:
    return _row(name, report.num_gt[a].sum(), report.ap_mean[a], report.dap_mean[a], report.counts[a].sum(axis=1))


def tide_size_table(report: TideReport) -> list[str]:
    """The markdown lines of the by-size table (class means), the one ``detkit analyze tide`` prints."""
    return [HEAD.format("size"), RULE] + [_size_row(area, report, a) for a, area in enumerate(AREAS)]


def _intro(report: TideReport) -> list[str]:
    lines = [f"dAP: AP50 points gained by fixing one error type alone (Bolya et al., ECCV 2020; t_f = "
             f"{report.fg_iou:g}, t_b = {report.bg_iou:g}); in brackets how many errors of that type (detections "
             f"by predicted class, Miss by the object's class). AP50 is pycocotools' (IoU {report.fg_iou:g}, "
             f"{report.max_dets} detections per image), on {report.num_images} images; sizes are COCO's area ranges. "
             "'-': no ground truth there.", ""]
    return lines + [f"- **{e}**: {m}" for e, m in MEANINGS.items()]


def tide_markdown(report: TideReport) -> str:
    """Tables in AP points: by size (class mean), then per class for each size; each error's count in brackets."""
    lines = ["# Where the AP goes: TIDE error types", "", *_intro(report)]
    lines += ["", "## By size (mean over classes)", "", *tide_size_table(report)]
    for a, area in enumerate(AREAS):
        lines += ["", f"## Per class, size {area}", "", HEAD.format("class"), RULE]
        lines += [_row(name, report.num_gt[a, k], report.ap[a, k], report.dap[a, :, k], report.counts[a, :, k])
                  for k, name in enumerate(report.classes)]
    return "\n".join(lines) + "\n"


def tide_compare_tables(reports: Mapping[str, TideReport]) -> list[str]:
    """The markdown lines of one table per size, a row (class means) per named report."""
    lines: list[str] = []
    for a, area in enumerate(AREAS):
        lines += [f"## Size {area} (mean over classes)", "", HEAD.format("results"), RULE]
        lines += [_size_row(name, report, a) for name, report in reports.items()] + [""]
    return lines[:-1]


def tide_compare_markdown(reports: Mapping[str, TideReport], sources: Mapping[str, str]) -> str:
    """Several reports of one ground truth side by side; ``sources``: name -> the results file it came from."""
    first = next(iter(reports.values()))
    lines = [f"# Where the AP goes: TIDE error types of {len(reports)} results", "", *_intro(first), ""]
    lines += [f"- `{name}`: {sources[name]}" for name in reports]
    return "\n".join([*lines, "", *tide_compare_tables(reports)]) + "\n"


def tide_compare_dict(reports: Mapping[str, TideReport], sources: Mapping[str, str]) -> dict[str, Any]:
    """Per named report its file and, per size, the class means of :func:`tide_dict` (``AP50``, ``gt``, ``dAP``
    and ``count`` per error type)."""
    first = next(iter(reports.values()))
    doc = {k: v for k, v in tide_dict(first).items() if k not in ("classes", "areas")}
    doc["results"] = {}
    for name, report in reports.items():
        areas = tide_dict(report)["areas"]
        doc["results"][name] = {"file": sources[name], "areas": {
            area: {"AP50": v["AP50"]["mean"], "gt": v["gt"]["total"],
                   "dAP": {e: d["mean"] for e, d in v["dAP"].items()},
                   "count": {e: c["total"] for e, c in v["count"].items()}} for area, v in areas.items()}}
    return doc


def _grouped_bars(ax: Axes, series: Mapping[str, np.ndarray], legend: str) -> None:
    """One group of bars per error type, a bar per ``series`` entry (``(E,)`` dAP fractions), in AP points."""
    x, width = np.arange(len(ERRORS)), 0.8 / len(series)
    for n, (name, dap) in enumerate(series.items()):
        values = np.nan_to_num(100 * dap)
        drawn = ax.bar(x + (n - (len(series) - 1) / 2) * width, values, width, color=COLOURS[n % len(COLOURS)],
                       label=name)
        ax.bar_label(drawn, [f"{v:.1f}" if v >= 0.05 else "" for v in values], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(x, ERRORS)
    ax.set(ylabel="dAP (AP50 points)")
    ax.margins(y=0.15)  # room for the value labels
    ax.legend(title=legend, fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def tide_figure(report: TideReport) -> Figure:
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
    _grouped_bars(bars, {area: report.dap_mean[a] for a, area in enumerate(AREAS)}, "size")
    bars.set_title("by size, mean over classes")
    values = 100 * report.dap[0].T  # (K, E)
    shown = np.nan_to_num(values)
    image = heat.imshow(shown, cmap="Reds", vmin=0, vmax=max(float(shown.max()), 1e-9), aspect="auto")
    heat.set_xticks(range(len(ERRORS)), ERRORS)
    heat.set_yticks(range(num_cls), report.classes, fontsize=9 if num_cls <= 30 else 6)
    heat.set_title("per class, size all")
    fig.colorbar(image, ax=heat, label="dAP (AP50 points)")
    if num_cls <= 30:
        for (k, j), v in np.ndenumerate(values):
            heat.text(j, k, "-" if np.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=8,
                      color="white" if shown[k, j] > 0.6 * shown.max() else "black")
    return fig


def tide_compare_figure(reports: Mapping[str, TideReport]) -> Figure:
    """dAP of each error type (size all, class mean), a bar per named report."""
    fig = new_figure(max(8.0, 1.2 * len(ERRORS) * (1 + 0.25 * len(reports))), 4.5)
    ax = fig.subplots()
    _grouped_bars(ax, {name: r.dap_mean[0] for name, r in reports.items()}, "results")
    aps = ", ".join(f"{name} {_points(r.ap_mean[0])}" for name, r in reports.items())
    ax.set_title(f"where the AP goes (TIDE dAP, AP50 points, size all) - AP50 {aps}", fontsize=10)
    return fig


def _write(path: Path, content: str | Figure) -> Path:
    """``content`` (text, or a figure as PNG) into ``path``, replaced only once complete."""
    with replaced_on_success(path) as tmp:
        if isinstance(content, str):
            tmp.write_text(content)
        else:
            content.savefig(tmp, format="png", dpi=100)
    return path


def tide_paths(out_dir: str | Path, names: Sequence[str] = ()) -> list[Path]:
    """The files :func:`write_tide` writes into ``out_dir`` (json, md, png), or with ``names`` those of
    :func:`write_tide_compare`: ``tide_compare`` json, md, png, then each name's report folder."""
    out = Path(out_dir)
    if not names:
        return [out / f"tide{s}" for s in SUFFIXES]
    return [out / f"tide_compare{s}" for s in SUFFIXES] + [p for n in names for p in tide_paths(out / n)]


def write_tide(report: TideReport, out_dir: str | Path) -> list[Path]:
    """Write ``tide.json``, ``tide.md`` and ``tide.png`` into ``out_dir`` (created; those three replaced)."""
    paths = tide_paths(out_dir)
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    contents: tuple[str | Figure, ...] = (json.dumps(tide_dict(report), indent=1) + "\n", tide_markdown(report),
                                          tide_figure(report))
    return [_write(p, c) for p, c in zip(paths, contents)]


def write_tide_compare(reports: Mapping[str, TideReport], sources: Mapping[str, str],
                       out_dir: str | Path) -> list[Path]:
    """``tide_compare.json/md/png`` into ``out_dir`` and each report's :func:`write_tide` files into
    ``out_dir/<name>/``; ``sources``: name -> the results file (for the tables)."""
    paths = tide_paths(out_dir, list(reports))[:len(SUFFIXES)]
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    contents: tuple[str | Figure, ...] = (json.dumps(tide_compare_dict(reports, sources), indent=1) + "\n",
                                          tide_compare_markdown(reports, sources), tide_compare_figure(reports))
    files = [_write(p, c) for p, c in zip(paths, contents)]
    return files + [f for name, report in reports.items() for f in write_tide(report, Path(out_dir) / name)]
