"""Elementwise regression losses: smooth L1 (with OpenPCDet's per-code weights), L1, MSE, balanced L1."""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.losses.reduce import WeightedLoss
from detkit.registry import LOSSES


def _check_same_shape(pred: Tensor, target: Tensor, owner: str) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{owner}: pred {tuple(pred.shape)} and target {tuple(target.shape)} "
                         f"must have the same shape")


class _CodeWeightedLoss(WeightedLoss):
    """Elementwise loss on ``(..., K)`` codes, optionally scaled per code (OpenPCDet ``code_weights``)."""

    kinds = frozenset({"box", "regression", "score"})
    code_weights: Tensor | None  # buffer

    def __init__(self, code_weights: Sequence[float] | None = None, reduction: str = "mean",
                 loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        weights = None if code_weights is None else torch.as_tensor(code_weights, dtype=torch.float32)
        self.register_buffer("code_weights", weights, persistent=False)

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        """Elementwise loss of ``pred`` against ``target`` (one fused torch kernel)."""
        raise NotImplementedError

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        _check_same_shape(pred, target, type(self).__name__)
        # OpenPCDet counts NaN targets (unset codes) as exact predictions: no loss, no gradient.
        target = torch.where(torch.isnan(target), pred.detach(), target)
        if self.code_weights is not None:
            if pred.shape[-1] != self.code_weights.numel():
                raise ValueError(f"{type(self).__name__}: code_weights has {self.code_weights.numel()} "
                                 f"entries but the codes' last dim is {pred.shape[-1]}")
            # OpenPCDet scales the residual before the distance: (p - t) w = p w - t w
            pred, target = pred * self.code_weights, target * self.code_weights
        return self.distance(pred, target)


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

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.beta < 1e-5:  # OpenPCDet's rule: a tiny beta is plain L1
            return F.l1_loss(pred, target, reduction="none")
        return F.smooth_l1_loss(pred, target, reduction="none", beta=self.beta)


@LOSSES.register()
class L1Loss(_CodeWeightedLoss):
    """L1: ``|pred - target|``. Shapes: ``pred, target (..., K)``; elementwise loss ``(..., K)``."""

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.l1_loss(pred, target, reduction="none")


@LOSSES.register()
class MSELoss(_CodeWeightedLoss):
    """Squared error ``(pred - target)^2``. Shapes as L1Loss. Equals ``F.mse_loss`` and mmdetection's ``MSELoss``."""

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(pred, target, reduction="none")


@LOSSES.register()
class BalancedL1Loss(_CodeWeightedLoss):
    """Libra R-CNN's balanced L1 on ``x = |pred - target|``, with ``b = e^(gamma / alpha) - 1``:

    ``alpha / b (b x + 1) ln(b x / beta + 1) - alpha x`` if ``x < beta``, else
    ``gamma x + gamma / b - alpha beta`` (continuous at ``x = beta = 1``). Shapes as L1Loss.
    Equals mmdetection's ``balanced_l1_loss``.
    """

    def __init__(self, alpha: float = 0.5, gamma: float = 1.5, beta: float = 1.0,
                 code_weights: Sequence[float] | None = None, reduction: str = "mean",
                 loss_weight: float = 1.0) -> None:
        super().__init__(code_weights, reduction, loss_weight)
        if alpha <= 0 or beta <= 0:
            raise ValueError(f"BalancedL1Loss: alpha and beta must be > 0, got alpha={alpha}, beta={beta}")
        self.alpha, self.gamma, self.beta = float(alpha), float(gamma), float(beta)

    def distance(self, pred: Tensor, target: Tensor) -> Tensor:
        x = (pred - target).abs()
        a, g, beta = self.alpha, self.gamma, self.beta
        b = math.exp(g / a) - 1
        inner = a / b * (b * x + 1) * torch.log1p(b * x / beta) - a * x
        return torch.where(x < beta, inner, g * x + g / b - a * beta)
