"""The one interface of dense-head assigners: priors + padded GT -> per-prior targets, whole batch.

An assigner is a registered class built with ``strides=`` (the head's FPN strides) and called as
``assigner(priors, gt_boxes (B, G, 4), gt_labels (B, G), gt_mask (B, G), num_classes, preds=None)``.
``gt_mask`` marks real GT rows (batches are padded to the largest ``G``); ``preds`` is an optional
mapping of detached predictions for the dynamic assigners (TaskAlignedAssigner, SimOTAAssigner):
``scores (B, P, C)`` the head's inference class probabilities and ``boxes (B, P, 4)`` its decoded
boxes, x1y1x2y2 pixels; the FCOS and GFL heads pass it to an assigner whose ``needs_preds`` is
true, static assigners get None. It returns an :class:`AssignResult`; the head turns it into its
own regression targets; GFL's head learns ``scores``, when given, as its quality target (FCOS's
head has no quality target and ignores them).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from detkit.ops.priors import Priors
from detkit.registry import ConfigError, config_path


class AssignResult(NamedTuple):
    """``labels (B, P)`` int64 class of the assigned GT (``num_classes`` = background);
    ``boxes (B, P, 4)`` x1y1x2y2 pixels of the assigned GT (zeros for background);
    ``positive (B, P)`` bool; ``scores (B, P)`` an optional soft classification target for the
    assigned class (TaskAlignedAssigner's normalised alignment metric; 0 for background), None
    when the assigner gives none."""

    labels: Tensor
    boxes: Tensor
    positive: Tensor
    scores: Tensor | None = None

    @staticmethod
    def cat(parts: Sequence["AssignResult"]) -> "AssignResult":
        """Concatenate results of consecutive chunks of priors."""
        # scores is None in every part or in none; the other fields are never None
        return AssignResult(*(None if field[0] is None else torch.cat(field, dim=1)  # type: ignore[arg-type]
                              for field in zip(*parts)))


def gather_assigned(index: Tensor, positive: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                    num_classes: int) -> AssignResult:
    """The result for ``index (B, P)`` (GT row per prior) and ``positive (B, P)``."""
    boxes = gt_boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
    boxes = torch.where(positive.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    labels = torch.where(positive, gt_labels.gather(1, index), torch.full_like(index, num_classes))
    return AssignResult(labels, boxes, positive)


def topk_first(values: Tensor, k: int, dim: int, largest: bool = True) -> Tensor:
    """Indices of the ``k`` largest (or smallest) float ``values`` along ``dim``, equal values in index order.

    ``torch.topk`` leaves the order of equal values unspecified (it differs between a row and the
    same row with extra entries), so the batched assigners and their per-image references would
    disagree on ties. The key is an int64: the float32 bits, turned to sort as the floats do, in the
    high half, and the index (reversed for ``largest``) in the low half.
    """
    bits = (values.float() + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()  # negative floats: reverse their order
    n = values.shape[dim]
    shape = [1] * values.dim()
    shape[dim] = n
    index = torch.arange(n, device=values.device).view(shape)
    key = (bits << 32) | (n - 1 - index if largest else index)
    return key.topk(k, dim=dim, largest=largest).indices


def prediction_inputs(preds: Mapping[str, Any] | None, name: str) -> tuple[Tensor, Tensor]:
    """``scores (B, P, C)`` and ``boxes (B, P, 4)`` from a head's ``preds``, float32 and detached."""
    if preds is None or "scores" not in preds or "boxes" not in preds:
        raise ConfigError(f"{name} assigns from the predictions: its head must pass preds={{'scores', 'boxes'}} "
                          f"(FCOSHead and GFLHead do); use it with one of those heads")
    return preds["scores"].detach().float(), preds["boxes"].detach().float()


def number(value: Any, key: str, minimum: float = 0.0) -> float:
    """``value`` as a finite float ``>= minimum``, else a :class:`ConfigError` naming its config path."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not minimum <= value < math.inf:
        raise ConfigError(f"{config_path(key)} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


class DenseAssigner:
    """Base of the dense assigners: holds the head's ``strides`` and defines the call signature.
    ``needs_preds``: the assigner ranks the head's predictions (it cannot assign from GT geometry alone)."""

    needs_preds: bool = False

    def __init__(self, strides: Sequence[int]) -> None:
        self.strides = list(strides)

    def set_epoch(self, epoch: int) -> None:
        """Called with the number of finished epochs before every training epoch; static assigners ignore it."""

    def __call__(self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor, num_classes: int,
                 preds: Mapping[str, Any] | None = None) -> AssignResult:
        raise NotImplementedError
