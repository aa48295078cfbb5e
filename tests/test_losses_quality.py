"""QualityFocalLoss(activated=True) (detkit.losses.quality) against mmdetection's
``quality_focal_loss_with_prob``, reimplemented here in its index-and-assign style (probabilities in,
``F.binary_cross_entropy``), and hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detkit.losses import build_loss
from tests.test_losses import leaf
from tests.test_losses_mmdet_formulas import check_reductions, quality_inputs


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mmdet_quality_focal_loss_with_prob(pred, label, score, beta=2.0):
    """(N, C) probabilities, (N,) labels (C = background), (N,) scores -> (N,)."""
    loss = F.binary_cross_entropy(pred, torch.zeros_like(pred), reduction="none") * pred.pow(beta)
    pos = ((label >= 0) & (label < pred.size(1))).nonzero().squeeze(1)
    pos_label = label[pos]
    scale = score[pos] - pred[pos, pos_label]
    loss[pos, pos_label] = F.binary_cross_entropy(pred[pos, pos_label], score[pos], reduction="none") * \
        scale.abs().pow(beta)
    return loss.sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta", [2.0, 1.5])
def test_qfl_activated_matches_mmdet(dtype, beta):
    logits, labels, scores = quality_inputs()
    s = scores.to(dtype)
    # inside [0.01, 0.99]: fp16 rounds sigmoid(x) > 0.9998 to exactly 1 (see the saturation test)
    check_reductions({"type": "QualityFocalLoss", "beta": beta, "activated": True}, [logits.sigmoid().clamp(0.01, 0.99)],
                     lambda pr: mmdet_quality_focal_loss_with_prob(pr, labels, s.float(), beta), dtype, [(labels, s)])


def test_qfl_activated_equals_logit_form_and_hand_values():
    logits, labels, scores = quality_inputs()
    QFL = build_loss({"type": "QualityFocalLoss", "activated": True, "reduction": "none"})
    probs = logits.sigmoid()
    torch.testing.assert_close(QFL(probs, (labels, scores)),
                               build_loss({"type": "QualityFocalLoss", "reduction": "none"})(logits, (labels, scores)),
                               rtol=1e-4, atol=1e-5)  # log(1 - p) of a probability near 1 loses digits
    # probability 1/2: ln(2)/4 per background class; 0 for a positive with score 1/2
    out = QFL(torch.full((2, 2), 0.5), (torch.tensor([2, 0]), torch.tensor([0.9, 0.5])))
    ln2 = math.log(2.0)
    torch.testing.assert_close(out, torch.tensor([ln2 / 2, ln2 / 4]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qfl_activated_saturated_probabilities_finite(dtype):
    """Probabilities of exactly 0 and 1 (sigmoid of +-100): torch's BCE clamps the log at -100 and
    its gradient at 1 / max(p (1 - p), 1e-12), as mmdetection. (fp16 cannot hold that 1e12 gradient.)"""
    _, labels, scores = quality_inputs(14, 4)
    p = leaf(torch.where(torch.rand(14, 4) < 0.5, 0.0, 1.0), dtype)
    out = build_loss({"type": "QualityFocalLoss", "activated": True})(p, (labels, scores.to(dtype)))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert p.grad.dtype == dtype and torch.isfinite(p.grad).all()


def test_qfl_activated_under_autocast_and_empty():
    _, labels, scores = quality_inputs()
    probs = torch.rand(9, 5).bfloat16()
    loss = build_loss({"type": "QualityFocalLoss", "activated": True})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = loss(probs, (labels, scores))
    torch.testing.assert_close(inside, loss(probs, (labels, scores)))
    empty = leaf(torch.zeros(0, 5))
    zero = loss(empty, (torch.zeros(0, dtype=torch.long), torch.zeros(0)), avg_factor=0.0)
    assert zero.item() == 0 and zero.requires_grad
