"""Box conversions for point-based heads: ltrb distances <-> x1y1x2y2 boxes, clipping.

Conversions between box formats (xywh, cxcywh) are ``torchvision.ops.box_convert``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def distance2bbox(points: Tensor, ltrb: Tensor) -> Tensor:
    """Points ``(..., 2)`` (x, y) and distances ``(..., 4)`` to the left/top/right/bottom sides ->
    boxes ``(..., 4)`` x1y1x2y2."""
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def bbox2distance(points: Tensor, boxes: Tensor) -> Tensor:
    """Points ``(..., 2)`` and boxes ``(..., 4)`` x1y1x2y2 -> ltrb distances ``(..., 4)`` (negative
    where the point lies outside the box)."""
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)


def ltrb_to_boxes(ltrb: Tensor) -> Tensor:
    """Distances ``(..., 4)`` -> the box ``(..., 4)`` they span around the origin.

    IoU losses are translation invariant, so comparing ``ltrb_to_boxes(pred)`` with
    ``ltrb_to_boxes(target)`` needs no point coordinates."""
    return torch.cat([-ltrb[..., :2], ltrb[..., 2:]], dim=-1)


def gather_cells(maps: Tensor, index: Tensor) -> Tensor:
    """``maps (B, K, H, W)`` at flat cells ``index (B, N)`` (``row * W + col``) -> ``(B, N, K)``: the values
    of the chosen cells only, without reordering the whole map."""
    flat = maps.flatten(2)  # (B, K, HW)
    return flat.gather(2, index.unsqueeze(1).expand(-1, maps.shape[1], -1)).transpose(1, 2)


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip ``boxes (B, K, 4)`` to each image's ``(h, w)`` in ``image_sizes (B, 2)``."""
    sizes = image_sizes.to(boxes.device, boxes.dtype)
    upper = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=-1).unsqueeze(1)
    return torch.min(boxes.clamp(min=0), upper)


def aligned_box_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of corresponding boxes ``(..., 4)`` x1y1x2y2 (broadcast) -> ``(...,)``; the pairwise
    ``(N, M)`` form is ``torchvision.ops.box_iou``. Degenerate boxes have area 0 (IoU 0)."""
    wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=eps)
