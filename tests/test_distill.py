"""Distillation: KnowledgeDistillationKLDivLoss against its formula, a GFL student with a frozen GFL teacher
(LD / KD terms, gradients, checkpoints) and a tiny CLI run with a teacher checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from detkit.losses import build_loss
from detkit.registry import ConfigError

TOL = {"rtol": 1e-5, "atol": 1e-6}  # float32 loss against a float64 reference


def kl_by_hand(pred: torch.Tensor, soft: torch.Tensor, T: float) -> torch.Tensor:
    """mmdetection's per-row value written out: ``T^2 / K * sum_k q_k (log q_k - log p_k)``, with
    ``q = softmax(soft / T)``, ``p = softmax(pred / T)``; float64, no torch.nn.functional."""
    p, q = (pred.double() / T).exp(), (soft.double() / T).exp()
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    return T * T * (q * (q.log() - p.log())).sum(-1) / pred.shape[-1]


@pytest.mark.parametrize("T", [1.0, 2.0, 10.0])
def test_kl_loss_matches_formula_and_kl_div(T):
    pred, soft = torch.randn(6, 17) * 3, torch.randn(6, 17) * 3
    weight = torch.rand(6)
    loss = build_loss({"type": "KnowledgeDistillationKLDivLoss", "T": T, "loss_weight": 0.25})
    rows = kl_by_hand(pred, soft, T)
    torch.testing.assert_close(loss(pred, soft, reduction_override="none").double(), 0.25 * rows, **TOL)
    torch.testing.assert_close(loss(pred, soft, weight=weight, avg_factor=4.0).double(),
                               0.25 * (rows * weight.double()).sum() / 4.0, **TOL)
    # torch's own KL of the softened distributions, summed over classes: the loss is its mean times T^2
    by_torch = F.kl_div(F.log_softmax(pred / T, -1), F.softmax(soft / T, -1), reduction="batchmean")
    torch.testing.assert_close(loss(pred, soft, reduction_override="sum") / 0.25, by_torch * 6 * T * T / 17)
    assert float(loss(soft, soft)) == pytest.approx(0.0, abs=1e-6)


def test_kl_loss_gradient_reaches_only_the_student_and_stays_finite():
    pred = (torch.randn(4, 5) * 1e4).requires_grad_()
    soft = (torch.randn(4, 5) * 1e4).requires_grad_()
    out = build_loss({"type": "KnowledgeDistillationKLDivLoss"})(pred.half(), soft.bfloat16())
    out.backward()
    assert out.dtype == torch.float32 and math.isfinite(float(out.detach()))
    assert torch.isfinite(pred.grad).all() and soft.grad is None
    empty = build_loss({"type": "KnowledgeDistillationKLDivLoss"})(torch.zeros(0, 5), torch.zeros(0, 5))
    assert float(empty) == 0.0


@pytest.mark.parametrize("spec, message", [({"T": 0.5}, "T must be a number >= 1"),
                                           ({"reduction": "avg"}, "reduction")])
def test_kl_loss_refuses_bad_arguments(spec, message):
    with pytest.raises(ConfigError, match=message):
        build_loss({"type": "KnowledgeDistillationKLDivLoss", **spec})
    with pytest.raises(ValueError, match="same shape"):
        build_loss({"type": "KnowledgeDistillationKLDivLoss"})(torch.zeros(2, 3), torch.zeros(2, 4))
