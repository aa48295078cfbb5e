"""FCOS: anchor-free one-stage detector (Tian et al. 2019), head and detector."""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

from torch import Tensor, nn

from detkit.assigners.fcos import INF, fcos_targets
from detkit.distributed import reduce_mean
from detkit.losses.terms import LossTerms
from detkit.models.dense_head import DenseHead, LevelMaps, flatten_levels, one_level, per_level
from detkit.models.detector import Detector
from detkit.ops.boxes import box_around_origin, box_distance_decode
from detkit.ops.priors import gather_cells
from detkit.registry import DETECTORS, HEADS

#: The loss kinds each FCOS term takes.
FCOS_TERMS = {"cls": ("classification",), "bbox": ("box",), "centerness": ("score",)}
FCOS_LOSSES = {
    "cls": {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0},
    "bbox": {"type": "GIoULoss", "loss_weight": 1.0},
    "centerness": {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0},
}


class FCOSOutputs(NamedTuple):
    """FCOS head outputs, per level (finest first) or of one level: ``cls (B, C, H_l, W_l)`` class
    logits; ``ltrb (B, 4, H_l, W_l)`` float32 distances to the box sides, non-negative, in stride units
    when ``norm_on_bbox`` (else pixels); ``centerness (B, 1, H_l, W_l)`` logits."""

    cls: LevelMaps
    ltrb: LevelMaps
    centerness: LevelMaps


def default_ranges(strides: Sequence[int]) -> list[tuple[float, float]]:
    """FCOS's regress ranges, following ``strides``: a level takes the points whose largest distance to
    the box sides lies above the previous level's bound and up to 8 strides; the last is open-ended.
    For 8..128 these are FCOS's own ``(-1, 64), (64, 128), ..., (512, inf)``; a stride-4 P2 level
    first takes ``(-1, 32)`` (and 8 ``(32, 64)``)."""
    uppers = [8.0 * s for s in strides]
    return [(uppers[i - 1] if i else -1.0, uppers[i] if i < len(uppers) - 1 else INF) for i in range(len(uppers))]


@HEADS.register()
class FCOSHead(DenseHead[FCOSOutputs]):
    """FCOS head: shared cls/reg towers over FPN levels, per-level ``Scale``, centerness branch.

    Args (besides :class:`DenseHead`'s):
        norm_on_bbox: regress ltrb / stride with ReLU (else exp of pixels).
        centerness_on_reg: centerness from the reg tower (else the cls tower).
        prior_prob: initial foreground probability of the classifier bias.
        assigner: assigner spec (default FCOSAssigner with FCOS's regress ranges for ``strides``, see
            :func:`default_ranges`; ATSSAssigner,
            SimOTAAssigner and TaskAlignedAssigner work too: they get ``preds``, the inference scores
            ``sqrt(sigmoid(cls) * sigmoid(centerness))`` and decoded pixel boxes, detached);
        losses: ``{cls, bbox, centerness}`` specs (each a spec or a list of specs, summed and logged separately).
    Forward: FPN maps -> :class:`FCOSOutputs` of per-level lists.
    """

    def __init__(self, *, num_classes: int, in_channels: int, feat_channels: int = 256, num_convs: int = 4,
                 strides: Sequence[int] = (8, 16, 32, 64, 128), norm: str | None = "GN", norm_on_bbox: bool = True,
                 centerness_on_reg: bool = True, prior_prob: float = 0.01,
                 assigner: Mapping[str, Any] | None = None, losses: Mapping[str, Any] | None = None,
                 score_thr: float = 0.05, nms_pre: int = 1000, nms_iou: float = 0.6, max_per_img: int = 100,
                 conv_bias: bool | None = None, point_offset: float = 0.5, stride_from_input: bool = False) -> None:
        spec = dict(assigner or {"type": "FCOSAssigner"})
        if spec.get("type") == "FCOSAssigner" and "regress_ranges" not in spec:
            spec["regress_ranges"] = default_ranges(strides)
        super().__init__(num_classes=num_classes, in_channels=in_channels, feat_channels=feat_channels,
                         num_convs=num_convs, strides=strides, norm=norm, conv_bias=conv_bias, assigner=spec,
                         score_thr=score_thr, nms_pre=nms_pre, nms_iou=nms_iou, max_per_img=max_per_img,
                         point_offset=point_offset, stride_from_input=stride_from_input)
        self.norm_on_bbox = norm_on_bbox
        self.centerness_on_reg = centerness_on_reg
        self.cls_out = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.ctr_out = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.init_weights(self.cls_out, prior_prob)
        self.losses = LossTerms(losses if losses is not None else FCOS_LOSSES, FCOS_TERMS)

    def forward_level(self, cls_feat: Tensor, reg_feat: Tensor, scale: nn.Module) -> FCOSOutputs:
        reg = scale(self.reg_out(reg_feat)).float()
        ctr = self.ctr_out(reg_feat if self.centerness_on_reg else cls_feat)
        return FCOSOutputs(self.cls_out(cls_feat), reg.clamp(min=0) if self.norm_on_bbox else reg.exp(), ctr)

    def loss(self, outputs: FCOSOutputs, gt_boxes: Tensor, gt_labels: Tensor, gt_mask: Tensor) -> dict[str, Tensor]:
        """Weighted loss terms for padded GT ``boxes (B, G, 4)``, ``labels (B, G)``, ``mask (B, G)``."""
        priors = self.priors(per_level(outputs.cls))
        reg = flatten_levels(per_level(outputs.ltrb))  # (B, P, 4)
        preds = None
        if getattr(self.assigner, "needs_preds", False):  # (B, P, C) scores and decoded boxes cost a step time
            pixels = reg.detach() * priors.strides.view(1, -1, 1) if self.norm_on_bbox else reg.detach()
            preds = {"scores": self.dense_scores(outputs), "boxes": box_distance_decode(priors.points, pixels)}
        assigned = self.assigner(priors, gt_boxes, gt_labels, gt_mask, self.num_classes, preds)
        positive = assigned.positive
        ltrb, ctr_target = fcos_targets(priors.points, assigned)
        if self.norm_on_bbox:
            ltrb = ltrb / priors.strides.view(1, -1, 1)
        cls = flatten_levels(per_level(outputs.cls))  # (B, P, C)
        ctr = flatten_levels(per_level(outputs.centerness)).squeeze(-1)  # (B, P)
        num_pos = reduce_mean(positive.sum().float()).clamp(min=1.0)
        ctr_denom = reduce_mean(ctr_target.sum()).clamp(min=1e-6)
        # Box and centerness terms run over every point with zero weight on negatives: no
        # nonzero()/boolean indexing, so no host sync and static shapes for torch.compile.
        return {
            **self.losses("cls", cls, assigned.labels, avg_factor=num_pos),
            **self.losses("bbox", box_around_origin(reg), box_around_origin(ltrb), weight=ctr_target,
                          avg_factor=ctr_denom),
            **self.losses("centerness", ctr, ctr_target, weight=positive.float(), avg_factor=num_pos),
        }

    def level_scores(self, maps: FCOSOutputs) -> Tensor:
        return (one_level(maps.cls).float().sigmoid() * one_level(maps.centerness).float().sigmoid()).sqrt()

    def level_distances(self, maps: FCOSOutputs, point: Tensor, stride: int) -> Tensor:
        ltrb = gather_cells(one_level(maps.ltrb), point)
        return ltrb * stride if self.norm_on_bbox else ltrb


@DETECTORS.register()
class FCOS(Detector):
    """FCOS detector: ``backbone -> neck (FPN) -> FCOSHead``."""
