"""Bad or unusual data: 16-bit images scaled (never wrapped), images too large for memory named with
the fix, a model with more classes than the dataset warned about and still evaluated."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from detkit.cli import main
from detkit.data import CocoDataset, DatasetError
from detkit.data.coco import decode_rgb
from tests.cli_runner import tiny_shapes

ROOT = Path(__file__).resolve().parents[1]


def write_png16(array: np.ndarray, path: Path) -> None:
    """A 16-bit PNG (gray ``(H, W)`` or RGB ``(H, W, 3)``), written by hand: PIL cannot write 16-bit RGB."""
    h, w = array.shape[:2]
    color = 0 if array.ndim == 2 else 2
    raw = b"".join(b"\x00" + array[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("shape", [(6, 8), (6, 8, 3)], ids=["gray16", "rgb16"])
def test_16_bit_images_are_scaled_to_8_bits(tmp_path, shape):
    values = (np.arange(np.prod(shape)).reshape(shape) * 1201 % 65536).astype(np.uint16)
    write_png16(values, tmp_path / "a.png")
    image = decode_rgb(tmp_path / "a.png")
    expected = torch.from_numpy((values >> 8).astype(np.uint8))
    expected = expected.expand(3, *shape) if len(shape) == 2 else expected.permute(2, 0, 1)
    assert image.dtype == torch.uint8 and torch.equal(image, expected)


def test_a_mixed_8_and_16_bit_batch_has_one_range(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    write_png16(np.full((32, 32, 3), 65535, np.uint16), tmp_path / "images/a.png")
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(tmp_path / "images/b.png")
    ann = {"images": [{"id": 1, "file_name": "a.png", "width": 32, "height": 32},
                      {"id": 2, "file_name": "b.png", "width": 32, "height": 32}],
           "annotations": [], "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    dataset = CocoDataset(ann_file=str(tmp_path / "ann.json"), img_dir=str(tmp_path / "images"))
    assert int(dataset[0][0].max()) == int(dataset[1][0].max()) == 255


def test_an_image_too_large_for_memory_names_the_image_and_the_fix(tmp_path, monkeypatch):
    from PIL import Image

    (tmp_path / "images").mkdir()
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "images/big.png")
    ann = {"images": [{"id": 7, "file_name": "big.png", "width": 50, "height": 40}], "annotations": [],
           "categories": [{"id": 1, "name": "x"}]}
    (tmp_path / "ann.json").write_text(json.dumps(ann))

    def out_of_memory(image, target):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    dataset = CocoDataset(ann_file=str(tmp_path / "ann.json"), img_dir=str(tmp_path / "images"))
    monkeypatch.setattr(dataset, "transforms", out_of_memory)
    with pytest.raises(DatasetError, match=r"image id 7 \(50x40\) is too large for memory .* add a Resize first"):
        dataset[0]


@pytest.mark.slow
def test_a_model_with_more_classes_than_the_data_warns_and_evaluates(tmp_path, capsys):
    data = tmp_path / "data"
    args = ["train", "--config", str(ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"), "--work-dir",
            str(tmp_path / "w"), "--device", "cpu", "--set", *tiny_shapes(data), "model.head.num_classes=6",
            "model.head.score_thr=0.0"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "the model has 6 classes but data.train has 4" in err
    evals = [json.loads(x) for x in (tmp_path / "w/metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert len(evals) == 1 and set(evals[0]["per_class"]) == {"circle", "square", "triangle", "star"}
