"""Evaluation diagnostics: PR-curve data against pycocotools' precision array, the confusion matrix on
a hand-made case, EvalHook's eval_epoch_N/ and results.png in a tiny run, the analyze and
eval commands in process, and their error paths."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO

from detkit.analysis.confusion import (
    confusion_matrix,
    lowest_recall,
    match_detections,
    row_normalized,
)
from detkit.analysis.pr_curves import pr_curve_data
from detkit.cli import main
from detkit.engine.evaluator import run_cocoeval, summarize
from tests.cli_runner import run_main, tiny_shapes

ROOT = Path(__file__).resolve().parents[1]
FCOS_CFG = ROOT / "configs/fcos/fcos_r18_fpn_shapes.yaml"


def coco_gt(images: list[dict], annotations: list[dict], num_classes: int = 2) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "annotations": [{"id": i + 1, "iscrowd": 0, "area": a["bbox"][2] * a["bbox"][3],
                                                       **a} for i, a in enumerate(annotations)],
                    "categories": [{"id": c + 1, "name": f"c{c}"} for c in range(num_classes)]}
    coco.createIndex()
    return coco


def test_pr_curve_data_is_pycocotools_precision_array(capsys):
    rng = np.random.default_rng(0)
    images = [{"id": i, "width": 100, "height": 100, "file_name": f"{i}.png"} for i in range(1, 7)]
    anns = [{"image_id": i, "category_id": int(rng.integers(1, 4)), "bbox": [float(x), float(y), 20.0, 30.0]}
            for i in range(1, 7) for x, y in rng.uniform(0, 70, (3, 2))]
    gt = coco_gt(images, anns, num_classes=4)  # class 4 has no ground truth: NaN, as pycocotools' -1
    results = [{"image_id": a["image_id"], "category_id": a["category_id"] if rng.uniform() < 0.8 else 4,
                "bbox": [v + float(rng.normal(0, 3)) for v in a["bbox"]], "score": float(rng.uniform())}
               for a in anns] + [{"image_id": 1, "category_id": 1, "bbox": [1.0, 1.0, 9.0, 9.0], "score": 0.99}]
    ev = run_cocoeval(gt, results)
    data, precision = pr_curve_data(ev), ev.eval["precision"][:, :, :, 0, -1]  # (T, R, K)
    ref = np.where(precision > -1, precision, np.nan)
    np.testing.assert_array_equal(data["recall"], ev.params.recThrs)
    np.testing.assert_array_equal(data["iou50"], ref[0].T)  # iouThrs[0] == 0.5
    np.testing.assert_allclose(data["iou50_95"][:3], ref[:, :, :3].mean(axis=0).T)
    assert np.isnan(data["iou50_95"][3]).all() and np.isnan(data["ap"][3])
    per_class = summarize(ev, ["c0", "c1", "c2", "c3"])["per_class"]
    np.testing.assert_allclose(data["ap"][:3], [per_class[c] for c in ("c0", "c1", "c2")])
    assert np.nanmean(data["ap"]) == pytest.approx(ev.stats[0])  # COCO AP = mean over classes
    assert np.nanmean(data["ap50"]) == pytest.approx(ev.stats[1])


def test_confusion_matrix_of_a_hand_made_image():
    # GT: a (class 0), b (class 1), c (class 0, missed), a crowd box (class 1)
    anns = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10]},
            {"image_id": 1, "category_id": 2, "bbox": [20, 20, 10, 10]},
            {"image_id": 1, "category_id": 1, "bbox": [40, 0, 10, 10]},
            {"image_id": 1, "category_id": 2, "bbox": [60, 60, 30, 30], "iscrowd": 1}]
    gt = coco_gt([{"id": 1, "width": 100, "height": 100, "file_name": "x.png"},
                  {"id": 2, "width": 100, "height": 100, "file_name": "y.png"}], anns)
    results = [{"image_id": 1, "category_id": 1, "bbox": [1, 0, 10, 10], "score": 0.9},    # a, right class
               {"image_id": 1, "category_id": 1, "bbox": [0, 1, 10, 10], "score": 0.8},    # a again: duplicate -> FP
               {"image_id": 1, "category_id": 1, "bbox": [20, 21, 10, 10], "score": 0.7},  # b as class 0
               {"image_id": 1, "category_id": 2, "bbox": [0, 40, 10, 10], "score": 0.6},   # background as class 1
               {"image_id": 1, "category_id": 2, "bbox": [65, 65, 10, 10], "score": 0.6},  # inside the crowd: ignored
               {"image_id": 1, "category_id": 2, "bbox": [40, 0, 10, 10], "score": 0.2},   # c, under the score threshold
               {"image_id": 2, "category_id": 2, "bbox": [5, 5, 10, 10], "score": 0.5}]    # empty image: FP
    counts, matches = confusion_matrix(gt, results, [1, 2], iou_thr=0.5, score_thr=0.3)
    #                    pred c0 c1 background
    expected = np.array([[1, 0, 1],   # GT c0: a found, c missed
                         [1, 0, 0],   # GT c1: b taken for c0
                         [1, 2, 0]])  # background: the duplicate of a, two false c1
    np.testing.assert_array_equal(counts, expected)
    np.testing.assert_allclose(row_normalized(counts)[0], [0.5, 0, 0.5])
    first = matches[0]
    assert (first.num_gt, first.found, first.confused, first.missed, first.false_positives) == (3, 1, 1, 1, 2)
    assert [m["image_id"] for m in lowest_recall(matches, gt)] == [1]  # image 2 has no GT: no recall


def test_matching_prefers_the_right_class_over_a_higher_scored_confusion():
    gt_boxes = torch.tensor([[0.0, 0, 10, 10]])
    boxes = torch.tensor([[0.0, 0, 10, 10], [0.0, 0, 10, 9]])
    gt_match, det_match = match_detections(gt_boxes, torch.tensor([1]), boxes, torch.tensor([0.9, 0.5]),
                                           torch.tensor([0, 1]), 0.5)
    assert gt_match.tolist() == [1] and det_match.tolist() == [-1, 0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """One epoch of the tiny FCOS shapes config (evaluated at its end), through the real CLI."""
    root = tmp_path_factory.mktemp("run")
    overrides = [o for o in tiny_shapes(root / "data") if not o.startswith("eval.")]  # diagnostics on (default)
    proc = run_main("train", "--config", str(FCOS_CFG), "--work-dir", str(root / "work"), "--device", "cpu",
                    "--set", *overrides, "train.log_interval=1")
    assert proc.returncode == 0, proc.stderr
    return root


def test_eval_hook_writes_the_report_and_results_png(tiny_run):
    work = tiny_run / "work"
    report = work / "eval_epoch_1"
    for name in ("pr_curves.png", "confusion_matrix.png", "confusion_matrix.json", "per_class_ap.json",
                 "per_class_ap.md", "lowest_recall.json"):
        assert (report / name).is_file(), name
    assert (work / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    evals = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines() if '"eval"' in line]
    table = json.loads((report / "per_class_ap.json").read_text())
    confusion = json.loads((report / "confusion_matrix.json").read_text())
    assert (confusion["iou_thr"], confusion["score_thr"]) == (0.5, 0.3)
    for k, row in enumerate(table["classes"]):  # the table's AP is the evaluation's; GT rows sum to the GT count
        assert row["AP"] == pytest.approx(evals[-1]["per_class"][row["class"]], abs=1e-4)
        assert sum(confusion["counts"][k]) == row["gt_boxes"]
    gt_total = sum(r["gt_boxes"] for r in table["classes"])
    assert gt_total == sum(sum(r) for r in confusion["counts"][:-1]) > 0


def test_analyze_curves_overlays_runs_and_names_bad_input(tiny_run, tmp_path, capsys):
    work = str(tiny_run / "work")
    out = tmp_path / "curves.png"
    assert main(["analyze", "curves", work, work, "--keys", "bbox", "total", "AP", "--out", str(out)]) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert main(["analyze", "curves", work, "--keys", "bbx"]) == 2
    assert "unknown key 'bbx'. Did you mean 'bbox'?" in capsys.readouterr().err
    assert main(["analyze", "curves", str(tmp_path / "missing")]) == 2
    assert "run folder not found" in capsys.readouterr().err
    assert main(["analyze", "curves", str(tmp_path)]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text("")
    assert main(["analyze", "curves", str(tmp_path)]) == 2
    assert "holds no train or eval records" in capsys.readouterr().err


def test_analyze_dataset_counts_what_the_annotations_hold(tiny_run, tmp_path, capsys):
    args = ["dataset", "--config", str(FCOS_CFG), "--split", "val", "--out", str(tmp_path), "--set",
            *tiny_shapes(tiny_run / "data")]
    assert main(["analyze", *args]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "dataset_val.json").read_text())
    jsons = [json.loads(p.read_text()) for p in (tiny_run / "data").rglob("*.json")]
    coco = next(j for j in jsons if len(j.get("images", [])) == 2)  # the generated val json is the reference
    names = {c["id"]: c["name"] for c in coco["categories"]}
    expected = {n: sum(a["category_id"] == i for a in coco["annotations"]) for i, n in names.items()}
    per_image = [sum(a["image_id"] == img["id"] for a in coco["annotations"]) for img in coco["images"]]
    assert summary["classes"] == expected and summary["images"] == 2
    assert summary["boxes_per_image"]["min"] == min(per_image) and summary["boxes_per_image"]["max"] == max(per_image)
    assert f"{sum(expected.values())} boxes" in printed and (tmp_path / "dataset_val.png").is_file()
    assert main(["analyze", "dataset", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_eval_tool_writes_the_report_and_show_dir(tiny_run, tmp_path, capsys):
    args = ["--checkpoint", str(tiny_run / "work/model_final.pth"), "--work-dir", str(tmp_path / "ev"),
            "--device", "cpu", "--show-dir", str(tmp_path / "show"), "--set", *tiny_shapes(tiny_run / "data")]
    assert main(["eval", *args]) == 0
    assert (tmp_path / "ev/confusion_matrix.png").is_file() and (tmp_path / "ev/results.json").is_file()
    drawn = sorted(p.name for p in (tmp_path / "show").rglob("*.png"))
    assert len(drawn) == 2 and all(name.endswith(".png.png") for name in drawn)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "missing.pth"), "--show-dir", str(tmp_path / "s2")]) != 0
    assert "missing.pth" in capsys.readouterr().err and not (tmp_path / "s2").exists()
