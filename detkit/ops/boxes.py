"""Box ops for point-based heads, named like ``torchvision.ops`` (``box_*``): ltrb distances <-> x1y1x2y2
boxes, centres, aligned IoU, clipping.

Each op computes in float32 whatever its inputs' dtype: box coordinates are pixels (up to thousands),
and bfloat16 under autocast keeps 8 bits of mantissa (steps of 4 px at 512 px). Conversions between
box formats (xywh, cxcywh) are ``torchvision.ops.box_convert``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def box_distance_decode(points: Tensor, ltrb: Tensor) -> Tensor:
    """Points ``(..., 2)`` (x, y) and distances ``(..., 4)`` to the left/top/right/bottom sides ->
    boxes ``(..., 4)`` x1y1x2y2, float32."""
    points, ltrb = points.float(), ltrb.float()
    return torch.cat([points - ltrb[..., :2], points + ltrb[..., 2:]], dim=-1)


def box_distance_encode(points: Tensor, boxes: Tensor) -> Tensor:
    """Points ``(..., 2)`` and boxes ``(..., 4)`` x1y1x2y2 -> ltrb distances ``(..., 4)`` float32 (negative
    where the point lies outside the box); the inverse of :func:`box_distance_decode`."""
    points, boxes = points.float(), boxes.float()
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)


def box_around_origin(ltrb: Tensor) -> Tensor:
    """Distances ``(..., 4)`` -> the box ``(..., 4)`` float32 they span around the origin
    (:func:`box_distance_decode` at point (0, 0), without the points).

    IoU losses are translation invariant, so comparing ``box_around_origin(pred)`` with
    ``box_around_origin(target)`` needs no point coordinates."""
    ltrb = ltrb.float()
    return torch.cat([-ltrb[..., :2], ltrb[..., 2:]], dim=-1)


def box_centers(boxes: Tensor) -> Tensor:
    """Boxes ``(..., 4)`` x1y1x2y2 -> their centres ``(..., 2)`` (x, y), float32."""
    boxes = boxes.float()
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def box_clip(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip ``boxes (B, K, 4)`` to each image's ``(h, w)`` in ``image_sizes (B, 2)`` -> float32
    (``torchvision.ops.clip_boxes_to_image`` for a batch of differently sized images)."""
    boxes = boxes.float()
    sizes = image_sizes.to(boxes.device, boxes.dtype)
    upper = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=-1).unsqueeze(1)
    return torch.min(boxes.clamp(min=0), upper)


def box_iou_aligned(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of corresponding boxes ``(..., 4)`` x1y1x2y2 (broadcast) -> ``(...,)`` float32; the pairwise
    ``(N, M)`` form is ``torchvision.ops.box_iou``. Degenerate boxes have area 0 (IoU 0)."""
    boxes1, boxes2 = boxes1.float(), boxes2.float()
    wh = (torch.min(boxes1[..., 2:], boxes2[..., 2:]) - torch.max(boxes1[..., :2], boxes2[..., :2])).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    area1 = (boxes1[..., 2:] - boxes1[..., :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[..., 2:] - boxes2[..., :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=eps)
