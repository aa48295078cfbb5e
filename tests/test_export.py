"""Export parity: ONNX (onnxruntime) and TorchScript give PyTorch's detections, NMS included."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from detkit.api import DetectorModel
from detkit.config import load_config
from detkit.data.collate import collate_detection
from detkit.export import FORMATS, ExportOptions, full_sizes
from detkit.models import build_detector
from tests.detections import paired_max_diff

pytest.importorskip("onnxruntime", reason="the export extra is not installed")
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    "fcos": (ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml", ["model.neck.out_channels=32", "model.head.feat_channels=32",
                                                              "model.head.num_convs=1"]),
    "centernet": (ROOT / "configs/centernet/centernet_r18_shapes.yaml", ["model.neck.channels=[32,32,32]",
                                                                         "model.head.feat_channels=32"]),
    "gfl": (ROOT / "configs/gfl/gfl_r18_fpn_shapes.yaml", ["model.neck.out_channels=32", "model.head.feat_channels=32",
                                                           "model.head.num_convs=1"]),
}
SIZES = [(100, 130), (90, 110), (70, 83)]  # (h, w), none a multiple of the model's size_divisor 32


def spread_head_scores(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its head's conv weights drawn from N(0, 0.05) and biases zeroed, in place: spread scores
    (no exact ties: the order of detections is defined) and a classifier at even odds (scores above
    ``score_thr``: detections to compare)."""
    with torch.no_grad():
        for module in model.head.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.normal_(0, 0.05)
                if module.bias is not None:
                    module.bias.zero_()
    return model


def spread_model(name: str) -> torch.nn.Module:
    """The ``CONFIGS[name]`` detector, seeded, with :func:`spread_head_scores`."""
    torch.manual_seed(0)
    cfg_path, overrides = CONFIGS[name]
    return spread_head_scores(build_detector(load_config(cfg_path, overrides)["model"]).eval())


def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for h, w in SIZES]


def assert_same_detections(exported: tuple, reference: dict, n: int = 0) -> None:
    """Image ``n`` of the exported outputs has the same labels, boxes within 0.5 px and scores within 1e-3,
    detection by detection (paired: float rounding may reorder near-tied scores)."""
    boxes, scores, labels = (x[n] for x in exported)
    valid = labels >= 0
    box_diff, score_diff = paired_max_diff({"boxes": boxes[valid], "scores": scores[valid], "labels": labels[valid]},
                                           reference)
    assert box_diff <= 0.5 and score_diff <= 1e-3


@pytest.mark.parametrize(("fmt", "name"), [("onnx", "fcos"), ("onnx", "centernet"), ("onnx", "gfl"),
                                           ("torchscript", "fcos"), ("torchscript", "centernet")])  # GFL: FCOS's NMS
@pytest.mark.slow
def test_exported_model_equals_predict_at_any_size_and_in_a_padded_batch(tmp_path, name, fmt):
    """The graph pads to size_divisor and clips to each image's image_sizes row as predict does: the file
    gives predict's detections for each image alone (unpadded) and for the three as one zero-padded batch."""
    detector = DetectorModel(spread_model(name), load_config(*CONFIGS[name]), "abcd", torch.device("cpu"))
    path = tmp_path / f"model.{fmt}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        FORMATS[fmt].export(detector.model, path, ExportOptions(dynamo=False))
    assert [str(w.message) for w in caught] == []  # torch's tracer and deprecation notices are filtered
    run = FORMATS[fmt].load(path)
    for image in images():
        assert_same_detections(run(image[None], full_sizes(image[None])), detector.predict(image, score_thr=0.0)[0])
    expected = detector.predict(images(), score_thr=0.0)  # one batch, zero-padded to 128x160
    batch = collate_detection([(image, {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                                        "image_id": 0, "orig_size": image.shape[-2:]}) for image in images()], 1)
    outputs = run(batch["images"], batch["image_sizes"])  # padded to the largest image only: the graph pads on
    for n, reference in enumerate(expected):
        assert_same_detections(outputs, reference, n)
        assert bool((outputs[0][n, :, 2] <= SIZES[n][1]).all() and (outputs[0][n, :, 3] <= SIZES[n][0]).all())

