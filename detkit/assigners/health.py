"""Assigner health: how many positives each ground-truth box gets from an assigner, and which get none.

A box without a positive prior contributes nothing to the classification or box loss: the detector
cannot learn it. :func:`assigner_health` (dense assigners: FCOS, ATSS, any :class:`DenseAssigner`)
and :func:`centernet_health` run the assigner exactly as the head's loss does, on the whole batch on
its device, and count per GT; :class:`HealthAccumulator` sums batches into a JSON-ready summary.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
from torch import Tensor

from detkit.assigners.base import DenseAssigner
from detkit.assigners.centernet import CenterNetAssigner
from detkit.ops.priors import Priors

#: COCO's small / medium / large boundaries on sqrt(box area), pixels.
COCO_SIZES = (32, 96)
SIZE_NAMES = ("small", "medium", "large")


class HealthStats(NamedTuple):
    """One batch: ``positives (B, G)`` int64 positive priors credited to each GT row; ``mask (B, G)`` the
    real (not padding) rows; ``counted (B, G)`` the rows that count: real, and not an exact copy of an
    earlier row of the image (a copy has its twin's targets, so the twin gets the positives);
    ``labels (B, G)``; ``areas (B, G)`` box areas in input pixels (after the transforms);
    ``level_positives (B, L)`` int64 positive priors per FPN level (all of them: it sums to
    ``positives.sum()``)."""

    positives: Tensor
    mask: Tensor
    counted: Tensor
    labels: Tensor
    areas: Tensor
    level_positives: Tensor


def first_copies(gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor) -> Tensor:
    """``(B, G)`` real rows that are not an exact copy (box and label) of an earlier real row."""
    same = ((gt_boxes.unsqueeze(2) == gt_boxes.unsqueeze(1)).all(-1)
            & (gt_labels.unsqueeze(2) == gt_labels.unsqueeze(1)) & gt_mask.unsqueeze(2) & gt_mask.unsqueeze(1))
    earlier = torch.ones_like(same[0]).tril(-1)  # [j, i]: row i comes before row j
    return gt_mask & ~(same & earlier).any(-1)


def box_areas(gt_boxes: Tensor) -> Tensor:
    """``(B, G, 4)`` x1y1x2y2 -> ``(B, G)`` areas."""
    return (gt_boxes[..., 2] - gt_boxes[..., 0]).clamp(min=0) * (gt_boxes[..., 3] - gt_boxes[..., 1]).clamp(min=0)


@torch.no_grad()
def assigner_health(assigner: DenseAssigner, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor,
                    num_classes: int, max_elements: int = 1 << 24) -> HealthStats:
    """Run a dense ``assigner`` on ``priors`` and padded GT ``boxes (B, G, 4)``, ``labels (B, G)``,
    ``mask (B, G)`` as the head's loss does (no predictions), and credit each positive prior to the GT
    whose box and label it was assigned (:class:`AssignResult` carries no GT index). The ``(B, P, G)``
    comparison runs in chunks of priors, ``max_elements`` entries each."""
    assigned = assigner(priors, gt_boxes, gt_labels, gt_mask, num_classes)
    counted = first_copies(gt_boxes, gt_labels, gt_mask)
    batch, num_gt = gt_labels.shape
    positives = torch.zeros(batch, num_gt, dtype=torch.int64, device=gt_boxes.device)
    chunk = max(1, max_elements // max(batch * num_gt, 1))
    for start in range(0, len(priors.points), chunk):
        part = slice(start, start + chunk)
        match = ((assigned.boxes[:, part].unsqueeze(2) == gt_boxes.unsqueeze(1)).all(-1)
                 & (assigned.labels[:, part].unsqueeze(2) == gt_labels.unsqueeze(1))
                 & assigned.positive[:, part].unsqueeze(2) & counted.unsqueeze(1))  # (B, p, G)
        positives += match.sum(1)
    levels = torch.zeros(batch, len(priors.sizes), dtype=torch.int64, device=gt_boxes.device)
    levels.index_add_(1, priors.levels, assigned.positive.long())
    return HealthStats(positives, gt_mask, counted, gt_labels, box_areas(gt_boxes), levels)


@torch.no_grad()
def centernet_health(assigner: CenterNetAssigner, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor,
                     num_classes: int, map_size: tuple[int, int]) -> HealthStats:
    """CenterNet's positives: an object's centre cell on its class's heatmap, one per object. An object
    the assigner drops (centre off the map, zero size) has none, and so has one whose centre cell its
    class already took for an earlier object (a collision: one peak, one box for both). One level."""
    targets = assigner(gt_boxes, gt_labels, gt_mask, num_classes, map_size)
    counted = first_copies(gt_boxes, gt_labels, gt_mask)
    kept = targets["mask"] & counted
    same_cell = ((targets["index"].unsqueeze(2) == targets["index"].unsqueeze(1))
                 & (gt_labels.unsqueeze(2) == gt_labels.unsqueeze(1)) & kept.unsqueeze(2) & kept.unsqueeze(1))
    collided = (same_cell & torch.ones_like(same_cell[0]).tril(-1)).any(-1)
    positives = (kept & ~collided).long()
    return HealthStats(positives, gt_mask, counted, gt_labels, box_areas(gt_boxes), positives.sum(1, keepdim=True))


def size_class(areas: np.ndarray) -> np.ndarray:
    """Areas -> 0 small (< 32^2), 1 medium (< 96^2), 2 large."""
    return np.digitize(areas, [s * s for s in COCO_SIZES])


class HealthAccumulator:
    """Per-image health of many batches (an image seen twice counts once: DDP samplers repeat images),
    summarised by :meth:`summary` and :meth:`log_line`. ``classes``: names by label; ``strides``: one per
    level; ``assigner``: its name, for the summary."""

    def __init__(self, classes: Sequence[str], strides: Sequence[int], assigner: str = "") -> None:
        self.classes, self.strides, self.assigner = list(classes), list(strides), assigner
        self.images: dict[Any, tuple[Any, ...]] = {}  # id -> positives, labels, areas, level counts, copies

    def add(self, stats: HealthStats, image_ids: Sequence[Any]) -> None:
        """Keep each image's counted GTs ``(positives, labels, areas)`` and its per-level positives."""
        positives, mask, counted, labels, areas, levels = (t.cpu().numpy() for t in stats)
        for i, image_id in enumerate(image_ids):
            if image_id not in self.images:
                keep = counted[i]
                self.images[image_id] = (positives[i][keep], labels[i][keep], areas[i][keep], levels[i],
                                         np.int64((mask[i] & ~keep).sum()))

    def merge(self, others: Sequence["HealthAccumulator"]) -> None:
        """Add the images of ``others`` (other ranks) not seen here."""
        for other in others:
            for image_id, row in other.images.items():
                self.images.setdefault(image_id, row)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        rows = list(self.images.values())
        if not rows:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), np.zeros(len(self.strides), np.int64)
        return (np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows]),
                np.concatenate([r[2] for r in rows]), np.sum([r[3] for r in rows], axis=0))

    def summary(self) -> dict[str, Any]:
        """JSON-ready: positives per GT (mean, min, max, histogram), GTs without positives by size and
        class, per size and class the GT count and mean positives, positives per level (by stride)."""
        positives, labels, areas, levels = self._arrays()
        sizes = size_class(areas)
        zero = positives == 0

        def group(select: np.ndarray) -> dict[str, Any]:
            n = int(select.sum())
            return {"gts": n, "without_positives": int((zero & select).sum()),
                    "mean_positives": round(float(positives[select].mean()), 2) if n else None}

        counts = np.bincount(positives) if len(positives) else np.zeros(0, np.int64)
        return {
            "assigner": self.assigner, "images": len(self.images), "gts": len(positives),
            "positives": int(levels.sum()),
            "positives_per_gt": {"mean": round(float(positives.mean()), 3) if len(positives) else None,
                                 "min": int(positives.min()) if len(positives) else None,
                                 "max": int(positives.max()) if len(positives) else None,
                                 "histogram": {str(k): int(n) for k, n in enumerate(counts) if n}},
            "gts_without_positives": {"total": int(zero.sum()),
                                      **{name: int((zero & (sizes == k)).sum()) for k, name in enumerate(SIZE_NAMES)},
                                      "by_class": {c: int((zero & (labels == k)).sum())
                                                   for k, c in enumerate(self.classes)}},
            "by_size": {name: group(sizes == k) for k, name in enumerate(SIZE_NAMES)},
            "by_class": {c: group(labels == k) for k, c in enumerate(self.classes)},
            "positives_per_level": {f"stride {s}": int(n) for s, n in zip(self.strides, levels)},
            "exact_duplicate_gts": int(sum(int(r[4]) for r in self.images.values())),
            "size_basis": "COCO small/medium/large by the box area the model sees (after the transforms, "
                          "input pixels), not the original image's",
        }

    def log_line(self) -> str:
        """``assigner health: 0.9 positives/GT (min 0), 12 GTs without positives (small 12, medium 0, large 0)``."""
        s = self.summary()
        zero, per_gt = s["gts_without_positives"], s["positives_per_gt"]
        classes = ", ".join(f"{c} {n}" for c, n in zero["by_class"].items() if n)
        mean, low = ("-", "-") if per_gt["mean"] is None else (f"{per_gt['mean']:.1f}", per_gt["min"])
        return (f"assigner health: {mean} positives/GT (min {low}), {zero['total']} of {s['gts']} GTs "
                f"without positives (" + ", ".join(f"{n} {zero[n]}" for n in SIZE_NAMES)
                + (f"; {classes}" if classes else "") + "), positives per level "
                + " ".join(f"{k.split()[1]}:{n}" for k, n in s["positives_per_level"].items()))
