"""Batching: pad images to a common size and keep what is needed to undo the resize."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor


def collate_detection(batch: Sequence[tuple[Tensor, dict[str, Any]]], size_divisor: int = 32) -> dict[str, Any]:
    """Stack ``(image (3, h, w), target)`` items into a padded batch.

    Returns a dict with
        ``images``: ``(B, 3, H, W)`` of the items' dtype, zero-padded at the bottom/right to the
        largest ``h, w`` rounded up to a multiple of ``size_divisor``;
        ``targets``: list of ``{"boxes": float32 (n, 4) x1y1x2y2, "labels": int64 (n,)}`` plain tensors;
        ``image_sizes``: int64 ``(B, 2)`` ``(h, w)`` after transforms, before padding;
        ``orig_sizes``: int64 ``(B, 2)`` ``(h, w)`` of the files;
        ``scale_factors``: float32 ``(B, 2)`` ``(sx, sy)``: original coords = prediction / scale;
        ``image_ids``: list of int.
    """
    images = [item[0] for item in batch]
    sizes = torch.tensor([img.shape[-2:] for img in images], dtype=torch.int64).reshape(-1, 2)
    height = math.ceil(int(sizes[:, 0].max()) / size_divisor) * size_divisor
    width = math.ceil(int(sizes[:, 1].max()) / size_divisor) * size_divisor
    padded = images[0].new_zeros((len(images), images[0].shape[0], height, width)).as_subclass(Tensor)
    for out, img in zip(padded, images):
        out[:, : img.shape[-2], : img.shape[-1]].copy_(img)
    targets = [{"boxes": t["boxes"].as_subclass(Tensor).float(), "labels": t["labels"]} for _, t in batch]
    orig = torch.tensor([t["orig_size"] for _, t in batch], dtype=torch.int64).reshape(-1, 2)
    scale = (sizes.flip(1) / orig.flip(1)).float()
    return {"images": padded, "targets": targets, "image_sizes": sizes, "orig_sizes": orig,
            "scale_factors": scale, "image_ids": [t["image_id"] for _, t in batch]}
