"""Knowledge distillation: KL divergence between a teacher's and a student's softened distributions."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from detkit.losses.reduce import WeightedLoss
from detkit.registry import LOSSES


def distill_kl(pred: Tensor, soft_label: Tensor, T: float) -> Tensor:
    """``KL(softmax(soft_label / T) || softmax(pred / T))`` averaged over the last dim, times ``T^2``.

    ``pred``, ``soft_label`` ``(..., K)`` logits -> ``(...,)``. The mean over ``K`` (not the sum) and the
    ``T^2`` factor (Hinton et al. 2015: keeps the gradient's size independent of ``T``) are mmdetection's
    ``knowledge_distillation_kl_div_loss``; the teacher side never gets a gradient.
    """
    target = F.softmax(soft_label.detach() / T, dim=-1)
    # kl_div's xlogy: a teacher probability that underflows to 0 adds 0, not NaN
    return F.kl_div(F.log_softmax(pred / T, dim=-1), target, reduction="none").mean(-1) * (T * T)


@LOSSES.register()
class KnowledgeDistillationKLDivLoss(WeightedLoss):
    """mmdetection's ``KnowledgeDistillationKLDivLoss``: see :func:`distill_kl`.

    Args:
        T: temperature, ``>= 1`` as in mmdetection (10 for LD on box distributions, the LD paper's).
    Shapes: ``pred (..., K)`` student logits, ``target (..., K)`` teacher logits (softmax over ``K``:
    classes, or the ``reg_max + 1`` bins of one box side); loss ``(...,)``; ``weight (...,)``.
    """

    kinds = frozenset({"distillation"})

    def __init__(self, T: float = 10.0, reduction: str = "mean", loss_weight: Any = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        if isinstance(T, bool) or not isinstance(T, (int, float)) or not T >= 1:
            raise ValueError(f"KnowledgeDistillationKLDivLoss: T must be a number >= 1 (as mmdetection's), got {T!r}")
        self.T = float(T)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        if target.shape != pred.shape:
            raise ValueError(f"KnowledgeDistillationKLDivLoss: teacher logits {tuple(target.shape)} and student logits "
                             f"{tuple(pred.shape)} must have the same shape")
        return distill_kl(pred, target, self.T)

    def extra_repr(self) -> str:
        return f"T={self.T}, {super().extra_repr()}"
