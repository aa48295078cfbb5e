"""COCO-format detection dataset on ``pycocotools.coco.COCO``; VOC and YOLO datasets convert to it."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image, read_file

from detkit.data.annotations import DatasetError, index_coco, select_classes, subset_ids
from detkit.data.transforms import build_transforms
from detkit.registry import DATASETS, positive_int

logger = logging.getLogger("detkit.data")

__all__ = ["CocoDataset", "DatasetError", "decode_rgb", "load_coco"]


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """Parse a COCO json with pycocotools, turning its failures into errors naming the file."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise FileNotFoundError(f"COCO annotation file not found: {ann_file}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            dataset = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{ann_file}: not valid JSON ({err})") from None
    return index_coco(dataset, ann_file)


def decode_rgb(path: Path) -> torch.Tensor:
    """Read an image file as ``uint8 (3, H, W)`` RGB (grayscale and RGBA are converted; 16-bit images are
    scaled to 8 bits, ``value >> 8``, never wrapped modulo 256), turned upright by its EXIF orientation
    as a photo viewer, labelling tools, detectron2 and OpenCV show it (a phone photo is stored sideways)."""
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        image = decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    except RuntimeError as err:
        if "alloc" in str(err).lower():
            raise DatasetError(f"{path}: the image is too large to decode in memory ({err})") from None
        raise DatasetError(f"{path}: cannot decode image ({err})") from None
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    elif image.dtype != torch.uint8:
        raise DatasetError(f"{path}: {image.dtype} pixels are not supported; convert the image to 8 or 16 bits")
    return image


@DATASETS.register()
class CocoDataset(Dataset):
    """Images and boxes of a COCO-format json.

    Items are ``(image, target)``: ``image`` a ``uint8 tv_tensors.Image (3, H, W)`` after
    ``transforms``; ``target = {"boxes": BoundingBoxes (n, 4) x1y1x2y2 float32 pixels,
    "labels": int64 (n,) in 0..C-1, "image_id": int, "orig_size": (h, w)}``. Category ids map
    to contiguous labels in sorted-id order (``classes`` gives the names); crowd boxes are left
    out of the targets (pycocotools still sees them at evaluation). Boxes are clipped to the
    image and zero-size boxes dropped, with counts logged once.

    Args:
        ann_file: COCO json. img_dir: folder the ``file_name`` entries are relative to.
        transforms: a callable ``(image, target) -> (image, target)`` or a list of transform specs.
        filter_empty: leave out images with no (non-crowd) box, as for training.
        skip_bad_images: skip missing/undecodable images (count reported once) instead of failing.
        data_root: folder that ``ann_file`` and ``img_dir`` are relative to (one key to override).
        classes: keep only these category names, as labels ``0..k-1`` in this order (categories
            renumbered ``1..k`` the same way); the other categories' boxes are dropped.
        max_images: use at most this many images: those whose file names have the smallest SHA-1
            (seed-free, the same on every machine; a smaller subset lies inside a larger one),
            taken after ``filter_empty`` and ``skip_bad_images``.
    """

    def __init__(self, ann_file: str, img_dir: str, transforms: Sequence[dict] | Callable | None = None,
                 filter_empty: bool = False, skip_bad_images: bool = False, data_root: str = "",
                 classes: Sequence[str] | None = None, max_images: int | None = None) -> None:
        self.ann_file = Path(data_root, ann_file)
        folder = Path(data_root, img_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {folder} (img_dir of {self.ann_file})")
        coco = load_coco(self.ann_file)
        if classes is not None:
            coco = index_coco(select_classes(coco.dataset, classes, self.ann_file), self.ann_file)
        self._setup(coco, folder, transforms, filter_empty, skip_bad_images, max_images)

    def _setup(self, coco: COCO, img_dir: Path, transforms: Sequence[dict] | Callable | None, filter_empty: bool,
               skip_bad_images: bool, max_images: int | None) -> None:
        """Everything but reading the annotations: shared with the datasets that convert to COCO
        (``self.ann_file`` names the annotation source in error messages)."""
        if max_images is not None:
            positive_int(max_images, "max_images")
        self.coco, self.img_dir = coco, img_dir
        self.cat_ids = sorted(self.coco.getCatIds())
        self.classes = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.skip_bad_images = skip_bad_images
        self.transforms = build_transforms(transforms)
        self._targets = self._read_targets()
        ids = sorted(self.coco.imgs)
        if filter_empty:
            ids = [i for i in ids if len(self._targets[i][1])]
        ids = self._drop_missing(ids)
        if max_images is not None and max_images < len(ids):
            logger.info("%s: using %d of %d images (max_images)", self.ann_file, max_images, len(ids))
            ids = subset_ids(ids, lambda i: str(self.coco.imgs[i]["file_name"]), max_images)
        self.ids = ids

    def source(self, image_id: int) -> str:
        """Where the annotations of ``image_id`` come from, for error messages."""
        return str(self.ann_file)

    def _read_targets(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Per image id: clipped non-crowd boxes ``(n, 4)`` xyxy and labels ``(n,)``."""
        label_of = {c: i for i, c in enumerate(self.cat_ids)}
        for image_id, info in self.coco.imgs.items():
            if not all(isinstance(info.get(k), (int, float)) and info.get(k) > 0 for k in ("width", "height")):
                raise DatasetError(f"{self.ann_file}: image id {image_id} ({info.get('file_name')!r}) needs "
                                   f"positive 'width' and 'height', got {info.get('width')!r} x {info.get('height')!r}")
        rows: dict[int, list[list[float]]] = {i: [] for i in self.coco.imgs}
        labels: dict[int, list[int]] = {i: [] for i in self.coco.imgs}
        clipped = dropped = 0
        for ann in self.coco.dataset.get("annotations", []):
            ann_id = ann.get("id")
            if ann.get("category_id") not in label_of:
                raise DatasetError(f"{self.ann_file}: annotation id {ann_id} has category_id "
                                   f"{ann.get('category_id')!r}, which is not in 'categories' {self.cat_ids}")
            if ann.get("image_id") not in self.coco.imgs:
                raise DatasetError(f"{self.ann_file}: annotation id {ann_id} refers to image_id "
                                   f"{ann.get('image_id')!r}, which is not in 'images'")
            if ann.get("iscrowd", 0):
                continue
            bbox = ann.get("bbox")
            if (not isinstance(bbox, list) or len(bbox) != 4
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
                raise DatasetError(f"{self.ann_file}: annotation id {ann_id} has bbox {bbox!r}; "
                                   f"expected [x, y, width, height] of finite numbers")
            img = self.coco.imgs[ann["image_id"]]
            x, y, w, h = (float(v) for v in bbox)
            x1, y1 = min(max(x, 0.0), img["width"]), min(max(y, 0.0), img["height"])
            x2, y2 = min(max(x + w, 0.0), img["width"]), min(max(y + h, 0.0), img["height"])
            if x2 <= x1 or y2 <= y1:
                dropped += 1
                continue
            clipped += (x1, y1, x2, y2) != (x, y, x + w, y + h)
            rows[ann["image_id"]].append([x1, y1, x2, y2])
            labels[ann["image_id"]].append(label_of[ann["category_id"]])
        if clipped or dropped:
            logger.warning("%s: clipped %d boxes to their image and dropped %d boxes of zero or "
                           "negative size", self.ann_file, clipped, dropped)
        return {i: (torch.tensor(rows[i], dtype=torch.float32).reshape(-1, 4),
                    torch.tensor(labels[i], dtype=torch.int64)) for i in rows}

    def _drop_missing(self, ids: list[int]) -> list[int]:
        missing = [i for i in ids if not (self.img_dir / self.coco.imgs[i]["file_name"]).is_file()]
        if missing and not self.skip_bad_images:
            first = self.img_dir / self.coco.imgs[missing[0]]["file_name"]
            raise FileNotFoundError(f"{len(missing)} image file(s) of {self.ann_file} not found, first: "
                                    f"{first} (set skip_bad_images: true to skip them)")
        if missing:
            logger.warning("%s: skipping %d missing image file(s)", self.ann_file, len(missing))
        gone = set(missing)
        return [i for i in ids if i not in gone]

    def __len__(self) -> int:
        return len(self.ids)

    def landscape(self) -> list[bool]:
        """Per item whether the image is at least as wide as high (from the json: no decoding); the
        sampler batches like with like so that a batch is not padded to a square."""
        return [self.coco.imgs[i]["width"] >= self.coco.imgs[i]["height"] for i in self.ids]

    def image_path(self, index: int) -> Path:
        return self.img_dir / self.coco.imgs[self.ids[index]]["file_name"]

    def load(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """Item ``index`` before transforms."""
        image_id = self.ids[index]
        image = decode_rgb(self.image_path(index))
        h, w = image.shape[-2:]
        info = self.coco.imgs[image_id]
        if (info["height"], info["width"]) != (h, w):
            raise DatasetError(f"{self.image_path(index)} is {w}x{h} (upright by its EXIF orientation) but "
                               f"{self.source(image_id)} says {info['width']}x{info['height']} (image id {image_id})")
        boxes, labels = self._targets[image_id]
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes.clone(), format="XYXY", canvas_size=(h, w)),
            "labels": labels.clone(),
            "image_id": image_id,
            "orig_size": (h, w),
        }
        return tv_tensors.Image(image), target

    def load_readable(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        """``load(index)``, or with ``skip_bad_images`` the next readable item (a warning per bad one)."""
        for offset in range(len(self)):
            try:
                return self.load((index + offset) % len(self))
            except (FileNotFoundError, DatasetError) as err:
                if not self.skip_bad_images:
                    raise
                logger.warning("skipping bad image: %s", err)
        raise DatasetError(f"{self.ann_file}: no image could be read")

    def __getitem__(self, index: int) -> tuple[tv_tensors.Image, dict[str, Any]]:
        image, target = self.load_readable(index)
        try:
            return self.transforms(image, target)
        except (MemoryError, RuntimeError) as err:
            if not isinstance(err, MemoryError) and "alloc" not in str(err).lower():
                raise
            h, w = image.shape[-2:]
            raise DatasetError(f"image id {target['image_id']} ({w}x{h}) is too large for memory in the transforms: "
                               f"add a Resize first, e.g. transforms: [{{type: Resize, size: 800, max_size: 1333}}, "
                               f"...]") from None
