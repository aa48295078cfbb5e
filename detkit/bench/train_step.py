"""One training step and batched inference of detkit's FCOS vs torchvision's FCOS, same process, alternated."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Callable, Sequence, cast

import torch
from torch import Tensor, nn

from detkit.bench.common import random_boxes, sync, time_pair
from detkit.engine.compiled_step import CompiledLoss
from detkit.engine.precision import autocast
from detkit.models import FCOS, TorchvisionFCOS, build_detector
from detkit.models.convert import convert_torchvision_fcos
from detkit.models.fuse import fold_batchnorm

if TYPE_CHECKING:
    from torchvision.models.detection import FCOS as TorchvisionFCOSModel


def torchvision_fcos(depth: int, width: int, num_classes: int, size: int, num_convs: int = 4
                     ) -> TorchvisionFCOSModel:
    """torchvision's own FCOS module (no detkit wrapper in the timed step), as ``TorchvisionFCOS`` builds it
    with ``min_size = max_size = size``: torchvision's own transform, whose inference resize of a ``size``
    image is a scale-1 interpolate; same backbone (trainable BN), FPN width, P6/P7 on P5 and GroupNorm head."""
    return TorchvisionFCOS(num_classes, depth=depth, fpn_channels=width, num_convs=num_convs, min_size=size,
                           max_size=size).model


def detkit_fcos(depth: int, width: int, num_classes: int, num_convs: int = 4, **head: Any) -> FCOS:
    model = build_detector({
        "type": "FCOS", "backbone": {"type": "ResNet", "depth": depth, "norm": "BN"},
        "neck": {"type": "FPN", "out_channels": width, "extra_levels": 2, "extra_on": "p5"},
        "head": {"type": "FCOSHead", "num_classes": num_classes, "feat_channels": width, "num_convs": num_convs,
                 "norm": "GN", **head}})
    assert isinstance(model, FCOS)  # the spec's type
    return model


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    """MiB of ``torch.cuda.max_memory_allocated`` during one call of ``fn`` (None on the CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device) / 2 ** 20


def bench_train_step(device: torch.device, depths: Sequence[int], size: int, batch: int, width: int,
                     repeat: int, amps: Sequence[str | None], compiled: bool = False, num_convs: int = 4,
                     num_classes: int = 80, channels_last: bool = False) -> list[dict[str, Any]]:
    """Images/s and peak memory of one full step (forward, loss, backward, SGD step), detkit FCOS vs
    torchvision FCOS, for each depth and autocast dtype (both models under the same one).

    Under bf16 torchvision also runs in eager fp32, as users run it (``vs_tv_fp32`` ratios). Options add
    detkit variants: ``compiled`` (``train.compile: full``: static shapes, CUDA graphs on the GPU, fused
    SGD) and ``channels_last`` (model and batch in channels_last memory format).
    """
    rows = []
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    boxes, labels = random_boxes(batch, 8, size, size, torch.device("cpu"))
    targets = [{"boxes": b, "labels": lab % num_classes} for b, lab in zip(boxes, labels)]
    tv_images = [(img.float() / 255).to(device) for img in images]
    tv_targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
    cl_images = images.contiguous(memory_format=torch.channels_last)
    for depth in depths:
        for amp in amps:
            torch.manual_seed(0)
            ours = detkit_fcos(depth, width, num_classes, num_convs).to(device)
            theirs = torchvision_fcos(depth, width, num_classes, size, num_convs).to(device)
            # name -> (loss function, module, its inputs, autocast, fused optimizer)
            variants: dict[str, tuple[Callable[..., dict[str, Tensor]], nn.Module, tuple, str | None, bool]] = {
                "detkit": (ours.loss, ours, (images, targets), amp, False),
                "torchvision": (theirs, theirs, (tv_images, tv_targets), amp, False)}
            if amp is not None:
                peer = torchvision_fcos(depth, width, num_classes, size, num_convs).to(device)
                variants["torchvision_fp32"] = (peer, peer, (tv_images, tv_targets), None, False)
            if channels_last:
                cl = detkit_fcos(depth, width, num_classes, num_convs).to(device).to(memory_format=torch.channels_last)
                variants["detkit_cl"] = (cl.loss, cl, (cl_images, targets), amp, False)
            if compiled:
                full = detkit_fcos(depth, width, num_classes, num_convs).to(device)
                variants["detkit_full"] = (CompiledLoss(full), full, (images, targets), amp, True)
            steps = {}
            for name, (fn, module, args, dtype, fused) in variants.items():
                module.train()
                opt = torch.optim.SGD(module.parameters(), lr=1e-4, momentum=0.9, fused=fused or None)
                steps[name] = make_step(fn, opt, args, device, dtype)
            memory = {name: peak_memory(step, device) for name, step in steps.items()}
            t = time_pair(steps, device, repeat, warmup=3)
            row: dict[str, Any] = {"model": f"FCOS-R{depth}-FPN{width}-{num_convs}conv", "size": size, "batch": batch,
                                   "amp": amp or "fp32"}
            row.update({f"{name}_img_s": batch / t[name] for name in steps})
            row["ratio"] = t["torchvision"] / t["detkit"]
            for name in steps:
                if name.startswith("detkit_"):
                    row[f"{name[7:]}_ratio"] = t["torchvision"] / t[name]
            if amp is not None:
                row.update({f"{name}_vs_tv_fp32": t["torchvision_fp32"] / t[name] for name in steps
                            if name.startswith("detkit")})
            row.update({f"{name}_mem_mib": memory[name] for name in steps if device.type == "cuda"})
            rows.append(row)
    return rows


def make_step(loss_fn: Callable[..., dict[str, Tensor]], optimizer: torch.optim.Optimizer, args: tuple,
              device: torch.device, amp: str | None) -> Callable[[], None]:
    def step() -> None:
        with autocast(device, amp):
            loss = cast(Tensor, sum(loss_fn(*args).values()))  # a detector returns at least one term
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def bench_inference(device: torch.device, depth: int, width: int, num_convs: int, num_classes: int, size: int,
                    batch: int, repeat: int) -> list[dict[str, Any]]:
    """Batched detection throughput: detkit ``predict`` vs torchvision FCOS ``eval()``, fp32, with the same
    weights (torchvision's converted into detkit's FCOS, which is then exact: same boxes and scores).

    ``detkit`` is the model's own ``predict``; ``detkit_api`` the model as ``load_detector`` prepares it
    (BatchNorm folded into the convolutions, ``channels_last``). Two regimes of the random weights:
    ``dense`` (the classifier's prior init: every candidate scores
    about 0.07, above the 0.05 threshold, so NMS sees ``nms_pre`` boxes per level) and ``sparse``
    (classifier bias -10: nothing passes the threshold; the network and decoding alone).
    """
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    theirs = torchvision_fcos(depth, width, num_classes, size, num_convs).to(device).eval()
    ours = detkit_fcos(depth, width, num_classes, num_convs, conv_bias=True, point_offset=0.0,
                       stride_from_input=True, score_thr=0.05, nms_iou=0.6, max_per_img=100).to(device).eval()
    ours.load_state_dict(convert_torchvision_fcos(theirs.state_dict()))
    tv_images = [(img.float() / 255).to(device) for img in images]
    rows = []
    for regime, bias in (("dense", None), ("sparse", -10.0)):
        if bias is not None:
            with torch.no_grad():
                theirs.head.classification_head.cls_logits.bias.fill_(bias)
                ours.head.cls_out.bias.fill_(bias)
        folded = copy.deepcopy(ours)  # as load_detector: BatchNorms folded and channels_last, both in place
        fold_batchnorm(folded).to(memory_format=torch.channels_last)
        nhwc = images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            fns = {"detkit": lambda: ours.predict(images), "detkit_api": lambda: folded.predict(nhwc),
                   "torchvision": lambda: theirs(tv_images)}
            detections = {name: sum(len(d["scores"]) for d in fn()) / batch for name, fn in fns.items()}
            t = time_pair(fns, device, repeat)
        rows.append({"model": f"FCOS-R{depth}-FPN{width}-{num_convs}conv", "size": size, "batch": batch,
                     "regime": regime, "detections_per_img": detections["detkit"],
                     "torchvision_detections_per_img": detections["torchvision"],
                     "detkit_img_s": batch / t["detkit"], "detkit_api_img_s": batch / t["detkit_api"],
                     "torchvision_img_s": batch / t["torchvision"], "ratio": t["torchvision"] / t["detkit"],
                     "api_ratio": t["torchvision"] / t["detkit_api"]})
    return rows
