"""COCO bbox evaluation with pycocotools, on predictions mapped back to original image pixels."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from detkit.data.class_map import keep_categories, match_classes
from detkit.distributed import all_gather_objects, get_rank, is_distributed
from detkit.engine.precision import autocast
from detkit.engine.run_log import progress
from detkit.engine.settings import section_settings
from detkit.ops.tiles import TileSettings, sliced_predict
from detkit.registry import ConfigError

logger = logging.getLogger("detkit")

SUMMARY_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
BACKENDS = ("pycocotools", "faster_coco_eval")


def to_original_coords(det: dict[str, Tensor], scale_factor: Tensor, orig_size: Sequence[int]) -> dict[str, Tensor]:
    """One image's detections in transformed-image pixels -> CPU float copies in original pixels.

    Boxes ``(n, 4)`` are divided by ``(sx, sy)`` and clipped to ``orig_size`` ``(h, w)``.
    """
    sx, sy = float(scale_factor[0]), float(scale_factor[1])
    out = det["boxes"].float().cpu() / torch.tensor([sx, sy, sx, sy])
    h, w = int(orig_size[0]), int(orig_size[1])
    boxes = torch.stack([out[:, 0].clamp(0, w), out[:, 1].clamp(0, h), out[:, 2].clamp(0, w),
                         out[:, 3].clamp(0, h)], dim=1)
    return {"boxes": boxes, "scores": det["scores"].float().cpu(), "labels": det["labels"].cpu()}


def coco_results(predictions: Sequence[dict[str, Tensor]], image_ids: Sequence[int],
                 cat_ids: Sequence[int] | Mapping[int, int]) -> list[dict[str, Any]]:
    """Per-image predictions (original pixels) -> COCO results list (``bbox`` as xywh). ``cat_ids``: the
    category id of each model label, a list (label ``i`` -> ``cat_ids[i]``) or a ``{label: id}`` mapping;
    detections of other labels have no category to be scored in and are left out."""
    cat_of = cat_ids if isinstance(cat_ids, Mapping) else dict(enumerate(cat_ids))
    results = []
    for pred, image_id in zip(predictions, image_ids):
        boxes = pred["boxes"].tolist()
        for (x1, y1, x2, y2), score, label in zip(boxes, pred["scores"].tolist(), pred["labels"].tolist()):
            if int(label) not in cat_of:
                continue
            results.append({"image_id": int(image_id), "category_id": int(cat_of[int(label)]),
                            "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                            "score": round(float(score), 5)})
    return results


@dataclass
class EvalClasses:
    """What an evaluation scores: ``cat_of`` maps each model label to its category id in the dataset,
    ``coco`` is the ground truth of the categories both have, ``classes`` their names in sorted-id
    order (COCOeval's class axis), ``left_out`` the sentence naming the rest ('' when nothing is)."""

    cat_of: dict[int, int]
    coco: COCO
    classes: list[str]
    left_out: str = ""


def eval_classes(dataset: Any, model_classes: Sequence[str] | None, num_model_classes: int | None,
                 model_source: str, dataset_source: str = "data.val") -> EvalClasses:
    """Model labels matched to ``dataset``'s categories by name (:func:`~detkit.data.class_map.match_classes`:
    a :class:`ConfigError` naming both lists when they cannot be), and the ground truth reduced to
    the classes both have."""
    match = match_classes(model_classes, dataset.classes, num_model_classes, model_source, dataset_source)
    kept = sorted(set(match.labels.values()))
    cat_ids = [dataset.cat_ids[k] for k in kept]
    coco = dataset.coco if len(kept) == len(dataset.cat_ids) else keep_categories(dataset.coco, cat_ids, dataset_source)
    return EvalClasses({m: dataset.cat_ids[d] for m, d in match.labels.items()}, coco,
                       [dataset.classes[k] for k in kept], match.left_out(model_source, dataset_source))


class EvalBackendMissing(ConfigError):
    """``eval.backend`` names a package that is not installed; the message gives the pip command."""


@dataclass
class EvalSettings:
    """The ``eval`` section: ``backend`` (``pycocotools`` | ``faster_coco_eval``), ``diagnostics``
    (write ``eval_epoch_N/`` pictures and ``results.png`` at each evaluation) and the operating point
    of the confusion matrix and per-image recall: a detection counts from ``score_thr`` and matches a
    box from IoU ``iou_thr`` (ultralytics' and mmdetection's defaults, 0.5 and 0.3). ``tiles``: null, or
    sliced evaluation ``{size, overlap, full_image, merge, iou_thr}`` (:class:`~detkit.ops.tiles.TileSettings`)
    on the val images as ``data.val.transforms`` give them, scored on the original images like a whole-image pass."""

    backend: str = "pycocotools"
    diagnostics: bool = True
    iou_thr: float = 0.5
    score_thr: float = 0.3
    tiles: Any = None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> "EvalSettings":
        """``cfg['eval']`` over the defaults; raises :class:`ConfigError` naming ``eval.<key>``."""
        settings = section_settings(cls, cfg, "eval")
        if settings.backend not in BACKENDS:
            raise ConfigError(f"eval.backend must be one of {', '.join(BACKENDS)}, got {settings.backend!r}")
        if not isinstance(settings.diagnostics, bool):
            raise ConfigError(f"eval.diagnostics must be true or false, got {settings.diagnostics!r}")
        for key in ("iou_thr", "score_thr"):
            value = getattr(settings, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"eval.{key} must be a number in [0, 1], got {value!r}")
        settings.tiles = TileSettings.parse(settings.tiles, "eval.tiles")
        cocoeval_class(settings.backend)  # a missing package is named now, not after the first epoch
        return settings


def cocoeval_class(backend: str) -> tuple[Any, Any]:
    """``(COCO class, COCOeval class)`` of ``backend``; :class:`EvalBackendMissing` when not installed."""
    if backend == "pycocotools":
        return COCO, COCOeval
    try:  # why here: an optional package (the fast-eval extra), imported only when eval.backend names it
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        raise EvalBackendMissing("eval.backend: faster_coco_eval is not installed; pip install faster-coco-eval "
                                 "(or pip install -e '.[fast-eval]'), or use eval.backend=pycocotools") from None
    return FasterCOCO, COCOeval_faster


def run_cocoeval(coco_gt: COCO, results: list[dict[str, Any]], image_ids: Sequence[int] | None = None,
                 backend: str = "pycocotools") -> Any:
    """``COCOeval`` (bbox) of ``results`` after evaluate, accumulate and summarize (``results`` non-empty).

    Its ``eval['precision']`` is ``(T iou thresholds, R recall points, K classes, A areas, M max dets)``
    and ``stats`` the 12 COCO numbers, with either backend.
    """
    coco_cls, eval_cls = cocoeval_class(backend)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_gt if coco_cls is COCO else coco_cls(coco_gt.dataset)
        ev = eval_cls(gt, gt.loadRes(copy.deepcopy(results)), iouType="bbox")  # loadRes edits its input
        if image_ids is not None:
            ev.params.imgIds = sorted(set(int(i) for i in image_ids))
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev


def summarize(coco_eval: Any, classes: Sequence[str]) -> dict[str, Any]:
    """``{AP, AP50, AP75, APs, APm, APl, per_class: {name: AP}}`` of an evaluated ``COCOeval``;
    -1 (pycocotools' "no such objects") becomes NaN. ``coco_eval`` None (no results): every metric 0."""
    if coco_eval is None:
        return {**{k: 0.0 for k in SUMMARY_KEYS}, "per_class": {c: 0.0 for c in classes}}
    stats = [float(s) if s >= 0 else float("nan") for s in coco_eval.stats[:6]]
    precision = coco_eval.eval["precision"]  # (T iou, R recall, K classes, A areas, M max dets)
    per_class = {}
    for k, name in enumerate(classes[: precision.shape[2]]):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[name] = float(np.mean(p)) if p.size else float("nan")
    return {**dict(zip(SUMMARY_KEYS, stats)), "per_class": per_class}


def evaluate_coco(coco_gt: COCO, results: list[dict[str, Any]], classes: Sequence[str],
                  image_ids: Sequence[int] | None = None, backend: str = "pycocotools") -> dict[str, Any]:
    """:func:`summarize` of :func:`run_cocoeval`: fractions in [0, 1]; without results every metric is 0."""
    return summarize(run_cocoeval(coco_gt, results, image_ids, backend) if results else None, classes)


def format_metrics(metrics: dict[str, Any]) -> str:
    """A small text table: summary line, then AP per class."""
    head = " | ".join(f"{k} {100 * metrics[k]:5.1f}" for k in SUMMARY_KEYS)
    width = max((len(c) for c in metrics["per_class"]), default=5)
    rows = [f"  {name:<{width}}  AP {100 * ap:5.1f}" for name, ap in metrics["per_class"].items()]
    return "\n".join([f"bbox: {head}", *rows])


@dataclass
class Evaluation:
    """What :func:`evaluate_model` returns: COCO ``metrics`` (every rank), and on rank 0 the COCO
    ``results`` (original pixels), up to ``vis_images`` ``(image uint8 (3, h, w), detections)`` pairs,
    the evaluated image ids and the evaluated ``coco_eval`` (None without results)."""

    metrics: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    pictures: list[tuple[Tensor, dict[str, Tensor]]] = field(default_factory=list)
    num_images: int = 0
    image_ids: list[int] = field(default_factory=list)
    coco_eval: Any = None


@torch.no_grad()
def evaluate_model(model: nn.Module, loader: Any, device: torch.device, amp: str | None = None,
                   vis_images: int = 0, desc: str = "eval", backend: str = "pycocotools",
                   classes: EvalClasses | None = None, tiles: TileSettings | None = None) -> Evaluation:
    """Predict every image of ``loader`` (sharded under DDP) and score all of them with COCOeval
    (``backend``: pycocotools or faster_coco_eval) on rank 0, in the categories of ``classes``
    (:func:`eval_classes`; None: the model's labels are the dataset's, one to one). With ``tiles``, each
    image is predicted sliced (:func:`~detkit.ops.tiles.sliced_predict`, tiles padded to multiples of 32)."""
    dataset, was_training = loader.dataset, model.training
    if classes is None:
        classes = EvalClasses(dict(enumerate(dataset.cat_ids)), dataset.coco, list(dataset.classes))
    model.eval()
    preds, ids = [], []
    pictures: list[tuple[Tensor, dict[str, Tensor]]] = []
    # a detkit Detector's method: (images, image_sizes) -> one dict of boxes, scores, labels per image
    predict: Callable[[Tensor, Tensor], list[dict[str, Tensor]]] = model.predict  # type: ignore[assignment]
    for batch in progress(loader, len(loader), desc, get_rank() == 0):
        images = batch["images"].to(device, non_blocking=True)
        with autocast(device, amp):
            if tiles is None:
                out = predict(images, batch["image_sizes"])
            else:
                out = [sliced_predict(predict, images[i, :, :h, :w], tiles)
                       for i, (h, w) in enumerate(batch["image_sizes"].tolist())]
        for i, det in enumerate(out):
            preds.append(to_original_coords(det, batch["scale_factors"][i], batch["orig_sizes"][i]))
            ids.append(batch["image_ids"][i])
            if len(pictures) < vis_images:
                h, w = batch["image_sizes"][i].tolist()
                pictures.append((batch["images"][i, :, :h, :w], {k: v.cpu() for k, v in det.items()}))
    model.train(was_training)
    gathered = all_gather_objects((coco_results(preds, ids, classes.cat_of), ids))
    evaluation = Evaluation(metrics={}, pictures=pictures)
    if get_rank() == 0:
        seen: set[int] = set()
        for part_results, part_ids in gathered:
            fresh = set(part_ids) - seen  # the sampler repeats images to even out shards
            evaluation.results += [r for r in part_results if r["image_id"] in fresh]
            seen |= fresh
        evaluation.num_images, evaluation.image_ids = len(seen), sorted(seen)
        if evaluation.results:
            evaluation.coco_eval = run_cocoeval(classes.coco, evaluation.results, evaluation.image_ids, backend)
        evaluation.metrics = summarize(evaluation.coco_eval, classes.classes)
    if is_distributed():
        evaluation.metrics = all_gather_objects(evaluation.metrics)[0]
    return evaluation
