"""Tiled training and sliced inference (docs/small_objects.md): tile cutting and box clipping by hand,
the merge of one object seen by two tiles, sliced evaluation against whole-image evaluation,
TiledDataset's index and determinism, the small-object shapes variant, and the CLI/API entry points."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from detkit.api import load_detector
from detkit.config import load_config
from detkit.data import build_dataloader, build_dataset
from detkit.data.sampler import SeededDataset
from detkit.data.tiled import crop_boxes
from detkit.engine.evaluator import evaluate_model
from detkit.models import build_detector
from detkit.registry import ConfigError
from detkit.ops.tiles import TileSettings, add_new_objects, merge_tiles, sliced_predict, tile_grid, whole_image_pass
from tests.cli_runner import run_main, tiny_shapes

TILES_CONFIG = "configs/fcos/fcos_r18_fpn_shapes_tiles.yaml"


def small_shapes(root: Path, **extra: object) -> dict:
    """A toy SmallShapesDataset spec: 128-px images with 2-4 objects of 6-24 px."""
    return {"type": "SmallShapesDataset", "num_images": 3, "image_size": 128, "root": str(root), "min_objects": 2,
            "max_objects": 4, **extra}


def test_tile_grid_and_box_clipping_by_hand() -> None:
    # 100 x 300 image, 128-px tiles sharing 32 px: stride 96; the last one ends at the border (300 - 128 = 172)
    assert tile_grid(100, 300, 128, 32).tolist() == [[0, 0, 128, 100], [96, 0, 224, 100], [172, 0, 300, 100]]
    assert tile_grid(1024, 1024, 256, 0.25)[:, 0].unique().tolist() == [0, 192, 384, 576, 768]  # 64 px = 0.25
    boxes = torch.tensor([[120.0, 10, 140, 30],  # across tile 0's right border (x = 128): 8 of its 20 px inside
                          [2.0, 2, 6, 6]])  # a small box, whole in tile 0 only
    kept, keep = crop_boxes(boxes, (0, 0, 128, 100), min_visible=0.3)
    assert keep.tolist() == [True, True] and kept.tolist() == [[120, 10, 128, 30], [2, 2, 6, 6]]
    kept, keep = crop_boxes(boxes, (0, 0, 128, 100), min_visible=0.5)  # 40% visible < min_visible: dropped
    assert keep.tolist() == [False, True]
    kept, keep = crop_boxes(boxes, (96, 0, 224, 100), min_visible=0.5)  # whole in tile 1, in its pixels
    assert keep.tolist() == [True, False] and kept.tolist() == [[24, 10, 44, 30]]


def test_one_object_seen_by_two_tiles_is_merged_into_one_box() -> None:
    # the object [10, 10, 30, 30] cut by two tile borders: one tile sees x 10..25, the other 18..30
    boxes = torch.tensor([[10.0, 10, 25, 30], [18.0, 10, 30, 30], [10.0, 10, 25, 30]])
    scores, labels = torch.tensor([0.9, 0.6, 0.8]), torch.tensor([0, 0, 1])  # class 1 is another object
    merged = merge_tiles(boxes, scores, labels, iou_thr=0.5, merge="nmm")  # intersection / smaller = 7/12
    assert merged["boxes"].tolist() == [[10, 10, 30, 30], [10, 10, 25, 30]]
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.8]) and merged["labels"].tolist() == [0, 1]
    assert len(merge_tiles(boxes, scores, labels, iou_thr=0.5, merge="nms")["boxes"]) == 3  # IoU 0.35: NMS keeps both


def bright_box(images: torch.Tensor, sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """A stand-in detector: the box around the pixels above 127 of each image (score 1, label 0)."""
    out = []
    for image, (h, w) in zip(images, sizes.tolist()):
        ys, xs = torch.nonzero(image[0, :h, :w] > 127, as_tuple=True)
        box = [[int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]] if len(xs) else []
        out.append({"boxes": torch.tensor(box, dtype=torch.float32).reshape(-1, 4), "scores": torch.ones(len(box)),
                    "labels": torch.zeros(len(box), dtype=torch.int64)})
    return out


def larger_scores_higher(images: torch.Tensor, sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    """``bright_box`` scoring a box by its area (a whole object above the parts of it that tiles see)."""
    out = bright_box(images, sizes)
    for det in out:
        det["scores"] = 0.5 + (det["boxes"][:, 2:] - det["boxes"][:, :2]).prod(dim=1) / 1e6
    return out


def test_sliced_predict_maps_tiles_back_and_merges_duplicates() -> None:
    image = torch.zeros(3, 160, 256, dtype=torch.uint8)
    image[:, 40:56, 100:116] = 255  # whole in the tiles at x 0 and 96, not in the one at 128
    det = sliced_predict(bright_box, image, TileSettings(size=128, overlap=32, full_image=False))
    assert det["boxes"].tolist() == [[100, 40, 116, 56]]
    for whole in (True, "fit"):  # + the whole image as given / at half size
        det = sliced_predict(bright_box, image, TileSettings(size=128, overlap=32, full_image=whole))
        assert len(det["boxes"]) == 1 and det["boxes"].tolist() == [[100, 40, 116, 56]]


def test_whole_image_pass_is_the_whole_image_prediction_or_fits_one_tile() -> None:
    image = torch.zeros(3, 160, 256, dtype=torch.uint8)
    image[:, 20:140, 30:230] = 255  # larger than a tile: every tile sees a part of it
    assert whole_image_pass(bright_box, image, None)["boxes"].tolist() == [[30, 20, 230, 140]]
    assert whole_image_pass(bright_box, image, 128)["boxes"].tolist() == [[30, 20, 230, 140]]  # half size, scaled back
    cut = sliced_predict(bright_box, image, TileSettings(size=128, overlap=32, full_image=False))
    assert len(cut["boxes"]) > 1  # the parts that tiles see: what the whole-image pass and nmm are for
    merged = sliced_predict(larger_scores_higher, image, TileSettings(size=128, overlap=32, full_image=True,
                                                                    merge="nmm"))
    assert merged["boxes"].tolist() == [[30, 20, 230, 140]]
    clean = sliced_predict(bright_box, image, TileSettings(size=128, overlap=32, full_image=True, cut_margin=2))
    assert clean["boxes"].tolist() == [[30, 20, 230, 140]]  # every tile's view touches an inner tile edge
    with pytest.raises(ConfigError, match="cut_margin must be an integer >= 0"):
        TileSettings.parse({"size": 128, "cut_margin": -1})
    with pytest.raises(ConfigError, match="full_image must be true"):
        TileSettings.parse({"size": 128, "full_image": "yes"})


def test_full_image_first_keeps_the_whole_image_boxes_and_adds_what_only_tiles_find() -> None:
    whole = {"boxes": torch.tensor([[10.0, 10, 50, 50], [100, 10, 140, 50]]), "scores": torch.tensor([0.6, 0.5]),
             "labels": torch.tensor([0, 1])}
    # a better-scoring tile view of the first object (IoU 0.83), the second object's box with another label,
    # and an object the whole-image pass missed
    tiles = {"boxes": torch.tensor([[12.0, 12, 52, 52], [100, 10, 140, 50], [200, 200, 210, 210]]),
             "scores": torch.tensor([0.9, 0.8, 0.3]), "labels": torch.tensor([0, 0, 1])}
    out = add_new_objects(whole, tiles, iou_thr=0.5, max_det=100)
    assert out["boxes"].tolist() == [[100, 10, 140, 50], [10, 10, 50, 50], [100, 10, 140, 50], [200, 200, 210, 210]]
    assert out["scores"].tolist() == pytest.approx([0.8, 0.6, 0.5, 0.3]) and out["labels"].tolist() == [0, 0, 1, 1]
    assert add_new_objects(whole, tiles, iou_thr=0.5, max_det=2)["scores"].tolist() == pytest.approx([0.8, 0.6])
    # end to end: the shifted, higher-scoring view of a tile loses to the whole-image box only with the option
    image = torch.zeros(3, 160, 256, dtype=torch.uint8)
    image[:, 40:56, 100:116] = 255

    def tile_views_shifted(images: torch.Tensor, sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        out = bright_box(images, sizes)
        for det, (h, w) in zip(out, sizes.tolist()):
            if (h, w) != (160, 256):  # a tile: its box 1 px to the right, scoring higher
                det["boxes"] += torch.tensor([1.0, 0, 1, 0])
                det["scores"] = det["scores"] + 1
        return out

    plain = sliced_predict(tile_views_shifted, image, TileSettings(size=128, overlap=32, full_image=True))
    first = sliced_predict(tile_views_shifted, image, TileSettings(size=128, overlap=32, full_image=True,
                                                                  full_image_first=True))
    assert plain["boxes"].tolist() == [[101, 40, 117, 56]] and first["boxes"].tolist() == [[100, 40, 116, 56]]
    with pytest.raises(ConfigError, match="full_image_first must be true or false, and true only with full_image"):
        TileSettings.parse({"size": 128, "full_image": False, "full_image_first": True})


def test_sliced_eval_equals_whole_image_eval_when_one_tile_covers_the_image(tmp_path: Path) -> None:
    cfg = load_config("configs/fcos/fcos_r18_fpn_shapes.yaml", [*tiny_shapes(tmp_path), "model.head.score_thr=0.0"])
    torch.manual_seed(0)
    model = build_detector(cfg["model"])
    loader = build_dataloader(cfg["data"], "val")
    whole = evaluate_model(model, loader, torch.device("cpu"))
    sliced = evaluate_model(model, loader, torch.device("cpu"), tiles=TileSettings(size=64, full_image=True))
    assert whole.results and sliced.results == whole.results and sliced.metrics["AP"] == whole.metrics["AP"]


def test_tiled_dataset_index_and_items_are_deterministic(tmp_path: Path) -> None:
    spec = {"type": "TiledDataset", "size": 64, "overlap": 16, "empty_ratio": 0.5, "seed": 3,
            "dataset": small_shapes(tmp_path), "transforms": [{"type": "RandomHorizontalFlip", "p": 0.5}]}
    first, again = build_dataset(spec), build_dataset(spec)
    every, non_empty = build_dataset({**spec, "empty_ratio": 1.0}), build_dataset({**spec, "empty_ratio": 0.0})
    assert len(every) == 3 * 9  # 128 px: tiles at 0, 48, 64 in each direction
    assert len(first) == len(non_empty) + round(0.5 * (len(every) - len(non_empty)))
    assert first.index.tolist() == again.index.tolist()
    tile, target = first.load(0)  # the tiles' COCO index holds what an item holds
    assert target["image_id"] == first.ids[0] and len(target["boxes"]) == len(first.coco.imgToAnns[first.ids[0]])
    for k in range(len(first)):  # an item is a function of the sample seed (as SeededDataset gives it)
        (image_a, target_a), (image_b, target_b) = SeededDataset(first)[k, 100 + k], SeededDataset(again)[k, 100 + k]
        assert torch.equal(image_a, image_b) and torch.equal(target_a["boxes"], target_b["boxes"])
    centred = build_dataset({**spec, "object_centred": 1.0})  # every item a tile around a box, even empty ones
    assert all(len(SeededDataset(centred)[k, k][1]["boxes"]) for k in range(len(centred)))
    mosaic = build_dataset({**spec, "transforms": [{"type": "Mosaic", "size": 64}]})  # bound to the tiles
    assert SeededDataset(mosaic)[0, 1][0].shape == (3, 64, 64)


def test_small_shapes_variant_object_sizes(tmp_path: Path) -> None:
    dataset = build_dataset(small_shapes(tmp_path, image_size=256, min_objects=10, max_objects=20))
    sides = [max(a["bbox"][2:]) for a in dataset.coco.dataset["annotations"]]
    assert len(sides) >= 20 and dataset.coco.imgs[1]["width"] == 256
    assert 6 * 0.85 <= min(sides) and max(sides) <= 24  # a triangle's box is 0.87 of its side
    with pytest.raises(ValueError, match="max_size"):
        build_dataset(small_shapes(tmp_path, min_size=30))


@pytest.fixture(scope="module")
def tiles_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiles config at toy sizes trained for one epoch through the CLI (96-px images, 64-px tiles)."""
    root = tmp_path_factory.mktemp("tiles")
    result = run_main("train", "--config", TILES_CONFIG, "--work-dir", str(root / "run"), "--set",
                      *[s for s in tiny_shapes(root) if not s.startswith(("data.train.", "data.val."))],
                      f"data.train.dataset.root={root}", "data.train.dataset.num_images=2",
                      "data.train.dataset.image_size=96", "data.train.size=64", "data.train.overlap=16",
                      f"data.val.root={root}", "data.val.num_images=1", "data.val.image_size=96",
                      "eval.tiles.size=64", "eval.tiles.overlap=16", "data.batch_size=4")
    assert result.returncode == 0, result.stderr
    assert "evaluation after epoch 1" in result.stderr
    return root


@pytest.mark.slow
def test_tiles_config_trains_and_evaluates_sliced(tiles_run: Path) -> None:
    detector = load_detector(tiles_run / "run" / "model_final.pth", device="cpu")
    image = torch.randint(0, 256, (3, 96, 130), dtype=torch.uint8)
    det = detector.predict(image, score_thr=0.0, tiles={"size": 64, "overlap": 16})[0]
    assert len(det["boxes"]) and float(det["boxes"][:, 2].max()) <= 130 and float(det["boxes"][:, 3].max()) <= 96
    with pytest.raises(ValueError, match=r"tiles.overlap must be a fraction"):
        detector.predict(image, tiles={"size": 64, "overlap": 1.5})
    picture = next((tiles_run / "run").parent.glob("shapes_*/images/000000.png"))
    checkpoint, out = str(tiles_run / "run" / "model_final.pth"), tiles_run / "infer"
    bad = run_main("infer", "--checkpoint", checkpoint, "--images", str(picture), "--out", str(out), "--tile", "0")
    assert bad.returncode == 2 and "--tile must be a tile side in pixels" in bad.stderr and not out.exists()
    result = run_main("infer", "--checkpoint", checkpoint, "--images", str(picture), "--out", str(out), "--tile", "64")
    assert result.returncode == 0, result.stderr
    assert (out / "results.json").is_file() and (out / "000000.png").is_file()


def test_bad_eval_tiles_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    work_dir = tmp_path / "run"
    result = run_main("train", "--config", TILES_CONFIG, "--work-dir", str(work_dir), "--set", "eval.tiles.merge=wbf")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "eval.tiles.merge must be one of nms, nmm, got 'wbf'" in result.stderr
    assert not work_dir.exists()
