"""COCO detection dicts in memory: the one format every dataset reader converts to.

VOC xml and YOLO txt readers turn their files into a COCO dict with :func:`build_coco`; the class
option (:func:`select_classes`), the image subset (:func:`subset_ids`) and pycocotools indexing
(:func:`index_coco`) are shared by all formats, so every dataset loads, trains and evaluates
through :class:`~detkit.data.coco.CocoDataset`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pycocotools.coco import COCO

from detkit.registry import ConfigError, config_path, suggestion

#: How far (pixels) a box may reach past the image border before it is an error rather than rounding
#: (VOC tools that write 0-based ``xmin = 0``, YOLO exports of COCO boxes that overshoot by half a pixel).
BORDER_TOLERANCE = 1.0


class DatasetError(ValueError):
    """A dataset file is malformed; the message names the file and what was wrong."""


@dataclass
class ImageRecord:
    """One image of a converted dataset: ``boxes`` are ``(label, (x1, y1, x2, y2) pixels, ignore)``,
    ``label`` in ``0..C-1``; ``ignore`` boxes (VOC ``difficult``) become COCO crowd boxes."""

    file_name: str
    width: int
    height: int
    boxes: list[tuple[int, tuple[float, float, float, float], bool]] = field(default_factory=list)


def index_coco(dataset: Any, source: Any) -> COCO:
    """A pycocotools ``COCO`` over an in-memory dict; its failures become errors naming ``source``."""
    if not isinstance(dataset, dict):
        raise DatasetError(f"{source}: not a COCO detection file: the top level is a {type(dataset).__name__}, "
                           f"not an object with 'images', 'annotations' and 'categories'")
    for key in ("images", "categories"):
        if key not in dataset:
            raise DatasetError(f"{source}: not a COCO detection file: no '{key}' list")
    coco = COCO()
    coco.dataset = dataset
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
            coco.createIndex()
    except (KeyError, TypeError) as err:
        raise DatasetError(f"{source}: not a COCO detection file; pycocotools said: "
                           f"{type(err).__name__}: {err}") from None
    return coco


def check_class_list(classes: Any, key: str = "classes") -> list[str]:
    """``classes`` as a list of distinct names, else a :class:`ConfigError` naming the config key."""
    if (isinstance(classes, (str, bytes)) or not isinstance(classes, Sequence) or not classes
            or not all(isinstance(c, str) and c for c in classes)):
        raise ConfigError(f"{config_path(key)} must be a non-empty list of class names, got {classes!r}")
    repeated = sorted({c for c in classes if list(classes).count(c) > 1})
    if repeated:
        raise ConfigError(f"{config_path(key)} lists {repeated} more than once: {list(classes)}")
    return list(classes)


def check_known(classes: Sequence[str], known: Sequence[str], source: Any) -> None:
    """Every name of ``classes`` is one of ``known``, else a :class:`ConfigError` listing them."""
    for name in classes:
        if name not in known:
            raise ConfigError(f"{config_path('classes')}: unknown class {name!r} in {source}."
                              f"{suggestion(name, known)} Known classes: {', '.join(map(str, known))}")


def select_classes(dataset: dict, classes: Sequence[str], source: Any) -> dict:
    """A copy of COCO dict ``dataset`` keeping only the categories named in ``classes``, renumbered
    ``1..k`` in that order (so label ``i`` is ``classes[i]``, also for pycocotools' sorted ids); the
    other categories' annotations are dropped, all images are kept."""
    classes = check_class_list(classes)
    cats = dataset["categories"]
    names = [c.get("name") for c in cats]
    check_known(classes, names, source)
    repeated = sorted({n for n in classes if names.count(n) > 1})
    if repeated:
        raise DatasetError(f"{source}: categories {repeated} appear more than once in 'categories', "
                           f"so 'classes' cannot select them by name")
    known_ids = [c["id"] for c in cats]
    for a in dataset.get("annotations", []):  # checked here: renumbering could make a stray id valid
        if a.get("category_id") not in known_ids:
            raise DatasetError(f"{source}: annotation id {a.get('id')} has category_id {a.get('category_id')!r}, "
                               f"which is not in 'categories' {sorted(known_ids)}")
    new_id = {cats[names.index(n)]["id"]: i + 1 for i, n in enumerate(classes)}
    categories = [{**cats[names.index(n)], "id": i + 1} for i, n in enumerate(classes)]
    annotations = [{**a, "category_id": new_id[a.get("category_id")]} for a in dataset.get("annotations", [])
                   if a.get("category_id") in new_id]
    return {**dataset, "categories": categories, "annotations": annotations}


def check_box(box: Sequence[float], width: int, height: int, where: str) -> None:
    """``box`` ``(x1, y1, x2, y2)`` pixels is finite, ordered and inside the ``width x height`` image
    (up to :data:`BORDER_TOLERANCE`); else a :class:`DatasetError` naming ``where``."""
    x1, y1, x2, y2 = box
    shown = "(" + ", ".join(f"{v:g}" for v in box) + ")"
    if not all(math.isfinite(v) for v in box):
        raise DatasetError(f"{where}: box {shown} is not finite")
    if x2 < x1 or y2 < y1:
        raise DatasetError(f"{where}: box {shown} (x1, y1, x2, y2) has its corners swapped: x2 < x1 or y2 < y1")
    tol = BORDER_TOLERANCE
    if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
        raise DatasetError(f"{where}: box {shown} (x1, y1, x2, y2 pixels) lies outside the {width}x{height} "
                           f"image by more than {tol:g} px; fix the label or the image size")


def build_coco(records: Sequence[ImageRecord], classes: Sequence[str], description: str) -> dict:
    """COCO detection dict of ``records``: image ids ``1..n`` in record order, category ids ``1..C`` in
    ``classes`` order, ``bbox`` as ``[x, y, w, h]``; ignored boxes get ``iscrowd: 1`` (pycocotools
    does not count them; :class:`CocoDataset` does not train on them)."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, rec in enumerate(records, start=1):
        images.append({"id": image_id, "file_name": rec.file_name, "width": rec.width, "height": rec.height})
        for label, (x1, y1, x2, y2), ignore in rec.boxes:
            w, h = x2 - x1, y2 - y1
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(ignore),
                                "ignore": int(ignore)})
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(classes)]
    return {"info": {"description": description}, "images": images, "annotations": annotations,
            "categories": categories}


def subset_ids(ids: Sequence[int], key: Callable[[int], str], max_images: int) -> list[int]:
    """The ``max_images`` of ``ids`` whose ``key`` (the file name) has the smallest SHA-1, in ``ids`` order.

    Seed-free and deterministic on every machine and Python version; a smaller subset lies inside a
    larger one, and adding images changes the subset only by new images that rank lower.
    """
    ranked = sorted(ids, key=lambda i: hashlib.sha1(key(i).encode()).hexdigest())
    keep = set(ranked[:max_images])
    return [i for i in ids if i in keep]
