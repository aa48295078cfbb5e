"""Everything an evaluation leaves for people to read, written into one folder (``eval_epoch_N/``):

``pr_curves.png``, ``confusion_matrix.png`` + ``.json``, ``per_class_ap.json`` + ``.md`` (AP by class
with ground-truth counts) and ``lowest_recall.json`` (the images the model misses most).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from detkit.analysis.confusion import (
    confusion_matrix,
    lowest_recall,
    plot_confusion,
    row_normalized,
)
from detkit.analysis.pr_curves import nanmean, plot_pr_curves, pr_curve_data

#: Columns of the per-class table that come from COCOeval (area index, IoU threshold or None = mean).
AP_COLUMNS = {"AP": (0, None), "AP50": (0, 0.5), "AP75": (0, 0.75), "APs": (1, None), "APm": (2, None),
              "APl": (3, None)}


def _value(x: float | np.ndarray) -> float | None:
    """JSON-safe: NaN -> None, else rounded to 4 digits."""
    return None if np.isnan(x) else round(float(x), 4)


def per_class_table(coco_eval: Any, coco_gt: Any, image_ids: Sequence[int], classes: Sequence[str],
                    counts: np.ndarray) -> list[dict[str, Any]]:
    """One row per class: ground-truth boxes and images, COCO AP/AP50/AP75/APs/APm/APl and AR100
    (area all, 100 detections), and recall/precision at the confusion matrix's operating point."""
    cat_ids, wanted = sorted(coco_gt.getCatIds()), set(int(i) for i in image_ids)
    gt_boxes = np.zeros(len(cat_ids), dtype=int)
    gt_images: list[set[int]] = [set() for _ in cat_ids]
    index = {c: k for k, c in enumerate(cat_ids)}
    for ann in coco_gt.dataset.get("annotations", []):
        if ann["image_id"] in wanted and not ann.get("iscrowd", 0):
            gt_boxes[index[ann["category_id"]]] += 1
            gt_images[index[ann["category_id"]]].add(ann["image_id"])
    predicted = counts.sum(axis=0)
    recall_at = np.diag(row_normalized(counts))
    rows = []
    for k, name in enumerate(classes[: len(cat_ids)]):
        row: dict[str, Any] = {"class": name, "gt_boxes": int(gt_boxes[k]), "gt_images": len(gt_images[k])}
        for key, (area, iou) in AP_COLUMNS.items():
            row[key] = _ap(coco_eval, k, area, iou)
        row["AR100"] = (0.0 if coco_eval is None else
                        _value(nanmean(_valid(np.asarray(coco_eval.eval["recall"])[:, k, 0, -1]))))
        row["recall_at_thr"] = round(float(recall_at[k]), 4)
        row["precision_at_thr"] = round(float(counts[k, k] / predicted[k]), 4) if predicted[k] else None
        rows.append(row)
    return rows


def _valid(values: np.ndarray) -> np.ndarray:
    return np.where(values > -1, values, np.nan)


def _ap(coco_eval: Any, k: int, area: int, iou: float | None) -> float | None:
    """Class ``k``'s AP at area index ``area`` and IoU ``iou`` (None: mean over 0.5:0.95), as pycocotools."""
    if coco_eval is None:
        return 0.0
    precision = np.asarray(coco_eval.eval["precision"])[:, :, k, area, -1]  # (T, R)
    if iou is not None:
        precision = precision[int(np.argmin(np.abs(np.asarray(coco_eval.params.iouThrs) - iou)))]
    return _value(nanmean(_valid(precision)))


def markdown_table(rows: Sequence[dict[str, Any]], iou_thr: float, score_thr: float) -> str:
    """The per-class rows as a markdown table (percent), worst AP first."""
    keys = ["gt_boxes", "gt_images", *AP_COLUMNS, "AR100", "recall_at_thr", "precision_at_thr"]
    head = ["class", "GT boxes", "GT images", *AP_COLUMNS, "AR100", f"recall@{score_thr:g}", f"precision@{score_thr:g}"]
    lines = [f"Per-class COCO bbox metrics (percent); recall/precision at score >= {score_thr:g}, IoU >= {iou_thr:g}.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(rows, key=lambda r: -1.0 if r["AP"] is None else r["AP"]):
        cells = [str(row[k]) if k.startswith("gt_") else ("-" if row[k] is None else f"{100 * row[k]:.1f}")
                 for k in keys]
        lines.append("| " + " | ".join([row["class"], *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_eval_report(out_dir: str | Path, coco_eval: Any, coco_gt: Any, results: Sequence[dict[str, Any]],
                      classes: Sequence[str], image_ids: Sequence[int], iou_thr: float = 0.5, score_thr: float = 0.3,
                      title: str = "", worst: int = 20) -> list[Path]:
    """Write the report files into ``out_dir`` from an evaluated ``coco_eval`` (None: no detections)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classes = list(classes[: len(coco_gt.getCatIds())])
    counts, matches = confusion_matrix(coco_gt, results, image_ids, iou_thr, score_thr)
    rows = per_class_table(coco_eval, coco_gt, image_ids, classes, counts)
    operating_point = {"iou_thr": iou_thr, "score_thr": score_thr}
    files = [plot_pr_curves(None if coco_eval is None else pr_curve_data(coco_eval), classes, out / "pr_curves.png",
                            title),
             plot_confusion(counts, classes, out / "confusion_matrix.png", iou_thr, score_thr, title)]
    documents = {
        "confusion_matrix.json": {**operating_point, "classes": [*classes, "background"], "rows": "ground truth",
                                  "columns": "predicted", "counts": counts.tolist(),
                                  "row_normalized": np.round(row_normalized(counts), 4).tolist()},
        "per_class_ap.json": {**operating_point, "classes": rows},
        "lowest_recall.json": {**operating_point, "images": lowest_recall(matches, coco_gt, worst)},
    }
    for name, document in documents.items():
        files.append(out / name)
        files[-1].write_text(json.dumps(document, indent=1) + "\n")
    files.append(out / "per_class_ap.md")
    files[-1].write_text(markdown_table(rows, iou_thr, score_thr))
    return files
