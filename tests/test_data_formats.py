"""Pascal VOC xml and YOLO txt datasets against the same data written as COCO json; the class and
subset options of all three; named errors for bad files; tools/convert.py; train + eval from YAML."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
from pathlib import Path

import pytest
import torch
from pycocotools.cocoeval import COCOeval
from torchvision.io import encode_jpeg, write_file, write_png

from detkit.data import CocoDataset, DatasetError, VOCDataset, YOLODataset
from detkit.registry import ConfigError
from tests.cli_runner import run_main

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["bird", "cat", "dog"]
# (image stem, width, height, [(class, (x1, y1, x2, y2) 0-based pixels, difficult)])
TRUTH = [("a", 64, 48, [("dog", (4, 6, 24, 16), False), ("cat", (30, 20, 40, 28), False)]),
         ("b", 40, 40, [("bird", (1, 2, 5, 6), False), ("cat", (0, 0, 40, 40), True)]),
         ("c", 32, 32, []),
         ("d", 48, 32, [("cat", (0, 0, 48, 32), False), ("dog", (10, 4, 20, 30), False)])]


def pixels(i: int, w: int, h: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))


def write_coco_json(path: Path, suffix: str, with_difficult: bool) -> Path:
    """The reference: TRUTH as a COCO json, difficult objects as crowd boxes (or left out)."""
    images, anns = [], []
    for i, (stem, w, h, objects) in enumerate(TRUTH, start=1):
        images.append({"id": i, "file_name": f"{stem}{suffix}", "width": w, "height": h})
        for name, (x1, y1, x2, y2), difficult in objects:
            if difficult and not with_difficult:
                continue
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": CLASSES.index(name) + 1,
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": int(difficult)})
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]}))
    return path


def voc_xml(stem: str, w: int, h: int, objects: list) -> str:
    """VOC's 1-based inclusive pixel indices: xmin = x1 + 1, xmax = x2."""
    objs = "".join(f"<object><name>{n}</name><difficult>{int(d)}</difficult><bndbox><xmin>{x1 + 1}</xmin>"
                   f"<ymin>{y1 + 1}</ymin><xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>"
                   for n, (x1, y1, x2, y2), d in objects)
    return (f"<annotation><filename>{stem}.jpg</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>3</depth></size>{objs}</annotation>")


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """TRUTH in the VOC layout (jpg images), plus the COCO json of the same data."""
    root = tmp_path / "voc"
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True)
    for i, (stem, w, h, objects) in enumerate(TRUTH):
        write_file(str(root / f"JPEGImages/{stem}.jpg"), encode_jpeg(pixels(i, w, h)))
        (root / f"Annotations/{stem}.xml").write_text(voc_xml(stem, w, h, objects))
    (root / "ImageSets/Main/train.txt").write_text("a\nb\nc\nd\n")
    write_coco_json(root / "coco.json", ".jpg", with_difficult=True)
    return root


@pytest.fixture
def yolo(tmp_path: Path) -> Path:
    """TRUTH without its difficult object in the Ultralytics layout (png images, c.png with no txt),
    a data.yaml with an {id: name} dict, and the COCO json of the same data."""
    root = tmp_path / "yolo"
    (root / "images/train").mkdir(parents=True)
    (root / "labels/train").mkdir(parents=True)
    for i, (stem, w, h, objects) in enumerate(TRUTH):
        write_png(pixels(i, w, h), str(root / f"images/train/{stem}.png"))
        lines = [f"{CLASSES.index(n)} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} "
                 f"{(y2 - y1) / h:.6f}" for n, (x1, y1, x2, y2), d in objects if not d]
        if stem != "c":
            (root / f"labels/train/{stem}.txt").write_text("\n".join(lines) + "\n")
    (root / "labels/train/classes.txt").write_text("\n".join(CLASSES))  # what labelImg writes: not a label file
    (root / "data.yaml").write_text("nc: 3\nnames: {0: bird, 1: cat, 2: dog}\n")
    write_coco_json(root / "coco.json", ".png", with_difficult=False)
    return root


def gt(ds: CocoDataset) -> list[tuple]:
    """The pycocotools ground truth by file and class name: (file, class, bbox, iscrowd)."""
    return sorted((ds.coco.imgs[a["image_id"]]["file_name"], ds.coco.cats[a["category_id"]]["name"],
                   tuple(round(v, 4) for v in a["bbox"]), a["iscrowd"]) for a in ds.coco.dataset["annotations"])


def coco_ap(coco_gt, results: list[dict], cat_ids: list[int]) -> float:
    """pycocotools' AP (IoU .5:.95) of ``results`` on the categories ``cat_ids``."""
    ev = COCOeval(coco_gt, coco_gt.loadRes(results), iouType="bbox")
    ev.params.catIds = cat_ids
    with contextlib.redirect_stdout(io.StringIO()):
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def assert_same(ds: CocoDataset, ref: CocoDataset) -> None:
    """Same classes, images, training targets and pycocotools ground truth."""
    assert ds.classes == ref.classes and len(ds) == len(ref) and gt(ds) == gt(ref)
    assert [ds.coco.imgs[i] for i in ds.ids] == [ref.coco.imgs[i] for i in ref.ids]
    for k in range(len(ds)):
        (image, target), (ref_image, ref_target) = ds[k], ref[k]
        assert torch.equal(image, ref_image)
        torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                                   ref_target["boxes"].as_subclass(torch.Tensor), atol=1e-4, rtol=0)
        assert target["labels"].tolist() == ref_target["labels"].tolist()
        assert (target["image_id"], target["orig_size"]) == (ref_target["image_id"], ref_target["orig_size"])


def test_voc_equals_the_same_data_in_coco_and_ignores_difficult(voc):
    ds = VOCDataset(str(voc), split_file="ImageSets/Main/train.txt")
    assert_same(ds, CocoDataset("coco.json", "JPEGImages", data_root=str(voc)))
    assert ds.classes == CLASSES and ds.cat_ids == [1, 2, 3]
    assert ds[1][1]["labels"].tolist() == [0]  # image b: the difficult cat is no training target
    torch.testing.assert_close(ds[0][1]["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[4.0, 6.0, 24.0, 16.0], [30.0, 20.0, 40.0, 28.0]]))
    # pycocotools ignores it: neither a miss when undetected nor a false positive when detected
    dets = [{"image_id": ds.coco.getImgIds()[i], "category_id": CLASSES.index(n) + 1, "score": 0.9,
             "bbox": [x1, y1, x2 - x1, y2 - y1]} for i, (_, _, _, objs) in enumerate(TRUTH)
            for n, (x1, y1, x2, y2), d in objs if not d]
    on_difficult = {"image_id": 2, "category_id": 2, "score": 0.95, "bbox": [0, 0, 40, 40]}
    for results in (dets, [*dets, on_difficult]):
        assert [coco_ap(ds.coco, results, [c]) for c in (1, 2, 3)] == pytest.approx([1.0] * 3)
    # the same detection without the difficult mark in the ground truth is a false positive
    plain = CocoDataset(str(write_coco_json(voc / "plain.json", ".jpg", with_difficult=False)), str(voc / "JPEGImages"))
    assert coco_ap(plain.coco, [*dets, on_difficult], [2]) < 0.9


def test_yolo_equals_the_same_data_in_coco(yolo):
    ds = YOLODataset(str(yolo), names="data.yaml")
    assert_same(ds, CocoDataset("coco.json", "images/train", data_root=str(yolo)))
    assert len(ds[2][1]["boxes"]) == 0  # c.png has no txt
    (yolo / "labels/train/c.txt").write_text("")  # an empty txt: no boxes either
    (yolo / "labels/train/a.txt").write_text("1 0.1 0.2 0.5 0.25 0.3 0.5\n")  # an Ultralytics polygon
    ds = YOLODataset(str(yolo), names=CLASSES, classes=["cat"])
    torch.testing.assert_close(ds[0][1]["boxes"].as_subclass(torch.Tensor), torch.tensor([[6.4, 9.6, 32.0, 24.0]]))
    assert len(ds[2][1]["boxes"]) == 0 and ds.classes == ["cat"]


def test_convert_tool_writes_the_same_coco_json(voc, yolo, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("convert_tool", ROOT / "tools/convert.py")
    convert = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(convert)
    assert convert.main(["voc", "--data-root", str(voc), "--out", str(tmp_path / "voc.json")]) == 0
    assert "4 images, 6 boxes (1 ignored)" in capsys.readouterr().out
    assert_same(CocoDataset(str(tmp_path / "voc.json"), str(voc / "JPEGImages")), VOCDataset(str(voc)))
    assert convert.main(["yolo", "--data-root", str(yolo), "--names", *CLASSES, "--classes", "dog", "bird",
                         "--out", str(tmp_path / "yolo.json")]) == 0
    assert_same(CocoDataset(str(tmp_path / "yolo.json"), str(yolo / "images/train")),
                YOLODataset(str(yolo), classes=["dog", "bird"]))
    assert convert.main(["yolo", "--data-root", str(yolo), "--classes", "dgo", "--out", str(tmp_path / "x.json")]) == 2
    assert "unknown class 'dgo'" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_classes_keep_a_subset_in_the_given_order(voc, yolo):
    datasets = [CocoDataset("coco.json", "JPEGImages", data_root=str(voc), classes=["dog", "bird"]),
                VOCDataset(str(voc), classes=["dog", "bird"]), YOLODataset(str(yolo), classes=["dog", "bird"])]
    for ds in datasets:
        assert ds.classes == ["dog", "bird"] and ds.cat_ids == [1, 2] and len(ds) == 4
        assert [ds[k][1]["labels"].tolist() for k in range(4)] == [[0], [1], [], [0]]
        assert {a["category_id"] for a in ds.coco.dataset["annotations"]} == {1, 2}  # cat boxes are gone
    assert_same(datasets[1], datasets[0])
    # a class that the split lacks but another xml of the folder has is known
    (voc / "ImageSets/Main/val.txt").write_text("c\n")
    assert VOCDataset(str(voc), "ImageSets/Main/val.txt", classes=["cat"]).classes == ["cat"]
    for build in (lambda c: CocoDataset("coco.json", "JPEGImages", data_root=str(voc), classes=c),
                  lambda c: VOCDataset(str(voc), "ImageSets/Main/val.txt", classes=c),
                  lambda c: YOLODataset(str(yolo), classes=c)):
        with pytest.raises(ConfigError, match=r"unknown class 'dgo' .*Did you mean 'dog'\? Known classes: bird, cat, dog"):
            build(["dog", "dgo"])
        with pytest.raises(ConfigError, match=r"classes lists \['dog'\] more than once"):
            build(["dog", "dog"])
    data = json.loads((voc / "coco.json").read_text())
    data["annotations"][0]["category_id"] = 99  # stays an error: renumbering must not make it valid
    (voc / "coco.json").write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotation id 1 has category_id 99, which is not in 'categories'"):
        CocoDataset("coco.json", "JPEGImages", data_root=str(voc), classes=["dog", "bird"])


def test_max_images_is_the_smallest_file_name_hashes(voc):
    def rank(name: str) -> str:  # the documented rule, computed independently
        return hashlib.sha1(name.encode()).hexdigest()

    names = sorted(f"{stem}.jpg" for stem, *_ in TRUTH)
    for n in (1, 2, 3):
        expected = sorted(sorted(names, key=rank)[:n])
        for ds in (VOCDataset(str(voc), max_images=n), CocoDataset("coco.json", "JPEGImages", data_root=str(voc),
                                                                     max_images=n)):
            assert sorted(ds.coco.imgs[i]["file_name"] for i in ds.ids) == expected
    assert len(VOCDataset(str(voc), max_images=10)) == 4
    filtered = VOCDataset(str(voc), filter_empty=True, max_images=3)  # taken after filter_empty
    assert len(filtered) == 3 and "c.jpg" not in [filtered.coco.imgs[i]["file_name"] for i in filtered.ids]
    with pytest.raises(ConfigError, match="max_images must be an integer >= 1, got 0"):
        VOCDataset(str(voc), max_images=0)


def _set(path: Path, old: str, new: str) -> None:
    path.write_text(path.read_text().replace(old, new))


@pytest.mark.parametrize("damage, error, match", [
    (lambda r: (r / "Annotations/b.xml").unlink(), FileNotFoundError, r"train\.txt line 2 lists 'b', but .*b\.xml"),
    (lambda r: _set(r / "Annotations/a.xml", "</annotation>", ""), DatasetError, r"a\.xml: not valid XML"),
    (lambda r: _set(r / "Annotations/d.xml", "<xmax>48</xmax>", "<xmax>60</xmax>"), DatasetError,
     r"d\.xml: object 0 \('cat'\): box \(0, 0, 60, 32\) .* outside the 48x32 image"),
    (lambda r: _set(r / "Annotations/a.xml", "<xmin>5</xmin>", "<xmin>x</xmin>"), DatasetError,
     r"a\.xml: object 0 \('dog'\): <bndbox> needs numeric"),
    (lambda r: _set(r / "Annotations/a.xml", "<width>64</width>", ""), DatasetError,
     r"a\.xml: <size><width> must be a positive number"),
], ids=["missing-xml", "malformed-xml", "box-outside", "bad-number", "no-size"])
def test_bad_voc_files_are_named(voc, damage, error, match):
    damage(voc)
    with pytest.raises(error, match=match):
        VOCDataset(str(voc), split_file="ImageSets/Main/train.txt")


def test_an_image_of_another_size_than_its_xml_names_the_xml(voc):
    _set(voc / "Annotations/a.xml", "<width>64</width>", "<width>60</width>")
    with pytest.raises(DatasetError, match=r"a\.jpg is 64x48 \(upright by its EXIF orientation\) but .*Annotations/a\.xml says 60x48"):
        VOCDataset(str(voc))[0]


@pytest.mark.parametrize("damage, error, match", [
    (lambda r: (r / "labels/train/a.txt").write_text("3 0.5 0.5 0.1 0.1\n"), DatasetError,
     r"a\.txt line 1: class id 3 is out of range: there are 3 classes \(ids 0\.\.2\)"),
    (lambda r: (r / "labels/train/a.txt").write_text("0 0.5 0.5 0.1 0.1\n0 0.9 0.5 0.4 0.1\n"), DatasetError,
     r"a\.txt line 2: box \(44\.8, 21\.6, 70\.4, 26\.4\) .* outside the 64x48 image"),
    (lambda r: (r / "labels/train/a.txt").write_text("0 32 24 10 10\n"), DatasetError,
     r"a\.txt line 1: coordinates must be normalised to \[0, 1\]"),
    (lambda r: (r / "labels/train/a.txt").write_text("0 0.5 0.5 0.1\n"), DatasetError,
     r"a\.txt line 1: expected 'class cx cy w h' \(5 numbers\)"),
    (lambda r: (r / "images/train/d.png").unlink(), DatasetError, r"1 label file\(s\) have no image .*/d\.txt"),
    (lambda r: (r / "data.yaml").write_text("names: {0: bird, 2: dog}\n"), ConfigError,
     r"data\.yaml: names: a names dict needs the class ids 0\.\.1 as keys"),
    (lambda r: (r / "images/train/b.png").write_bytes(b"not an image"), DatasetError,
     r"1 image\(s\) .* cannot be read, first: .*b\.png \(set skip_bad_images"),
], ids=["class-out-of-range", "box-outside", "pixels-not-normalised", "short-line", "txt-without-image",
        "names-dict-gap", "unreadable-image"])
def test_bad_yolo_files_are_named(yolo, damage, error, match):
    damage(yolo)
    with pytest.raises(error, match=match):
        YOLODataset(str(yolo))


@pytest.mark.parametrize("fmt", ["voc", "yolo"])
@pytest.mark.slow
def test_train_and_evaluate_from_yaml(fmt, voc, yolo, tmp_path):
    spec = ({"type": "VOCDataset", "data_root": str(voc)} if fmt == "voc"
            else {"type": "YOLODataset", "data_root": str(yolo), "names": "data.yaml"})
    config = tmp_path / f"{fmt}.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "_base_": str(ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"),
        "model": {"neck": {"out_channels": 16}, "head": {"num_classes": 3, "feat_channels": 16, "num_convs": 1,
                                                         "score_thr": 0.0, "max_per_img": 5}},
        "data": {"batch_size": 2, "num_workers": 0,
                 "train": {**spec, "filter_empty": True, "transforms": [{"type": "RandomHorizontalFlip", "p": 0.5}]},
                 "val": spec},
        "train": {"epochs": 1, "eval_interval": 1, "vis_images": 0, "writers": [{"type": "JsonlWriter"}]}}))
    out = run_main("train", "--config", str(config), "--work-dir", str(tmp_path / "w"), "--device", "cpu")
    assert out.returncode == 0, out.stderr
    evals = [json.loads(x) for x in (tmp_path / "w/metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 1 and list(evals[0]["per_class"]) == CLASSES
    results = json.loads(next((tmp_path / "w/results").glob("bbox_epoch_*.json")).read_text())
    assert results and {r["category_id"] for r in results} <= {1, 2, 3}


def test_exif_rotated_photos_are_read_upright(tmp_path):
    """A phone photo stored sideways (EXIF orientation 6: rotate 90 degrees clockwise to view): pixels and
    the YOLO image size are those of the upright picture, as labelling tools and ultralytics see it."""
    from PIL import Image

    from detkit.data.coco import decode_rgb
    from detkit.data.yolo import _image_size

    stored = Image.new("RGB", (40, 20), (255, 0, 0))
    stored.paste((0, 0, 255), (0, 0, 10, 20))  # blue left strip: after rotating clockwise it is on top
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif.tobytes(), quality=95)
    image = decode_rgb(path)
    assert tuple(image.shape) == (3, 40, 20)
    assert image[2, :8].float().mean() > 200 and image[0, -8:].float().mean() > 200  # blue on top, red below
    assert _image_size(path) == (20, 40)
