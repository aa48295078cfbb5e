"""Generalized Focal Loss (Li et al. 2020) and Varifocal Loss (Zhang et al. 2021).

``QualityFocalLoss`` and ``VarifocalLoss`` train a joint class-and-quality score: the target of
the positive's own class is its IoU quality instead of 1. Both take the same targets, so swapping
one for the other in a head is one line of YAML. Their loss kind is ``quality`` (a head term that
passes ``(labels, scores)``), not ``classification`` (class-index targets):

- a tuple ``(labels, scores)``: ``labels (...,)`` int64 in ``0..C`` (``C`` = background; every
  label outside ``0..C-1`` reads as background, see docs/losses.md) and ``scores (...,)`` float;
- or a dense float ``(..., C)`` target (``one_hot(labels) * scores``, or any soft target).

``DistributionFocalLoss`` trains the discretised box-side distribution of a GFL head.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.losses.focal import apply_class_weight, labels_to_one_hot
from detkit.losses.reduce import WeightedLoss
from detkit.losses.weights import class_weight_for, register_class_weight
from detkit.registry import LOSSES


def quality_target(pred: Tensor, target: Any) -> Tensor:
    """``(labels, scores)`` or a dense float target -> float ``(..., C)`` shaped like ``pred``."""
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(f"a quality target tuple must be (labels, scores), got {len(target)} items")
        labels, scores = target
        if labels.is_floating_point() or labels.shape != pred.shape[:-1] or scores.shape != labels.shape:
            raise ValueError(f"(labels, scores) must be int64 and float of shape {tuple(pred.shape[:-1])} "
                             f"for logits {tuple(pred.shape)}, got {labels.dtype} {tuple(labels.shape)} "
                             f"and {scores.dtype} {tuple(scores.shape)}")
        return labels_to_one_hot(labels, pred.shape[-1]) * scores.unsqueeze(-1)
    if not target.is_floating_point() or target.shape != pred.shape:
        raise ValueError(f"a dense quality target must be float of the logits' shape {tuple(pred.shape)}, "
                         f"got {target.dtype} {tuple(target.shape)}; or pass a (labels, scores) tuple")
    return target


def probability_bce(prob: Tensor, target: Tensor) -> Tensor:
    """``F.binary_cross_entropy`` (logs clamped at -100, as torch and mmdetection) of probabilities.

    Outside autocast: CUDA autocast refuses ``binary_cross_entropy`` even on float32 inputs.
    """
    with torch.autocast(prob.device.type, enabled=False):
        return F.binary_cross_entropy(prob, target, reduction="none")


def _check_sigmoid(owner: str, use_sigmoid: bool) -> None:
    if use_sigmoid is not True:
        raise ValueError(f"{owner}: only the sigmoid form exists (use_sigmoid: true), got {use_sigmoid!r}")


@LOSSES.register()
class QualityFocalLoss(WeightedLoss):
    """GFL's Quality Focal Loss: ``|t - sigmoid(x)|^beta * BCE(x, t)``, summed over classes.

    ``t`` is the score at the positive's own class and 0 elsewhere, so negatives get
    ``sigmoid(x)^beta * BCE(x, 0)``; equals mmdetection's ``quality_focal_loss`` (tuple target)
    and ``quality_focal_loss_tensor_target`` (dense target).

    Args:
        activated: ``pred`` holds probabilities already (``sigmoid`` applied by the head):
            ``|t - p|^beta * BCE(p, t)`` with torch's ``binary_cross_entropy`` (logs clamped at
            -100), as mmdetection's ``quality_focal_loss_with_prob``.
        class_weight: ``(C,)`` factors, class ``c``'s term times ``class_weight[c]`` before the sum
            over classes, or ``auto`` (docs/losses.md, "Per-class weights").
    Shapes: ``pred (..., C)`` logits (probabilities with ``activated``); ``target``
    ``(labels (...,), scores (...,))`` or float ``(..., C)`` (see module doc); elementwise loss
    ``(...,)`` (summed over C, as mmdetection); ``weight (...,)``. Normalise with ``avg_factor``
    (GFL: the number of positives).
    """

    kinds = frozenset({"quality"})  # (labels, IoU) targets: a GFL cls term, not an FCOS one

    def __init__(self, use_sigmoid: bool = True, beta: float = 2.0, activated: bool = False,
                 class_weight: Sequence[float] | str | None = None, reduction: str = "mean",
                 loss_weight: Any = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        _check_sigmoid("QualityFocalLoss", use_sigmoid)
        self.use_sigmoid = True
        self.beta = float(beta)
        self.activated = bool(activated)
        register_class_weight(self, class_weight)

    def elementwise(self, pred: Tensor, target: Any) -> Tensor:
        class_weight = class_weight_for(self, pred.shape[-1])
        dense = quality_target(pred, target)
        if self.activated:
            loss = probability_bce(pred, dense) * (dense - pred).abs().pow(self.beta)
        else:
            scale = (dense - torch.sigmoid(pred)).abs().pow(self.beta)
            loss = F.binary_cross_entropy_with_logits(pred, dense, reduction="none") * scale
        return apply_class_weight(loss, class_weight).sum(-1)


@LOSSES.register()
class VarifocalLoss(WeightedLoss):
    """VarifocalNet's loss: ``BCE(x, t)`` times ``t`` on positives, ``alpha |sigmoid(x) - t|^gamma`` on negatives.

    Positives are the elements with ``t > 0``; ``iou_weighted: false`` weights them by 1.

    Args:
        alpha: weight of the negatives (not focal loss's alpha).
        gamma: focusing exponent on the negatives.
        iou_weighted: positives weighted by their target ``t`` (True) or by 1.
        class_weight: ``(C,)`` factors, column ``c`` times ``class_weight[c]``, or ``auto``.
    Shapes: ``pred (..., C)`` logits; ``target`` float ``(..., C)`` IoU-aware scores, or QFL's
    ``(labels, scores)`` tuple; elementwise loss ``(..., C)``; ``weight (...,)`` or ``(..., C)``.
    Equals mmdetection's ``varifocal_loss``.
    """

    kinds = frozenset({"quality"})  # (labels, IoU) targets: a GFL cls term, not an FCOS one

    def __init__(self, use_sigmoid: bool = True, alpha: float = 0.75, gamma: float = 2.0,
                 iou_weighted: bool = True, class_weight: Sequence[float] | str | None = None,
                 reduction: str = "mean", loss_weight: Any = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        _check_sigmoid("VarifocalLoss", use_sigmoid)
        if alpha < 0:
            raise ValueError(f"VarifocalLoss: alpha must be >= 0, got {alpha}")
        self.use_sigmoid = True
        self.alpha = float(alpha)
        self.gamma = float(gamma)
        self.iou_weighted = bool(iou_weighted)
        register_class_weight(self, class_weight)

    def elementwise(self, pred: Tensor, target: Any) -> Tensor:
        class_weight = class_weight_for(self, pred.shape[-1])
        dense = quality_target(pred, target)
        negative = self.alpha * (torch.sigmoid(pred) - dense).abs().pow(self.gamma)
        positive = dense if self.iou_weighted else torch.ones_like(dense)
        focal_weight = torch.where(dense > 0, positive, negative)
        loss = F.binary_cross_entropy_with_logits(pred, dense, reduction="none") * focal_weight
        return apply_class_weight(loss, class_weight)


@LOSSES.register()
class DistributionFocalLoss(WeightedLoss):
    """GFL's Distribution Focal Loss: cross entropy to the two bins around a real-valued target.

    ``DFL = (r - y) CE(x, l) + (y - l) CE(x, r)`` with ``l = floor(y)``, ``r = l + 1``: the
    softmax over the ``n + 1`` bins ``0..n`` (``n = reg_max``) is pushed towards ``l`` and ``r``.
    Shapes: ``pred (..., n + 1)`` logits; ``target (...,)`` float distances in bin units;
    elementwise loss ``(...,)``; ``weight (...,)``.

    Targets must lie in ``[0, n]``. mmdetection's ``distribution_focal_loss`` indexes bin
    ``n + 1`` for a target of exactly ``n`` (an error), so its GFL head clamps targets to
    ``n - 0.1``; here ``l`` is capped at ``n - 1``, so ``y = n`` gives ``CE(x, n)``, the limit
    of the loss as ``y -> n``, and any ``y`` in ``[0, n)`` gives mmdetection's value. Outside
    ``[0, n]`` the loss is a linear extrapolation with a negative weight (not checked: a range
    check would be a host sync on every call).
    """

    kinds = frozenset({"distribution"})  # bin logits: a GFL dfl term

    def __init__(self, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        if not target.is_floating_point() or target.shape != pred.shape[:-1]:
            raise ValueError(f"DistributionFocalLoss: target must be float of shape {tuple(pred.shape[:-1])} "
                             f"for logits {tuple(pred.shape)}, got {target.dtype} {tuple(target.shape)}")
        if pred.shape[-1] < 2:
            raise ValueError(f"DistributionFocalLoss: pred needs at least 2 bins, got {pred.shape[-1]}")
        left = target.detach().floor().clamp(0, pred.shape[-1] - 2).long()
        weight_right = target - left
        log_p = F.log_softmax(pred, dim=-1)
        bins = torch.stack([left, left + 1], -1)
        nll = -log_p.gather(-1, bins)
        return nll[..., 0] * (1 - weight_right) + nll[..., 1] * weight_right
