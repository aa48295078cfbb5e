"""``detkit analyze tide``: TIDE of results files a user already has, through the real CLI: the known row of a
hand-made case, two results files side by side, and each bad input (one message, its exit code, nothing
written or changed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli_runner import run_main
from tests.test_safety_config import snapshot
from tests.test_tide import ALONE, coco

GT = coco(ALONE["Loc"][0])  # two objects of class a; the Cls and Loc cases share it
LOC_ROW = "| all | 2 | 25.2 | 0.0 (0) | 74.8 (1) | 0.0 (0) | 0.0 (0) | 0.0 (0) | 0.0 (0) |"  # tests/test_tide.py


def write(folder: Path, name: str, content: object) -> str:
    path = folder / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def test_one_results_file_gives_eval_s_tide_files_and_prints_the_table(tmp_path):
    gt, results = write(tmp_path, "gt.json", GT), write(tmp_path, "loc.json", ALONE["Loc"][1])
    result = run_main("analyze", "tide", "--gt", gt, "--results", results, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert LOC_ROW in result.stdout and "wrote 3 files" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tide.json", "tide.md", "tide.png"]
    doc = json.loads((tmp_path / "out" / "tide.json").read_text())
    assert doc["areas"]["all"]["dAP"]["Loc"]["per_class"] == {"a": round(ALONE["Loc"][2], 4), "b": None}
    assert LOC_ROW in (tmp_path / "out" / "tide.md").read_text()


def test_two_results_files_side_by_side(tmp_path):
    gt = write(tmp_path, "gt.json", GT)
    files = [write(tmp_path, "cls.json", ALONE["Cls"][1]), write(tmp_path, "loc.json", ALONE["Loc"][1])]
    result = run_main("analyze", "tide", "--gt", gt, "--results", *files, "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    # cls: a's AP 51/101 (one of two objects), Cls dAP 50/101; loc: the row of the single-file case
    cls_row = "| cls | 2 | 50.5 | 49.5 (1) | 0.0 (0) | 0.0 (0) | 0.0 (0) | 0.0 (0) | 0.0 (0) |"
    assert cls_row in result.stdout and LOC_ROW.replace("| all |", "| loc |") in result.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["cls", "loc", "tide_compare.json", "tide_compare.md",
                                                     "tide_compare.png"]
    assert all(sorted(p.name for p in (out / n).iterdir()) == ["tide.json", "tide.md", "tide.png"]
               for n in ("cls", "loc"))
    doc = json.loads((out / "tide_compare.json").read_text())
    assert doc["results"]["cls"]["file"] == files[0]
    assert doc["results"]["cls"]["areas"]["all"]["dAP"]["Cls"] == round(50 / 101, 4)
    assert doc["results"]["loc"]["areas"]["all"]["dAP"]["Loc"] == round(ALONE["Loc"][2], 4)
    assert (out / "tide_compare.png").read_bytes()[:4] == b"\x89PNG"


BAD = [  # (name, gt content or None for missing, results content or None, extra args, exit code, message)
    ("gt_missing", None, [], [], 2, "COCO annotation file not found"),
    ("gt_not_coco", {"images": []}, [], [], 1, "gt.json: not a COCO detection file: no 'categories' list"),
    ("results_missing", GT, None, [], 2, "results file not found"),
    ("results_not_json", GT, "[{", [], 1, "r.json: not valid JSON"),
    ("results_is_gt", GT, GT, [], 1, "r.json: an annotation file, not detections; --results takes a list of"),
    ("results_not_list", GT, {"a": 1}, [], 1, "r.json: not a COCO results file (the top level is a dict)"),
    ("image_not_in_gt", GT, [{**ALONE["Loc"][1][0], "image_id": 7}], [], 1,
     "r.json: detection 0: image_id 7 is not an image of the ground truth"),
    ("category_not_in_gt", GT, [{**ALONE["Loc"][1][0], "category_id": 9}], [], 1,
     "r.json: detection 0: category_id 9 is not a category of the ground truth (ids [1, 2])"),
    ("thresholds", GT, [], ["--fg-iou", "0.1", "--bg-iou", "0.5"], 2, "bg_iou < fg_iou"),
    ("out_is_a_file", GT, [], ["--out", "{tmp}/gt.json"], 2, "is a file; give a folder"),
    ("out_over_input", GT, [], ["--out", "{tmp}"], 2, "would overwrite the input"),
]


@pytest.mark.parametrize("name, gt, results, extra, code, message", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_message_and_nothing_is_written(tmp_path, name, gt, results, extra, code, message):
    if gt is not None:
        write(tmp_path, "gt.json", gt)
    if results is not None:  # out_over_input: the results file is where the report would go
        write(tmp_path, "tide.json" if name == "out_over_input" else "r.json", results)
    results_file = tmp_path / ("tide.json" if name == "out_over_input" else "r.json")
    before = snapshot(tmp_path)
    args = ["--out", str(tmp_path / "out"), *[a.format(tmp=tmp_path) for a in extra]]
    result = run_main("analyze", "tide", "--gt", str(tmp_path / "gt.json"), "--results", str(results_file), *args)
    assert result.returncode == code and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()
