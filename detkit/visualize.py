"""Drawing boxes with class names (and scores) on uint8 images, for people to look at."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, make_grid

PALETTE = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6",
           "#bcf60c", "#fabebe", "#008080", "#e6beff", "#9a6324", "#fffac8", "#800000", "#aaffc3"]


def draw_detections(image: Tensor, boxes: Tensor, labels: Tensor, classes: Sequence[str],
                    scores: Tensor | None = None) -> Tensor:
    """``uint8 (3, H, W)`` image with ``boxes (n, 4)`` x1y1x2y2 drawn and named -> ``uint8 (3, H, W)``."""
    if len(boxes) == 0:
        return image.to(torch.uint8).cpu()
    names = [classes[int(i)] if int(i) < len(classes) else str(int(i)) for i in labels]
    if scores is not None:
        names = [f"{n} {float(s):.2f}" for n, s in zip(names, scores)]
    colours = [PALETTE[int(i) % len(PALETTE)] for i in labels]
    return draw_bounding_boxes(image.to(torch.uint8).cpu(), boxes.detach().float().cpu(), labels=names,
                               colors=colours, width=2)


def save_grid(images: Sequence[Tensor], path: str | Path, nrow: int = 4) -> None:
    """Save images (``uint8 (3, h, w)``, sizes may differ) as one PNG grid."""
    height = max(i.shape[-2] for i in images)
    width = max(i.shape[-1] for i in images)
    padded = [torch.nn.functional.pad(i, (0, width - i.shape[-1], 0, height - i.shape[-2])) for i in images]
    write_png(make_grid(padded, nrow=nrow, padding=4), str(path))
