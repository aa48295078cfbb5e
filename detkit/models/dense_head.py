"""The shared layer of point-based dense heads (FCOS, GFL): towers, per-level scales, priors, decode."""

from __future__ import annotations

import math
from typing import Any, Generic, Iterator, Mapping, Protocol, Sequence, TypeVar, Union

import torch
from torch import Tensor, nn

from detkit.assigners.base import DenseAssigner
from detkit.models.head import DetectionHead
from detkit.ops.nms import topk_min
from detkit.ops.priors import Priors, dense_points, grid_steps
from detkit.registry import ASSIGNERS, positive_int


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


#: A field of a dense head's outputs: the per-level maps ``[(B, K, H_l, W_l)]`` finest first (``forward``),
#: or one level's map ``(B, K, H, W)`` (``forward_level``, ``level_scores``, ``level_distances``).
LevelMaps = Union[list[Tensor], Tensor]


class DenseOutputs(Protocol):
    """What :class:`DenseHead` reads of its subclass's outputs (a ``NamedTuple`` of :data:`LevelMaps`,
    e.g. ``FCOSOutputs``): the class logits ``cls`` ``(B, C, H_l, W_l)`` and the fields in order."""

    @property
    def cls(self) -> LevelMaps: ...

    def __iter__(self) -> Iterator[LevelMaps]: ...


#: A dense head's outputs type (``FCOSOutputs``, ``GFLOutputs``): what its methods take and return.
Outputs = TypeVar("Outputs", bound=DenseOutputs)


def split_levels(outputs: Outputs) -> list[Outputs]:
    """A head's outputs with per-level lists -> one outputs of the same type per level (its maps)."""
    return [type(outputs)(*maps) for maps in zip(*outputs)]


def per_level(maps: LevelMaps) -> Sequence[Tensor]:
    """A field of a head's ``forward`` outputs: its per-level maps ``[(B, K, H_l, W_l)]``."""
    assert not isinstance(maps, Tensor), "one level's map where a head's per-level maps belong"
    return maps


def one_level(maps: LevelMaps) -> Tensor:
    """A field of one level's outputs (``forward_level``, :func:`split_levels`): its map ``(B, K, H, W)``."""
    assert isinstance(maps, Tensor), "per-level maps where one level's map belongs"
    return maps


def flatten_levels(maps: Sequence[Tensor]) -> Tensor:
    """Per-level ``(B, K, H_l, W_l)`` -> ``(B, sum_l H_l W_l, K)``, finest level first."""
    return torch.cat([m.permute(0, 2, 3, 1).reshape(m.shape[0], -1, m.shape[1]) for m in maps], dim=1)


class DenseHead(DetectionHead, Generic[Outputs]):
    """Shared cls/reg towers over FPN levels, a learnable ``Scale`` per level, point priors, decoding.

    Subclasses add their output convs, call :meth:`init_weights`, and give ``forward_level`` (one
    level's outputs as a ``NamedTuple`` whose first field is ``cls``, the class logits ``(B, C, H, W)``),
    ``loss``, ``level_scores`` and ``level_distances``; :meth:`decode` keeps the top ``nms_pre``
    (point, class) pairs per level and turns them into boxes.

    Args (keyword-only, shared by FCOS and GFL): num_classes C; in_channels (given by the detector);
        feat_channels, num_convs, norm (``GN`` or null), conv_bias: the two towers; strides: one per
        level; assigner: a built-in or registered assigner spec (``strides`` filled in);
        score_thr, nms_pre, nms_iou, max_per_img: inference; point_offset: points at
        ``(index + point_offset) * stride``; stride_from_input: space points ``input // map size``
        apart like torchvision's AnchorGenerator (the input size is the first level's size x stride).
    """

    def __init__(self, *, num_classes: int, in_channels: int, feat_channels: int, num_convs: int,
                 strides: Sequence[int], norm: str | None, conv_bias: bool | None, assigner: Mapping[str, Any],
                 score_thr: float, nms_pre: int, nms_iou: float, max_per_img: int, point_offset: float = 0.5,
                 stride_from_input: bool = False) -> None:
        super().__init__()
        self.num_classes = positive_int(num_classes, "num_classes")
        self.strides = list(strides)
        self.point_offset, self.stride_from_input = float(point_offset), bool(stride_from_input)
        self.cls_tower = conv_tower(in_channels, feat_channels, num_convs, norm, conv_bias)
        self.reg_tower = conv_tower(in_channels, feat_channels, num_convs, norm, conv_bias)
        self.scales = nn.ModuleList([Scale(1.0) for _ in self.strides])
        self.assigner = ASSIGNERS.build(dict(assigner), "assigner", strides=self.strides)
        self.score_thr, self.nms_pre, self.nms_iou, self.max_per_img = score_thr, nms_pre, nms_iou, max_per_img

    def init_weights(self, cls_out: nn.Conv2d, prior_prob: float) -> None:
        """Every conv ~ N(0, 0.01) with zero bias; the classifier bias at foreground prior ``prior_prob``."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        assert cls_out.bias is not None  # the subclass's classifier conv has a bias (its prior)
        nn.init.constant_(cls_out.bias, -math.log((1 - prior_prob) / prior_prob))

    def forward_level(self, cls_feat: Tensor, reg_feat: Tensor, scale: nn.Module) -> Outputs:
        """One level's outputs (the head's ``NamedTuple`` of maps) from the two towers' features
        ``(B, feat_channels, H, W)``."""
        raise NotImplementedError

    def forward(self, feats: Sequence[Tensor]) -> Outputs:
        """FPN maps -> the head's outputs ``NamedTuple``, each field the list of its per-level maps."""
        if len(feats) != len(self.strides):
            raise ValueError(f"{type(self).__name__} has {len(self.strides)} strides but got {len(feats)} feature maps")
        levels = [self.forward_level(self.cls_tower(f), self.reg_tower(f), s) for f, s in zip(feats, self.scales)]
        return type(levels[0])(*(list(maps) for maps in zip(*levels)))

    def _input_size(self, sizes: Sequence[tuple[int, int]]) -> tuple[int, int] | None:
        if not self.stride_from_input:
            return None
        return sizes[0][0] * self.strides[0], sizes[0][1] * self.strides[0]

    def priors(self, level_maps: Sequence[Tensor]) -> Priors:
        """The points of the levels of ``level_maps`` (any per-level ``(B, K, H_l, W_l)`` output)."""
        sizes = [(m.shape[-2], m.shape[-1]) for m in level_maps]
        return dense_points(sizes, self.strides, level_maps[0].device, self.point_offset, self._input_size(sizes))

    def level_scores(self, maps: Outputs) -> Tensor:
        """One level's class probabilities ``(B, C, H, W)`` float32 from its outputs ``maps``."""
        raise NotImplementedError

    @torch.no_grad()
    def dense_scores(self, outputs: Outputs) -> Tensor:
        """Every prior's inference scores ``(B, P, C)`` float32, detached: what the dynamic assigners rank."""
        return flatten_levels([self.level_scores(maps) for maps in split_levels(outputs)])

    def set_epoch(self, epoch: int) -> None:
        """Passes the number of finished epochs (the trainer's SetEpochHook) to the assigner."""
        if isinstance(self.assigner, DenseAssigner):  # a registered assigner of your own may not derive from it
            self.assigner.set_epoch(epoch)

    def level_distances(self, maps: Outputs, point: Tensor, stride: int) -> Tensor:
        """ltrb distances ``(B, K, 4)`` in pixels at flat cells ``point (B, K)`` of one level."""
        raise NotImplementedError

    @torch.no_grad()
    def decode(self, outputs: Outputs) -> tuple[Tensor, Tensor, Tensor]:
        """Top ``nms_pre`` (point, class) pairs per level -> ``boxes (B, K, 4)``, ``scores (B, K)``,
        ``labels (B, K)``. No data-dependent Python control flow: traceable and exportable."""
        batch = outputs.cls[0].shape[0]
        sizes = [tuple(m.shape[-2:]) for m in outputs.cls]
        all_boxes, all_scores, all_labels = [], [], []
        steps = grid_steps(sizes, self.strides, self._input_size(sizes))
        for maps, stride, (sy, sx) in zip(split_levels(outputs), self.strides, steps):
            w = one_level(maps.cls).shape[-1]
            # fp32 scores even under autocast: bf16 keeps 3 digits, too coarse to rank for COCO AP
            scores = self.level_scores(maps).permute(0, 2, 3, 1).reshape(batch, -1)
            scores, index = scores.topk(topk_min(scores, self.nms_pre, 1), dim=1)
            point = torch.div(index, self.num_classes, rounding_mode="floor")
            ltrb = self.level_distances(maps, point, stride)
            # row/col without `point % w`: a shape-valued modulo does not convert with the dynamo exporter
            row = torch.div(point, w, rounding_mode="floor")
            cx = ((point - row * w).float() + self.point_offset) * sx
            cy = (row.float() + self.point_offset) * sy
            all_boxes.append(torch.stack([cx - ltrb[..., 0], cy - ltrb[..., 1], cx + ltrb[..., 2],
                                          cy + ltrb[..., 3]], dim=-1))
            all_scores.append(scores)
            all_labels.append(index % self.num_classes)
        return torch.cat(all_boxes, 1), torch.cat(all_scores, 1), torch.cat(all_labels, 1)
