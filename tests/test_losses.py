"""detkit.losses against independent references.

References are torch / torchvision and the seed documents' code, reimplemented in this file
(OpenPCDet loss_utils, mmdetection v1 losses, the FCOS notebook, CenterNet). Nothing from
detkit is used to build a reference. Every input is seeded (autouse fixture below).

For fp16/bf16/fp64 inputs the reference is evaluated in fp32 on the same (rounded) input values,
since detkit computes every loss in fp32 and returns fp32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.ops import (
    box_iou,
    complete_box_iou_loss,
    distance_box_iou_loss,
    generalized_box_iou_loss,
    sigmoid_focal_loss,
)

from detkit.losses import LOSSES, build_loss

EPS32 = torch.finfo(torch.float32).eps
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW = [torch.float16, torch.bfloat16]
REDUCTIONS = ["none", "sum", "mean"]
CLS_SHAPES = [(7, 5), (2, 6, 4)]  # (N, C) and (B, A, C)
BOX_LEAD = [(9,), (2, 5)]  # boxes (N, 4) and (B, A, 4)
# Tolerance on input gradients: ours is an fp32 gradient rounded to the input dtype.
GRAD_TOL = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.float64: dict(rtol=1e-4, atol=1e-6),
            torch.float16: dict(rtol=2e-3, atol=1e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5)}
VAL_TOL = dict(rtol=1e-5, atol=1e-6)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def leaf(x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return x.detach().to(dtype).requires_grad_(True)


def ref_leaf(x: torch.Tensor) -> torch.Tensor:
    """fp32 copy of (possibly rounded) input values, for the reference."""
    return x.detach().float().requires_grad_(True)


def upstream(ours: torch.Tensor) -> torch.Tensor:
    return torch.randn(ours.shape) if ours.dim() else torch.tensor(1.0)


def assert_value_and_grad(ours, ref, pairs, dtype, val_tol=VAL_TOL, grad_tol=None):
    """``pairs``: [(our input leaf, reference input leaf)]; compare value, dtype, input grads."""
    assert ours.dtype == torch.float32
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref.float(), **val_tol)
    g = upstream(ours)
    ours.backward(g)
    ref.backward(g)
    for x, xr in pairs:
        assert x.grad is not None and x.grad.dtype == dtype
        assert torch.isfinite(x.grad).all()
        torch.testing.assert_close(x.grad.float(), xr.grad, **(grad_tol or GRAD_TOL[dtype]))


def one_hot_ref(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """labels in 0..C (C = background) -> (..., C) float; background is an all-zero row."""
    return (labels[..., None] == torch.arange(num_classes)).float()


def ltrb_to_xyxy(points: torch.Tensor, ltrb: torch.Tensor) -> torch.Tensor:
    cx, cy = points[..., 0], points[..., 1]
    l, t, r, b = ltrb.unbind(-1)
    return torch.stack([cx - l, cy - t, cx + r, cy + b], -1)


def rand_boxes(lead) -> torch.Tensor:
    xy = torch.rand(*lead, 2) * 50
    wh = torch.rand(*lead, 2) * 30 + 1
    return torch.cat([xy, xy + wh], -1)


def box_pairs(lead):
    """Valid x1y1x2y2 pairs: mostly overlapping jittered copies, ~30% unrelated (often disjoint)."""
    target = rand_boxes(lead)
    pred = target + torch.randn(*lead, 4) * 3
    pred[..., 2:] = torch.max(pred[..., 2:], pred[..., :2] + 0.5)
    far = torch.rand(lead) < 0.3
    pred[far] = rand_boxes(lead)[far]
    return pred, target


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

ALL_LOSSES = ["FocalLoss", "CrossEntropyLoss", "SmoothL1Loss", "L1Loss", "IoULoss", "GIoULoss",
              "DIoULoss", "CIoULoss", "GaussianFocalLoss"]


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_registered_and_buildable(name):
    assert name in LOSSES
    loss = build_loss({"type": name, "reduction": "sum", "loss_weight": 2.0})
    assert type(loss).__name__ == name
    assert loss.reduction == "sum" and loss.loss_weight == 2.0


# ----------------------------------------------------------------------------------------------
# 1. Parity with torch / torchvision
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", CLS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_matches_torchvision_float_targets(shape, dtype, reduction):
    logits = torch.randn(shape) * 3
    target = (torch.rand(shape) < 0.3).float()
    target[..., 0] = torch.rand(shape[:-1])  # a soft column
    target = target.to(dtype)
    x = leaf(logits, dtype)
    xr = ref_leaf(x)
    loss = build_loss({"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25, "reduction": reduction})
    ours = loss(x, target)
    ref = sigmoid_focal_loss(xr, target.float(), alpha=0.25, gamma=2.0, reduction=reduction)
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)


@pytest.mark.parametrize("shape", CLS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_focal_matches_torchvision_class_index_targets(shape, dtype, reduction):
    num_classes = shape[-1]
    labels = torch.randint(0, num_classes + 1, shape[:-1])  # num_classes = background
    labels.view(-1)[:2] = torch.tensor([0, num_classes])
    x = leaf(torch.randn(shape) * 3, dtype)
    xr = ref_leaf(x)
    ours = build_loss({"type": "FocalLoss", "reduction": reduction})(x, labels)
    ref = sigmoid_focal_loss(xr, one_hot_ref(labels, num_classes), reduction=reduction)
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 2.0, 3.0])
@pytest.mark.parametrize("alpha,tv_alpha", [(0.25, 0.25), (0.75, 0.75), (None, -1), (-1, -1)])
def test_focal_gamma_alpha_match_torchvision(gamma, alpha, tv_alpha):
    x = leaf(torch.randn(6, 3) * 3)
    xr = ref_leaf(x)
    target = (torch.rand(6, 3) < 0.4).float()
    ours = build_loss({"type": "FocalLoss", "gamma": gamma, "alpha": alpha, "reduction": "none"})(x, target)
    ref = sigmoid_focal_loss(xr, target, alpha=tv_alpha, gamma=gamma, reduction="none")
    assert_value_and_grad(ours, ref, [(x, xr)], torch.float32)


def _ref_iou(p, t):
    lt = torch.max(p[..., :2], t[..., :2])
    rb = torch.min(p[..., 2:], t[..., 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]

    def area(b):
        return (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])

    return inter / (area(p) + area(t) - inter)


def test_reference_paired_iou_matches_torchvision_box_iou():
    p, t = box_pairs((20,))
    torch.testing.assert_close(_ref_iou(p, t), box_iou(p, t).diagonal())


BOX_REFS = {
    "GIoULoss": ({"type": "GIoULoss"}, lambda p, t: generalized_box_iou_loss(p, t)),
    "DIoULoss": ({"type": "DIoULoss"}, lambda p, t: distance_box_iou_loss(p, t)),
    "CIoULoss": ({"type": "CIoULoss"}, lambda p, t: complete_box_iou_loss(p, t)),
    "IoU-log": ({"type": "IoULoss", "mode": "log"}, lambda p, t: -_ref_iou(p, t).clamp(min=1e-6).log()),
    "IoU-linear": ({"type": "IoULoss", "mode": "linear"}, lambda p, t: 1 - _ref_iou(p, t)),
    "IoU-square": ({"type": "IoULoss", "mode": "square"}, lambda p, t: 1 - _ref_iou(p, t) ** 2),
}


def _reduce(loss, reduction):
    return {"none": loss, "sum": loss.sum(), "mean": loss.mean()}[reduction]


@pytest.mark.parametrize("kind", list(BOX_REFS))
@pytest.mark.parametrize("lead", BOX_LEAD)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_box_losses_match_reference(kind, lead, dtype, reduction):
    spec, ref_fn = BOX_REFS[kind]
    pred, target = box_pairs(lead)
    p, t = leaf(pred, dtype), leaf(target, dtype)
    pr, tr = ref_leaf(p), ref_leaf(t)
    ours = build_loss({**spec, "reduction": reduction})(p, t)
    ref = _reduce(ref_fn(pr, tr), reduction)
    assert ours.shape == (lead if reduction == "none" else ())
    # IoULoss adds eps=1e-6 to the union (the reference has none): ~1e-6 absolute difference.
    assert_value_and_grad(ours, ref, [(p, pr), (t, tr)], dtype, val_tol=dict(rtol=1e-5, atol=1e-5),
                          grad_tol={**GRAD_TOL[dtype], "atol": 1e-5})


@pytest.mark.parametrize("beta", [0.0, 1.0 / 9.0, 1.0, 2.0])
@pytest.mark.parametrize("shape", [(7, 4), (2, 5, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_smooth_l1_matches_torch(beta, shape, dtype, reduction):
    x = leaf(torch.randn(shape) * 2, dtype)
    xr = ref_leaf(x)
    target = (torch.randn(shape) * 2).to(dtype)
    ours = build_loss({"type": "SmoothL1Loss", "beta": beta, "reduction": reduction})(x, target)
    ref = F.smooth_l1_loss(xr, target.float(), beta=beta, reduction=reduction)
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)


@pytest.mark.parametrize("shape", [(7, 4), (2, 5, 7)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_l1_matches_torch(shape, dtype, reduction):
    x = leaf(torch.randn(shape) * 2, dtype)
    xr = ref_leaf(x)
    target = (torch.randn(shape) * 2).to(dtype)
    ours = build_loss({"type": "L1Loss", "reduction": reduction})(x, target)
    ref = F.l1_loss(xr, target.float(), reduction=reduction)
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)


CE_CASES = {
    "plain": dict(cw=False, ignore=None, ls=0.0),
    "ignore_255_cw": dict(cw=True, ignore=255, ls=0.0),
    "smoothing": dict(cw=False, ignore=None, ls=0.1),
    "all": dict(cw=True, ignore=-100, ls=0.2),
}


@pytest.mark.parametrize("case", list(CE_CASES))
@pytest.mark.parametrize("shape", CLS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_softmax_cross_entropy_matches_torch(case, shape, dtype, reduction):
    cfg = CE_CASES[case]
    num_classes = shape[-1]
    labels = torch.randint(0, num_classes, shape[:-1])
    ignore_index = -100 if cfg["ignore"] is None else cfg["ignore"]
    if cfg["ignore"] is not None:
        labels.view(-1)[::3] = ignore_index
    class_weight = (torch.rand(num_classes) + 0.5) if cfg["cw"] else None
    spec = {"type": "CrossEntropyLoss", "reduction": reduction, "label_smoothing": cfg["ls"],
            "ignore_index": ignore_index}
    if class_weight is not None:
        spec["class_weight"] = class_weight.tolist()
    x = leaf(torch.randn(shape) * 3, dtype)
    xr = ref_leaf(x)
    ours = build_loss(spec)(x, labels)
    ref = F.cross_entropy(xr.reshape(-1, num_classes), labels.reshape(-1),
                          weight=None if class_weight is None else torch.tensor(class_weight.tolist()),
                          ignore_index=ignore_index, label_smoothing=cfg["ls"], reduction=reduction)
    if reduction == "none":
        ref = ref.reshape(shape[:-1])
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)


@pytest.mark.parametrize("shape", CLS_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("use_cw", [False, True])
def test_sigmoid_cross_entropy_float_targets_matches_bce(shape, dtype, reduction, use_cw):
    num_classes = shape[-1]
    class_weight = torch.rand(num_classes) + 0.5 if use_cw else None
    target = torch.rand(shape).to(dtype)
    x = leaf(torch.randn(shape) * 3, dtype)
    xr = ref_leaf(x)
    spec = {"type": "CrossEntropyLoss", "use_sigmoid": True, "reduction": reduction}
    if use_cw:
        spec["class_weight"] = class_weight.tolist()
    ours = build_loss(spec)(x, target)
    ref = F.binary_cross_entropy_with_logits(xr, target.float(), weight=class_weight, reduction=reduction)
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)


@pytest.mark.parametrize("shape", CLS_SHAPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("with_ignore", [False, True])
def test_sigmoid_cross_entropy_class_index_targets(shape, reduction, smoothing, with_ignore):
    """Class indices -> one-hot BCE (background row all zero); ignored rows add nothing and the
    default mean divides by (#non-ignored rows * C) (documented in CrossEntropyLoss)."""
    num_classes = shape[-1]
    labels = torch.randint(0, num_classes + 1, shape[:-1])
    valid = torch.ones(shape[:-1], dtype=torch.bool)
    if with_ignore:
        valid.view(-1)[1::3] = False
        labels[~valid] = -100
    class_weight = torch.rand(num_classes) + 0.5
    x = leaf(torch.randn(shape) * 3)
    xr = ref_leaf(x)
    ours = build_loss({"type": "CrossEntropyLoss", "use_sigmoid": True, "label_smoothing": smoothing,
                       "class_weight": class_weight.tolist(), "reduction": reduction})(x, labels)
    dense = one_hot_ref(torch.where(valid, labels, num_classes), num_classes)
    dense = dense * (1 - smoothing) + smoothing / 2
    elem = F.binary_cross_entropy_with_logits(xr, dense, weight=class_weight, reduction="none")
    elem = elem * valid[..., None]
    ref = {"none": elem, "sum": elem.sum(), "mean": elem.sum() / (valid.sum() * num_classes)}[reduction]
    assert_value_and_grad(ours, ref, [(x, xr)], torch.float32)


# ----------------------------------------------------------------------------------------------
# 2. Seed documents' reference code, reimplemented
# ----------------------------------------------------------------------------------------------

# --- seed 000: OpenPCDet pcdet/utils/loss_utils.py -------------------------------------------

class OpenPCDetSigmoidFocalClassificationLoss(nn.Module):
    def __init__(self, gamma: float = 2.0, alpha: float = 0.25):
        super().__init__()
        self.alpha = alpha
        self.gamma = gamma

    @staticmethod
    def sigmoid_cross_entropy_with_logits(input: torch.Tensor, target: torch.Tensor):
        loss = torch.clamp(input, min=0) - input * target + \
            torch.log1p(torch.exp(-torch.abs(input)))
        return loss

    def forward(self, input: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
        pred_sigmoid = torch.sigmoid(input)
        alpha_weight = target * self.alpha + (1 - target) * (1 - self.alpha)
        pt = target * (1.0 - pred_sigmoid) + (1.0 - target) * pred_sigmoid
        focal_weight = alpha_weight * torch.pow(pt, self.gamma)

        bce_loss = self.sigmoid_cross_entropy_with_logits(input, target)

        loss = focal_weight * bce_loss

        if weights.shape.__len__() == 2 or \
                (weights.shape.__len__() == 1 and target.shape.__len__() == 2):
            weights = weights.unsqueeze(-1)

        assert weights.shape.__len__() == loss.shape.__len__()

        return loss * weights


class OpenPCDetWeightedSmoothL1Loss(nn.Module):
    """OpenPCDet's WeightedSmoothL1Loss. The seed shows it without its code-wise weighting;
    upstream multiplies the *difference* by ``code_weights`` before the smooth L1 and replaces
    NaN targets by the input."""

    def __init__(self, beta: float = 1.0 / 9.0, code_weights: list | None = None):
        super().__init__()
        self.beta = beta
        self.code_weights = None if code_weights is None else torch.tensor(code_weights, dtype=torch.float32)

    @staticmethod
    def smooth_l1_loss(diff, beta):
        if beta < 1e-5:
            loss = torch.abs(diff)
        else:
            n = torch.abs(diff)
            loss = torch.where(n < beta, 0.5 * n ** 2 / beta, n - 0.5 * beta)
        return loss

    def forward(self, input: torch.Tensor, target: torch.Tensor, weights: torch.Tensor = None):
        target = torch.where(torch.isnan(target), input, target)  # ignore nan targets
        diff = input - target
        # code-wise weighting
        if self.code_weights is not None:
            diff = diff * self.code_weights.view(1, 1, -1)
        loss = self.smooth_l1_loss(diff, self.beta)
        # anchor-wise weighting
        if weights is not None:
            assert weights.shape[0] == loss.shape[0] and weights.shape[1] == loss.shape[1]
            loss = loss * weights.unsqueeze(-1)
        return loss


class OpenPCDetWeightedL1Loss(nn.Module):
    def __init__(self, code_weights: list | None = None):
        super().__init__()
        self.code_weights = None if code_weights is None else torch.tensor(code_weights, dtype=torch.float32)

    def forward(self, input: torch.Tensor, target: torch.Tensor, weights: torch.Tensor = None):
        target = torch.where(torch.isnan(target), input, target)  # ignore nan targets
        diff = input - target
        if self.code_weights is not None:
            diff = diff * self.code_weights.view(1, 1, -1)
        loss = torch.abs(diff)
        if weights is not None:
            assert weights.shape[0] == loss.shape[0] and weights.shape[1] == loss.shape[1]
            loss = loss * weights.unsqueeze(-1)
        return loss


class OpenPCDetWeightedCrossEntropyLoss(nn.Module):
    def forward(self, input: torch.Tensor, target: torch.Tensor, weights: torch.Tensor):
        input = input.permute(0, 2, 1)
        target = target.argmax(dim=-1)
        loss = F.cross_entropy(input, target, reduction='none') * weights
        return loss


def _anchor_weights(shape):
    """OpenPCDet-style anchor weights: 1 / num_positive on positives, 0 elsewhere (+ some 1/num)."""
    pos = torch.rand(shape) < 0.4
    w = pos.float() / pos.float().sum().clamp(min=1)
    return w + (torch.rand(shape) < 0.2).float() * 0.05


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.0, 0.5)])
def test_openpcdet_sigmoid_focal_classification_loss(dtype, gamma, alpha):
    B, A, C = 2, 12, 3
    cls = torch.randint(0, C + 1, (B, A))
    target = one_hot_ref(cls, C)
    weights = _anchor_weights((B, A))
    x = leaf(torch.randn(B, A, C) * 3, dtype)
    xr = ref_leaf(x)
    ours = build_loss({"type": "FocalLoss", "gamma": gamma, "alpha": alpha, "reduction": "none"})(
        x, target.to(dtype), weight=weights)
    ref = OpenPCDetSigmoidFocalClassificationLoss(gamma, alpha)(xr, target, weights)
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)
    # class-index targets give the same thing
    ours_idx = build_loss({"type": "FocalLoss", "gamma": gamma, "alpha": alpha, "reduction": "none"})(
        x.detach(), cls, weight=weights)
    torch.testing.assert_close(ours_idx, ref.detach(), **VAL_TOL)


def test_openpcdet_focal_2d_with_1d_weights():
    x = leaf(torch.randn(10, 4) * 2)
    xr = ref_leaf(x)
    target = one_hot_ref(torch.randint(0, 5, (10,)), 4)
    weights = torch.rand(10)
    ours = build_loss({"type": "FocalLoss", "reduction": "none"})(x, target, weight=weights)
    ref = OpenPCDetSigmoidFocalClassificationLoss()(xr, target, weights)
    assert_value_and_grad(ours, ref, [(x, xr)], torch.float32)


@pytest.mark.parametrize("code_weights", [None, [1.0] * 7, [2.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.2]],
                         ids=["none", "ones", "mixed"])
@pytest.mark.parametrize("nan_targets", [False, True])
def test_openpcdet_weighted_smooth_l1_code_weights(code_weights, nan_targets):
    """OpenPCDet: smoothl1((input - target) * code_weights) * anchor_weight, beta = 1/9."""
    B, A, K = 2, 10, 7
    x = leaf(torch.randn(B, A, K) * 0.3)  # |diff| on both sides of beta = 1/9
    xr = ref_leaf(x)
    target = torch.randn(B, A, K) * 0.3
    if nan_targets:
        target[0, :3, 6] = float("nan")
    weights = _anchor_weights((B, A))
    ours = build_loss({"type": "SmoothL1Loss", "beta": 1.0 / 9.0, "code_weights": code_weights,
                       "reduction": "none"})(x, target, weight=weights)
    ref = OpenPCDetWeightedSmoothL1Loss(1.0 / 9.0, code_weights)(xr, target, weights)
    assert_value_and_grad(ours, ref, [(x, xr)], torch.float32)


def test_smooth_l1_code_weights_scale_the_difference_worked_number():
    """OpenPCDet: smoothl1(code_weight * diff). diff 0.1 * 2 = 0.2 >= 1/9 -> 0.2 - 1/18;
    diff 0.3 * 0.2 = 0.06 < 1/9 -> 0.5 * 0.06^2 * 9."""
    x, t = torch.tensor([[0.1, 0.3]]), torch.zeros(1, 2)
    ours = build_loss({"type": "SmoothL1Loss", "beta": 1.0 / 9.0, "code_weights": [2.0, 0.2],
                       "reduction": "none"})(x, t)
    torch.testing.assert_close(ours, torch.tensor([[0.2 - 1.0 / 18.0, 0.5 * 0.06 ** 2 * 9.0]]), **VAL_TOL)


@pytest.mark.parametrize("code_weights", [None, [2.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.2]], ids=["none", "mixed"])
@pytest.mark.parametrize("nan_targets", [False, True])
def test_openpcdet_weighted_l1_code_weights(code_weights, nan_targets):
    B, A, K = 2, 10, 7
    x = leaf(torch.randn(B, A, K))
    xr = ref_leaf(x)
    target = torch.randn(B, A, K)
    if nan_targets:
        target[1, 2:5, 0] = float("nan")
    weights = _anchor_weights((B, A))
    ours = build_loss({"type": "L1Loss", "code_weights": code_weights, "reduction": "none"})(
        x, target, weight=weights)
    ref = OpenPCDetWeightedL1Loss(code_weights)(xr, target, weights)
    assert_value_and_grad(ours, ref, [(x, xr)], torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_openpcdet_weighted_cross_entropy(dtype):
    B, A, C = 2, 9, 4
    one_hot = F.one_hot(torch.randint(0, C, (B, A)), C).float()
    weights = _anchor_weights((B, A))
    x = leaf(torch.randn(B, A, C) * 3, dtype)
    xr = ref_leaf(x)
    ours = build_loss({"type": "CrossEntropyLoss", "reduction": "none"})(x, one_hot.argmax(-1), weight=weights)
    ref = OpenPCDetWeightedCrossEntropyLoss()(xr, one_hot, weights)
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)


# --- seed 001: mmdetection v1 losses ---------------------------------------------------------

def mmdet_smooth_l1_loss(pred, target, beta=1.0, reduction='mean'):
    assert beta > 0
    assert pred.size() == target.size() and target.numel() > 0
    diff = torch.abs(pred - target)
    loss = torch.where(diff < beta, 0.5 * diff * diff / beta,
                       diff - 0.5 * beta)
    reduction_enum = F._Reduction.get_enum(reduction)
    # none: 0, mean:1, sum: 2
    if reduction_enum == 0:
        return loss
    elif reduction_enum == 1:
        return loss.sum() / pred.numel()
    elif reduction_enum == 2:
        return loss.sum()


def mmdet_weighted_smoothl1(pred, target, weight, beta=1.0, avg_factor=None):
    if avg_factor is None:
        avg_factor = torch.sum(weight > 0).float().item() + 1e-6
    loss = mmdet_smooth_l1_loss(pred, target, beta, reduction='none')
    return torch.sum(loss * weight)[None] / avg_factor


def mmdet_weighted_cross_entropy(pred, label, weight, avg_factor=None, reduce=True):
    if avg_factor is None:
        avg_factor = max(torch.sum(weight > 0).float().item(), 1.)
    raw = F.cross_entropy(pred, label, reduction='none')
    if reduce:
        return torch.sum(raw * weight)[None] / avg_factor
    else:
        return raw * weight / avg_factor


def mmdet_sigmoid_focal_loss(pred, target, weight, gamma=2.0, alpha=0.25, reduction='mean'):
    pred_sigmoid = pred.sigmoid()
    target = target.type_as(pred)
    pt = (1 - pred_sigmoid) * target + pred_sigmoid * (1 - target)
    weight = (alpha * target + (1 - alpha) * (1 - target)) * weight
    weight = weight * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(
        pred, target, reduction='none') * weight
    reduction_enum = F._Reduction.get_enum(reduction)
    # none: 0, mean:1, sum: 2
    if reduction_enum == 0:
        return loss
    elif reduction_enum == 1:
        return loss.mean()
    elif reduction_enum == 2:
        return loss.sum()


def mmdet_weighted_sigmoid_focal_loss(pred, target, weight, gamma=2.0, alpha=0.25, avg_factor=None,
                                      num_classes=80):
    if avg_factor is None:
        avg_factor = torch.sum(weight > 0).float().item() / num_classes + 1e-6
    return mmdet_sigmoid_focal_loss(
        pred, target, weight, gamma=gamma, alpha=alpha,
        reduction='sum')[None] / avg_factor


@pytest.mark.parametrize("beta", [1.0 / 9.0, 1.0])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_mmdet_smooth_l1_loss(beta, reduction):
    x = leaf(torch.randn(8, 4))
    xr = ref_leaf(x)
    target = torch.randn(8, 4)
    ours = build_loss({"type": "SmoothL1Loss", "beta": beta, "reduction": reduction})(x, target)
    ref = mmdet_smooth_l1_loss(xr, target, beta, reduction)
    assert_value_and_grad(ours, ref, [(x, xr)], torch.float32)


@pytest.mark.parametrize("beta", [1.0 / 9.0, 1.0])
@pytest.mark.parametrize("given_avg", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mmdet_weighted_smoothl1(beta, given_avg, dtype):
    x = leaf(torch.randn(12, 4), dtype)
    xr = ref_leaf(x)
    target = torch.randn(12, 4)
    weight = (torch.rand(12, 1) < 0.5).float().expand(12, 4).contiguous()  # bbox_weights
    avg = 7.5 if given_avg else torch.sum(weight > 0).float().item() + 1e-6
    ours = build_loss({"type": "SmoothL1Loss", "beta": beta})(x, target.to(dtype), weight=weight,
                                                               avg_factor=avg)
    ref = mmdet_weighted_smoothl1(xr, target.to(dtype).float(), weight, beta,
                                  avg_factor=7.5 if given_avg else None)[0]
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)


@pytest.mark.parametrize("given_avg", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mmdet_weighted_cross_entropy(given_avg, dtype):
    x = leaf(torch.randn(15, 6) * 2, dtype)
    xr = ref_leaf(x)
    label = torch.randint(0, 6, (15,))
    weight = (torch.rand(15) < 0.7).float()
    avg = 11.0 if given_avg else max(torch.sum(weight > 0).float().item(), 1.)
    loss = build_loss({"type": "CrossEntropyLoss"})
    ours = loss(x, label, weight=weight, avg_factor=avg)
    ref = mmdet_weighted_cross_entropy(xr, label, weight, avg_factor=11.0 if given_avg else None)[0]
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)
    # reduce=False: raw * weight / avg_factor == our weighted elementwise loss / avg_factor
    ours_none = loss(x.detach(), label, weight=weight, reduction_override="none")
    ref_none = mmdet_weighted_cross_entropy(xr.detach(), label, weight, avg_factor=avg, reduce=False)
    torch.testing.assert_close(ours_none / avg, ref_none, **VAL_TOL)


@pytest.mark.parametrize("gamma,alpha", [(2.0, 0.25), (1.5, 0.5)])
@pytest.mark.parametrize("given_avg", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mmdet_weighted_sigmoid_focal_loss(gamma, alpha, given_avg, dtype):
    N, C = 16, 5
    labels = torch.randint(0, C + 1, (N,))  # C = background
    target = one_hot_ref(labels, C)
    row_w = (torch.rand(N) < 0.75).float()
    weight = row_w[:, None].expand(N, C).contiguous()  # mmdet v1 expands label weights
    x = leaf(torch.randn(N, C) * 3, dtype)
    xr = ref_leaf(x)
    avg = 3.0 if given_avg else torch.sum(weight > 0).float().item() / C + 1e-6
    loss = build_loss({"type": "FocalLoss", "gamma": gamma, "alpha": alpha})
    ours = loss(x, target.to(dtype), weight=weight, avg_factor=avg)
    ref = mmdet_weighted_sigmoid_focal_loss(xr, target, weight, gamma, alpha,
                                            avg_factor=3.0 if given_avg else None, num_classes=C)[0]
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)
    # class indices + per-row weights give the same
    ours_idx = loss(x.detach(), labels, weight=row_w, avg_factor=avg)
    torch.testing.assert_close(ours_idx, ref.detach().float(), **VAL_TOL)
    # mmdet's plain 'mean' is the mean over all N*C weighted logits
    ours_mean = loss(x.detach(), labels, weight=row_w)
    ref_mean = mmdet_sigmoid_focal_loss(xr.detach(), target, weight, gamma, alpha, reduction='mean')
    torch.testing.assert_close(ours_mean, ref_mean, **VAL_TOL)


# --- seed 002: FCOS notebook -----------------------------------------------------------------

def fcos_focal_loss_from_logits(preds, targets, gamma=2.0, alpha=0.25):
    preds = preds.sigmoid()
    pt = preds * targets + (1.0 - preds) * (1.0 - targets)
    w = alpha * targets + (1.0 - alpha) * (1.0 - targets)
    loss = -w * torch.pow((1.0 - pt), gamma) * pt.log()
    return loss.sum()


def fcos_compute_cls_loss(preds, targets, mask):
    batch_size = targets.shape[0]
    preds_reshape = []
    class_num = preds[0].shape[1]
    mask = mask.unsqueeze(dim=-1)
    num_pos = torch.sum(mask, dim=[1, 2]).clamp_(min=1).float()  # [batch_size,]
    for pred in preds:
        pred = pred.permute(0, 2, 3, 1)
        pred = torch.reshape(pred, [batch_size, -1, class_num])
        preds_reshape.append(pred)
    preds = torch.cat(preds_reshape, dim=1)  # [batch_size,sum(_h*_w),class_num]
    assert preds.shape[:2] == targets.shape[:2]
    loss = []
    for batch_index in range(batch_size):
        pred_pos = preds[batch_index]  # [sum(_h*_w),class_num]
        target_pos = targets[batch_index]  # [sum(_h*_w),1]
        target_pos = (torch.arange(1, class_num + 1, device=target_pos.device)[None, :]
                      .type(torch.float32) == target_pos).float()  # sparse-->onehot
        loss.append(fcos_focal_loss_from_logits(pred_pos, target_pos).view(1))
    return torch.cat(loss, dim=0) / num_pos  # [batch_size,]


def fcos_compute_cnt_loss(preds, targets, mask):
    batch_size = targets.shape[0]
    c = targets.shape[-1]
    preds_reshape = []
    mask = mask.unsqueeze(dim=-1)
    num_pos = torch.sum(mask, dim=[1, 2]).clamp_(min=1).float()  # [batch_size,]
    for pred in preds:
        pred = pred.permute(0, 2, 3, 1)
        pred = torch.reshape(pred, [batch_size, -1, c])
        preds_reshape.append(pred)
    preds = torch.cat(preds_reshape, dim=1)
    assert preds.shape == targets.shape  # [batch_size,sum(_h*_w),1]
    loss = []
    for batch_index in range(batch_size):
        pred_pos = preds[batch_index][mask[batch_index]]  # [num_pos_b,]
        target_pos = targets[batch_index][mask[batch_index]]  # [num_pos_b,]
        assert len(pred_pos.shape) == 1
        loss.append(
            nn.functional.binary_cross_entropy_with_logits(input=pred_pos, target=target_pos,
                                                           reduction='sum').view(1))
    return torch.cat(loss, dim=0) / num_pos  # [batch_size,]


def fcos_iou_loss(preds, targets):
    lt = torch.min(preds[:, :2], targets[:, :2])
    rb = torch.min(preds[:, 2:], targets[:, 2:])
    wh = (rb + lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]  # [n]
    area1 = (preds[:, 2] + preds[:, 0]) * (preds[:, 3] + preds[:, 1])
    area2 = (targets[:, 2] + targets[:, 0]) * (targets[:, 3] + targets[:, 1])
    iou = overlap / (area1 + area2 - overlap)
    loss = -iou.clamp(min=1e-6).log()
    return loss.sum()


def fcos_compute_reg_loss(preds, targets, mask, mode='iou'):
    batch_size = targets.shape[0]
    c = targets.shape[-1]
    preds_reshape = []
    num_pos = torch.sum(mask, dim=1).clamp_(min=1).float()  # [batch_size,]
    for pred in preds:
        pred = pred.permute(0, 2, 3, 1)
        pred = torch.reshape(pred, [batch_size, -1, c])
        preds_reshape.append(pred)
    preds = torch.cat(preds_reshape, dim=1)
    assert preds.shape == targets.shape  # [batch_size,sum(_h*_w),4]
    loss = []
    for batch_index in range(batch_size):
        pred_pos = preds[batch_index][mask[batch_index]]  # [num_pos_b,4]
        target_pos = targets[batch_index][mask[batch_index]]  # [num_pos_b,4]
        assert len(pred_pos.shape) == 2
        if mode == 'iou':
            loss.append(fcos_iou_loss(pred_pos, target_pos).view(1))
        else:
            raise NotImplementedError("reg loss only implemented ['iou']")
    return torch.cat(loss, dim=0) / num_pos  # [batch_size,]


def flatten_levels(preds):
    """[B, C, h, w] per level -> [B, sum(h*w), C] (the notebook's permute / reshape / cat)."""
    return torch.cat([p.permute(0, 2, 3, 1).reshape(p.shape[0], -1, p.shape[1]) for p in preds], 1)


# The notebook's worked example uses a uint8 mask; bool is the same selection without the
# deprecation warning for uint8 indexing.

def test_fcos_notebook_class_loss_worked_number():
    preds = [torch.ones([2, 5, 4, 4])] * 5
    targets = torch.ones([2, 80, 1])
    mask = torch.ones([2, 80], dtype=torch.uint8)
    ref = fcos_compute_cls_loss(preds, targets, mask)
    torch.testing.assert_close(ref, torch.tensor([2.1113, 2.1113]), atol=1e-4, rtol=0)
    # ours: labels 1..C -> class index label-1, background (0) -> C; loss sum / num_pos per image
    logits = flatten_levels(preds)  # (2, 80, 5)
    labels = targets[..., 0].long()
    idx = torch.where(labels > 0, labels - 1, 5)
    loss = build_loss({"type": "FocalLoss", "gamma": 2.0, "alpha": 0.25})
    per_image = torch.stack([loss(logits[b], idx[b], avg_factor=80.0) for b in range(2)])
    torch.testing.assert_close(per_image, torch.tensor([2.1113, 2.1113]), atol=1e-4, rtol=0)
    torch.testing.assert_close(per_image, ref, **VAL_TOL)
    # whole batch at once with avg_factor = total positives
    torch.testing.assert_close(loss(logits, idx, avg_factor=160.0), ref.mean(), **VAL_TOL)
    # single image focal sum from the notebook cell: 168.9016
    torch.testing.assert_close(loss(logits[0], idx[0], reduction_override="sum"),
                               torch.tensor(168.9016), atol=1e-3, rtol=0)


def test_fcos_notebook_centerness_loss_worked_number():
    preds = [torch.ones([2, 1, 4, 4])] * 5
    targets = torch.ones([2, 80, 1])
    mask = torch.ones([2, 80], dtype=torch.bool)
    ref = fcos_compute_cnt_loss(preds, targets, mask)
    torch.testing.assert_close(ref, torch.tensor([0.3133, 0.3133]), atol=1e-4, rtol=0)
    logits = flatten_levels(preds)  # (2, 80, 1)
    loss = build_loss({"type": "CrossEntropyLoss", "use_sigmoid": True})
    torch.testing.assert_close(loss(logits, targets), torch.tensor(0.3133), atol=1e-4, rtol=0)
    per_image = torch.stack([loss(logits[b], targets[b], weight=mask[b].float(), avg_factor=80.0)
                             for b in range(2)])
    torch.testing.assert_close(per_image, ref, **VAL_TOL)


def test_fcos_notebook_identical_boxes_give_zero_iou_loss():
    preds = [torch.ones([2, 4, 4, 4])] * 5
    targets = torch.ones([2, 80, 4])
    mask = torch.ones([2, 80], dtype=torch.bool)
    ref = fcos_compute_reg_loss(preds, targets, mask)
    torch.testing.assert_close(ref, torch.zeros(2))
    points = torch.rand(2, 80, 2) * 100
    pred_boxes = ltrb_to_xyxy(points, flatten_levels(preds))
    target_boxes = ltrb_to_xyxy(points, targets)
    for mode in ["log", "linear", "square"]:
        ours = build_loss({"type": "IoULoss", "mode": mode, "reduction": "none"})(pred_boxes, target_boxes)
        assert ours.shape == (2, 80)
        assert ours.abs().max() < 1e-5
    for name in ["GIoULoss", "DIoULoss", "CIoULoss"]:
        ours = build_loss({"type": name, "reduction": "none"})(pred_boxes, target_boxes)
        assert ours.abs().max() < 1e-5


LEVELS = [(4, 4), (2, 2), (1, 3)]


def _fcos_targets(B, C):
    P = sum(h * w for h, w in LEVELS)
    labels = torch.randint(0, C + 1, (B, P))
    labels[1, :] = 0
    labels[1, 3] = 2  # image 1: a single positive
    pos = labels > 0
    cnt = torch.where(pos, torch.rand(B, P), torch.full((B, P), -1.0))[..., None]
    return labels, pos, cnt


def test_fcos_notebook_compute_cls_loss_random():
    B, C = 2, 4
    preds = [torch.randn(B, C, h, w) * 2 for h, w in LEVELS]
    labels, pos, _ = _fcos_targets(B, C)
    ref = fcos_compute_cls_loss(preds, labels[..., None].float(), pos)
    logits = leaf(flatten_levels(preds))
    idx = torch.where(labels > 0, labels - 1, C)
    num_pos = pos.sum(1).clamp(min=1).float()
    loss = build_loss({"type": "FocalLoss"})
    ours = torch.stack([loss(logits[b], idx[b], avg_factor=num_pos[b]) for b in range(B)])
    torch.testing.assert_close(ours, ref, **VAL_TOL)
    # also: 'none' summed per image / num_pos
    per_image = loss(logits.detach(), idx, reduction_override="none").sum((1, 2)) / num_pos
    torch.testing.assert_close(per_image, ref, **VAL_TOL)


def test_fcos_notebook_compute_cnt_loss_random():
    B, C = 2, 4
    preds = [torch.randn(B, 1, h, w) * 2 for h, w in LEVELS]
    _, pos, cnt = _fcos_targets(B, C)
    mask = (cnt > -1).squeeze(dim=-1)
    assert torch.equal(mask, pos)
    ref = fcos_compute_cnt_loss(preds, cnt, mask)
    logits = flatten_levels(preds)
    num_pos = mask.sum(1).clamp(min=1).float()
    loss = build_loss({"type": "CrossEntropyLoss", "use_sigmoid": True})
    ours = torch.stack([loss(logits[b], cnt[b], weight=mask[b].float(), avg_factor=num_pos[b])
                        for b in range(B)])
    torch.testing.assert_close(ours, ref, **VAL_TOL)


def test_fcos_notebook_compute_reg_loss_random():
    B, C = 2, 4
    preds = [torch.exp(torch.randn(B, 4, h, w)) * 8 for h, w in LEVELS]
    labels, pos, _ = _fcos_targets(B, C)
    P = labels.shape[1]
    targets = torch.exp(torch.randn(B, P, 4)) * 8
    ref = fcos_compute_reg_loss(preds, targets, pos)
    points = torch.rand(B, P, 2) * 200
    pred_boxes = ltrb_to_xyxy(points, flatten_levels(preds))
    target_boxes = ltrb_to_xyxy(points, targets)
    num_pos = pos.sum(1).clamp(min=1).float()
    loss = build_loss({"type": "IoULoss", "mode": "log"})
    ours = torch.stack([loss(pred_boxes[b], target_boxes[b], weight=pos[b].float(), avg_factor=num_pos[b])
                        for b in range(B)])
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


# --- seed 004: CenterNet ---------------------------------------------------------------------

def centernet_neg_loss(preds, targets):
    pos_inds = targets.eq(1).float()
    neg_inds = targets.lt(1).float()

    neg_weights = torch.pow(1 - targets, 4)

    loss = 0
    for pred in preds:
        pred = torch.clamp(torch.sigmoid(pred), min=1e-4, max=1 - 1e-4)
        pos_loss = torch.log(pred) * torch.pow(1 - pred, 2) * pos_inds
        neg_loss = torch.log(1 - pred) * torch.pow(pred, 2) * neg_weights * neg_inds
        num_pos = pos_inds.float().sum()
        pos_loss = pos_loss.sum()
        neg_loss = neg_loss.sum()

        if num_pos == 0:
            loss = loss - neg_loss
        else:
            loss = loss - (pos_loss + neg_loss) / num_pos
    return loss / len(preds)


def centernet_gather_feature(feat, ind, mask=None):
    dim = feat.size(2)
    ind = ind.unsqueeze(2).expand(ind.size(0), ind.size(1), dim)
    feat = feat.gather(1, ind)
    if mask is not None:
        mask = mask.unsqueeze(2).expand_as(feat)
        feat = feat[mask]
        feat = feat.view(-1, dim)
    return feat


def centernet_tranpose_and_gather_feature(feat, ind):
    feat = feat.permute(0, 2, 3, 1).contiguous()
    feat = feat.view(feat.size(0), -1, feat.size(3))
    feat = centernet_gather_feature(feat, ind)
    return feat


def centernet_reg_loss(regs, gt_regs, mask):
    mask = mask[:, :, None].expand_as(gt_regs).float()
    loss = sum(F.l1_loss(r * mask, gt_regs * mask, reduction='sum') /
               (mask.sum() + 1e-4) for r in regs)
    return loss / len(regs)


def gaussian_heatmap(B, C, H, W, n_obj):
    """Max of unnormalised gaussians with peaks exactly 1 at integer centres."""
    ys, xs = torch.meshgrid(torch.arange(H).float(), torch.arange(W).float(), indexing="ij")
    hm = torch.zeros(B, C, H, W)
    for _ in range(n_obj):
        b, c = torch.randint(0, B, ()).item(), torch.randint(0, C, ()).item()
        cy, cx = torch.randint(0, H, ()).item(), torch.randint(0, W, ()).item()
        sigma = 0.5 + torch.rand(()).item() * 1.5
        g = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma ** 2))
        hm[b, c] = torch.max(hm[b, c], g)
    return hm


@pytest.mark.parametrize("n_stacks", [1, 2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_focal_matches_centernet_neg_loss(n_stacks, dtype):
    hm = gaussian_heatmap(2, 3, 8, 8, n_obj=5)
    num_pos = hm.eq(1).sum().item()
    assert num_pos > 0 and (hm > 0).sum() > num_pos
    xs = [leaf((torch.rand(2, 3, 8, 8) * 2 - 1) * 4.9, dtype) for _ in range(n_stacks)]  # |x| < 5
    xrs = [ref_leaf(x) for x in xs]
    loss = build_loss({"type": "GaussianFocalLoss", "alpha": 2.0, "beta": 4.0})
    hm_d = hm.to(dtype)  # the reference sees the same rounded heatmap
    ours = sum(loss(x, hm_d, avg_factor=num_pos) for x in xs) / n_stacks
    ref = centernet_neg_loss(xrs, hm_d.float())
    assert_value_and_grad(ours, ref, list(zip(xs, xrs)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_focal_no_positive_equals_centernet_via_sum(dtype):
    hm = gaussian_heatmap(2, 3, 8, 8, n_obj=4) * 0.9  # gaussian, but no exact peak
    assert hm.eq(1).sum() == 0
    x = leaf((torch.rand(2, 3, 8, 8) * 2 - 1) * 4.9, dtype)
    xr = ref_leaf(x)
    hm_d = hm.to(dtype)
    ours = build_loss({"type": "GaussianFocalLoss", "reduction": "sum"})(x, hm_d)
    ref = centernet_neg_loss([xr], hm_d.float())
    assert_value_and_grad(ours, ref, [(x, xr)], dtype)


def test_gaussian_focal_elementwise_formula():
    hm = gaussian_heatmap(1, 2, 6, 6, n_obj=3)
    x = torch.randn(1, 2, 6, 6) * 2
    p = torch.sigmoid(x)
    ref = torch.where(hm.eq(1), -torch.log(p) * (1 - p) ** 2, -torch.log(1 - p) * p ** 2 * (1 - hm) ** 4)
    ours = build_loss({"type": "GaussianFocalLoss", "reduction": "none"})(x, hm)
    torch.testing.assert_close(ours, ref, **VAL_TOL)


@pytest.mark.parametrize("n_stacks", [1, 3])
@pytest.mark.parametrize("loss_weight", [1.0, 0.1])
def test_centernet_reg_loss_matches_l1_with_weight(n_stacks, loss_weight):
    B, H, W, K = 2, 6, 7, 5
    feats = [torch.randn(B, 2, H, W) for _ in range(n_stacks)]
    inds = torch.randint(0, H * W, (B, K))
    ind_masks = torch.rand(B, K) < 0.6
    ind_masks[0, 0] = True
    gt = torch.rand(B, K, 2) * 4
    regs = [centernet_tranpose_and_gather_feature(f, inds) for f in feats]
    ref = centernet_reg_loss(regs, gt, ind_masks) * loss_weight
    loss = build_loss({"type": "L1Loss", "loss_weight": loss_weight})
    avg = 2 * ind_masks.sum().item() + 1e-4  # mask expanded over the 2 codes
    ours = sum(loss(r, gt, weight=ind_masks.float(), avg_factor=avg) for r in regs) / n_stacks
    torch.testing.assert_close(ours, ref, **VAL_TOL)


# ----------------------------------------------------------------------------------------------
# 4. Numerics
# ----------------------------------------------------------------------------------------------

EXTREME = torch.tensor([-100.0, -30.0, -5.0, 0.0, 5.0, 30.0, 100.0])


def _extreme_cases():
    # (name, spec, make(pred_values) -> target)
    C = 7
    return {
        "focal-float": ({"type": "FocalLoss"}, lambda x: (torch.arange(C * C).reshape(C, C) % 2).float()),
        "focal-index": ({"type": "FocalLoss"}, lambda x: torch.arange(C) + 1),  # 7 = background
        "ce-softmax": ({"type": "CrossEntropyLoss", "label_smoothing": 0.1}, lambda x: torch.arange(C)),
        "ce-softmax-cw": ({"type": "CrossEntropyLoss", "class_weight": [1.0] * C}, lambda x: (torch.arange(C) + 3) % C),
        "bce-float": ({"type": "CrossEntropyLoss", "use_sigmoid": True}, lambda x: (torch.arange(C * C).reshape(C, C) % 2).float()),
        "bce-index": ({"type": "CrossEntropyLoss", "use_sigmoid": True}, lambda x: torch.arange(C)),
    }


@pytest.mark.parametrize("case", list(_extreme_cases()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits_finite(case, dtype, reduction):
    spec, make_target = _extreme_cases()[case]
    # every row holds all extreme values, rolled, so each class sees each of +-100
    logits = torch.stack([EXTREME.roll(i) for i in range(len(EXTREME))])
    x = leaf(logits, dtype)
    target = make_target(x)
    if target.is_floating_point():
        target = target.to(dtype)
    out = build_loss({**spec, "reduction": reduction})(x, target)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    # and the value equals the fp32 reference on the same logits where one exists
    if case.startswith("focal") and dtype == torch.float32:
        dense = target if target.is_floating_point() else one_hot_ref(target, logits.shape[-1])
        torch.testing.assert_close(out, sigmoid_focal_loss(logits, dense, reduction=reduction), **VAL_TOL)
    if case == "bce-float" and dtype == torch.float32:
        torch.testing.assert_close(out, F.binary_cross_entropy_with_logits(logits, target, reduction=reduction),
                                   **VAL_TOL)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_extreme_logits_gaussian_focal_finite(dtype, reduction):
    hm = gaussian_heatmap(1, 2, 7, 7, n_obj=3)
    logits = torch.stack([EXTREME.roll(i) for i in range(7)])[None, None].expand(1, 2, 7, 7)
    x = leaf(logits, dtype)
    out = build_loss({"type": "GaussianFocalLoss", "reduction": reduction})(x, hm.to(dtype))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    if dtype == torch.float32:  # elementwise formula, evaluated with logsigmoid
        p = torch.sigmoid(logits)
        ref = torch.where(hm.eq(1), -F.logsigmoid(logits) * (1 - p) ** 2,
                          -F.logsigmoid(-logits) * p ** 2 * (1 - hm) ** 4)
        torch.testing.assert_close(out, _reduce(ref, reduction), **VAL_TOL)


DEGENERATE = {
    "point_vs_box": ([5, 5, 5, 5], [0, 0, 10, 10]),
    "zero_height": ([0, 5, 10, 5], [0, 0, 10, 10]),
    "zero_width": ([5, 0, 5, 10], [0, 0, 10, 10]),
    "target_zero_height": ([0, 0, 10, 10], [2, 4, 8, 4]),
    "inverted": ([10, 10, 0, 0], [0, 0, 10, 10]),
    "inverted_x": ([10, 0, 0, 10], [0, 0, 10, 10]),
    "both_inverted": ([10, 10, 0, 0], [10, 10, 0, 0]),
    "identical": ([0, 0, 10, 10], [0, 0, 10, 10]),
    "identical_point": ([3, 3, 3, 3], [3, 3, 3, 3]),
    "identical_zero_height": ([0, 5, 10, 5], [0, 5, 10, 5]),
    "collinear_zero_width": ([5, 0, 5, 10], [5, 2, 5, 8]),
    "disjoint_points": ([0, 0, 0, 0], [7, 7, 7, 7]),
}
BOX_SPECS = [{"type": "IoULoss", "mode": m} for m in ("log", "linear", "square")] + \
            [{"type": n} for n in ("GIoULoss", "DIoULoss", "CIoULoss")]


@pytest.mark.parametrize("case", list(DEGENERATE))
@pytest.mark.parametrize("spec", BOX_SPECS, ids=lambda s: s["type"] + s.get("mode", ""))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_degenerate_boxes_finite(case, spec, dtype):
    p_vals, t_vals = DEGENERATE[case]
    p = leaf(torch.tensor([p_vals, [0, 0, 4, 4]], dtype=torch.float32), dtype)
    t = leaf(torch.tensor([t_vals, [1, 1, 5, 5]], dtype=torch.float32), dtype)
    for reduction in REDUCTIONS:
        p.grad = t.grad = None
        out = build_loss({**spec, "reduction": reduction})(p, t)
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), out
        out.sum().backward()
        assert torch.isfinite(p.grad).all() and torch.isfinite(t.grad).all(), (p.grad, t.grad)
    if case == "identical":
        assert build_loss({**spec, "reduction": "none"})(p, t)[0] < 1e-5


def test_identical_boxes_zero_loss():
    b = rand_boxes((6,))
    for spec in BOX_SPECS:
        out = build_loss({**spec, "reduction": "none"})(b, b.clone())
        assert out.abs().max() < 1e-5, spec


def test_torchvision_ciou_nan_grad_on_zero_height_box_but_ours_finite():
    pred = [[0.0, 5.0, 10.0, 5.0]]
    target = [[0.0, 0.0, 10.0, 10.0]]
    p_tv = torch.tensor(pred, requires_grad=True)
    complete_box_iou_loss(p_tv, torch.tensor(target), reduction="sum").backward()
    tv_has_nan = torch.isnan(p_tv.grad).any().item()
    p = torch.tensor(pred, requires_grad=True)
    out = build_loss({"type": "CIoULoss", "reduction": "sum"})(p, torch.tensor(target))
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(p.grad).all()
    if tv_has_nan:  # torchvision's atan(w / h) with h == 0 -> 0 * inf in the backward
        assert torch.isnan(p_tv.grad).any() and not torch.isnan(p.grad).any()
    # away from the degenerate point the two agree
    p_ok = torch.tensor([[0.0, 4.0, 10.0, 6.0]])
    torch.testing.assert_close(build_loss({"type": "CIoULoss", "reduction": "sum"})(p_ok, torch.tensor(target)),
                               complete_box_iou_loss(p_ok, torch.tensor(target), reduction="sum"))


def _empty_inputs(name):
    """(spec, pred (0 rows), target, weight (0 rows))"""
    z = torch.zeros
    cases = {
        "focal-float": ({"type": "FocalLoss"}, z(0, 5), z(0, 5), z(0)),
        "focal-index": ({"type": "FocalLoss"}, z(0, 5), z(0, dtype=torch.long), z(0)),
        "focal-3d": ({"type": "FocalLoss"}, z(2, 0, 5), z(2, 0, dtype=torch.long), z(2, 0)),
        "ce": ({"type": "CrossEntropyLoss"}, z(0, 5), z(0, dtype=torch.long), z(0)),
        "ce-cw-ls": ({"type": "CrossEntropyLoss", "class_weight": [1.0, 2, 3, 4, 5], "label_smoothing": 0.1},
                     z(0, 5), z(0, dtype=torch.long), z(0)),
        "bce-float": ({"type": "CrossEntropyLoss", "use_sigmoid": True}, z(0, 5), z(0, 5), z(0)),
        "bce-index": ({"type": "CrossEntropyLoss", "use_sigmoid": True}, z(0, 5), z(0, dtype=torch.long), z(0)),
        "smoothl1": ({"type": "SmoothL1Loss"}, z(0, 4), z(0, 4), z(0)),
        "smoothl1-code": ({"type": "SmoothL1Loss", "beta": 1 / 9, "code_weights": [1.0] * 7}, z(0, 7), z(0, 7), z(0)),
        "l1": ({"type": "L1Loss"}, z(0, 4), z(0, 4), z(0)),
        "iou": ({"type": "IoULoss"}, z(0, 4), z(0, 4), z(0)),
        "giou": ({"type": "GIoULoss"}, z(0, 4), z(0, 4), z(0)),
        "diou": ({"type": "DIoULoss"}, z(0, 4), z(0, 4), z(0)),
        "ciou": ({"type": "CIoULoss"}, z(0, 4), z(0, 4), z(0)),
        "gaussian": ({"type": "GaussianFocalLoss"}, z(0, 3, 4, 4), z(0, 3, 4, 4), z(0)),
    }
    return cases[name]


EMPTY_NAMES = ["focal-float", "focal-index", "focal-3d", "ce", "ce-cw-ls", "bce-float", "bce-index",
               "smoothl1", "smoothl1-code", "l1", "iou", "giou", "diou", "ciou", "gaussian"]


@pytest.mark.parametrize("name", EMPTY_NAMES)
@pytest.mark.parametrize("reduction,avg_factor", [("none", None), ("sum", None), ("mean", None),
                                                  ("mean", 0.0), ("mean", 3.0)])
@pytest.mark.parametrize("with_weight", [False, True])
def test_empty_inputs_zero_with_backward(name, reduction, avg_factor, with_weight):
    _check_empty(name, reduction, avg_factor, with_weight, torch.float32)


@pytest.mark.parametrize("name", EMPTY_NAMES)
@pytest.mark.parametrize("dtype", LOW)
def test_empty_inputs_low_precision(name, dtype):
    for reduction, avg_factor in [("none", None), ("sum", None), ("mean", None), ("mean", 0.0)]:
        _check_empty(name, reduction, avg_factor, True, dtype)


def _check_empty(name, reduction, avg_factor, with_weight, dtype):
    spec, pred, target, weight = _empty_inputs(name)
    x = leaf(pred, dtype)
    if target.is_floating_point():
        target = target.to(dtype)
    out = build_loss({**spec, "reduction": reduction})(x, target, weight=weight if with_weight else None,
                                                       avg_factor=avg_factor)
    assert out.dtype == torch.float32
    if reduction == "none":
        assert out.numel() == 0
        out = out.sum()
    assert out.shape == () and out.item() == 0.0
    assert out.requires_grad
    out.backward()
    assert x.grad is not None and x.grad.shape == x.shape


# ----------------------------------------------------------------------------------------------
# 5. Reduction semantics
# ----------------------------------------------------------------------------------------------

def _focal_elem(logits, target):
    return sigmoid_focal_loss(logits, target, reduction="none")


@pytest.mark.parametrize("weight_shape", ["row", "full", "scalar_like_rows"])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_broadcasts_from_the_left_2d(weight_shape, reduction):
    N, C = 6, 3
    logits = torch.randn(N, C)
    target = (torch.rand(N, C) < 0.3).float()
    elem = _focal_elem(logits, target)
    if weight_shape == "row":
        w = torch.rand(N)
        weighted = elem * w[:, None]
    elif weight_shape == "full":
        w = torch.rand(N, C)
        weighted = elem * w
    else:
        w = torch.full((N,), 2.0)
        weighted = elem * 2
    ours = build_loss({"type": "FocalLoss", "reduction": reduction})(logits, target, weight=w)
    torch.testing.assert_close(ours, _reduce(weighted, reduction), **VAL_TOL)


@pytest.mark.parametrize("weight_dims", [1, 2, 3])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_weight_broadcasts_from_the_left_3d(weight_dims, reduction):
    B, A, C = 2, 5, 3
    logits = torch.randn(B, A, C)
    target = (torch.rand(B, A, C) < 0.3).float()
    elem = _focal_elem(logits, target)
    w = torch.rand((B, A, C)[:weight_dims])
    weighted = elem * w.reshape(w.shape + (1,) * (3 - weight_dims))
    ours = build_loss({"type": "FocalLoss", "reduction": reduction})(logits, target, weight=w)
    torch.testing.assert_close(ours, _reduce(weighted, reduction), **VAL_TOL)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_box_loss_weight_per_box_and_per_coordinate(reduction):
    pred, target = box_pairs((8,))
    elem = generalized_box_iou_loss(pred, target)
    w_box = torch.rand(8)
    w_coord = torch.rand(8, 4)
    loss = build_loss({"type": "GIoULoss", "reduction": reduction})
    torch.testing.assert_close(loss(pred, target, weight=w_box), _reduce(elem * w_box, reduction), **VAL_TOL)
    # mmdetection accepts (N, 4) per-coordinate weights for IoU losses: averaged over the 4
    torch.testing.assert_close(loss(pred, target, weight=w_coord),
                               _reduce(elem * w_coord.mean(-1), reduction), **VAL_TOL)


@pytest.mark.parametrize("avg_factor", [1.0, 7.5, 0.0, "tensor"])
def test_avg_factor_divides_the_weighted_sum(avg_factor):
    logits, target = torch.randn(6, 4), (torch.rand(6, 4) < 0.3).float()
    w = torch.rand(6)
    weighted_sum = (_focal_elem(logits, target) * w[:, None]).sum()
    af = torch.tensor(4.0) if avg_factor == "tensor" else avg_factor
    expected = weighted_sum / (float(af) + EPS32)
    ours = build_loss({"type": "FocalLoss"})(logits, target, weight=w, avg_factor=af)
    torch.testing.assert_close(ours, expected, **VAL_TOL)
    # 'none' ignores avg_factor (mmdetection): elementwise weighted loss
    none = build_loss({"type": "FocalLoss", "reduction": "none"})(logits, target, weight=w, avg_factor=af)
    torch.testing.assert_close(none, _focal_elem(logits, target) * w[:, None], **VAL_TOL)


def test_avg_factor_zero_with_zero_loss_is_zero_not_nan():
    # all-ignored softmax CE: no valid targets -> default avg factor 0 -> 0, not NaN
    x = leaf(torch.randn(4, 3))
    out = build_loss({"type": "CrossEntropyLoss"})(x, torch.full((4,), -100))
    assert out.item() == 0.0
    out.backward()
    assert torch.isfinite(x.grad).all()


def test_avg_factor_overrides_ce_default_normaliser():
    x = torch.randn(8, 4)
    labels = torch.randint(0, 4, (8,))
    labels[:2] = -100
    elem = F.cross_entropy(x, labels, reduction="none")
    loss = build_loss({"type": "CrossEntropyLoss", "class_weight": [1.0, 2.0, 3.0, 4.0]})
    cw_elem = F.cross_entropy(x, labels, weight=torch.tensor([1.0, 2.0, 3.0, 4.0]), reduction="none")
    torch.testing.assert_close(loss(x, labels, avg_factor=5.0), cw_elem.sum() / (5.0 + EPS32), **VAL_TOL)
    plain = build_loss({"type": "CrossEntropyLoss"})
    torch.testing.assert_close(plain(x, labels), elem.sum() / 6, **VAL_TOL)


@pytest.mark.parametrize("default", REDUCTIONS)
@pytest.mark.parametrize("override", REDUCTIONS)
def test_reduction_override(default, override):
    x, t = torch.randn(5, 4), torch.randn(5, 4)
    loss = build_loss({"type": "SmoothL1Loss", "reduction": default})
    torch.testing.assert_close(loss(x, t, reduction_override=override),
                               F.smooth_l1_loss(x, t, reduction=override), **VAL_TOL)
    torch.testing.assert_close(loss(x, t), F.smooth_l1_loss(x, t, reduction=default), **VAL_TOL)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_weight_scales(name, reduction):
    pred, target = _sample_inputs(name)
    base = build_loss({"type": name, "reduction": reduction})(pred, target)
    scaled = build_loss({"type": name, "reduction": reduction, "loss_weight": 2.5})(pred, target)
    torch.testing.assert_close(scaled, 2.5 * base, **VAL_TOL)
    assert torch.isfinite(base).all() and base.abs().sum() > 0


def _sample_inputs(name):
    if name in ("IoULoss", "GIoULoss", "DIoULoss", "CIoULoss"):
        return box_pairs((6,))
    if name == "GaussianFocalLoss":
        return torch.randn(1, 2, 5, 5), gaussian_heatmap(1, 2, 5, 5, 2)
    if name == "CrossEntropyLoss":
        return torch.randn(6, 4), torch.randint(0, 4, (6,))
    if name == "FocalLoss":
        return torch.randn(6, 4), torch.randint(0, 5, (6,))
    return torch.randn(6, 4), torch.randn(6, 4)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_sum_with_avg_factor_raises(name):
    pred, target = _sample_inputs(name)
    with pytest.raises(ValueError, match="avg_factor"):
        build_loss({"type": name, "reduction": "sum"})(pred, target, avg_factor=2.0)
    with pytest.raises(ValueError, match="avg_factor"):
        build_loss({"type": name})(pred, target, avg_factor=2.0, reduction_override="sum")


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_bad_reduction_raises(name):
    with pytest.raises(ValueError, match="reduction"):
        build_loss({"type": name, "reduction": "avg"})
    pred, target = _sample_inputs(name)
    with pytest.raises(ValueError, match="reduction"):
        build_loss({"type": name})(pred, target, reduction_override="elementwise_mean")


@pytest.mark.parametrize("bad", ["trailing", "too_many_dims", "wrong_rows", "transposed"])
def test_bad_weight_shape_raises(bad):
    N, C = 6, 4
    logits, target = torch.randn(N, C), torch.randint(0, C + 1, (N,))
    weight = {"trailing": torch.rand(C), "too_many_dims": torch.rand(N, C, 1),
              "wrong_rows": torch.rand(N + 1), "transposed": torch.rand(C, N)}[bad]
    for reduction in REDUCTIONS:
        with pytest.raises(ValueError, match="weight"):
            build_loss({"type": "FocalLoss", "reduction": reduction})(logits, target, weight=weight)
    with pytest.raises(ValueError, match="weight"):
        build_loss({"type": "SmoothL1Loss"})(torch.randn(N, C), torch.randn(N, C), weight=weight)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        build_loss({"type": "IoULoss", "mode": "cube"})
    with pytest.raises(ValueError):
        build_loss({"type": "SmoothL1Loss", "beta": -1.0})
    with pytest.raises(ValueError):
        build_loss({"type": "CrossEntropyLoss", "label_smoothing": 1.5})
    # out-of-range class indices read as background (no host-syncing range check in the hot path;
    # the detector validates labels on the CPU before they reach the device)
    logits = torch.randn(3, 4)
    torch.testing.assert_close(build_loss({"type": "FocalLoss"})(logits, torch.tensor([0, 5, 1])),
                               build_loss({"type": "FocalLoss"})(logits, torch.tensor([0, 4, 1])))
    with pytest.raises(ValueError):
        build_loss({"type": "FocalLoss"})(torch.randn(3, 4), torch.rand(3, 5))
    with pytest.raises(ValueError):
        build_loss({"type": "GIoULoss"})(torch.rand(3, 5), torch.rand(3, 5))
    with pytest.raises(ValueError):
        build_loss({"type": "SmoothL1Loss", "code_weights": [1.0, 2.0]})(torch.randn(3, 4), torch.randn(3, 4))


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("dtype", LOW + [torch.float64])
def test_output_is_float32(name, dtype):
    pred, target = _sample_inputs(name)
    x = leaf(pred, dtype)
    if target.is_floating_point():
        target = target.to(dtype)
    out = build_loss({"type": name})(x, target)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
