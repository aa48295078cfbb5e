"""TIDE for detections a user already has (``detkit analyze tide``): COCO results files, read and checked, each
against one COCO ground-truth file, as tidecv's ``tide.evaluate(gt, results)``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from detkit.analysis import RunDataError
from detkit.analysis.tide import TideReport, tide_errors
from detkit.data.annotations import DatasetError
from detkit.data.coco import load_coco

#: Where detkit writes results files, for the messages and ``--help``.
RESULTS_HINT = ("a list of {image_id, category_id, bbox [x, y, w, h], score}, as detkit eval writes to "
                "eval_<checkpoint>/results.json and training to results/bbox_epoch_N.json")


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """The detections of a COCO results json (each one is checked by :func:`~detkit.analysis.tide.tide_errors`).
    A missing file raises ``FileNotFoundError``, anything else than a list :class:`RunDataError`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"results file not found: {path}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunDataError(f"{path}: not valid JSON ({err})") from None
    if isinstance(results, dict) and "annotations" in results:
        raise RunDataError(f"{path}: an annotation file, not detections; --results takes {RESULTS_HINT}")
    if not isinstance(results, list):
        raise RunDataError(f"{path}: not a COCO results file (the top level is a {type(results).__name__}); "
                           f"--results takes {RESULTS_HINT}")
    return results


def result_names(paths: Sequence[str | Path]) -> list[str]:
    """A short unique name per results file (its stem; ``<n>_<stem>`` when two stems are equal), also the
    folder its report goes to."""
    stems = [Path(p).stem for p in paths]
    if len(set(stems)) == len(stems):
        return stems
    return [f"{n}_{stem}" for n, stem in enumerate(stems, 1)]


def tide_of_files(gt_file: str | Path, results_files: Sequence[str | Path], fg_iou: float = 0.5,
                  bg_iou: float = 0.1) -> dict[str, TideReport]:
    """:func:`~detkit.analysis.tide.tide_errors` of each results file on every image of ``gt_file``, by
    :func:`result_names`; a bad file raises before any report is made, naming the file."""
    coco_gt = load_coco(gt_file)  # FileNotFoundError / DatasetError naming the file
    if not coco_gt.getImgIds():
        raise DatasetError(f"{gt_file}: the ground truth has no images")
    reports = {}
    for name, path in zip(result_names(results_files), results_files):
        results = read_results(path)
        try:
            reports[name] = tide_errors(coco_gt, results, fg_iou=fg_iou, bg_iou=bg_iou)
        except RunDataError as err:  # a detection whose ids are not the ground truth's: say which file
            raise RunDataError(f"{path}: {err}") from None
    return reports
