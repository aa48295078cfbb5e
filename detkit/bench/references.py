"""The usual per-image / per-object implementations that detkit's batched code is checked and timed against."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import box_iou

from detkit.assigners.centernet import gaussian_radius
from detkit.ops import Priors, box_distance_encode


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
            out_labels.append(torch.full((len(anchors),), num_classes, device=anchors.device))
            out_boxes.append(torch.zeros(len(anchors), 4, device=anchors.device))
            continue
        ious = box_iou(anchors, gt)  # (P, g)
        dist = torch.cdist(priors.points, (gt[:, :2] + gt[:, 2:]) / 2, compute_mode="donot_use_mm_for_euclid_dist")
        cand = torch.cat([dist[s].topk(min(topk, s.stop - s.start), dim=0, largest=False).indices + s.start
                          for s in priors.level_slices()])  # (K, g)
        cand_iou = ious.gather(0, cand)
        positive = cand_iou >= cand_iou.mean(0) + cand_iou.std(0)
        inside = box_distance_encode(priors.points[cand], gt[None]).amin(-1) > 0.01
        overlaps = torch.full_like(ious, -math.inf)
        keep = positive & inside
        cols = torch.arange(len(gt), device=gt.device).expand_as(cand)
        overlaps[cand[keep], cols[keep]] = ious[cand[keep], cols[keep]]
        best, index = overlaps.max(1)
        pos = best > -math.inf
        out_labels.append(torch.where(pos, lab[index], num_classes))
        out_boxes.append(torch.where(pos[:, None], gt[index], 0.0))
    return torch.stack(out_labels), torch.stack(out_boxes)


def per_image_task_aligned_assign(priors: Priors, scores: Tensor, pred_boxes: Tensor, boxes: Tensor, labels: Tensor,
                                  mask: Tensor, topk: int, alpha: float, beta: float, num_classes: int
                                  ) -> tuple[Tensor, Tensor, Tensor]:
    """mmdetection's TaskAlignedAssigner and TOODHead's target normalisation, one image and one GT at a
    time, top-k by a stable sort (equal metrics: the lower prior index): ``labels (B, P)``, assigned
    ``boxes (B, P, 4)`` and the normalised alignment metrics ``(B, P)``."""
    out_labels, out_boxes, out_scores = [], [], []
    num_priors = len(priors.points)
    for img_scores, img_pred, img_boxes, img_labels, img_mask in zip(scores, pred_boxes, boxes, labels, mask):
        gt, lab = img_boxes[img_mask], img_labels[img_mask]
        target_labels = torch.full((num_priors,), num_classes, device=gt.device)
        target_boxes = torch.zeros(num_priors, 4, device=gt.device)
        target_scores = torch.zeros(num_priors, device=gt.device)
        if len(gt):
            overlaps = box_iou(img_pred, gt)  # (P, g)
            metric = img_scores[:, lab] ** alpha * overlaps ** beta
            k = min(topk, num_priors)
            cand = torch.stack([torch.sort(metric[:, j], descending=True, stable=True).indices[:k]
                                for j in range(len(gt))], 1)  # (k, g)
            cols = torch.arange(len(gt), device=gt.device).expand_as(cand)
            keep = (metric[cand, cols] > 0) & (box_distance_encode(priors.points[cand], gt[None]).amin(-1) > 0.01)
            overlaps_inf = torch.full_like(overlaps, -math.inf)
            overlaps_inf[cand[keep], cols[keep]] = overlaps[cand[keep], cols[keep]]
            best, index = overlaps_inf.max(1)  # highest IoU, first GT
            pos = best > -math.inf
            target_labels[pos], target_boxes[pos] = lab[index[pos]], gt[index[pos]]
            assigned_metric = metric[torch.arange(num_priors, device=gt.device), index]
            for j in index[pos].unique():
                sel = pos & (index == j)
                target_scores[sel] = assigned_metric[sel] / (assigned_metric[sel].max() + 1e-7) * best[sel].max()
        out_labels.append(target_labels)
        out_boxes.append(target_boxes)
        out_scores.append(target_scores)
    return torch.stack(out_labels), torch.stack(out_boxes), torch.stack(out_scores)


def per_image_simota_assign(priors: Priors, scores: Tensor, pred_boxes: Tensor, boxes: Tensor, labels: Tensor,
                            mask: Tensor, num_classes: int, center_radius: float = 2.5, candidate_topk: int = 10,
                            iou_weight: float = 3.0, cls_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """mmdetection's SimOTAAssigner, one image at a time with a ``(valid priors, GTs, classes)`` BCE and a
    loop over GTs for the dynamic k (stable sort: equal costs, the lower prior index): ``labels (B, P)``
    and assigned ``boxes (B, P, 4)``."""
    out_labels, out_boxes = [], []
    num_priors = len(priors.points)
    x, y, stride = priors.points[:, :1], priors.points[:, 1:], priors.strides[:, None]
    for img_scores, img_pred, img_boxes, img_labels, img_mask in zip(scores, pred_boxes, boxes, labels, mask):
        gt, lab = img_boxes[img_mask], img_labels[img_mask]
        target_labels = torch.full((num_priors,), num_classes, device=gt.device)
        target_boxes = torch.zeros(num_priors, 4, device=gt.device)
        in_gts = torch.stack([x - gt[:, 0], y - gt[:, 1], gt[:, 2] - x, gt[:, 3] - y], 1).min(1).values > 0
        cx, cy = (gt[:, 0] + gt[:, 2]) / 2.0, (gt[:, 1] + gt[:, 3]) / 2.0
        r = center_radius * stride
        in_cts = torch.stack([x - (cx - r), y - (cy - r), (cx + r) - x, (cy + r) - y], 1).min(1).values > 0
        valid = in_gts.any(1) | in_cts.any(1)
        num_valid = int(valid.sum())
        if len(gt) and num_valid:
            both = (in_gts & in_cts)[valid]
            ious = box_iou(img_pred[valid], gt)  # (V, g)
            onehot = F.one_hot(lab, img_scores.shape[-1]).float()[None].repeat(num_valid, 1, 1)
            cls_cost = F.binary_cross_entropy(img_scores[valid][:, None].repeat(1, len(gt), 1), onehot,
                                              reduction="none").sum(-1)
            cost = cls_cost * cls_weight + -torch.log(ious + 1e-7) * iou_weight + (~both) * 1e5
            ks = ious.topk(min(candidate_topk, num_valid), dim=0).values.sum(0).int().clamp(min=1)
            matching = torch.zeros_like(cost)
            for j in range(len(gt)):
                matching[torch.sort(cost[:, j], stable=True).indices[:ks[j]], j] = 1.0
            multi = matching.sum(1) > 1
            if multi.any():
                cheapest = cost[multi].min(1).indices
                matching[multi] = 0.0
                matching[multi.nonzero()[:, 0], cheapest] = 1.0
            fg = matching.sum(1) > 0
            matched = matching[fg].argmax(1)
            rows = valid.nonzero()[:, 0][fg]
            target_labels[rows], target_boxes[rows] = lab[matched], gt[matched]
        out_labels.append(target_labels)
        out_boxes.append(target_boxes)
    return torch.stack(out_labels), torch.stack(out_boxes)
