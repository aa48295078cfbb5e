"""Task-aligned assignment (TOOD, Feng et al., ICCV 2021), batched over images and GTs."""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from detkit.assigners.atss import INSIDE_EPS
from detkit.assigners.base import AssignResult, DenseAssigner, gather_assigned, number, prediction_inputs, topk_first
from detkit.ops.boxes import box_distance_encode, box_iou_aligned
from detkit.ops.priors import Priors
from detkit.registry import ASSIGNERS, positive_int

logger = logging.getLogger("detkit")

#: mmdetection's TOOD head adds this to the largest metric of a GT before dividing by it.
NORM_EPS = 1e-7


@ASSIGNERS.register()
class TaskAlignedAssigner(DenseAssigner):
    """TOOD's assignment, as mmdetection's ``TaskAlignedAssigner`` and ``TOODHead`` compute it.

    For each GT, with ``s`` the predicted score of its class and ``u`` the IoU of the predicted box
    with it, the ``topk`` priors of largest alignment metric ``t = s^alpha * u^beta`` (ties: the
    lower prior index) are candidates; those with ``t > 0`` whose point lies inside the GT (0.01 px,
    as ATSS) are positives. A prior positive for several GTs takes the one of highest IoU ``u``
    (not metric: mmdetection's rule; ties: the first GT). The result's ``scores`` are the soft
    classification targets of TOOD's head: ``t / (max t + 1e-7) * max u``, maxima over the priors
    assigned to the same GT.

    During the first ``initial_epochs`` training epochs (the predictions are still noise) it assigns
    as ATSS (``initial``, default ``{topk: 9}``) and gives no ``scores``, as mmdetection's TOOD does;
    the trainer reports the epoch through :meth:`set_epoch`.

    Batched: the ``(B, P, G)`` IoUs and metrics are computed for chunks of GTs of at most
    ``max_elements`` entries; candidates ``(B, topk, G)`` are resolved with two scatters, as in ATSS.

    Args:
        strides: the head's strides (given by the head). topk: candidates per GT. alpha, beta: the
        metric's exponents. initial_epochs: ATSS epochs first (0: none). initial: ATSSAssigner arguments.
    """

    needs_preds = True

    def __init__(self, strides: Sequence[int], topk: int = 13, alpha: float = 1.0, beta: float = 6.0,
                 initial_epochs: int = 4, initial: Mapping[str, Any] | None = None,
                 max_elements: int = 1 << 23) -> None:
        super().__init__(strides)
        self.topk = positive_int(topk, "topk")
        self.alpha, self.beta = number(alpha, "alpha"), number(beta, "beta")
        self.initial_epochs = positive_int(initial_epochs, "initial_epochs", minimum=0)
        self.initial = ASSIGNERS.build({"type": "ATSSAssigner", **(initial or {})}, "initial", strides=self.strides)
        self.max_elements = positive_int(max_elements, "max_elements")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        if self.initial_epochs and self.epoch < self.initial_epochs <= epoch:
            logger.info("TaskAlignedAssigner: task-aligned assignment from epoch %d (ATSS before)", epoch + 1)
        self.epoch = epoch

    @torch.no_grad()
    def __call__(self, priors: Priors, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor, num_classes: int,
                 preds: Mapping[str, Any] | None = None) -> AssignResult:
        """Targets for ``priors`` given GT ``boxes (B, G, 4)``, ``labels (B, G)``, ``mask (B, G)`` and
        ``preds``: ``scores (B, P, C)``, ``boxes (B, P, 4)`` pixels."""
        if self.epoch < self.initial_epochs:
            return self.initial(priors, gt_boxes, gt_labels, gt_mask, num_classes)
        scores, boxes = prediction_inputs(preds, type(self).__name__)
        batch, num_gt = gt_labels.shape
        num_priors = len(priors.points)
        chunk = max(1, self.max_elements // max(batch * num_priors, 1))
        parts = [self._candidates(priors.points, scores, boxes, gt_boxes[:, i:i + chunk], gt_labels[:, i:i + chunk],
                                  gt_mask[:, i:i + chunk]) for i in range(0, num_gt, chunk)]
        candidates, iou, metric, chosen = (torch.cat(p, dim=2) for p in zip(*parts))  # (B, K, G) each
        # A prior chosen by several GTs takes the highest IoU, then the first GT (as ATSSAssigner).
        flat = candidates.flatten(1)
        value = torch.where(chosen, iou, torch.full_like(iou, -1.0)).flatten(1)
        best = torch.full((batch, num_priors), -1.0, device=boxes.device).scatter_reduce(1, flat, value, "amax")
        gt_index = torch.arange(num_gt, device=boxes.device).expand_as(candidates).flatten(1)
        wins = chosen.flatten(1) & (value == best.gather(1, flat))
        index = torch.full_like(best, num_gt, dtype=torch.int64).scatter_reduce(
            1, flat, torch.where(wins, gt_index, num_gt), "amin")
        positive = best >= 0
        wins &= gt_index == index.gather(1, flat)  # exactly one (candidate, GT) entry per positive prior
        prior_metric = torch.zeros_like(best).scatter_reduce(
            1, flat, torch.where(wins, metric.flatten(1), 0.0), "amax")  # metrics >= 0
        return gather_assigned(torch.where(positive, index, 0), positive, gt_boxes, gt_labels, num_classes
                               )._replace(scores=self.normalised(prior_metric, best, index, positive, num_gt))

    def _candidates(self, points: Tensor, scores: Tensor, boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
                    gt_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For a chunk of ``g`` GTs: the top-k priors ``(B, K, g)``, their IoU and metric, and which are chosen."""
        iou = box_iou_aligned(boxes.unsqueeze(2), gt_boxes.unsqueeze(1))  # (B, P, g)
        label_scores = scores.gather(2, gt_labels.unsqueeze(1).expand(-1, scores.shape[1], -1))
        metric = label_scores.pow(self.alpha) * iou.pow(self.beta)
        candidates = topk_first(metric, min(self.topk, metric.shape[1]), dim=1)  # (B, K, g)
        cand_metric, cand_iou = metric.gather(1, candidates), iou.gather(1, candidates)
        inside = box_distance_encode(points[candidates], gt_boxes.unsqueeze(1)).amin(-1) > INSIDE_EPS
        return candidates, cand_iou, cand_metric, (cand_metric > 0) & inside & gt_mask.unsqueeze(1)

    @staticmethod
    def normalised(metric: Tensor, iou: Tensor, index: Tensor, positive: Tensor, num_gt: int) -> Tensor:
        """TOOD's soft targets ``(B, P)``: each positive's metric over the largest metric of its GT's
        positives (+ 1e-7), times the largest IoU among them; 0 for background."""
        slot = torch.where(positive, index, num_gt)  # background into an extra column
        zeros = torch.zeros(metric.shape[0], num_gt + 1, device=metric.device)
        max_metric = zeros.scatter_reduce(1, slot, torch.where(positive, metric, 0.0), "amax").gather(1, slot)
        max_iou = zeros.scatter_reduce(1, slot, torch.where(positive, iou, 0.0), "amax").gather(1, slot)
        return torch.where(positive, metric / (max_metric + NORM_EPS) * max_iou, 0.0)
