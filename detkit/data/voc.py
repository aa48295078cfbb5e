"""Pascal VOC xml datasets, converted once to a COCO dict and read through :class:`CocoDataset`."""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from detkit.data.annotations import (
    DatasetError,
    ImageRecord,
    build_coco,
    check_box,
    check_class_list,
    check_known,
    index_coco,
)
from detkit.data.coco import CocoDataset
from detkit.registry import DATASETS

logger = logging.getLogger("detkit.data")


@dataclass
class VocImage:
    """One parsed xml: image file name and size, and per object ``(name, (x1, y1, x2, y2), difficult)``
    in 0-based pixel coordinates."""

    file_name: str
    width: int
    height: int
    objects: list[tuple[str, tuple[float, float, float, float], bool]]


def _positive_int(root: ET.Element, tag: str, path: Path) -> int:
    text = (root.findtext(f"size/{tag}") or "").strip()
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise DatasetError(f"{path}: <size><{tag}> must be a positive number of pixels, got {text!r}; "
                           f"write the image's size into the xml")
    return value


def parse_voc_xml(path: Path) -> VocImage:
    """Read one VOC annotation. VOC's coordinates are 1-based pixel indices (inclusive): as detectron2
    does, ``xmin, ymin`` become ``xmin - 1, ymin - 1`` and ``xmax, ymax`` are kept, so ``(1, 1, W, H)``
    is the whole image ``(0, 0, W, H)``."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DatasetError(f"{path}: not valid XML ({err})") from None
    if root.tag != "annotation":
        raise DatasetError(f"{path}: not a Pascal VOC annotation: the root element is <{root.tag}>, "
                           f"expected <annotation>")
    width, height = _positive_int(root, "width", path), _positive_int(root, "height", path)
    objects = []
    for k, obj in enumerate(root.findall("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DatasetError(f"{path}: object {k} has no <name>")
        where = f"{path}: object {k} ({name!r})"
        texts = [(obj.findtext(f"bndbox/{tag}") or "").strip() for tag in ("xmin", "ymin", "xmax", "ymax")]
        try:
            x1, y1, x2, y2 = (float(t) for t in texts)
        except ValueError:
            raise DatasetError(f"{where}: <bndbox> needs numeric <xmin> <ymin> <xmax> <ymax>, got "
                               f"{texts}") from None
        box = (x1 - 1.0, y1 - 1.0, x2, y2)
        check_box(box, width, height, where)
        difficult = (obj.findtext("difficult") or "0").strip()
        if difficult not in ("0", "1"):
            raise DatasetError(f"{where}: <difficult> must be 0 or 1, got {difficult!r}")
        objects.append((name, box, difficult == "1"))
    file_name = (root.findtext("filename") or "").strip() or f"{path.stem}.jpg"
    return VocImage(file_name, width, height, objects)


def _annotation_files(ann_dir: Path) -> dict[str, Path]:
    """The xml files of ``ann_dir`` (``a.XML`` too) by image id (the name without ``.xml``); two files
    for one id (``a.xml`` and ``a.XML``) are a :class:`DatasetError` naming both."""
    found: dict[str, Path] = {}
    for xml in sorted(ann_dir.iterdir()):
        if xml.suffix.lower() == ".xml" and xml.is_file():
            if xml.stem in found:
                raise DatasetError(f"{found[xml.stem]} and {xml} both annotate the image id {xml.stem!r}: "
                                   f"remove one of them")
            found[xml.stem] = xml
    return found


def _xml_files(root: Path, split_file: str | None, ann_dir: Path) -> list[Path]:
    """The split's xml files: one per id listed in ``split_file`` (first word of each line), or every
    ``*.xml`` of ``ann_dir``."""
    if not ann_dir.is_dir():
        raise FileNotFoundError(f"VOC annotation folder not found: {ann_dir} (ann_dir)")
    by_id = _annotation_files(ann_dir)
    if split_file is None:
        if not by_id:
            raise DatasetError(f"{ann_dir}: no .xml files (ann_dir); point ann_dir at the VOC Annotations folder")
        return list(by_id.values())
    split = root / split_file
    if not split.is_file():
        raise FileNotFoundError(f"VOC split file not found: {split} (split_file)")
    try:
        lines = split.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DatasetError(f"{split}: not UTF-8 text ({err}); a split file lists one image id per line") from None
    files: list[Path] = []
    listed: dict[str, int] = {}
    for line_no, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        image_id = line.split()[0]
        if image_id not in by_id:
            raise FileNotFoundError(f"{split} line {line_no} lists {image_id!r}, but {ann_dir / image_id}.xml "
                                    f"does not exist")
        if image_id in listed:
            raise DatasetError(f"{split} lists {image_id!r} twice (lines {listed[image_id]} and {line_no}); "
                               f"list each image once")
        listed[image_id] = line_no
        files.append(by_id[image_id])
    if not files:
        raise DatasetError(f"{split}: lists no image ids (split_file)")
    return files


def _folder_names(ann_dir: Path, parsed: dict[Path, VocImage]) -> set[str]:
    """Every object name in ``ann_dir``'s xml files (the split's are already ``parsed``)."""
    names = {o[0] for image in parsed.values() for o in image.objects}
    for xml in _annotation_files(ann_dir).values():
        if xml not in parsed:
            names |= {o[0] for o in parse_voc_xml(xml).objects}
    return names


def _check_one_xml_per_image(parsed: dict[Path, VocImage]) -> None:
    """Two xml files naming the same ``<filename>`` would train that image twice (with either's boxes)
    and the image meant by the other never: a :class:`DatasetError` naming both files."""
    first: dict[str, Path] = {}
    for xml, image in parsed.items():
        if image.file_name in first:
            raise DatasetError(f"{first[image.file_name]} and {xml} both name the image {image.file_name!r} in "
                               f"<filename>; fix the <filename> of the one that labels another image")
        first[image.file_name] = xml


def voc_to_coco(data_root: str, split_file: str | None = None, ann_dir: str = "Annotations",
                classes: Sequence[str] | None = None) -> tuple[dict, list[Path]]:
    """A COCO dict of a VOC split, and the xml file of each image (image id ``i + 1``).

    ``classes`` (labels ``0..k-1`` in this order; objects of other classes are dropped) defaults to
    the sorted names found in every xml of ``ann_dir``, not only the split's, so that train and val
    splits sharing an Annotations folder get the same labels. ``difficult`` objects become crowd
    boxes: ignored by pycocotools and left out of training targets.
    """
    root, folder = Path(data_root), Path(data_root, ann_dir)
    files = _xml_files(root, split_file, folder)
    parsed = {xml: parse_voc_xml(xml) for xml in files}
    _check_one_xml_per_image(parsed)
    if classes is None:
        names = sorted(_folder_names(folder, parsed))
    else:
        names = check_class_list(classes)
        in_split = {o[0] for image in parsed.values() for o in image.objects}
        if not set(names) <= in_split:  # a class absent from this split may be in another split's xml
            check_known(names, sorted(_folder_names(folder, parsed)), folder)
    label = {name: i for i, name in enumerate(names)}
    records, dropped = [], 0
    for image in parsed.values():
        boxes = [(label[n], box, difficult) for n, box, difficult in image.objects if n in label]
        dropped += len(image.objects) - len(boxes)
        records.append(ImageRecord(image.file_name, image.width, image.height, boxes))
    if dropped:
        logger.info("%s: left out %d objects of classes not in 'classes'", folder, dropped)
    return build_coco(records, names, f"Pascal VOC {root / (split_file or ann_dir)}"), files


@DATASETS.register()
class VOCDataset(CocoDataset):
    """Pascal VOC xml labels, converted to COCO in memory (same items, classes, cat_ids, coco as CocoDataset).

    The layout VOC and labelling tools write: ``Annotations/*.xml``, ``JPEGImages/``, ``ImageSets/Main/*.txt``.

    Args:
        data_root: the VOC folder; the other paths are relative to it.
        split_file: a list of image ids (``ImageSets/Main/train.txt``), or null for every xml of ``ann_dir``.
        ann_dir: the xml folder. img_dir: the image folder (each xml's ``<filename>``, else ``<id>.jpg``).
        classes: class names as labels ``0..k-1`` in this order (objects of other classes are left
            out); null: the sorted names found in every xml of ``ann_dir``.
        transforms, filter_empty, skip_bad_images, max_images: as for :class:`CocoDataset`.
    """

    def __init__(self, data_root: str, split_file: str | None = None, ann_dir: str = "Annotations",
                 img_dir: str = "JPEGImages", classes: Sequence[str] | None = None,
                 transforms: Sequence[dict] | Callable | None = None, filter_empty: bool = False,
                 skip_bad_images: bool = False, max_images: int | None = None) -> None:
        self.ann_file = Path(data_root, split_file or ann_dir)
        img_folder = Path(data_root, img_dir)
        if not img_folder.is_dir():
            raise FileNotFoundError(f"image folder not found: {img_folder} (img_dir of {self.ann_file})")
        dataset, self.xml_files = voc_to_coco(data_root, split_file, ann_dir, classes)
        self._setup(index_coco(dataset, self.ann_file), img_folder, transforms, filter_empty, skip_bad_images,
                    max_images)

    def source(self, image_id: int) -> str:
        return str(self.xml_files[image_id - 1])
