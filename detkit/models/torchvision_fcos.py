"""torchvision's FCOS behind detkit's detector API: the peer baseline, trained by the same trainer.

Same data pipeline, optimizer, schedule and COCO evaluation as detkit's own FCOS, so accuracy and
speed comparisons differ only in the model code.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection import FCOS as TVFCOS
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from detkit.models.backbones import norm_layer
from detkit.registry import DETECTORS, ConfigError

RESNET_CHANNELS = {18: [128, 256, 512], 34: [128, 256, 512], 50: [512, 1024, 2048], 101: [512, 1024, 2048]}


class LoaderSizedTransform(GeneralizedRCNNTransform):
    """torchvision's normalise-and-batch transform without its resize, in training and at inference: the
    model sees the loader's pixels, as detkit's detectors do (boxes come back in those pixels)."""

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.image_mean}, std={self.image_std}, no resize)"


@DETECTORS.register()
class TorchvisionFCOS(nn.Module):
    """``torchvision.models.detection.FCOS`` with a ResNet + FPN (P6/P7 on P5) backbone.

    Args:
        num_classes: foreground classes (torchvision's head has no background class for FCOS).
        depth, norm: the ResNet (``BN`` trainable, for training from scratch).
        fpn_channels: FPN and head width. num_convs: head tower depth (torchvision: 4, GroupNorm).
        min_size, max_size: None (the default): no resize inside torchvision, in training or at
            inference; the model sees the loader's pixels, as detkit's detectors do. Given (both):
            torchvision's own resize at inference only (its eval() as published); training still takes
            the loader's batch unresized (torchvision would otherwise shrink a batch whose padded short
            side exceeds ``min_size`` and train the peer on other pixels than detkit). A resize in the
            data pipeline that differs from ``min_size`` then evaluates on other pixels than it trained on.
        score_thr, nms_iou, max_per_img: inference.
    Images: ``(B, 3, H, W)`` 0..255 like every detkit detector (scaled to 0..1 for torchvision).
    """

    def __init__(self, num_classes: int, depth: int = 18, norm: str = "BN", fpn_channels: int = 256,
                 num_convs: int = 4, min_size: int | None = None, max_size: int | None = None,
                 score_thr: float = 0.05, nms_iou: float = 0.6, max_per_img: int = 100) -> None:
        super().__init__()
        if depth not in RESNET_CHANNELS:
            raise ConfigError(f"TorchvisionFCOS depth must be one of {sorted(RESNET_CHANNELS)}, got {depth}")
        if (min_size is None) != (max_size is None):
            raise ConfigError("TorchvisionFCOS: give min_size and max_size together (torchvision's resize at "
                              "inference) or neither (the loader's pixels, as detkit's detectors)")
        resnet = getattr(torchvision.models, f"resnet{depth}")(weights=None, norm_layer=norm_layer(norm))
        backbone = BackboneWithFPN(resnet, {"layer2": "0", "layer3": "1", "layer4": "2"}, RESNET_CHANNELS[depth],
                                   fpn_channels, extra_blocks=LastLevelP6P7(fpn_channels, fpn_channels))
        sizes = {} if min_size is None else {"min_size": min_size, "max_size": max_size}
        self.model = TVFCOS(backbone, num_classes, score_thresh=score_thr, nms_thresh=nms_iou,
                            detections_per_img=max_per_img, _skip_resize=True, **sizes)
        if min_size is None:
            t = self.model.transform
            self.model.transform = LoaderSizedTransform(t.min_size, t.max_size, t.image_mean, t.image_std,
                                                        t.size_divisible, t.fixed_size, _skip_resize=True)
        if num_convs != 4:
            self.model.head = FCOSHead(fpn_channels, 1, num_classes, num_convs=num_convs)
        self.num_classes = num_classes

    @staticmethod
    def _inputs(images: Tensor, device: torch.device) -> list[Tensor]:
        return list(images.to(device, non_blocking=True).float().div_(255.0))

    def forward(self, images: Tensor, targets: Sequence[Mapping[str, Tensor]] | None = None):
        """With ``targets``: ``{"cls", "bbox", "centerness"}`` losses (torchvision's, renamed)."""
        device = next(self.parameters()).device
        tv_targets = [{"boxes": t["boxes"].to(device), "labels": t["labels"].to(device)} for t in targets or []]
        losses = self.model(self._inputs(images, device), tv_targets)
        return {"cls": losses["classification"], "bbox": losses["bbox_regression"],
                "centerness": losses["bbox_ctrness"]}

    def loss_names(self) -> list[str]:
        return ["cls", "bbox", "centerness"]

    def loss(self, images: Tensor, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        return self(images, targets)

    @torch.no_grad()
    def predict(self, images: Tensor, image_sizes: Tensor | None = None) -> list[dict[str, Tensor]]:
        """Detections per image in input pixels, clipped to ``image_sizes`` (h, w) when given."""
        device = next(self.parameters()).device
        inputs = self._inputs(images, device)
        if image_sizes is not None:  # drop the batch padding so torchvision clips to the real image
            inputs = [img[:, : int(h), : int(w)] for img, (h, w) in zip(inputs, torch.as_tensor(image_sizes).tolist())]
        was_training = self.model.training
        self.model.eval()
        out = self.model(inputs)
        self.model.train(was_training)
        return [{"boxes": o["boxes"], "scores": o["scores"], "labels": o["labels"]} for o in out]
