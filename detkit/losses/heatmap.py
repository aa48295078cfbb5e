"""CenterNet / CornerNet penalty-reduced focal loss on gaussian heatmaps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.losses.reduce import WeightedLoss
from detkit.registry import LOSSES


@LOSSES.register()
class GaussianFocalLoss(WeightedLoss):
    """CenterNet heatmap loss on logits against a gaussian target heatmap.

    ``-(1-p)^alpha log p`` where ``target == 1``, ``-(1-y)^beta p^alpha log(1-p)`` elsewhere,
    with ``log p = logsigmoid(x)`` and ``log(1-p) = logsigmoid(-x)``: finite for any logit, so
    the ``clamp(sigmoid, 1e-4, 1-1e-4)`` of the original ``_neg_loss`` (which makes the loss
    NaN in fp16/bf16) is not needed. Normalise with ``avg_factor = number of objects``.
    Shapes: ``pred, target (B, C, H, W)`` (any equal shapes); elementwise loss of that shape.
    """

    kinds = frozenset({"heatmap"})

    def __init__(self, alpha: float = 2.0, beta: float = 4.0, reduction: str = "mean",
                 loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.alpha = float(alpha)
        self.beta = float(beta)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"GaussianFocalLoss: pred {tuple(pred.shape)} and target "
                             f"{tuple(target.shape)} must have the same shape")
        log_p = F.logsigmoid(pred)
        log_not_p = log_p - pred  # log(1 - sigmoid(x)) = logsigmoid(x) - x: one logsigmoid, not two
        p = log_p.exp()
        pos_loss = -log_p * (1 - p).pow(self.alpha)
        neg_loss = -log_not_p * p.pow(self.alpha) * (1 - target).pow(self.beta)
        return torch.where(target.eq(1), pos_loss, neg_loss)
