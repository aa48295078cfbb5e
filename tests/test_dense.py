"""The dense-head family: shared ops, ATSS against a per-image reference, the GFL head's loss against
the paper's positives-only formulation, CenterNet's own targets (``cornernet``) and NMS at decode."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import box_iou, generalized_box_iou_loss

from detkit.assigners import ATSSAssigner, CenterNetAssigner
from detkit.bench.references import per_image_atss_assign
from detkit.models.centernet import CenterNetHead, CenterNetOutputs
from detkit.models.gfl import DFL_MARGIN, GFLHead, GFLOutputs, integral
from detkit.ops import (box_around_origin, box_centers, box_clip, box_distance_decode, box_distance_encode,
                        box_iou_aligned, dense_points, gather_cells)
from tests.test_assigners import cornernet_radius, draw_umich_gaussian, random_boxes


def test_box_ops_invert_each_other_and_iou_matches_torchvision():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(6, 2, generator=g) * 50
    ltrb = torch.rand(6, 4, generator=g) * 20
    boxes = box_distance_decode(points, ltrb)
    torch.testing.assert_close(box_distance_encode(points, boxes), ltrb)
    torch.testing.assert_close(box_centers(box_distance_decode(points, ltrb[:, :2].repeat(1, 2))), points)  # l=r, t=b
    torch.testing.assert_close(box_around_origin(ltrb), box_distance_decode(torch.zeros_like(points), ltrb))
    other = box_distance_decode(points + 3, ltrb.flip(-1))
    torch.testing.assert_close(box_iou_aligned(boxes, other), box_iou(boxes, other).diagonal())
    clipped = box_clip(boxes[None] - 10, torch.tensor([[30, 40]]))[0]
    assert clipped.min() >= 0 and (clipped[:, 0::2] <= 40).all() and (clipped[:, 1::2] <= 30).all()
    # every op computes in float32 from bf16 inputs (autocast's dtype): pixels need the mantissa
    half = [x.bfloat16() for x in (points, ltrb, boxes, other)]
    outs = [box_distance_decode(half[0], half[1]), box_distance_encode(half[0], half[2]), box_around_origin(half[1]),
            box_centers(half[2]), box_clip(half[2][None], torch.tensor([[30, 40]])), box_iou_aligned(half[2], half[3]),
            gather_cells(half[2].T.reshape(1, 4, 2, 3), torch.tensor([[0, 5]]))]
    assert all(out.dtype == torch.float32 for out in outs)


def test_batched_atss_equals_per_image_reference():
    priors = dense_points([(16, 16), (8, 8), (4, 4), (2, 2)], [8, 16, 32, 64], torch.device("cpu"))
    boxes, labels = random_boxes(3, 8, 128, seed=5)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False  # padding rows
    mask[2] = False  # an image without objects
    got = ATSSAssigner([8, 16, 32, 64], topk=9)(priors, boxes, labels, mask, 5)
    ref_labels, ref_boxes = per_image_atss_assign(priors, boxes, labels, mask, 9, 8.0, 5)
    assert torch.equal(got.labels, ref_labels) and torch.equal(got.positive, ref_labels < 5)
    torch.testing.assert_close(got.boxes, ref_boxes)
    assert got.positive[0].sum() >= 8 and not got.positive[2].any()
    # every real GT gets positives (ATSS's point: adaptive thresholds leave no object without samples)
    for b in range(2):
        for g in range(int(mask[b].sum())):
            assert ((got.boxes[b] == boxes[b, g]).all(-1) & got.positive[b]).any()


def test_gfl_loss_equals_positives_only_formulation():
    torch.manual_seed(0)
    head = GFLHead(num_classes=3, in_channels=8, feat_channels=8, num_convs=1, strides=[4, 8], reg_max=4)
    feats = [torch.randn(2, 8, 16, 16), torch.randn(2, 8, 8, 8)]  # a 64x64 input
    with torch.no_grad():
        head.cls_out.bias.fill_(0.3)  # scores far from the prior: the quality weights matter
    outputs = head(feats)
    boxes = torch.tensor([[[4.0, 6.0, 30.0, 40.0], [20.0, 10.0, 60.0, 50.0]], [[10.0, 12.0, 50.0, 58.0], [0, 0, 0, 0]]])
    labels = torch.tensor([[0, 2], [1, 0]])
    mask = torch.tensor([[True, True], [True, False]])
    got = head.loss(outputs, boxes, labels, mask)

    priors = head.priors(outputs.cls)
    assigned = head.assigner(priors, boxes, labels, mask, 3)
    b, p = assigned.positive.nonzero(as_tuple=True)
    cls = torch.cat([m.permute(0, 2, 3, 1).reshape(2, -1, 3) for m in outputs.cls], 1)
    dist = torch.cat([m.permute(0, 2, 3, 1).reshape(2, -1, 20) for m in outputs.distribution], 1)
    stride = priors.strides[p, None]
    centres = priors.points[p] / stride
    pred = box_distance_decode(centres, integral(dist[b, p], 4))
    target = assigned.boxes[b, p] / stride
    iou = box_iou(pred.detach(), target).diagonal()
    weight = cls[b, p].detach().sigmoid().amax(-1)
    # QFL (mmdetection's quality_focal_loss): negatives and other classes sigmoid^2 * BCE(x, 0)
    sig = cls.sigmoid()
    qfl = F.binary_cross_entropy_with_logits(cls, torch.zeros_like(cls), reduction="none") * sig.pow(2)
    pos_logit = cls[b, p, assigned.labels[b, p]]
    qfl[b, p, assigned.labels[b, p]] = (F.binary_cross_entropy_with_logits(pos_logit, iou, reduction="none")
                                        * (iou - pos_logit.sigmoid()).abs().pow(2))
    assert len(p) >= 6 and (assigned.labels[b, p] == 2).any()
    assert got["cls"].item() == pytest.approx(qfl.sum().item() / len(p), rel=1e-5)
    giou = generalized_box_iou_loss(pred, target, reduction="none")
    assert got["bbox"].item() == pytest.approx(2.0 * (weight * giou).sum().item() / max(weight.sum().item(), 1.0), rel=1e-5)
    sides = box_distance_encode(centres, target).clamp(0, 4 - DFL_MARGIN).reshape(-1)
    logits = dist[b, p].reshape(-1, 5)
    left = sides.long()
    dfl = F.cross_entropy(logits, left, reduction="none") * (left + 1 - sides) \
        + F.cross_entropy(logits, left + 1, reduction="none") * (sides - left)
    expected = 0.25 * (weight.repeat_interleave(4) * dfl).sum() / 4 / max(weight.sum().item(), 1.0)
    assert got["dfl"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_gfl_predict_decodes_the_expected_distance():
    head = GFLHead(num_classes=2, in_channels=4, feat_channels=4, num_convs=1, strides=[8], reg_max=4,
                   score_thr=0.5, max_per_img=10)
    cls = torch.full((1, 2, 2, 2), -10.0)
    cls[0, 1, 1, 0] = 5.0  # one confident point: class 1 at cell (row 1, col 0), centre (4, 12)
    dist = torch.full((1, 20, 2, 2), -20.0)
    dist[0, 2::5] = 20.0  # every side all mass on bin 2 -> 2 strides = 16 px
    det = head.predict(GFLOutputs(cls=[cls], distribution=[dist]), torch.tensor([[100, 100]]))[0]
    assert det["labels"].tolist() == [1]
    torch.testing.assert_close(det["boxes"], torch.tensor([[0.0, 0.0, 20.0, 28.0]]))  # clipped at 0
    # torch.jit.trace (TorchScript export) flattens the NamedTuple: the same maps in field order
    feats = [torch.randn(1, 4, 3, 2, generator=torch.Generator().manual_seed(0))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation and list-output notices of the tracer
        traced = GFLOutputs(*torch.jit.trace(head, (feats,), check_trace=False)(feats))
    for got, want in zip(traced, head(feats)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_heads_take_keyword_arguments_only():
    for head in (GFLHead, CenterNetHead):
        with pytest.raises(TypeError, match="positional"):
            head(3, 8)


def centernet_ctdet(boxes, labels, num_classes, out_h, out_w):
    """CenterNet's own ctdet.py target code (numpy, per object): clip, ceil, int radius, draw."""
    hm = np.zeros((num_classes, out_h, out_w), np.float32)
    wh, ind, reg = [], [], []
    for box, cls in zip(boxes.tolist(), labels.tolist()):
        bbox = np.array(box, np.float32) / 4
        bbox[[0, 2]] = np.clip(bbox[[0, 2]], 0, out_w - 1)
        bbox[[1, 3]] = np.clip(bbox[[1, 3]], 0, out_h - 1)
        h, w = bbox[3] - bbox[1], bbox[2] - bbox[0]
        assert h > 0 and w > 0
        radius = max(0, int(cornernet_radius(math.ceil(h), math.ceil(w), 0.7)))
        ct = np.array([(bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2], dtype=np.float32)
        ct_int = ct.astype(np.int32)
        draw_umich_gaussian(hm[cls], (int(ct_int[0]), int(ct_int[1])), radius)
        wh.append([w, h])
        ind.append(ct_int[1] * out_w + ct_int[0])
        reg.append(ct - ct_int)
    return hm, np.array(wh), np.array(ind), np.array(reg)


def test_cornernet_targets_equal_centernet_code_with_ceil_and_clip():
    g = torch.Generator().manual_seed(7)
    xy = torch.rand(40, 2, generator=g) * 100
    boxes = torch.cat([xy, xy + 6 + torch.rand(40, 2, generator=g) * 60], -1)  # fractional, some past the edge
    labels = torch.randint(0, 3, (40,), generator=g)
    t = CenterNetAssigner(stride=4, radius_formula="cornernet")(boxes[None], labels[None],
                                                                torch.ones(1, 40, dtype=torch.bool), 3, (32, 32))
    hm, wh, ind, reg = centernet_ctdet(boxes, labels, 3, 32, 32)
    np.testing.assert_allclose(t["heatmap"][0].numpy(), hm, atol=1e-6)
    np.testing.assert_allclose(t["wh"][0].numpy(), wh, rtol=1e-6)
    assert t["index"][0].tolist() == ind.tolist()
    np.testing.assert_allclose(t["offset"][0].numpy(), reg, atol=1e-6)
    # the ceil matters: some of these boxes get a larger radius than without it
    size = (boxes / 4).clamp(max=31)
    no_ceil = [max(0, int(cornernet_radius(float(y2 - y1), float(x2 - x1), 0.7))) for x1, y1, x2, y2 in size.tolist()]
    with_ceil = [max(0, int(cornernet_radius(math.ceil(y2 - y1), math.ceil(x2 - x1), 0.7)))
                 for x1, y1, x2, y2 in size.tolist()]
    assert with_ceil != no_ceil


def test_centernet_nms_iou_at_decode():
    head = CenterNetHead(num_classes=1, in_channels=4, feat_channels=4, topk=10, score_thr=0.1)
    heat = torch.full((1, 1, 8, 8), -10.0)
    heat[0, 0, 2, 2], heat[0, 0, 2, 4] = 3.0, 2.0  # two peaks two cells apart, boxes 6 cells wide
    wh = torch.full((1, 2, 8, 8), 6.0)
    offset = torch.zeros(1, 2, 8, 8)
    sizes = torch.tensor([[32, 32]])
    outputs = CenterNetOutputs(heatmap=heat, wh=wh, offset=offset)
    assert len(head.predict(outputs, sizes)[0]["boxes"]) == 2
    head.nms_iou = 0.5
    det = head.predict(outputs, sizes)[0]
    assert len(det["boxes"]) == 1 and det["scores"][0] == pytest.approx(torch.sigmoid(torch.tensor(3.0)).item())
    boxes, scores, labels = head.predict_padded(outputs, sizes)
    assert (scores > 0).sum() == 1 and labels[0, 1] == -1


def test_atss_anchor_scale_is_checked_and_gfl_integral_stays_fp32_under_autocast():
    from detkit.registry import ConfigError

    for bad in (0, -1.0, float("nan"), "a", None):
        with pytest.raises(ConfigError, match="anchor_scale must be a number > 0"):
            ATSSAssigner([8], anchor_scale=bad)
    logits = torch.randn(3, 4 * 17, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = integral(logits, 16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, integral(logits, 16), rtol=0, atol=1e-6)
