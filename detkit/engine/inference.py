"""Inference on image files: drawn PNGs plus a COCO-results json."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
from torchvision import tv_tensors

from detkit.data.coco import decode_rgb
from detkit.data.collate import collate_detection
from detkit.data.transforms import build_transforms
from detkit.engine.checkpoint import load_checkpoint
from detkit.engine.evaluator import coco_results, to_original_coords
from detkit.engine.trainer import evaluation_weights
from detkit.models import build_detector
from detkit.visualize import draw_detections, save_grid

logger = logging.getLogger("detkit")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff"}


def expand_image_paths(paths: Sequence[str]) -> list[Path]:
    """Files as given, folders expanded to the images inside (sorted); missing paths are an error."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"image path not found: {p}")
    if not files:
        raise FileNotFoundError(f"no images found in {list(paths)}")
    return files


@torch.no_grad()
def infer_images(cfg: dict[str, Any], checkpoint: str, images: Sequence[str], out_dir: str,
                 score_thr: float = 0.3, device: str = "auto", batch_size: int = 4) -> list[dict[str, Any]]:
    """Detect objects in ``images`` with the weights of ``checkpoint`` (EMA weights when present).

    Each image goes through ``data.val.transforms`` like evaluation; boxes come back in the file's
    pixels. Writes ``out_dir/<stem>.png`` with boxes drawn and ``out_dir/results.json`` (COCO
    results; ``image_id`` = position in the list, file names in ``out_dir/images.json``).
    """
    dev = torch.device("cuda" if device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")
    state = load_checkpoint(checkpoint)
    model = build_detector(cfg["model"])
    model.load_state_dict(evaluation_weights(state))
    model.to(dev).eval()
    classes = state.get("classes") or [str(i) for i in range(model.num_classes)]
    cat_ids = state.get("cat_ids") or list(range(model.num_classes))
    pipeline = build_transforms(cfg["data"].get("val", {}).get("transforms", []))
    files = expand_image_paths(images)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    for start in range(0, len(files), batch_size):
        items, originals = [], []
        for index, path in enumerate(files[start:start + batch_size], start):
            image = decode_rgb(path)
            h, w = image.shape[-2:]
            target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(h, w)),
                      "labels": torch.zeros(0, dtype=torch.int64), "image_id": index, "orig_size": (h, w)}
            items.append(pipeline(tv_tensors.Image(image), target))
            originals.append((path, image))
        batch = collate_detection(items, int(cfg["data"].get("size_divisor", 32)))
        dets = model.predict(batch["images"].to(dev), batch["image_sizes"])
        for i, (det, (path, image)) in enumerate(zip(dets, originals)):
            pred = to_original_coords(det, batch["scale_factors"][i], batch["orig_sizes"][i])
            keep = pred["scores"] >= score_thr
            save_grid([draw_detections(image, pred["boxes"][keep], pred["labels"][keep], classes, pred["scores"][keep])],
                      out / f"{path.stem}.png", nrow=1)
            results += coco_results([pred], [batch["image_ids"][i]], cat_ids)
    (out / "results.json").write_text(json.dumps([r for r in results if r["score"] >= score_thr]))
    (out / "images.json").write_text(json.dumps({i: str(p) for i, p in enumerate(files)}, indent=1))
    logger.info("wrote %d images with detections (score >= %.2f) and results.json to %s", len(files), score_thr, out)
    return results
