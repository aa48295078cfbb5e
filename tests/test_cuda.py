"""CUDA checks (skipped without a GPU; CI has none): training steps with AMP, assigners on device."""

from __future__ import annotations

import json

import pytest
import torch

import detkit
from detkit.assigners import CenterNetAssigner, FCOSAssigner
from detkit.models import build_detector
from detkit.ops import dense_points
from tests.test_models import batch, tiny_centernet, tiny_fcos

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("spec", [tiny_fcos(), tiny_centernet()])
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_cuda_train_step_with_amp(spec, amp):
    torch.manual_seed(0)
    model = build_detector(spec).cuda()
    images, targets = batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        losses = model.loss(images.cuda(), targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    scaler.scale(sum(losses.values())).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.isfinite(p).all() for p in model.parameters())
    model.eval()
    with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
        out = model.predict(images.cuda())
    assert out[0]["boxes"].device.type == "cuda"


def test_assigners_on_cuda_equal_cpu():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(4, 9, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 8 + torch.rand(4, 9, 2, generator=g) * 100], -1)
    labels = torch.randint(0, 5, (4, 9), generator=g)
    mask = torch.rand(4, 9, generator=g) > 0.2
    a = FCOSAssigner([8, 16, 32], [(-1, 64), (64, 128), (128, 1e8)])
    for device in ("cpu", "cuda"):
        priors = dense_points([(40, 40), (20, 20), (10, 10)], [8, 16, 32], torch.device(device))
        out = a(priors, boxes.to(device), labels.to(device), mask.to(device), 5)
        if device == "cpu":
            ref = out
    for x, y in zip(ref, out):
        torch.testing.assert_close(x, y.cpu())
    c = CenterNetAssigner(stride=4)
    cpu = c(boxes, labels, mask, 5, (80, 80))
    gpu = c(boxes.cuda(), labels.cuda(), mask.cuda(), 5, (80, 80))
    for key in cpu:
        torch.testing.assert_close(cpu[key], gpu[key].cpu())


def test_cuda_training_run_with_fp16_ema_accumulation(tmp_path):
    """The whole CLI on the GPU: fp16 + GradScaler, EMA, accumulation, evaluation; then the result through
    ``detkit.load_detector`` on CUDA."""
    from tests.test_train import FCOS_CFG, ROOT, cli, tiny_fcos

    work = tmp_path / "work"
    cli(str(ROOT / "tools/train.py"), "--config", str(FCOS_CFG), "--work-dir", str(work), "--device", "cuda", "--set",
        *tiny_fcos(tmp_path / "data", epochs=2, images=16), "train.amp=fp16", "train.ema={decay: 0.9}",
        "train.accumulate=2", cwd=tmp_path)
    records = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    assert train and all(r["total"] == r["total"] for r in train)  # finite, logged per optimizer step
    model = detkit.load_detector(work / "model_final.pth", device="cuda")
    assert model.device.type == "cuda"
    image = torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)
    assert len(model.predict([image, image], score_thr=0.0)) == 2
