"""Shared fixtures: small generated datasets and the path of the real BCCD data when present."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from PIL import Image

from detkit.engine import watchdog as stall_watchdog

BCCD = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "bccd"


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture(autouse=True)
def _no_stall_stop_left() -> Iterator[None]:
    """A stall watchdog's process-wide flags left set would make every later CLI error wait and vanish."""
    yield
    assert not stall_watchdog.STOPPING.is_set() and not stall_watchdog.RUNNING.is_set()


def write_coco(folder: Path, images: list[dict], annotations: list[dict],
               categories: list[dict] | None = None) -> Path:
    """Write a COCO json plus solid-colour PNGs for ``images`` into ``folder``; returns the json path."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for img in images:
        pixels = np.full((img["height"], img["width"], 3), (img["id"] * 40) % 256, dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / img["file_name"])
    categories = categories or [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}, {"id": 5, "name": "bird"}]
    path = folder / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path


@pytest.fixture
def coco_fixture(tmp_path: Path) -> Path:
    """3 images (one without boxes), categories with non-contiguous ids 3, 5, 7, one crowd box."""
    images = [{"id": 1, "file_name": "a.png", "width": 64, "height": 48},
              {"id": 2, "file_name": "b.png", "width": 40, "height": 40},
              {"id": 3, "file_name": "c.png", "width": 32, "height": 32}]
    annotations = [
        {"id": 10, "image_id": 1, "category_id": 7, "bbox": [4, 6, 20, 10], "area": 200, "iscrowd": 0},
        {"id": 11, "image_id": 1, "category_id": 3, "bbox": [30, 20, 10.5, 8], "area": 84, "iscrowd": 0},
        {"id": 12, "image_id": 2, "category_id": 5, "bbox": [1, 2, 3, 4], "area": 12, "iscrowd": 0},
        {"id": 13, "image_id": 2, "category_id": 3, "bbox": [0, 0, 40, 40], "area": 1600, "iscrowd": 1},
    ]
    return write_coco(tmp_path, images, annotations)
