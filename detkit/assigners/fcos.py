"""FCOS target assignment for a whole batch in one computation on the inputs' device, and FCOS's
centerness target."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from detkit.assigners.base import AssignResult, DenseAssigner, gather_assigned
from detkit.ops.boxes import box_distance_encode
from detkit.ops.priors import Priors
from detkit.registry import ASSIGNERS, ConfigError

INF = 1e8
DEFAULT_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


@ASSIGNERS.register()
class FCOSAssigner(DenseAssigner):
    """Assigns every point of every FPN level to at most one GT box, for all images at once.

    A point is a candidate for a box when it lies inside the box (or, with ``center_sampling``,
    inside the box's centre region of half-size ``center_sample_radius * stride``, clipped to the
    box) and its largest ltrb distance lies in its level's ``regress_ranges`` entry; among
    candidates the box of smallest area wins (ties: the first box). No Python loop over images
    or boxes: GTs come padded ``(B, G)`` with a mask, and points are processed in chunks so that
    memory stays bounded (``max_elements`` entries of ``(B, points, G)`` per chunk).
    """

    def __init__(self, strides: Sequence[int], regress_ranges: Sequence[Sequence[float]] = DEFAULT_RANGES,
                 center_sampling: bool = True, center_sample_radius: float = 1.5,
                 max_elements: int = 1 << 23) -> None:
        if len(regress_ranges) != len(strides):
            raise ConfigError(f"FCOSAssigner: {len(strides)} strides but {len(regress_ranges)} regress_ranges")
        super().__init__(strides)
        self.regress_ranges = torch.tensor([[float(lo), float(hi)] for lo, hi in regress_ranges])
        self.center_sampling = center_sampling
        self.center_sample_radius = float(center_sample_radius)
        self.max_elements = int(max_elements)

    @torch.no_grad()
    def __call__(self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor, num_classes: int,
                 preds: Mapping[str, Any] | None = None) -> AssignResult:
        """Targets for ``priors`` given GT ``boxes (B, G, 4)``, ``labels (B, G)``, ``mask (B, G)``."""
        ranges = self.regress_ranges.to(priors.points.device)[priors.levels]  # (P, 2)
        batch, num_gt = gt_labels.shape
        chunk = max(1, self.max_elements // max(batch * num_gt, 1))
        return AssignResult.cat([
            self._assign(priors.points[i:i + chunk], priors.strides[i:i + chunk], ranges[i:i + chunk], gt_boxes,
                         gt_labels, gt_mask, num_classes) for i in range(0, len(priors.points), chunk)])

    def _assign(self, points: Tensor, strides: Tensor, ranges: Tensor, boxes: Tensor, gt_labels: Tensor,
                gt_mask: Tensor, num_classes: int) -> AssignResult:
        x = points[:, 0].view(1, -1, 1)
        y = points[:, 1].view(1, -1, 1)
        x1, y1, x2, y2 = (boxes[..., k].unsqueeze(1) for k in range(4))  # (B, 1, G)
        left, top, right, bottom = x - x1, y - y1, x2 - x, y2 - y  # (B, P, G)
        if self.center_sampling:
            radius = (strides * self.center_sample_radius).view(1, -1, 1)
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            inside = torch.stack([x - torch.max(cx - radius, x1), y - torch.max(cy - radius, y1),
                                  torch.min(cx + radius, x2) - x, torch.min(cy + radius, y2) - y]).amin(0) > 0
        else:
            inside = torch.stack([left, top, right, bottom]).amin(0) > 0
        max_dist = torch.stack([left, top, right, bottom]).amax(0)
        in_range = (max_dist >= ranges[:, 0].view(1, -1, 1)) & (max_dist <= ranges[:, 1].view(1, -1, 1))
        candidate = inside & in_range & gt_mask.unsqueeze(1)
        area = ((x2 - x1) * (y2 - y1)).expand_as(candidate)
        min_area, index = torch.where(candidate, area, torch.full_like(area, float("inf"))).min(dim=2)
        return gather_assigned(index, torch.isfinite(min_area), boxes, gt_labels, num_classes)


def fcos_targets(points: Tensor, assigned: AssignResult) -> tuple[Tensor, Tensor]:
    """FCOS's regression targets from an assignment: ``ltrb (B, P, 4)`` pixel distances from
    ``points (P, 2)`` to the assigned box and centerness ``(B, P)``
    ``sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))``; both 0 for background."""
    positive = assigned.positive
    ltrb = torch.where(positive.unsqueeze(-1), box_distance_encode(points, assigned.boxes), 0.0)
    lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
    # each ratio clamped at 0: a positive outside its box (SimOTA's centre region) has centerness 0; two
    # negative ratios (a point beyond a corner) must not multiply into a positive one
    ratio = ((lr.amin(-1).clamp(min=0) / lr.amax(-1).clamp(min=1e-12))
             * (tb.amin(-1).clamp(min=0) / tb.amax(-1).clamp(min=1e-12)))
    return ltrb, torch.where(positive, ratio.sqrt(), torch.zeros_like(ratio))
