"""Loss weights: ``loss_weight`` that changes with the iteration (``{type: LinearWeight, start, end,
iters}``), and per-class weights (``class_weight: [w_0, ..., w_C-1]`` or ``auto``)."""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Iterable, Iterator, Mapping, Sequence, cast

import torch
from torch import Tensor, nn

from detkit.registry import WEIGHT_SCHEDULES, ConfigError, config_path

logger = logging.getLogger("detkit")

#: ``class_weight: auto``: ``w_c = min(AUTO_CAP, (N / (C n_c)) ** AUTO_POWER)``, then divided by its mean.
AUTO_POWER = 0.5
AUTO_CAP = 10.0


class WeightSchedule:
    """A loss weight as a function of the optimizer step ``iter`` (set by ``LossWeightScheduleHook``
    before every step; 0 outside training). ``float(schedule)`` is the current weight."""

    def __init__(self, start: float, end: float, iters: int, begin: int = 0) -> None:
        if not isinstance(iters, int) or iters < 1 or not isinstance(begin, int) or begin < 0:
            raise ConfigError(f"{type(self).__name__}: iters must be a positive integer and begin >= 0, "
                              f"got iters={iters!r}, begin={begin!r}")
        self.start, self.end, self.iters, self.begin = float(start), float(end), iters, begin
        self.iter = 0

    def progress(self) -> float:
        """0 before ``begin``, 1 from ``begin + iters`` on."""
        return min(max((self.iter - self.begin) / self.iters, 0.0), 1.0)

    def ramp(self, p: float) -> float:
        raise NotImplementedError

    def __float__(self) -> float:
        return self.start + (self.end - self.start) * self.ramp(self.progress())

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(start={self.start}, end={self.end}, iters={self.iters}, begin={self.begin}, "
                f"now={float(self):.4g})")


@WEIGHT_SCHEDULES.register()
class LinearWeight(WeightSchedule):
    """``start`` -> ``end`` linearly over ``iters`` steps from step ``begin``, then ``end``."""

    def ramp(self, p: float) -> float:
        return p


@WEIGHT_SCHEDULES.register()
class CosineWeight(WeightSchedule):
    """``start`` -> ``end`` along a half cosine over ``iters`` steps from step ``begin``, then ``end``."""

    def ramp(self, p: float) -> float:
        return 0.5 * (1 - math.cos(math.pi * p))


def build_loss_weight(value: Any) -> float | WeightSchedule:
    """A number stays a float; ``{type: LinearWeight | CosineWeight, ...}`` becomes a schedule."""
    if isinstance(value, Mapping):
        return WEIGHT_SCHEDULES.build(value, "loss_weight")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"loss_weight must be a number or a schedule like {{type: LinearWeight, start: 0, end: 1, "
                          f"iters: 1000}}, got {value!r}")
    return float(value)


def class_weights_from_counts(counts: Sequence[int], power: float = AUTO_POWER, cap: float = AUTO_CAP) -> list[float]:
    """Damped inverse-frequency weights from the boxes per class ``n_c`` (``N`` boxes, ``C`` classes).

    ``w_c = min(cap, (N / (C n_c)) ** power)`` (a class with the average count gets 1, a class 100x
    rarer 10 at ``power`` 0.5; a class with no boxes gets ``cap``), then divided by the mean over
    classes so that the mean weight is 1 and the loss keeps its scale.
    """
    if not counts or any(n < 0 for n in counts):
        raise ConfigError(f"class_weight: auto needs a box count >= 0 per class, got {list(counts)!r}")
    total = sum(counts)
    raw = [min(cap, (total / (len(counts) * n)) ** power) if n > 0 else cap for n in counts]
    mean = sum(raw) / len(raw)
    return [w / mean for w in raw]


def check_class_weight(value: Any, key: str = "class_weight") -> list[float] | str | None:
    """``None``, ``"auto"`` or a non-empty list of finite numbers >= 0 (one per class, in class order)."""
    if value is None or value == "auto":
        return value
    if (isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence) or not value
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                       for v in value)):
        raise ConfigError(f"{config_path(key)} must be a list of numbers >= 0 (one per class, in class order) or "
                          f"auto (from the training set's box counts), got {value!r}")
    return [float(v) for v in value]


def register_class_weight(module: nn.Module, class_weight: Any) -> None:
    """Keep ``class_weight`` as the non-persistent buffer ``module.class_weight (C,)`` (None when unset
    or ``auto`` not yet resolved; ``module.class_weight_auto`` says which)."""
    value = check_class_weight(class_weight)
    # setattr: plain (non-tensor) attributes on any loss module
    setattr(module, "class_weight_key", config_path("class_weight"))  # for the call-time checks' messages
    setattr(module, "class_weight_auto", value == "auto")
    weight = torch.tensor(value, dtype=torch.float32) if isinstance(value, list) else None
    module.register_buffer("class_weight", weight, persistent=False)


def class_weight_for(module: nn.Module, num_classes: int) -> Tensor | None:
    """``module.class_weight (C,)`` checked against the logits' ``num_classes`` at call time."""
    key = f"{type(module).__name__} {module.class_weight_key}"
    if module.class_weight_auto:
        raise ConfigError(f"{key}: auto is computed from the training set's box counts when `train` builds the "
                          f"model; elsewhere give a list, e.g. detkit.losses.class_weights_from_counts(counts)")
    weight = cast(Tensor | None, module.class_weight)  # the buffer of register_class_weight
    if weight is not None and weight.numel() != num_classes:
        raise ConfigError(f"{key} has {weight.numel()} entries but the logits have {num_classes} classes; give one "
                          f"weight per class, in class order")
    return weight


def dataset_box_counts(dataset: Any) -> list[int]:
    """Boxes per class of ``dataset``'s items (non-crowd annotations), read from its COCO index (``coco``,
    ``ids``, ``cat_ids``, as every detkit dataset has): no image is decoded."""
    coco, ids, cat_ids = (getattr(dataset, k, None) for k in ("coco", "ids", "cat_ids"))
    if coco is None or ids is None or cat_ids is None:
        raise ConfigError(f"class_weight: auto needs the training set's annotation index; {type(dataset).__name__} "
                          f"has none (coco, ids, cat_ids): give class_weight as a list")
    label_of = {c: k for k, c in enumerate(cat_ids)}
    counts = [0] * len(cat_ids)
    for image_id in ids:
        for ann in coco.imgToAnns[image_id]:
            if not ann.get("iscrowd", 0):
                counts[label_of[ann["category_id"]]] += 1
    return counts


def _class_weight_specs(spec: Any, path: str, num_classes: int | None) -> Iterator[tuple[str, Any, int | None]]:
    """``(path, loss spec, num_classes of the nearest enclosing spec)`` for each spec with ``class_weight``."""
    if isinstance(spec, Mapping):
        num_classes = spec.get("num_classes", num_classes)
        if "class_weight" in spec and "type" in spec:
            yield path, spec, num_classes
        children: Iterable[tuple[Any, Any]] = spec.items()
    elif isinstance(spec, (list, tuple)):
        children = ((str(i), s) for i, s in enumerate(spec))
    else:
        return
    for key, child in children:
        yield from _class_weight_specs(child, f"{path}.{key}", num_classes)


def resolve_class_weights(model_spec: dict[str, Any], dataset: Any = None) -> dict[str, Any]:
    """A copy of ``model_spec`` with every ``class_weight: auto`` replaced by :func:`class_weights_from_counts`
    of ``dataset``'s box counts (logged once per class; a model with more classes than the data gives the
    extra ones count 0), and every list checked against the enclosing ``num_classes`` (a
    :class:`ConfigError` naming the key, the lengths and the class count)."""
    model_spec = copy.deepcopy(model_spec)
    counts: list[int] | None = None
    logged: set[tuple[float, ...]] = set()
    for path, spec, num_classes in _class_weight_specs(model_spec, "model", None):
        key = f"{path}.class_weight"
        value = check_class_weight(spec["class_weight"], key)
        if value == "auto":
            if dataset is None:
                raise ConfigError(f"{key}: auto needs the training set (data.train) to count its boxes per class")
            counts = dataset_box_counts(dataset) if counts is None else counts
            padded = counts + [0] * max(0, (num_classes or 0) - len(counts))
            value = class_weights_from_counts(padded)
            if tuple(value) not in logged:
                logged.add(tuple(value))
                names = list(dataset.classes) + [f"(class {k})" for k in range(len(counts), len(padded))]
                log_class_weights(names, padded, value, key)
        elif value is not None and num_classes is not None and len(value) != num_classes:
            raise ConfigError(f"{key} has {len(value)} entries but the model has {num_classes} classes "
                              f"(num_classes); give one weight per class, in class order")
        spec["class_weight"] = value
    return model_spec


def log_class_weights(classes: Sequence[str], counts: Sequence[int], weights: Sequence[float], key: str) -> None:
    """One table at the start of training: class, boxes, weight."""
    width = max(len("class"), *(len(str(c)) for c in classes))
    rows = [f"  {str(c):<{width}}  {n:>8d}  {w:7.3f}" for c, n, w in zip(classes, counts, weights)]
    logger.info("%s: auto = min(%g, (N / (C n_c))^%g) / mean, from %d training boxes:\n  %-*s  %8s  %7s\n%s",
                key, AUTO_CAP, AUTO_POWER, sum(counts), width, "class", "boxes", "weight", "\n".join(rows))
    empty = [str(c) for c, n in zip(classes, counts) if n == 0]
    if empty:
        logger.warning("%s: auto: no training boxes for %s (given the largest weight)", key, ", ".join(empty))
