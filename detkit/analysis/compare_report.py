"""The report of a comparison (``report.json``, ``report.md``, ``report.png``): per config the mean and
std over seeds of the COCO numbers of each run's last evaluation, and against the first config (the
baseline) the AP difference with a paired-bootstrap interval over the val images and the training seeds,
and the same interval for the AP of each object size (COCO small / medium / large) and of each class."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO

from detkit.analysis import RunDataError
from detkit.analysis.bootstrap import (
    AREAS,
    MatchRecords,
    match_records_by_area,
    mean_over_categories,
    paired_difference,
    resample_counts,
    resample_seeds,
    resampled_ap,
    resampled_category_ap,
)
from detkit.analysis.plotting import new_figure, save_figure
from detkit.engine.evaluator import SUMMARY_KEYS
from detkit.engine.writers import read_jsonl

VERDICT_COLOURS = {"better": "#2ca02c", "worse": "#d62728"}

#: ``{"by_size": {"APs" | "APm" | "APl": value}, "by_class": {class name: value}}``: apart, so that a class
#: named like a size keeps its own value (sizes and classes without val boxes left out).
Breakdown = dict[str, dict[str, Any]]


@dataclass
class RunResult:
    """One finished run: its last ``eval`` record of ``metrics.jsonl`` and that evaluation's results file."""

    label: str
    seed: int
    work_dir: Path
    metrics: dict[str, Any]
    results_file: Path
    wall_s: float | None = None


def last_evaluation(work_dir: Path) -> dict[str, Any] | None:
    """The last ``eval`` record of ``work_dir/metrics.jsonl`` whose results file exists, else None."""
    path = work_dir / "metrics.jsonl"
    try:
        records = [r for r in read_jsonl(path) if r.get("type") == "eval"] if path.is_file() else []
    except ValueError as err:
        raise RunDataError(str(err)) from None
    if not records or not (work_dir / "results" / f"bbox_epoch_{records[-1].get('epoch')}.json").is_file():
        return None
    return records[-1]


def read_run(label: str, seed: int, work_dir: Path, wall_s: float | None = None) -> RunResult:
    """:class:`RunResult` of a finished run; :class:`RunDataError` naming the folder when it has no evaluation."""
    record = last_evaluation(work_dir)
    if record is None:
        raise RunDataError(f"{work_dir}: no evaluation with its results/bbox_epoch_N.json (metrics.jsonl 'eval' "
                            f"record); the run has not finished")
    return RunResult(label, seed, work_dir, record, work_dir / "results" / f"bbox_epoch_{record['epoch']}.json",
                     wall_s)


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample std (NaN for one value) of the non-missing values (None and NaN are missing)."""
    kept = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if not len(kept):
        return math.nan, math.nan
    return float(kept.mean()), float(kept.std(ddof=1)) if len(kept) > 1 else math.nan


def build_report(runs: Sequence[RunResult], coco_gt: COCO, image_ids: Sequence[int], resamples: int = 1000,
                 seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Summary per label (in the order of ``runs``; the first is the baseline) and the paired bootstrap
    of the AP difference of every other label against it: the same ``resamples`` resamples (seeded by
    ``seed``) of ``image_ids`` and of the training seeds for every run, differences of the seed means of AP."""
    labels = list(dict.fromkeys(r.label for r in runs))
    by_label = {label: sorted((r for r in runs if r.label == label), key=lambda r: r.seed) for label in labels}
    seeds = {label: [r.seed for r in rs] for label, rs in by_label.items()}
    for label in labels[1:]:
        if seeds[label] != seeds[labels[0]]:
            raise RunDataError(f"{label} has seeds {seeds[label]} but the baseline {labels[0]} has "
                                f"{seeds[labels[0]]}; the comparison pairs runs by seed")
    ids = sorted({int(i) for i in image_ids})
    counts = np.vstack([np.ones((1, len(ids)), dtype=np.int64), resample_counts(len(ids), resamples, seed)])
    draws = resample_seeds(len(seeds[labels[0]]), resamples, seed)
    ap, parts = {}, {}  # run -> (1 + resamples,) AP on the full val set, then each resample; its Breakdown
    for run in runs:
        try:
            results = json.loads(run.results_file.read_text())
        except ValueError as err:  # a run killed while writing it
            raise RunDataError(f"{run.results_file}: not a COCO results json ({err}); to redo that run, delete "
                                f"{run.work_dir} and run the command again") from None
        ap[run.work_dir], parts[run.work_dir] = _resampled_breakdown(
            match_records_by_area(coco_gt, results, ids), counts, class_names(coco_gt))
    configs = {}
    for label, rs in by_label.items():
        summary = {key: _mean_std([r.metrics.get(key) for r in rs]) for key in SUMMARY_KEYS}
        summary["wall_s"] = _mean_std([r.wall_s for r in rs])
        configs[label] = {"seeds": seeds[label], "work_dirs": [str(r.work_dir) for r in rs],
                          "per_seed": {**{key: [r.metrics.get(key) for r in rs] for key in SUMMARY_KEYS},
                                       "wall_s": [r.wall_s for r in rs]},
                          "mean": {k: v[0] for k, v in summary.items()}, "std": {k: v[1] for k, v in summary.items()},
                          "ap_recomputed": [float(ap[r.work_dir][0]) for r in rs],
                          "breakdown": {group: {key: float(np.mean([parts[r.work_dir][group][key][0] for r in rs]))
                                                for key in keys} for group, keys in parts[rs[0].work_dir].items()}}
    comparisons = {}
    for label in labels[1:]:
        base, other = by_label[labels[0]], by_label[label]
        diff = {group: {key: paired_difference([parts[r.work_dir][group][key] for r in base],
                                               [parts[r.work_dir][group][key] for r in other], level, draws)
                        for key in keys} for group, keys in parts[runs[0].work_dir].items()}
        comparisons[label] = {**paired_difference([ap[r.work_dir] for r in base], [ap[r.work_dir] for r in other],
                                                  level, draws), "breakdown": diff}
    return {"baseline": labels[0], "labels": labels, "num_images": len(ids), "resamples": resamples,
            "bootstrap_seed": seed, "level": level, "configs": configs, "comparisons": comparisons,
            "ground_truth": ground_truth_counts(coco_gt, ids)}


def class_names(coco_gt: COCO) -> list[str]:
    """Category names in ``coco_gt.getCatIds()`` order (COCOeval's ``params.catIds``)."""
    return [c["name"] for c in coco_gt.loadCats(coco_gt.getCatIds())]


def _resampled_breakdown(records: dict[str, MatchRecords], counts: np.ndarray, names: Sequence[str]
                         ) -> tuple[np.ndarray, Breakdown]:
    """AP (area all) and its :data:`Breakdown` (APs, APm, APl; each class's AP, area all) on the full val set
    and each resample: ``(1 + B,)`` each, from the records of every area and ``counts (1 + B, I)``."""
    per_class = resampled_category_ap(records["all"], counts)
    groups = {"by_size": {f"AP{area[0]}": resampled_ap(records[area], counts) for area in AREAS[1:]},
              "by_class": dict(zip(names, per_class))}
    return mean_over_categories(per_class), {  # NaN: no such boxes in val
        group: {key: values for key, values in keyed.items() if not np.isnan(values[0])}
        for group, keyed in groups.items()}


def ground_truth_counts(coco_gt: COCO, ids: Sequence[int]) -> dict[str, dict[str, int]]:
    """Non-crowd val boxes ``by_size`` (``APs``: area under 32^2, ``APm``: up to 96^2, ``APl``) and ``by_class``
    (class name): how much data each breakdown interval rests on."""
    anns = coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=list(ids), iscrowd=False))
    sizes = {"APs": sum(int(a["area"] <= 32 ** 2) for a in anns),
             "APm": sum(int(32 ** 2 <= a["area"] <= 96 ** 2) for a in anns),
             "APl": sum(int(a["area"] >= 96 ** 2) for a in anns)}  # COCOeval's ranges (bounds in both)
    cats = dict(zip(coco_gt.getCatIds(), class_names(coco_gt)))
    return {"by_size": sizes,
            "by_class": {name: sum(int(a["category_id"] == cid) for a in anns) for cid, name in cats.items()}}


def _pct(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{100 * mean:.1f}" + ("" if math.isnan(std) else f" ± {100 * std:.1f}")


def format_duration(seconds: float | None) -> str:
    """``1m02s``, ``2h05m``; ``n/a`` for None or NaN."""
    if seconds is None or math.isnan(seconds):
        return "n/a"
    if seconds >= 3600:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _wall(mean: float, std: float) -> str:
    return format_duration(mean) + ("" if math.isnan(std) else f" ± {format_duration(std)}")


def format_markdown(report: dict[str, Any]) -> str:
    """``report.md``: one table row per config, AP etc. in percent as mean ± std over seeds."""
    level = round(100 * report["level"])
    count = len(report["labels"])
    lines = [f"# Comparison of {count} config{'s' if count != 1 else ''}", "",
             (f"Val set: {report['num_images']} images. Interval: {level}% paired bootstrap over the val images "
              f"and the training seeds ({report['resamples']} resamples, seed {report['bootstrap_seed']}; the same "
              f"resamples for every run, difference of the seed means of AP). See docs/compare.md."), "",
             ("| config | seeds | AP | AP per seed | AP50 | AP75 | APs | APm | APl | wall time | "
              f"AP - baseline [{level}% CI] | verdict |"),
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label in report["labels"]:
        c = report["configs"][label]
        cells = [label, str(len(c["seeds"])), _pct(c["mean"]["AP"], c["std"]["AP"]),
                 " ".join("n/a" if v is None else f"{100 * v:.1f}" for v in c["per_seed"]["AP"]),
                 *(_pct(c["mean"][k], c["std"][k]) for k in SUMMARY_KEYS[1:]),
                 _wall(c["mean"]["wall_s"], c["std"]["wall_s"])]
        if label == report["baseline"]:
            cells += ["(baseline)", ""]
        else:
            d = report["comparisons"][label]
            cells += [f"{100 * d['diff']:+.2f} [{100 * d['low']:+.2f}, {100 * d['high']:+.2f}]", d["verdict"]]
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("eval_variants"):
        lines += ["", "Rows `<config>@<NAME>`: the final weights of that config's runs evaluated again with these "
                  "overrides (their wall time: the evaluations'): " + "; ".join(
                      f"{name}: `{' '.join(overrides)}`" for name, overrides in report["eval_variants"].items())]
    return "\n".join(lines + breakdown_table(report)) + "\n"


def breakdown_table(report: dict[str, Any], max_classes: int = 12) -> list[str]:
    """Markdown lines: per config the seed-mean AP of each object size and class (classes only up to
    ``max_classes``; report.json has them all) and its paired-bootstrap difference to the baseline."""
    baseline = report["configs"][report["baseline"]]["breakdown"]
    columns = [("by_size", key) for key in baseline["by_size"]]
    if len(baseline["by_class"]) <= max_classes:
        columns += [("by_class", key) for key in baseline["by_class"]]
    level, gt = round(100 * report["level"]), report["ground_truth"]
    lines = ["", f"AP by object size and by class, seed mean, and in brackets the difference to the baseline with its "
             f"{level}% interval (bold where the interval excludes 0); the val boxes each column rests on:", "",
             "| config | " + " | ".join(f"{key} ({gt[group].get(key, 0)} boxes)" for group, key in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for label in report["labels"]:
        cells = []
        for group, key in columns:
            cell = f"{100 * report['configs'][label]['breakdown'][group][key]:.1f}"
            if label != report["baseline"]:
                d = report["comparisons"][label]["breakdown"][group][key]
                # hundredths where the interval is under 0.05 points: a bold "-0.0 [-0.0, -0.0]" says nothing
                digits = 2 if max(abs(d["low"]), abs(d["high"])) < 0.0005 else 1
                diff = f"{100 * d['diff']:+.{digits}f} [{100 * d['low']:+.{digits}f}, {100 * d['high']:+.{digits}f}]"
                cell += f" ({f'**{diff}**' if d['verdict'] in VERDICT_COLOURS else diff})"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def plot_report(report: dict[str, Any], path: Path) -> Path:
    """AP of each run (dots) and the seed mean (bar) per config; the AP difference to the baseline with its
    interval, coloured by the verdict."""
    labels = report["labels"]
    y = np.arange(len(labels))[::-1]
    fig = new_figure(11, 1.6 + 0.55 * len(labels))
    left, right = fig.subplots(1, 2, sharey=True)
    for row, label in zip(y, labels):
        c = report["configs"][label]
        values = [100 * v for v in c["per_seed"]["AP"] if v is not None]
        left.scatter(values, np.full(len(values), row), s=28, color="#1f77b4", alpha=0.7, zorder=3,
                     label="one seed" if row == y[0] else None)
        left.plot([100 * c["mean"]["AP"]] * 2, [row - 0.3, row + 0.3], color="black", lw=2.5,
                  label="mean over seeds" if row == y[0] else None)
        if label == report["baseline"]:
            right.plot(0, row, "D", color="black")
            right.annotate("baseline", (0, row), xytext=(8, 0), textcoords="offset points", va="center", fontsize=8)
        else:
            d = report["comparisons"][label]
            colour = VERDICT_COLOURS.get(d["verdict"], "#7f7f7f")
            right.errorbar(100 * d["diff"], row, xerr=[[100 * (d["diff"] - d["low"])], [100 * (d["high"] - d["diff"])]],
                           fmt="o", color=colour, capsize=5, lw=2)
            right.annotate(d["verdict"].replace(" at this data size", ""), (100 * d["high"], row),
                           xytext=(6, 0), textcoords="offset points", va="center", fontsize=8, color=colour)
    left.set(yticks=y, yticklabels=labels, xlabel="AP (%) of the last evaluation", title="AP per run")
    left.legend(loc="best", fontsize=8)
    right.axvline(0, color="black", lw=1, ls="--")
    right.set(xlabel=f"AP - AP of {report['baseline']} (points)",
              title=f"AP difference, {round(100 * report['level'])}% paired-bootstrap interval")
    right.margins(x=0.35)
    seeds = len(report["configs"][report["baseline"]]["seeds"])
    right.text(0.02, 0.02, f"resampled: {report['num_images']} val images x {seeds} seed{'s' * (seeds > 1)}, "
                           f"{report['resamples']} times",
               transform=right.transAxes, fontsize=8, color="#555555")
    for ax in (left, right):
        ax.grid(alpha=0.3, axis="x")
        ax.set_ylim(-0.7, len(labels) - 0.3)
    return save_figure(fig, path)


def _plain(value: Any) -> Any:
    """JSON-ready: NaN (a metric no run has, a std of one seed) becomes null, paths strings."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value) if isinstance(value, Path) else value


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """``report.json``, ``report.md`` and ``report.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(_plain(report), indent=1) + "\n")
    (out / "report.md").write_text(format_markdown(report))
    return [out / "report.json", out / "report.md", plot_report(report, out / "report.png")]
