"""The export parity check: detections compared as sets, near-ties at a score cut tolerated, real divergences
(a box moved, a class changed) refused with the numbers, nothing compared never a pass, ``--out`` untouched."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from detkit.api import load_detector
from detkit.config import load_config
from detkit.deploy.parity import ParityError, check_images, check_parity, match_image
from detkit.engine.checkpoint import load_checkpoint, save_checkpoint
from detkit.export import FORMATS, ExportFormat, ExportWrapper, export_checkpoint
from detkit.models import build_detector
from tests.cli_runner import run_main, tiny_shapes
from tests.test_export import spread_head_scores

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"


def dets(boxes: list, scores: list, labels: list) -> dict[str, torch.Tensor]:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels, dtype=torch.int64)}


A, B, C = [10.0, 10, 50, 50], [60.0, 20, 90, 70], [5.0, 60, 30, 90]


def test_reordered_ties_and_detections_at_a_cut_match():
    ref = dets([A, B, C], [0.9, 0.5, 0.5], [0, 1, 2])
    got = dets([C, B, A], [0.5, 0.5000004, 0.9], [2, 1, 0])  # a tie in another order
    pairs, excused, problems = match_image(ref, got, score_thr=0.05, k=100)
    assert len(pairs) == 3 and max(pairs) == (0.0, pytest.approx(4e-7, abs=1e-7)) and (excused, problems) == (0, [])
    # one side keeps a detection at the threshold, the other drops it; at the top-k cut (k = 2) one side
    # ranks C second, the other B (their scores tie within 1e-3)
    assert match_image(dets([A, B], [0.9, 0.0503], [0, 1]), dets([A], [0.9], [0]), 0.05, 100)[1:] == (1, [])
    assert match_image(dets([A, B], [0.9, 0.5], [0, 1]), dets([A, C], [0.9, 0.4996], [0, 2]), 0.05, 2)[1:] == (2, [])


def test_real_divergences_are_named_with_their_numbers():
    ref = dets([A, B, C], [0.9, 0.8, 0.7], [0, 1, 2])
    moved = dets([[20.0, 10, 60, 50], B, C], [0.9, 0.8, 0.7], [0, 1, 2])
    assert match_image(ref, moved, 0.05, 100)[2] == ["class 0 score 0.900: box moved 10.0 px, score 0.900"]
    swapped = dets([A, B, C], [0.9, 0.8, 0.7], [0, 2, 1])
    assert match_image(ref, swapped, 0.05, 100)[2] == ["class 1 score 0.800: became class 2, box moved 0.0 px, "
                                                       "score 0.800", "class 2 score 0.700: became class 1, box "
                                                       "moved 0.0 px, score 0.700"]
    assert match_image(ref, dets([A, B], [0.9, 0.8], [0, 1]), 0.05, 100)[2] == ["class 2 score 0.700: missing"]
    assert match_image(dets([A], [0.9], [0]), ref, 0.05, 3)[2] == ["class 1 score 0.800: extra",
                                                                    "class 2 score 0.700: extra"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny FCOS whose head weights spread the scores: detections above score_thr on the check images."""
    root = tmp_path_factory.mktemp("parity")
    cfg = load_config(FCOS_CFG, tiny_shapes(root / "data"))
    torch.manual_seed(0)
    model = spread_head_scores(build_detector(cfg["model"]))
    save_checkpoint({"model": model.state_dict(), "config": cfg, "classes": ["a", "b", "c", "d"]}, root / "m.pth")
    return root / "m.pth"


class Broken(ExportWrapper):
    """A deliberately wrong graph: boxes 10 px to the right, classes 0 and 1 swapped."""

    def forward(self, images: torch.Tensor, image_sizes: torch.Tensor):
        boxes, scores, labels = super().forward(images, image_sizes)
        swapped = torch.where(labels == 0, 1, torch.where(labels == 1, 0, labels))
        return boxes + torch.tensor([10.0, 0, 10, 0]), scores, swapped


def eager(wrapper: type[ExportWrapper]) -> ExportFormat:
    """A format whose "file" runs ``wrapper`` eagerly (no tracing: a test pays for the check only)."""
    graphs: dict[Path, ExportWrapper] = {}

    def export(detector, path, options):
        Path(path).write_bytes(b"new")
        graphs[Path(path)] = wrapper(detector, options.size_divisor)

    return replace(FORMATS["torchscript"], export=export, load=lambda path: graphs[Path(path)])


@pytest.mark.slow
def test_the_check_refuses_a_broken_graph_and_leaves_out_as_it_was(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "m.pt"
    out.write_bytes(b"the previous export")
    monkeypatch.setitem(FORMATS, "torchscript", eager(Broken))
    result = run_main("export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1, result.stderr
    assert "the exported file differs from PyTorch beyond float rounding" in result.stderr
    assert "box moved 10.0 px" in result.stderr and "became class" in result.stderr
    assert f"{out} not written (the existing file is unchanged)" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"] and out.read_bytes() == b"the previous export"


@pytest.mark.slow
def test_a_passing_export_says_what_it_compared_without_warnings(checkpoint, tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run_main("export", "--checkpoint", str(checkpoint), "--format", "onnx", "--legacy-exporter",
                          "--out", str(tmp_path / "m.onnx"))
    assert result.returncode == 0, result.stderr
    assert [str(w.message) for w in caught] == []  # the exporter's and tracer's notices are filtered
    line = result.stdout.strip()
    assert line.startswith(f"wrote {tmp_path / 'm.onnx'} (") and "MiB); checked against PyTorch on 4 images (128x128, " \
        "100x130, 90x110, 70x83; the last 3 also as one zero-padded batch): " in line
    assert int(line.split(" detections matched")[0].rsplit(" ", 1)[1]) > 0 and "max box difference" in line
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no temporary file left


@pytest.mark.slow
def test_nothing_compared_is_retried_at_threshold_0_and_never_a_pass(checkpoint, tmp_path, monkeypatch):
    model = load_detector(checkpoint, "cpu")
    model.model.head.score_thr = 1.0  # nothing scores above: PyTorch and any file detect nothing
    with pytest.raises(ParityError, match="the check compared no detection: neither PyTorch nor the file detects "
                                          "anything above score_thr 1 on 2 images"):
        check_parity(model, ExportWrapper(model.model), images=check_images()[2:])  # eager: stands for a file
    state = load_checkpoint(checkpoint)
    state["config"]["model"]["head"]["score_thr"] = 1.0
    save_checkpoint(state, tmp_path / "never.pth")
    monkeypatch.setitem(FORMATS, "torchscript", eager(ExportWrapper))
    report = export_checkpoint(tmp_path / "never.pth", "torchscript", tmp_path / "never.pt")
    assert report.lowered_thr == 0.0 and report.matched > 0  # the file keeps score_thr 1; a copy at 0 was checked
    assert "nothing scores above the model's score_thr 1 on these images, so they were compared on a copy " \
           "exported at score_thr 0" in report.summary()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["never.pt", "never.pth"]  # the copy's folder is gone
