"""Drawing boxes with class names (and scores) on uint8 images, for people to look at."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3"]


def _text_colour(hex_colour: str) -> str:
    r, g, b = (int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 150 else "white"


def draw_detections(image: Tensor, boxes: Tensor, labels: Tensor, classes: Sequence[str],
                    scores: Tensor | None = None) -> Tensor:
    """``uint8 (3, H, W)`` image with ``boxes (n, 4)`` x1y1x2y2 drawn and named -> ``uint8 (3, H, W)``.

    Line width and font size follow the image size (a 10 px font on a 128 px image, about 19 px
    at 640x480); each label sits on a filled background of its box colour, above the box when
    there is room, so it stays readable on any image.
    """
    image = image.to(torch.uint8).cpu()
    if len(boxes) == 0:
        return image
    short = min(image.shape[-2:])
    names = [classes[int(i)] if int(i) < len(classes) else str(int(i)) for i in labels]
    if scores is not None:
        names = [f"{n} {float(s):.2f}" for n, s in zip(names, scores)]
    colours = [PALETTE[int(i) % len(PALETTE)] for i in labels]
    boxes = boxes.detach().float().cpu()
    drawn = draw_bounding_boxes(image, boxes, colors=colours, width=max(1, round(short / 240)))
    canvas = Image.fromarray(drawn.permute(1, 2, 0).numpy())
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=max(10, round(short / 25)))
    for (x1, y1, _, _), name, colour in zip(boxes.tolist(), names, colours):
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        w, h = right - left + 4, bottom - top + 4
        y = y1 - h if y1 - h >= 0 else y1
        x = min(max(x1, 0), max(canvas.width - w, 0))
        draw.rectangle((x, y, x + w, y + h), fill=colour)
        draw.text((x + 2 - left, y + 2 - top), name, fill=_text_colour(colour), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).permute(2, 0, 1)


def save_grid(images: Sequence[Tensor], path: str | Path, nrow: int = 4) -> None:
    """Save images (``uint8 (3, h, w)``, sizes may differ) as one PNG grid."""
    height = max(i.shape[-2] for i in images)
    width = max(i.shape[-1] for i in images)
    padded = [torch.nn.functional.pad(i, (0, width - i.shape[-1], 0, height - i.shape[-2])) for i in images]
    write_png(make_grid(padded, nrow=nrow, padding=4), str(path))
