"""What a dataset holds, read through the generic dataset interface only (``len``, ``dataset[i] ->
(image, target)`` with ``target["boxes"] (n, 4)`` x1y1x2y2 and ``target["labels"] (n,)``, ``classes``),
so every registered dataset works: class counts, boxes per image, box sizes, images without boxes;
and, from a config's model, its assigner's health on the same data (:mod:`detkit.assigners.health`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.ticker import MaxNLocator

from detkit.analysis.plotting import new_figure, save_figure
from detkit.assigners.health import COCO_SIZES, SIZE_NAMES
from detkit.data.loader import build_dataloader
from detkit.engine.hooks.assigner_health import HealthProbe, loader_health, unsupported_reason
from detkit.engine.plan import check_class_counts
from detkit.engine.run_log import progress
from detkit.models import build_detector


@dataclass
class DatasetStats:
    """``boxes_per_image (N,)``, ``labels (M,)`` and ``sizes (M,)`` = sqrt(w * h) in pixels of the items
    as the dataset returns them (after its transforms), and the ids of the images without boxes."""

    classes: list[str]
    boxes_per_image: np.ndarray
    labels: np.ndarray
    sizes: np.ndarray
    empty: list[Any] = field(default_factory=list)

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {name: int(counts[k]) for k, name in enumerate(self.classes)}

    def summary(self) -> dict[str, Any]:
        """JSON-ready numbers: counts per class, boxes per image and box sizes (percentiles, COCO areas)."""
        per_image, sizes = self.boxes_per_image, self.sizes
        small, large = COCO_SIZES
        return {"images": int(len(per_image)), "boxes": int(per_image.sum()), "classes": self.class_counts(),
                "boxes_per_image": {"mean": round(float(per_image.mean()), 3), "min": int(per_image.min()),
                                    "max": int(per_image.max())} if len(per_image) else {},
                "box_size_px": {f"p{q}": round(float(np.percentile(sizes, q)), 1) for q in (1, 50, 99)}
                if len(sizes) else {},
                "coco_area": {"small (<32)": int((sizes < small).sum()),
                              "medium (32-96)": int(((sizes >= small) & (sizes < large)).sum()),
                              "large (>=96)": int((sizes >= large).sum())},
                "images_without_boxes": len(self.empty)}


def dataset_stats(dataset: Any, limit: int | None = None, desc: str = "dataset") -> DatasetStats:
    """Read every item (or the first ``limit``) of ``dataset``; an item's id is ``target["image_id"]``
    when present, else its index."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    per_image, labels, sizes, empty = [], [], [], []
    for index in progress(range(n), n, desc, True):
        _, target = dataset[index]
        boxes = np.asarray(target["boxes"], dtype=np.float64).reshape(-1, 4)
        per_image.append(len(boxes))
        labels.append(np.asarray(target["labels"], dtype=np.int64).reshape(-1))
        sizes.append(np.sqrt((boxes[:, 2] - boxes[:, 0]).clip(0) * (boxes[:, 3] - boxes[:, 1]).clip(0)))
        if not len(boxes):
            empty.append(target.get("image_id", index))
    return DatasetStats(list(dataset.classes), np.asarray(per_image, dtype=np.int64),
                        np.concatenate(labels) if labels else np.zeros(0, np.int64),
                        np.concatenate(sizes) if sizes else np.zeros(0), empty)


def config_health(cfg: Mapping[str, Any], split: str, dataset: Any, limit: int | None = None
                  ) -> dict[str, Any] | str:
    """The health summary of the config's own assigner on ``data.<split>`` as the split's loader batches
    it (its transforms, padding, batch size, aspect grouping), or why it cannot be measured.
    The model is built untrained and without ``backbone.init_weights``: the assigner needs its geometry only."""
    spec = dict(cfg["model"])
    if isinstance(spec.get("backbone"), Mapping) and "init_weights" in spec["backbone"]:
        spec["backbone"] = {**spec["backbone"], "init_weights": None}  # no weights download for geometry
    model = build_detector(spec)
    check_class_counts(model, dataset)
    reason = unsupported_reason(model)
    if reason is not None:
        return reason
    loader = build_dataloader(cfg["data"], split, dataset=dataset)
    health = loader_health(HealthProbe(model), loader, dataset.classes, limit, f"assigner health data.{split}")
    return health if isinstance(health, str) else health.summary()


def plot_dataset_stats(stats: DatasetStats, path: str | Path, title: str = "",
                       health: dict[str, Any] | None = None) -> Path:
    """Three panels: boxes per class, boxes per image, and a histogram of sqrt(box area) on log bins
    with COCO's small/medium/large boundaries; a fourth with ``health`` (an assigner health summary):
    GTs by number of positive priors, the zero bar in red."""
    fig = new_figure(20 if health else 15, 4.2)
    ax_cls, ax_img, ax_size, *ax_health = fig.subplots(1, 4 if health else 3)
    fig.suptitle(title or "dataset")
    counts = stats.class_counts()
    many = len(counts) > 20
    ax_cls.bar(range(len(counts)), list(counts.values()), color="#1f77b4")
    ax_cls.set_xticks(range(len(counts)), list(counts), rotation=90 if many or len(counts) > 6 else 0,
                      fontsize=6 if many else 9)
    ax_cls.set(title="boxes per class", ylabel="boxes")
    top = int(stats.boxes_per_image.max(initial=0))
    ax_img.hist(stats.boxes_per_image, bins=np.arange(top + 2) - 0.5, color="#2ca02c", rwidth=0.85)
    ax_img.set(title="boxes per image", xlabel="boxes in the image", ylabel="images")
    ax_size.set(title="box size", xlabel="sqrt(box area), pixels", ylabel="boxes", xscale="log")
    sizes = stats.sizes[stats.sizes > 0]
    if len(sizes):
        bins = np.geomspace(max(sizes.min(), 1.0) * 0.9, sizes.max() * 1.1, 40)
        ax_size.hist(sizes, bins=bins, color="#ff7f0e")
        ticks = [t for t in (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048) if bins[0] <= t <= bins[-1]]
        ax_size.set_xticks(ticks, [str(t) for t in ticks])
        ax_size.minorticks_off()
        for edge, name in zip(COCO_SIZES, ("small | medium", "medium | large")):
            ax_size.axvline(edge, color="black", ls="--", lw=1)
            ax_size.text(edge, 0.97, f"{name} ", transform=ax_size.get_xaxis_transform(), va="top", ha="right",
                         rotation=90, fontsize=8)
    if health:
        plot_health(ax_health[0], health)
    for ax in (ax_cls, ax_img, ax_size, *ax_health):
        ax.grid(alpha=0.3, axis="y")
    return save_figure(fig, path)


def plot_health(ax: Any, health: dict[str, Any]) -> None:
    """GTs per number of positives (bar 0 red: GTs the detector cannot learn), zero counts by size and
    class and positives per level written in the panel."""
    hist = {int(k): n for k, n in health["positives_per_gt"]["histogram"].items()}
    counts = [hist.get(k, 0) for k in range(max(hist, default=0) + 1)]
    ax.bar(range(len(counts)), counts, color=["#d62728"] + ["#9467bd"] * (len(counts) - 1))
    ax.set_ylim(0, max(counts, default=1) * 1.45)  # room for the text above the bars
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    zero = health["gts_without_positives"]
    ax.text(0, counts[0] if counts else 0, f"{zero['total']}", color="#d62728", ha="center", va="bottom",
            fontsize=9)  # the zero bar is often too short to see
    ax.set(title=f"assigner: positives per GT ({zero['total']} of {health['gts']} GTs have none)",
           xlabel="positive priors of the GT", ylabel="GTs")
    by_class = ", ".join(f"{c} {n}" for c, n in zero["by_class"].items() if n)
    levels = " ".join(f"{k.split()[1]}:{n}" for k, n in health["positives_per_level"].items())
    ax.text(0.02, 0.97, "without positives: " + ", ".join(f"{n} {zero[n]}" for n in SIZE_NAMES)
            + (f"\n{by_class}" if by_class else "") + f"\npositives per level (stride:n)\n{levels}",
            transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})


def format_health(health: dict[str, Any]) -> str:
    """The console lines of an assigner health summary."""
    per_gt, zero = health["positives_per_gt"], health["gts_without_positives"]
    lines = [(f"assigner health ({health['assigner']}, sizes by the box area after the transforms): "
              f"{health['positives']} positives for {health['gts']} GTs, per GT mean {per_gt['mean']}, "
              f"min {per_gt['min']}, max {per_gt['max']}"),
             f"  GTs without positives: {zero['total']} (" + ", ".join(f"{n} {zero[n]}" for n in SIZE_NAMES) + ")",
             *(f"  {name:<8} {g['gts']:>6d} GTs, {g['without_positives']:>5d} without positives, mean "
               f"{g['mean_positives']} positives"
               for groups in (health["by_size"], health["by_class"]) for name, g in groups.items()),
             "  positives per level: " + ", ".join(f"{k} {n}" for k, n in health["positives_per_level"].items())]
    return "\n".join(lines)


def format_stats(stats: DatasetStats, name: str, max_empty: int = 50) -> str:
    """The console report: class counts, boxes per image, sizes, images without boxes (first ``max_empty``)."""
    s = stats.summary()
    width = max((len(c) for c in stats.classes), default=5)
    lines = [f"{name}: {s['images']} images, {s['boxes']} boxes, {len(stats.classes)} classes",
             *(f"  {c:<{width}}  {n:>7d} boxes" for c, n in s["classes"].items()),
             "boxes per image: " + ", ".join(f"{k} {v}" for k, v in s["boxes_per_image"].items()),
             "box size sqrt(w*h) px: " + ", ".join(f"{k} {v}" for k, v in s["box_size_px"].items())
             + " | COCO areas: " + ", ".join(f"{k} {v}" for k, v in s["coco_area"].items()),
             f"images without boxes: {len(stats.empty)}"]
    if stats.empty:
        shown: Sequence[Any] = stats.empty[:max_empty]
        lines.append("  " + ", ".join(map(str, shown)) + (" ..." if len(stats.empty) > max_empty else ""))
    return "\n".join(lines)
