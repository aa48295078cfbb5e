"""FocalLossStar (detkit.losses.focal) against fvcore's ``sigmoid_focal_loss_star``, reimplemented here
(fvcore/nn/focal_loss.py: ``-logsigmoid(gamma x (2t - 1)) / gamma`` times ``alpha_t``), and hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detkit.losses import build_loss
from tests.test_losses import leaf, one_hot_ref
from tests.test_losses_mmdet_formulas import check_reductions


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def fvcore_focal_star(inputs, targets, alpha=-1.0, gamma=1.0):
    shifted_inputs = gamma * (inputs * (2 * targets - 1))
    loss = -F.logsigmoid(shifted_inputs) / gamma
    if alpha >= 0:
        loss = loss * (alpha * targets + (1 - alpha) * (1 - targets))
    return loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gamma,alpha", [(1.0, 0.25), (2.5, -1.0), (0.5, 0.6)])
def test_focal_star_matches_fvcore(dtype, gamma, alpha):
    labels = torch.randint(0, 6, (11,))  # 5 = background
    check_reductions({"type": "FocalLossStar", "gamma": gamma, "alpha": alpha}, [torch.randn(11, 5) * 3],
                     lambda xr: fvcore_focal_star(xr, one_hot_ref(labels, 5), alpha, gamma), dtype, [labels])
    soft = torch.rand(11, 5).to(dtype)  # float (soft) targets follow the same formula
    check_reductions({"type": "FocalLossStar", "gamma": gamma, "alpha": alpha}, [torch.randn(11, 5) * 3],
                     lambda xr: fvcore_focal_star(xr, soft.float(), alpha, gamma), dtype, [soft])


def test_focal_star_worked_numbers():
    x, t = torch.zeros(1, 2), torch.tensor([0])  # logit 0: class 0 positive, class 1 negative
    ln2 = math.log(2.0)
    out = build_loss({"type": "FocalLossStar", "reduction": "none"})(x, t)
    torch.testing.assert_close(out, torch.tensor([[0.25 * ln2, 0.75 * ln2]]))  # gamma 1: alpha_t BCE
    out = build_loss({"type": "FocalLossStar", "gamma": 2.0, "alpha": None, "reduction": "none"})(x, t)
    torch.testing.assert_close(out, torch.full((1, 2), ln2 / 2))  # -log(sigmoid(0)) / 2
    # gamma 1 without alpha is plain BCE with logits
    z, y = torch.randn(6, 3) * 4, torch.randint(0, 2, (6, 3)).float()
    torch.testing.assert_close(build_loss({"type": "FocalLossStar", "alpha": None, "reduction": "none"})(z, y),
                               F.binary_cross_entropy_with_logits(z, y, reduction="none"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_focal_star_extreme_logits_and_empty(dtype):
    x = leaf(torch.where(torch.rand(14, 4) < 0.5, -100.0, 100.0), dtype)
    out = build_loss({"type": "FocalLossStar", "gamma": 3.0})(x, torch.randint(0, 5, (14,)))
    assert out.dtype == torch.float32 and torch.isfinite(out)
    out.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    empty = leaf(torch.zeros(0, 4), dtype)
    zero = build_loss({"type": "FocalLossStar"})(empty, torch.zeros(0, dtype=torch.long), avg_factor=0.0)
    assert zero.item() == 0 and zero.requires_grad
    assert "classification" in build_loss({"type": "FocalLossStar"}).kinds
    with pytest.raises(ValueError, match="gamma"):
        build_loss({"type": "FocalLossStar", "gamma": 0})
