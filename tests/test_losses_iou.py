"""BoundedIoULoss (detkit.losses.iou) against mmdetection's ``bounded_iou_loss``, reimplemented here
(``mmdet/models/losses/iou_loss.py``: centre/size terms, target under ``no_grad``, smooth L1 at
``beta``), and hand-computed numbers."""

from __future__ import annotations

import pytest
import torch

from detkit.losses import build_loss
from tests.test_losses import DEGENERATE, EPS32, VAL_TOL, box_pairs, leaf
from tests.test_losses_mmdet_formulas import check_reductions


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def mmdet_bounded_iou_loss(pred, target, beta=0.2, eps=1e-3):
    pcx, pcy = (pred[:, 0] + pred[:, 2]) * 0.5, (pred[:, 1] + pred[:, 3]) * 0.5
    pw, ph = pred[:, 2] - pred[:, 0], pred[:, 3] - pred[:, 1]
    with torch.no_grad():
        tcx, tcy = (target[:, 0] + target[:, 2]) * 0.5, (target[:, 1] + target[:, 3]) * 0.5
        tw, th = target[:, 2] - target[:, 0], target[:, 3] - target[:, 1]
    dx, dy = tcx - pcx, tcy - pcy
    loss_dx = 1 - torch.max((tw - 2 * dx.abs()) / (tw + 2 * dx.abs() + eps), torch.zeros_like(dx))
    loss_dy = 1 - torch.max((th - 2 * dy.abs()) / (th + 2 * dy.abs() + eps), torch.zeros_like(dy))
    loss_dw = 1 - torch.min(tw / (pw + eps), pw / (tw + eps))
    loss_dh = 1 - torch.min(th / (ph + eps), ph / (th + eps))
    comb = torch.stack([loss_dx, loss_dy, loss_dw, loss_dh], dim=-1).view(loss_dx.size(0), -1)
    return torch.where(comb < beta, 0.5 * comb * comb / beta, comb - 0.5 * beta)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta,eps", [(0.2, 1e-3), (0.5, 1e-2)])
def test_bounded_iou_matches_mmdet(dtype, beta, eps):
    pred, target = box_pairs((24,))
    t = target.to(dtype)
    check_reductions({"type": "BoundedIoULoss", "beta": beta, "eps": eps}, [pred],
                     lambda xr: mmdet_bounded_iou_loss(xr, t.float(), beta, eps), dtype, [t],
                     grad_tol=dict(rtol=2e-2, atol=1e-5) if dtype != torch.float32 else None)


def test_bounded_iou_worked_numbers_and_target_constant():
    # pred 2x2 at the origin, target 4x2: centres 1 apart along x
    p, t = leaf(torch.tensor([[0.0, 0.0, 2.0, 2.0]])), leaf(torch.tensor([[0.0, 0.0, 4.0, 2.0]]))
    out = build_loss({"type": "BoundedIoULoss", "reduction": "none"})(p, t)
    eps, beta = 1e-3, 0.2
    lx = 1 - (4 - 2) / (4 + 2 + eps)
    ly = lh = 1 - 2 / (2 + eps)
    lw = 1 - 2 / (4 + eps)
    smooth = [lx - beta / 2, 0.5 * ly ** 2 / beta, lw - beta / 2, 0.5 * lh ** 2 / beta]
    torch.testing.assert_close(out, torch.tensor([smooth]))
    out.sum().backward()
    assert t.grad is None and p.grad is not None  # the target is a constant, as mmdetection's no_grad
    identical = torch.tensor([[1.0, 2.0, 5.0, 9.0]])
    assert build_loss({"type": "BoundedIoULoss"})(identical, identical) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bounded_iou_degenerate_boxes_finite(dtype):
    p = leaf(torch.tensor([v[0] for v in DEGENERATE.values()], dtype=torch.float32), dtype)
    t = torch.tensor([v[1] for v in DEGENERATE.values()], dtype=torch.float32).to(dtype)
    # mmdetection divides by w + eps: 0 for an inverted box of width -eps (NaN gradient); ours clamps at 0
    p_edge = leaf(torch.tensor([[0.0, 0.0, -1e-3, 2.0]]))
    for x, target in ((p, t), (p_edge, torch.tensor([[0.0, 0.0, 2.0, 2.0]]))):
        out = build_loss({"type": "BoundedIoULoss", "reduction": "none"})(x, target)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
        out.sum().backward()
        assert torch.isfinite(x.grad).all()


def test_bounded_iou_weights_reduction_and_empty():
    pred, target = box_pairs((7,))
    loss = build_loss({"type": "BoundedIoULoss", "loss_weight": 1.5})
    elem = mmdet_bounded_iou_loss(pred, target)
    w4 = torch.rand(7, 4)
    torch.testing.assert_close(loss(pred, target, weight=w4, avg_factor=3.0), 1.5 * (elem * w4).sum() / (3.0 + EPS32),
                               **VAL_TOL)
    w = torch.rand(7)
    torch.testing.assert_close(loss(pred, target, weight=w, reduction_override="sum"),
                               1.5 * (elem * w[:, None]).sum(), **VAL_TOL)
    assert "box" in loss.kinds
    empty = leaf(torch.zeros(0, 4))
    out = loss(empty, torch.zeros(0, 4))
    assert out.item() == 0 and out.requires_grad
    with pytest.raises(ValueError, match="x1y1x2y2"):
        loss(pred[:, :3], target[:, :3])
    with pytest.raises(ValueError, match="beta"):
        build_loss({"type": "BoundedIoULoss", "beta": 0})
