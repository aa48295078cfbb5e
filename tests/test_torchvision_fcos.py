"""The torchvision FCOS peer sees the same pixels as detkit's detectors, in training and evaluation."""

from __future__ import annotations

import pytest
import torch

from detkit.models import build_detector
from detkit.registry import ConfigError

SPEC = {"type": "TorchvisionFCOS", "num_classes": 3, "depth": 18, "fpn_channels": 32, "num_convs": 1}


def predict_seen_by_backbone(model, images: torch.Tensor) -> tuple[tuple[int, ...], list[dict]]:
    """``model.predict(images)``'s detections and the (B, 3, H, W) shape that reached the backbone."""
    seen = []
    handle = model.model.backbone.register_forward_pre_hook(lambda mod, args: seen.append(tuple(args[0].shape)))
    out = model.predict(images, torch.tensor([[images.shape[2], images.shape[3]]] * len(images)))
    handle.remove()
    return seen[0], out


def test_evaluation_takes_the_loaders_pixels_by_default():
    """A model trained on 96x64 images (a data-pipeline resize) is evaluated on 96x64, not on
    torchvision's resize of them to min_size (which left a 96-px BCCD dry run at AP 0.0 before)."""
    torch.manual_seed(0)
    model = build_detector(SPEC).eval()
    images = torch.randint(0, 256, (2, 3, 96, 64), dtype=torch.uint8)
    shape, out = predict_seen_by_backbone(model, images)
    assert shape == (2, 3, 96, 64)
    boxes = out[0]["boxes"]
    assert boxes.numel() == 0 or (boxes[:, 2].max() <= 64 and boxes[:, 3].max() <= 96)  # the input's pixels


def test_min_and_max_size_keep_torchvisions_own_inference_resize():
    model = build_detector({**SPEC, "min_size": 256, "max_size": 512}).eval()
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    assert predict_seen_by_backbone(model, images)[0] == (1, 3, 256, 256)  # torchvision's resize to min_size


@pytest.mark.parametrize("sizes", [{"min_size": 128}, {"max_size": 256}])
def test_min_size_without_max_size_is_refused(sizes):
    with pytest.raises(ConfigError, match="give min_size and max_size together"):
        build_detector({**SPEC, **sizes})
