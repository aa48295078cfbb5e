"""ATSS: adaptive training sample selection (Zhang et al., CVPR 2020), batched over images and GTs."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from detkit.assigners.base import AssignResult, DenseAssigner, gather_assigned
from detkit.ops.boxes import box_centers, box_distance_encode, box_iou_aligned
from detkit.ops.priors import Priors
from detkit.registry import ASSIGNERS, ConfigError, config_path, positive_int

#: A candidate's centre must lie this many pixels inside its GT box (mmdetection's 0.01).
INSIDE_EPS = 0.01


@ASSIGNERS.register()
class ATSSAssigner(DenseAssigner):
    """For each GT: on every level the ``topk`` priors closest to its centre are candidates; those
    whose IoU with it reaches ``mean + std`` of the candidates' IoUs, and whose centre lies inside
    it, are positives. A prior positive for several GTs takes the one of highest IoU (ties: the
    first). IoUs are those of each prior's square anchor, side ``anchor_scale * stride`` (8, the
    paper's and mmdetection's ``octave_base_scale``), centred on the point.

    Everything is one computation over images, priors and padded GTs: centre distances ``(B, P, G)``,
    then only the ``(B, K, G)`` candidates; the only loop is over FPN levels, for the per-level top-k.

    Args:
        strides: the head's strides (given by the head). topk: candidates per level and GT.
        anchor_scale: anchor side in strides.
    """

    def __init__(self, strides: Sequence[int], topk: int = 9, anchor_scale: float = 8.0) -> None:
        super().__init__(strides)
        self.topk = positive_int(topk, "topk")
        if (isinstance(anchor_scale, bool) or not isinstance(anchor_scale, (int, float))
                or not 0 < anchor_scale < math.inf):
            raise ConfigError(f"{config_path('anchor_scale')} must be a number > 0 (anchor side in strides), "
                              f"got {anchor_scale!r}")
        self.anchor_scale = float(anchor_scale)

    def anchors(self, priors: Priors) -> Tensor:
        """``(P, 4)`` square anchors of side ``anchor_scale * stride`` centred on the points."""
        half = (priors.strides * self.anchor_scale / 2).unsqueeze(-1)
        return torch.cat([priors.points - half, priors.points + half], dim=-1)

    @torch.no_grad()
    def __call__(self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor, num_classes: int,
                 preds: Mapping[str, Any] | None = None) -> AssignResult:
        """Targets for ``priors`` given GT ``boxes (B, G, 4)``, ``labels (B, G)``, ``mask (B, G)``."""
        batch, num_gt = gt_labels.shape
        points = priors.points
        centres = box_centers(gt_boxes)  # (B, G, 2)
        # exact distances (no matrix-product shortcut, which reorders near ties); one fused kernel
        distance = torch.cdist(points.expand(batch, -1, -1), centres, compute_mode="donot_use_mm_for_euclid_dist")
        candidates = torch.cat([
            distance[:, level].topk(min(self.topk, level.stop - level.start), dim=1, largest=False).indices
            + level.start for level in priors.level_slices()], dim=1)  # (B, K, G) prior indices
        anchors = self.anchors(priors)[candidates]  # (B, K, G, 4)
        boxes = gt_boxes.unsqueeze(1)  # (B, 1, G, 4)
        iou = box_iou_aligned(anchors, boxes)  # (B, K, G)
        threshold = iou.mean(1, keepdim=True) + iou.std(1, keepdim=True).nan_to_num(0.0)  # one candidate: std 0
        inside = box_distance_encode(points[candidates], boxes).amin(-1) > INSIDE_EPS
        chosen = (iou >= threshold) & inside & gt_mask.unsqueeze(1)
        # A prior chosen by several GTs takes the highest IoU, then the first GT: two scatters over
        # the (B, K, G) candidates instead of a max over a dense (B, P, G) IoU matrix.
        flat = candidates.flatten(1)
        value = torch.where(chosen, iou, torch.full_like(iou, -1.0)).flatten(1)
        best = torch.full((batch, len(points)), -1.0, device=points.device).scatter_reduce(1, flat, value, "amax")
        gt_index = torch.arange(num_gt, device=points.device).expand_as(candidates).flatten(1)
        wins = chosen.flatten(1) & (value == best.gather(1, flat))
        index = torch.full_like(best, num_gt, dtype=torch.int64).scatter_reduce(
            1, flat, torch.where(wins, gt_index, num_gt), "amin")
        positive = best >= 0
        return gather_assigned(torch.where(positive, index, 0), positive, gt_boxes, gt_labels, num_classes)
