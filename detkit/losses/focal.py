"""Sigmoid focal loss (RetinaNet / FCOS classification)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.losses.reduce import WeightedLoss
from detkit.registry import LOSSES


def labels_to_one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """``(...,)`` int64 labels -> ``(..., C)`` float one-hot; ``C`` (background) gives an all-zero row.

    A comparison against ``arange(C)`` rather than ``F.one_hot``: no int64 ``(..., C + 1)``
    temporary and no range check, which would be a host sync on every call on a GPU. Labels
    outside ``0..C-1`` (``C``, or an ignore value such as -1) all read as background.
    """
    classes = torch.arange(num_classes, device=labels.device)
    return (labels.unsqueeze(-1) == classes).float()


def as_dense_target(pred: Tensor, target: Tensor) -> Tensor:
    """Float targets shaped like ``pred (..., C)`` from either float targets or class indices."""
    if target.is_floating_point():
        if target.shape != pred.shape:
            raise ValueError(f"float targets must have the logits' shape {tuple(pred.shape)}, "
                             f"got {tuple(target.shape)}")
        return target
    if target.shape != pred.shape[:-1]:
        raise ValueError(f"class-index targets must have shape {tuple(pred.shape[:-1])} for logits "
                         f"{tuple(pred.shape)}, got {tuple(target.shape)}")
    return labels_to_one_hot(target, pred.shape[-1])


def sigmoid_focal(pred: Tensor, target: Tensor, gamma: float, alpha: float | None) -> Tensor:
    """Elementwise focal loss from logits ``pred`` and float ``target`` of the same shape.

    ``FL = -alpha_t * (1 - p_t)^gamma * log(p_t)`` with the log term computed by
    ``binary_cross_entropy_with_logits`` (finite for any logit); equals
    ``torchvision.ops.sigmoid_focal_loss(..., reduction='none')``.
    """
    p = torch.sigmoid(pred)
    ce = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
    one_minus_p_t = torch.addcmul(p + target, p, target, value=-2.0)  # 1 - p_t = p + t - 2pt
    loss = ce * one_minus_p_t.pow(gamma)
    if alpha is not None and alpha >= 0:
        loss = loss * (target * (2 * alpha - 1) + (1 - alpha))  # alpha_t = alpha t + (1 - alpha)(1 - t)
    return loss


@LOSSES.register()
class FocalLoss(WeightedLoss):
    """Sigmoid focal loss on logits (B..., C) with class-index or float targets.

    Args:
        gamma: focusing exponent on ``(1 - p_t)``.
        alpha: positive/negative balance; ``None`` or negative disables it (torchvision's rule).
    Shapes: ``pred (..., C)`` logits; ``target`` either int64 ``(...,)`` in ``0..C`` where ``C``
    is background (all-zero row), or float ``(..., C)`` one-hot/soft. Elementwise loss ``(..., C)``;
    ``weight`` ``(...,)`` scales whole rows, ``(..., C)`` single logits. Any other class index
    (-1 included) is background too, never ignored (docs/losses.md, "Class-index targets"); to
    ignore a row, give it weight 0 (and leave it out of ``avg_factor``).
    """

    kinds = frozenset({"classification"})

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25, reduction: str = "mean",
                 loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.gamma = float(gamma)
        self.alpha = alpha

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        return sigmoid_focal(pred, as_dense_target(pred, target), self.gamma, self.alpha)
