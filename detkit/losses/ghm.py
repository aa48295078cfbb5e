"""Gradient Harmonizing Mechanism losses (Li et al. 2019, "Gradient Harmonized Single-stage Detector").

Every element gets a weight inversely proportional to how many elements share its gradient norm
``g`` (a histogram of ``bins`` equal bins over ``[0, 1]``), so that the many easy negatives
(``g`` near 0) and the few outliers (``g`` near 1) do not dominate. Values equal mmdetection's
``GHMC`` / ``GHMR`` (``mmdet/models/losses/ghm_loss.py``) for 0/1 weights.

Running state: with ``momentum > 0`` the bin counts are an exponential moving average kept in the
buffer ``acc_sum (bins,)``, which is in the state dict, so checkpoints hold it and a resumed run
continues from the same statistics. Under DDP the statistics are per rank, from the rank's own
batch, as in mmdetection; detkit's ``DistributedDataParallel`` (``broadcast_buffers`` on, torch's
default) also copies rank 0's buffers to every rank before each forward, so each step starts from
rank 0's ``acc_sum`` and adds the rank's own counts (mmdetection turns the broadcast off: fully
per-rank histories). Checkpoints hold rank 0's ``acc_sum``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.losses.focal import as_dense_target
from detkit.losses.reduce import WeightedLoss, expand_weight, float32_target, weight_reduce_loss
from detkit.registry import LOSSES


class _GHMLoss(WeightedLoss):
    """Shared histogram weighting. Subclasses give the elementwise loss and its gradient norm ``g``.

    ``weight`` marks the valid elements (``> 0``) and multiplies their loss (0/1 weights: mmdetection's
    ``label_weight``); ``mean`` divides by the number of valid elements. The caller's
    ``avg_factor`` is not used: as in mmdetection, the harmonized weights are their own normaliser
    (they average 1 over the valid elements), so a head that passes ``avg_factor=num_pos`` for its
    focal loss gets the same GHM loss as one that passes none.
    """

    edges: Tensor  # buffers
    acc_sum: Tensor  # only with momentum > 0

    def __init__(self, bins: int, momentum: float, last_edge: float, reduction: str, loss_weight: Any) -> None:
        super().__init__(reduction, loss_weight)
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
            raise ValueError(f"{type(self).__name__}: bins must be an integer >= 1, got {bins!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"{type(self).__name__}: momentum must be in [0, 1), got {momentum}")
        self.bins, self.momentum = bins, float(momentum)
        edges = torch.arange(bins + 1, dtype=torch.float32) / bins
        edges[-1] = last_edge  # mmdetection's: GHMC 1 + 1e-6 (g = 1 in the last bin), GHMR 1e3
        self.register_buffer("edges", edges, persistent=False)
        if self.momentum > 0:
            self.register_buffer("acc_sum", torch.zeros(bins))

    def loss_and_norm(self, pred: Tensor, target: Any) -> tuple[Tensor, Tensor]:
        """Elementwise loss and gradient norm ``g``, both shaped like ``pred``."""
        raise NotImplementedError

    def harmonized_weights(self, g: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
        """``(weights like g, tot)``: ``tot / (count of g's bin * non-empty bins)`` on valid elements, 0 elsewhere.

        Everything stays on the device (no ``.item()`` per bin as in mmdetection; same values).
        """
        g = g.detach()
        bin_index = (torch.bucketize(g, self.edges, right=True) - 1).clamp(0, self.bins - 1)
        counts = torch.bincount(bin_index[valid], minlength=self.bins).float()
        tot = valid.sum().float().clamp(min=1.0)
        filled = counts > 0
        if self.momentum > 0:  # only the bins that got elements move, as mmdetection's loop
            with torch.no_grad():
                self.acc_sum.copy_(torch.where(filled, self.momentum * self.acc_sum + (1 - self.momentum) * counts,
                                               self.acc_sum))
            per_bin = self.acc_sum
        else:
            per_bin = counts
        per_bin = torch.where(filled, tot / per_bin.clamp(min=torch.finfo(torch.float32).tiny), 0.0)
        weights = per_bin[bin_index] * valid / filled.sum().clamp(min=1)
        return weights, tot

    def forward(self, pred: Tensor, target: Any, weight: Tensor | None = None,  # type: ignore[override]  # no options
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None) -> Tensor:
        reduction = self.reduction_for(reduction_override)
        loss, g = self.loss_and_norm(pred.float(), float32_target(target))
        valid = (torch.ones_like(loss, dtype=torch.bool) if weight is None
                 else (expand_weight(weight, loss) > 0).expand_as(loss))
        ghm_weights, tot = self.harmonized_weights(g, valid)
        loss = weight_reduce_loss(loss * ghm_weights, weight, "none")
        return self.loss_weight * weight_reduce_loss(loss, None, reduction, tot if reduction == "mean" else None)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, momentum={self.momentum}, {super().extra_repr()}"


@LOSSES.register()
class GHMC(_GHMLoss):
    """GHM classification loss: sigmoid BCE weighted by the density of ``g = |sigmoid(x) - t|``.

    Args:
        bins: histogram bins over ``g`` in ``[0, 1]``.
        momentum: moving average of the bin counts (0: this batch's counts only).
        use_sigmoid: only the sigmoid form exists (``true``), as mmdetection.
    Shapes: ``pred (..., C)`` logits; ``target`` int64 ``(...,)`` in ``0..C`` (``C`` and any other
    index: background, as ``FocalLoss``) or float ``(..., C)``; ``weight (...,)`` or ``(..., C)``;
    elementwise loss ``(..., C)``.
    """

    kinds = frozenset({"classification"})

    def __init__(self, bins: int = 10, momentum: float = 0.0, use_sigmoid: bool = True,
                 reduction: str = "mean", loss_weight: Any = 1.0) -> None:
        if use_sigmoid is not True:
            raise ValueError(f"GHMC: only the sigmoid form exists (use_sigmoid: true), got {use_sigmoid!r}")
        super().__init__(bins, momentum, 1.0 + 1e-6, reduction, loss_weight)
        self.use_sigmoid = True

    def loss_and_norm(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        dense = as_dense_target(pred, target)
        loss = F.binary_cross_entropy_with_logits(pred, dense, reduction="none")
        return loss, (torch.sigmoid(pred) - dense).abs()


@LOSSES.register()
class GHMR(_GHMLoss):
    """GHM regression loss: Authentic Smooth L1 ``sqrt(d^2 + mu^2) - mu`` weighted by the density of
    ``g = |d| / sqrt(d^2 + mu^2)``, ``d = pred - target``.

    Args:
        mu: ASL1's smoothing (the loss is quadratic for ``|d| << mu``, linear beyond).
        bins, momentum: as :class:`GHMC`.
    Shapes: ``pred, target (..., K)`` (box deltas or boxes); ``weight (...,)`` or ``(..., K)``;
    elementwise loss ``(..., K)``.
    """

    kinds = frozenset({"box", "regression"})

    def __init__(self, mu: float = 0.02, bins: int = 10, momentum: float = 0.0, reduction: str = "mean",
                 loss_weight: Any = 1.0) -> None:
        if not mu > 0:
            raise ValueError(f"GHMR: mu must be > 0, got {mu}")
        super().__init__(bins, momentum, 1e3, reduction, loss_weight)
        self.mu = float(mu)

    def loss_and_norm(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        if pred.shape != target.shape:
            raise ValueError(f"GHMR: pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the "
                             f"same shape")
        diff = pred - target
        root = torch.sqrt(diff * diff + self.mu * self.mu)
        return root - self.mu, diff.abs() / root
