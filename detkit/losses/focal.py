"""Sigmoid focal loss (RetinaNet / FCOS classification) and its FL* variant."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.losses.reduce import WeightedLoss
from detkit.losses.weights import class_weight_for, register_class_weight
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
    return alpha_balance(loss, target, alpha)


def alpha_balance(loss: Tensor, target: Tensor, alpha: float | None) -> Tensor:
    """``loss * alpha_t``, ``alpha_t = alpha t + (1 - alpha)(1 - t)``; ``alpha`` None or negative: ``loss``."""
    if alpha is None or alpha < 0:
        return loss
    return loss * (target * (2 * alpha - 1) + (1 - alpha))


def sigmoid_focal_star(pred: Tensor, target: Tensor, gamma: float, alpha: float | None) -> Tensor:
    """FL* (RetinaNet appendix A): ``-log(sigmoid(gamma x_t)) / gamma``, ``x_t = x (2t - 1)``, times
    ``alpha_t``; equals fvcore's ``sigmoid_focal_loss_star(..., reduction='none')``."""
    return alpha_balance(-F.logsigmoid(gamma * pred * (2 * target - 1)) / gamma, target, alpha)


def apply_class_weight(loss: Tensor, class_weight: Tensor | None) -> Tensor:
    """``loss (..., C)`` with column ``c`` multiplied by ``class_weight[c]``."""
    return loss if class_weight is None else loss * class_weight.to(loss.dtype)


@LOSSES.register()
class FocalLoss(WeightedLoss):
    """Sigmoid focal loss on logits (B..., C) with class-index or float targets.

    Args:
        gamma: focusing exponent on ``(1 - p_t)``.
        alpha: positive/negative balance; ``None`` or negative disables it (torchvision's rule).
        class_weight: ``(C,)`` factors in class order, column ``c`` of the loss times ``class_weight[c]``
            (positives and negatives of class ``c``), or ``auto`` (docs/losses.md, "Per-class weights").
    Shapes: ``pred (..., C)`` logits; ``target`` either int64 ``(...,)`` in ``0..C`` where ``C``
    is background (all-zero row), or float ``(..., C)`` one-hot/soft. Elementwise loss ``(..., C)``;
    ``weight`` ``(...,)`` scales whole rows, ``(..., C)`` single logits. Any other class index
    (-1 included) is background too, never ignored (docs/losses.md, "Class-index targets"); to
    ignore a row, give it weight 0 (and leave it out of ``avg_factor``).
    """

    kinds = frozenset({"classification"})

    def __init__(self, gamma: float = 2.0, alpha: float | None = 0.25,
                 class_weight: Sequence[float] | str | None = None, reduction: str = "mean",
                 loss_weight: Any = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.gamma = float(gamma)
        self.alpha = alpha
        register_class_weight(self, class_weight)

    def focal(self, pred: Tensor, target: Tensor) -> Tensor:
        """The unweighted elementwise loss ``(..., C)`` of logits and float targets."""
        return sigmoid_focal(pred, target, self.gamma, self.alpha)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        class_weight = class_weight_for(self, pred.shape[-1])
        return apply_class_weight(self.focal(pred, as_dense_target(pred, target)), class_weight)


@LOSSES.register()
class FocalLossStar(FocalLoss):
    """FL* (Lin et al. 2017, appendix A; fvcore's ``sigmoid_focal_loss_star``): ``-log(sigmoid(gamma x_t)) / gamma``.

    The focal effect from a sharper sigmoid instead of a ``(1 - p_t)^gamma`` factor. Defaults
    ``gamma=1`` (plain BCE with logits, times ``alpha_t``), ``alpha=0.25``: fvcore's default
    ``alpha`` is -1 (none). Arguments, targets and shapes as :class:`FocalLoss`.
    """

    def __init__(self, gamma: float = 1.0, alpha: float | None = 0.25,
                 class_weight: Sequence[float] | str | None = None, reduction: str = "mean",
                 loss_weight: Any = 1.0) -> None:
        if not gamma > 0:
            raise ValueError(f"FocalLossStar: gamma must be > 0, got {gamma}")
        super().__init__(gamma, alpha, class_weight, reduction, loss_weight)

    def focal(self, pred: Tensor, target: Tensor) -> Tensor:
        return sigmoid_focal_star(pred, target, self.gamma, self.alpha)
