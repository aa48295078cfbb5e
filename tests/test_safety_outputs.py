"""Outputs never replace inputs, failed writes leave existing files as they were (export, convert, eval
--show-dir, analyze curves), and predict's arguments are checked first: one named message each."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import write_png

import detkit.api
import detkit.export
from detkit.api import DetectorModel, load_detector
from detkit.cli import main
from detkit.config import load_config
from detkit.data import build_dataset
from detkit.engine.checkpoint import save_checkpoint
from detkit.models import build_detector
from tests.cli_runner import run_main, tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def captured(func, argv: list[str]) -> tuple[int, str]:
    """``func(argv)`` -> (exit code, stderr), stdout dropped."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = func(argv)
    return code, err.getvalue()


def assert_one_message(err: str, *parts: str) -> None:
    assert "Traceback" not in err and err.count("error:") == 1, err
    for part in parts:
        assert part in err, (part, err)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """An untrained tiny FCOS checkpoint whose config evaluates on 2 generated 64-pixel shapes images."""
    root = tmp_path_factory.mktemp("ckpt")
    cfg = load_config(FCOS_CFG, tiny_shapes(root / "data"))
    torch.manual_seed(0)
    save_checkpoint({"model": build_detector(cfg["model"]).state_dict(), "config": cfg,
                     "classes": ["circle", "square", "triangle", "star"]}, root / "work" / "m.pth")
    return root / "work" / "m.pth"


@pytest.fixture(scope="module")
def detector(checkpoint: Path) -> DetectorModel:
    return load_detector(checkpoint, "cpu")


# 1. export


def export(checkpoint: Path, out: Path | str) -> tuple[int, str]:
    result = run_main("export", "--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out))
    return result.returncode, result.stderr


def test_export_refuses_the_checkpoint_and_a_folder_as_out(checkpoint):
    before = snapshot(checkpoint.parent)
    for out in (checkpoint, checkpoint.parent / ".." / checkpoint.parent.name / checkpoint.name):
        code, err = export(checkpoint, out)
        assert code == 2
        assert_one_message(err, f"--out {out} is the checkpoint being exported", "give another file")
    code, err = export(checkpoint, checkpoint.parent)
    assert code == 2
    assert_one_message(err, f"--out {checkpoint.parent} is a folder; give a file path such as "
                            f"{checkpoint.parent / 'm.pt'}")
    assert snapshot(checkpoint.parent) == before


def test_a_failed_export_leaves_the_existing_out_as_it_was(checkpoint, detector, tmp_path, monkeypatch):
    out = tmp_path / "m.pt"
    out.write_bytes(b"the previous export")
    monkeypatch.setattr(detkit.api, "load_detector", lambda *args, **kwargs: detector)  # loaded once per module
    slots = load_config(FCOS_CFG)["model"]["head"]["max_per_img"]  # the exported outputs' fixed size

    def partial_then_fail(detector, path, options):
        Path(path).write_bytes(b"half a file")
        raise RuntimeError("the tracer gave up\nwith a long story")

    def far_off(images, image_sizes):  # an exported file whose boxes are nowhere near PyTorch's
        batch = len(images)
        return torch.full((batch, slots, 4), 1e4), torch.full((batch, slots), 0.9), torch.zeros(batch, slots).long()

    torchscript = detkit.export.FORMATS["torchscript"]
    monkeypatch.setitem(detkit.export.FORMATS, "torchscript", replace(torchscript, export=partial_then_fail))
    code, err = export(checkpoint, out)
    assert code == 1
    assert_one_message(err, "to torchscript failed (RuntimeError: the tracer gave up)",
                       f"{out} not written (the existing file is unchanged)")
    assert snapshot(tmp_path) == {"m.pt": b"the previous export"}  # no temp file left

    monkeypatch.setitem(detkit.export.FORMATS, "torchscript", replace(
        torchscript, export=lambda detector, path, options: Path(path).write_bytes(b"new"), load=lambda path: far_off))
    code, err = export(checkpoint, out)
    assert code == 1
    assert_one_message(err, "the exported file differs from PyTorch beyond float rounding", "extra",
                       f"{out} not written")
    assert snapshot(tmp_path) == {"m.pt": b"the previous export"}


# 2. convert


def convert_tool():
    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools/convert.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def label_sets(tmp_path: Path) -> Path:
    """One image with one box in the YOLO layout (``yolo/``) and in the VOC layout (``voc/``)."""
    for folder in ("yolo/images/train", "yolo/labels/train", "voc/Annotations", "voc/JPEGImages", "voc/ImageSets"):
        (tmp_path / folder).mkdir(parents=True)
    image = torch.zeros(3, 16, 16, dtype=torch.uint8)
    write_png(image, str(tmp_path / "yolo/images/train/a.png"))
    write_png(image, str(tmp_path / "voc/JPEGImages/a.png"))
    (tmp_path / "yolo/labels/train/a.txt").write_text("0 0.5 0.5 0.25 0.25\n")
    (tmp_path / "yolo/data.yaml").write_text("names: [cell]\n")
    (tmp_path / "voc/Annotations/a.xml").write_text(
        "<annotation><filename>a.png</filename><size><width>16</width><height>16</height></size><object>"
        "<name>cell</name><bndbox><xmin>5</xmin><ymin>5</ymin><xmax>10</xmax><ymax>10</ymax></bndbox></object>"
        "</annotation>")
    (tmp_path / "voc/ImageSets/val.txt").write_text("a\n")
    return tmp_path


@pytest.mark.parametrize("fmt, out, message", [
    ("yolo", "yolo/labels/train/a.txt", "is inside the YOLO label folder"),
    ("yolo", "yolo/labels/train/val.json", "is inside the YOLO label folder"),
    ("yolo", "yolo/data.yaml", "is the input file"),
    ("yolo", "yolo/images/train/a.png", "is one of the input images"),
    ("yolo", "yolo", "is a folder; give a file path such as"),
    ("voc", "voc/Annotations/val.json", "is inside the VOC annotation folder"),
    ("voc", "voc/ImageSets/val.txt", "is the input file"),
])
def test_convert_never_writes_over_or_among_its_inputs(label_sets, fmt, out, message):
    before = snapshot(label_sets)
    extra = ["--names", "data.yaml"] if fmt == "yolo" else ["--split-file", "ImageSets/val.txt", "--img-dir",
                                                            "JPEGImages"]
    code, err = captured(convert_tool(), [fmt, "--data-root", str(label_sets / fmt), *extra,
                                          "--out", str(label_sets / out)])
    assert code == 2
    assert_one_message(err, f"--out {label_sets / out}", message)
    assert snapshot(label_sets) == before


def test_convert_replaces_its_json_atomically(label_sets):
    out = label_sets / "coco" / "val.json"
    out.parent.mkdir()
    out.write_text("old")
    assert captured(convert_tool(), ["yolo", "--data-root", str(label_sets / "yolo"), "--out", str(out)])[0] == 0
    assert '"file_name": "a.png"' in out.read_text() and [p.name for p in out.parent.iterdir()] == ["val.json"]


# 3. eval --show-dir


def test_eval_show_dir_is_checked_before_the_evaluation(checkpoint, tmp_path):
    image_dir = build_dataset(load_config(FCOS_CFG, tiny_shapes(checkpoint.parents[1] / "data"))["data"]["val"],
                              "data.val").img_dir
    afile = tmp_path / "drawings"
    afile.write_text("not a folder")
    before = snapshot(checkpoint.parents[1])
    for show_dir, message in [(image_dir, "is inside the dataset's image folder"),
                              (image_dir / "show", "is inside the dataset's image folder"),
                              (afile, f"{afile} is a file; give a folder"),
                              (afile / "sub", f"{afile} is a file; give a folder")]:
        code, err = captured(main, ["eval", "--checkpoint", str(checkpoint), "--device", "cpu", "--show-dir",
                                         str(show_dir)])
        assert code == 2
        assert_one_message(err, f"--show-dir {show_dir}", message)
    assert snapshot(checkpoint.parents[1]) == before  # no evaluation ran: no eval_m/ folder
    assert afile.read_text() == "not a folder"


# 4. analyze curves --out


def test_curves_out_must_be_a_picture_outside_the_runs_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"type": "train", "iter": 1, "epoch": 1, "total": 1.0, "lr": 0.1}\n')
    (run / "results.png").write_bytes(b"the run's own curves")
    before = snapshot(tmp_path)
    for out, message in [(run / "x.jsonl", ".jsonl is not a picture format; give a .png, .pdf, .svg, .jpg, .jpeg"),
                         (run / "metrics.jsonl", ".jsonl is not a picture format"),
                         (tmp_path / "curves", "no suffix is not a picture format"),
                         (run / "results.png", f"is a file of the run {run}")]:
        code, err = captured(main, ["analyze", "curves", str(run), "--out", str(out)])
        assert code == 2
        assert_one_message(err, f"--out {out}", message)
    assert snapshot(tmp_path) == before


# 5. predict's arguments


@pytest.mark.parametrize("kwargs, image, error, message", [
    ({"batch_size": -1}, None, ValueError, "batch_size must be an integer >= 1, got -1"),
    ({"batch_size": 0}, None, ValueError, "batch_size must be an integer >= 1, got 0"),
    ({"batch_size": 2.0}, None, ValueError, "batch_size must be an integer >= 1, got 2.0"),
    ({"score_thr": "0.5"}, None, ValueError, "score_thr must lie in [0, 1] (a number), got '0.5'"),
    ({"score_thr": 1.5}, None, ValueError, "score_thr must lie in [0, 1] (a number), got 1.5"),
    ({}, np.zeros((0, 0, 3), np.uint8), ValueError, "an image of 0x0 pixels has nothing to detect"),
    ({}, torch.zeros(3, 8, 0, dtype=torch.uint8), ValueError, "an image of 8x0 pixels"),
    ({}, "folder", IsADirectoryError, "is a folder; predict takes image files"),
])
def test_predict_checks_its_arguments_first(detector, tmp_path, monkeypatch, kwargs, image, error, message):
    monkeypatch.setattr(detector, "model", None)  # any work past the checks would fail on this
    if isinstance(image, str):
        image = tmp_path
    elif image is None:
        image = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(error, match=re.escape(message)):
        detector.predict(image, **kwargs)
