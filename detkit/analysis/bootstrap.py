"""COCO AP on bootstrap resamples of the val images, from one COCOeval matching per run.

COCOeval's per-image matching (``evaluate()``) does not depend on which other images are evaluated, so a
resample (val images drawn with replacement) only changes how often each image's match records count.
:func:`match_records_by_area` runs the matching once; :func:`resampled_ap` then recomputes, for many resamples at
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


#: COCOeval's area ranges, in the order of ``params.areaRngLbl``.
AREAS = ("all", "small", "medium", "large")


def match_records_by_area(coco_gt: COCO, results: list[dict[str, Any]], image_ids: Sequence[int]
                          ) -> dict[str, MatchRecords]:
    """Run pycocotools' ``evaluate()`` once (bbox, its default parameters) on ``image_ids`` and keep, per area
    of :data:`AREAS` and category, what ``accumulate()`` reads for that area and 100 detections per image."""
    ids = sorted({int(i) for i in image_ids})
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)) if results else COCO(), iouType="bbox")
        ev.params.imgIds = ids
        if results:
            ev.evaluate()
    p = ev.params
    num_areas, rec_thrs = len(p.areaRng), np.asarray(p.recThrs, dtype=np.float64)
    by_area = {}
    for a, name in enumerate(AREAS):
        categories = []
        for k, cat_id in enumerate(p.catIds):
            start = (k * num_areas + a) * len(ids)
            if results:
                per_image = ev.evalImgs[start: start + len(ids)]
                categories.append(_category_matches(per_image, p.maxDets[-1], len(p.iouThrs)))
            else:  # no detections: the ground truth still counts (AP 0 for the category)
                categories.append(_ground_truth_only(coco_gt, ids, cat_id, p.areaRng[a], len(p.iouThrs)))
        by_area[name] = MatchRecords(ids, categories, rec_thrs)
    return by_area


def _category_matches(per_image: Sequence[dict[str, Any] | None], max_det: int, num_thrs: int) -> CategoryMatches:
    """One category's ``evalImgs`` entries (one per image, None where it has neither boxes nor detections)
    -> its detections in ``accumulate()``'s score order."""
    gt = np.zeros(len(per_image))
    scores, image, matched, ignored = [], [], [], []
    for i, e in enumerate(per_image):
        if e is None:
            continue
        gt[i] = np.count_nonzero(np.asarray(e["gtIgnore"]) == 0)
        scores.append(np.asarray(e["dtScores"][:max_det], dtype=np.float64))
        image.append(np.full(len(scores[-1]), i))
        matched.append(np.asarray(e["dtMatches"])[:, :max_det])
        ignored.append(np.asarray(e["dtIgnore"])[:, :max_det].astype(bool))
    if not scores:
        empty = np.zeros((num_thrs, 0), dtype=bool)
        return CategoryMatches(np.zeros(0, dtype=np.int64), empty, empty, gt)
    order = np.argsort(-np.concatenate(scores), kind="mergesort")  # as accumulate(): stable on image order
    dtm = np.concatenate(matched, axis=1)[:, order]
    dt_ignored = np.concatenate(ignored, axis=1)[:, order]
    tp, fp = (dtm != 0) & ~dt_ignored, (dtm == 0) & ~dt_ignored
    # a detection ignored at every IoU threshold (matched to a crowd box, or outside the area range) moves
    # neither count: accumulate()'s precision at recall thresholds is the same without it, and dropping it
    # makes the small / medium / large records a fraction of the size
    keep = (tp | fp).any(axis=0)
    return CategoryMatches(np.concatenate(image)[order][keep], tp[:, keep], fp[:, keep], gt)


def _ground_truth_only(coco_gt: COCO, ids: Sequence[int], cat_id: int, area_range: Sequence[float],
                       num_thrs: int) -> CategoryMatches:
    """A category without detections: per image its boxes that COCOeval does not ignore (not crowd, the
    area inside ``area_range``)."""
    gt = np.array([sum(1 for ann in coco_gt.loadAnns(coco_gt.getAnnIds(imgIds=[i], catIds=[cat_id], iscrowd=False))
                       if area_range[0] <= ann["area"] <= area_range[1]) for i in ids], dtype=np.float64)
    empty = np.zeros((num_thrs, 0), dtype=bool)
    return CategoryMatches(np.zeros(0, dtype=np.int64), empty, empty, gt)


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


def resampled_category_ap(records: MatchRecords, counts: np.ndarray) -> np.ndarray:
    """``(C, B)`` each category's AP (0.5:0.95, the records' area, 100 detections) on each resample of
    ``counts (B, I)``; NaN where a resample holds no ground truth of it (COCOeval's -1)."""
    out = np.full((len(records.categories), len(counts)), np.nan)
    for k, cat in enumerate(records.categories):
        chunk = max(1, CHUNK_VALUES // max(1, cat.tp.size))
        for start in range(0, len(counts), chunk):
            out[k, start: start + chunk] = _category_precision(cat, counts[start: start + chunk],
                                                               records.rec_thrs).mean(axis=(1, 2))
    return out


def mean_over_categories(per_category: np.ndarray) -> np.ndarray:
    """``(C, B) -> (B,)``: COCO's mean over the categories with ground truth; NaN where none has any."""
    valid = ~np.isnan(per_category)
    count = valid.sum(axis=0)
    return np.where(count > 0, np.nansum(per_category, axis=0) / np.maximum(count, 1), np.nan)


def resampled_ap(records: MatchRecords, counts: np.ndarray, categories: Sequence[int] | None = None) -> np.ndarray:
    """``(B,)`` COCO AP (0.5:0.95, the records' area, 100 detections) on each resample of ``counts (B, I)``,
    over ``categories`` (indices into ``records.categories``; default all): ``counts`` all ones gives
    COCOeval's AP. NaN where a resample holds no ground truth of them at all."""
    chosen = records if categories is None else MatchRecords(records.image_ids, [records.categories[k] for k in
                                                                                 categories], records.rec_thrs)
    return mean_over_categories(resampled_category_ap(chosen, counts))


def resample_seeds(num_seeds: int, resamples: int, seed: int) -> np.ndarray:
    """``(resamples, num_seeds)``: which seeds (indices, drawn with replacement) each resample averages over,
    ``np.random.default_rng((seed, 1)).integers(0, num_seeds, (resamples, num_seeds))``."""
    return np.random.default_rng((seed, 1)).integers(0, num_seeds, (resamples, num_seeds))


def paired_difference(base: Sequence[np.ndarray], other: Sequence[np.ndarray], level: float = 0.95,
                      seed_draws: np.ndarray | None = None) -> dict[str, Any]:
    """The difference of seed-mean AP, ``other - base``, from per-seed AP arrays ``(B + 1,)`` whose first
    entry is the full val set and the rest the resamples (the same resamples for every run); seed ``k`` of
    ``base`` pairs with seed ``k`` of ``other``.

    ``seed_draws (B, S)`` (:func:`resample_seeds`): resample ``b`` averages the paired differences of the
    seeds ``seed_draws[b]``, so the interval covers the training seeds as well as the val images (a
    two-way bootstrap); None averages every seed on every resample (the val images alone).
    Returns ``diff`` (full val set, every seed), ``low``/``high`` (percentile interval at ``level`` of the
    resampled differences) and ``verdict``.
    """
    per_seed = np.stack(other) - np.stack(base)  # (S, B + 1)
    resampled = per_seed[:, 1:]
    if seed_draws is not None:
        resampled = np.take_along_axis(resampled, seed_draws.T, axis=0)
    tail = 100 * (1 - level) / 2
    low, high = np.nanpercentile(resampled.mean(axis=0), [tail, 100 - tail])
    return {"diff": float(per_seed[:, 0].mean()), "low": float(low), "high": float(high), "verdict": verdict(low, high)}


def verdict(low: float, high: float) -> str:
    """``better`` / ``worse`` when the interval of ``other - base`` excludes 0, else not distinguishable."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "not distinguishable at this data size"
