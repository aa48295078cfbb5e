"""The loss zoo. Every loss follows mmdetection's call semantics, see :mod:`detkit.losses.reduce`."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from detkit.losses.cross_entropy import CrossEntropyLoss
from detkit.losses.distill import KnowledgeDistillationKLDivLoss
from detkit.losses.focal import FocalLoss, FocalLossStar
from detkit.losses.ghm import GHMC, GHMR
from detkit.losses.heatmap import GaussianFocalLoss
from detkit.losses.iou import BoundedIoULoss, CIoULoss, DIoULoss, EIoULoss, GIoULoss, IoULoss, SIoULoss
from detkit.losses.quality import DistributionFocalLoss, QualityFocalLoss, VarifocalLoss
from detkit.losses.reduce import WeightedLoss, weight_reduce_loss
from detkit.losses.regression import BalancedL1Loss, L1Loss, MSELoss, SmoothL1Loss
from detkit.losses.weights import (
    CosineWeight,
    LinearWeight,
    WeightSchedule,
    class_weights_from_counts,
    resolve_class_weights,
)
from detkit.registry import LOSSES


def build_loss(spec: Mapping[str, Any], key: str | None = None) -> nn.Module:
    """Build a loss from ``{type: Name, **kwargs}``; ``key`` names it in error messages."""
    return LOSSES.build(spec, key)


__all__ = ["LOSSES", "build_loss", "WeightedLoss", "weight_reduce_loss", "FocalLoss",
           "CrossEntropyLoss", "SmoothL1Loss", "L1Loss", "IoULoss", "GIoULoss", "DIoULoss",
           "CIoULoss", "EIoULoss", "SIoULoss", "MSELoss", "BalancedL1Loss", "GaussianFocalLoss",
           "QualityFocalLoss", "VarifocalLoss", "DistributionFocalLoss", "WeightSchedule", "LinearWeight",
           "CosineWeight", "GHMC", "GHMR", "BoundedIoULoss", "FocalLossStar", "class_weights_from_counts",
           "resolve_class_weights", "KnowledgeDistillationKLDivLoss"]
