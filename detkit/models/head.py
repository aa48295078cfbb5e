"""What every detection head shares: ``decode`` to dense candidates, then threshold + NMS."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from detkit.ops.nms import nms_padded, nms_per_image


class DetectionHead(nn.Module):
    """Base of the heads: subclasses give ``forward``, ``loss`` and ``decode``.

    ``decode(outputs)`` -> dense candidates ``boxes (B, K, 4)`` input pixels, ``scores (B, K)``,
    ``labels (B, K)``; this class thresholds them at ``score_thr``, runs class-aware NMS at
    ``nms_iou`` (None: none) and keeps the best ``max_per_img`` per image.
    """

    num_classes: int
    score_thr: float
    nms_iou: float | None
    max_per_img: int

    def decode(self, outputs: Any) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, outputs: Any, image_sizes: Tensor) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes" (n, 4), "scores" (n,), "labels" (n,)}`` sorted by score, boxes clipped
        to ``image_sizes (B, 2)`` (h, w)."""
        boxes, scores, labels = self.decode(outputs)
        return nms_per_image(boxes, scores, labels, image_sizes, self.score_thr, self.nms_iou, self.max_per_img)

    @torch.no_grad()
    def predict_padded(self, outputs: Any, image_sizes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``predict`` as fixed-size tensors (see :func:`detkit.ops.nms_padded`): the export entry point."""
        boxes, scores, labels = self.decode(outputs)
        return nms_padded(boxes, scores, labels, image_sizes, self.score_thr, self.nms_iou, self.max_per_img,
                          self.num_classes)
