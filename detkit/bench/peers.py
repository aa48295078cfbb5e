"""Losses, assigners and data loading against their peers, in the same process (alternated)."""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import ops

from detkit.assigners import ATSSAssigner, CenterNetAssigner, FCOSAssigner, SimOTAAssigner, TaskAlignedAssigner
from detkit.assigners.fcos import DEFAULT_RANGES
from detkit.bench.common import STRIDES, num_points, random_boxes, time_pair
from detkit.bench.references import (
    per_image_atss_assign,
    per_image_fcos_assign,
    per_image_simota_assign,
    per_image_task_aligned_assign,
    per_object_heatmap,
    seed_compute_cls_loss,
    seed_neg_loss,
)
from detkit.data import build_dataloader
from detkit.losses import build_loss
from detkit.ops.priors import dense_points

#: One loss against its peer: name, peer, our loss spec, its inputs, the leaf whose gradient is dropped, its keyword
#: arguments, the peer's call.
LossPeer = tuple[str, str, dict[str, Any], tuple[Tensor, ...], Tensor, dict[str, Any], Callable[[], Tensor]]


def fwd_bwd(fn: Callable[[], Tensor], *leaves: Tensor) -> Callable[[], None]:
    """A timed step: ``fn()`` forward and backward, then the leaves' gradients dropped."""
    def run() -> None:
        fn().backward()
        for leaf in leaves:
            leaf.grad = None
    return run


def time_loss_case(case: tuple, device: torch.device, repeat: int, compile_losses: bool) -> dict[str, Any]:
    """One row of :func:`bench_losses`: ``case`` = (name, peer, ours, peer's, ours compiled) steps, timed
    alternately."""
    name, peer, eager_fn, peer_fn, compiled_fn = case
    fns = {"ours": eager_fn, "peer": peer_fn, **({"compiled": compiled_fn} if compile_losses else {})}
    t = time_pair(fns, device, repeat)
    row = {"loss": name, "peer": peer, "detkit": t["ours"], "peer_time": t["peer"], "speedup": t["peer"] / t["ours"]}
    if compile_losses:
        row.update({"detkit_compiled": t["compiled"], "compiled_speedup": t["peer"] / t["compiled"]})
    return row


def bench_losses(device: torch.device, size: int, batch: int, repeat: int, compile_losses: bool = False
                 ) -> list[dict[str, Any]]:
    """fwd+bwd of each loss vs its torch/torchvision peer on FCOS-sized tensors (B x A x C=80).

    With ``compile_losses`` each detkit loss is also timed under ``torch.compile`` (fused kernels).
    """
    g = torch.Generator().manual_seed(0)
    num_classes, points = 80, num_points(size, size)
    logits = torch.randn(batch, points, num_classes, generator=g).to(device).requires_grad_()
    labels = torch.randint(0, num_classes + 1, (batch, points), generator=g).to(device)
    one_hot = F.one_hot(labels, num_classes + 1)[..., :num_classes].float()
    pred_boxes, _ = random_boxes(batch, points, size, size, device, seed=1)
    gt_boxes, _ = random_boxes(batch, points, size, size, device, seed=2)
    pred_boxes.requires_grad_()
    reg = torch.randn(batch, points, 4, generator=g).to(device).requires_grad_()
    reg_t = torch.randn(batch, points, 4, generator=g).to(device)
    heat_size = (batch, num_classes, size // 4, size // 4)
    heat_logits = torch.randn(*heat_size, generator=g).to(device).requires_grad_()
    heat_t = torch.rand(*heat_size, generator=g).to(device) ** 8
    heat_t[..., ::17, ::13] = 1.0
    flat_logits = logits.detach().reshape(-1, num_classes).requires_grad_()
    ce_labels = labels.reshape(-1).clamp(max=num_classes - 1)
    mask = (labels < num_classes).float()

    def ours(spec: dict, *args: Any, leaf: Tensor, **kw: Any) -> tuple[Callable[[], None], Callable[[], None]]:
        loss = build_loss(spec)
        fused = torch.compile(loss, dynamic=False) if compile_losses else loss
        return fwd_bwd(lambda: loss(*args, **kw), leaf), fwd_bwd(lambda: fused(*args, **kw), leaf)

    focal = ours({"type": "FocalLoss", "reduction": "sum"}, logits, labels, leaf=logits)
    cases = [
        ("FocalLoss", "torchvision sigmoid_focal_loss", *focal[:1],
         fwd_bwd(lambda: ops.sigmoid_focal_loss(logits, one_hot, reduction="sum"), logits), focal[1]),
        ("FocalLoss", "seed per-image loop (compute_cls_loss)", *focal[:1],
         fwd_bwd(lambda: seed_compute_cls_loss(logits, ((labels + 1) % (num_classes + 1))[..., None], mask), logits),
         focal[1]),
    ]
    peer_cases: list[LossPeer] = [
        ("CrossEntropyLoss", "F.cross_entropy", {"type": "CrossEntropyLoss"}, (flat_logits, ce_labels), flat_logits,
         {}, lambda: F.cross_entropy(flat_logits, ce_labels)),
        ("CrossEntropyLoss(use_sigmoid)", "F.binary_cross_entropy_with_logits",
         {"type": "CrossEntropyLoss", "use_sigmoid": True}, (logits, one_hot), logits, {},
         lambda: F.binary_cross_entropy_with_logits(logits, one_hot)),
        ("SmoothL1Loss", "F.smooth_l1_loss", {"type": "SmoothL1Loss"}, (reg, reg_t), reg, {},
         lambda: F.smooth_l1_loss(reg, reg_t)),
        ("L1Loss", "F.l1_loss", {"type": "L1Loss"}, (reg, reg_t), reg, {}, lambda: F.l1_loss(reg, reg_t)),
        ("GIoULoss", "torchvision generalized_box_iou_loss", {"type": "GIoULoss"}, (pred_boxes, gt_boxes),
         pred_boxes, {}, lambda: ops.generalized_box_iou_loss(pred_boxes, gt_boxes, reduction="mean")),
        ("DIoULoss", "torchvision distance_box_iou_loss", {"type": "DIoULoss"}, (pred_boxes, gt_boxes),
         pred_boxes, {}, lambda: ops.distance_box_iou_loss(pred_boxes, gt_boxes, reduction="mean")),
        ("CIoULoss", "torchvision complete_box_iou_loss", {"type": "CIoULoss"}, (pred_boxes, gt_boxes),
         pred_boxes, {}, lambda: ops.complete_box_iou_loss(pred_boxes, gt_boxes, reduction="mean")),
        ("GaussianFocalLoss", "CenterNet _neg_loss", {"type": "GaussianFocalLoss"}, (heat_logits, heat_t),
         heat_logits, {"avg_factor": 100.0}, lambda: seed_neg_loss(heat_logits, heat_t)),
    ]
    for name, peer, spec, args, leaf, kw, theirs in peer_cases:
        eager, fused = ours(spec, *args, leaf=leaf, **kw)
        cases.append((name, peer, eager, fwd_bwd(theirs, leaf), fused))
    return [time_loss_case(case, device, repeat, compile_losses) for case in cases]


def bench_assigners(device: torch.device, sizes: Sequence[tuple[int, int]], batch: int, gts: int,
                    repeat: int) -> list[dict[str, Any]]:
    """Batched FCOS / ATSS / TaskAligned / SimOTA / CenterNet target generation vs per-image / per-object references."""
    rows = []
    ours: Callable[[], Any]  # each assigner's call and its reference's, whose results differ in type
    ref: Callable[[], Any]
    for h, w in sizes:
        boxes, labels = random_boxes(batch, gts, h, w, device)
        mask = torch.ones(batch, gts, dtype=torch.bool, device=device)
        priors = dense_points([(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES], STRIDES, device)
        fcos = FCOSAssigner(STRIDES, DEFAULT_RANGES)
        ranges = fcos.regress_ranges.to(device)
        ours = lambda: fcos(priors, boxes, labels, mask, 80)  # noqa: E731
        ref = lambda: per_image_fcos_assign(*priors[:3], boxes, labels, ranges, 80)  # noqa: E731
        assert torch.equal(torch.stack(ref()), ours().labels), "FCOS assigner disagrees with the reference"
        t = time_pair({"ours": ours, "ref": ref}, device, repeat)
        rows.append({"assigner": "FCOS", "size": f"{h}x{w}", "detkit": t["ours"], "reference": t["ref"],
                     "reference_kind": "loop over images", "speedup": t["ref"] / t["ours"]})
        atss = ATSSAssigner(STRIDES)
        ours = lambda: atss(priors, boxes, labels, mask, 80)  # noqa: E731
        ref = lambda: per_image_atss_assign(priors, boxes, labels, mask, atss.topk, atss.anchor_scale, 80)  # noqa: E731
        assert torch.equal(ref()[0], ours().labels), "ATSS assigner disagrees with the reference"
        t = time_pair({"ours": ours, "ref": ref}, device, repeat)
        rows.append({"assigner": "ATSS", "size": f"{h}x{w}", "detkit": t["ours"], "reference": t["ref"],
                     "reference_kind": "loop over images", "speedup": t["ref"] / t["ours"]})
        rows += bench_dynamic_assigners(device, priors, boxes, labels, mask, f"{h}x{w}", repeat)
        center = CenterNetAssigner(stride=4)
        hw = (math.ceil(h / 4), math.ceil(w / 4))
        ours = lambda: center(boxes, labels, mask, 80, hw)  # noqa: E731
        ref = lambda: per_object_heatmap(boxes, labels, 80, hw)  # noqa: E731
        torch.testing.assert_close(ours()["heatmap"], ref(), atol=1e-5, rtol=0)
        t = time_pair({"ours": ours, "ref": ref}, device, max(2, repeat // 2))
        rows.append({"assigner": "CenterNet", "size": f"{h}x{w}", "detkit": t["ours"], "reference": t["ref"],
                     "reference_kind": "loop over objects", "speedup": t["ref"] / t["ours"]})
    return rows


def bench_dynamic_assigners(device: torch.device, priors: Any, boxes: Tensor, labels: Tensor, mask: Tensor, size: str,
                            repeat: int) -> list[dict[str, Any]]:
    """TaskAligned / SimOTA on random predictions (80 class scores, boxes of up to 4 strides around each
    point) vs mmdetection's per-image algorithm (``detkit.bench.references``), checked equal first."""
    g = torch.Generator().manual_seed(3)
    batch, num_priors = boxes.shape[0], len(priors.points)
    scores = torch.rand(batch, num_priors, 80, generator=g).to(device)
    ltrb = (torch.rand(batch, num_priors, 4, generator=g).to(device) * priors.strides[:, None] * 4)
    preds = {"scores": scores, "boxes": torch.cat([priors.points - ltrb[..., :2], priors.points + ltrb[..., 2:]], -1)}
    rows = []
    tal = TaskAlignedAssigner(STRIDES, initial_epochs=0)
    simota = SimOTAAssigner(STRIDES)
    pairs = {
        "TaskAligned": (lambda: tal(priors, boxes, labels, mask, 80, preds),
                        lambda: per_image_task_aligned_assign(priors, scores, preds["boxes"], boxes, labels, mask,
                                                              tal.topk, tal.alpha, tal.beta, 80)),
        "SimOTA": (lambda: simota(priors, boxes, labels, mask, 80, preds),
                   lambda: per_image_simota_assign(priors, scores, preds["boxes"], boxes, labels, mask, 80)),
    }
    for name, (ours, ref) in pairs.items():
        assert torch.equal(ref()[0], ours().labels), f"{name} assigner disagrees with the reference"
        t = time_pair({"ours": ours, "ref": ref}, device, max(2, repeat // 2))
        rows.append({"assigner": name, "size": size, "detkit": t["ours"], "reference": t["ref"],
                     "reference_kind": "loop over images (and GTs)", "speedup": t["ref"] / t["ours"]})
    return rows


def bench_loading(datasets: dict[str, dict], batch: int, workers: Sequence[int], batches: int) -> list[dict[str, Any]]:
    """Images/s of the train loader (decode + transforms + collate) with 0 and N workers."""

    rows = []
    for name, spec in datasets.items():
        for n in workers:
            loader = build_dataloader({"batch_size": batch, "num_workers": n, "train": spec}, "train")
            it = iter(loader)
            next(it)  # worker start-up is not throughput
            start, seen = time.perf_counter(), 0
            for _ in range(batches):
                try:
                    seen += len(next(it)["targets"])
                except StopIteration:
                    break
            rows.append({"dataset": name, "workers": n, "img_s": seen / (time.perf_counter() - start)})
    return rows


