"""GHMC / GHMR (detkit.losses.ghm) against mmdetection's formulas, reimplemented here.

The reference follows mmdetection's ``mmdet/models/losses/ghm_loss.py`` in its own style: a Python
loop over the bins with one ``.item()`` per bin and a list as the running ``acc_sum``. Nothing
from detkit builds a reference.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detkit.losses import build_loss
from tests.test_losses import EPS32, VAL_TOL, leaf

LOW = [torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class RefGHM:
    """mmdetection's GHM weighting: edges i/bins, bin i holds g in [e_i, e_{i+1}); weight tot / (count * n)."""

    def __init__(self, bins, momentum, last_edge):
        self.bins, self.mmt = bins, momentum
        self.edges = [i / bins for i in range(bins + 1)]
        self.edges[-1] = last_edge
        self.acc_sum = [0.0] * bins

    def weights(self, g, valid, tot):
        edges = torch.tensor(self.edges, dtype=torch.float32)
        out = torch.zeros_like(g)
        n = 0
        for i in range(self.bins):
            inds = (g >= edges[i]) & (g < edges[i + 1]) & valid
            num = inds.sum().item()
            if num > 0:
                if self.mmt > 0:
                    self.acc_sum[i] = self.mmt * self.acc_sum[i] + (1 - self.mmt) * num
                    out[inds] = tot / self.acc_sum[i]
                else:
                    out[inds] = tot / num
                n += 1
        return out / n if n > 0 else out

    def ghmc(self, pred, target, label_weight):
        """pred (N, C) logits, binary target (N, C), label_weight (N, C) -> (elementwise, mean)."""
        g = (pred.detach().sigmoid() - target).abs()
        valid = label_weight > 0
        tot = max(valid.float().sum().item(), 1.0)
        w = self.weights(g, valid, tot)
        elem = F.binary_cross_entropy_with_logits(pred, target, reduction="none") * w
        return elem, elem.sum() / tot

    def ghmr(self, pred, target, label_weight, mu=0.02):
        diff = pred - target
        loss = torch.sqrt(diff * diff + mu * mu) - mu
        g = (diff / torch.sqrt(mu * mu + diff * diff)).abs().detach()
        valid = label_weight > 0
        tot = max(label_weight.float().sum().item(), 1.0)
        elem = loss * self.weights(g, valid, tot)
        return elem, elem.sum() / tot


def cls_inputs(n=40, c=4):
    pred = torch.randn(n, c) * 3
    labels = torch.randint(0, c + 1, (n,))  # c = background
    valid = (torch.rand(n) > 0.2).float()
    return pred, labels, valid


def one_hot(labels, c):
    return (labels[:, None] == torch.arange(c)).float()


@pytest.mark.parametrize("momentum", [0.0, 0.75])
def test_ghmc_matches_mmdet_over_steps(momentum):
    """Three steps: value, elementwise weights and the running acc_sum as mmdetection's loop."""
    loss = build_loss({"type": "GHMC", "bins": 10, "momentum": momentum})
    ref = RefGHM(10, momentum, 1.0 + 1e-6)
    for _ in range(3):
        pred, labels, valid = cls_inputs()
        x, xr = leaf(pred), leaf(pred)
        ours = loss(x, labels, weight=valid)
        elem_ref, mean_ref = ref.ghmc(xr, one_hot(labels, 4), valid[:, None].expand(40, 4))
        torch.testing.assert_close(ours, mean_ref, **VAL_TOL)
        ours.backward()
        mean_ref.backward()
        torch.testing.assert_close(x.grad, xr.grad, **VAL_TOL)
        if momentum:
            torch.testing.assert_close(loss.acc_sum, torch.tensor(ref.acc_sum, dtype=torch.float32))
        else:  # (a second call would move acc_sum again)
            torch.testing.assert_close(loss(pred, labels, weight=valid, reduction_override="none"),
                                       elem_ref.detach(), **VAL_TOL)


@pytest.mark.parametrize("momentum", [0.0, 0.7])
def test_ghmr_matches_mmdet_over_steps(momentum):
    loss = build_loss({"type": "GHMR", "mu": 0.02, "bins": 10, "momentum": momentum, "loss_weight": 2.0})
    ref = RefGHM(10, momentum, 1e3)
    for _ in range(3):
        pred, target = torch.randn(30, 4) * 0.1, torch.randn(30, 4) * 0.1
        w = (torch.rand(30, 4) > 0.3).float()  # per-coordinate label weights, as mmdetection's
        x, xr = leaf(pred), leaf(pred)
        ours = loss(x, target, weight=w)
        _, mean_ref = ref.ghmr(xr, target, w)
        torch.testing.assert_close(ours, 2.0 * mean_ref, **VAL_TOL)
        ours.backward()
        (2.0 * mean_ref).backward()
        torch.testing.assert_close(x.grad, xr.grad, **VAL_TOL)
    if momentum:
        torch.testing.assert_close(loss.acc_sum, torch.tensor(ref.acc_sum, dtype=torch.float32))


def test_ghm_worked_numbers():
    # every g equal (logit 0, one-hot targets: g = 1/2): one bin, weight tot / tot = 1 -> mean BCE = ln 2
    loss = build_loss({"type": "GHMC"})
    torch.testing.assert_close(loss(torch.zeros(3, 2), torch.tensor([0, 1, 2])), torch.tensor(math.log(2.0)))
    # two bins filled, 3 elements at g = 1/2 and 1 at g ~ 1: weights tot / (count * 2) = 4/6 and 4/2;
    # the mean is the average of the two bins' mean losses: (ln 2 + BCE(-20, 1)) / 2
    pred = torch.tensor([[0.0, 0.0], [0.0, -20.0]])
    target = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = (math.log(2.0) + F.softplus(torch.tensor(20.0)).item()) / 2
    torch.testing.assert_close(loss(pred, target), torch.tensor(expected))
    # momentum 0.75, first step: acc_sum = 0.25 * count, so the weights are 4x (no bias correction)
    first = build_loss({"type": "GHMC", "momentum": 0.75})(pred, target)
    torch.testing.assert_close(first, 4 * torch.tensor(expected))
    # GHMR: |d| = mu for every element -> one bin -> mean ASL1 = (sqrt(2) - 1) mu
    r = build_loss({"type": "GHMR", "mu": 0.5})(torch.full((2, 4), 0.5), torch.zeros(2, 4))
    torch.testing.assert_close(r, torch.tensor((math.sqrt(2.0) - 1) * 0.5))


def test_ghm_avg_factor_ignored_sum_and_none():
    pred, labels, _ = cls_inputs()
    loss = build_loss({"type": "GHMC"})
    mean = loss(pred, labels)
    # the harmonized weights are their own normaliser, as mmdetection (which swallows avg_factor)
    torch.testing.assert_close(loss(pred, labels, avg_factor=7.0), mean)
    none = loss(pred, labels, reduction_override="none")
    assert none.shape == pred.shape
    torch.testing.assert_close(loss(pred, labels, reduction_override="sum"), none.sum())
    torch.testing.assert_close(mean, none.sum() / (pred.numel() + EPS32), **VAL_TOL)
    # float targets == class-index targets
    torch.testing.assert_close(loss(pred, one_hot(labels, 4)), mean)


def test_ghm_state_dict_resumes_exactly():
    """acc_sum is a persistent buffer: a module loaded from the state dict continues identically."""
    a = build_loss({"type": "GHMC", "momentum": 0.75})
    for _ in range(2):
        a(*cls_inputs()[:2])
    state = a.state_dict()
    assert set(state) == {"acc_sum"} and state["acc_sum"].sum() > 0
    b = build_loss({"type": "GHMC", "momentum": 0.75})
    b.load_state_dict(state)
    pred, labels, _ = cls_inputs()
    torch.testing.assert_close(a(pred, labels), b(pred, labels), rtol=0, atol=0)
    torch.testing.assert_close(a.acc_sum, b.acc_sum, rtol=0, atol=0)
    assert "acc_sum" not in build_loss({"type": "GHMR"}).state_dict()  # momentum 0: no state, as mmdetection


@pytest.mark.parametrize("name", ["GHMC", "GHMR"])
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
def test_ghm_extreme_low_precision_and_empty(name, dtype):
    if name == "GHMC":
        pred, target = torch.where(torch.rand(12, 3) < 0.5, -100.0, 100.0), torch.randint(0, 4, (12,))
    else:
        pred, target = torch.randn(12, 4) * 100, torch.randn(12, 4)
    x = leaf(pred, dtype)
    out = build_loss({"type": name})(x, target.to(dtype) if target.is_floating_point() else target)
    assert out.dtype == torch.float32 and torch.isfinite(out)
    # fp16/bf16 inputs: the fp32 loss of the rounded inputs
    ref_target = target.to(dtype).float() if target.is_floating_point() else target
    torch.testing.assert_close(out, build_loss({"type": name})(x.detach().float(), ref_target))
    out.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
    empty = leaf(torch.zeros(0, pred.shape[1]), dtype)
    empty_target = target[:0].to(dtype) if target.is_floating_point() else target[:0]
    for reduction in ("none", "sum", "mean"):
        zero = build_loss({"type": name, "reduction": reduction})(empty, empty_target).sum()
        assert zero.item() == 0 and zero.requires_grad


def test_ghm_bad_arguments():
    with pytest.raises(ValueError, match="bins"):
        build_loss({"type": "GHMC", "bins": 0})
    with pytest.raises(ValueError, match="momentum"):
        build_loss({"type": "GHMR", "momentum": 1.0})
    with pytest.raises(ValueError, match="sigmoid"):
        build_loss({"type": "GHMC", "use_sigmoid": False})
    with pytest.raises(ValueError, match="weight"):
        build_loss({"type": "GHMC"})(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long), weight=torch.ones(5))
