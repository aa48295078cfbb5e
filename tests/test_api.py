"""The Python API, inference that never destroys input, and weights-only checkpoint loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import detkit
from detkit.config import load_config
from detkit.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from detkit.models import build_detector

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"
CENTERNET_CFG = ROOT / "configs/centernet/centernet_r18_shapes.yaml"
SMALL = ["model.neck.out_channels=16", "model.head.feat_channels=16", "model.head.num_convs=1"]


def write_checkpoint(path: Path, cfg_path: Path = FCOS_CFG, overrides=SMALL, transforms=None) -> dict:
    """An inference checkpoint of a randomly initialised small detector (no training needed)."""
    cfg = load_config(cfg_path, overrides)
    if transforms is not None:
        cfg["data"]["val"]["transforms"] = transforms
    torch.manual_seed(0)
    model = build_detector(cfg["model"])
    save_checkpoint({"model": model.state_dict(), "config": cfg, "classes": ["circle", "square", "triangle", "star"],
                     "cat_ids": [1, 2, 3, 4], "inference_only": True}, path)
    return cfg


def image_files(folder: Path, sizes=((48, 64), (64, 40), (32, 32))) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate(sizes):
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_readme_python_api_example_runs(tmp_path):
    ckpt = tmp_path / "best.pth"
    write_checkpoint(ckpt)
    a, b = image_files(tmp_path / "imgs")[:2]
    model = detkit.load_detector(ckpt, device="auto")
    dets = model.predict([str(a), str(b)], score_thr=0.0)
    assert len(dets) == 2 and model.classes == ["circle", "square", "triangle", "star"]
    for det, (h, w) in zip(dets, [(48, 64), (64, 40)]):
        assert set(det) == {"boxes", "scores", "labels"} and det["boxes"].shape[1] == 4 and len(det["boxes"]) > 0
        assert det["boxes"].dtype == torch.float32 and det["labels"].dtype == torch.int64
        assert (det["boxes"][:, 0::2] <= w).all() and (det["boxes"][:, 1::2] <= h).all() and (det["boxes"] >= 0).all()
        assert torch.all(det["scores"][:-1] >= det["scores"][1:])


def test_every_input_kind_gives_the_same_detections(tmp_path):
    ckpt = tmp_path / "m.pth"
    write_checkpoint(ckpt, transforms=[{"type": "Resize", "size": 160}])  # boxes must come back in file pixels
    path = image_files(tmp_path / "imgs")[0]
    pil = Image.open(path)
    array = np.array(pil.convert("RGB"))
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    model = detkit.load_detector(ckpt, device="cpu")
    outs = [model.predict(x, score_thr=0.0)[0] for x in (path, str(path), pil, array, tensor, tensor.float() / 255)]
    for out in outs[1:]:
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(out[key], outs[0][key]), key
    batched = model.predict([path, pil], score_thr=0.0)  # same size: same padding, same detections
    for b in batched:  # (to float rounding: a batch of 2 may take another convolution algorithm)
        torch.testing.assert_close(b["boxes"][:20], outs[0]["boxes"][:20], atol=1e-3, rtol=0)
        assert torch.equal(b["labels"][:20], outs[0]["labels"][:20])
    assert outs[0]["boxes"][:, 2].max() <= 64 and outs[0]["boxes"][:, 3].max() <= 48
    with pytest.raises(ValueError, match="score_thr must lie in"):
        model.predict(path, score_thr=2)
    with pytest.raises(ValueError, match=r"float tensor images must be in 0\.\.1"):
        model.predict(tensor.float(), score_thr=0.0)  # 0..255 floats: refused, not clamped to white


def test_sixteen_bit_pil_images_are_scaled_like_files():
    from detkit.api import to_uint8_chw

    values = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000)
    image = to_uint8_chw(Image.fromarray(values))
    assert image.shape == (3, 3, 4) and torch.equal(image[0], torch.from_numpy((values >> 8).astype(np.uint8)))


@pytest.mark.slow
def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(1)}, "x": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pth.*could run code"):
        load_checkpoint(path)
    assert not marker.exists()
    proc = subprocess.run([sys.executable, str(ROOT / "tools/infer.py"), "--checkpoint", str(path), "--images",
                           str(image_files(tmp_path / "imgs")[0]), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 1 and "refusing to load" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()


def infer(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools/infer.py"), *args], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.slow
def test_infer_keeps_relative_paths_and_never_overwrites_inputs(tmp_path, capsys):
    ckpt = tmp_path / "m.pth"
    write_checkpoint(ckpt)
    data = tmp_path / "data"
    image_files(data / "a")
    image_files(data / "b", [(40, 40)])
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(data / "a" / "img0.jpg")  # same stem, other suffix
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    proc = infer("--checkpoint", str(ckpt), "--images", str(data), "--out", str(tmp_path / "out"),
                 "--score-thr", "0.0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert written == ["a/img0.jpg.png", "a/img0.png", "a/img1.png", "a/img2.png", "b/img0.png"]
    assert "read 5 images, 5 with detections (score >= 0.00); wrote 5 drawings" in proc.stderr
    results = json.loads((tmp_path / "out/results.json").read_text())
    assert {r["image_id"] for r in results} == set(range(5)) and {r["category_id"] for r in results} <= {1, 2, 3, 4}
    from detkit.cli import main

    for bad, message in [(["--out", str(data / "a")], "is an input folder"),
                         (["--out", str(tmp_path / "o2"), "--score-thr", "1.5"], "--score-thr must lie in [0, 1]")]:
        assert main(["infer", "--checkpoint", str(ckpt), "--images", str(data / "a"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    # drawing a.png into the folder that holds it would overwrite it
    assert main(["infer", "--checkpoint", str(ckpt), "--images", str(data / "a" / "img0.png"), "--out",
                 str(data / "a")]) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert before == {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_weights_of_another_detector_get_one_named_error(tmp_path):
    ckpt = tmp_path / "centernet.pth"
    write_checkpoint(ckpt, CENTERNET_CFG, ["model.neck.channels=[32,16,16]", "model.head.feat_channels=16"])
    proc = infer("--checkpoint", str(ckpt), "--config", str(FCOS_CFG), "--images",
                 str(image_files(tmp_path / "imgs")[0]), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "centernet.pth: its weights do not fit this config's model (FCOS)" in proc.stderr


def test_batchnorm_folding_keeps_the_outputs():
    import copy

    from detkit.models.fuse import fold_batchnorm

    torch.manual_seed(0)
    model = build_detector(load_config(FCOS_CFG, SMALL)["model"])
    with torch.no_grad():  # BatchNorms with statistics and affine terms far from the identity
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1), m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5), m.bias.uniform_(-0.5, 0.5)
    model.eval()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images)
        folded = fold_batchnorm(copy.deepcopy(model)).to(memory_format=torch.channels_last)
        got = folded(images.contiguous(memory_format=torch.channels_last))
    norms = [m for m in folded.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    identities = [m for m in folded.backbone.modules() if isinstance(m, torch.nn.Identity)]
    assert not norms and len(identities) == 20  # ResNet-18: the stem, 16 block convs, 3 downsamples
    for want, have in zip(expected, got):
        for a, b in zip(want, have):
            torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="eval-mode"):
        fold_batchnorm(model.train())


def test_infer_finds_images_in_linked_folders_and_any_suffix_case(tmp_path):
    """``infer``'s folder search is the datasets' (``data.files.find_files``): ``A.JPG`` and a linked
    sub-folder are inputs, a link loop ends."""
    from detkit.infer import expand_image_paths

    shared, data = tmp_path / "shared", tmp_path / "data"
    image_files(shared, [(20, 20)])
    (data / "own").mkdir(parents=True)
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(data / "own" / "A.JPG")
    (data / "linked").symlink_to(shared, target_is_directory=True)
    (shared / "loop").symlink_to(shared, target_is_directory=True)
    names = [str(rel) for _, rel in expand_image_paths([str(data)])]
    assert names == ["linked/img0.png", "own/A.JPG.png"]
