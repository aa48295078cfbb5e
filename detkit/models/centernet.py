"""CenterNet ("Objects as Points", Zhou et al. 2019): heatmap + size + offset at stride 4."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.distributed import reduce_mean
from detkit.losses.terms import LossTerms
from detkit.models.detector import Detector
from detkit.models.head import DetectionHead
from detkit.ops.nms import topk_min
from detkit.ops.priors import gather_cells
from detkit.registry import ASSIGNERS, DETECTORS, HEADS, positive_int

#: The loss kinds each CenterNet term takes.
CENTERNET_TERMS = {"heatmap": ("heatmap",), "wh": ("regression",), "offset": ("regression",)}
CENTERNET_LOSSES = {
    "heatmap": {"type": "GaussianFocalLoss", "alpha": 2.0, "beta": 4.0, "loss_weight": 1.0},
    "wh": {"type": "L1Loss", "loss_weight": 0.1},
    "offset": {"type": "L1Loss", "loss_weight": 1.0},
}


class CenterNetOutputs(NamedTuple):
    """CenterNet head outputs on its one stride-``stride`` map: ``heatmap (B, C, H, W)`` logits,
    ``wh (B, 2, H, W)`` box width and height and ``offset (B, 2, H, W)`` the centre's sub-cell
    (x, y) offset, both in stride units."""

    heatmap: Tensor
    wh: Tensor
    offset: Tensor


def branch(in_channels: int, feat_channels: int, out_channels: int) -> nn.Sequential:
    """3x3 conv -> ReLU -> 1x1 conv, CenterNet's output branch."""
    return nn.Sequential(nn.Conv2d(in_channels, feat_channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(feat_channels, out_channels, 1))


@HEADS.register()
class CenterNetHead(DetectionHead):
    """Heatmap (C), wh (2) and offset (2) branches on one stride-``stride`` map.

    Args:
        num_classes: C. in_channels: neck width (given by the detector). feat_channels: branch width.
        stride: output stride (4). heatmap_bias: initial heatmap logit (-2.19 = prior 0.1, as CenterNet).
        assigner: assigner spec (stride filled in). losses: ``{heatmap, wh, offset}`` specs.
        topk, score_thr: inference (peaks kept per image, minimum score). nms_iou: class-aware NMS of
            the peaks at this IoU (null: none, CenterNet's own decoding; the 3x3 peak test is its NMS).
    Forward: ``[(B, in_channels, H, W)]`` -> :class:`CenterNetOutputs`.
    """

    def __init__(self, *, num_classes: int, in_channels: int, feat_channels: int = 64, stride: int = 4,
                 heatmap_bias: float = -2.19, assigner: Mapping[str, Any] | None = None,
                 losses: Mapping[str, Any] | None = None, topk: int = 100, score_thr: float = 0.01,
                 nms_iou: float | None = None) -> None:
        super().__init__()
        self.num_classes = positive_int(num_classes, "num_classes")
        self.stride = int(stride)
        self.heatmap = branch(in_channels, feat_channels, num_classes)
        self.wh = branch(in_channels, feat_channels, 2)
        self.offset = branch(in_channels, feat_channels, 2)
        for module in (self.wh, self.offset):
            last = cast(nn.Conv2d, module[-1])  # branch() ends with a conv that has a bias
            assert last.bias is not None
            nn.init.normal_(last.weight, std=0.001)
            nn.init.zeros_(last.bias)
        heat = cast(nn.Conv2d, self.heatmap[-1])
        assert heat.bias is not None
        nn.init.constant_(heat.bias, heatmap_bias)
        self.assigner = ASSIGNERS.build(dict(assigner or {"type": "CenterNetAssigner"}), "assigner",
                                        stride=self.stride)
        self.losses = LossTerms(losses if losses is not None else CENTERNET_LOSSES, CENTERNET_TERMS)
        self.topk, self.score_thr = positive_int(topk, "topk"), score_thr
        self.nms_iou, self.max_per_img = nms_iou, self.topk

    def forward(self, feats: Sequence[Tensor]) -> CenterNetOutputs:
        x = feats[-1]
        return CenterNetOutputs(self.heatmap(x), self.wh(x), self.offset(x))

    def loss(self, outputs: CenterNetOutputs, gt_boxes: Tensor, gt_labels: Tensor,
             gt_mask: Tensor) -> dict[str, Tensor]:
        """Weighted terms; heatmap normalised by the number of objects, wh/offset by 2x that (per coordinate)."""
        t = self.assigner(gt_boxes, gt_labels, gt_mask, self.num_classes, tuple(outputs.heatmap.shape[-2:]))
        weight = t["mask"].float()
        num_obj = reduce_mean(weight.sum()).clamp(min=1.0)
        return {
            **self.losses("heatmap", outputs.heatmap, t["heatmap"], avg_factor=num_obj),
            **self.losses("wh", gather_cells(outputs.wh, t["index"]), t["wh"], weight=weight, avg_factor=2 * num_obj),
            **self.losses("offset", gather_cells(outputs.offset, t["index"]), t["offset"], weight=weight,
                          avg_factor=2 * num_obj),
        }

    @torch.no_grad()
    def decode(self, outputs: CenterNetOutputs) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k 3x3 peaks per image -> dense ``boxes (B, K, 4)`` input pixels, ``scores (B, K)``, ``labels (B, K)``."""
        height, width = outputs.heatmap.shape[-2:]
        heat = outputs.heatmap.float().sigmoid()
        peaks = (heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)).flatten(1)
        scores, index = peaks.topk(topk_min(peaks, self.topk, 1), dim=1)  # (B, K)
        labels = torch.div(index, height * width, rounding_mode="floor")
        cell = index - labels * (height * width)  # not `%`: a shape-valued modulo fails the dynamo ONNX exporter
        size = gather_cells(outputs.wh, cell)
        shift = gather_cells(outputs.offset, cell)
        row = torch.div(cell, width, rounding_mode="floor")
        cx = ((cell - row * width).float() + shift[..., 0]) * self.stride
        cy = (row.float() + shift[..., 1]) * self.stride
        half_w, half_h = size[..., 0] * self.stride / 2, size[..., 1] * self.stride / 2
        return torch.stack([cx - half_w, cy - half_h, cx + half_w, cy + half_h], dim=-1), scores, labels


@DETECTORS.register()
class CenterNet(Detector):
    """CenterNet detector: ``backbone -> neck (up-sampling to stride 4) -> CenterNetHead``."""
