"""FCOS target assignment for a whole batch in one computation on the inputs' device."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from detkit.registry import ASSIGNERS, ConfigError

INF = 1e8
DEFAULT_RANGES = ((-1, 64), (64, 128), (128, 256), (256, 512), (512, INF))


def grid_steps(sizes: Sequence[tuple[int, int]], strides: Sequence[int], input_size: tuple[int, int] | None = None
               ) -> list[tuple[int, int]]:
    """Per level ``(step_y, step_x)`` between point centres: the stride, or with ``input_size``
    ``(H // h_l, W // w_l)`` as torchvision's ``AnchorGenerator`` (not the stride on P6/P7 unless
    the padded input is a multiple of 128)."""
    if input_size is None:
        return [(s, s) for s in strides]
    return [(input_size[0] // h, input_size[1] // w) for h, w in sizes]


def fcos_points(sizes: Sequence[tuple[int, int]], strides: Sequence[int], device: torch.device,
                offset: float = 0.5, input_size: tuple[int, int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Centres of every feature-map cell of every level: ``(index + offset) * step``.

    ``offset`` 0.5 (cell centres, mmdetection) or 0 (torchvision); ``step`` is the stride, or see
    ``grid_steps`` for ``input_size``. Returns ``points (P, 2)`` (x, y) in input pixels,
    ``stride (P,)`` (always the nominal stride) and ``level (P,)`` int64, levels concatenated
    finest first, each level row-major like ``(H_l, W_l)``.
    """
    pts, strd, lvl = [], [], []
    steps = grid_steps(sizes, strides, input_size)
    for level, ((h, w), s, (sy, sx)) in enumerate(zip(sizes, strides, steps)):
        ys = (torch.arange(h, device=device, dtype=torch.float32) + offset) * sy
        xs = (torch.arange(w, device=device, dtype=torch.float32) + offset) * sx
        yy, xx = torch.meshgrid(ys, xs, indexing="ij")
        pts.append(torch.stack([xx.reshape(-1), yy.reshape(-1)], dim=1))
        strd.append(torch.full((h * w,), float(s), device=device))
        lvl.append(torch.full((h * w,), level, device=device, dtype=torch.int64))
    return torch.cat(pts), torch.cat(strd), torch.cat(lvl)


@ASSIGNERS.register()
class FCOSAssigner:
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
        self.strides = list(strides)
        self.regress_ranges = torch.tensor([[float(lo), float(hi)] for lo, hi in regress_ranges])
        self.center_sampling = center_sampling
        self.center_sample_radius = float(center_sample_radius)
        self.max_elements = int(max_elements)

    @torch.no_grad()
    def __call__(self, points: Tensor, strides: Tensor, levels: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                 gt_mask: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
        """Targets for ``points (P, 2)`` given GT ``boxes (B, G, 4)``, ``labels (B, G)``, ``mask (B, G)``.

        Returns ``labels (B, P)`` int64 (``num_classes`` = background), ``ltrb (B, P, 4)`` distances
        in pixels to the assigned box (0 for background) and ``centerness (B, P)`` (0 for background).
        """
        ranges = self.regress_ranges.to(points.device)[levels]  # (P, 2)
        batch, num_gt = gt_labels.shape
        chunk = max(1, self.max_elements // max(batch * num_gt, 1))
        outs = [self._assign(points[i:i + chunk], strides[i:i + chunk], ranges[i:i + chunk], gt_boxes,
                             gt_labels, gt_mask, num_classes) for i in range(0, len(points), chunk)]
        return tuple(torch.cat(parts, dim=1) for parts in zip(*outs))

    def _assign(self, points: Tensor, strides: Tensor, ranges: Tensor, boxes: Tensor, gt_labels: Tensor,
                gt_mask: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
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
        positive = torch.isfinite(min_area)  # (B, P)
        box = boxes.gather(1, index.unsqueeze(-1).expand(-1, -1, 4))  # (B, P, 4)
        px, py = points[:, 0].unsqueeze(0), points[:, 1].unsqueeze(0)
        ltrb = torch.stack([px - box[..., 0], py - box[..., 1], box[..., 2] - px, box[..., 3] - py], dim=-1)
        ltrb = torch.where(positive.unsqueeze(-1), ltrb, torch.zeros_like(ltrb))
        labels = torch.where(positive, gt_labels.gather(1, index), torch.full_like(index, num_classes))
        lr, tb = ltrb[..., 0::2], ltrb[..., 1::2]
        ratio = (lr.amin(-1) / lr.amax(-1).clamp(min=1e-12)) * (tb.amin(-1) / tb.amax(-1).clamp(min=1e-12))
        centerness = torch.where(positive, ratio.clamp(min=0).sqrt(), torch.zeros_like(ratio))
        return labels, ltrb, centerness
