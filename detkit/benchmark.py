"""Benchmarks against peers in the same process: losses, assigners, train step, data loading.

Every figure is a ratio against a peer measured in the same run (alternating, after warm-up), so
the tables compare like with like; absolute times are only meaningful on a GPU. Entry point:
``tools/benchmark.py`` (``python tools/benchmark.py --help``).
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision import ops

from detkit.assigners import CenterNetAssigner, FCOSAssigner, fcos_points
from detkit.assigners.fcos import DEFAULT_RANGES
from detkit.losses import build_loss

STRIDES = (8, 16, 32, 64, 128)


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pair(fns: dict[str, Callable[[], Any]], device: torch.device, repeat: int, warmup: int = 2
              ) -> dict[str, float]:
    """Median seconds per call of each function, run alternately so that drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def fmt_time(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.0f} us"


def num_points(height: int, width: int) -> int:
    return sum(math.ceil(height / s) * math.ceil(width / s) for s in STRIDES)


# ----------------------------------------------------------------------------- references
def seed_compute_cls_loss(preds: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """The FCOS notebook's per-image loop (``compute_cls_loss`` + ``focal_loss_from_logits``)."""
    batch, _, class_num = preds.shape
    num_pos = mask.sum(dim=1).clamp(min=1).float()
    losses = []
    for b in range(batch):
        target = (torch.arange(1, class_num + 1, device=preds.device)[None, :] == targets[b]).float()
        p = preds[b].sigmoid()
        pt = p * target + (1.0 - p) * (1.0 - target)
        w = 0.25 * target + 0.75 * (1.0 - target)
        losses.append((-w * torch.pow(1.0 - pt, 2.0) * pt.log()).sum().view(1))
    return (torch.cat(losses) / num_pos).mean()


def seed_neg_loss(pred: Tensor, target: Tensor) -> Tensor:
    """CenterNet's ``_neg_loss`` (sigmoid + clamp), one stack."""
    pos = target.eq(1).float()
    p = torch.clamp(torch.sigmoid(pred), 1e-4, 1 - 1e-4)
    pos_loss = (torch.log(p) * (1 - p).pow(2) * pos).sum()
    neg_loss = (torch.log(1 - p) * p.pow(2) * (1 - target).pow(4) * (1 - pos)).sum()
    return -(pos_loss + neg_loss) / pos.sum().clamp(min=1)


def per_image_fcos_assign(points: Tensor, strides: Tensor, levels: Tensor, boxes: Tensor, labels: Tensor,
                          ranges: Tensor, num_classes: int, radius: float = 1.5) -> list[Tensor]:
    """mmdetection-style reference: a loop over images, each building a ``(P, G, 4)`` tensor."""
    out = []
    rng = ranges[levels]
    for img_boxes, img_labels in zip(boxes, labels):
        x, y = points[:, 0, None], points[:, 1, None]
        ltrb = torch.stack([x - img_boxes[:, 0], y - img_boxes[:, 1], img_boxes[:, 2] - x, img_boxes[:, 3] - y], -1)
        cx, cy = (img_boxes[:, 0] + img_boxes[:, 2]) / 2, (img_boxes[:, 1] + img_boxes[:, 3]) / 2
        r = strides[:, None] * radius
        region = torch.stack([x - torch.max(cx - r, img_boxes[:, 0]), y - torch.max(cy - r, img_boxes[:, 1]),
                              torch.min(cx + r, img_boxes[:, 2]) - x, torch.min(cy + r, img_boxes[:, 3]) - y], -1)
        ok = (region.min(-1).values > 0)
        max_d = ltrb.max(-1).values
        ok &= (max_d >= rng[:, :1]) & (max_d <= rng[:, 1:])
        area = ((img_boxes[:, 2] - img_boxes[:, 0]) * (img_boxes[:, 3] - img_boxes[:, 1]))[None].expand_as(ok)
        min_area, idx = torch.where(ok, area, torch.full_like(area, math.inf)).min(1)
        lab = img_labels[idx].clone()
        lab[min_area == math.inf] = num_classes
        out.append(lab)
    return out


def per_object_heatmap(boxes: Tensor, labels: Tensor, num_classes: int, size: tuple[int, int],
                       stride: int = 4) -> Tensor:
    """mmdetection-style reference: one gaussian drawn per object in a Python loop."""
    from detkit.assigners.centernet import gaussian_radius

    height, width = size
    heat = torch.zeros(boxes.shape[0], num_classes, height, width, device=boxes.device)
    for b in range(boxes.shape[0]):
        for box, label in zip(boxes[b] / stride, labels[b]):
            cx, cy = int((box[0] + box[2]) / 2), int((box[1] + box[3]) / 2)
            r = max(0, int(gaussian_radius(box[3] - box[1], box[2] - box[0], 0.7)))
            ys = torch.arange(max(0, cy - r), min(height, cy + r + 1), device=boxes.device)
            xs = torch.arange(max(0, cx - r), min(width, cx + r + 1), device=boxes.device)
            sigma = (2 * r + 1) / 6
            g = torch.exp(-((xs[None] - cx) ** 2 + (ys[:, None] - cy) ** 2) / (2 * sigma * sigma))
            region = heat[b, label, ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
            torch.maximum(region, g, out=region)
    return heat


# ----------------------------------------------------------------------------- sections
def random_boxes(batch: int, num: int, height: int, width: int, device: torch.device,
                 seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    wh = torch.rand(batch, num, 2, generator=g) * torch.tensor([width, height]) * 0.5 + 8
    xy = torch.rand(batch, num, 2, generator=g) * (torch.tensor([width, height]) - wh)
    boxes = torch.cat([xy, xy + wh], -1)
    return boxes.to(device), torch.randint(0, 80, (batch, num), generator=g).to(device)


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

    def fb(fn: Callable[[], Tensor], *leaves: Tensor) -> Callable[[], None]:
        def run() -> None:
            fn().backward()
            for leaf in leaves:
                leaf.grad = None
        return run

    def ours(spec: dict, *args: Any, leaf: Tensor, **kw: Any) -> tuple[Callable[[], None], Callable[[], None]]:
        loss = build_loss(spec)
        fused = torch.compile(loss, dynamic=False) if compile_losses else loss
        return fb(lambda: loss(*args, **kw), leaf), fb(lambda: fused(*args, **kw), leaf)

    focal = ours({"type": "FocalLoss", "reduction": "sum"}, logits, labels, leaf=logits)
    cases = [
        ("FocalLoss", "torchvision sigmoid_focal_loss", *focal[:1],
         fb(lambda: ops.sigmoid_focal_loss(logits, one_hot, reduction="sum"), logits), focal[1]),
        ("FocalLoss", "seed per-image loop (compute_cls_loss)", *focal[:1],
         fb(lambda: seed_compute_cls_loss(logits, ((labels + 1) % (num_classes + 1))[..., None], mask), logits),
         focal[1]),
    ]
    for name, peer, spec, args, leaf, kw, theirs in [
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
    ]:
        eager, fused = ours(spec, *args, leaf=leaf, **kw)
        cases.append((name, peer, eager, fb(theirs, leaf), fused))
    rows = []
    for name, peer, eager_fn, peer_fn, compiled_fn in cases:
        fns = {"ours": eager_fn, "peer": peer_fn}
        if compile_losses:
            fns["compiled"] = compiled_fn
        t = time_pair(fns, device, repeat)
        row = {"loss": name, "peer": peer, "detkit": t["ours"], "peer_time": t["peer"], "speedup": t["peer"] / t["ours"]}
        if compile_losses:
            row.update({"detkit_compiled": t["compiled"], "compiled_speedup": t["peer"] / t["compiled"]})
        rows.append(row)
    return rows


def bench_assigners(device: torch.device, sizes: Sequence[tuple[int, int]], batch: int, gts: int,
                    repeat: int) -> list[dict[str, Any]]:
    """Batched FCOS / CenterNet target generation vs per-image / per-object references."""
    rows = []
    for h, w in sizes:
        boxes, labels = random_boxes(batch, gts, h, w, device)
        mask = torch.ones(batch, gts, dtype=torch.bool, device=device)
        pts = fcos_points([(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES], STRIDES, device)
        fcos = FCOSAssigner(STRIDES, DEFAULT_RANGES)
        ranges = fcos.regress_ranges.to(device)
        ours = lambda: fcos(*pts, boxes, labels, mask, 80)  # noqa: E731
        ref = lambda: per_image_fcos_assign(*pts, boxes, labels, ranges, 80)  # noqa: E731
        assert torch.equal(torch.stack(ref()), ours()[0]), "FCOS assigner disagrees with the reference"
        t = time_pair({"ours": ours, "ref": ref}, device, repeat)
        rows.append({"assigner": "FCOS", "size": f"{h}x{w}", "detkit": t["ours"], "reference": t["ref"],
                     "reference_kind": "loop over images", "speedup": t["ref"] / t["ours"]})
        center = CenterNetAssigner(stride=4)
        hw = (math.ceil(h / 4), math.ceil(w / 4))
        ours = lambda: center(boxes, labels, mask, 80, hw)  # noqa: E731
        ref = lambda: per_object_heatmap(boxes, labels, 80, hw)  # noqa: E731
        torch.testing.assert_close(ours()["heatmap"], ref(), atol=1e-5, rtol=0)
        t = time_pair({"ours": ours, "ref": ref}, device, max(2, repeat // 2))
        rows.append({"assigner": "CenterNet", "size": f"{h}x{w}", "detkit": t["ours"], "reference": t["ref"],
                     "reference_kind": "loop over objects", "speedup": t["ref"] / t["ours"]})
    return rows


def torchvision_fcos(depth: int, width: int, num_classes: int, size: int) -> nn.Module:
    """torchvision's own FCOS module (no detkit wrapper in the timed step), as ``TorchvisionFCOS`` builds it:
    same backbone (trainable BN), FPN width, P6/P7 on P5 and 4-conv GroupNorm head."""
    from detkit.models import TorchvisionFCOS

    return TorchvisionFCOS(num_classes, depth=depth, fpn_channels=width, min_size=size, max_size=size).model


def detkit_fcos(depth: int, width: int, num_classes: int) -> nn.Module:
    from detkit.models import build_detector

    return build_detector({
        "type": "FCOS", "backbone": {"type": "ResNet", "depth": depth, "norm": "BN"},
        "neck": {"type": "FPN", "out_channels": width, "extra_levels": 2, "extra_on": "p5"},
        "head": {"type": "FCOSHead", "num_classes": num_classes, "feat_channels": width, "num_convs": 4,
                 "norm": "GN"}})


def bench_train_step(device: torch.device, depths: Sequence[int], size: int, batch: int, width: int,
                     repeat: int, amp: bool) -> list[dict[str, Any]]:
    """Images/s and peak memory of one full training step, detkit FCOS vs torchvision FCOS."""
    rows = []
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    boxes, labels = random_boxes(batch, 8, size, size, torch.device("cpu"))
    targets = [{"boxes": b, "labels": l % 80} for b, l in zip(boxes, labels)]
    for depth in depths:
        torch.manual_seed(0)
        ours, theirs = detkit_fcos(depth, width, 80).to(device), torchvision_fcos(depth, width, 80, size).to(device)
        opt_ours = torch.optim.SGD(ours.parameters(), lr=1e-4, momentum=0.9)
        opt_theirs = torch.optim.SGD(theirs.parameters(), lr=1e-4, momentum=0.9)
        tv_images = [(img.float() / 255).to(device) for img in images]
        tv_targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        ctx = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else (lambda: torch.autocast(
            device.type, enabled=False))

        def step_ours() -> None:
            with ctx():
                loss = sum(ours.loss(images.to(device), targets).values())
            opt_ours.zero_grad(set_to_none=True)
            loss.backward()
            opt_ours.step()

        def step_theirs() -> None:
            with ctx():
                loss = sum(theirs(tv_images, tv_targets).values())
            opt_theirs.zero_grad(set_to_none=True)
            loss.backward()
            opt_theirs.step()

        ours.train()
        theirs.train()
        memory = {}
        for name, fn in (("ours", step_ours), ("theirs", step_theirs)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                fn()
                sync(device)
                memory[name] = torch.cuda.max_memory_allocated(device) / 2 ** 20
        t = time_pair({"ours": step_ours, "theirs": step_theirs}, device, repeat)
        rows.append({"model": f"FCOS-R{depth}-FPN{width}", "size": size, "batch": batch, "amp": "bf16" if amp else "fp32",
                     "detkit_img_s": batch / t["ours"], "torchvision_img_s": batch / t["theirs"],
                     "ratio": t["theirs"] / t["ours"], "detkit_mem_mib": memory.get("ours"),
                     "torchvision_mem_mib": memory.get("theirs")})
    return rows


def bench_loading(datasets: dict[str, dict], batch: int, workers: Sequence[int], batches: int) -> list[dict[str, Any]]:
    """Images/s of the train loader (decode + transforms + collate) with 0 and N workers."""
    from detkit.data import build_dataloader

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


def machine() -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d")}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def markdown(title: str, rows: list[dict[str, Any]]) -> str:
    if not rows:
        return f"### {title}\n\n(no rows)\n"
    keys = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = []
        for k in keys:
            v = row[k]
            if isinstance(v, float):
                v = fmt_time(v) if k in ("detkit", "peer_time", "reference", "detkit_compiled") else f"{v:.2f}"
            cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write(out_dir: Path, results: dict[str, Any]) -> str:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "benchmark.json").write_text(json.dumps(results, indent=1))
    text = "\n".join(markdown(k, v) for k, v in results.items() if k != "machine")
    (out_dir / "benchmark.md").write_text(text)
    return text
