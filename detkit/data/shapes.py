"""The embedded default dataset: deterministic synthetic shapes written as a real COCO dataset.

``ShapesDataset`` draws coloured circles, squares, triangles and stars (sizes from a few pixels to
most of the image, so every FPN level gets positives) on smooth textured, noisy backgrounds,
writes PNGs plus a COCO json into a cache folder keyed by the generation parameters, and then
reads them back through :class:`CocoDataset`: the default run takes exactly the path a user's
dataset takes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

from detkit.data.coco import CocoDataset
from detkit.registry import DATASETS, ConfigError, config_path, positive_int

logger = logging.getLogger("detkit.data")

SHAPES = ("circle", "square", "triangle", "star")
GENERATOR_VERSION = 1  # bump when drawing changes, so caches of old pictures are not reused


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a regular triangle or a 5-point star of circumradius ``r``."""
    if kind == "triangle":
        radii, n = [r], 3
    else:
        radii, n = [r, 0.45 * r], 10
    return [(cx + radii[k % len(radii)] * math.cos(angle + 2 * math.pi * k / n),
             cy + radii[k % len(radii)] * math.sin(angle + 2 * math.pi * k / n)) for k in range(n)]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour blotches + a random sinusoidal texture + blocky noise, low saturation."""
    grid = rng.uniform(60, 200, (5, 5, 3)).astype(np.uint8)
    img = np.asarray(Image.fromarray(grid).resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    img = 0.45 * img + 0.55 * img.mean(axis=2, keepdims=True)  # desaturate: shapes stay distinct
    yy, xx = np.mgrid[0:size, 0:size]
    theta, freq = rng.uniform(0, math.pi), rng.uniform(0.05, 0.5)
    img += rng.uniform(0, 18) * np.sin(freq * (math.cos(theta) * xx + math.sin(theta) * yy))[..., None]
    block = max(size // 64, 1)
    noise = rng.normal(0, 7, (size // block + 1, size // block + 1, 1))
    img += noise.repeat(block, 0).repeat(block, 1)[:size, :size]
    return np.clip(img, 0, 255).astype(np.uint8)


def _overlaps_too_much(box: tuple[float, ...], placed: list[tuple[float, ...]], limit: float) -> bool:
    """True when ``box`` would cover more than ``limit`` of an earlier box (or vice versa)."""
    x1, y1, x2, y2 = box
    for a1, b1, a2, b2 in placed:
        inter = max(0.0, min(x2, a2) - max(x1, a1)) * max(0.0, min(y2, b2) - max(y1, b1))
        if inter > limit * min((x2 - x1) * (y2 - y1), (a2 - a1) * (b2 - b1)):
            return True
    return False


def draw_image(seed: int, index: int, size: int, classes: Sequence[str], min_objects: int,
               max_objects: int, min_size: float, max_size: float, max_overlap: float
               ) -> tuple[np.ndarray, list[tuple[int, list[float]]]]:
    """Image ``index`` of generation ``seed``: ``uint8 (size, size, 3)`` and ``[(class, xywh)]``.

    Each image has its own RNG stream (seed, index), so images are independent of the order
    and the number of worker processes that draw them.
    """
    rng = np.random.default_rng([seed, index])
    image = Image.fromarray(_background(rng, size))
    draw = ImageDraw.Draw(image)
    placed: list[tuple[float, ...]] = []
    objects = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _attempt in range(20):
            cls = int(rng.integers(len(classes)))
            side = float(math.exp(rng.uniform(math.log(min_size), math.log(max_size))))
            cx, cy = rng.uniform(side / 2, size - side / 2, 2)
            kind = classes[cls]
            if kind in ("circle", "square"):
                pts = [(cx - side / 2, cy - side / 2), (cx + side / 2, cy + side / 2)]
            else:
                pts = _polygon(kind, cx, cy, side / 2, float(rng.uniform(0, 2 * math.pi)))
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            box = (min(xs), min(ys), max(xs), max(ys))
            if not _overlaps_too_much(box, placed, max_overlap):
                break
        else:
            continue  # image too crowded for another object
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if max(colour) - min(colour) < 80:  # keep colours saturated against the grey-ish ground
            colour = tuple(int(c) for c in np.roll([int(rng.integers(200, 256)), int(rng.integers(0, 60)),
                                                     int(rng.integers(0, 256))], int(rng.integers(3))))
        if kind == "circle":
            draw.ellipse(pts, fill=colour)
        elif kind == "square":
            draw.rectangle(pts, fill=colour)
        else:
            draw.polygon(pts, fill=colour)
        placed.append(box)
        x1, y1, x2, y2 = (round(v, 2) for v in box)
        objects.append((cls, [x1, y1, round(x2 - x1, 2), round(y2 - y1, 2)]))
    return np.asarray(image), objects


def _write_image(args: tuple) -> list[tuple[int, list[float]]]:
    folder, index, draw_args = args
    pixels, objects = draw_image(index=index, **draw_args)
    Image.fromarray(pixels).save(Path(folder) / f"{index:06d}.png", compress_level=1)
    return objects


def generate_shapes(root: Path, num_images: int, workers: int, **draw_args) -> None:
    """Write ``root/images/*.png`` and ``root/annotations.json`` (atomically, via a temp folder)."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    try:
        (tmp / "images").mkdir()
        jobs = [(tmp / "images", i, draw_args) for i in range(num_images)]
        if workers > 1 and num_images >= 64:
            with ProcessPoolExecutor(workers) as pool:
                per_image = list(pool.map(_write_image, jobs, chunksize=32))
        else:
            per_image = [_write_image(job) for job in jobs]
        size = draw_args["size"]
        images = [{"id": i + 1, "file_name": f"{i:06d}.png", "width": size, "height": size}
                  for i in range(num_images)]
        annotations: list[dict[str, Any]] = []
        for i, objects in enumerate(per_image):
            for cls, (x, y, w, h) in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": cls + 1,
                                    "bbox": [x, y, w, h], "area": round(w * h, 2), "iscrowd": 0})
        categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                      for i, name in enumerate(draw_args["classes"])]
        coco = {"info": {"description": "detkit synthetic shapes", "version": GENERATOR_VERSION},
                "images": images, "annotations": annotations, "categories": categories}
        (tmp / "annotations.json").write_text(json.dumps(coco, separators=(",", ":")))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (root / "annotations.json").is_file():  # lost a race only if the winner finished
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@DATASETS.register()
class ShapesDataset(CocoDataset):
    """Synthetic shapes (the default dataset), generated once into ``root`` and read as COCO.

    Args:
        num_images: images to generate. image_size: square side in pixels. seed: generation seed
            (use different seeds for train and val).
        root: cache folder; each parameter set gets its own sub-folder, reused when it exists.
        classes: any of ``circle, square, triangle, star``. min_objects/max_objects: per image.
        min_size: smallest object side (pixels). max_size_frac: largest side as a fraction of the image.
        max_overlap: an object covers at most this fraction of another one (partial occlusion).
        workers: processes used to generate (0: all cores).
    """

    def __init__(self, num_images: int = 2000, image_size: int = 256, seed: int = 0,
                 root: str = "data_cache/shapes", classes: Sequence[str] = SHAPES, min_objects: int = 1,
                 max_objects: int = 8, min_size: float = 6.0, max_size_frac: float = 0.9,
                 max_overlap: float = 0.4, workers: int = 0,
                 transforms: Sequence[dict] | Callable | None = None, filter_empty: bool = False) -> None:
        unknown = [c for c in classes if c not in SHAPES]
        if unknown:
            raise ConfigError(f"{config_path('classes')}: unknown shapes {unknown}; choose from {list(SHAPES)}")
        positive_int(num_images, "num_images")
        positive_int(image_size, "image_size", minimum=16)
        draw_args = dict(seed=int(seed), size=int(image_size), classes=list(classes),
                         min_objects=int(min_objects), max_objects=int(max_objects), min_size=float(min_size),
                         max_size=float(max_size_frac) * image_size, max_overlap=float(max_overlap))
        key = json.dumps({"num_images": num_images, "version": GENERATOR_VERSION, **draw_args}, sort_keys=True)
        folder = Path(root) / f"shapes_{hashlib.sha1(key.encode()).hexdigest()[:12]}"
        if not (folder / "annotations.json").is_file():
            logger.info("generating %d shapes images into %s", num_images, folder)
            generate_shapes(folder, int(num_images), workers or os.cpu_count() or 1, **draw_args)
        self.root = folder
        super().__init__(str(folder / "annotations.json"), str(folder / "images"), transforms, filter_empty)


@DATASETS.register()
class SmallShapesDataset(ShapesDataset):
    """Small objects in large images: :class:`ShapesDataset` at ``image_size`` 1024 with ``min_objects`` to
    ``max_objects`` shapes of ``min_size`` to ``max_size`` pixels (6-24: COCO's "small", under 32^2 pixels),
    for tiled training and sliced inference (``configs/fcos/fcos_r18_fpn_shapes_tiles.yaml``). Generated on
    first use into ``root`` and cached like the default; the arguments are the default's, ``max_size``
    in pixels rather than a fraction of the image."""

    def __init__(self, num_images: int = 200, image_size: int = 1024, seed: int = 0,
                 root: str = "data_cache/shapes", classes: Sequence[str] = SHAPES, min_objects: int = 10,
                 max_objects: int = 40, min_size: float = 6.0, max_size: float = 24.0, max_overlap: float = 0.4,
                 workers: int = 0, transforms: Sequence[dict] | Callable | None = None,
                 filter_empty: bool = False) -> None:
        positive_int(image_size, "image_size", minimum=16)
        if (not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (min_size, max_size))
                or not 0 < min_size <= max_size <= image_size):
            raise ConfigError(f"{config_path('min_size')}, max_size must be numbers with 0 < min_size <= max_size <= "
                              f"image_size ({image_size}), got {min_size!r}, {max_size!r}")
        super().__init__(num_images, image_size, seed, root, classes, min_objects, max_objects, min_size,
                         max_size / image_size, max_overlap, workers, transforms, filter_empty)
