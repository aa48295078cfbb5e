"""SimOTA assignment (YOLOX, Ge et al., 2021), batched over images and GTs."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from detkit.assigners.base import AssignResult, DenseAssigner, gather_assigned, number, prediction_inputs, topk_first
from detkit.ops.boxes import box_iou_aligned
from detkit.ops.priors import Priors
from detkit.registry import ASSIGNERS, positive_int

#: mmdetection's cost of a pair whose prior is not both inside the box and near its centre.
OUTSIDE_COST = 1e5
#: Added to the IoU before the log of the IoU cost.
IOU_EPS = 1e-7


@ASSIGNERS.register()
class SimOTAAssigner(DenseAssigner):
    """YOLOX's SimOTA, as mmdetection's ``SimOTAAssigner`` computes it.

    A prior is valid for an image when its point lies inside some GT box or within
    ``center_radius`` strides of some GT centre. For each GT and valid prior the cost is
    ``cls_weight * sum_c BCE(score_c, onehot_c) + iou_weight * -log(IoU + 1e-7)``, plus 1e5 unless
    the point is both inside the box and near its centre; ``score`` is the head's inference score
    (FCOS: ``sqrt(sigmoid(cls) * sigmoid(centerness))``, YOLOX's ``sqrt(cls * objectness)``;
    GFL: ``sigmoid(cls)``). Each GT takes its ``k`` cheapest valid priors (ties: the lower index),
    ``k = max(1, int(sum of its candidate_topk largest IoUs over the valid priors))``; a prior taken
    by several GTs goes to the GT of lowest cost among all the image's GTs (ties: the first).

    Batched: the ``(B, P, G)`` costs are computed for chunks of GTs of at most ``max_elements``
    entries; each GT keeps only its ``candidate_topk`` cheapest priors, and a running minimum
    over the chunks resolves priors taken twice.

    Args:
        strides: the head's strides (given by the head). center_radius: centre region half-size in
        strides. candidate_topk: IoUs summed for k. iou_weight, cls_weight: cost weights.
    """

    needs_preds = True

    def __init__(self, strides: Sequence[int], center_radius: float = 2.5, candidate_topk: int = 10,
                 iou_weight: float = 3.0, cls_weight: float = 1.0, max_elements: int = 1 << 23) -> None:
        super().__init__(strides)
        self.center_radius = number(center_radius, "center_radius")
        self.candidate_topk = positive_int(candidate_topk, "candidate_topk")
        self.iou_weight, self.cls_weight = number(iou_weight, "iou_weight"), number(cls_weight, "cls_weight")
        self.max_elements = positive_int(max_elements, "max_elements")

    @torch.no_grad()
    def __call__(self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor, num_classes: int,
                 preds: Mapping[str, Any] | None = None) -> AssignResult:
        """Targets for ``priors`` given GT ``boxes (B, G, 4)``, ``labels (B, G)``, ``mask (B, G)`` and
        ``preds``: ``scores (B, P, C)`` probabilities, ``boxes (B, P, 4)`` pixels."""
        scores, boxes = prediction_inputs(preds, type(self).__name__)
        batch, num_gt = gt_labels.shape
        num_priors = len(priors.points)
        step = max(1, self.max_elements // max(batch * num_priors, 1))
        chunks = [slice(i, i + step) for i in range(0, num_gt, step)]
        valid = torch.zeros(batch, num_priors, dtype=torch.bool, device=boxes.device)
        for part in chunks:
            valid |= self._regions(priors, gt_boxes[:, part], gt_mask[:, part])[0].any(-1)
        # A GT's class cost is the BCE of every class as a negative with its own class's term swapped
        # for the positive one: no (B, P, G, C) tensor.
        as_negative = F.binary_cross_entropy(scores, scores.new_zeros(()).expand_as(scores), reduction="none")
        negative_sum = as_negative.sum(-1, keepdim=True)  # (B, P, 1)
        count = torch.zeros(batch, num_priors, dtype=torch.int64, device=boxes.device)
        taken_by = torch.full_like(count, -1)
        min_cost = torch.full((batch, num_priors), torch.inf, device=boxes.device)
        argmin = torch.zeros_like(count)
        for part in chunks:
            cost, iou = self._cost(priors, scores, boxes, gt_boxes[:, part], gt_labels[:, part], gt_mask[:, part],
                                   valid, as_negative, negative_sum)
            # k per GT from its largest IoUs over the valid priors (others count 0)
            top_iou = torch.where(valid.unsqueeze(-1), iou, 0.0).topk(min(self.candidate_topk, num_priors), dim=1)
            k = top_iou.values.sum(1).int().clamp(min=1)  # (B, g)
            cheapest = topk_first(cost, min(self.candidate_topk, num_priors), dim=1, largest=False)  # (B, K, g)
            rank = torch.arange(cheapest.shape[1], device=boxes.device).view(1, -1, 1)
            taken = (rank < k.unsqueeze(1)) & cost.gather(1, cheapest).isfinite()  # invalid and padded: inf
            gt_index = torch.arange(part.start, part.start + cost.shape[2], device=boxes.device).expand_as(cheapest)
            count.scatter_add_(1, cheapest.flatten(1), taken.flatten(1).long())
            taken_by.scatter_reduce_(1, cheapest.flatten(1), torch.where(taken, gt_index, -1).flatten(1), "amax")
            chunk_min, chunk_arg = cost.min(dim=2)  # first GT among equal costs
            lower = chunk_min < min_cost  # strict: an earlier chunk's GT wins a tie
            min_cost, argmin = torch.where(lower, chunk_min, min_cost), torch.where(lower, chunk_arg + part.start,
                                                                                    argmin)
        positive = count > 0
        index = torch.where(count > 1, argmin, taken_by.clamp(min=0))
        return gather_assigned(torch.where(positive, index, 0), positive, gt_boxes, gt_labels, num_classes)

    def _regions(self, priors: Priors, gt_boxes: Tensor, gt_mask: Tensor) -> tuple[Tensor, Tensor]:
        """``(B, P, g)``: the point inside the box or its centre region; inside both. Padded GTs: False."""
        x, y = priors.points[:, 0].view(1, -1, 1), priors.points[:, 1].view(1, -1, 1)
        x1, y1, x2, y2 = (gt_boxes[..., k].unsqueeze(1) for k in range(4))  # (B, 1, g)
        # comparisons, not mmdetection's min of differences > 0: the same for finite floats, fewer passes
        in_box = (x > x1) & (y > y1) & (x2 > x) & (y2 > y)
        cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
        radius = (self.center_radius * priors.strides).view(1, -1, 1)
        in_centre = (x > cx - radius) & (y > cy - radius) & (cx + radius > x) & (cy + radius > y)
        real = gt_mask.unsqueeze(1)
        return (in_box | in_centre) & real, in_box & in_centre & real

    def _cost(self, priors: Priors, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
              gt_mask: Tensor, valid: Tensor, as_negative: Tensor, negative_sum: Tensor) -> tuple[Tensor, Tensor]:
        """For a chunk of ``g`` GTs: the cost ``(B, P, g)`` (inf for invalid priors and padded GTs) and the IoUs."""
        iou = box_iou_aligned(boxes.unsqueeze(2), gt_boxes.unsqueeze(1))  # (B, P, g)
        label = gt_labels.unsqueeze(1).expand(-1, boxes.shape[1], -1)
        own = scores.gather(2, label)  # each GT's class score
        cls_cost = (negative_sum - as_negative.gather(2, label)
                    + F.binary_cross_entropy(own, own.new_ones(()).expand_as(own), reduction="none"))
        both = self._regions(priors, gt_boxes, gt_mask)[1]
        cost = cls_cost * self.cls_weight + -torch.log(iou + IOU_EPS) * self.iou_weight + (~both) * OUTSIDE_COST
        return torch.where(valid.unsqueeze(-1) & gt_mask.unsqueeze(1), cost, torch.inf), iou
