"""The one interface of dense-head assigners: priors + padded GT -> per-prior targets, whole batch.

An assigner is a registered class built with ``strides=`` (the head's FPN strides) and called as
``assigner(priors, gt_boxes (B, G, 4), gt_labels (B, G), gt_mask (B, G), num_classes, preds=None)``.
``gt_mask`` marks real GT rows (batches are padded to the largest ``G``); ``preds`` is an optional
mapping of detached predictions for assigners that need them (none of the built-in ones do).
It returns an :class:`AssignResult`; the head turns it into its own regression targets.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor

from detkit.ops.priors import Priors


class AssignResult(NamedTuple):
    """``labels (B, P)`` int64 class of the assigned GT (``num_classes`` = background);
    ``boxes (B, P, 4)`` x1y1x2y2 pixels of the assigned GT (zeros for background);
    ``positive (B, P)`` bool."""

    labels: Tensor
    boxes: Tensor
    positive: Tensor

    @staticmethod
    def cat(parts: Sequence["AssignResult"]) -> "AssignResult":
        """Concatenate results of consecutive chunks of priors."""
        return AssignResult(*(torch.cat(field, dim=1) for field in zip(*parts)))


def gather_assigned(index: Tensor, positive: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                    num_classes: int) -> AssignResult:
    """The result for ``index (B, P)`` (GT row per prior) and ``positive (B, P)``."""
    boxes = gt_boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, 4))
    boxes = torch.where(positive.unsqueeze(-1), boxes, torch.zeros_like(boxes))
    labels = torch.where(positive, gt_labels.gather(1, index), torch.full_like(index, num_classes))
    return AssignResult(labels, boxes, positive)


class DenseAssigner:
    """Base of the dense assigners: holds the head's ``strides`` and defines the call signature."""

    def __init__(self, strides: Sequence[int]) -> None:
        self.strides = list(strides)

    def __call__(self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor, num_classes: int,
                 preds: Mapping[str, Any] | None = None) -> AssignResult:
        raise NotImplementedError
