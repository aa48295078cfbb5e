"""GFL: Generalized Focal Loss detector (Li et al., NeurIPS 2020), head and detector.

The classifier predicts a joint class-and-localisation-quality score (trained with Quality Focal
Loss against the IoU of the predicted box), and each box side is a distribution over ``reg_max + 1``
bins (trained with Distribution Focal Loss, plus GIoU on its expected value). ATSS assignment, or any
other: with ``TaskAlignedAssigner`` (TOOD's assignment) the quality target is its normalised alignment metric.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detkit.distributed import reduce_mean
from detkit.losses.terms import LossTerms
from detkit.models.dense_head import DenseHead, LevelMaps, flatten_levels, one_level, per_level
from detkit.models.detector import Detector
from detkit.ops.boxes import box_distance_decode, box_distance_encode, box_iou_aligned
from detkit.ops.priors import gather_cells
from detkit.registry import DETECTORS, HEADS, check_keys, positive_int

#: The loss kinds each GFL term takes: the cls term takes a (labels, IoU) quality target.
GFL_TERMS = {"cls": ("quality",), "bbox": ("box",), "dfl": ("distribution",)}
GFL_LOSSES = {
    "cls": {"type": "QualityFocalLoss", "beta": 2.0, "loss_weight": 1.0},
    "bbox": {"type": "GIoULoss", "loss_weight": 2.0},
    "dfl": {"type": "DistributionFocalLoss", "loss_weight": 0.25},
}
#: Optional distillation terms (``model.teacher``, docs/distillation.md): ld on the box distributions, kd on the
#: class scores, both of the positives.
GFL_DISTILL_TERMS = {"ld": ("distillation",), "kd": ("distillation",)}
#: DFL targets stop this far below ``reg_max`` (mmdetection's ``DistancePointBBoxCoder`` eps).
DFL_MARGIN = 0.1


class GFLOutputs(NamedTuple):
    """GFL head outputs, per level (finest first) or of one level: ``cls (B, C, H_l, W_l)`` joint
    class-and-quality logits; ``distribution (B, 4 (reg_max + 1), H_l, W_l)`` float32 logits of each
    side's distance over ``0..reg_max`` strides (sides l, t, r, b in turn)."""

    cls: LevelMaps
    distribution: LevelMaps


def integral(distribution: Tensor, reg_max: int) -> Tensor:
    """Logits ``(..., 4 * (reg_max + 1))`` -> expected distance per side ``(..., 4)`` in bin units."""
    probs = F.softmax(distribution.reshape(*distribution.shape[:-1], 4, reg_max + 1).float(), dim=-1)
    # a product and a sum, not `probs @ bins`: autocast would run the matmul in bf16 (8 px steps on P7)
    return (probs * torch.arange(reg_max + 1, device=probs.device, dtype=probs.dtype)).sum(-1)


@HEADS.register()
class GFLHead(DenseHead[GFLOutputs]):
    """GFL head: the towers of :class:`DenseHead`, a quality-aware classifier and a distribution per box side.

    Args (besides :class:`DenseHead`'s):
        reg_max: bins ``0..reg_max`` per side, in strides (16: sides up to 16 strides).
        prior_prob: initial foreground probability of the classifier bias.
        assigner: default ``{type: ATSSAssigner, topk: 9}``; it gets ``preds`` (sigmoid scores and
            decoded pixel boxes, detached), and its result's ``scores``, when given, replace the IoU
            as the quality target (``{type: TaskAlignedAssigner}``: TOOD's targets).
        losses: ``{cls, bbox, dfl}``: cls a quality loss (QualityFocalLoss or VarifocalLoss) taking
            ``(labels, IoU)``; bbox a box loss on the decoded boxes (stride units); dfl
            DistributionFocalLoss. bbox and dfl are weighted per point by its predicted score and
            normalised by the sum of those weights, as in the paper. Optional, with a ``model.teacher``:
            ld and kd (``KnowledgeDistillationKLDivLoss``), see :meth:`distill_losses`.
    Forward: FPN maps -> :class:`GFLOutputs` of per-level lists.
    """

    def __init__(self, *, num_classes: int, in_channels: int, feat_channels: int = 256, num_convs: int = 4,
                 strides: Sequence[int] = (8, 16, 32, 64, 128), norm: str | None = "GN", reg_max: int = 16,
                 prior_prob: float = 0.01, assigner: Mapping[str, Any] | None = None,
                 losses: Mapping[str, Any] | None = None, score_thr: float = 0.05, nms_pre: int = 1000,
                 nms_iou: float = 0.6, max_per_img: int = 100, conv_bias: bool | None = None,
                 point_offset: float = 0.5) -> None:
        super().__init__(num_classes=num_classes, in_channels=in_channels, feat_channels=feat_channels,
                         num_convs=num_convs, strides=strides, norm=norm, conv_bias=conv_bias,
                         assigner=assigner or {"type": "ATSSAssigner", "topk": 9}, score_thr=score_thr,
                         nms_pre=nms_pre, nms_iou=nms_iou, max_per_img=max_per_img, point_offset=point_offset)
        self.reg_max = positive_int(reg_max, "reg_max")
        self.cls_out = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(feat_channels, 4 * (self.reg_max + 1), 3, padding=1)
        self.init_weights(self.cls_out, prior_prob)
        specs = losses if losses is not None else GFL_LOSSES
        if isinstance(specs, Mapping):  # name the optional terms too when a term is misspelt
            check_keys(specs, [*GFL_TERMS, *GFL_DISTILL_TERMS], "losses", "loss term")
        #: the distillation terms configured (the detector needs a teacher exactly when there are some)
        self.distill_terms = tuple(t for t in GFL_DISTILL_TERMS if isinstance(specs, Mapping) and t in specs)
        self.losses = LossTerms(specs, {**GFL_TERMS, **{t: GFL_DISTILL_TERMS[t] for t in self.distill_terms}})

    def forward_level(self, cls_feat: Tensor, reg_feat: Tensor, scale: nn.Module) -> GFLOutputs:
        return GFLOutputs(self.cls_out(cls_feat), scale(self.reg_out(reg_feat)).float())

    def loss(self, outputs: GFLOutputs, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor,
             teacher: GFLOutputs | None = None) -> dict[str, Tensor]:
        """Weighted loss terms for padded GT ``boxes (B, G, 4)``, ``labels (B, G)``, ``mask (B, G)``;
        ``teacher``: the teacher's outputs on the same batch, for the distillation terms."""
        priors = self.priors(per_level(outputs.cls))
        cls = flatten_levels(per_level(outputs.cls))  # (B, P, C)
        dist = flatten_levels(per_level(outputs.distribution))  # (B, P, 4 (n + 1))
        stride = priors.strides.view(-1, 1)
        points = priors.points / stride  # (P, 2), stride units: every level's boxes on one scale
        pred_boxes = box_distance_decode(points, integral(dist, self.reg_max))  # (B, P, 4)
        scores = self.dense_scores(outputs)  # (B, P, C) sigmoid, detached
        assigned = self.assigner(priors, gt_boxes, gt_labels, gt_mask, self.num_classes,
                                 {"scores": scores, "boxes": pred_boxes.detach() * stride})
        positive = assigned.positive  # (B, P)
        target_boxes = assigned.boxes / stride
        zero = torch.zeros_like(positive, dtype=torch.float32)
        # the quality target: the assigner's soft target (TaskAlignedAssigner), else the predicted box's IoU
        quality = assigned.scores if assigned.scores is not None else torch.where(
            positive, box_iou_aligned(pred_boxes.detach(), target_boxes), zero)
        weight = torch.where(positive, scores.amax(-1), zero)
        num_pos = reduce_mean(positive.sum().float()).clamp(min=1.0)
        weight_sum = reduce_mean(weight.sum()).clamp(min=1.0)
        side_targets = box_distance_encode(points, target_boxes).clamp(0, self.reg_max - DFL_MARGIN)  # (B, P, 4)
        batch, num_points = positive.shape
        # Box and DFL terms run over every point with zero weight on negatives: no boolean indexing,
        # so no host sync and static shapes for torch.compile.
        terms = {
            **self.losses("cls", cls, (assigned.labels, quality), avg_factor=num_pos),
            **self.losses("bbox", pred_boxes, target_boxes, weight=weight, avg_factor=weight_sum),
            **self.losses("dfl", dist.reshape(batch, num_points * 4, self.reg_max + 1),
                          side_targets.reshape(batch, num_points * 4), weight=weight.repeat_interleave(4, dim=1),
                          avg_factor=4 * weight_sum),
        }
        return {**terms, **self.distill_losses(cls, dist, teacher, positive, weight, num_pos)}

    def distill_losses(self, cls: Tensor, dist: Tensor, teacher: GFLOutputs | None, positive: Tensor, weight: Tensor,
                       num_pos: Tensor) -> dict[str, Tensor]:
        """The distillation terms against the ``teacher``'s outputs, on the positives ``(B, P)``.

        ld: each side's bin logits ``(B, 4 P, reg_max + 1)``, weighted by ``weight (B, P)`` (the student's
        score at each positive, as bbox/DFL), summed and divided by 4, as mmdetection's ``LDHead`` (not
        averaged over the positives). kd: the class logits ``cls (B, P, C)`` of the positives, averaged
        over ``num_pos`` (the classification term's normaliser).
        """
        if not self.distill_terms:
            return {}
        if teacher is None:
            raise ValueError(f"{type(self).__name__}: the loss terms {list(self.distill_terms)} need the teacher's "
                             f"outputs (model.teacher)")
        batch, num_points = positive.shape
        terms: dict[str, Tensor] = {}
        if "ld" in self.distill_terms:
            sides = (batch, num_points * 4, self.reg_max + 1)
            target = flatten_levels(per_level(teacher.distribution)).reshape(sides)
            terms.update(self.losses("ld", dist.reshape(sides), target, weight=weight.repeat_interleave(4, dim=1),
                                     avg_factor=4.0))
        if "kd" in self.distill_terms:
            terms.update(self.losses("kd", cls, flatten_levels(per_level(teacher.cls)), weight=positive.float(),
                                     avg_factor=num_pos))
        return terms

    def level_scores(self, maps: GFLOutputs) -> Tensor:
        return one_level(maps.cls).float().sigmoid()

    def level_distances(self, maps: GFLOutputs, point: Tensor, stride: int) -> Tensor:
        return integral(gather_cells(one_level(maps.distribution), point), self.reg_max) * stride


@DETECTORS.register()
class GFL(Detector):
    """GFL detector: ``backbone -> neck (FPN) -> GFLHead``."""

