"""Confusion matrix and per-image recall at one operating point (IoU and score threshold).

Matching, per image, among detections with score >= ``score_thr`` in descending score order: first
each detection takes the unmatched ground-truth box *of its class* with the highest IoU >= ``iou_thr``
(COCO's rule); then each detection still unmatched takes the unmatched box *of any class* with the
highest IoU >= ``iou_thr`` (a class confusion). Every box and every detection is counted once:
rows are ground-truth classes plus ``background`` (detections that matched nothing), columns are
predicted classes plus ``background`` (boxes no detection matched). Crowd boxes are no ground truth;
a leftover detection lying inside one (intersection over the detection's area >= ``iou_thr``) is
left out, as pycocotools ignores it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torchvision.ops import box_area, box_iou

from detkit.analysis.plotting import new_figure, save_figure


@dataclass
class ImageMatch:
    """One image's outcome: ground-truth boxes ``found`` by a detection of their class, ``confused``
    (matched by another class only) or ``missed``, and ``false_positives`` on background."""

    image_id: int
    num_gt: int
    found: int
    confused: int
    missed: int
    false_positives: int

    @property
    def recall(self) -> float:
        return self.found / self.num_gt if self.num_gt else float("nan")


def match_detections(gt_boxes: torch.Tensor, gt_labels: torch.Tensor, boxes: torch.Tensor, scores: torch.Tensor,
                     labels: torch.Tensor, iou_thr: float) -> tuple[np.ndarray, np.ndarray]:
    """``gt_boxes (G, 4)``, ``boxes (D, 4)`` x1y1x2y2 -> ``gt_match (G,)`` (detection index or -1) and
    ``det_match (D,)`` (ground-truth index or -1): same class first, then any class (module docstring)."""
    gt_match, det_match = np.full(len(gt_boxes), -1), np.full(len(boxes), -1)
    if not len(gt_boxes) or not len(boxes):
        return gt_match, det_match
    iou = box_iou(boxes.double(), gt_boxes.double()).numpy()  # (D, G)
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    same = labels[:, None].numpy() == gt_labels[None, :].numpy()
    for allowed in (same, np.ones_like(same)):
        for d in order:
            if det_match[d] >= 0:
                continue
            candidates = np.where(allowed[d] & (gt_match < 0) & (iou[d] >= iou_thr), iou[d], -1.0)
            g = int(candidates.argmax())
            if candidates[g] >= 0:
                det_match[d], gt_match[g] = g, d
    return gt_match, det_match


def _xyxy(xywh: Sequence[Sequence[float]]) -> torch.Tensor:
    boxes = torch.tensor(xywh, dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def _inside(boxes: torch.Tensor, crowd: torch.Tensor, thr: float) -> np.ndarray:
    """``(D,)`` bool: the detection's intersection with some crowd box covers >= ``thr`` of its area."""
    if not len(crowd) or not len(boxes):
        return np.zeros(len(boxes), dtype=bool)
    lt = torch.max(boxes[:, None, :2], crowd[None, :, :2])
    rb = torch.min(boxes[:, None, 2:], crowd[None, :, 2:])
    ioa = (rb - lt).clamp(min=0).prod(dim=2) / box_area(boxes).clamp(min=1e-9)[:, None]
    return (ioa >= thr).any(dim=1).numpy()


def confusion_matrix(coco_gt: Any, results: Sequence[dict[str, Any]], image_ids: Sequence[int],
                     iou_thr: float = 0.5, score_thr: float = 0.3) -> tuple[np.ndarray, list[ImageMatch]]:
    """COCO ground truth + COCO results -> ``counts (C + 1, C + 1)`` int64 (rows ground truth, columns
    predictions, index C = background; classes in sorted category-id order) and one :class:`ImageMatch`
    per image."""
    cat_ids = sorted(coco_gt.getCatIds())
    label_of = {c: i for i, c in enumerate(cat_ids)}
    background = len(cat_ids)
    counts = np.zeros((background + 1, background + 1), dtype=np.int64)
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        if r["score"] >= score_thr and r["category_id"] in label_of:
            by_image[int(r["image_id"])].append(r)
    matches = []
    for image_id in image_ids:
        anns = coco_gt.imgToAnns.get(int(image_id), [])
        gts = [a for a in anns if not a.get("iscrowd", 0)]
        crowd = _xyxy([a["bbox"] for a in anns if a.get("iscrowd", 0)])
        gt_labels = torch.tensor([label_of[a["category_id"]] for a in gts], dtype=torch.int64)
        dets = by_image.get(int(image_id), [])
        boxes, labels = _xyxy([d["bbox"] for d in dets]), torch.tensor([label_of[d["category_id"]] for d in dets],
                                                                       dtype=torch.int64)
        gt_match, det_match = match_detections(_xyxy([a["bbox"] for a in gts]), gt_labels, boxes,
                                               torch.tensor([d["score"] for d in dets]), labels, iou_thr)
        unmatched = (det_match < 0) & ~_inside(boxes, crowd, iou_thr)
        for g, label in enumerate(gt_labels.tolist()):
            counts[label, labels[gt_match[g]] if gt_match[g] >= 0 else background] += 1
        for d in np.flatnonzero(unmatched):
            counts[background, labels[d]] += 1
        found = sum(1 for g, d in enumerate(gt_match) if d >= 0 and labels[d] == gt_labels[g])
        matches.append(ImageMatch(int(image_id), len(gts), found, int((gt_match >= 0).sum()) - found,
                                  int((gt_match < 0).sum()), int(unmatched.sum())))
    return counts, matches


def row_normalized(counts: np.ndarray) -> np.ndarray:
    """Each row divided by its sum (rows without any count stay 0): for a class row, the diagonal is
    its recall at this operating point and the last column the share missed."""
    sums = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, sums, out=np.zeros(counts.shape, dtype=np.float64), where=sums > 0)


def lowest_recall(matches: Sequence[ImageMatch], coco_gt: Any, n: int = 20) -> list[dict[str, Any]]:
    """The ``n`` images with ground truth and the lowest recall (ties: more boxes first), with file names."""
    ranked = sorted((m for m in matches if m.num_gt), key=lambda m: (m.recall, -m.num_gt, m.image_id))[:n]
    return [{"file_name": coco_gt.imgs[m.image_id].get("file_name"), "recall": round(m.recall, 4), **asdict(m)}
            for m in ranked]


def plot_confusion(counts: np.ndarray, classes: Sequence[str], path: str | Path, iou_thr: float, score_thr: float,
                   title: str = "") -> Path:
    """Counts (left) and row-normalised shares (right) as heat maps; rows ground truth, columns predicted."""
    names = [*classes, "background"]
    n = len(names)
    side = min(max(3.2, 0.45 * n + 1.6), 16)
    fig = new_figure(2 * side + 0.6, side + 0.6)
    fig.suptitle(f"confusion matrix{f' - {title}' if title else ''}: IoU >= {iou_thr:g}, score >= {score_thr:g}")
    annotate = n <= 30
    for ax, values, name in zip(fig.subplots(1, 2), (counts, row_normalized(counts)),
                                ("counts", "row-normalised (rows sum to 1)")):
        shown = np.log1p(values) if values is counts else values  # a log scale keeps small counts visible
        ax.imshow(shown, cmap="Blues", vmin=0, vmax=max(float(shown.max()), 1e-9))
        ax.set_title(name)
        size = 10 if n <= 12 else 8 if n <= 30 else 5
        ax.set_xticks(range(n), names, rotation=90 if n > 6 else 45, ha="center" if n > 6 else "right", fontsize=size)
        ax.set_yticks(range(n), names, fontsize=size)
        ax.set(xlabel="predicted", ylabel="ground truth")
        if not annotate:
            continue
        top = float(shown.max()) or 1.0
        for (i, j), v in np.ndenumerate(values):
            if v:
                ax.text(j, i, f"{v:d}" if values is counts else f"{v:.2f}", ha="center", va="center",
                        fontsize=7 if n > 12 else 9, color="white" if shown[i, j] > 0.55 * top else "black")
    return save_figure(fig, path)
