"""Assigners against hand-computed cases and straightforward per-image / per-object references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from detkit.assigners import (
    CenterNetAssigner,
    FCOSAssigner,
    fcos_targets,
    gaussian_radius,
)
from detkit.assigners.base import AssignResult
from detkit.ops import dense_points

INF = 1e8


def one_level(size: int = 4, stride: int = 8):
    return dense_points([(size, size)], [stride], torch.device("cpu"))


def targets(assigner, priors, boxes, labels, mask, num_classes):
    """FCOS's ``(labels, ltrb, centerness)`` targets from the assigner's result."""
    assigned = assigner(priors, boxes, labels, mask, num_classes)
    return (assigned.labels, *fcos_targets(priors.points, assigned))


def assign(assigner, priors, boxes, labels, num_classes=3):
    b = torch.tensor(boxes, dtype=torch.float32).reshape(1, -1, 4)
    lab = torch.tensor(labels).reshape(1, -1)
    return targets(assigner, priors, b, lab, torch.ones_like(lab, dtype=torch.bool), num_classes)


def test_points_are_cell_centres_row_major():
    pts, strides, levels, sizes = dense_points([(2, 3), (1, 2)], [8, 16], torch.device("cpu"))
    assert pts.tolist() == [[4, 4], [12, 4], [20, 4], [4, 12], [12, 12], [20, 12], [8, 8], [24, 8]]
    assert strides.tolist() == [8] * 6 + [16] * 2 and levels.tolist() == [0] * 6 + [1] * 2
    assert sizes == ((2, 3), (1, 2))


def test_point_in_two_boxes_takes_the_smaller():
    a = FCOSAssigner([8], [(-1, INF)], center_sampling=False)
    labels, ltrb, ctr = assign(a, one_level(), [[0, 0, 32, 32], [0, 0, 16, 16]], [0, 1])
    # point (4, 4) is in both: the 16x16 box (label 1) wins; point (20, 20) only in the big one
    assert labels[0, 0] == 1 and labels[0, 10] == 0
    assert ltrb[0, 0].tolist() == [4, 4, 12, 12]
    assert ltrb[0, 10].tolist() == [20, 20, 12, 12]
    assert ctr[0, 0].item() == pytest.approx(math.sqrt((4 / 12) * (4 / 12)))
    # a point on a box edge is outside (strict inequality): x = 12 is not inside (12, 0, 40, 32)
    labels, _, _ = assign(a, one_level(), [[12, 0, 40, 32]], [2])
    assert labels[0, 1] == 3 and labels[0, 2] == 2


def test_regress_range_limits_the_level():
    a = FCOSAssigner([8], [(0, 10)], center_sampling=False)
    labels, ltrb, ctr = assign(a, one_level(), [[0, 0, 32, 32]], [2])
    # only points whose largest ltrb distance is <= 10 qualify: none in a 32x32 box except none
    assert (labels == 3).all() and (ltrb == 0).all() and (ctr == 0).all()
    a = FCOSAssigner([8], [(0, 20)], center_sampling=False)
    labels, _, _ = assign(a, one_level(), [[0, 0, 32, 32]], [2])
    # max(l, t, r, b) <= 20 holds for the centre points (12|20, 12|20) only
    assert sorted(torch.nonzero(labels[0] == 2).flatten().tolist()) == [5, 6, 9, 10]


def test_center_sampling_region():
    a = FCOSAssigner([8], [(-1, INF)], center_sampling=True, center_sample_radius=1.0)
    labels, _, _ = assign(a, one_level(), [[0, 0, 32, 32]], [1])
    # centre (16, 16), radius 8: region (8, 8)-(24, 24) -> points 12 and 20 in x and y
    assert sorted(torch.nonzero(labels[0] == 1).flatten().tolist()) == [5, 6, 9, 10]
    # the region is clipped to the box: a box (0, 0, 10, 10) keeps only point (4, 4)
    labels, _, _ = assign(a, one_level(), [[0, 0, 10, 10]], [1])
    assert torch.nonzero(labels[0] == 1).flatten().tolist() == [0]


def reference_fcos(points, strides, levels, boxes, labels, ranges, num_classes, center_sampling, radius):
    """Per image, per point, per box: the plain-loop definition of FCOS assignment."""
    out_labels, out_ltrb, out_ctr = [], [], []
    for img_boxes, img_labels in zip(boxes, labels):
        lab = torch.full((len(points),), num_classes, dtype=torch.int64)
        ltrb = torch.zeros(len(points), 4)
        ctr = torch.zeros(len(points))
        for p, ((x, y), s, lvl) in enumerate(zip(points.tolist(), strides.tolist(), levels.tolist())):
            best, best_area = None, math.inf
            for g, (x1, y1, x2, y2) in enumerate(img_boxes.tolist()):
                l, t, r, b = x - x1, y - y1, x2 - x, y2 - y
                if center_sampling:
                    cx, cy, rad = (x1 + x2) / 2, (y1 + y2) / 2, s * radius
                    inside = min(x - max(cx - rad, x1), y - max(cy - rad, y1), min(cx + rad, x2) - x,
                                 min(cy + rad, y2) - y) > 0
                else:
                    inside = min(l, t, r, b) > 0
                lo, hi = ranges[lvl]
                if inside and lo <= max(l, t, r, b) <= hi and (x2 - x1) * (y2 - y1) < best_area:
                    best, best_area = g, (x2 - x1) * (y2 - y1)
            if best is not None:
                x1, y1, x2, y2 = img_boxes[best].tolist()
                l, t, r, b = x - x1, y - y1, x2 - x, y2 - y
                lab[p] = img_labels[best]
                ltrb[p] = torch.tensor([l, t, r, b])
                ctr[p] = math.sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))
        out_labels.append(lab)
        out_ltrb.append(ltrb)
        out_ctr.append(ctr)
    return torch.stack(out_labels), torch.stack(out_ltrb), torch.stack(out_ctr)


def random_boxes(batch: int, num: int, size: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, num, 2, generator=g) * size * 0.8
    wh = 4 + torch.rand(batch, num, 2, generator=g) * size * 0.6
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], dim=-1)
    return boxes, torch.randint(0, 5, (batch, num), generator=g)


@pytest.mark.parametrize("center_sampling", [False, True])
def test_batched_fcos_equals_per_image_reference(center_sampling):
    strides = [8, 16, 32]
    ranges = [(-1, 24), (24, 48), (48, INF)]
    priors = dense_points([(12, 12), (6, 6), (3, 3)], strides, torch.device("cpu"))
    points, pstr, levels, _ = priors
    boxes, labels = random_boxes(3, 7, 96, seed=1)
    a = FCOSAssigner(strides, ranges, center_sampling=center_sampling, center_sample_radius=1.5)
    mask = torch.ones(3, 7, dtype=torch.bool)
    got = targets(a, priors, boxes, labels, mask, 5)
    ref = reference_fcos(points, pstr, levels, boxes, labels, ranges, 5, center_sampling, 1.5)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    torch.testing.assert_close(got[2], ref[2])
    assert (got[0] < 5).sum() > 20  # the case has positives on every level
    assert set(levels[got[0][0] < 5].tolist()) | set(levels[got[0][1] < 5].tolist()) == {0, 1, 2}


def test_padding_mask_chunking_and_empty_gt():
    strides = [8, 16]
    priors = dense_points([(8, 8), (4, 4)], strides, torch.device("cpu"))
    points, pstr, levels, _ = priors
    boxes, labels = random_boxes(2, 5, 64, seed=2)
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    a = FCOSAssigner(strides, [(-1, 32), (32, INF)])
    full = targets(a, priors, boxes, labels, mask, 5)
    ref = reference_fcos(points, pstr, levels, [boxes[0], boxes[1, :2]], [labels[0], labels[1, :2]],
                         [(-1, 32), (32, INF)], 5, True, 1.5)
    assert torch.equal(full[0], ref[0])
    small = FCOSAssigner(strides, [(-1, 32), (32, INF)], max_elements=16)  # many point chunks
    for x, y in zip(full, targets(small, priors, boxes, labels, mask, 5)):
        assert torch.equal(x, y)
    empty = targets(a, priors, boxes, labels, torch.zeros_like(mask), 5)
    assert (empty[0] == 5).all() and (empty[1] == 0).all() and (empty[2] == 0).all()


def cornernet_radius(height: float, width: float, min_overlap: float) -> float:
    """CenterNet's ``gaussian_radius`` as published (with its algebra slip)."""
    a1, b1, c1 = 1, height + width, width * height * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 + math.sqrt(b1 ** 2 - 4 * a1 * c1)) / 2
    a2, b2, c2 = 4, 2 * (height + width), (1 - min_overlap) * width * height
    r2 = (b2 + math.sqrt(b2 ** 2 - 4 * a2 * c2)) / 2
    a3, b3, c3 = 4 * min_overlap, -2 * min_overlap * (height + width), (min_overlap - 1) * width * height
    r3 = (b3 + math.sqrt(b3 ** 2 - 4 * a3 * c3)) / 2
    return min(r1, r2, r3)


@pytest.mark.parametrize("hw", [(10.0, 10.0), (30.0, 50.0), (7.0, 120.0), (64.0, 3.0)])
def test_gaussian_radius_formulas(hw):
    h, w = hw
    original = gaussian_radius(torch.tensor(h), torch.tensor(w), 0.7, "cornernet").item()
    assert original == pytest.approx(cornernet_radius(h, w, 0.7), rel=1e-5)
    r = gaussian_radius(torch.tensor(h), torch.tensor(w), 0.7).item()
    # corrected: every way of moving the corners by r keeps IoU >= 0.7, and one case is exactly 0.7
    ious = [(w - r) * (h - r) / (2 * w * h - (w - r) * (h - r)), (w - 2 * r) * (h - 2 * r) / (w * h),
            w * h / ((w + 2 * r) * (h + 2 * r))]
    assert min(ious) == pytest.approx(0.7, abs=1e-4) and all(i >= 0.7 - 1e-4 for i in ious)
    assert r < original


def draw_umich_gaussian(heatmap: np.ndarray, center: tuple[int, int], radius: int) -> None:
    """CenterNet's reference drawing of one object (numpy, per object)."""
    diameter = 2 * radius + 1
    sigma = diameter / 6
    m, n = [(ss - 1.0) / 2.0 for ss in (diameter, diameter)]
    y, x = np.ogrid[-m:m + 1, -n:n + 1]
    gaussian = np.exp(-(x * x + y * y) / (2 * sigma * sigma))
    gaussian[gaussian < np.finfo(gaussian.dtype).eps * gaussian.max()] = 0
    cx, cy = center
    height, width = heatmap.shape
    left, right = min(cx, radius), min(width - cx, radius + 1)
    top, bottom = min(cy, radius), min(height - cy, radius + 1)
    masked = heatmap[cy - top:cy + bottom, cx - left:cx + right]
    g = gaussian[radius - top:radius + bottom, radius - left:radius + right]
    np.maximum(masked, g, out=masked)


def test_centernet_heatmap_equals_per_object_reference_and_peaks_are_one():
    boxes, labels = random_boxes(2, 6, 128, seed=3)
    labels = labels % 3
    mask = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    a = CenterNetAssigner(stride=4)
    t = a(boxes, labels, mask, 3, (32, 32))
    ref = np.zeros((2, 3, 32, 32), np.float32)
    for b in range(2):
        for g in range(6):
            if not mask[b, g]:
                continue
            x1, y1, x2, y2 = (boxes[b, g] / 4).tolist()
            cx, cy = int((x1 + x2) / 2), int((y1 + y2) / 2)
            r = max(0, int(gaussian_radius(torch.tensor(y2 - y1), torch.tensor(x2 - x1), 0.7).item()))
            draw_umich_gaussian(ref[b, labels[b, g]], (cx, cy), r)
            assert t["heatmap"][b, labels[b, g], cy, cx] == 1.0
            assert t["index"][b, g] == cy * 32 + cx
    np.testing.assert_allclose(t["heatmap"].numpy(), ref, atol=1e-6)
    torch.testing.assert_close(t["wh"], (boxes[..., 2:] - boxes[..., :2]) / 4)
    assert ((t["offset"] >= 0) & (t["offset"] < 1)).all()
    assert torch.equal(t["mask"], mask)
    chunked = CenterNetAssigner(stride=4, max_elements=1)(boxes, labels, mask, 3, (32, 32))
    torch.testing.assert_close(chunked["heatmap"], t["heatmap"])


def test_centerness_of_a_positive_outside_its_box_is_zero():
    """SimOTA may take a point of the centre region outside the box: beyond a corner both ratios are
    negative, and their product must not become a positive centerness target."""
    points = torch.tensor([[5.0, 5.0], [25.0, 25.0], [25.0, 5.0]])  # inside, beyond a corner, beside an edge
    boxes = torch.tensor([[0.0, 0.0, 20.0, 10.0]]).expand(1, 3, 4)
    assigned = AssignResult(torch.zeros(1, 3, dtype=torch.long), boxes, torch.ones(1, 3, dtype=torch.bool))
    _, centerness = fcos_targets(points, assigned)
    assert centerness[0].tolist() == pytest.approx([math.sqrt(5 / 15 * 5 / 5), 0.0, 0.0])
