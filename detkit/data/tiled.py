"""Tiled training: any COCO-based dataset cut into overlapping tiles, for small objects in large images.

Each tile is an item. The tile index is computed once from the annotations (image sizes and boxes of
the json; no image is decoded): the grid of :func:`detkit.ops.tiles.tile_grid`, the tiles holding a
box, and a fixed, seeded share of the empty ones. It is kept as a COCO index of the tiles (``coco``,
``ids``: one image per tile, its clipped boxes), so whatever reads a dataset's annotations
(``class_weight: auto``, ``RepeatFactorSampler``, ``analyze dataset``, evaluation) sees the tiles. An
item is its tile cut from the decoded image, with the boxes clipped to it, then the dataset's
``transforms``. Random tiles centred on objects (``object_centred``) are drawn with torch's global
generator, which :class:`~detkit.data.sampler.SeededDataset` seeds per (seed, epoch, position) as for
every random transform: a run resumed mid-epoch, with any worker count, sees the same tiles.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from detkit.data.annotations import index_coco
from detkit.data.loader import build_dataset
from detkit.data.mix import _fraction
from detkit.data.transforms import build_transforms
from detkit.ops.tiles import overlap_pixels, tile_grid, tile_size
from detkit.registry import DATASETS, ConfigError, config_path, positive_int

logger = logging.getLogger("detkit.data")


def crop_boxes(boxes: Tensor, window: Sequence[int], min_visible: float) -> tuple[Tensor, Tensor]:
    """``boxes (n, 4)`` x1y1x2y2 seen through ``window = (x1, y1, x2, y2)``: ``(kept boxes (m, 4) clipped to
    the window, in its pixels; keep (n,) bool)``, keeping a box when the part inside is non-empty and at
    least ``min_visible`` of its area."""
    x1, y1, x2, y2 = (float(v) for v in window)
    clipped = torch.stack([boxes[:, 0].clamp(x1, x2), boxes[:, 1].clamp(y1, y2),
                           boxes[:, 2].clamp(x1, x2), boxes[:, 3].clamp(y1, y2)], 1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    inside = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
    keep = (inside > 0) & (inside >= min_visible * area)
    return clipped[keep] - clipped.new_tensor([x1, y1, x1, y1]), keep


@DATASETS.register()
class TiledDataset(Dataset):
    """Overlapping ``size x size`` tiles of every image of ``dataset`` (smaller images: one tile, the image).

    Items are ``(image, target)`` as :class:`~detkit.data.coco.CocoDataset`'s: ``image`` the tile
    ``uint8 (3, th, tw)`` after ``transforms``, ``target["boxes"]`` the boxes clipped to it (tile pixels),
    ``image_id`` the tile's id in ``coco`` (whose ``file_name`` is the source image's), ``orig_size`` its
    ``(th, tw)``.

    Args:
        dataset: the inner dataset spec (CocoDataset, VOCDataset, YOLODataset, ShapesDataset...), without
            transforms (they would run on the whole image; list them in ``transforms`` here).
        size: tile side in pixels. overlap: shared by neighbouring tiles, a fraction of ``size`` in [0, 1)
            or whole pixels; at least the largest object's side so each object lies whole in some tile.
        min_visible: a box is kept in a tile when at least this fraction of its area lies inside (clipped).
        empty_ratio: fraction of the tiles without boxes kept (a fixed choice given ``seed``); 0 drops them all.
        object_centred: probability that an item is a tile centred on a random box of the same image
            (centre jittered by up to a quarter tile), instead of its grid tile.
        seed: seed of the choice of empty tiles. transforms: run on each tile.
    """

    def __init__(self, dataset: Mapping[str, Any], size: int, overlap: int | float = 0.2, min_visible: float = 0.5,
                 empty_ratio: float = 0.0, object_centred: float = 0.0, seed: int = 0,
                 transforms: Sequence[dict] | Callable | None = None) -> None:
        self.size = tile_size(size, config_path("size"))
        self.overlap = overlap_pixels(self.size, overlap, config_path("overlap"))
        self.min_visible = _fraction(min_visible, "min_visible")
        self.empty_ratio = _fraction(empty_ratio, "empty_ratio")
        self.object_centred = _fraction(object_centred, "object_centred")
        if isinstance(dataset, Mapping) and dataset.get("transforms"):
            raise ConfigError(f"{config_path('dataset.transforms')}: the inner dataset's transforms would run on the "
                              f"whole image before tiling; move them to {config_path('transforms')}")
        self.dataset: Any = build_dataset(dataset, "dataset")  # a CocoDataset or a subclass (checked below)
        if not hasattr(self.dataset, "_targets"):
            raise ConfigError(f"{config_path('dataset')}: TiledDataset wraps the COCO-based datasets (CocoDataset, "
                              f"VOCDataset, YOLODataset, ShapesDataset), not {type(self.dataset).__name__}")
        inner: Any = self.dataset
        self.classes, self.cat_ids = inner.classes, inner.cat_ids
        self.img_dir, self.ann_file = inner.img_dir, inner.ann_file  # tile file names are the source images'
        self.index = self._build_index(positive_int(seed, "seed", minimum=0))
        self.coco = self._tile_coco()
        self.ids = list(range(1, len(self.index) + 1))
        self.transforms = build_transforms(transforms)

    def _source(self, k: int) -> tuple[int, int, Tensor, Tensor]:
        """Height, width (from the json), boxes ``(n, 4)`` and labels ``(n,)`` of the inner dataset's item ``k``."""
        image_id = self.dataset.ids[k]
        info = self.dataset.coco.imgs[image_id]
        return int(info["height"]), int(info["width"]), *self.dataset._targets[image_id]

    def _build_index(self, seed: int) -> Tensor:
        """``(N, 3)`` int64 rows ``(inner item, x1, y1)``: every grid tile holding a box, then an
        ``empty_ratio`` share of the empty ones drawn with ``seed``, in image and grid order."""
        full: list[tuple[int, int, int]] = []
        empty: list[tuple[int, int, int]] = []
        for k in range(len(self.dataset)):
            height, width, boxes, _ = self._source(k)
            for window in tile_grid(height, width, self.size, self.overlap).tolist():
                row = (k, window[0], window[1])
                (full if crop_boxes(boxes, window, self.min_visible)[1].any() else empty).append(row)
        take = round(self.empty_ratio * len(empty))
        chosen = torch.randperm(len(empty), generator=torch.Generator().manual_seed(seed))[:take].tolist()
        rows = sorted(full + [empty[i] for i in chosen])
        logger.info("%s: %d tiles of %d px from %d images (%d with boxes, %d of %d empty kept)", config_path()
                    or "TiledDataset", len(rows), self.size, len(self.dataset), len(full), take, len(empty))
        return torch.tensor(rows, dtype=torch.int64).reshape(-1, 3)

    def _tile_coco(self) -> Any:
        """The COCO index of the tiles: image ``n + 1`` is tile ``n`` (``file_name`` the source image's, ``tile``
        its window), with the boxes :func:`crop_boxes` keeps in it (xywh, tile pixels)."""
        images: list[dict[str, Any]] = []
        annotations: list[dict[str, Any]] = []
        for n, (k, x1, y1) in enumerate(self.index.tolist(), start=1):
            height, width, boxes, labels = self._source(k)
            th, tw = min(self.size, height), min(self.size, width)
            source = self.dataset.coco.imgs[self.dataset.ids[k]]
            images.append({"id": n, "file_name": source["file_name"], "width": tw, "height": th,
                           "source_id": source["id"], "tile": [x1, y1, x1 + tw, y1 + th]})
            kept, keep = crop_boxes(boxes, (x1, y1, x1 + tw, y1 + th), self.min_visible)
            for (a, b, c, d), label in zip(kept.tolist(), labels[keep].tolist()):
                annotations.append({"id": len(annotations) + 1, "image_id": n, "category_id": self.cat_ids[label],
                                    "bbox": [a, b, c - a, d - b], "area": (c - a) * (d - b), "iscrowd": 0})
        categories = [self.dataset.coco.cats[c] for c in self.cat_ids]
        return index_coco({"images": images, "annotations": annotations, "categories": categories}, self.ann_file)

    def __len__(self) -> int:
        return len(self.index)

    def landscape(self) -> list[bool]:
        """Per tile whether it is at least as wide as high (a tile of an image smaller than ``size`` is that image)."""
        return [self.coco.imgs[i]["width"] >= self.coco.imgs[i]["height"] for i in self.ids]

    def image_path(self, index: int) -> Any:
        return self.dataset.image_path(int(self.index[index, 0]))

    def _centred(self, k: int, x1: int, y1: int) -> tuple[int, int]:
        """With probability ``object_centred``, the corner of a tile centred on a random box of item ``k``
        (jittered by up to a quarter tile, inside the image); else ``(x1, y1)``."""
        if not self.object_centred or not float(torch.rand(())) < self.object_centred:
            return x1, y1
        height, width, boxes, _ = self._source(k)
        if not len(boxes):
            return x1, y1
        box = boxes[int(torch.randint(len(boxes), ()))]
        jitter = (torch.rand(2) - 0.5) * (self.size / 2)
        th, tw = min(self.size, height), min(self.size, width)
        cx, cy = float(box[0] + box[2]) / 2 + float(jitter[0]), float(box[1] + box[3]) / 2 + float(jitter[1])
        return min(max(round(cx - tw / 2), 0), width - tw), min(max(round(cy - th / 2), 0), height - th)

    def load(self, index: int, corner: tuple[int, int] | None = None) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """Tile ``index`` before transforms (at ``corner = (x1, y1)`` instead of its grid place when given)."""
        k, x1, y1 = self.index[index].tolist()
        x1, y1 = corner or (x1, y1)
        image, target = getattr(self.dataset, "load_readable", self.dataset.load)(k)
        height, width = image.shape[-2:]
        th, tw = min(self.size, height), min(self.size, width)
        x1, y1 = min(x1, width - tw), min(y1, height - th)  # a skipped bad image's stand-in may be smaller
        window = (x1, y1, x1 + tw, y1 + th)
        boxes, keep = crop_boxes(target["boxes"].as_subclass(Tensor).float(), window, self.min_visible)
        out = {**target, "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(th, tw)),
               "labels": target["labels"][keep], "image_id": index + 1, "orig_size": (th, tw)}
        return tv_tensors.Image(image[:, y1:y1 + th, x1:x1 + tw]), out

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        k, x1, y1 = self.index[index].tolist()
        image, target = self.load(index, self._centred(k, x1, y1))
        return self.transforms(image, target)
