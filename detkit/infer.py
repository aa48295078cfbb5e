"""Inference on image files and folders (``detkit infer``): each image with its detections drawn plus a
COCO-results json, never over an input."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

from detkit.api import DetectorModel
from detkit.data.coco import decode_rgb
from detkit.data.files import find_files
from detkit.engine.evaluator import coco_results
from detkit.registry import ConfigError
from detkit.visualize import draw_detections, save_grid

logger = logging.getLogger("detkit")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def expand_image_paths(paths: Sequence[str], skip: Path | None = None) -> list[tuple[Path, Path]]:
    """``(file, output name)`` per image: files as given, folders searched recursively (sorted).

    The output name keeps the path relative to the given folder (or the file name), with ``.png``
    appended unless it already ends so (``a.jpg`` -> ``a.jpg.png``), so no two inputs share one.
    Files under ``skip`` (the output folder) are not inputs.
    """
    found: list[tuple[Path, Path]] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = [f for f in find_files(p, IMAGE_SUFFIXES)  # linked sub-folders too, as datasets
                     if not (skip is not None and f.resolve().is_relative_to(skip))]
            found += [(f, f.relative_to(p)) for f in files]
        elif p.is_file():
            found.append((p, Path(p.name)))
        else:
            raise FileNotFoundError(f"image path not found: {p}")
    if not found:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {list(paths)}")
    outputs: dict[Path, Path] = {}
    pairs = []
    for file, rel in found:
        name = rel if rel.suffix.lower() == ".png" else rel.with_name(rel.name + ".png")
        if name in outputs:
            raise ConfigError(f"--images: {outputs[name]} and {file} would both be drawn to {name}; give them in "
                              f"separate runs or folders")
        outputs[name] = file
        pairs.append((file, name))
    return pairs


def check_output_folder(out: Path, images: Sequence[str], pairs: Sequence[tuple[Path, Path]]) -> None:
    """Refuse an ``--out`` whose files would overwrite an input."""
    out_resolved = out.resolve()
    inputs = {f.resolve() for f, _ in pairs}
    for name in ("results.json", "images.json"):
        if (out_resolved / name) in inputs:
            raise ConfigError(f"--out {out}: writing {name} would overwrite an input")
    for _, drawn in pairs:
        if (out_resolved / drawn).resolve() in inputs:
            raise ConfigError(f"--out {out}: the drawing of {drawn} would overwrite the input {out / drawn}")


def infer_images(detector: DetectorModel, images: Sequence[str], out_dir: str | os.PathLike, score_thr: float = 0.3,
                 batch_size: int = 8, tiles: dict[str, Any] | None = None) -> dict[str, int]:
    """Detect objects in ``images`` (files or folders) and write, under ``out_dir``, each image with its
    detections drawn (``<relative path>.png``), ``results.json`` (COCO results, ``image_id`` = position)
    and ``images.json`` (position -> file). ``tiles``: sliced inference (``DetectorModel.predict``'s
    ``tiles``). Returns the counts it reports."""
    if not 0.0 <= score_thr <= 1.0:
        raise ConfigError(f"--score-thr must lie in [0, 1], got {score_thr}")
    out = Path(out_dir)
    for given in map(Path, images):
        if given.is_dir() and given.resolve() == out.resolve():
            raise ConfigError(f"--out {out} is an input folder; choose another folder so no input is overwritten")
    pairs = expand_image_paths(images, skip=out.resolve())
    check_output_folder(out, images, pairs)
    results: list[dict[str, Any]] = []
    counts = {"read": 0, "with_detections": 0, "written": 0}
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        pixels = [decode_rgb(f) for f, _ in chunk]
        dets = detector.predict(pixels, score_thr=score_thr, batch_size=batch_size, tiles=tiles)
        for index, ((file, name), image, det) in enumerate(zip(chunk, pixels, dets), start):
            counts["read"] += 1
            counts["with_detections"] += int(len(det["scores"]) > 0)
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            save_grid([draw_detections(image, det["boxes"], det["labels"], detector.classes, det["scores"])],
                      target, nrow=1)
            counts["written"] += 1
            results += coco_results([det], [index], detector.cat_ids)
    (out / "results.json").write_text(json.dumps(results))
    (out / "images.json").write_text(json.dumps({i: str(f) for i, (f, _) in enumerate(pairs)}, indent=1))
    counts["written"] += 2
    logger.info("read %d images, %d with detections (score >= %.2f); wrote %d drawings, results.json and "
                "images.json to %s", counts["read"], counts["with_detections"], score_thr, counts["written"] - 2, out)
    return counts
