"""COCO AP on bootstrap resamples of the val images, from one COCOeval matching per run.

COCOeval's per-image matching (``evaluate()``) does not depend on which other images are evaluated, so a
resample (val images drawn with replacement) only changes how often each image's match records count.
:func:`match_records` runs the matching once; :func:`resampled_ap` then recomputes, for many resamples at
once, what ``COCOeval.accumulate`` + ``summarize`` give for AP (IoU 0.5:0.95, area all, 100 detections)
on the dataset in which image ``i`` appears ``counts[i]`` times: cumulative true/false positives
weighted by the counts, 101-point interpolated precision, the mean over IoU thresholds and the
categories with ground truth in the resample.
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

#: Values held in memory at once per category: (resamples in a chunk) x (IoU thresholds) x (detections).
CHUNK_VALUES = 4_000_000


@dataclass
class CategoryMatches:
    """One category's detections (area all, at most 100 per image) in COCOeval's score order.

    ``image (D,)`` index of each detection's image in ``MatchRecords.image_ids``; ``tp``, ``fp (T, D)``
    whether it matches a ground-truth box (not ignored) at each IoU threshold, or matches none (and is
    not ignored); ``gt (I,)`` the non-ignored ground-truth boxes of each image.
    """

    image: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    gt: np.ndarray


@dataclass
class MatchRecords:
    """The per-image matches of one run's results against the val annotations."""

    image_ids: list[int]
    categories: list[CategoryMatches]
    rec_thrs: np.ndarray


def match_records(coco_gt: COCO, results: list[dict[str, Any]], image_ids: Sequence[int]) -> MatchRecords:
    """Run pycocotools' ``evaluate()`` once (bbox, its default parameters) on ``image_ids`` and keep,
    per category, what ``accumulate()`` reads for area ``all`` and 100 detections per image."""
    ids = sorted({int(i) for i in image_ids})
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)) if results else COCO(), iouType="bbox")
        ev.params.imgIds = ids
        if results:
            ev.evaluate()
    p = ev.params
    max_det, num_thrs, num_areas = p.maxDets[-1], len(p.iouThrs), len(p.areaRng)
    categories = []
    for k in range(len(p.catIds)):
        per_image = ev.evalImgs[k * num_areas * len(ids): k * num_areas * len(ids) + len(ids)] if results else []
        gt = np.zeros(len(ids))
        scores, image, matched, ignored = [], [], [], []
        for i, e in enumerate(per_image):
            if e is None:
                continue
            gt[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
            scores.append(np.asarray(e["dtScores"][:max_det], dtype=np.float64))
            image.append(np.full(len(scores[-1]), i))
            matched.append(np.asarray(e["dtMatches"])[:, :max_det])
            ignored.append(np.asarray(e["dtIgnore"])[:, :max_det].astype(bool))
        if not results:  # no detections: the ground truth still counts (AP 0 for the category)
            gt = np.array([len(coco_gt.getAnnIds(imgIds=[i], catIds=[p.catIds[k]], iscrowd=False)) for i in ids],
                          dtype=np.float64)
        if not scores:
            empty = np.zeros((num_thrs, 0), dtype=bool)
            categories.append(CategoryMatches(np.zeros(0, dtype=np.int64), empty, empty, gt))
            continue
        order = np.argsort(-np.concatenate(scores), kind="mergesort")  # as accumulate(): stable on image order
        dtm = np.concatenate(matched, axis=1)[:, order]
        dt_ignored = np.concatenate(ignored, axis=1)[:, order]
        categories.append(CategoryMatches(np.concatenate(image)[order], (dtm != 0) & ~dt_ignored,
                                          (dtm == 0) & ~dt_ignored, gt))
    return MatchRecords(ids, categories, np.asarray(p.recThrs, dtype=np.float64))


def resample_counts(num_images: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, num_images)`` how often each image is drawn: row ``b`` counts the indices
    ``np.random.default_rng(seed).integers(0, num_images, (resamples, num_images))[b]``."""
    draws = np.random.default_rng(seed).integers(0, num_images, (resamples, num_images))
    offsets = np.arange(resamples)[:, None] * num_images
    return np.bincount((draws + offsets).ravel(), minlength=resamples * num_images).reshape(resamples, num_images)


def _category_precision(cat: CategoryMatches, counts: np.ndarray, rec_thrs: np.ndarray) -> np.ndarray:
    """``(B, T, R)`` interpolated precision of one category on ``B`` resamples; NaN rows where the
    resample holds no ground truth of it (COCOeval's -1, left out of the mean)."""
    num_resamples, num_thrs, num_dets = len(counts), cat.tp.shape[0], cat.tp.shape[1]
    num_gt = counts @ cat.gt  # (B,)
    out = np.zeros((num_resamples, num_thrs, len(rec_thrs)))
    out[num_gt == 0] = np.nan
    if num_dets == 0:
        return out
    weight = counts[:, cat.image].astype(np.float64)[:, None, :]  # (B, 1, D): copies of a detection count each
    tp = np.cumsum(weight * cat.tp, axis=2)
    fp = np.cumsum(weight * cat.fp, axis=2)
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / num_gt[:, None, None]
    precision = tp / (fp + tp + np.spacing(1))
    precision = np.maximum.accumulate(precision[..., ::-1], axis=2)[..., ::-1]  # the envelope from the right
    for b in np.flatnonzero(num_gt > 0):
        for t in range(num_thrs):  # searchsorted row by row: the exact comparisons accumulate() makes
            found = np.searchsorted(recall[b, t], rec_thrs, side="left")
            inside = found < num_dets
            out[b, t, inside] = precision[b, t, found[inside]]
    return out


def resampled_ap(records: MatchRecords, counts: np.ndarray) -> np.ndarray:
    """``(B,)`` COCO AP (0.5:0.95, area all, 100 detections) on each resample of ``counts (B, I)``;
    ``counts`` all ones gives COCOeval's AP. NaN where a resample holds no ground truth at all."""
    num_resamples = len(counts)
    total = np.zeros(num_resamples)
    valid = np.zeros(num_resamples)
    for cat in records.categories:
        chunk = max(1, CHUNK_VALUES // max(1, cat.tp.size))
        for start in range(0, num_resamples, chunk):
            part = _category_precision(cat, counts[start: start + chunk], records.rec_thrs)
            has_gt = ~np.isnan(part[:, 0, 0])
            total[start: start + chunk] += np.where(has_gt, np.nan_to_num(part).mean(axis=(1, 2)), 0.0)
            valid[start: start + chunk] += has_gt
    with np.errstate(invalid="ignore"):
        return np.where(valid > 0, total / np.maximum(valid, 1), np.nan)


def paired_difference(base: Sequence[np.ndarray], other: Sequence[np.ndarray], level: float = 0.95
                      ) -> dict[str, Any]:
    """The difference of seed-mean AP, ``other - base``, from per-seed AP arrays ``(B + 1,)`` whose first
    entry is the full val set and the rest the resamples (the same resamples for every run).

    Returns ``diff`` (full val set), ``low``/``high`` (percentile interval at ``level`` of the
    resampled differences) and ``verdict``.
    """
    diffs = np.mean(np.stack(other), axis=0) - np.mean(np.stack(base), axis=0)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(diffs[1:], [tail, 100 - tail])
    return {"diff": float(diffs[0]), "low": float(low), "high": float(high), "verdict": verdict(low, high)}


def verdict(low: float, high: float) -> str:
    """``better`` / ``worse`` when the interval of ``other - base`` excludes 0, else not distinguishable."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "not distinguishable at this data size"
