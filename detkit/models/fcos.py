"""FCOS: anchor-free one-stage detector (Tian et al. 2019), head and detector."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import batched_nms, nms

from detkit.assigners.fcos import DEFAULT_RANGES, INF, fcos_points, grid_steps
from detkit.distributed import reduce_mean
from detkit.losses.terms import LossTerms
from detkit.models.detector import Detector
from detkit.registry import ASSIGNERS, DETECTORS, HEADS, positive_int

#: The loss kinds each FCOS term takes.
FCOS_TERMS = {"cls": ("classification",), "bbox": ("box",), "centerness": ("score",)}
FCOS_LOSSES = {
    "cls": {"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25, "loss_weight": 1.0},
    "bbox": {"type": "GIoULoss", "loss_weight": 1.0},
    "centerness": {"type": "CrossEntropyLoss", "use_sigmoid": True, "loss_weight": 1.0},
}


class Scale(nn.Module):
    """A learnable scalar multiplier (one per FPN level for the box branch)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(float(value)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def conv_tower(in_channels: int, channels: int, num_convs: int, norm: str | None, bias: bool | None = None
               ) -> nn.Sequential:
    """``num_convs`` x (3x3 conv -> GroupNorm if ``norm == 'GN'`` -> ReLU).

    GroupNorm has 32 groups, or ``channels // 2`` below 64 channels: a group of one channel on the
    1x1 P7 map of a small image would normalise a single value (PyTorch refuses it at batch 1).

    ``bias``: conv bias (default: only without a norm; torchvision's FCOS has one before GN,
    which GN does not cancel since it varies within a group).
    """
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers.append(nn.Conv2d(in_channels if i == 0 else channels, channels, 3, padding=1,
                                bias=norm is None if bias is None else bias))
        if norm == "GN":
            layers.append(nn.GroupNorm(min(32, max(channels // 2, 1)), channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def default_ranges(num_levels: int) -> list[tuple[float, float]]:
    """FCOS's regress ranges for the first ``num_levels`` levels; the last is open-ended."""
    ranges = [tuple(r) for r in DEFAULT_RANGES[:num_levels]]
    ranges[-1] = (ranges[-1][0], INF)
    return ranges


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """Per-level ``(B, K, H_l, W_l)`` -> ``(B, sum_l H_l W_l, K)``, finest level first."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


def ltrb_to_boxes(ltrb: Tensor) -> Tensor:
    """Distances ``(..., 4)`` from a point to box sides -> box ``(..., 4)`` x1y1x2y2 around (0, 0)."""
    return torch.cat([-ltrb[..., :2], ltrb[..., 2:]], dim=-1)


@HEADS.register()
class FCOSHead(nn.Module):
    """FCOS head: shared cls/reg towers over FPN levels, per-level ``Scale``, centerness branch.

    Args:
        num_classes: foreground classes C. in_channels: FPN width (given by the detector).
        feat_channels, num_convs, norm (``GN`` or null): the two towers.
        strides: one per FPN level. norm_on_bbox: regress ltrb / stride with ReLU (else exp).
        centerness_on_reg: centerness from the reg tower (else the cls tower).
        prior_prob: initial foreground probability of the classifier bias.
        assigner: assigner spec (strides are filled in); losses: ``{cls, bbox, centerness}``
            specs (each a spec or a list of specs, summed and logged separately).
        score_thr, nms_pre, nms_iou, max_per_img: inference.
        conv_bias: tower conv bias (null: only when ``norm`` is null; true for torchvision weights).
        point_offset: point centres at ``(index + point_offset) * stride`` (0.5; torchvision: 0).
        stride_from_input: space the points ``input // map size`` apart per axis like torchvision's
            AnchorGenerator (differs from the stride on P6/P7 unless the padded input is a multiple
            of 128; the input size is taken as the first level's size times its stride).
    Forward: FPN maps -> ``(cls (B, C, H_l, W_l), bbox (B, 4, H_l, W_l), centerness (B, 1, H_l, W_l))``
    lists; ``bbox`` is non-negative ltrb in stride units when ``norm_on_bbox``, pixels otherwise.
    """

    def __init__(self, num_classes: int, in_channels: int, feat_channels: int = 256, num_convs: int = 4,
                 strides: Sequence[int] = (8, 16, 32, 64, 128), norm: str | None = "GN", norm_on_bbox: bool = True,
                 centerness_on_reg: bool = True, prior_prob: float = 0.01,
                 assigner: Mapping[str, Any] | None = None, losses: Mapping[str, Any] | None = None,
                 score_thr: float = 0.05, nms_pre: int = 1000, nms_iou: float = 0.6, max_per_img: int = 100,
                 conv_bias: bool | None = None, point_offset: float = 0.5, stride_from_input: bool = False) -> None:
        super().__init__()
        self.num_classes = positive_int(num_classes, "num_classes")
        self.strides = list(strides)
        self.norm_on_bbox = norm_on_bbox
        self.centerness_on_reg = centerness_on_reg
        self.point_offset, self.stride_from_input = float(point_offset), bool(stride_from_input)
        self.cls_tower = conv_tower(in_channels, feat_channels, num_convs, norm, conv_bias)
        self.reg_tower = conv_tower(in_channels, feat_channels, num_convs, norm, conv_bias)
        self.cls_out = nn.Conv2d(feat_channels, num_classes, 3, padding=1)
        self.reg_out = nn.Conv2d(feat_channels, 4, 3, padding=1)
        self.ctr_out = nn.Conv2d(feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self._init_weights(prior_prob)
        spec = dict(assigner or {"type": "FCOSAssigner"})
        if spec.get("type") == "FCOSAssigner" and "regress_ranges" not in spec:
            spec["regress_ranges"] = default_ranges(len(self.strides))
        self.assigner = ASSIGNERS.build(spec, "assigner", strides=self.strides)
        self.losses = LossTerms(losses if losses is not None else FCOS_LOSSES, FCOS_TERMS)
        self.score_thr, self.nms_pre, self.nms_iou, self.max_per_img = score_thr, nms_pre, nms_iou, max_per_img

    def _init_weights(self, prior_prob: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.constant_(self.cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward(self, feats: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        if len(feats) != len(self.strides):
            raise ValueError(f"FCOSHead has {len(self.strides)} strides but got {len(feats)} feature maps")
        cls_scores, bbox_preds, centernesses = [], [], []
        for feat, scale, stride in zip(feats, self.scales, self.strides):
            cls_feat, reg_feat = self.cls_tower(feat), self.reg_tower(feat)
            cls_scores.append(self.cls_out(cls_feat))
            reg = scale(self.reg_out(reg_feat)).float()
            bbox_preds.append(reg.clamp(min=0) if self.norm_on_bbox else reg.exp())
            centernesses.append(self.ctr_out(reg_feat if self.centerness_on_reg else cls_feat))
        return cls_scores, bbox_preds, centernesses

    def _input_size(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        if not self.stride_from_input:
            return None
        return sizes[0][0] * self.strides[0], sizes[0][1] * self.strides[0]

    def points(self, cls_scores: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        return fcos_points(sizes, self.strides, cls_scores[0].device, self.point_offset, self._input_size(sizes))

    def loss(self, outputs: tuple[list[Tensor], list[Tensor], list[Tensor]], gt_boxes: Tensor, gt_labels: Tensor,
             gt_mask: Tensor) -> dict[str, Tensor]:
        """Weighted loss terms for padded GT ``boxes (B, G, 4)``, ``labels (B, G)``, ``mask (B, G)``."""
        cls_scores, bbox_preds, centernesses = outputs
        points, strides, levels = self.points(cls_scores)
        labels, ltrb, ctr_target = self.assigner(points, strides, levels, gt_boxes, gt_labels, gt_mask,
                                                 self.num_classes)
        if self.norm_on_bbox:
            ltrb = ltrb / strides.view(1, -1, 1)
        cls = flatten_levels(cls_scores)  # (B, P, C)
        reg = flatten_levels(bbox_preds)  # (B, P, 4)
        ctr = flatten_levels(centernesses).squeeze(-1)  # (B, P)
        positive = (labels < self.num_classes).float()
        num_pos = reduce_mean(positive.sum()).clamp(min=1.0)
        ctr_denom = reduce_mean(ctr_target.sum()).clamp(min=1e-6)
        # Box and centerness terms run over every point with zero weight on negatives: no
        # nonzero()/boolean indexing, so no host sync and static shapes for torch.compile.
        return {
            **self.losses("cls", cls, labels, avg_factor=num_pos),
            **self.losses("bbox", ltrb_to_boxes(reg), ltrb_to_boxes(ltrb), weight=ctr_target, avg_factor=ctr_denom),
            **self.losses("centerness", ctr, ctr_target, weight=positive, avg_factor=num_pos),
        }

    @torch.no_grad()
    def decode(self, outputs: tuple[list[Tensor], list[Tensor], list[Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
        """Dense pre-NMS candidates: top ``nms_pre`` per level -> ``boxes (B, K, 4)``, ``scores (B, K)``,
        ``labels (B, K)``. No data-dependent Python control flow: traceable and exportable."""
        cls_scores, bbox_preds, centernesses = outputs
        batch = cls_scores[0].shape[0]
        all_scores, all_boxes, all_labels = [], [], []
        sizes = [tuple(c.shape[-2:]) for c in cls_scores]
        steps = grid_steps(sizes, self.strides, self._input_size(sizes))
        for cls, reg, ctr, stride, (sy, sx) in zip(cls_scores, bbox_preds, centernesses, self.strides, steps):
            w = cls.shape[-1]
            # fp32 scores even under autocast: bf16 keeps 3 digits, too coarse to rank for COCO AP
            scores = (cls.float().sigmoid() * ctr.float().sigmoid()).sqrt().permute(0, 2, 3, 1).reshape(batch, -1)
            scores, index = scores.topk(topk_min(scores, self.nms_pre, 1), dim=1)
            point = torch.div(index, self.num_classes, rounding_mode="floor")
            label = index % self.num_classes
            ltrb = reg.float().permute(0, 2, 3, 1).reshape(batch, -1, 4).gather(1, point.unsqueeze(-1).expand(-1, -1, 4))
            ltrb = ltrb * stride if self.norm_on_bbox else ltrb
            # row/col without `point % w`: a shape-valued modulo does not convert with the dynamo exporter
            row = torch.div(point, w, rounding_mode="floor")
            cx = ((point - row * w).float() + self.point_offset) * sx
            cy = (row.float() + self.point_offset) * sy
            all_boxes.append(torch.stack([cx - ltrb[..., 0], cy - ltrb[..., 1], cx + ltrb[..., 2],
                                          cy + ltrb[..., 3]], dim=-1))
            all_scores.append(scores)
            all_labels.append(label)
        return torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1)

    @torch.no_grad()
    def predict(self, outputs: tuple[list[Tensor], list[Tensor], list[Tensor]], image_sizes: Tensor
                ) -> list[dict[str, Tensor]]:
        """Per image ``{"boxes" (n, 4), "scores" (n,), "labels" (n,)}`` sorted by score, boxes clipped."""
        boxes, scores, labels = self.decode(outputs)
        return nms_per_image(boxes, scores, labels, image_sizes, self.score_thr, self.nms_iou, self.max_per_img,
                             self.num_classes)

    @torch.no_grad()
    def predict_padded(self, outputs: tuple[list[Tensor], list[Tensor], list[Tensor]], image_sizes: Tensor
                       ) -> tuple[Tensor, Tensor, Tensor]:
        """``predict`` as fixed-size tensors (see ``nms_padded``): the export entry point."""
        boxes, scores, labels = self.decode(outputs)
        return nms_padded(boxes, scores, labels, image_sizes, self.score_thr, self.nms_iou, self.max_per_img,
                          self.num_classes)


def topk_min(x: Tensor, k: int, dim: int) -> int:
    """``min(k, x.shape[dim])`` that stays dynamic under ``torch.jit.trace`` (a Python ``min`` would be
    frozen into the trace) and symbolic under ``torch.export``."""
    if not torch.jit.is_tracing():
        return torch.sym_min(k, x.shape[dim])  # no guard under torch.export (min() would specialise)
    size = torch._shape_as_tensor(x)[dim].unsqueeze(0)
    return torch.min(torch.cat([torch.tensor([k], dtype=size.dtype), size]))  # type: ignore[return-value]


def image_sizes_of(images: Tensor) -> Tensor:
    """``(B, 2)`` (h, w) of a padded batch, as a tensor that follows the input shape when traced/exported."""
    if torch.jit.is_tracing():
        hw = torch._shape_as_tensor(images)[-2:]
    else:
        hw = torch.tensor(images.shape[-2:], device=images.device)
    return hw.view(1, 2).expand(images.shape[0], 2)


def clip_boxes(boxes: Tensor, image_sizes: Tensor) -> Tensor:
    """Clip ``boxes (B, K, 4)`` to each image's ``(h, w)`` in ``image_sizes (B, 2)``."""
    sizes = image_sizes.to(boxes.device, boxes.dtype)
    upper = torch.stack([sizes[:, 1], sizes[:, 0], sizes[:, 1], sizes[:, 0]], dim=-1).unsqueeze(1)
    return torch.min(boxes.clamp(min=0), upper)


def nms_per_image(boxes: Tensor, scores: Tensor, labels: Tensor, image_sizes: Tensor, score_thr: float,
                  iou: float, max_per_img: int, num_classes: int) -> list[dict[str, Tensor]]:
    """Threshold, class-wise NMS and top-``max_per_img`` for a batch in one ``batched_nms`` call.

    ``boxes (B, K, 4)``, ``scores (B, K)``, ``labels (B, K)`` -> one dict per image.
    """
    batch = boxes.shape[0]
    boxes = clip_boxes(boxes, image_sizes)
    image = torch.arange(batch, device=boxes.device).view(-1, 1).expand_as(labels)
    keep = scores > score_thr
    boxes, scores, labels, image = boxes[keep], scores[keep], labels[keep], image[keep]
    kept = batched_nms(boxes, scores, image * num_classes + labels, iou)  # sorted by score
    image = image[kept]
    results = []
    for i in range(batch):
        sel = kept[image == i][:max_per_img]
        results.append({"boxes": boxes[sel], "scores": scores[sel], "labels": labels[sel]})
    return results


@DETECTORS.register()
class FCOS(Detector):
    """FCOS detector: ``backbone -> neck (FPN) -> FCOSHead``."""


def nms_padded(boxes: Tensor, scores: Tensor, labels: Tensor, image_sizes: Tensor, score_thr: float, iou: float,
               max_per_img: int, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """``nms_per_image`` with fixed-size outputs and no Python loop over images (exportable).

    ``boxes (B, K, 4)``, ``scores (B, K)``, ``labels (B, K)`` -> ``boxes (B, M, 4)``, ``scores (B, M)``,
    ``labels (B, M)`` with ``M = min(max_per_img, K)``, sorted by score; empty slots have box 0, score 0,
    label -1. The score threshold is a boolean mask (NonZero in ONNX); NMS is one class-aware
    ``torchvision.ops.nms`` call over the whole batch (offset trick, ONNX NonMaxSuppression).
    """
    batch, k = scores.shape
    boxes = clip_boxes(boxes, image_sizes)
    image = torch.arange(batch, device=boxes.device).view(-1, 1).expand_as(labels)
    flat_boxes, flat_scores = boxes.reshape(-1, 4), scores.reshape(-1)
    groups = (image * num_classes + labels).reshape(-1)
    cand = torch.nonzero(flat_scores > score_thr).squeeze(1)
    cand_boxes = flat_boxes[cand]
    # batched_nms's coordinate trick, inlined: torchvision's batched_nms switches to a Python loop
    # over classes above 4000 boxes on CPU, which neither traces nor exports.
    offsets = groups[cand].to(cand_boxes) * (flat_boxes.max() + 1)  # max over all: never empty
    kept = cand[nms(cand_boxes + offsets[:, None], flat_scores[cand], iou)]
    dense = torch.zeros_like(flat_scores).scatter(0, kept, flat_scores[kept]).view(batch, k)
    valid = torch.zeros_like(flat_scores).scatter(0, kept, torch.ones_like(flat_scores[kept])).view(batch, k)
    top_scores, top = dense.topk(topk_min(dense, max_per_img, 1), dim=1)
    ok = valid.gather(1, top) > 0
    out_boxes = torch.where(ok.unsqueeze(-1), boxes.gather(1, top.unsqueeze(-1).expand(-1, -1, 4)),
                            torch.zeros_like(top_scores).unsqueeze(-1))
    out_labels = torch.where(ok, labels.gather(1, top), torch.full_like(top, -1))
    return out_boxes, torch.where(ok, top_scores, torch.zeros_like(top_scores)), out_labels
