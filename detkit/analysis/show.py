"""``--show-dir``: each evaluated image with its ground truth (left) beside the predictions (right)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.io import write_png

from detkit.engine.run_log import progress
from detkit.files import is_inside
from detkit.registry import ConfigError
from detkit.visualize import draw_detections

GAP = 6  # pixels between the two halves
MIN_SIDE = 256  # smaller images are enlarged (nearest neighbour, integer factor) so that labels stay readable


def side_by_side(image: Tensor, target: dict[str, Any], boxes: Tensor, scores: Tensor, labels: Tensor,
                 classes: Sequence[str], score_thr: float) -> Tensor:
    """``uint8 (3, H, W)`` -> ``uint8 (3, H + header, 2 W + GAP)``: ground truth left, predictions with
    score >= ``score_thr`` right, each half captioned. Images under ``MIN_SIDE`` pixels are enlarged."""
    factor = -(-MIN_SIDE // min(image.shape[-2:]))
    if factor > 1:
        image = image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    gt_boxes = torch.as_tensor(target["boxes"]).float() * factor
    left = draw_detections(image, gt_boxes, target["labels"], classes)
    keep = scores >= score_thr
    right = draw_detections(image, boxes[keep] * factor, labels[keep], classes, scores[keep])
    h, w = image.shape[-2:]
    font = ImageFont.load_default(size=max(10, round(min(h, w) / 25)))
    header = int(font.getbbox("Ag")[3]) + 6  # pixels (Pillow types the box as floats)
    canvas = Image.new("RGB", (2 * w + GAP, h + header), "white")
    for x, half in ((0, left), (w + GAP, right)):
        canvas.paste(Image.fromarray(half.permute(1, 2, 0).numpy()), (x, header))
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), f"ground truth: {len(gt_boxes)}", fill="black", font=font)
    draw.text((w + GAP + 2, 2), f"predictions, score >= {score_thr:g}: {int(keep.sum())}", fill="black", font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def check_show_dir(show_dir: str | Path, image_dir: str | Path) -> None:
    """Refuse (before any evaluation) a ``--show-dir`` that is or lies under an existing file, or that is (inside)
    the dataset's image folder: the next load of a YOLO folder would count the drawings as unlabelled images."""
    show_dir = Path(show_dir)
    existing = next(p for p in (show_dir, *show_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(f"--show-dir {show_dir}: {existing} is a file; give a folder for the drawings")
    if is_inside(show_dir, image_dir):
        raise ConfigError(f"--show-dir {show_dir} is inside the dataset's image folder {image_dir}, where the drawings "
                          f"would be read as images; choose a folder outside it")


def write_show_dir(dataset: Any, results: Sequence[dict[str, Any]], show_dir: str | Path, score_thr: float) -> int:
    """Draw every item of ``dataset`` (built without transforms: original pixels, as ``results`` are)
    into ``show_dir/<file_name>.png``; returns the number of files written."""
    label_of = {c: i for i, c in enumerate(dataset.cat_ids)}
    by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        by_image[int(r["image_id"])].append(r)
    show_dir = Path(show_dir)
    for index in progress(range(len(dataset)), len(dataset), "show", True):
        image, target = dataset[index]
        dets = by_image.get(int(target["image_id"]), [])
        xywh = torch.tensor([d["bbox"] for d in dets], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        picture = side_by_side(image, target, boxes, torch.tensor([d["score"] for d in dets]),
                               torch.tensor([label_of[d["category_id"]] for d in dets], dtype=torch.int64),
                               dataset.classes, score_thr)
        name = dataset.coco.imgs[int(target["image_id"])]["file_name"]
        inside = Path(*[p for p in Path(name).parts if p not in ("..", "/")])  # never above show_dir
        path = show_dir / inside.with_name(Path(name).name + ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        write_png(picture, str(path))
    return len(dataset)
