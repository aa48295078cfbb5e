"""Where the AP goes: TIDE's six error types (Bolya et al., ECCV 2020), each as the AP50 gained by fixing it.

Matching is pycocotools' own (``COCOeval.evaluate`` at IoU ``fg_iou``, 100 detections per image per class,
COCO's area ranges), so the base AP of each class and size is exactly pycocotools' AP50 there. Every
false positive (not matched, not ignored) is then given one type, in the paper's order, from its IoUs
(``torchvision.ops.box_iou``) with the image's non-crowd ground truth, ``t_f = fg_iou``, ``t_b = bg_iou``:

- **Loc**: its best IoU with a box of its class is in ``[t_b, t_f]``;
- **Cls**: else its best IoU with a box of another class is ``>= t_f``;
- **Dupl**: else its best IoU with an already matched box of its class is ``>= t_f``;
- **Bkg**: else its best IoU with any box is ``<= t_b`` (also every detection in an image without boxes);
- **Both**: anything else (wrong class and poorly placed).

**Miss** is a ground-truth box no detection matched and no Cls/Loc error points at. The oracles, each
applied alone to the base result: Cls and Loc turn the error into a true positive of its target box's
class at its own score, if that box is unmatched and this is the highest-scoring Cls/Loc error on it
(the others on it are removed); Both, Dupl and Bkg remove the detection; Miss removes the box from the
ground truth. dAP = AP50 after the fix - AP50 before. Per size, pycocotools' area rules apply to the
fixed result too: a fix onto a box outside the size range is ignored there, as a match to it would be,
and an unmatched detection outside the range (which COCO ignores there) counts there once a Cls/Loc fix
matches it to a box inside the range.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torchvision.ops import box_iou

from detkit.analysis import AnalysisError, RunDataError
from detkit.analysis.bootstrap import CategoryMatches, MatchRecords, resampled_ap
from detkit.data.annotations import index_coco

#: Error types in the paper's order; the first five are detections, Miss is ground truth.
ERRORS = ("Cls", "Loc", "Both", "Dupl", "Bkg", "Miss")
#: pycocotools' default area ranges, in its order.
AREAS = ("all", "small", "medium", "large")
CLS, LOC, BOTH, DUPL, BKG, MISS = range(6)
TP = -1  # error code of a true positive


@dataclass
class TideReport:
    """dAP per size, error type and class, as fractions of AP (NaN: no ground truth there).

    ``ap (A, K)`` base AP50 per size (:data:`AREAS`) and class, ``ap_mean (A,)`` its mean over the classes
    with ground truth (COCO's rule); ``dap (A, E, K)`` and ``dap_mean (A, E)`` the same after fixing each
    of :data:`ERRORS` minus before; ``counts (A, E, K)`` errors of each type (detections by predicted
    class, Miss by the box's class); ``num_gt (A, K)`` non-crowd boxes in each size range.
    """

    classes: list[str]
    ap: np.ndarray
    ap_mean: np.ndarray
    dap: np.ndarray
    dap_mean: np.ndarray
    counts: np.ndarray
    num_gt: np.ndarray
    num_images: int
    fg_iou: float
    bg_iou: float
    max_dets: int = 100


@dataclass
class _Bucket:
    """One size range's detections that are not matched to an ignored box (``(D,)`` arrays in COCOeval's
    image/class/rank order; ``outside``: unmatched and outside the range, so in no AP list until a Cls/Loc
    fix matches them to a box in the range) and ground-truth counts ``gt``, ``miss (K, I)``."""

    cls: np.ndarray
    score: np.ndarray
    image: np.ndarray
    err: np.ndarray
    outside: np.ndarray
    fix_cls: np.ndarray  # class the Cls/Loc oracle makes it a true positive of; -1: the oracle removes it
    gt: np.ndarray
    miss: np.ndarray

    def errors(self, e: int) -> np.ndarray:
        """``(D,)`` the errors of type ``e`` that count in this range (an outside one only if fixed into it)."""
        return (self.err == e) & (~self.outside | (self.fix_cls >= 0))


def tide_errors(coco_gt: COCO | dict, detections: Sequence[dict[str, Any]], image_ids: Sequence[int] | None = None,
                fg_iou: float = 0.5, bg_iou: float = 0.1) -> TideReport:
    """TIDE dAP of COCO-format ``detections`` (``image_id``, ``category_id``, ``bbox`` xywh, ``score``: the
    results json of an evaluation) against ``coco_gt`` (a pycocotools ``COCO`` or a COCO dict), on
    ``image_ids`` (default: every image of ``coco_gt``). A bad argument raises :class:`AnalysisError`, a
    malformed detection :class:`RunDataError` and a malformed ground-truth dict ``DatasetError``."""
    if not 0.0 <= bg_iou < fg_iou <= 1.0:
        raise AnalysisError(f"TIDE thresholds need 0 <= bg_iou < fg_iou <= 1, got bg_iou={bg_iou}, fg_iou={fg_iou}")
    if isinstance(coco_gt, dict):  # pycocotools writes 'ignore' into the annotations: index a copy
        coco_gt = {**coco_gt, "annotations": [dict(a) if isinstance(a, dict) else a
                                              for a in coco_gt.get("annotations", [])]}
    if not isinstance(coco_gt, COCO):
        coco_gt = index_coco(coco_gt, "the ground truth")  # DatasetError naming what is wrong
    ids = sorted({int(i) for i in (coco_gt.getImgIds() if image_ids is None else image_ids)})
    if not ids:  # pycocotools reads an empty image list as every image
        raise AnalysisError("no images to analyse: the ground truth has none, or image_ids is empty")
    unknown = sorted(set(ids) - set(coco_gt.getImgIds()))
    if unknown:
        raise AnalysisError(f"image ids {unknown[:5]} are not images of the ground truth")
    coco_dt = _detections_coco(coco_gt, detections)
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.params.imgIds, ev.params.iouThrs, ev.params.maxDets = ids, np.array([fg_iou]), [100]
        ev.evaluate()
    cat_ids = list(ev.params.catIds)
    classes = [str(coco_gt.cats[c]["name"]) for c in cat_ids]
    shape = (len(AREAS), len(ERRORS), len(cat_ids))
    report = TideReport(classes, np.zeros(shape[::2]), np.zeros(len(AREAS)), np.zeros(shape),
                        np.zeros(shape[:2]), np.zeros(shape, dtype=np.int64), np.zeros(shape[::2], dtype=np.int64),
                        len(ids), fg_iou, bg_iou)
    images = [_image_boxes(coco_gt, coco_dt, i, cat_ids) for i in ids]
    rec_thrs = np.asarray(ev.params.recThrs, dtype=np.float64)
    for a in range(len(AREAS)):
        bucket = _bucket(ev, a, images, fg_iou, bg_iou)
        report.num_gt[a] = bucket.gt.sum(axis=1)
        report.counts[a, :MISS] = [np.bincount(bucket.cls[bucket.errors(e)], minlength=len(cat_ids))
                                   for e in range(MISS)]
        report.counts[a, MISS] = bucket.miss.sum(axis=1)
        report.ap[a] = _class_ap(bucket, bucket.cls, bucket.err == TP, ~bucket.outside, bucket.gt, rec_thrs)
        report.ap_mean[a] = _mean(report.ap[a])
        for e in range(len(ERRORS)):
            fixed = _class_ap(bucket, *_fix(bucket, e), rec_thrs)
            report.dap[a, e] = fixed - report.ap[a]
            report.dap_mean[a, e] = _mean(fixed) - report.ap_mean[a]
    return report


def _detections_coco(coco_gt: COCO, detections: Sequence[dict[str, Any]]) -> COCO:
    """The detections as a pycocotools ``COCO`` (ids 1..N in list order, ``area`` = box area, as
    ``loadRes`` makes them), after checking each one (:class:`RunDataError`: bad data, not a bad argument);
    the caller's dicts are not changed."""
    if not isinstance(detections, (list, tuple)):
        raise RunDataError(f"detections must be a list of COCO results, got a {type(detections).__name__}")
    anns = []
    for n, det in enumerate(detections):
        where = f"detection {n}"
        if not isinstance(det, dict) or not {"image_id", "category_id", "bbox", "score"} <= det.keys():
            raise RunDataError(f"{where}: needs image_id, category_id, bbox [x, y, w, h] and score, got {det!r}")
        box, score = det["bbox"], det["score"]
        if (not isinstance(box, (list, tuple)) or len(box) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (*box, score))
                or box[2] < 0 or box[3] < 0):
            raise RunDataError(f"{where}: bbox must be 4 finite numbers [x, y, w, h] with w, h >= 0 and score "
                                f"a finite number, got bbox {box!r}, score {score!r}")
        if not isinstance(det["image_id"], int) or det["image_id"] not in coco_gt.imgs:
            raise RunDataError(f"{where}: image_id {det['image_id']!r} is not an image of the ground truth; were "
                                f"these results made on another annotation file?")
        if not isinstance(det["category_id"], int) or det["category_id"] not in coco_gt.cats:
            raise RunDataError(f"{where}: category_id {det['category_id']!r} is not a category of the ground "
                                f"truth (ids {sorted(coco_gt.cats)})")
        anns.append({"id": n + 1, "image_id": det["image_id"], "category_id": det["category_id"],
                     "bbox": [float(v) for v in box], "score": float(score), "area": float(box[2] * box[3]),
                     "iscrowd": 0})
    return index_coco({"images": coco_gt.dataset["images"], "categories": coco_gt.dataset["categories"],
                       "annotations": anns}, "the detections")


def _xyxy(anns: Sequence[dict[str, Any]]) -> torch.Tensor:
    boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64).reshape(-1, 4)
    return torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)


def _image_boxes(coco_gt: COCO, coco_dt: COCO, image_id: int, cat_ids: Sequence[int]) -> dict[str, Any]:
    """One image's non-crowd boxes (``gt_ids``, ``gt_cls (G,)``) and ``iou (N, G)`` of all its detections
    (row ``row[det id]``) with them."""
    gts = [g for g in coco_gt.imgToAnns.get(image_id, []) if not g.get("iscrowd", 0)]
    dets = coco_dt.imgToAnns.get(image_id, [])
    label = {c: k for k, c in enumerate(cat_ids)}
    return {"gt_ids": [g["id"] for g in gts], "gt_cls": np.array([label[g["category_id"]] for g in gts], dtype=int),
            "row": {d["id"]: r for r, d in enumerate(dets)},
            "iou": box_iou(_xyxy(dets), _xyxy(gts)).numpy()}


def _bucket(ev: COCOeval, a: int, images: Sequence[dict[str, Any]], fg: float, bg: float) -> _Bucket:
    """Classify size range ``a``'s unmatched detections and missed boxes (module docstring), image by image."""
    num_cls, num_areas, num_img = len(ev.params.catIds), len(ev.params.areaRng), len(images)
    gt, miss = np.zeros((num_cls, num_img)), np.zeros((num_cls, num_img), dtype=np.int64)
    parts: list[tuple[np.ndarray, ...]] = []
    for i, box in enumerate(images):
        columns: list[tuple[np.ndarray, ...]] = []
        used, in_range = set(), set()
        for k in range(num_cls):
            e = ev.evalImgs[(k * num_areas + a) * num_img + i]
            if e is None:  # neither boxes nor detections of class k here
                continue
            ignored, matched = np.asarray(e["dtIgnore"], dtype=bool)[0], np.asarray(e["dtMatches"])[0] != 0
            take = ~(ignored & matched)  # matched to a crowd box or one outside the range: counts nowhere
            columns.append((np.asarray(e["dtIds"], dtype=np.int64)[take], np.full(int(take.sum()), k),
                            np.asarray(e["dtScores"], dtype=np.float64)[take], (matched & ~ignored)[take],
                            (ignored & ~matched)[take]))
            gt_ids, gt_matches, ignore = (np.asarray(e[key]).reshape(-1) for key in ("gtIds", "gtMatches", "gtIgnore"))
            used |= set(gt_ids[gt_matches != 0].tolist())
            in_range |= set(gt_ids[ignore == 0].tolist())
            gt[k, i] = np.count_nonzero(ignore == 0)
        det_ids, det_cls, score, tp, outside = (np.concatenate([c[j] for c in columns]) if columns
                                                else np.zeros(0, dtype=np.int64) for j in range(5))
        gt_used = np.array([g in used for g in box["gt_ids"]], dtype=bool)
        gt_in = np.array([g in in_range for g in box["gt_ids"]], dtype=bool)
        iou = box["iou"][[box["row"][d] for d in det_ids.tolist()]].reshape(len(det_ids), len(gt_used))
        err, target = _classify(iou, det_cls, box["gt_cls"], gt_used, tp.astype(bool), fg, bg)
        # BestGTMatch: per unmatched target box, only the highest-scoring Cls/Loc error on it is fixed
        aimed = np.flatnonzero((err == CLS) | (err == LOC))
        aimed = aimed[~gt_used[target[aimed]]]
        aimed = aimed[np.argsort(-score[aimed], kind="stable")]
        winners = aimed[np.unique(target[aimed], return_index=True)[1]]
        fix_cls = np.full(len(err), -1)
        fix_cls[winners] = np.where(gt_in[target[winners]], box["gt_cls"][target[winners]], -1)
        usable = np.zeros(len(gt_used), dtype=bool)
        usable[target[aimed]] = True
        miss[:, i] = np.bincount(box["gt_cls"][gt_in & ~gt_used & ~usable], minlength=num_cls)
        parts.append((det_cls, score, np.full(len(err), i), err, outside, fix_cls))
    cls, score, image, err, outside, fix_cls = (np.concatenate([p[j] for p in parts]) for j in range(6))
    return _Bucket(cls.astype(int), score.astype(float), image.astype(int), err.astype(int), outside.astype(bool),
                   fix_cls.astype(int), gt, miss)


def _classify(iou: np.ndarray, det_cls: np.ndarray, gt_cls: np.ndarray, gt_used: np.ndarray, tp: np.ndarray,
              fg: float, bg: float) -> tuple[np.ndarray, np.ndarray]:
    """``iou (D, G)`` -> error code per detection (:data:`TP` for matched ones) and the index of the box a
    Cls/Loc error points at (0 otherwise), in the paper's order."""
    num_det = len(det_cls)
    if iou.shape[1] == 0:  # an image without boxes: every unmatched detection is background
        return np.where(tp, TP, BKG), np.zeros(num_det, dtype=int)
    same = det_cls[:, None] == gt_cls[None, :]
    own, other = np.where(same, iou, 0.0), np.where(same, 0.0, iou)
    rows = np.arange(num_det)
    loc_t, cls_t = own.argmax(axis=1), other.argmax(axis=1)
    loc_v, cls_v = own[rows, loc_t], other[rows, cls_t]
    dupl_v = np.where(same & gt_used[None, :], iou, 0.0).max(axis=1)
    err = np.select([tp, (bg <= loc_v) & (loc_v <= fg), cls_v >= fg, dupl_v >= fg, iou.max(axis=1) <= bg],
                    [TP, LOC, CLS, DUPL, BKG], BOTH)
    return err, np.where(err == LOC, loc_t, cls_t)


def _fix(b: _Bucket, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(cls, tp, keep (D,), gt (K, I))`` after the oracle of error type ``e`` alone."""
    cls, tp, keep, gt, hit = b.cls, b.err == TP, ~b.outside, b.gt, b.err == e
    if e in (CLS, LOC):
        cls, tp, keep = np.where(hit, b.fix_cls, b.cls), tp | hit, np.where(hit, b.fix_cls >= 0, keep)
    elif e == MISS:
        gt = b.gt - b.miss
    else:
        keep = keep & ~hit
    return cls, tp, keep, gt


def _class_ap(b: _Bucket, cls: np.ndarray, tp: np.ndarray, keep: np.ndarray, gt: np.ndarray,
              rec_thrs: np.ndarray) -> np.ndarray:
    """``(K,)`` AP50 per class as ``COCOeval.accumulate`` computes it (NaN without ground truth)."""
    out = np.full(len(gt), np.nan)
    ones = np.ones((1, gt.shape[1]), dtype=np.int64)
    for k in range(len(gt)):
        sel = np.flatnonzero(keep & (cls == k))
        sel = sel[np.argsort(-b.score[sel], kind="mergesort")]  # stable on image order, as accumulate()
        cat = CategoryMatches(b.image[sel], tp[sel][None], ~tp[sel][None], gt[k])
        out[k] = resampled_ap(MatchRecords(list(range(gt.shape[1])), [cat], rec_thrs), ones)[0]
    return out


def _mean(values: np.ndarray) -> float:
    """Mean over the classes with ground truth (NaN when none has any), as COCO's summary."""
    valid = values[~np.isnan(values)]
    return float(valid.mean()) if valid.size else float("nan")
