"""mmdetection-formula losses (QFL, DFL, VFL, EIoU, SIoU, MSE, balanced L1) and the CrossEntropyLoss /
GaussianFocalLoss options, against independent references.

References are mmdetection's formulas (mmdet/models/losses/{gfocal_loss,varifocal_loss,iou_loss,
balanced_l1_loss,cross_entropy_loss,gaussian_focal_loss}.py) reimplemented here in their own
index-and-assign style, the published formulas (EIoU: Zhang et al. 2021; SIoU: Gevorgyan 2022, with
its arcsin/cos angle cost), torch functions and hand-computed numbers. mmdetection's own unit tests
(tests/test_models/test_losses/test_loss.py, test_gaussian_focal_loss.py) check types and
equalities but no numbers; their equalities are repeated here. Nothing from detkit builds a reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import distance_box_iou_loss

from detkit.losses import LOSSES, build_loss
from tests.test_losses import (
    DEGENERATE,
    EPS32,
    VAL_TOL,
    assert_value_and_grad,
    box_pairs,
    gaussian_heatmap,
    leaf,
    ref_leaf,
)

REDUCTIONS = ["none", "sum", "mean"]
LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _reduce(loss, reduction, avg_factor=None):
    if reduction == "none":
        return loss
    if avg_factor is not None:
        return loss.sum() / (avg_factor + EPS32)
    return loss.sum() if reduction == "sum" else loss.mean()


def check_reductions(spec, grad_inputs, ref_fn, dtype, targets=(), **tols):
    """For every reduction: ``spec`` built on ``grad_inputs`` (cast to ``dtype``, as leaves) and
    ``targets`` against ``ref_fn`` on fp32 copies of the same rounded leaves; value and grads."""
    for reduction in REDUCTIONS:
        leaves = [leaf(x, dtype) for x in grad_inputs]
        refs = [ref_leaf(x) for x in leaves]
        ours = build_loss({**spec, "reduction": reduction})(*leaves, *targets)
        assert_value_and_grad(ours, _reduce(ref_fn(*refs), reduction), list(zip(leaves, refs)), dtype, **tols)


# ----------------------------------------------------------------------------------------------
# mmdetection's formulas, reimplemented
# ----------------------------------------------------------------------------------------------

def mmdet_quality_focal_loss(pred, label, score, beta=2.0):
    """(N, C) logits, (N,) labels (C = background), (N,) scores -> (N,)."""
    sig = pred.sigmoid()
    loss = F.binary_cross_entropy_with_logits(pred, torch.zeros_like(pred), reduction="none") * sig.pow(beta)
    pos = ((label >= 0) & (label < pred.size(1))).nonzero().squeeze(1)
    pos_label = label[pos]
    scale = score[pos] - sig[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy_with_logits(
        pred[pos, pos_label], score[pos], reduction="none") * scale.abs().pow(beta)
    return loss.sum(dim=1)


def mmdet_distribution_focal_loss(pred, label):
    dis_left = label.long()
    dis_right = dis_left + 1
    weight_left = dis_right.float() - label
    weight_right = label - dis_left.float()
    return (F.cross_entropy(pred, dis_left, reduction="none") * weight_left
            + F.cross_entropy(pred, dis_right, reduction="none") * weight_right)


def mmdet_varifocal_loss(pred, target, alpha=0.75, gamma=2.0, iou_weighted=True):
    sig = pred.sigmoid()
    pos = (target > 0.0).float()
    focal_weight = (target if iou_weighted else 1.0) * pos + \
        alpha * (sig - target).abs().pow(gamma) * (target <= 0.0).float()
    return F.binary_cross_entropy_with_logits(pred, target, reduction="none") * focal_weight


def quality_inputs(n=9, c=5):
    pred = torch.randn(n, c) * 3
    labels = torch.randint(0, c + 1, (n,))  # c = background
    labels[:3] = torch.tensor([0, c, c - 1])[:n]
    scores = torch.rand(n)
    return pred, labels, scores


# ----------------------------------------------------------------------------------------------
# QualityFocalLoss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_qfl_matches_mmdet(dtype, beta):
    pred, labels, scores = quality_inputs()
    s = scores.to(dtype)
    check_reductions({"type": "QualityFocalLoss", "beta": beta}, [pred],
                     lambda xr: mmdet_quality_focal_loss(xr, labels, s.float(), beta), dtype, [(labels, s)])


def test_qfl_dense_target_equals_tuple_target():
    """mmdet test_QualityFocalLoss_Loss: one_hot(label) * quality as a dense target gives the same loss."""
    pred, labels, scores = quality_inputs()
    dense = F.one_hot(labels, 6)[:, :5] * scores[:, None]
    loss = build_loss({"type": "QualityFocalLoss"})
    torch.testing.assert_close(loss(pred, (labels, scores)), loss(pred, dense.float()), rtol=0, atol=0)
    # and a soft dense target follows the same per-element formula
    soft = torch.rand(9, 5)
    elem = F.binary_cross_entropy_with_logits(pred, soft, reduction="none") * (soft - pred.sigmoid()).abs() ** 2
    torch.testing.assert_close(loss(pred, soft, reduction_override="none"), elem.sum(-1), **VAL_TOL)


def test_qfl_worked_numbers():
    # logit 0: sigmoid 1/2. Background class: (1/2)^2 * BCE(0, 0) = ln(2) / 4 per class.
    # Positive with score 1/2: |1/2 - 1/2|^2 * ... = 0. Positive with score 1: (1/2)^2 * ln 2.
    pred = torch.zeros(3, 2)
    labels, scores = torch.tensor([2, 0, 1]), torch.tensor([0.9, 0.5, 1.0])
    out = build_loss({"type": "QualityFocalLoss", "reduction": "none"})(pred, (labels, scores))
    ln2 = math.log(2.0)
    torch.testing.assert_close(out, torch.tensor([ln2 / 2, ln2 / 4, ln2 / 4 + ln2 / 4]))


def test_qfl_weight_and_avg_factor():
    pred, labels, scores = quality_inputs()
    w = torch.rand(9)
    elem = mmdet_quality_focal_loss(pred, labels, scores)
    out = build_loss({"type": "QualityFocalLoss"})(pred, (labels, scores), weight=w, avg_factor=4.0)
    torch.testing.assert_close(out, (elem * w).sum() / (4.0 + EPS32), **VAL_TOL)


def test_qfl_bad_targets_raise():
    loss = build_loss({"type": "QualityFocalLoss"})
    pred, labels, scores = quality_inputs()
    with pytest.raises(ValueError, match="labels, scores"):
        loss(pred, (labels, scores, scores))
    with pytest.raises(ValueError, match="labels, scores"):
        loss(pred, (labels[:4], scores[:4]))
    with pytest.raises(ValueError, match="dense quality target"):
        loss(pred, torch.rand(9, 4))
    with pytest.raises(ValueError, match="sigmoid"):
        build_loss({"type": "QualityFocalLoss", "use_sigmoid": False})


# ----------------------------------------------------------------------------------------------
# DistributionFocalLoss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dfl_matches_mmdet(dtype):
    reg_max = 7
    pred = torch.randn(12, reg_max + 1) * 3
    # (reg_max - 0.01 would round to reg_max in bf16, where mmdet's formula indexes a missing bin)
    target = torch.rand(12) * (reg_max - 0.1)
    target[:3] = torch.tensor([0.0, 3.0, reg_max - 0.1])  # integers (all weight on one bin), mmdet's top
    t = target.to(dtype)
    check_reductions({"type": "DistributionFocalLoss"}, [pred],
                     lambda xr: mmdet_distribution_focal_loss(xr, t.float()), dtype, [t])


def test_dfl_worked_numbers_and_reg_max():
    loss = build_loss({"type": "DistributionFocalLoss", "reduction": "none"})
    # uniform logits over 8 bins: every bin's CE is ln 8, whatever the target
    out = loss(torch.zeros(3, 8), torch.tensor([0.0, 2.5, 6.99]))
    torch.testing.assert_close(out, torch.full((3,), math.log(8.0)))
    # target 2.25 between bins 2 and 3: 0.75 CE(x, 2) + 0.25 CE(x, 3)
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    ce = -F.log_softmax(x, -1)[0]
    torch.testing.assert_close(loss(x, torch.tensor([2.25])), (0.75 * ce[2] + 0.25 * ce[3])[None])
    # a target of exactly reg_max: the CE of the last bin (mmdet indexes bin reg_max + 1 there) and
    # the limit of the loss from below
    torch.testing.assert_close(loss(x, torch.tensor([3.0])), ce[3][None])
    torch.testing.assert_close(loss(x, torch.tensor([3.0 - 1e-4])), ce[3][None], rtol=1e-3, atol=1e-4)
    with pytest.raises(IndexError):
        mmdet_distribution_focal_loss(x, torch.tensor([3.0]))
    with pytest.raises(ValueError, match="float of shape"):
        loss(x, torch.tensor([2]))


# ----------------------------------------------------------------------------------------------
# Every new loss: registry, numerics, reduction semantics
# ----------------------------------------------------------------------------------------------

BOX_LOSSES = ("EIoULoss", "SIoULoss")


def _inputs(name, n=6, dtype=torch.float32):
    """(pred, target) for ``name``: logits, distances, codes or x1y1x2y2 boxes; floats in ``dtype``."""
    if name in ("QualityFocalLoss", "VarifocalLoss"):
        pred, labels, scores = quality_inputs(n, 4)
        target = (labels, scores.to(dtype)) if name == "QualityFocalLoss" else \
            (F.one_hot(labels, 5)[:, :4] * scores[:, None]).to(dtype)
        return pred.to(dtype), target
    if name == "DistributionFocalLoss":
        return torch.randn(n, 8).to(dtype), (torch.rand(n) * 6.99).to(dtype)
    if name in BOX_LOSSES:
        pred, target = box_pairs((n,))
        return pred.to(dtype), target.to(dtype)
    return (torch.randn(n, 4) * 2).to(dtype), (torch.randn(n, 4) * 2).to(dtype)


NEW_LOSSES = {
    "QualityFocalLoss": "quality",
    "VarifocalLoss": "quality",
    "DistributionFocalLoss": "distribution",
    "EIoULoss": "box",
    "SIoULoss": "box",
    "MSELoss": "regression",
    "BalancedL1Loss": "regression",
}
LOGIT_LOSSES = ["QualityFocalLoss", "VarifocalLoss", "DistributionFocalLoss"]


@pytest.mark.parametrize("name", list(NEW_LOSSES))
def test_registered_with_kinds(name):
    loss = build_loss({"type": name, "reduction": "sum", "loss_weight": 2.0})
    assert name in LOSSES and type(loss).__name__ == name
    assert loss.reduction == "sum" and loss.loss_weight == 2.0
    assert NEW_LOSSES[name] in loss.kinds


def test_list_command_shows_the_new_losses():
    from tests.cli_runner import run_main

    proc = run_main("list", "losses")
    assert proc.returncode == 0
    assert proc.stdout.startswith("losses (") and int(proc.stdout.split("(")[1].split(")")[0]) >= 16
    for name in NEW_LOSSES:
        assert f"  {name}(" in proc.stdout
    assert "avg_non_ignore=True" in proc.stdout and "pos_weight=1.0, neg_weight=1.0" in proc.stdout


@pytest.mark.parametrize("name", LOGIT_LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_extreme_logits_finite(name, dtype):
    pred, target = _inputs(name, n=14, dtype=dtype)
    pred = torch.where(torch.rand(pred.shape) < 0.5, -100.0, 100.0).to(dtype)
    pred[0] = 0
    x = leaf(pred, dtype)
    for reduction in REDUCTIONS:
        x.grad = None
        out = build_loss({"type": name, "reduction": reduction})(x, target)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        out.sum().backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


def _cast(target, dtype):
    if isinstance(target, tuple):
        return tuple(_cast(t, dtype) for t in target)
    return target.to(dtype) if target.is_floating_point() else target


@pytest.mark.parametrize("name", list(NEW_LOSSES))
@pytest.mark.parametrize("dtype", LOW)
def test_low_precision_close_to_fp32(name, dtype):
    """fp16/bf16 inputs: float32 result equal to the fp32 loss of the rounded inputs, close to the
    fp32 loss of the unrounded ones; finite float32 gradient rounded to the input dtype."""
    pred, target = _inputs(name, n=20)
    loss = build_loss({"type": name, "reduction": "sum"})
    x = leaf(pred, dtype)
    out = loss(x, _cast(target, dtype))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, loss(x.detach().float(), _cast(_cast(target, dtype), torch.float32)))
    tol = {torch.float16: 5e-3, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out, loss(pred, target), rtol=tol, atol=tol)
    out.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", list(NEW_LOSSES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_inputs_zero_with_graph(name, dtype):
    pred, target = _inputs(name, n=0, dtype=dtype)
    for reduction, avg_factor, weight in [("none", None, None), ("sum", None, torch.zeros(0)),
                                          ("mean", None, None), ("mean", 0.0, torch.zeros(0))]:
        x = leaf(pred, dtype)
        out = build_loss({"type": name, "reduction": reduction})(x, target, weight=weight, avg_factor=avg_factor)
        assert out.dtype == torch.float32
        out = out.sum()
        assert out.item() == 0.0 and out.requires_grad
        out.backward()
        assert x.grad is not None and x.grad.shape == x.shape


@pytest.mark.parametrize("name", list(NEW_LOSSES))
def test_weight_avg_factor_reduction_and_loss_weight(name):
    pred, target = _inputs(name, n=7)
    elem = build_loss({"type": name, "reduction": "none"})(pred, target)
    w = torch.rand(7)
    welem = elem * w.reshape(7, *([1] * (elem.dim() - 1)))
    loss = build_loss({"type": name, "loss_weight": 1.5})
    torch.testing.assert_close(loss(pred, target, weight=w), 1.5 * welem.mean(), **VAL_TOL)
    torch.testing.assert_close(loss(pred, target, weight=w, avg_factor=3.0), 1.5 * welem.sum() / (3.0 + EPS32),
                               **VAL_TOL)
    torch.testing.assert_close(loss(pred, target, weight=w, reduction_override="sum"), 1.5 * welem.sum(),
                               **VAL_TOL)
    with pytest.raises(ValueError, match="avg_factor"):
        loss(pred, target, avg_factor=2.0, reduction_override="sum")
    with pytest.raises(ValueError, match="reduction"):
        loss(pred, target, reduction_override="max")
    with pytest.raises(ValueError, match="weight"):
        loss(pred, target, weight=torch.rand(8))


def test_qfl_and_vfl_are_swappable_in_a_quality_term():
    """A GFL head's cls term takes either, with the same (labels, scores) target and (N,) weight;
    a classification term (FCOS: class-index targets) refuses both."""
    from detkit.losses.terms import LossTerms
    from detkit.registry import ConfigError

    pred, labels, scores = quality_inputs()
    w = torch.rand(9)
    for spec in ({"type": "QualityFocalLoss"}, {"type": "VarifocalLoss"}):
        terms = LossTerms({"cls": spec}, {"cls": ("quality",)})
        out = terms("cls", pred, (labels, scores), weight=w, avg_factor=3.0)["cls"]
        assert out.shape == () and torch.isfinite(out) and out > 0
        with pytest.raises(ConfigError, match="quality loss"):
            LossTerms({"cls": spec}, {"cls": ("classification",)})


# ----------------------------------------------------------------------------------------------
# VarifocalLoss
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("iou_weighted,alpha,gamma", [(True, 0.75, 2.0), (False, 0.5, 1.5)])
def test_vfl_matches_mmdet(dtype, iou_weighted, alpha, gamma):
    pred, labels, scores = quality_inputs()
    target = (F.one_hot(labels, 6)[:, :5] * scores[:, None]).to(dtype)
    spec = {"type": "VarifocalLoss", "alpha": alpha, "gamma": gamma, "iou_weighted": iou_weighted}
    check_reductions(spec, [pred], lambda xr: mmdet_varifocal_loss(xr, target.float(), alpha, gamma, iou_weighted),
                     dtype, [target])


def test_vfl_tuple_target_and_worked_numbers():
    pred, labels, scores = quality_inputs()
    dense = (F.one_hot(labels, 6)[:, :5] * scores[:, None]).float()
    loss = build_loss({"type": "VarifocalLoss", "reduction": "none"})
    torch.testing.assert_close(loss(pred, (labels, scores)), loss(pred, dense), rtol=0, atol=0)
    # logit 0 (sigmoid 1/2, BCE(0, t) = ln 2 for every t): negative 0.75 * (1/2)^2 * ln 2,
    # positive with IoU 0.8: 0.8 * ln 2 (iou_weighted) or ln 2
    out = loss(torch.zeros(1, 2), torch.tensor([[0.0, 0.8]]))
    ln2 = math.log(2.0)
    torch.testing.assert_close(out, torch.tensor([[0.75 * 0.25 * ln2, 0.8 * ln2]]))
    plain = build_loss({"type": "VarifocalLoss", "iou_weighted": False, "reduction": "none"})
    torch.testing.assert_close(plain(torch.zeros(1, 2), torch.tensor([[0.0, 0.8]])),
                               torch.tensor([[0.75 * 0.25 * ln2, ln2]]))
    with pytest.raises(ValueError, match="alpha"):
        build_loss({"type": "VarifocalLoss", "alpha": -0.1})


# ----------------------------------------------------------------------------------------------
# Class-index targets: -1 reads as background; ignoring is CrossEntropyLoss's ignore_index
# ----------------------------------------------------------------------------------------------

def test_label_minus_one_is_background_for_every_sigmoid_loss():
    pred = torch.randn(4, 3)
    minus, bg = torch.tensor([0, -1, 2, -1]), torch.tensor([0, 3, 2, 3])
    scores = torch.rand(4)
    for spec in ({"type": "FocalLoss"}, {"type": "CrossEntropyLoss", "use_sigmoid": True}):
        loss = build_loss({**spec, "reduction": "none"})
        torch.testing.assert_close(loss(pred, minus), loss(pred, bg), rtol=0, atol=0)
        assert loss(pred, minus)[1].sum() > 0  # trained as a negative, not ignored
    for name in ("QualityFocalLoss", "VarifocalLoss"):
        loss = build_loss({"type": name, "reduction": "none"})
        torch.testing.assert_close(loss(pred, (minus, scores)), loss(pred, (bg, scores)), rtol=0, atol=0)


@pytest.mark.parametrize("at_call", [False, True])
def test_sigmoid_ce_ignore_index_minus_one_ignores(at_call):
    x = leaf(torch.randn(4, 3))
    labels = torch.tensor([0, -1, 2, 3])
    spec = {"type": "CrossEntropyLoss", "use_sigmoid": True}
    loss = build_loss(spec if at_call else {**spec, "ignore_index": -1})
    kw = {"ignore_index": -1} if at_call else {}
    out = loss(x, labels, reduction_override="none", **kw)
    assert (out[1] == 0).all()
    keep = torch.tensor([0, 2, 3])
    torch.testing.assert_close(loss(x, labels, **kw), build_loss(spec)(x[keep], labels[keep]), **VAL_TOL)
    loss(x, labels, **kw).backward()
    assert (x.grad[1] == 0).all()


# ----------------------------------------------------------------------------------------------
# CrossEntropyLoss: ignore_index at call time, avg_non_ignore
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("use_sigmoid", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean", None])
@pytest.mark.parametrize("avg_non_ignore", [True, False])
def test_ce_ignore_index_like_mmdet(use_sigmoid, reduction, avg_non_ignore):
    """mmdet test_loss_with_ignore_index, with the values it checks."""
    pred = torch.rand(10, 5)
    target = torch.randint(0, 5, (10,))
    target[torch.tensor([1, 6])] = 255
    built = build_loss({"type": "CrossEntropyLoss", "use_sigmoid": use_sigmoid, "ignore_index": 255,
                        "avg_non_ignore": avg_non_ignore})
    default = build_loss({"type": "CrossEntropyLoss", "use_sigmoid": use_sigmoid, "avg_non_ignore": avg_non_ignore})
    with_ignore = built(pred, target, reduction_override=reduction)
    with_call_ignore = default(pred, target, ignore_index=255, reduction_override=reduction)
    torch.testing.assert_close(with_ignore, with_call_ignore)
    keep = target != 255
    removed = built(pred[keep], target[keep], reduction_override=reduction)
    if avg_non_ignore or reduction == "sum":
        torch.testing.assert_close(with_ignore, removed)
    else:  # mmdetection's default: the mean counts the ignored elements too
        torch.testing.assert_close(with_ignore, removed * 8 / 10)
    all_ignored = built(pred, torch.full((10,), 255), reduction_override=reduction)
    assert all_ignored.item() == 0


def test_ce_avg_non_ignore_false_is_mmdet_default_mean():
    x = torch.randn(8, 4)
    labels = torch.randint(0, 4, (8,))
    labels[:3] = -100
    cw = torch.tensor([1.0, 2.0, 3.0, 4.0])
    elem = F.cross_entropy(x, labels, weight=cw, reduction="none")  # mmdet's cross_entropy
    loss = build_loss({"type": "CrossEntropyLoss", "class_weight": cw.tolist(), "avg_non_ignore": False})
    torch.testing.assert_close(loss(x, labels), elem.mean(), **VAL_TOL)
    # detkit's default (True): torch's weighted mean over the non-ignored targets
    torch.testing.assert_close(build_loss({"type": "CrossEntropyLoss", "class_weight": cw.tolist()})(x, labels),
                               F.cross_entropy(x, labels, weight=cw), **VAL_TOL)
    sig = build_loss({"type": "CrossEntropyLoss", "use_sigmoid": True, "avg_non_ignore": False})
    dense = (labels[:, None] == torch.arange(4)).float()
    ref = F.binary_cross_entropy_with_logits(x, dense, reduction="none") * (labels >= 0)[:, None]
    torch.testing.assert_close(sig(x, labels), ref.sum() / 32, **VAL_TOL)


# ----------------------------------------------------------------------------------------------
# GaussianFocalLoss: pos_weight / neg_weight, sparse positives
# ----------------------------------------------------------------------------------------------

def mmdet_gaussian_focal_loss(pred, gaussian_target, alpha=2.0, gamma=4.0, pos_weight=1.0, neg_weight=1.0):
    """mmdet's formula on probabilities ``pred``."""
    eps = 1e-12
    pos_weights = gaussian_target.eq(1)
    neg_weights = (1 - gaussian_target).pow(gamma)
    pos_loss = -(pred + eps).log() * (1 - pred).pow(alpha) * pos_weights
    neg_loss = -(1 - pred + eps).log() * pred.pow(alpha) * neg_weights
    return pos_weight * pos_loss + neg_weight * neg_loss


def mmdet_gaussian_focal_loss_with_pos_inds(pred, gaussian_target, pos_inds, pos_labels, alpha=2.0, gamma=4.0,
                                            pos_weight=1.0, neg_weight=1.0, reduction="mean", avg_factor=None):
    eps = 1e-12
    neg_weights = (1 - gaussian_target).pow(gamma)
    pos_pred = pred[pos_inds].gather(1, pos_labels.unsqueeze(1))
    pos_loss = _reduce(-(pos_pred + eps).log() * (1 - pos_pred).pow(alpha), reduction, avg_factor)
    neg_loss = _reduce(-(1 - pred + eps).log() * pred.pow(alpha) * neg_weights, reduction, avg_factor)
    return pos_weight * pos_loss + neg_weight * neg_loss


def _heatmap_rows(n_obj=3):
    """(N, C) logits and gaussian target (flattened 2 x 6 x 6 maps), and the (flat index, label)
    of the target's peaks."""
    hm = gaussian_heatmap(1, 2, 6, 6, n_obj).permute(0, 2, 3, 1).reshape(-1, 2)
    pos_inds, pos_labels = hm.eq(1).nonzero(as_tuple=True)
    return torch.randn(36, 2) * 2, hm, pos_inds, pos_labels


@pytest.mark.parametrize("pos_weight,neg_weight", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_gaussian_focal_pos_neg_weight_matches_mmdet(pos_weight, neg_weight, reduction):
    x, hm, _, _ = _heatmap_rows()
    out = build_loss({"type": "GaussianFocalLoss", "pos_weight": pos_weight, "neg_weight": neg_weight,
                      "reduction": reduction})(x, hm)
    ref = mmdet_gaussian_focal_loss(x.sigmoid(), hm, pos_weight=pos_weight, neg_weight=neg_weight)
    torch.testing.assert_close(out, _reduce(ref, reduction), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("reduction,avg_factor", [("mean", None), ("sum", None), ("mean", 3.0)])
@pytest.mark.parametrize("pos_weight,neg_weight", [(1.0, 1.0), (2.0, 0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gaussian_focal_sparse_positives_match_mmdet(reduction, avg_factor, pos_weight, neg_weight, dtype):
    x, hm, pos_inds, pos_labels = _heatmap_rows()
    # like mmdet's unit test: extra (possibly repeated) positives where the target is not 1
    pos_inds = torch.cat([pos_inds, torch.tensor([0, 0, 5])])
    pos_labels = torch.cat([pos_labels, torch.tensor([1, 1, 0])])
    xl = leaf(x, dtype)
    loss = build_loss({"type": "GaussianFocalLoss", "pos_weight": pos_weight, "neg_weight": neg_weight})
    out = loss(xl, hm.to(dtype), avg_factor=avg_factor, reduction_override=reduction,
               pos_inds=pos_inds, pos_labels=pos_labels)
    ref = mmdet_gaussian_focal_loss_with_pos_inds(xl.detach().float().sigmoid(), hm.to(dtype).float(), pos_inds,
                                                  pos_labels, pos_weight=pos_weight, neg_weight=neg_weight,
                                                  reduction=reduction, avg_factor=avg_factor)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.backward()
    assert torch.isfinite(xl.grad).all()


def test_gaussian_focal_sparse_none_weight_and_errors():
    x, hm, pos_inds, pos_labels = _heatmap_rows()
    loss = build_loss({"type": "GaussianFocalLoss"})
    kw = dict(pos_inds=pos_inds, pos_labels=pos_labels)
    # with the peaks as positives the sparse form equals the dense one
    torch.testing.assert_close(loss(x, hm, avg_factor=3.0, **kw), loss(x, hm, avg_factor=3.0))
    none = loss(x, hm, reduction_override="none", **kw)
    assert none.shape == (36, 2)
    torch.testing.assert_close(none.sum(), loss(x, hm, reduction_override="sum", **kw))
    w = torch.rand(36)
    torch.testing.assert_close(loss(x, hm, weight=w, reduction_override="sum", **kw), (none * w[:, None]).sum())
    torch.testing.assert_close(loss(x, hm, weight=w[:, None].expand(36, 2), avg_factor=2.0, **kw),
                               (none * w[:, None]).sum() / (2.0 + EPS32))
    with pytest.raises(ValueError, match="pos_labels"):
        loss(x, hm, pos_inds=pos_inds)
    with pytest.raises(ValueError, match="sparse"):
        loss(x.reshape(1, 36, 2), hm.reshape(1, 36, 2), **kw)
    with pytest.raises(ValueError, match="weight"):
        loss(x, hm, weight=torch.rand(35), **kw)
    for value in (100.0, -100.0):
        xe = leaf(torch.full((36, 2), value), torch.bfloat16)
        out = loss(xe, hm.bfloat16(), avg_factor=3.0, **kw)
        out.backward()
        assert torch.isfinite(out) and torch.isfinite(xe.grad).all()
    empty = leaf(torch.zeros(0, 2))
    out = loss(empty, torch.zeros(0, 2), pos_inds=torch.zeros(0, dtype=torch.long),
               pos_labels=torch.zeros(0, dtype=torch.long), avg_factor=0.0)
    assert out.item() == 0 and out.requires_grad


# ----------------------------------------------------------------------------------------------
# EIoU, SIoU
# ----------------------------------------------------------------------------------------------

def eiou_reference(p, t):
    """Zhang et al. 2021 eq. (9): DIoU (torchvision) + (w - w_t)^2 / C_w^2 + (h - h_t)^2 / C_h^2."""
    cw = torch.max(p[:, 2], t[:, 2]) - torch.min(p[:, 0], t[:, 0])
    ch = torch.max(p[:, 3], t[:, 3]) - torch.min(p[:, 1], t[:, 1])
    dw = (p[:, 2] - p[:, 0]) - (t[:, 2] - t[:, 0])
    dh = (p[:, 3] - p[:, 1]) - (t[:, 3] - t[:, 1])
    return distance_box_iou_loss(p, t) + dw ** 2 / cw ** 2 + dh ** 2 / ch ** 2


def siou_reference(pred, target, eps=1e-7, paper_sign=True):
    """mmdetection's siou_loss (from YOLOv6) with its arcsin/cos angle cost; paper_sign is its neg_gamma."""
    lt = torch.max(pred[:, :2], target[:, :2])
    rb = torch.min(pred[:, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    overlap = wh[:, 0] * wh[:, 1]
    ap = (pred[:, 2] - pred[:, 0]) * (pred[:, 3] - pred[:, 1])
    ag = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    ious = overlap / (ap + ag - overlap + eps)
    enclose_wh = (torch.max(pred[:, 2:], target[:, 2:]) - torch.min(pred[:, :2], target[:, :2])).clamp(min=eps)
    cw, ch = enclose_wh[:, 0], enclose_wh[:, 1]
    w1, h1 = pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1] + eps
    w2, h2 = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1] + eps
    s_cw = (target[:, 0] + target[:, 2] - pred[:, 0] - pred[:, 2]) * 0.5 + eps
    s_ch = (target[:, 1] + target[:, 3] - pred[:, 1] - pred[:, 3]) * 0.5 + eps
    sigma = torch.pow(s_cw ** 2 + s_ch ** 2, 0.5)
    sin_alpha_1, sin_alpha_2 = torch.abs(s_cw) / sigma, torch.abs(s_ch) / sigma
    sin_alpha = torch.where(sin_alpha_1 > pow(2, 0.5) / 2, sin_alpha_2, sin_alpha_1)
    angle_cost = torch.cos(torch.asin(sin_alpha) * 2 - math.pi / 2)
    rho_x, rho_y = (s_cw / cw) ** 2, (s_ch / ch) ** 2
    gamma = angle_cost - 2 if paper_sign else 2 - angle_cost
    distance_cost = 2 - torch.exp(gamma * rho_x) - torch.exp(gamma * rho_y)
    omiga_w = torch.abs(w1 - w2) / torch.max(w1, w2)
    omiga_h = torch.abs(h1 - h2) / torch.max(h1, h2)
    shape_cost = torch.pow(1 - torch.exp(-omiga_w), 4) + torch.pow(1 - torch.exp(-omiga_h), 4)
    return 1 - (ious - 0.5 * (distance_cost + shape_cost)).clamp(min=-1.0, max=1.0)


@pytest.mark.parametrize("name,ref_fn", [("EIoULoss", eiou_reference), ("SIoULoss", siou_reference)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_eiou_siou_match_reference(name, ref_fn, dtype):
    pred, target = box_pairs((24,))
    check_reductions({"type": name}, [pred, target], ref_fn, dtype, val_tol=dict(rtol=1e-5, atol=1e-5),
                     grad_tol=dict(rtol=2e-2, atol=1e-5))


def test_eiou_siou_worked_numbers():
    # pred 2x2 at the origin, target 4x2: IoU 1/2, centres 1 apart along x, enclosing box 4 x 2.
    p, t = torch.tensor([[0.0, 0.0, 2.0, 2.0]]), torch.tensor([[0.0, 0.0, 4.0, 2.0]])
    # EIoU = 1 - 1/2 + 1/20 (centre) + 4/16 (width) + 0 (height)
    torch.testing.assert_close(build_loss({"type": "EIoULoss"})(p, t), torch.tensor(0.8))
    # SIoU: angle 0 -> gamma 2; distance 1 - exp(-2 / 16); shape (1 - exp(-1/2))^4
    siou = 0.5 + ((1 - math.exp(-0.125)) + (1 - math.exp(-0.5)) ** 4) / 2
    torch.testing.assert_close(build_loss({"type": "SIoULoss"})(p, t), torch.tensor(siou))
    # mmdetection's default neg_gamma=False flips the exponent's sign: a different value
    assert abs(siou_reference(p, t, paper_sign=False).item() - siou) > 1e-3


@pytest.mark.parametrize("name", BOX_LOSSES)
def test_eiou_siou_degenerate_boxes_finite_and_zero_weight(name):
    p = leaf(torch.tensor([v[0] for v in DEGENERATE.values()], dtype=torch.float32))
    t = leaf(torch.tensor([v[1] for v in DEGENERATE.values()], dtype=torch.float32))
    out = build_loss({"type": name, "reduction": "none"})(p, t)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(t.grad).all()
    assert out[list(DEGENERATE).index("identical")].abs() < 1e-5
    # mmdet test_iou_type_loss_zeros_weight: random (also inverted) boxes, zero weight -> 0
    assert build_loss({"type": name})(torch.rand(10, 4), torch.rand(10, 4), torch.zeros(10)) == 0


# ----------------------------------------------------------------------------------------------
# MSELoss, BalancedL1Loss
# ----------------------------------------------------------------------------------------------

def mmdet_balanced_l1_loss(pred, target, beta=1.0, alpha=0.5, gamma=1.5):
    diff = torch.abs(pred - target)
    b = math.e ** (gamma / alpha) - 1
    return torch.where(diff < beta, alpha / b * (b * diff + 1) * torch.log(b * diff / beta + 1) - alpha * diff,
                       gamma * diff + gamma / b - alpha * beta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_mse_matches_torch(dtype):
    target = (torch.randn(7, 4) * 2).to(dtype)
    check_reductions({"type": "MSELoss"}, [torch.randn(7, 4) * 2],
                     lambda xr: F.mse_loss(xr, target.float(), reduction="none"), dtype, [target])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha,gamma,beta", [(0.5, 1.5, 1.0), (0.3, 2.0, 0.5)])
def test_balanced_l1_matches_mmdet(dtype, alpha, gamma, beta):
    target = torch.randn(9, 4).to(dtype)
    check_reductions({"type": "BalancedL1Loss", "alpha": alpha, "gamma": gamma, "beta": beta},
                     [torch.randn(9, 4) * 1.5], lambda xr: mmdet_balanced_l1_loss(xr, target.float(), beta, alpha, gamma),
                     dtype, [target])


def test_balanced_l1_worked_numbers():
    loss = build_loss({"type": "BalancedL1Loss", "reduction": "none"})
    b = math.exp(3.0) - 1  # e^(gamma / alpha) - 1 = 19.0855
    out = loss(torch.tensor([0.0, 1.0, 3.0]), torch.zeros(3))
    # 0 at 0; continuous at beta = 1 with gamma + gamma / b - alpha; linear beyond
    torch.testing.assert_close(out, torch.tensor([0.0, 1.0 + 1.5 / b, 4.0 + 1.5 / b]))
    below = loss(torch.tensor([1.0 - 1e-4]), torch.zeros(1))
    torch.testing.assert_close(below, out[1:2], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="alpha"):
        build_loss({"type": "BalancedL1Loss", "beta": 0.0})
