"""Backbones, necks, heads and detectors; ``build_detector(cfg['model'])``."""

from __future__ import annotations

from typing import Any, Mapping

from torch import nn

from detkit.models.backbones import ResNet
from detkit.models.centernet import CenterNet, CenterNetHead, CenterNetOutputs
from detkit.models.detector import Detector
from detkit.models.fcos import FCOS, FCOSHead, FCOSOutputs
from detkit.models.gfl import GFL, GFLHead, GFLOutputs
from detkit.models.necks import FPN, CenterNetNeck
from detkit.models.torchvision_fcos import TorchvisionFCOS
from detkit.registry import DETECTORS


def build_detector(spec: Mapping[str, Any]) -> nn.Module:
    """A detector from the ``model`` section of a config (``{type: FCOS | GFL | CenterNet, ...}``)."""
    return DETECTORS.build(spec, "model")


__all__ = ["build_detector", "Detector", "FCOS", "FCOSHead", "FCOSOutputs", "CenterNet", "CenterNetHead",
           "CenterNetOutputs", "ResNet", "FPN", "CenterNetNeck", "TorchvisionFCOS", "GFL", "GFLHead", "GFLOutputs"]
