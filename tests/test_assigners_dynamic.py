"""The dynamic assigners (TaskAlignedAssigner, SimOTAAssigner) against per-image transcriptions of
mmdetection's code, the heads that feed them, and the TOOD config through the CLI."""

from __future__ import annotations

import math

import pytest
import torch

from detkit.assigners import ATSSAssigner, SimOTAAssigner, TaskAlignedAssigner
from detkit.bench.references import per_image_simota_assign, per_image_task_aligned_assign
from detkit.ops.priors import dense_points
from detkit.registry import HEADS, ConfigError
from tests.cli_runner import run_main, tiny_shapes

STRIDES = (8, 16, 32, 64, 128)
CASES = [(seed, tie) for seed in range(6) for tie in (False, True)]


def random_case(seed: int, tie: bool, size: int = 128, batch: int = 3, gts: int = 5, classes: int = 4):
    """Priors of a ``size`` image, padded GTs (image 0 full, the last empty) and predictions; with ``tie``
    every prior predicts the same score and the same box around its point, so many metrics/costs are equal."""
    g = torch.Generator().manual_seed(seed)
    priors = dense_points([(math.ceil(size / s),) * 2 for s in STRIDES], STRIDES, torch.device("cpu"))
    num_priors = len(priors.points)
    wh = torch.rand(batch, gts, 2, generator=g) * size * 0.5 + 4
    xy = torch.rand(batch, gts, 2, generator=g) * (size - wh)
    boxes, labels = torch.cat([xy, xy + wh], -1), torch.randint(0, classes, (batch, gts), generator=g)
    counts = torch.randint(0, gts + 1, (batch,), generator=g)
    counts[0], counts[-1] = gts, 0
    mask = torch.arange(gts) < counts[:, None]
    if tie:
        scores = torch.full((batch, num_priors, classes), 0.3)
        ltrb = (priors.strides[:, None] * 2).expand(batch, -1, 4)
    else:
        scores = torch.rand(batch, num_priors, classes, generator=g)
        ltrb = torch.rand(batch, num_priors, 4, generator=g) * priors.strides[:, None] * 4
    pred = torch.cat([priors.points - ltrb[..., :2], priors.points + ltrb[..., 2:]], -1)
    return priors, scores, pred, boxes, labels, mask, classes


def test_task_aligned_equals_per_image_mmdetection_transcription():
    """Labels and boxes exactly, normalised metrics to 1e-6, over random and tied cases, padded and empty
    images, GTs in chunks of one to all; priors claimed by several GTs occur."""
    conflicts = 0
    for seed, tie in CASES:
        priors, scores, pred, boxes, labels, mask, classes = random_case(seed, tie)
        for max_elements in (1, 1 << 20):  # one GT per chunk, all at once
            tal = TaskAlignedAssigner(STRIDES, initial_epochs=0, max_elements=max_elements)
            ours = tal(priors, boxes, labels, mask, classes, {"scores": scores, "boxes": pred})
            ref_labels, ref_boxes, ref_scores = per_image_task_aligned_assign(
                priors, scores, pred, boxes, labels, mask, 13, 1.0, 6.0, classes)
            assert torch.equal(ours.labels, ref_labels) and torch.equal(ours.boxes, ref_boxes), (seed, tie)
            torch.testing.assert_close(ours.scores, ref_scores, atol=1e-6, rtol=0)
            assert torch.equal(ours.positive, ref_labels < classes)
            assert not ours.positive[-1].any()  # the empty image
        assert ours.positive.any()
        candidates, _, _, chosen = tal._candidates(priors.points, scores, pred, boxes, labels, mask)
        per_prior = torch.zeros(len(boxes), len(priors.points)).scatter_add_(1, candidates.flatten(1),
                                                                           chosen.flatten(1).float())
        conflicts += int((per_prior > 1).sum())
    assert conflicts  # priors chosen by several GTs: the highest-IoU rule is exercised


def test_simota_equals_per_image_mmdetection_transcription():
    """Labels and boxes exactly over the same cases; dynamic k > 1 and priors taken twice both occur."""
    multi_k = False
    for seed, tie in CASES:
        priors, scores, pred, boxes, labels, mask, classes = random_case(seed, tie)
        for max_elements in (1, 1 << 20):
            ours = SimOTAAssigner(STRIDES, max_elements=max_elements)(
                priors, boxes, labels, mask, classes, {"scores": scores, "boxes": pred})
            ref_labels, ref_boxes = per_image_simota_assign(priors, scores, pred, boxes, labels, mask, classes)
            assert torch.equal(ours.labels, ref_labels) and torch.equal(ours.boxes, ref_boxes), (seed, tie)
            assert ours.scores is None and not ours.positive[-1].any()
        multi_k |= bool((ours.positive.sum(1) > mask.sum(1)).any())
    assert multi_k


def test_no_gradient_reaches_the_predictions_and_initial_epochs_are_atss():
    priors, scores, pred, boxes, labels, mask, classes = random_case(0, False)
    preds = {"scores": scores.clone().requires_grad_(), "boxes": pred.clone().requires_grad_()}
    tal = TaskAlignedAssigner(STRIDES, initial_epochs=2, initial={"anchor_scale": 2.0})
    atss = ATSSAssigner(STRIDES, anchor_scale=2.0)(priors, boxes, labels, mask, classes)
    for epoch, dynamic in ((0, False), (1, False), (2, True)):
        tal.set_epoch(epoch)
        result = tal(priors, boxes, labels, mask, classes, preds)
        assert (result.scores is not None) == dynamic
        assert dynamic or torch.equal(result.labels, atss.labels)
    for assigned in (result, SimOTAAssigner(STRIDES)(priors, boxes, labels, mask, classes, preds)):
        assert all(t is None or (not t.requires_grad and t.grad_fn is None) for t in assigned)
    with pytest.raises(ConfigError, match="must pass preds"):
        SimOTAAssigner(STRIDES)(priors, boxes, labels, mask, classes)


@pytest.mark.parametrize("head, assigner", [("GFLHead", "TaskAlignedAssigner"), ("FCOSHead", "SimOTAAssigner")])
def test_heads_pass_detached_predictions_and_gfl_learns_the_soft_targets(head, assigner):
    """The head gives the assigner detached inference scores and pixel boxes; GFL's QFL target is the
    assigner's normalised metric (its loss changes with it); the loss backpropagates."""
    extra = {"initial_epochs": 0} if assigner == "TaskAlignedAssigner" else {}
    model = HEADS.build({"type": head, "num_classes": 3, "in_channels": 8, "feat_channels": 8, "num_convs": 1,
                         "assigner": {"type": assigner, **extra}}, "head")
    seen = {}
    inner = model.assigner

    def spy(*args):
        seen.update(args[5], result=inner(*args))
        return seen["result"]

    spy.needs_preds = inner.needs_preds  # the head builds preds only for an assigner that ranks them
    model.assigner = spy
    feats = [torch.randn(2, 8, n, n, requires_grad=True) for n in (8, 4, 2, 1, 1)]  # a 64 px input's FPN
    gt = (torch.tensor([[[4.0, 6.0, 40.0, 50.0], [20.0, 10.0, 60.0, 30.0]], [[0.0] * 4] * 2]),
          torch.tensor([[0, 2], [0, 0]]), torch.tensor([[True, True], [False, False]]))
    outputs = model(feats)
    losses = model.loss(outputs, *gt)
    assert not seen["scores"].requires_grad and not seen["boxes"].requires_grad
    assert seen["scores"].shape == (2, 86, 3) and 0 <= seen["scores"].min() and seen["scores"].max() <= 1
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()) and feats[0].grad is not None
    if head == "GFLHead":  # the soft targets are what QFL learns: a zero target gives another loss
        result = seen["result"]
        model.assigner = lambda *a: result._replace(scores=torch.zeros_like(result.scores))
        assert not torch.equal(model.loss(outputs, *gt)["cls"], losses["cls"])


@pytest.mark.slow
def test_tood_config_trains_through_the_cli_and_switches_from_atss(tmp_path):
    """Two one-step epochs of configs/tood: ATSS in epoch 1, task-aligned from epoch 2 (set by the
    trainer's SetEpochHook), and a bad TaskAlignedAssigner key is refused with exit 2 before writing."""
    data = tmp_path / "data"
    overrides = [*tiny_shapes(data), "data.train.num_images=2", "train.epochs=2",
                 "model.head.assigner.initial_epochs=1"]
    run = run_main("train", "--config", "configs/tood/tood_r18_fpn_shapes.yaml", "--work-dir", str(tmp_path / "wd"),
                   "--device", "cpu", "--set", *overrides)
    assert run.returncode == 0, run.stderr
    assert "task-aligned assignment from epoch 2" in run.stderr
    assert (tmp_path / "wd" / "model_final.pth").is_file()
    bad = run_main("train", "--config", "configs/tood/tood_r18_fpn_shapes.yaml", "--work-dir", str(tmp_path / "bad"),
                   "--device", "cpu", "--set", *overrides, "model.head.assigner.beta=-1")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "model.head.assigner.beta must be a number >= 0" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_fcos_head_builds_no_predictions_for_a_static_assigner():
    """The (B, P, C) inference scores and decoded boxes are built only for an assigner that ranks them
    (``needs_preds``): FCOS and ATSS steps do not pay for them."""
    model = HEADS.build({"type": "FCOSHead", "num_classes": 3, "in_channels": 8, "feat_channels": 8, "num_convs": 1},
                        "head")
    inner, seen = model.assigner, []
    model.assigner = lambda *args: seen.append(args[5]) or inner(*args)
    feats = [torch.randn(1, 8, n, n) for n in (8, 4, 2, 1, 1)]
    model.loss(model(feats), torch.tensor([[[4.0, 6.0, 40.0, 50.0]]]), torch.tensor([[1]]), torch.tensor([[True]]))
    assert seen == [None]
