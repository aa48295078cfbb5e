"""YOLO txt datasets (Ultralytics layout), converted once to a COCO dict and read through :class:`CocoDataset`."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml
from PIL import Image

from detkit.data.annotations import (
    DatasetError,
    ImageRecord,
    build_coco,
    check_box,
    check_class_list,
    index_coco,
    select_classes,
)
from detkit.data.coco import CocoDataset
from detkit.data.files import find_files
from detkit.registry import DATASETS, ConfigError, config_path

logger = logging.getLogger("detkit.data")

#: Image files a YOLO folder may hold: the formats ``torchvision.io.decode_image`` reads.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
#: labelImg writes the class list next to the labels; it labels no image.
CLASS_LIST_FILE = "classes.txt"
#: How many values of a bad label line a message shows.
SHOWN_VALUES = 6


def _names_list(names: Any, where: str) -> list[str]:
    """Ultralytics ``names``: a list, or a ``{id: name}`` dict with ids ``0..n-1``."""
    if isinstance(names, dict):
        try:
            by_id = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            by_id = {}
        if sorted(by_id) != list(range(len(names))):
            raise ConfigError(f"{where}: a names dict needs the class ids 0..{len(names) - 1} as keys, "
                              f"got {list(names)}")
        names = [by_id[i] for i in range(len(names))]
    return check_class_list(names, "names")


def yolo_names(names: Any, data_root: str = "") -> list[str]:
    """Class names by YOLO class id: a list, a ``{id: name}`` dict, or the path of an Ultralytics
    ``data.yaml`` (relative to ``data_root``) with such a ``names`` entry (and optionally ``nc``)."""
    if not isinstance(names, (str, Path)):
        return _names_list(names, config_path("names"))
    path = Path(data_root, names)
    if not path.is_file():
        raise FileNotFoundError(f"{config_path('names')}: YOLO data.yaml not found: {path}; set names to the "
                                f"path of a data.yaml (relative to data_root) or to the list of class names")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict) or "names" not in data:
        raise DatasetError(f"{path}: no 'names' entry (a list of class names or an {{id: name}} mapping)")
    result = _names_list(data["names"], f"{path}: names")
    if "nc" in data and data["nc"] != len(result):
        raise DatasetError(f"{path}: nc is {data['nc']!r} but names lists {len(result)} classes")
    return result


def _text_lines(path: Path) -> list[str]:
    """The lines of a text file (a UTF-8 byte-order mark, as Windows editors write, is dropped); a byte
    that is not UTF-8 is a :class:`DatasetError` naming the file, line and column."""
    lines = []
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            lines.append(raw.decode("utf-8-sig"))
        except UnicodeDecodeError as err:
            raise DatasetError(f"{path} line {line_no}: byte {raw[err.start]:#04x} at column {err.start + 1} is not "
                               f"UTF-8 text; a YOLO label holds numbers only: fix or re-export the file") from None
    return lines


def _is_number(word: str) -> bool:
    try:
        float(word)
    except ValueError:
        return False
    return True


def _shown(words: list[str]) -> str:
    """The first :data:`SHOWN_VALUES` words of a line, for a message (a polygon line has thousands)."""
    shown = " ".join(words[:SHOWN_VALUES])[:80]
    return shown + (f" ... ({len(words)} values)" if len(words) > SHOWN_VALUES else "")


def parse_yolo_txt(path: Path, width: int, height: int, num_classes: int) -> list[tuple[int, tuple, bool]]:
    """One label file -> ``[(class id, (x1, y1, x2, y2) pixels, False)]``.

    A line is ``class cx cy w h`` normalised to [0, 1], or ``class x1 y1 x2 y2 ...`` (an Ultralytics
    segment polygon, normalised), which gives the polygon's bounding box.
    """
    boxes = []
    for line_no, line in enumerate(_text_lines(path), start=1):
        words = line.split()
        if not words:
            continue
        where = f"{path} line {line_no}"
        if len(words) != 5 and (len(words) < 7 or len(words) % 2 == 0):
            raise DatasetError(f"{where}: expected 'class cx cy w h' (5 numbers) or 'class x1 y1 x2 y2 ...' "
                               f"(a polygon), got {len(words)} values: {_shown(words)}")
        bad = next((k for k, w in enumerate(words) if not _is_number(w)), None)
        if bad is not None:
            raise DatasetError(f"{where}: value {bad + 1} ({words[bad][:20]!r}) is not a number: {_shown(words)}")
        cls, *values = (float(w) for w in words)
        if not cls.is_integer() or not 0 <= cls < num_classes:
            raise DatasetError(f"{where}: class id {words[0]} is out of range: there are {num_classes} "
                               f"classes (ids 0..{num_classes - 1}); check names or the label")
        if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in values):
            raise DatasetError(f"{where}: coordinates must be normalised to [0, 1] (pixels divided by the "
                               f"{width}x{height} image size), got {_shown(words)}")
        if len(values) == 4:
            cx, cy, w, h = values
            box = ((cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height)
        else:
            xs, ys = values[0::2], values[1::2]
            box = (min(xs) * width, min(ys) * height, max(xs) * width, max(ys) * height)
        check_box(box, width, height, where)
        boxes.append((int(cls), box, False))
    return boxes


#: EXIF orientations (5-8) that store the picture transposed: width and height swap once upright.
TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)


def _image_size(path: Path) -> tuple[int, int] | None:
    """Upright ``(width, height)`` from the file header and its EXIF orientation (no decoding), as
    ultralytics' ``exif_size``; None when it cannot be read."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            transposed = image.getexif().get(0x0112, 1) in TRANSPOSED_ORIENTATIONS
    except OSError:
        return None
    return (height, width) if transposed else (width, height)


def _key(path: Path, root: Path) -> str:
    """What pairs an image with its label: the path under its folder without the suffix (``a/b``)."""
    return path.relative_to(root).with_suffix("").as_posix()


def _label_files(labels: Path) -> dict[str, Path]:
    """Every ``.txt`` under ``labels`` (``a.TXT`` too, linked folders too) by :func:`_key`; two files for
    one image (``a.txt`` and ``a.TXT``) are a :class:`DatasetError` naming both."""
    found: dict[str, Path] = {}
    for txt in find_files(labels, (".txt",)):
        key = _key(txt, labels)
        if key in found:
            raise DatasetError(f"{found[key]} and {txt} both label the image {key}.*: remove one of them")
        found[key] = txt
    return found


def yolo_to_coco(data_root: str, img_dir: str = "images/train", label_dir: str = "labels/train",
                 names: Any = "data.yaml", classes: Sequence[str] | None = None,
                 skip_bad_images: bool = False) -> dict:
    """A COCO dict of a YOLO split: every image under ``img_dir`` (searched recursively, image ids
    ``1..n`` in path order) with the boxes of the same-named ``.txt`` under ``label_dir`` (none when
    the txt is missing or empty). A txt without an image, or an image whose header cannot be read
    (unless ``skip_bad_images``), is an error. ``classes`` selects and orders classes by name."""
    images, labels = Path(data_root, img_dir), Path(data_root, label_dir)
    if not images.is_dir():
        raise FileNotFoundError(f"image folder not found: {images} (img_dir)")
    if not labels.is_dir():
        raise FileNotFoundError(f"YOLO label folder not found: {labels} (label_dir)")
    class_names = yolo_names(names, data_root)
    files = find_files(images, IMAGE_SUFFIXES)
    if not files:
        raise DatasetError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)}) in img_dir")
    label_of = _label_files(labels)
    keys = {_key(p, images) for p in files}
    orphans = sorted(t for k, t in label_of.items() if k not in keys and t != labels / CLASS_LIST_FILE)
    if orphans:
        raise DatasetError(f"{len(orphans)} label file(s) have no image in {images}, first: {orphans[0]} "
                           f"(images are looked for as {', '.join(IMAGE_SUFFIXES)}); add the image or remove the txt")
    records, bad = [], []
    for path in files:
        size = _image_size(path)
        if size is None:
            bad.append(path)
            continue
        txt = label_of.get(_key(path, images))
        boxes = parse_yolo_txt(txt, *size, len(class_names)) if txt is not None else []
        records.append(ImageRecord(path.relative_to(images).as_posix(), *size, boxes))
    if bad and not skip_bad_images:
        raise DatasetError(f"{len(bad)} image(s) in {images} cannot be read, first: {bad[0]} "
                           f"(set skip_bad_images: true to skip them)")
    if bad:
        logger.warning("%s: skipping %d unreadable image(s)", images, len(bad))
    dataset = build_coco(records, class_names, f"YOLO {images}")
    return select_classes(dataset, classes, labels) if classes is not None else dataset


@DATASETS.register()
class YOLODataset(CocoDataset):
    """YOLO txt labels, converted to COCO in memory (same items, classes, cat_ids, coco as CocoDataset).

    The Ultralytics layout: ``images/train/x.jpg`` with ``labels/train/x.txt`` holding ``class cx cy w h``
    lines normalised to [0, 1].

    Args:
        data_root: the dataset folder; the other paths are relative to it.
        img_dir: image folder (searched recursively). label_dir: the txt folder mirroring it.
        names: class names by YOLO id: a list, an ``{id: name}`` mapping, or a ``data.yaml`` path.
        classes: keep only these names, as labels ``0..k-1`` in this order; null: all of ``names``.
        transforms, filter_empty, skip_bad_images, max_images: as for :class:`CocoDataset`.
    """

    def __init__(self, data_root: str, img_dir: str = "images/train", label_dir: str = "labels/train",
                 names: Any = "data.yaml", classes: Sequence[str] | None = None,
                 transforms: Sequence[dict] | Callable | None = None, filter_empty: bool = False,
                 skip_bad_images: bool = False, max_images: int | None = None) -> None:
        self.ann_file = Path(data_root, label_dir)
        dataset = yolo_to_coco(data_root, img_dir, label_dir, names, classes, skip_bad_images)
        self._setup(index_coco(dataset, self.ann_file), Path(data_root, img_dir), transforms, filter_empty,
                    skip_bad_images, max_images)
