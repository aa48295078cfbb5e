"""Data: COCO dataset, shapes generator, transforms, collate, loaders and bad-input errors."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision import tv_tensors

from detkit.config import load_config
from detkit.data import (
    CocoDataset,
    DatasetError,
    ShapesDataset,
    build_dataloader,
    build_dataset,
    build_transforms,
    collate_detection,
)
from detkit.registry import UnknownTypeError
from tests.conftest import BCCD, write_coco

ROOT = Path(__file__).resolve().parents[1]


def test_coco_items_equal_the_json(coco_fixture):
    ds = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"))
    assert len(ds) == 3 and ds.classes == ["cat", "bird", "dog"]  # sorted by id 3, 5, 7
    image, target = ds[0]
    assert isinstance(image, tv_tensors.Image) and image.shape == (3, 48, 64) and image.dtype == torch.uint8
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[4.0, 6.0, 24.0, 16.0], [30.0, 20.0, 40.5, 28.0]]))
    assert target["labels"].tolist() == [2, 0] and target["labels"].dtype == torch.int64
    assert target["image_id"] == 1 and target["orig_size"] == (48, 64)


def test_crowd_boxes_are_left_out_and_filter_empty(coco_fixture):
    ds = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"))
    _, target = ds[1]
    assert target["labels"].tolist() == [1]  # the crowd 'cat' box of image 2 is not a target
    assert len(ds[2][1]["boxes"]) == 0
    filtered = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"), filter_empty=True)
    assert filtered.ids == [1, 2]


def test_grayscale_and_rgba_load_as_rgb(tmp_path):
    import numpy as np
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.full((10, 12), 77, np.uint8), mode="L").save(tmp_path / "images/g.png")
    Image.fromarray(np.full((10, 12, 4), 99, np.uint8), mode="RGBA").save(tmp_path / "images/r.png")
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "g.png", "width": 12, "height": 10},
                                          {"id": 2, "file_name": "r.png", "width": 12, "height": 10}],
                               "annotations": [], "categories": [{"id": 1, "name": "x"}]}))
    ds = CocoDataset(str(ann), str(tmp_path / "images"))
    assert ds[0][0].shape == (3, 10, 12) and int(ds[0][0][1, 0, 0]) == 77
    assert ds[1][0].shape == (3, 10, 12) and int(ds[1][0][2, 0, 0]) == 99


def test_boxes_outside_are_clipped_and_degenerate_dropped_with_one_report(tmp_path, caplog):
    images = [{"id": 1, "file_name": "a.png", "width": 20, "height": 20}]
    anns = [{"id": 1, "image_id": 1, "category_id": 3, "bbox": [-5, 2, 10, 30]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [5, 5, 0, 4]},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [25, 5, 4, 4]}]
    path = write_coco(tmp_path, images, anns)
    with caplog.at_level(logging.WARNING, logger="detkit.data"):
        ds = CocoDataset(str(path), str(tmp_path / "images"))
    torch.testing.assert_close(ds[0][1]["boxes"].as_subclass(torch.Tensor), torch.tensor([[0.0, 2.0, 5.0, 20.0]]))
    reports = [r.getMessage() for r in caplog.records]
    assert len(reports) == 1 and "clipped 1 boxes" in reports[0] and "dropped 2 boxes" in reports[0]


def test_missing_paths_are_named(coco_fixture, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        CocoDataset(str(tmp_path / "nothere.json"), str(coco_fixture.parent / "images"))
    with pytest.raises(FileNotFoundError, match="image folder not found: .*noimg"):
        CocoDataset(str(coco_fixture), str(tmp_path / "noimg"))


def test_malformed_json_names_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [')
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match=r"bad\.json: not valid JSON"):
        CocoDataset(str(bad), str(tmp_path / "images"))
    bad.write_text('{"annotations": []}')
    with pytest.raises(DatasetError, match=r"bad\.json: not a COCO detection file"):
        CocoDataset(str(bad), str(tmp_path / "images"))


def test_unknown_category_names_the_annotation(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}]
    path = write_coco(tmp_path, images, [{"id": 42, "image_id": 1, "category_id": 99, "bbox": [0, 0, 2, 2]}])
    with pytest.raises(DatasetError, match="annotation id 42 has category_id 99"):
        CocoDataset(str(path), str(tmp_path / "images"))


def test_missing_image_is_an_error_or_skipped(coco_fixture, caplog):
    (coco_fixture.parent / "images/b.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"b\.png"):
        CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"))
    with caplog.at_level(logging.WARNING, logger="detkit.data"):
        ds = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"), skip_bad_images=True)
    assert ds.ids == [1, 3]
    assert sum("skipping 1 missing image" in r.getMessage() for r in caplog.records) == 1


def test_undecodable_image_is_an_error_or_skipped(coco_fixture):
    (coco_fixture.parent / "images/a.png").write_bytes(b"not a png at all")
    ds = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"))
    with pytest.raises(DatasetError, match=r"a\.png: cannot decode image"):
        ds[0]
    ds = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"), skip_bad_images=True)
    assert ds[0][1]["image_id"] == 2  # the next readable image stands in


def test_flip_moves_boxes_by_value(coco_fixture):
    pipeline = build_transforms([{"type": "RandomHorizontalFlip", "p": 1.0}])
    ds = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"), transforms=pipeline)
    boxes = ds[0][1]["boxes"].as_subclass(torch.Tensor)
    # width 64: x' = 64 - x
    torch.testing.assert_close(boxes, torch.tensor([[40.0, 6.0, 60.0, 16.0], [23.5, 20.0, 34.0, 28.0]]))


def test_resize_keeps_aspect_ratio_and_scales_boxes(coco_fixture):
    ds = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"),
                     transforms=[{"type": "Resize", "size": 96}])
    image, target = ds[0]
    assert image.shape == (3, 96, 128)  # shorter side 48 -> 96, x2
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[8.0, 12.0, 48.0, 32.0], [60.0, 40.0, 81.0, 56.0]]))
    ds = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images"),
                     transforms=[{"type": "Resize", "size": 24, "max_size": 30}])
    assert ds[0][0].shape == (3, 22, 30)  # longer side capped


def test_crop_drops_boxes_that_leave_the_image(coco_fixture):
    crop = lambda image, target: (image[..., :20, :20], {**target, "boxes": tv_tensors.wrap(  # noqa: E731
        target["boxes"], like=target["boxes"], canvas_size=(20, 20))})
    pipeline = build_transforms([])
    image, target = CocoDataset(str(coco_fixture), str(coco_fixture.parent / "images")).load(0)
    image, target = crop(image, target)
    _, out = pipeline(tv_tensors.Image(image), target)
    # box 1 is clipped to the 20x20 canvas, box 2 (x >= 30) is dropped with its label
    torch.testing.assert_close(out["boxes"].as_subclass(torch.Tensor), torch.tensor([[4.0, 6.0, 20.0, 16.0]]))
    assert out["labels"].tolist() == [2]


def test_unknown_transform_names_path():
    with pytest.raises(UnknownTypeError, match=r"transforms\.1: unknown transforms type 'RandomFlip'"):
        build_transforms([{"type": "Resize", "size": 8}, {"type": "RandomFlip"}])


def test_collate_pads_to_multiple_of_32_and_keeps_sizes():
    items = []
    for h, w in [(40, 70), (65, 30)]:
        img = tv_tensors.Image(torch.full((3, h, w), 7, dtype=torch.uint8))
        target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), format="XYXY",
                                                    canvas_size=(h, w)),
                  "labels": torch.tensor([1]), "image_id": h, "orig_size": (h // 2, w // 2)}
        items.append((img, target))
    batch = collate_detection(items)
    assert batch["images"].shape == (2, 3, 96, 96) and type(batch["images"]) is torch.Tensor
    assert batch["images"][0, :, :40, :70].eq(7).all() and batch["images"][0, :, 40:].eq(0).all()
    assert batch["image_sizes"].tolist() == [[40, 70], [65, 30]]
    torch.testing.assert_close(batch["scale_factors"], torch.tensor([[70 / 35, 40 / 20], [30 / 15, 65 / 32]]))
    assert type(batch["targets"][0]["boxes"]) is torch.Tensor and batch["image_ids"] == [40, 65]


def test_shapes_generator_is_deterministic_and_cached(tmp_path):
    a = ShapesDataset(num_images=12, image_size=64, seed=3, root=str(tmp_path / "a"), workers=1)
    b = ShapesDataset(num_images=12, image_size=64, seed=3, root=str(tmp_path / "b"), workers=2)
    ja, jb = (d.root / "annotations.json" for d in (a, b))
    assert ja.read_bytes() == jb.read_bytes()
    assert (a.root / "images/000005.png").read_bytes() == (b.root / "images/000005.png").read_bytes()
    mtime = ja.stat().st_mtime_ns
    again = ShapesDataset(num_images=12, image_size=64, seed=3, root=str(tmp_path / "a"))
    assert again.root == a.root and ja.stat().st_mtime_ns == mtime  # reused, not regenerated
    other = ShapesDataset(num_images=12, image_size=64, seed=4, root=str(tmp_path / "a"))
    assert other.root != a.root  # parameters changed: a new generation


def test_shapes_targets_lie_inside_images_and_cover_sizes(tmp_path):
    ds = ShapesDataset(num_images=60, image_size=128, seed=0, root=str(tmp_path))
    assert ds.classes == ["circle", "square", "triangle", "star"]
    sides = []
    for i in range(len(ds)):
        image, target = ds[i]
        boxes = target["boxes"].as_subclass(torch.Tensor)
        assert image.shape == (3, 128, 128)
        assert (boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 128).all() and (boxes[:, 2:] > boxes[:, :2]).all()
        sides.append((boxes[:, 2:] - boxes[:, :2]).max(1).values)
    sides = torch.cat(sides)
    assert sides.min() < 12 and sides.max() > 80  # small objects and large ones
    assert set(torch.cat([ds[i][1]["labels"] for i in range(len(ds))]).tolist()) == {0, 1, 2, 3}


def test_loader_order_depends_only_on_seed_and_epoch(tmp_path):
    data = {"batch_size": 4, "num_workers": 0,
            "train": {"type": "ShapesDataset", "num_images": 16, "image_size": 64, "root": str(tmp_path)}}

    def order(seed: int, epoch: int) -> list[int]:
        loader = build_dataloader(data, "train", seed=seed)
        loader.sampler.set_epoch(epoch)
        return [i for batch in loader for i in batch["image_ids"]]

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2) and order(0, 1) != order(1, 1)
    assert sorted(order(0, 1)) == list(range(1, 17))


def test_loader_shards_under_ddp(tmp_path):
    data = {"batch_size": 2, "num_workers": 0,
            "train": {"type": "ShapesDataset", "num_images": 8, "image_size": 64, "root": str(tmp_path)}}
    ids = [[i for b in build_dataloader(data, "train", rank=r, world_size=2) for i in b["image_ids"]] for r in (0, 1)]
    assert len(ids[0]) == len(ids[1]) == 4 and not set(ids[0]) & set(ids[1])


def test_default_shapes_config_loads_through_yaml(tmp_path):
    cfg = load_config(ROOT / "configs/_base_/datasets/shapes.yaml",
                      [f"data.train.root={tmp_path}", "data.train.num_images=8"])
    ds = build_dataset(cfg["data"]["train"])
    assert len(ds) == 8 and ds[0][0].dtype == torch.uint8


@pytest.mark.slow
def test_browse_dataset_writes_pngs(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "tools/browse_dataset.py"), "--config",
                    str(ROOT / "configs/_base_/datasets/shapes.yaml"), "--out", str(out), "-n", "3",
                    "--set", f"data.train.root={tmp_path}", "data.train.num_images=4"], check=True, cwd=tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["train_000.png", "train_001.png", "train_002.png",
                                                     "train_grid.png"]


@pytest.mark.skipif(not BCCD.is_dir(), reason="../shared/datasets/bccd not present")
def test_bccd_loads_through_yaml():
    overrides = [f"data.{s}.data_root={BCCD}" for s in ("train", "val")]
    cfg = load_config(ROOT / "configs/_base_/datasets/bccd.yaml", overrides)
    train = build_dataset({**cfg["data"]["train"], "transforms": []})
    val = build_dataset(cfg["data"]["val"])
    assert (len(train), len(val)) == (291, 73)
    assert train.classes == ["Platelets", "RBC", "WBC"]
    for ds in (train, val):
        for i in range(len(ds)):
            boxes, labels = ds._targets[ds.ids[i]]
            info = ds.coco.imgs[ds.ids[i]]
            assert labels.min() >= 0 and labels.max() <= 2
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= info["width"]).all()
            assert (boxes[:, 3] <= info["height"]).all()
    image, target = val[0]
    assert image.shape == (3, 480, 640) and len(target["boxes"]) > 0


def test_unknown_data_setting_is_an_error(tmp_path):
    from detkit.registry import ConfigError

    with pytest.raises(ConfigError, match=r"data\.batchsize: unknown data setting\. Did you mean 'batch_size'"):
        build_dataloader({"batchsize": 2, "train": {"type": "ShapesDataset", "num_images": 4, "root": str(tmp_path)}},
                         "train")


@pytest.mark.parametrize("bbox, match", [([1, 2, None, 4], "annotation id 1 has bbox"),
                                         ([1, 2, float("nan"), 4], "annotation id 1 has bbox"),
                                         ([1, 2, 3], "annotation id 1 has bbox")])
def test_malformed_bbox_names_the_annotation(tmp_path, bbox, match):
    images = [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}]
    path = write_coco(tmp_path, images, [{"id": 1, "image_id": 1, "category_id": 3, "bbox": bbox}])
    with pytest.raises(DatasetError, match=match):
        CocoDataset(str(path), str(tmp_path / "images"))


def test_image_size_must_match_the_json(tmp_path):
    images = [{"id": 1, "file_name": "a.png", "width": 8, "height": 8}]
    path = write_coco(tmp_path, images, [])
    data = json.loads(path.read_text())
    data["images"][0]["width"] = 9
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"a\.png is 8x8 \(upright by its EXIF orientation\) but .* says 9x8"):
        CocoDataset(str(path), str(tmp_path / "images"))[0]
    del data["images"][0]["width"]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="image id 1 .* needs positive 'width' and 'height'"):
        CocoDataset(str(path), str(tmp_path / "images"))


def test_skip_bad_images_also_skips_a_bad_mosaic_partner(coco_fixture):
    (coco_fixture.parent / "images/a.png").write_bytes(b"not a png at all")
    spec = {"type": "CocoDataset", "ann_file": str(coco_fixture), "img_dir": str(coco_fixture.parent / "images"),
            "filter_empty": False, "transforms": [{"type": "Mosaic", "size": 32}]}
    with pytest.raises(DatasetError, match=r"a\.png: cannot decode image"):
        build_dataset(spec)[0]
    ds = build_dataset({**spec, "skip_bad_images": True})
    for seed in range(6):  # partner draws that hit a.png fall through to the next image (and some do)
        torch.manual_seed(seed)
        for index in range(len(ds)):
            image, _ = ds[index]
            assert tuple(image.shape) == (3, 32, 32)
