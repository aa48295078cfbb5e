"""CenterNet / CornerNet penalty-reduced focal loss on gaussian heatmaps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.losses.reduce import WeightedLoss, float32_target, weight_reduce_loss
from detkit.registry import LOSSES


@LOSSES.register()
class GaussianFocalLoss(WeightedLoss):
    """CenterNet heatmap loss on logits against a gaussian target heatmap.

    ``-pos_weight (1-p)^alpha log p`` where ``target == 1``, ``-neg_weight (1-y)^beta p^alpha
    log(1-p)`` elsewhere, with ``log p = logsigmoid(x)`` and ``log(1-p) = logsigmoid(-x)``:
    finite for any logit, so the ``clamp(sigmoid, 1e-4, 1-1e-4)`` of the original ``_neg_loss``
    (which makes the loss NaN in fp16/bf16) is not needed. Normalise with ``avg_factor = number
    of objects``. ``beta`` is mmdetection's ``gamma``.
    Shapes: ``pred, target (B, C, H, W)`` (any equal shapes); elementwise loss of that shape.

    Sparse positives (mmdetection 3.x, CenterNet-update): ``loss(pred, target, ...,
    pos_inds=i, pos_labels=c)`` with ``pred, target (N, C)`` (all locations flattened) and
    ``i, c (M,)`` int64 takes the positives only at ``pred[i, c]``; the negative term still
    covers every element (it vanishes where ``target == 1``). ``sum`` and ``avg_factor`` reduce
    the positives and negatives together; ``mean`` without ``avg_factor`` averages each part on
    its own (positives over M, negatives over N C) and adds them, as mmdetection; ``none``
    returns the ``(N, C)`` loss with the positive terms added at ``(i, c)``. A ``weight``
    ``(N,)`` or ``(N, C)`` scales both parts (mmdetection ignores it here). These two are keywords
    after ``reduction_override``, where mmdetection takes them third and fourth.
    """

    kinds = frozenset({"heatmap"})

    def __init__(self, alpha: float = 2.0, beta: float = 4.0, reduction: str = "mean",
                 loss_weight: float = 1.0, pos_weight: float = 1.0, neg_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.pos_weight = float(pos_weight)
        self.neg_weight = float(neg_weight)

    def _positive(self, log_p: Tensor) -> Tensor:
        return -self.pos_weight * log_p * (1 - log_p.exp()).pow(self.alpha)

    def _negative(self, log_p: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        log_not_p = log_p - pred  # log(1 - sigmoid(x)) = logsigmoid(x) - x: one logsigmoid, not two
        return -self.neg_weight * log_not_p * log_p.exp().pow(self.alpha) * (1 - target).pow(self.beta)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(f"GaussianFocalLoss: pred {tuple(pred.shape)} and target "
                             f"{tuple(target.shape)} must have the same shape")
        log_p = F.logsigmoid(pred)
        return torch.where(target.eq(1), self._positive(log_p), self._negative(log_p, pred, target))

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,  # type: ignore[override]  # own options
                avg_factor: float | Tensor | None = None, reduction_override: str | None = None,
                pos_inds: Tensor | None = None, pos_labels: Tensor | None = None) -> Tensor:
        if pos_inds is None and pos_labels is None:
            return super().forward(pred, target, weight, avg_factor, reduction_override)
        if pos_inds is None or pos_labels is None or pred.dim() != 2 or pred.shape != target.shape \
                or pos_inds.shape != pos_labels.shape or pos_inds.dim() != 1:
            raise ValueError(f"GaussianFocalLoss: sparse positives need pred and target (N, C) and both "
                             f"pos_inds and pos_labels (M,), got pred {tuple(pred.shape)}, target "
                             f"{tuple(target.shape)}, pos_inds {None if pos_inds is None else tuple(pos_inds.shape)}, "
                             f"pos_labels {None if pos_labels is None else tuple(pos_labels.shape)}")
        reduction = self.reduction_for(reduction_override)
        pred = pred.float()
        log_p = F.logsigmoid(pred)
        negative = self._negative(log_p, pred, float32_target(target))
        positive = self._positive(log_p[pos_inds, pos_labels])
        if reduction == "none":
            dense = negative.index_put((pos_inds, pos_labels), positive, accumulate=True)
            return self.loss_weight * weight_reduce_loss(dense, weight, "none")
        neg_loss = weight_reduce_loss(negative, weight, reduction, avg_factor)  # checks weight's shape
        pos_w = None if weight is None else \
            (weight[pos_inds] if weight.dim() == 1 else weight[pos_inds, pos_labels])
        return self.loss_weight * (weight_reduce_loss(positive, pos_w, reduction, avg_factor) + neg_loss)
