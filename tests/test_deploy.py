"""Deployment beyond ONNX/TorchScript: OpenVINO gives onnxruntime's detections, ``export --val`` refuses a file
that loses val AP (with both numbers), a missing runtime is one install line, and a TensorRT engine passes the
parity check where a CUDA GPU and TensorRT are (skipped elsewhere)."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detkit.api import DetectorModel
from detkit.config import load_config
from detkit.deploy.parity import check_parity, match_image
from detkit.deploy.validate import Validation, ValidationError
from detkit.engine.checkpoint import save_checkpoint
from detkit.export import FORMATS, ExportOptions, ExportWrapper, export_onnx, write
from detkit.models import build_detector
from tests.cli_runner import run_main
from tests.test_export import CONFIGS

CLASSES = ["a", "b", "c", "d"]


class TinyBackbone(nn.Module):
    """ResNet-18's output channels and strides (8, 16, 32) from four small convolutions: an exported graph
    that converts and runs in a fraction of a second."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, 4, 1)
        self.down = nn.ModuleList([nn.Conv2d(8, 8, 3, 2, 1) for _ in range(3)])
        self.proj = nn.ModuleList([nn.Conv2d(8, c, 1) for c in (128, 256, 512)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x, outs = self.stem(x), []
        for down, proj in zip(self.down, self.proj):
            x = down(x).relu()
            outs.append(proj(x))
        return outs


def tiny_fcos() -> tuple[nn.Module, dict]:
    """The default FCOS at width 16 on :class:`TinyBackbone`, head weights spread so that it detects
    (scores near 0.5) with distinct scores; and its config."""
    torch.manual_seed(0)
    cfg = load_config(CONFIGS["fcos"][0], ["model.neck.out_channels=16", "model.head.feat_channels=16",
                                           "model.head.num_convs=1"])
    model = build_detector(cfg["model"]).eval()
    model.backbone = TinyBackbone()
    with torch.no_grad():
        for module in model.head.modules():
            if isinstance(module, nn.Conv2d):
                module.weight.normal_(0, 0.05)
                if module.bias is not None:
                    module.bias.zero_()
    return model, cfg


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two images of 100x130 and 70x83 zero-padded into one batch, and their sizes."""
    g = torch.Generator().manual_seed(1)
    images = torch.zeros(2, 3, 100, 130, dtype=torch.uint8)
    images[0] = torch.randint(0, 256, (3, 100, 130), dtype=torch.uint8, generator=g)
    images[1, :, :70, :83] = torch.randint(0, 256, (3, 70, 83), dtype=torch.uint8, generator=g)
    return images, torch.tensor([[100, 130], [70, 83]])


@pytest.mark.slow
def test_openvino_gives_onnxruntimes_detections(tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra is not installed")
    pytest.importorskip("onnxruntime", reason="the export extra is not installed")
    from detkit.deploy.openvino import onnx_to_openvino, weights_path

    model, _ = tiny_fcos()
    onnx = export_onnx(model, tmp_path / "m.onnx", ExportOptions(dynamo=False))
    xml = onnx_to_openvino(onnx, tmp_path / "m.xml")
    assert weights_path(xml).is_file()
    images, sizes = padded_batch()
    ref, got = FORMATS["onnx"].load(onnx)(images, sizes), FORMATS["openvino"].load(xml)(images, sizes)
    matched = 0
    for n in range(2):
        dets = [{"boxes": b[n][c[n] >= 0], "scores": s[n][c[n] >= 0], "labels": c[n][c[n] >= 0]} for b, s, c in
                (ref, got)]
        pairs, _, problems = match_image(dets[0], dets[1], float(model.head.score_thr), int(ref[2].shape[1]))
        assert not problems
        matched += len(pairs)
    assert matched >= 100  # both images detect (100 slots each): the comparison compared something


def own_detections_as_val_set(model: nn.Module, cfg: dict, root) -> DetectorModel:
    """A DetectorModel whose config's data.val is two images annotated with the model's own top five
    detections each: PyTorch scores well there (some are degenerate, dropped by the dataset), a file whose
    boxes moved scores about 0."""
    cfg = {**cfg, "data": {**cfg["data"], "num_workers": 0, "val_batch_size": 2,
                           "val": {"type": "CocoDataset", "data_root": str(root), "ann_file": "val.json",
                                   "img_dir": "images"}}}
    detector = DetectorModel(model, cfg, CLASSES, torch.device("cpu"))
    g = np.random.default_rng(0)
    pictures = [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((96, 128), (80, 100))]
    (root / "images").mkdir(parents=True)
    images, annotations = [], []
    for index, (picture, det) in enumerate(zip(pictures, detector.predict(pictures, score_thr=0.0))):
        Image.fromarray(picture).save(root / "images" / f"{index}.png")
        images.append({"id": index + 1, "file_name": f"{index}.png", "height": picture.shape[0],
                       "width": picture.shape[1]})
        for (x1, y1, x2, y2), label in zip(det["boxes"][:5].tolist(), det["labels"][:5].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    (root / "val.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                               "categories": categories}))
    return detector


def test_val_refuses_an_exported_file_that_loses_ap(tmp_path):
    model, cfg = tiny_fcos()
    detector = own_detections_as_val_set(model, cfg, tmp_path)
    validation = Validation(detector, tol=0.5)
    assert validation.pytorch["AP"] > 0.1 and validation.num_images == 2  # 10 AP points: 20x the tolerance
    wrapper = ExportWrapper(detector.model)
    with torch.no_grad():
        report = validation.check(lambda x, s: wrapper(x, s), "onnx")  # the same network: nothing lost
        assert abs(report.drop) < 0.01 and "PyTorch fp32" in report.summary()

        def shifted(x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, ...]:  # a file whose boxes moved
            boxes, scores, labels = wrapper(x, s)
            return boxes + 12.0, scores, labels

        with pytest.raises(ValidationError) as err:
            validation.check(shifted, "onnx")
    pytorch_ap = f"{100 * validation.pytorch['AP']:.2f}"
    assert pytorch_ap in str(err.value) and "val AP" in str(err.value) and "--val-tol 0.5" in str(err.value)


def test_missing_openvino_is_one_install_line(tmp_path, monkeypatch):
    cfg = load_config(CONFIGS["fcos"][0], ["model.neck.out_channels=16", "model.head.feat_channels=16",
                                           "model.head.num_convs=1"])
    save_checkpoint({"model": build_detector(cfg["model"]).state_dict(), "config": cfg, "classes": CLASSES},
                    tmp_path / "m.pth")
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    result = run_main("export", "--checkpoint", str(tmp_path / "m.pth"), "--format", "openvino",
                      "--out", str(tmp_path / "m.xml"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "pip install openvino" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pth"]  # nothing written


def test_tensorrt_without_gpu_or_package_is_one_line_before_anything_is_read(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # as if not installed, on any machine
    (tmp_path / "m.pth").write_bytes(b"never read: the check comes first")
    (tmp_path / "m.engine").write_bytes(b"an older engine")
    result = run_main("export", "--checkpoint", str(tmp_path / "m.pth"), "--format", "tensorrt",
                      "--out", str(tmp_path / "m.engine"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: --format tensorrt needs")
    assert "no CUDA GPU" in result.stderr and "no tensorrt package" in result.stderr
    assert "pip install" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.pth"]
    assert (tmp_path / "m.engine").read_bytes() == b"an older engine"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT needs a CUDA GPU")
def test_tensorrt_engine_passes_the_parity_check(tmp_path):
    pytest.importorskip("tensorrt", reason="the tensorrt extra is not installed")
    from detkit.deploy.tensorrt import MAX_BATCH, tensorrt_unavailable

    assert tensorrt_unavailable() == ""
    model, cfg = tiny_fcos()
    detector = DetectorModel(model, cfg, CLASSES, torch.device("cpu"))
    run = write("tensorrt", model, tmp_path / "m.engine", ExportOptions())
    report = check_parity(detector, run)  # fp16 engine against PyTorch fp32, the check export applies
    assert report.matched > 0
    images, sizes = padded_batch()
    boxes, scores, labels = run(images.cuda(), sizes.cuda())  # CUDA in, CUDA out
    assert boxes.is_cuda and labels.dtype == torch.int64
    repeats = MAX_BATCH // 2 + 1  # above the profile's largest batch: run in chunks, the last one these two images
    chunked = run(images.repeat(repeats, 1, 1, 1), sizes.repeat(repeats, 1))
    for got, ref in zip(chunked, (boxes, scores, labels)):
        assert torch.equal(got[-2:].cuda(), ref)
