"""TIDE error types (detkit.analysis.tide): each type alone on a hand-made image, sizes, pycocotools parity."""

import contextlib
import copy
import io
import json

import numpy as np
import pytest
from pycocotools.cocoeval import COCOeval

from detkit.analysis import AnalysisError, RunDataError
from detkit.analysis.tide import AREAS, ERRORS, tide_errors
from detkit.analysis.tide_plot import write_tide
from detkit.data.annotations import DatasetError, index_coco

A, B = 1, 2  # category ids of classes "a" and "b"


def coco(boxes, crowd=()):
    """One 200x200 image with ``boxes`` [(category id, [x, y, w, h])], plus crowd boxes of class a."""
    anns = [{"id": n + 1, "image_id": 1, "category_id": c, "bbox": b, "area": b[2] * b[3], "iscrowd": 0}
            for n, (c, b) in enumerate(boxes)]
    anns += [{"id": 100 + n, "image_id": 1, "category_id": A, "bbox": b, "area": b[2] * b[3], "iscrowd": 1}
             for n, b in enumerate(crowd)]
    return {"images": [{"id": 1, "width": 200, "height": 200, "file_name": "1.png"}],
            "categories": [{"id": A, "name": "a"}, {"id": B, "name": "b"}], "annotations": anns}


def det(cat, box, score):
    return {"image_id": 1, "category_id": cat, "bbox": box, "score": score}


BOX1, BOX2 = [0, 0, 10, 10], [50, 50, 10, 10]
FOUND2 = det(A, BOX2, 0.5)  # the second object of class a, found
# name: (ground truth, detections, dAP of that type (mean over classes; 101 recall points), class it lands in)
ALONE = {
    # a's AP: 1 of 2 objects at precision 1 (51 of 101 points) -> both found
    "Cls": ([(A, BOX1), (A, BOX2)], [det(B, BOX1, 0.9), FOUND2], 50 / 101, "a"),
    # IoU 0.3 (30 / 100): precision 0.5 up to recall 0.5 -> 1
    "Loc": ([(A, BOX1), (A, BOX2)], [det(A, [0, 0, 10, 3], 0.9), FOUND2], 75.5 / 101, "a"),
    # b: a wrong-class box at IoU 0.3 on an a object scored above b's hit: b's AP 0.5 -> 1, mean of 2 classes
    "Both": ([(A, BOX1), (B, BOX2)], [det(B, [0, 0, 10, 3], 0.9), det(A, BOX1, 0.7), det(B, BOX2, 0.5)], 0.25, "b"),
    # precision 1, then 2/3 over the upper half of recall -> 1
    "Dupl": ([(A, BOX1), (A, BOX2)], [det(A, BOX1, 0.9), det(A, [0, 0, 10, 8], 0.8), FOUND2], (50 / 3) / 101, "a"),
    # precision 2/3 everywhere -> 1
    "Bkg": ([(A, BOX1), (A, BOX2)], [det(A, [120, 120, 10, 10], 0.9), det(A, BOX1, 0.5), FOUND2], 1 / 3, "a"),
    # 1 of 2 found -> the missed one no longer counts
    "Miss": ([(A, BOX1), (A, BOX2)], [det(A, BOX2, 0.9)], 50 / 101, "a"),
}


@pytest.mark.parametrize("error", ERRORS)
def test_each_error_type_alone(error):
    boxes, dets, expected, cls = ALONE[error]
    report = tide_errors(coco(boxes), dets)
    j, k = ERRORS.index(error), report.classes.index(cls)
    assert report.dap_mean[0, j] == pytest.approx(expected, abs=1e-12)
    assert report.dap[0, j, k] > 0
    others = [e for e in range(len(ERRORS)) if e != j]
    assert np.all(report.dap_mean[0, others] == 0) and np.all(np.nan_to_num(report.dap[0, others]) == 0)
    assert report.counts[0].sum(axis=1).tolist() == [int(e == j) for e in range(len(ERRORS))]
    assert report.ap_mean[0] + report.dap_mean[0, j] == pytest.approx(1.0)  # the fix makes it perfect


def test_perfect_detections_lose_nothing():
    report = tide_errors(coco([(A, BOX1), (B, BOX2)]), [det(A, BOX1, 0.9), det(B, BOX2, 0.3)])
    assert report.ap_mean[0] == pytest.approx(1.0) and not report.dap_mean[0].any() and not report.counts.any()


def test_only_the_best_scoring_error_on_a_box_is_fixed():
    """TIDE's BestGTMatch: two wrong-class boxes on one object: the 0.9 one becomes its match, the 0.8 one is
    removed (b has no objects: only a's AP counts, and the object is not missed)."""
    report = tide_errors(coco([(A, BOX1), (A, BOX2)]), [det(B, BOX1, 0.9), det(B, [0, 0, 10, 9], 0.8), FOUND2])
    assert report.counts[0, ERRORS.index("Cls")].tolist() == [0, 2]
    assert report.dap_mean[0, ERRORS.index("Cls")] == pytest.approx(50 / 101)
    assert report.dap_mean[0, ERRORS.index("Miss")] == 0


def test_sizes_crowd_and_empty_image():
    """A Loc error on a small object and a missed large one land in their own size; a detection on a crowd
    box is ignored, as pycocotools does, and one in an image without objects is background."""
    small, large = [0, 0, 20, 20], [100, 100, 99, 99]  # areas 400 (< 32^2) and 9801 (>= 96^2)
    gt = coco([(A, small), (A, [40, 40, 20, 20]), (A, large), (A, [0, 100, 99, 99])], crowd=[[150, 0, 50, 50]])
    gt["images"].append({"id": 2, "width": 200, "height": 200, "file_name": "2.png"})
    dets = [det(A, [0, 0, 20, 8], 0.9), det(A, [40, 40, 20, 20], 0.8), det(A, [0, 100, 99, 99], 0.8),
            det(A, [155, 5, 40, 40], 0.95), {**det(A, BOX2, 0.1), "image_id": 2}]
    report = tide_errors(gt, dets)
    dap = dict(zip(AREAS, report.dap_mean))
    loc, miss, bkg = ERRORS.index("Loc"), ERRORS.index("Miss"), ERRORS.index("Bkg")
    assert report.num_gt[:, 0].tolist() == [4, 2, 0, 2]
    assert dap["small"][loc] > 0 and dap["small"][miss] == 0 and report.counts[1, loc, 0] == 1
    assert dap["large"][miss] > 0 and dap["large"][loc] == 0 and report.counts[3, miss, 0] == 1
    assert np.isnan(report.ap[2, 0]) and np.isnan(report.ap_mean[2])  # no medium objects
    assert report.counts[0, bkg, 0] == 1  # image 2's detection; the one on the crowd box is not counted


def test_base_ap_is_pycocotools_ap50_per_class_and_size():
    rng = np.random.default_rng(0)
    images = [{"id": i, "width": 300, "height": 300, "file_name": f"{i}.png"} for i in range(1, 31)]
    anns, dets = [], []
    for image in images:
        for _ in range(rng.integers(0, 6)):
            w, h = rng.uniform(5, 150, 2)
            x, y, c = *rng.uniform(0, 100, 2), int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": c, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.05)})
            for _ in range(rng.integers(0, 4)):  # jittered copies, some of another class
                jx, jy, jw, jh = rng.normal(0, 0.2, 4) * [w, h, w, h]
                dets.append(det(c if rng.random() < 0.8 else int(rng.integers(1, 4)),
                                [x + jx, y + jy, max(1.0, w + jw), max(1.0, h + jh)], float(rng.random())))
        dets += [{**det(int(rng.integers(1, 4)), [*rng.uniform(0, 200, 2), *rng.uniform(3, 90, 2)],
                        float(rng.random() / 2)), "image_id": image["id"]} for _ in range(5)]  # background
    gt = {"images": images, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)], "annotations": anns}
    report = tide_errors(gt, dets)
    ref_gt = index_coco(copy.deepcopy(gt), "gt")
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(ref_gt, ref_gt.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate()
        ev.accumulate()
    precision = ev.eval["precision"][0, :, :, :, -1]  # IoU 0.5, 100 detections: (R, K, A)
    expected = np.where((precision > -1).all(axis=0), precision.mean(axis=0), np.nan).T
    np.testing.assert_allclose(report.ap, expected, atol=1e-12)
    assert np.nanmin(report.dap) >= -1e-12 and report.counts.sum() > 0  # a fix never costs AP


def test_bad_input_is_one_message():
    gt = coco([(A, BOX1)])
    with pytest.raises(RunDataError, match="detection 1: image_id 7 is not an image of the ground truth"):
        tide_errors(gt, [det(A, BOX1, 0.9), {**det(A, BOX1, 0.9), "image_id": 7}])
    with pytest.raises(RunDataError, match="detection 0: needs image_id, category_id, bbox"):
        tide_errors(gt, [{"image_id": 1, "bbox": BOX1}])
    with pytest.raises(RunDataError, match=r"category_id 9 is not a category of the ground truth \(ids \[1, 2\]\)"):
        tide_errors(gt, [det(9, BOX1, 0.9)])
    with pytest.raises(AnalysisError, match="bg_iou < fg_iou"):
        tide_errors(gt, [], fg_iou=0.1, bg_iou=0.5)
    with pytest.raises(AnalysisError, match=r"image ids \[3\] are not images of the ground truth"):
        tide_errors(gt, [], image_ids=[1, 3])
    with pytest.raises(DatasetError, match="the ground truth: not a COCO detection file: no 'categories' list"):
        tide_errors({"images": []}, [])


def test_write_tide(tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    boxes, dets, expected, _ = ALONE["Loc"]
    gt = coco(boxes)
    before = json.dumps(gt)
    paths = write_tide(tide_errors(gt, dets), tmp_path)
    assert json.dumps(gt) == before  # the caller's dict is left as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "tide.json", "tide.md", "tide.png"]
    assert (tmp_path / "keep.txt").read_text() == "mine" and len(paths) == 3
    doc = json.loads((tmp_path / "tide.json").read_text())
    assert doc["areas"]["all"]["dAP"]["Loc"]["per_class"] == {"a": round(expected, 4), "b": None}
    assert doc["areas"]["all"]["count"]["Loc"]["total"] == 1 and doc["areas"]["medium"]["AP50"]["mean"] is None
    md = (tmp_path / "tide.md").read_text()
    assert "| all | 2 | 25.2 | 0.0 (0) | 74.8 (1) |" in md and "## Per class, size small" in md
    assert (tmp_path / "tide.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
