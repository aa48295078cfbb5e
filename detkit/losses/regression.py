"""Elementwise regression losses: smooth L1 (with OpenPCDet's per-code weights) and L1."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from detkit.losses.reduce import WeightedLoss
from detkit.registry import LOSSES


def _check_same_shape(pred: Tensor, target: Tensor, owner: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{owner}: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                         f"must have the same shape")


class _CodeWeightedLoss(WeightedLoss):
    """Elementwise loss on ``(..., K)`` codes, optionally scaled per code (OpenPCDet ``code_weights``)."""

    def __init__(self, code_weights: Sequence[float] | None, reduction: str, loss_weight: float) -> None:
        super().__init__(reduction, loss_weight)
        weights = None if code_weights is None else torch.as_tensor(code_weights, dtype=torch.float32)
        self.register_buffer("code_weights", weights, persistent=False)

    def distance(self, diff: Tensor) -> Tensor:
        raise NotImplementedError

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_same_shape(pred, target, type(self).__name__)
        # OpenPCDet zeroes NaN targets (unset codes) so they add nothing to the loss.
        target = torch.where(torch.isnan(target), pred.detach(), target)
        diff = pred - target
        if self.code_weights is not None:
            if pred.shape[-1] != self.code_weights.numel():
                raise ValueError(f"{type(self).__name__}: code_weights has {self.code_weights.numel()} "
                                 f"entries but the codes' last dim is {pred.shape[-1]}")
            diff = diff * self.code_weights  # OpenPCDet scales the residual, before the distance
        return self.distance(diff)


@LOSSES.register()
class SmoothL1Loss(_CodeWeightedLoss):
    """Smooth L1: ``0.5 x^2 / beta`` if ``|x| < beta`` else ``|x| - 0.5 beta`` (``beta < 1e-5``: L1).

    Shapes: ``pred, target (..., K)``; elementwise loss ``(..., K)``; ``code_weights`` (K,)
    scale each code's residual before the distance, as OpenPCDet's ``WeightedSmoothL1Loss``;
    ``weight (...,)`` per anchor.
    Equals ``F.smooth_l1_loss(pred, target, beta=beta)``.
    """

    def __init__(self, beta: float = 1.0, code_weights: Sequence[float] | None = None,
                 reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(code_weights, reduction, loss_weight)
        if beta < 0:
            raise ValueError(f"SmoothL1Loss: beta must be >= 0, got {beta}")
        self.beta = float(beta)

    def distance(self, diff: Tensor) -> Tensor:
        n = diff.abs()
        if self.beta < 1e-5:
            return n
        return torch.where(n < self.beta, 0.5 * n * n / self.beta, n - 0.5 * self.beta)


@LOSSES.register()
class L1Loss(_CodeWeightedLoss):
    """L1: ``|pred - target|``. Shapes: ``pred, target (..., K)``; elementwise loss ``(..., K)``."""

    def __init__(self, code_weights: Sequence[float] | None = None, reduction: str = "mean",
                 loss_weight: float = 1.0) -> None:
        super().__init__(code_weights, reduction, loss_weight)

    def distance(self, diff: Tensor) -> Tensor:
        return diff.abs()
