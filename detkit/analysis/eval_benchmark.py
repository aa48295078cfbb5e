"""Time the two COCO evaluation backends on the same synthetic detections, alternated in one process.

``python -m detkit.analysis.eval_benchmark [--images 5000] [--classes 80] [--dets 50] [--repeats 3]``
prints each backend's seconds per evaluation (``run_cocoeval``: results indexing, evaluate, accumulate,
summarize, as every training evaluation runs it), the ratio of their medians and the largest difference
between their 12 COCO numbers. ``--run WORK_DIR --epoch N`` instead times, on that run's val split and
``results/bbox_epoch_N.json``, both backends, the ``eval_epoch_N/`` report and ``results.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import statistics
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from pycocotools.coco import COCO

from detkit.analysis.report import write_eval_report
from detkit.analysis.training_curves import write_results_png
from detkit.config import load_config
from detkit.data import build_dataset
from detkit.engine.evaluator import BACKENDS, run_cocoeval


def synthetic_coco(num_images: int = 5000, num_classes: int = 80, boxes: int = 7, dets: int = 50, seed: int = 0
                   ) -> tuple[COCO, list[dict[str, Any]]]:
    """A COCO ground truth of ``num_images`` 640x480 images with 1..2*``boxes`` boxes of sizes 8..300 px,
    and ``dets`` detections per image: jittered copies of the boxes (10% with a wrong class) plus random
    boxes, with random scores."""
    rng = np.random.default_rng(seed)
    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for image_id in range(1, num_images + 1):
        images.append({"id": image_id, "width": 640, "height": 480, "file_name": f"{image_id:06d}.jpg"})
        n = int(rng.integers(1, 2 * boxes + 1))
        wh = rng.uniform(8, 300, (n, 2))
        xy = rng.uniform(0, 1, (n, 2)) * (np.array([640, 480]) - wh)
        cats = rng.integers(1, num_classes + 1, n)
        for (x, y), (w, h), c in zip(xy, wh, cats):
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(c), "iscrowd": 0,
                         "bbox": [float(x), float(y), float(w), float(h)], "area": float(w * h)})
        copies = rng.integers(0, n, dets)
        jitter = rng.normal(0, 0.08, (dets, 4)) * np.concatenate([wh[copies], wh[copies]], axis=1)
        box = np.concatenate([xy[copies], wh[copies]], axis=1) + jitter
        random_box = rng.uniform(0, 1, (dets, 4)) * np.array([600, 440, 200, 200]) + [0, 0, 4, 4]
        fake = rng.uniform(size=dets) < 0.5
        box[fake] = random_box[fake]
        cat = np.where(rng.uniform(size=dets) < 0.1, rng.integers(1, num_classes + 1, dets), cats[copies])
        for b, c, s in zip(box, cat, rng.uniform(0.05, 1.0, dets)):
            results.append({"image_id": image_id, "category_id": int(c), "score": round(float(s), 5),
                            "bbox": [round(float(b[0]), 2), round(float(b[1]), 2), round(max(float(b[2]), 1.0), 2),
                                     round(max(float(b[3]), 1.0), 2)]})
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": c, "name": f"class{c}"} for c in range(1, num_classes + 1)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, results


def benchmark(num_images: int = 5000, num_classes: int = 80, dets: int = 50, repeats: int = 3,
              backends: Sequence[str] = BACKENDS) -> dict[str, Any]:
    """Seconds per :func:`run_cocoeval` for each backend, alternated ``repeats`` times, and their stats."""
    coco, results = synthetic_coco(num_images, num_classes, dets=dets)
    times: dict[str, list[float]] = {b: [] for b in backends}
    stats: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for backend in backends:
            start = time.perf_counter()
            ev = run_cocoeval(coco, results, backend=backend)
            times[backend].append(time.perf_counter() - start)
            stats[backend] = np.asarray(ev.stats[:12], dtype=np.float64)
    first, *others = backends
    return {"images": num_images, "results": len(results), "times": times,
            "ratio": {b: statistics.median(times[first]) / statistics.median(times[b]) for b in others},
            "max_stat_diff": {b: float(np.abs(stats[first] - stats[b]).max()) for b in others}}


def report_cost(run_dir: str, epoch: int, repeats: int = 5) -> dict[str, list[float]]:
    """Seconds of each per-evaluation step on a finished run's val split, alternated ``repeats`` times."""
    cfg = load_config(Path(run_dir) / "config.yaml")
    dataset: Any = build_dataset(cfg["data"]["val"], "data.val")  # a COCO-indexed detkit dataset
    results = json.loads((Path(run_dir) / "results" / f"bbox_epoch_{epoch}.json").read_text())
    times: dict[str, list[float]] = {**{f"COCOeval {b}": [] for b in BACKENDS}, "report": [], "results.png": []}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(repeats):
            for backend in BACKENDS:
                start = time.perf_counter()
                ev = run_cocoeval(dataset.coco, results, dataset.ids, backend)
                times[f"COCOeval {backend}"].append(time.perf_counter() - start)
            start = time.perf_counter()
            write_eval_report(out, ev, dataset.coco, results, dataset.classes, dataset.ids)
            times["report"].append(time.perf_counter() - start)
            start = time.perf_counter()
            write_results_png(run_dir)
            times["results.png"].append(time.perf_counter() - start)
    return times


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--dets", type=int, default=50, help="detections per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--run", default=None, metavar="WORK_DIR", help="time the report of this finished run instead")
    parser.add_argument("--epoch", type=int, default=None,
                        help="with --run: the evaluation (results/bbox_epoch_N.json)")
    args = parser.parse_args(argv)
    if args.run:
        if args.epoch is None:
            parser.error("--run needs --epoch N (the evaluation whose results/bbox_epoch_N.json to use)")
        times = report_cost(args.run, args.epoch, args.repeats)
        for name, seconds in times.items():
            print(f"  {name:<28} median {statistics.median(seconds):.3f} s ({' '.join(f'{s:.3f}' for s in seconds)})")
        return 0
    out = benchmark(args.images, args.classes, args.dets, args.repeats)
    print(f"{out['images']} images, {out['results']} detections; {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}, pycocotools {version('pycocotools')}, "
          f"faster-coco-eval {version('faster-coco-eval')}, numpy {np.__version__}")
    for backend, seconds in out["times"].items():
        listed = " ".join(f"{s:.2f}" for s in seconds)
        print(f"  {backend:<17} {listed} s (median {statistics.median(seconds):.2f})")
    for backend, ratio in out["ratio"].items():
        print(f"  pycocotools / {backend}: {ratio:.2f}x; largest difference of the 12 COCO numbers "
              f"{out['max_stat_diff'][backend]:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
