"""eval.backend: faster_coco_eval gives pycocotools' 12 COCO numbers on shapes; the eval section's errors."""

from __future__ import annotations

import builtins

import numpy as np
import pytest

from detkit.data import ShapesDataset
from detkit.engine.evaluator import EvalBackendMissing, EvalSettings, run_cocoeval
from detkit.registry import ConfigError


def jittered_detections(coco, seed: int = 0) -> list[dict]:
    """Each ground-truth box moved by a few pixels (some with another class, some dropped) plus random
    boxes, with random scores: AP somewhere between 0 and 1, every matching rule exercised."""
    rng = np.random.default_rng(seed)
    cats = sorted(coco.getCatIds())
    results = []
    for ann in coco.dataset["annotations"]:
        if rng.uniform() < 0.15:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy = rng.normal(0, 0.06 * w), rng.normal(0, 0.06 * h)
        cat = ann["category_id"] if rng.uniform() < 0.85 else int(rng.choice(cats))
        results.append({"image_id": ann["image_id"], "category_id": cat, "score": float(rng.uniform(0.05, 1)),
                        "bbox": [x + dx, y + dy, w * rng.uniform(0.9, 1.1), h * rng.uniform(0.9, 1.1)]})
    for image_id in coco.getImgIds():
        for x, y, s in rng.uniform(0, 48, (3, 3)):
            results.append({"image_id": image_id, "category_id": int(rng.choice(cats)),
                            "score": float(rng.uniform(0.05, 0.6)), "bbox": [float(x), float(y), 4 + s, 4 + s]})
    return results


def test_faster_coco_eval_gives_pycocotools_numbers_on_shapes(tmp_path):
    pytest.importorskip("faster_coco_eval")
    dataset = ShapesDataset(num_images=24, image_size=64, seed=1, root=str(tmp_path))
    results = jittered_detections(dataset.coco)
    reference = run_cocoeval(dataset.coco, results, dataset.ids, "pycocotools")
    fast = run_cocoeval(dataset.coco, results, dataset.ids, "faster_coco_eval")
    assert 0.2 < reference.stats[0] < 0.9  # a discriminating case, not all zeros or ones
    np.testing.assert_allclose(np.asarray(fast.stats[:12]), np.asarray(reference.stats[:12]), atol=1e-4)
    np.testing.assert_allclose(fast.eval["precision"], reference.eval["precision"], atol=1e-4)


def test_eval_section_is_checked():
    assert EvalSettings.from_config({}) == EvalSettings()
    with pytest.raises(ConfigError, match="eval.backend must be one of pycocotools, faster_coco_eval"):
        EvalSettings.from_config({"eval": {"backend": "detectron2"}})
    with pytest.raises(ConfigError, match="backnd"):
        EvalSettings.from_config({"eval": {"backnd": "pycocotools"}})
    with pytest.raises(ConfigError, match=r"eval.score_thr must be a number in \[0, 1\]"):
        EvalSettings.from_config({"eval": {"score_thr": 3}})


def test_a_missing_faster_coco_eval_is_named_with_the_pip_command(monkeypatch):
    real_import = builtins.__import__

    def no_faster(name, *args, **kwargs):
        if name.startswith("faster_coco_eval"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faster)
    with pytest.raises(EvalBackendMissing, match="pip install faster-coco-eval"):
        EvalSettings.from_config({"eval": {"backend": "faster_coco_eval"}})
