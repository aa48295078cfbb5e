"""The usual per-image / per-object implementations that detkit's batched code is checked and timed against."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchvision.ops import box_iou

from detkit.ops import Priors, bbox2distance


def seed_compute_cls_loss(preds: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """The FCOS notebook's per-image loop (``compute_cls_loss`` + ``focal_loss_from_logits``)."""
    batch, _, class_num = preds.shape
    num_pos = mask.sum(dim=1).clamp(min=1).float()
    losses = []
    for b in range(batch):
        target = (torch.arange(1, class_num + 1, device=preds.device)[None, :] == targets[b]).float()
        p = preds[b].sigmoid()
        pt = p * target + (1.0 - p) * (1.0 - target)
        w = 0.25 * target + 0.75 * (1.0 - target)
        losses.append((-w * torch.pow(1.0 - pt, 2.0) * pt.log()).sum().view(1))
    return (torch.cat(losses) / num_pos).mean()


def seed_neg_loss(pred: Tensor, target: Tensor) -> Tensor:
    """CenterNet's ``_neg_loss`` (sigmoid + clamp), one stack."""
    pos = target.eq(1).float()
    p = torch.clamp(torch.sigmoid(pred), 1e-4, 1 - 1e-4)
    pos_loss = (torch.log(p) * (1 - p).pow(2) * pos).sum()
    neg_loss = (torch.log(1 - p) * p.pow(2) * (1 - target).pow(4) * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def per_image_fcos_assign(points: Tensor, strides: Tensor, levels: Tensor, boxes: Tensor, labels: Tensor,
                          ranges: Tensor, num_classes: int, radius: float = 1.5) -> list[Tensor]:
    """mmdetection-style reference: a loop over images, each building a ``(P, G, 4)`` tensor."""
    out = []
    rng = ranges[levels]
    for img_boxes, img_labels in zip(boxes, labels):
        x, y = points[:, 0, None], points[:, 1, None]
        ltrb = torch.stack([x - img_boxes[:, 0], y - img_boxes[:, 1], img_boxes[:, 2] - x, img_boxes[:, 3] - y], -1)
        cx, cy = (img_boxes[:, 0] + img_boxes[:, 2]) / 2, (img_boxes[:, 1] + img_boxes[:, 3]) / 2
        r = strides[:, None] * radius
        region = torch.stack([x - torch.max(cx - r, img_boxes[:, 0]), y - torch.max(cy - r, img_boxes[:, 1]),
                              torch.min(cx + r, img_boxes[:, 2]) - x, torch.min(cy + r, img_boxes[:, 3]) - y], -1)
        ok = (region.min(-1).values > 0)
        max_d = ltrb.max(-1).values
        ok &= (max_d >= rng[:, :1]) & (max_d <= rng[:, 1:])
        area = ((img_boxes[:, 2] - img_boxes[:, 0]) * (img_boxes[:, 3] - img_boxes[:, 1]))[None].expand_as(ok)
        min_area, idx = torch.where(ok, area, torch.full_like(area, math.inf)).min(1)
        lab = img_labels[idx].clone()
        lab[min_area == math.inf] = num_classes
        out.append(lab)
    return out


def per_object_heatmap(boxes: Tensor, labels: Tensor, num_classes: int, size: tuple[int, int],
                       stride: int = 4) -> Tensor:
    """mmdetection-style reference: one gaussian drawn per object in a Python loop."""
    from detkit.assigners.centernet import gaussian_radius

    height, width = size
    heat = torch.zeros(boxes.shape[0], num_classes, height, width, device=boxes.device)
    for b in range(boxes.shape[0]):
        for box, label in zip(boxes[b] / stride, labels[b]):
            cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            r = max(0, int(gaussian_radius(box[3] - box[1], box[2] - box[0], 0.7)))
            ys = torch.arange(max(0, cy - r), min(height, cy + r + 1), device=boxes.device)
            xs = torch.arange(max(0, cx - r), min(width, cx + r + 1), device=boxes.device)
            sigma = (2 * r + 1) / 6
            g = torch.exp(-((xs[None] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * sigma * sigma))
            region = heat[b, label, ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
            torch.maximum(region, g, out=region)
    return heat


def per_image_atss_assign(priors: Priors, boxes: Tensor, labels: Tensor, mask: Tensor, topk: int,
                          anchor_scale: float, num_classes: int) -> tuple[Tensor, Tensor]:
    """mmdetection's ATSSAssigner, one image at a time (``box_iou``, ``cdist`` and top-k per image):
    ``labels (B, P)`` (``num_classes`` = background) and assigned ``boxes (B, P, 4)``."""
    out_labels, out_boxes = [], []
    half = (priors.strides * anchor_scale / 2)[:, None]
    anchors = torch.cat([priors.points - half, priors.points + half], 1)
    for img_boxes, img_labels, img_mask in zip(boxes, labels, mask):
        gt, lab = img_boxes[img_mask], img_labels[img_mask]
        if not len(gt):
            out_labels.append(torch.full((len(anchors),), num_classes))
            out_boxes.append(torch.zeros(len(anchors), 4))
            continue
        ious = box_iou(anchors, gt)  # (P, g)
        dist = torch.cdist(priors.points, (gt[:, :2] + gt[:, 2:]) / 2, compute_mode="donot_use_mm_for_euclid_dist")
        cand = torch.cat([dist[s].topk(min(topk, s.stop - s.start), dim=0, largest=False).indices + s.start
                          for s in priors.level_slices()])  # (K, g)
        cand_iou = ious.gather(0, cand)
        positive = cand_iou >= cand_iou.mean(0) + cand_iou.std(0)
        inside = bbox2distance(priors.points[cand], gt[None]).amin(-1) > 0.01
        overlaps = torch.full_like(ious, -math.inf)
        keep = positive & inside
        cols = torch.arange(len(gt)).expand_as(cand)
        overlaps[cand[keep], cols[keep]] = ious[cand[keep], cols[keep]]
        best, index = overlaps.max(1)
        pos = best > -math.inf
        out_labels.append(torch.where(pos, lab[index], num_classes))
        out_boxes.append(torch.where(pos[:, None], gt[index], 0.0))
    return torch.stack(out_labels), torch.stack(out_boxes)
