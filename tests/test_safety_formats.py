"""Class lists matched by name between a model and its evaluation set; labels that were silently
dropped (``a.TXT``, ``a.XML``, linked folders, two xml files for one image); named errors instead of
tracebacks (non-UTF-8 labels, init_weights, repeat_thr, MixUp alpha); Mosaic / MixUp refused in
evaluation and inference pipelines (detkit issue 25)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from detkit.api import DetectorModel
from detkit.data import CocoDataset, DatasetError, VOCDataset, YOLODataset, build_dataloader
from detkit.data.class_map import match_classes
from detkit.engine.checkpoint import load_checkpoint, save_checkpoint
from detkit.engine.evaluator import eval_classes, evaluate_model
from detkit.engine.hooks import EvalHook, build_hooks
from detkit.engine.settings import TrainSettings
from detkit.models.weights import weights_enum
from detkit.registry import ConfigError
from tests.cli_runner import run_main, tiny_shapes
from tests.test_api import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FCOS = str(ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml")
SHAPES = ["circle", "square", "triangle", "star"]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(result, code: int, *parts: str) -> str:
    """The one error line of a refused command, checked for its exit code and for ``parts``."""
    assert result.returncode == code, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    line = next(x for x in result.stderr.splitlines() if x.startswith("error:"))
    for part in parts:
        assert part in line, line
    return line


# ----------------------------------------------------------------------------- 1. class lists by name
def test_match_classes_by_name():
    m = match_classes(["cat", "dog"], ["dog", "cat"], 2)
    assert m.labels == {0: 1, 1: 0} and not m.model_only and not m.dataset_only
    m = match_classes(["a", "b", "c"], ["a", "c"], 3)  # a Roboflow valid split without b
    assert m.labels == {0: 0, 2: 1} and m.model_only == ["b"] and "only the model has [b]" in m.left_out(
        "the model", "data.val")
    m = match_classes(["dog"], ["cat", "dog"], 1)
    assert m.labels == {0: 1} and m.dataset_only == ["cat"]
    assert match_classes(["x", "y"], ["y"], 5).labels == {1: 0}  # outputs past the names: no category
    assert match_classes(None, ["a", "b"], 2).labels == {0: 0, 1: 1}  # no names: same count, same order
    with pytest.raises(ConfigError, match=r"ckpt has the classes \[cat, dog\] but data.val has \[car\]: no class"):
        match_classes(["cat", "dog"], ["car"], 2, "ckpt", "data.val")
    with pytest.raises(ConfigError, match=r"stores no class names and has 3 classes, but data.val has 2 \[a, b\]"):
        match_classes([], ["a", "b"], 3, "ckpt", "data.val")
    with pytest.raises(ConfigError, match=r"data.val lists the classes \['a'\] more than once"):
        match_classes(["a", "b"], ["a", "a"], 2, "ckpt", "data.val")


class Oracle(torch.nn.Module):
    """A detector that returns given detections, one list entry per image in loader order."""

    def __init__(self, detections: list[dict[str, torch.Tensor]], num_classes: int) -> None:
        super().__init__()
        self.detections, self.num_classes = detections, num_classes

    def predict(self, images: torch.Tensor, image_sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out, self.detections = self.detections[:len(images)], self.detections[len(images):]
        return out


def abc_dataset(tmp_path: Path) -> CocoDataset:
    """Two 32x32 images: image 1 holds an ``a`` and a ``b`` box, image 2 a ``c`` box (category ids 1..3)."""
    (tmp_path / "img").mkdir()
    for name in ("1.png", "2.png"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "img" / name)
    boxes = [(1, 1, [2, 2, 10, 10]), (1, 2, [16, 16, 12, 12]), (2, 3, [4, 8, 20, 16])]
    ann = {"images": [{"id": i, "file_name": f"{i}.png", "width": 32, "height": 32} for i in (1, 2)],
           "annotations": [{"id": k, "image_id": i, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
                           for k, (i, c, b) in enumerate(boxes, start=1)],
           "categories": [{"id": i + 1, "name": n} for i, n in enumerate("abc")]}
    (tmp_path / "val.json").write_text(json.dumps(ann))
    return CocoDataset(str(tmp_path / "val.json"), str(tmp_path / "img"))


def test_evaluation_scores_each_model_class_against_the_same_named_category(tmp_path):
    dataset = abc_dataset(tmp_path)
    loader = build_dataloader({"val": {}, "num_workers": 0}, "val", dataset=dataset)

    def det(boxes, labels):
        return {"boxes": torch.tensor(boxes, dtype=torch.float32), "scores": torch.ones(len(labels)),
                "labels": torch.tensor(labels)}

    # a model trained on [c, a] finds the a box of image 1 (its label 1) and the c box of image 2 (label 0);
    # its output 2 has no name. Matched by position, "a" would be scored as b and "c" as a: AP 0.
    model = Oracle([det([[2, 2, 12, 12]], [1]), det([[4, 8, 24, 24], [0, 0, 5, 5]], [0, 2])], num_classes=3)
    classes = eval_classes(dataset, ["c", "a"], 3, "the model")
    assert "only data.val has [b]" in classes.left_out
    metrics = evaluate_model(model, loader, torch.device("cpu"), classes=classes).metrics
    assert metrics["per_class"] == pytest.approx({"a": 1.0, "c": 1.0}) and metrics["AP"] == pytest.approx(1.0)


def test_training_evaluation_matches_train_and_val_classes_by_name(tmp_path):
    dataset = abc_dataset(tmp_path)
    loader = build_dataloader({"val": {}, "num_workers": 0}, "val", dataset=dataset)
    model = nn.Linear(1, 1)
    model.num_classes = 2
    hook = next(h for h in build_hooks({}, TrainSettings(), loader, model, ["c", "b"]) if isinstance(h, EvalHook))
    assert hook.classes.cat_of == {0: 3, 1: 2} and hook.classes.classes == ["b", "c"]
    # refused while the hooks are built: before the run writes its work dir
    with pytest.raises(ConfigError, match=r"data.train has the classes \[x, y\] but data.val has \[a, b, c\]"):
        build_hooks({}, TrainSettings(), loader, model, ["x", "y"])


@pytest.fixture(scope="module")
def shapes_ckpt(tmp_path_factory) -> tuple[Path, list[str]]:
    """An untrained small FCOS checkpoint of the four shapes, and ``--set`` for a 2-image val set."""
    tmp = tmp_path_factory.mktemp("ckpt")
    write_checkpoint(tmp / "run" / "best.pth")
    val = [s for s in tiny_shapes(tmp / "data") if s.startswith(("data.val.", "data.num_workers"))]
    return tmp / "run" / "best.pth", val


def test_eval_on_a_class_subset_scores_only_that_class(shapes_ckpt):
    ckpt, val = shapes_ckpt
    out = run_main("eval", "--checkpoint", str(ckpt), "--set", *val, "data.val.classes=[square]")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "left out: only the checkpoint" in out.stderr and "has [circle, triangle, star]" in out.stderr
    record = json.loads((ckpt.parent / "eval_best" / "metrics.jsonl").read_text().splitlines()[-1])
    assert list(record["per_class"]) == ["square"]


def test_eval_refuses_classes_without_a_common_name(shapes_ckpt, tmp_path):
    ckpt, val = shapes_ckpt
    save_checkpoint({**load_checkpoint(ckpt), "classes": ["w", "x", "y", "z"]}, tmp_path / "other.pth")
    before = snapshot(tmp_path)
    refused(run_main("eval", "--checkpoint", str(tmp_path / "other.pth"), "--set", *val, "data.val.classes=[square]"),
            2, f"the checkpoint {tmp_path / 'other.pth'} has the classes [w, x, y, z] but data.val has [square]: no "
               f"class name in common")
    assert snapshot(tmp_path) == before  # no eval_other/ folder


# ----------------------------------------------------------------------------- 2. labels silently dropped
def png(path: Path, w: int = 40, h: int = 30) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(path)


def test_yolo_reads_upper_case_txt_and_linked_folders(tmp_path):
    shared = tmp_path / "shared"
    png(tmp_path / "images/a.png")
    png(shared / "images/b.png")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels/a.TXT").write_text("0 0.5 0.5 0.5 0.5\n")
    (shared / "labels").mkdir()
    (shared / "labels/b.txt").write_text("1 0.5 0.5 0.2 0.2\n")
    os.symlink(shared / "images", tmp_path / "images/linked")
    os.symlink(shared / "labels", tmp_path / "labels/linked")
    os.symlink(tmp_path / "images", shared / "images/loop")  # a link loop ends
    ds = YOLODataset(str(tmp_path), img_dir="images", label_dir="labels", names=["x", "y"])
    files = {ds.coco.imgs[i]["file_name"]: [a["category_id"] for a in ds.coco.imgToAnns[i]] for i in ds.ids}
    assert files == {"a.png": [1], "linked/b.png": [2]}


def test_yolo_refuses_two_label_files_for_one_image(tmp_path):
    png(tmp_path / "images/a.png")
    (tmp_path / "labels").mkdir()
    for name in ("a.txt", "a.TXT"):
        (tmp_path / "labels" / name).write_text("0 0.5 0.5 0.5 0.5\n")
    with pytest.raises(DatasetError, match=r"a\.TXT and .*a\.txt both label the image a\.\*"):
        YOLODataset(str(tmp_path), img_dir="images", label_dir="labels", names=["x"])


def voc_folder(root: Path, xmls: dict[str, str]) -> None:
    png(root / "JPEGImages/a.png")
    png(root / "JPEGImages/b.png")
    (root / "Annotations").mkdir()
    for name, file_name in xmls.items():
        (root / "Annotations" / name).write_text(
            f"<annotation><filename>{file_name}</filename><size><width>40</width><height>30</height></size>"
            f"<object><name>x</name><bndbox><xmin>2</xmin><ymin>2</ymin><xmax>20</xmax><ymax>20</ymax></bndbox>"
            f"</object></annotation>")


def test_voc_reads_upper_case_xml(tmp_path):
    voc_folder(tmp_path, {"a.XML": "a.png", "b.xml": "b.png"})
    (tmp_path / "split.txt").write_text("a\nb\n")
    for split in (None, "split.txt"):
        ds = VOCDataset(str(tmp_path), split_file=split)
        assert sorted(ds.coco.imgs[i]["file_name"] for i in ds.ids) == ["a.png", "b.png"]


def test_voc_refuses_two_xml_files_naming_one_image(tmp_path):
    voc_folder(tmp_path, {"a.xml": "a.png", "b.xml": "a.png"})
    with pytest.raises(DatasetError, match=r"a\.xml and .*b\.xml both name the image 'a\.png' in <filename>"):
        VOCDataset(str(tmp_path))


# ----------------------------------------------------------------------------- 3. named errors, not tracebacks
def test_yolo_label_errors_name_file_line_and_value(tmp_path):
    png(tmp_path / "images/a.png")
    (tmp_path / "labels").mkdir()
    label = tmp_path / "labels/a.txt"
    label.write_bytes(b"0 0.5 0.5 0.5 0.5\n0 0.5 \xff 0.5 0.5\n")
    with pytest.raises(DatasetError, match=r"a\.txt line 2: byte 0xff at column 7 is not UTF-8"):
        YOLODataset(str(tmp_path), img_dir="images", label_dir="labels", names=["x"])
    label.write_text("0 " + " ".join(["0.5"] * 500) + " oops 0.5\n")  # a long polygon line with a typo
    with pytest.raises(DatasetError, match=r"line 1: value 502 \('oops'\) is not a number") as err:
        YOLODataset(str(tmp_path), img_dir="images", label_dir="labels", names=["x"])
    assert len(str(err.value)) < 300
    label.write_bytes(b"\xef\xbb\xbf0 0.5 0.5 0.5 0.5\n")  # a UTF-8 byte-order mark (Windows editors): legal
    ds = YOLODataset(str(tmp_path), img_dir="images", label_dir="labels", names=["x"])
    assert len(ds.coco.anns) == 1


@pytest.mark.parametrize("override, message", [
    ("model.backbone.init_weights=torchvision:",
     "model.backbone.init_weights must be null, 'torchvision:ResNet18_Weights.<NAME>', 'torchvision:DEFAULT' or"),
    ("model.backbone.init_weights=true", "model.backbone.init_weights must be null"),
    ("model.backbone.init_weights=1", "got 1"),
    ("data.sampler={type: RepeatFactorSampler, repeat_thr: .inf}", "sampler.repeat_thr must be at most 1, got inf"),
    ("data.sampler={type: RepeatFactorSampler, repeat_thr: 1e300}", "repeat_thr must be at most 1, got 1e+300"),
    ("data.train.transforms=[{type: MixUp, alpha: .inf}]", "data.train.transforms.0.alpha must be a number in [0.01"),
    ("data.val.transforms=[{type: RandomHorizontalFlip}, {type: Mosaic, size: 64}]",
     "data.val.transforms.1: Mosaic mixes training images; evaluation and inference see one image at a time"),
], ids=["init-dict", "init-true", "init-1", "repeat-inf", "repeat-1e300", "mixup-inf", "mosaic-in-val"])
def test_bad_settings_are_named_before_anything_is_written(shapes_ckpt, tmp_path, override, message):
    data = shapes_ckpt[0].parents[1] / "data"  # the module's shapes images, already generated
    refused(run_main("train", "--config", FCOS, "--work-dir", str(tmp_path / "w"), "--set", *tiny_shapes(data),
                     override), 2, message)
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------- 4. mixing transforms at inference
def test_the_inference_pipeline_refuses_mixup():
    cfg = {"data": {"val": {"transforms": [{"type": "MixUp"}]}}}  # accepted before: predict raised a RuntimeError
    with pytest.raises(ConfigError, match=r"data\.val\.transforms\.0: MixUp mixes training images"):
        DetectorModel(torch.nn.Identity(), cfg, ["a"], torch.device("cpu"))


# ----------------------------------------------------------------------------- 5. messages
def test_weights_names_are_listed_once():
    with pytest.raises(ConfigError) as err:
        weights_enum("FCOS_ResNet50_FPN_Weights.COCO_V2", "load_from")
    assert str(err.value).endswith("it has COCO_V1, DEFAULT")


def test_eval_tool_report_covers_only_the_classes_the_evaluation_scored(shapes_ckpt, tmp_path):
    """``tools/eval.py``'s report (per-class AP, PR curves) uses the same class match as the metrics:
    a checkpoint of [square, circle, x, y] on the four-shape val set reports circle and square only
    (before, its per_class_ap.json listed triangle and star, which the evaluation had left out)."""
    from detkit.cli import main

    ckpt, val = shapes_ckpt
    state = load_checkpoint(ckpt)
    save_checkpoint({**state, "classes": ["square", "circle", "x", "y"]}, tmp_path / "renamed.pth")
    assert main(["eval", "--checkpoint", str(tmp_path / "renamed.pth"), "--set", *val]) == 0
    table = json.loads((tmp_path / "eval_renamed" / "per_class_ap.json").read_text())
    assert sorted(row["class"] for row in table["classes"]) == ["circle", "square"]
