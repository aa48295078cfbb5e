"""Softmax cross entropy and sigmoid binary cross entropy (``use_sigmoid``)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.losses.focal import as_dense_target
from detkit.losses.reduce import WeightedLoss
from detkit.losses.weights import class_weight_for, register_class_weight
from detkit.registry import LOSSES


@LOSSES.register()
class CrossEntropyLoss(WeightedLoss):
    """Softmax cross entropy over the last dim, or per-logit BCE with ``use_sigmoid: true``.

    Args:
        use_sigmoid: BCE with logits per class instead of a softmax over classes.
        class_weight: per-class factor (length C) or ``auto`` (docs/losses.md, "Per-class
            weights"); softmax: as ``F.cross_entropy(weight=)`` (the target's class), sigmoid:
            scales each class column.
        label_smoothing: softmax: as ``F.cross_entropy``; sigmoid: targets become
            ``y * (1 - s) + s / 2``.
        ignore_index: class-index targets equal to it contribute nothing (loss and gradient 0);
            a call may pass its own (``loss(pred, target, ignore_index=255)``, as mmdetection).
        avg_non_ignore: what ``mean`` divides by without ``avg_factor``. True (detkit's default):
            the non-ignored targets only, as ``F.cross_entropy`` (softmax: their summed class
            weights; sigmoid: their count times C); mmdetection's ``avg_non_ignore=True`` divides
            by their count, the same value unless ``class_weight`` is set with the softmax.
            False (mmdetection's default): every element, ignored ones included.
    Shapes: ``pred (N, C)`` or ``(..., C)`` logits; softmax ``target`` int64 ``(...,)``;
    sigmoid ``target`` int64 ``(...,)`` in ``0..C`` (``C`` = background) or float ``(..., C)``.
    Elementwise loss: softmax ``(...,)``, sigmoid ``(..., C)``. Class indices other than
    ``0..C-1`` and ``ignore_index`` (e.g. -1) read as background with the sigmoid, as in
    ``FocalLoss`` (docs/losses.md, "Class-index targets"); the softmax rejects them.
    """

    kinds = frozenset({"classification", "score"})
    class_weight: Tensor | None  # buffer set by register_class_weight

    def __init__(self, use_sigmoid: bool = False, class_weight: Sequence[float] | str | None = None,
                 label_smoothing: float = 0.0, ignore_index: int = -100, avg_non_ignore: bool = True,
                 reduction: str = "mean", loss_weight: Any = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        if not 0.0 <= label_smoothing <= 1.0:
            raise ValueError(f"CrossEntropyLoss: label_smoothing must be in [0, 1], got {label_smoothing}")
        self.use_sigmoid = bool(use_sigmoid)
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)
        self.avg_non_ignore = bool(avg_non_ignore)
        register_class_weight(self, class_weight)

    def _ignore_index(self, ignore_index: int | None) -> int:
        return self.ignore_index if ignore_index is None else int(ignore_index)

    def _valid(self, target: Tensor, ignore_index: int | None) -> Tensor | None:
        return None if target.is_floating_point() else target != self._ignore_index(ignore_index)

    def elementwise(self, pred: Tensor, target: Tensor, ignore_index: int | None = None) -> Tensor:
        class_weight = class_weight_for(self, pred.shape[-1])
        valid = self._valid(target, ignore_index)
        if self.use_sigmoid:
            dense = as_dense_target(pred, torch.where(valid, target, pred.shape[-1])
                                    if valid is not None else target)
            if self.label_smoothing:
                dense = dense * (1 - self.label_smoothing) + self.label_smoothing / 2
            loss = F.binary_cross_entropy_with_logits(pred, dense, weight=class_weight, reduction="none")
            return loss * valid.unsqueeze(-1) if valid is not None else loss
        if target.is_floating_point():
            raise ValueError("CrossEntropyLoss (softmax) takes int64 class-index targets; "
                             "use use_sigmoid: true for float targets")
        flat = F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                               weight=class_weight, ignore_index=self._ignore_index(ignore_index),
                               label_smoothing=self.label_smoothing, reduction="none")
        return flat.reshape(target.shape)

    def default_avg_factor(self, pred: Tensor, target: Tensor, ignore_index: int | None = None) -> Tensor | None:
        valid = self._valid(target, ignore_index)
        if valid is None or not self.avg_non_ignore:
            return None
        if self.use_sigmoid:
            return valid.sum() * pred.shape[-1]
        if self.class_weight is None:
            return valid.sum()
        return (self.class_weight[torch.where(valid, target, 0)] * valid).sum()
