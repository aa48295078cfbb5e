"""Weighting and reduction shared by every loss (mmdetection's ``weight_reduce_loss`` semantics)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from detkit.losses.weights import WeightSchedule, build_loss_weight

REDUCTIONS = ("none", "mean", "sum")
# Added to avg_factor so that an avg_factor of 0 (no positives) gives 0, not NaN.
AVG_EPS = torch.finfo(torch.float32).eps


def _check_reduction(reduction: str, owner: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{owner}: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def expand_weight(weight: Tensor, loss: Tensor) -> Tensor:
    """Broadcast ``weight`` from the left: an ``(N,)`` weight scales every column of ``(N, C)``."""
    if weight.dim() > loss.dim() or weight.shape != loss.shape[: weight.dim()]:
        raise ValueError(f"weight of shape {tuple(weight.shape)} does not match the loss of shape "
                         f"{tuple(loss.shape)}: expected a leading part of it, e.g. {tuple(loss.shape[:1])}")
    return weight.reshape(weight.shape + (1,) * (loss.dim() - weight.dim()))


def weight_reduce_loss(loss: Tensor, weight: Tensor | None = None, reduction: str = "mean",
                       avg_factor: float | Tensor | None = None) -> Tensor:
    """Apply ``weight`` then reduce.

    Args:
        loss: elementwise loss, any shape.
        weight: broadcast from the left (see :func:`expand_weight`), or None.
        reduction: ``none`` (elementwise), ``sum`` or ``mean``; with ``avg_factor``, ``mean``
            is ``sum / (avg_factor + eps)`` and ``sum`` is an error.
    Returns:
        The reduced loss; an empty ``loss`` reduces to a zero that keeps the autograd graph.
    """
    if weight is not None:
        loss = loss * expand_weight(weight.to(loss.dtype), loss)
    if reduction == "none":
        return loss
    if avg_factor is not None:
        if reduction == "sum":
            raise ValueError("avg_factor cannot be used with reduction='sum'")
        return loss.sum() / (avg_factor + AVG_EPS)
    if reduction == "sum" or loss.numel() == 0:  # mean of nothing is NaN; 0 keeps the graph
        return loss.sum()
    return loss.mean()


def float32_target(target: Any) -> Any:
    """Floating tensors (also inside a tuple or list) as float32; integer ones unchanged."""
    if isinstance(target, (tuple, list)):
        return type(target)(float32_target(t) for t in target)
    return target.float() if target.is_floating_point() else target


class WeightedLoss(nn.Module):
    """Base class: subclasses compute an elementwise loss, this class weights and reduces it.

    Call: ``loss(pred, target, weight=None, avg_factor=None, reduction_override=None, **options)``.
    Inputs of any floating dtype are computed in float32 and the result is float32, so that
    fp16/bf16 activations under autocast never underflow or overflow inside a loss. ``target``
    is a tensor or a tuple of tensors (``QualityFocalLoss``'s ``(labels, scores)``); ``options``
    are a loss's own per-call keywords (``CrossEntropyLoss``'s ``ignore_index``), passed on to
    :meth:`elementwise` and :meth:`default_avg_factor`.
    """

    #: What the loss compares (``classification``, ``quality``, ``box``, ``regression``,
    #: ``distribution``, ``score``, ``heatmap``):
    #: heads refuse a loss of the wrong kind for a term. Empty: no check.
    kinds: frozenset[str] = frozenset()

    def __init__(self, reduction: str = "mean", loss_weight: Any = 1.0) -> None:
        super().__init__()
        self.reduction = _check_reduction(reduction, type(self).__name__)
        weight = build_loss_weight(loss_weight)
        self.weight_schedule = weight if isinstance(weight, WeightSchedule) else None
        self._loss_weight = float(weight) if self.weight_schedule is None else None

    @property
    def loss_weight(self) -> float:
        """The weight now: a constant, or the schedule's value at the current step."""
        if self.weight_schedule is not None:
            return float(self.weight_schedule)
        assert self._loss_weight is not None, "set whenever there is no schedule"
        return self._loss_weight

    # ``options`` of forward() (CrossEntropyLoss's ignore_index) reach these two; a subclass names the ones it takes
    def elementwise(self, pred: Tensor, target: Any) -> Tensor:
        """Unreduced loss for float32 ``pred``; the shape a ``weight`` broadcasts against."""
        raise NotImplementedError

    def default_avg_factor(self, pred: Tensor, target: Any) -> Tensor | None:
        """Normaliser used for ``mean`` when the caller gives no ``avg_factor`` (None: plain mean)."""
        return None

    def reduction_for(self, reduction_override: str | None) -> str:
        """The reduction of one call: ``reduction_override`` or the constructor's, checked."""
        return _check_reduction(reduction_override or self.reduction, type(self).__name__)

    def forward(self, pred: Tensor, target: Any, weight: Tensor | None = None,
                avg_factor: float | Tensor | None = None,
                reduction_override: str | None = None, **options: Any) -> Tensor:
        reduction = self.reduction_for(reduction_override)
        target = float32_target(target)
        loss = self.elementwise(pred.float(), target, **options)
        if avg_factor is None and reduction == "mean":
            avg_factor = self.default_avg_factor(pred, target, **options)
        return self.loss_weight * weight_reduce_loss(loss, weight, reduction, avg_factor)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, loss_weight={self.weight_schedule or self.loss_weight}"
