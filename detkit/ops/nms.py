"""From dense candidates to detections: score threshold, class-aware NMS, top ``max_per_img``.

Both clip boxes to each image first; ``iou=None`` skips NMS (CenterNet's peaks). ``nms_padded`` runs
one NMS over the whole batch (classes and images kept apart by offsetting boxes) for export.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import batched_nms, nms

from detkit.ops.boxes import box_clip


def topk_min(x: Tensor, k: int, dim: int) -> int | torch.SymInt:
    """``min(k, x.shape[dim])`` that stays dynamic under ``torch.jit.trace`` (a Python ``min`` would be
    frozen into the trace) and symbolic under ``torch.export``."""
    if not torch.jit.is_tracing():
        return torch.sym_min(k, x.shape[dim])  # no guard under torch.export (min() would specialise)
    size = torch._shape_as_tensor(x)[dim].unsqueeze(0)
    return torch.min(torch.cat([torch.tensor([k], dtype=size.dtype), size]))  # type: ignore[return-value]  # a 0-d tensor, traced as int


def image_sizes_of(images: Tensor) -> Tensor:
    """``(B, 2)`` (h, w) of a padded batch, as a tensor that follows the input shape when traced/exported."""
    if torch.jit.is_tracing():
        hw = torch._shape_as_tensor(images)[-2:]
    else:
        hw = torch.tensor(images.shape[-2:], device=images.device)
    return hw.view(1, 2).expand(images.shape[0], 2)


def nms_per_image(boxes: Tensor, scores: Tensor, labels: Tensor, image_sizes: Tensor, score_thr: float,
                  iou: float | None, max_per_img: int) -> list[dict[str, Tensor]]:
    """Threshold, class-wise NMS and top-``max_per_img``, image by image.

    ``boxes (B, K, 4)``, ``scores (B, K)``, ``labels (B, K)`` -> per image ``{"boxes" (n, 4),
    "scores" (n,), "labels" (n,)}`` sorted by score. One ``batched_nms`` per image rather than one
    for the batch: above 4,000 boxes torchvision's CPU ``batched_nms`` loops over groups with a mask
    over all boxes per group, so a whole batch (images x classes groups) costs more than its images.
    """
    boxes = box_clip(boxes, image_sizes)
    results = []
    for img_boxes, img_scores, img_labels in zip(boxes, scores, labels):
        keep = img_scores > score_thr
        img_boxes, img_scores, img_labels = img_boxes[keep], img_scores[keep], img_labels[keep]
        if iou is None:
            kept = img_scores.argsort(descending=True, stable=True)
        else:
            kept = batched_nms(img_boxes, img_scores, img_labels, iou)  # sorted by score
        kept = kept[:max_per_img]
        results.append({"boxes": img_boxes[kept], "scores": img_scores[kept], "labels": img_labels[kept]})
    return results


def nms_padded(boxes: Tensor, scores: Tensor, labels: Tensor, image_sizes: Tensor, score_thr: float,
               iou: float | None, max_per_img: int, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """``nms_per_image`` with fixed-size outputs and no Python loop over images (exportable).

    ``boxes (B, K, 4)``, ``scores (B, K)``, ``labels (B, K)`` -> ``boxes (B, M, 4)``, ``scores (B, M)``,
    ``labels (B, M)`` with ``M = min(max_per_img, K)``, sorted by score; empty slots have box 0, score 0,
    label -1. The score threshold is a boolean mask (NonZero in ONNX); NMS is one class-aware
    ``torchvision.ops.nms`` call over the whole batch (offset trick, ONNX NonMaxSuppression).
    """
    batch, k = scores.shape
    boxes = box_clip(boxes, image_sizes)
    flat_scores = scores.reshape(-1)
    if iou is None:
        valid = (flat_scores > score_thr).to(flat_scores)
    else:
        image = torch.arange(batch, device=boxes.device).view(-1, 1).expand_as(labels)
        flat_boxes = boxes.reshape(-1, 4)
        groups = (image * num_classes + labels).reshape(-1)
        cand = torch.nonzero(flat_scores > score_thr).squeeze(1)
        cand_boxes = flat_boxes[cand]
        # batched_nms's coordinate trick, inlined: torchvision's batched_nms switches to a Python loop
        # over classes above 4000 boxes on CPU, which neither traces nor exports.
        offsets = groups[cand].to(cand_boxes) * (flat_boxes.max() + 1)  # max over all: never empty
        kept = cand[nms(cand_boxes + offsets[:, None], flat_scores[cand], iou)]
        valid = torch.zeros_like(flat_scores).scatter(0, kept, torch.ones_like(flat_scores[kept]))
    valid = valid.view(batch, k)
    dense = torch.where(valid > 0, scores, torch.zeros_like(scores))
    top_scores, top = dense.topk(topk_min(dense, max_per_img, 1), dim=1)
    ok = valid.gather(1, top) > 0
    out_boxes = torch.where(ok.unsqueeze(-1), boxes.gather(1, top.unsqueeze(-1).expand(-1, -1, 4)),
                            torch.zeros_like(top_scores).unsqueeze(-1))
    out_labels = torch.where(ok, labels.gather(1, top), torch.full_like(top, -1))
    return out_boxes, torch.where(ok, top_scores, torch.zeros_like(top_scores)), out_labels
