"""IoU-family box losses on ``x1y1x2y2`` boxes: IoU (log/linear/square), GIoU, DIoU, CIoU, EIoU, SIoU, bounded IoU.

Values equal ``torchvision.ops.{generalized,distance,complete}_box_iou_loss`` for valid boxes;
unlike them, loss and gradient stay finite for zero-width/height and inverted boxes (widths are
clamped at 0 for areas, and CIoU's aspect term uses ``atan2`` on widths clamped at ``eps``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from detkit.losses.reduce import WeightedLoss
from detkit.registry import LOSSES

IOU_MODES = ("log", "linear", "square")


def _corners(boxes: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]


def _wh(boxes: Tensor) -> tuple[Tensor, Tensor]:
    x1, y1, x2, y2 = _corners(boxes)
    return (x2 - x1).clamp(min=0), (y2 - y1).clamp(min=0)


def paired_iou(pred: Tensor, target: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """IoU of matching boxes ``(..., 4)`` -> ``(iou (...,), union (...,))``."""
    inter_w = (torch.min(pred[..., 2], target[..., 2]) - torch.max(pred[..., 0], target[..., 0])).clamp(min=0)
    inter_h = (torch.min(pred[..., 3], target[..., 3]) - torch.max(pred[..., 1], target[..., 1])).clamp(min=0)
    inter = inter_w * inter_h
    pw, ph = _wh(pred)
    tw, th = _wh(target)
    union = pw * ph + tw * th - inter
    return inter / (union + eps), union


def enclosing_box(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Width and height ``(...,)`` of the smallest box enclosing both."""
    w = torch.max(pred[..., 2], target[..., 2]) - torch.min(pred[..., 0], target[..., 0])
    h = torch.max(pred[..., 3], target[..., 3]) - torch.min(pred[..., 1], target[..., 1])
    return w, h


def center_offset(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Target centre minus predicted centre, ``(dx (...,), dy (...,))``."""
    px1, py1, px2, py2 = _corners(pred)
    tx1, ty1, tx2, ty2 = _corners(target)
    return ((tx1 + tx2) - (px1 + px2)) / 2, ((ty1 + ty2) - (py1 + py2)) / 2


def center_distance_ratio(pred: Tensor, target: Tensor, eps: float) -> Tensor:
    """DIoU penalty: squared centre distance over squared enclosing diagonal, ``(...,)``."""
    cw, ch = enclosing_box(pred, target)
    dx, dy = center_offset(pred, target)
    return (dx.pow(2) + dy.pow(2)) / (cw.pow(2) + ch.pow(2) + eps)


class _BoxLoss(WeightedLoss):
    """Shared checks for losses on paired boxes ``pred, target (..., 4)`` -> loss ``(...,)``."""

    kinds = frozenset({"box"})

    def __init__(self, eps: float = 1e-7, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        self.eps = float(eps)

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape or pred.shape[-1:] != (4,):
            raise ValueError(f"{type(self).__name__}: pred and target must both be (..., 4) x1y1x2y2 "
                             f"boxes, got {tuple(pred.shape)} and {tuple(target.shape)}")
        return self.box_loss(pred, target)

    def forward(self, pred: Tensor, target: Tensor, weight: Tensor | None = None,  # type: ignore[override]  # no options
                avg_factor: float | Tensor | None = None,
                reduction_override: str | None = None) -> Tensor:
        if weight is not None and weight.dim() == pred.dim():
            weight = weight.mean(-1)  # per-coordinate (..., 4) weights, as mmdetection accepts
        return super().forward(pred, target, weight, avg_factor, reduction_override)


@LOSSES.register()
class IoULoss(_BoxLoss):
    """IoU loss (UnitBox / FCOS): ``log``: ``-log(IoU)``, ``linear``: ``1 - IoU``, ``square``: ``1 - IoU^2``.

    Shapes: ``pred, target (..., 4)`` x1y1x2y2; elementwise loss ``(...,)``.
    """

    def __init__(self, mode: str = "log", eps: float = 1e-6, reduction: str = "mean",
                 loss_weight: float = 1.0) -> None:
        super().__init__(eps, reduction, loss_weight)
        if mode not in IOU_MODES:
            raise ValueError(f"IoULoss: mode must be one of {IOU_MODES}, got {mode!r}")
        self.mode = mode

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        iou, _ = paired_iou(pred, target, self.eps)
        if self.mode == "log":
            return -iou.clamp(min=self.eps).log()
        if self.mode == "linear":
            return 1 - iou
        return 1 - iou.pow(2)


@LOSSES.register()
class GIoULoss(_BoxLoss):
    """Generalized IoU loss ``1 - IoU + (C - U) / C`` (C: enclosing area). Shapes as IoULoss."""

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        iou, union = paired_iou(pred, target, self.eps)
        cw, ch = enclosing_box(pred, target)
        area_c = cw * ch
        return 1 - iou + (area_c - union) / (area_c + self.eps)


@LOSSES.register()
class DIoULoss(_BoxLoss):
    """Distance IoU loss ``1 - IoU + d^2 / c^2`` (centre distance over enclosing diagonal)."""

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        iou, _ = paired_iou(pred, target, self.eps)
        return 1 - iou + center_distance_ratio(pred, target, self.eps)


@LOSSES.register()
class CIoULoss(_BoxLoss):
    """Complete IoU loss: DIoU plus ``alpha * v``, ``v = 4/pi^2 (atan(w_t/h_t) - atan(w_p/h_p))^2``.

    ``alpha = v / (1 - IoU + v)`` is treated as a constant (no gradient), as in the paper.
    """

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        iou, _ = paired_iou(pred, target, self.eps)
        diou = 1 - iou + center_distance_ratio(pred, target, self.eps)
        pw, ph = (s.clamp(min=self.eps) for s in _wh(pred))
        tw, th = (s.clamp(min=self.eps) for s in _wh(target))
        v = (4 / math.pi ** 2) * (torch.atan2(tw, th) - torch.atan2(pw, ph)).pow(2)
        with torch.no_grad():
            alpha = v / (1 - iou + v + self.eps)
        return diou + alpha * v


@LOSSES.register()
class EIoULoss(_BoxLoss):
    """Efficient IoU loss (Zhang et al. 2021): DIoU ``+ (w - w_t)^2 / C_w^2 + (h - h_t)^2 / C_h^2``.

    ``C_w, C_h``: width and height of the enclosing box. Not mmdetection's ``EIoULoss``, which is
    the unrelated Extended-IoU loss of libfacedetection. Shapes as IoULoss.
    """

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        iou, _ = paired_iou(pred, target, self.eps)
        cw, ch = enclosing_box(pred, target)
        pw, ph = _wh(pred)
        tw, th = _wh(target)
        side = (pw - tw).pow(2) / (cw.pow(2) + self.eps) + (ph - th).pow(2) / (ch.pow(2) + self.eps)
        return 1 - iou + center_distance_ratio(pred, target, self.eps) + side


@LOSSES.register()
class SIoULoss(_BoxLoss):
    """SCYLLA-IoU loss (Gevorgyan 2022): ``1 - IoU + (distance + shape) / 2``.

    Angle cost ``L = sin(2 a)``, ``a`` the angle of the centre offset ``(dx, dy)`` to the x axis:
    the paper's ``cos(2 arcsin(min(|dx|, |dy|) / d) - pi/2)``, written ``2 |dx dy| / d^2``
    (identical, without arcsin's unbounded gradient). Distance cost
    ``sum_{x,y} 1 - exp(-(2 - L) (d_t / C_t)^2)`` over the enclosing box ``C_w, C_h``; shape cost
    ``sum_{w,h} (1 - exp(-|w - w_t| / max(w, w_t)))^4``. Equals mmyolo's ``siou`` and
    mmdetection's ``siou_loss(neg_gamma=True)`` (the paper's sign; mmdetection's default
    ``neg_gamma=False`` flips it). Unlike both, the loss is not clamped to ``[0, 2]``, so far-apart
    boxes keep their gradient. Shapes as IoULoss.
    """

    def box_loss(self, pred: Tensor, target: Tensor) -> Tensor:
        iou, _ = paired_iou(pred, target, self.eps)
        cw, ch = enclosing_box(pred, target)
        dx, dy = center_offset(pred, target)
        angle = 2 * (dx * dy).abs() / (dx.pow(2) + dy.pow(2) + self.eps)
        gamma = 2 - angle
        rho_x = dx.pow(2) / (cw.pow(2) + self.eps)
        rho_y = dy.pow(2) / (ch.pow(2) + self.eps)
        distance = 2 - torch.exp(-gamma * rho_x) - torch.exp(-gamma * rho_y)
        pw, ph = _wh(pred)
        tw, th = _wh(target)
        omega_w = (pw - tw).abs() / torch.max(pw, tw).clamp(min=self.eps)
        omega_h = (ph - th).abs() / torch.max(ph, th).clamp(min=self.eps)
        shape = (1 - torch.exp(-omega_w)).pow(4) + (1 - torch.exp(-omega_h)).pow(4)
        return 1 - iou + (distance + shape) / 2


@LOSSES.register()
class BoundedIoULoss(WeightedLoss):
    """Bounded IoU loss (Tychsen-Smith & Petersson 2018), as mmdetection's ``bounded_iou_loss``.

    Each of the centre offset and the size is scored by the best IoU it allows with the other
    three coordinates ideal: ``l_x = 1 - max((w_t - 2|dx|) / (w_t + 2|dx| + eps), 0)``,
    ``l_w = 1 - min(w_t / (w + eps), w / (w_t + eps))`` (and ``y``, ``h`` alike), ``dx`` the
    centre offset; each ``l`` then goes through a smooth L1 at ``beta``:
    ``0.5 l^2 / beta`` if ``l < beta`` else ``l - 0.5 beta``. ``pred`` is the box being
    regressed (the paper's proposal): the target's side is a constant (no gradient), as in
    mmdetection. Widths and heights are clamped at 0 (inverted boxes read as empty), so loss and
    gradient stay finite where mmdetection divides by ``w + eps = 0``; same values for valid boxes.
    Shapes: ``pred, target (..., 4)`` x1y1x2y2; elementwise loss ``(..., 4)`` (x, y, w, h terms,
    as mmdetection); ``weight (...,)`` or ``(..., 4)``.
    """

    kinds = frozenset({"box"})

    def __init__(self, beta: float = 0.2, eps: float = 1e-3, reduction: str = "mean", loss_weight: float = 1.0) -> None:
        super().__init__(reduction, loss_weight)
        if not beta > 0 or not eps > 0:
            raise ValueError(f"BoundedIoULoss: beta and eps must be > 0, got beta={beta}, eps={eps}")
        self.beta, self.eps = float(beta), float(eps)

    def elementwise(self, pred: Tensor, target: Tensor) -> Tensor:
        if pred.shape != target.shape or pred.shape[-1:] != (4,):
            raise ValueError(f"BoundedIoULoss: pred and target must both be (..., 4) x1y1x2y2 boxes, got "
                             f"{tuple(pred.shape)} and {tuple(target.shape)}")
        target = target.detach()
        (pw, ph), (tw, th) = _wh(pred), _wh(target)
        dx, dy = center_offset(pred, target)
        eps, zero = self.eps, torch.zeros_like(dx)  # maximum, not clamp: a tie at 0 splits the gradient, as mmdetection
        loss_x = 1 - torch.maximum((tw - 2 * dx.abs()) / (tw + 2 * dx.abs() + eps), zero)
        loss_y = 1 - torch.maximum((th - 2 * dy.abs()) / (th + 2 * dy.abs() + eps), zero)
        loss_w = 1 - torch.min(tw / (pw + eps), pw / (tw + eps))
        loss_h = 1 - torch.min(th / (ph + eps), ph / (th + eps))
        loss = torch.stack([loss_x, loss_y, loss_w, loss_h], -1)
        return torch.where(loss < self.beta, 0.5 * loss * loss / self.beta, loss - 0.5 * self.beta)
