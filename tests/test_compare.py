"""``compare``: the bootstrap AP against COCOeval, the report's intervals against a bootstrap written out
here with pycocotools on literally duplicated images, bad input, and the sweep end to end."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from detkit.analysis.bootstrap import match_records_by_area, paired_difference, resample_seeds, resampled_ap
from detkit.analysis.compare import compare
from detkit.analysis.compare_report import (
    RunResult,
    breakdown_table,
    build_report,
    read_run,
    write_report,
)
from detkit.analysis.eval_benchmark import synthetic_coco
from detkit.cli import build_parser, main
from detkit.config import dump_config, load_config
from detkit.engine.evaluator import run_cocoeval
from tests.cli_runner import run_main, tiny_shapes

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fcos" / "fcos_r18_fpn_shapes.yaml"
DIOU = CONFIG.with_name("fcos_r18_fpn_shapes_diou.yaml")


def coco_of(dataset: dict) -> COCO:
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def ground_truth(num_images: int = 16, seed: int = 0) -> dict:
    """Images of 200x200 with 1-4 boxes of 2 classes, one crowd box, one image without boxes."""
    rng = np.random.default_rng(seed)
    images = [{"id": i, "width": 200, "height": 200, "file_name": f"{i}.png"} for i in range(1, num_images + 1)]
    anns = []
    for image in images[1:]:
        for _ in range(int(rng.integers(1, 5))):
            w, h = rng.uniform(15, 80, 2)
            x, y = rng.uniform(0, 200 - w), rng.uniform(0, 200 - h)
            anns.append({"id": len(anns) + 1, "image_id": image["id"], "category_id": int(rng.integers(1, 3)),
                         "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(len(anns) == 3)})
    return {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def detections(gt: dict, jitter: float, false_positives: int, seed: int) -> list[dict]:
    """Each box found with relative ``jitter`` (score falling with the error), plus random boxes. Scores
    never tie: the bootstrap equals COCOeval on duplicated images up to the order of equal scores."""
    rng = np.random.default_rng(seed)
    results = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        error = rng.normal(0, jitter, 4)
        results.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                        "bbox": [x + error[0] * w, y + error[1] * h, w * (1 + error[2]), h * (1 + error[3])],
                        "score": float(np.exp(-np.abs(error).sum()) * rng.uniform(0.8, 1.0))})  # no ties
    for _ in range(false_positives):
        x, y = rng.uniform(0, 150, 2)
        results.append({"image_id": int(rng.integers(1, len(gt["images"]) + 1)), "category_id": int(rng.integers(1, 3)),
                        "bbox": [x, y, 30.0, 30.0], "score": float(rng.uniform(0.01, 0.9))})
    return results


def fake_run(folder: Path, coco: COCO, results: list[dict]) -> Path:
    """A work dir as a finished run leaves it: metrics.jsonl with its last eval and that results file."""
    (folder / "results").mkdir(parents=True)
    ap = run_cocoeval(coco, results).stats
    metrics = [float(v) if v >= 0 else None for v in ap[:6]]  # as the trainer logs them: no such boxes -> null
    record = {"type": "eval", "epoch": 2, "iter": 8, **dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), metrics))}
    (folder / "metrics.jsonl").write_text(json.dumps({"type": "eval", "epoch": 1, "AP": 0.0}) + "\n"
                                          + json.dumps(record) + "\n")
    (folder / "results" / "bbox_epoch_2.json").write_text(json.dumps(results))
    return folder


def literal_ap(gt: dict, results: list[dict], counts: np.ndarray, stat: int = 0, cat_id: int | None = None) -> float:
    """COCOeval's ``stats[stat]`` (0: AP, 3: APs) on the dataset in which image i (in id order) appears
    ``counts[i]`` times, over every category or only ``cat_id``."""
    images, anns, res = [], [], []
    for image, count in zip(sorted(gt["images"], key=lambda im: im["id"]), counts):
        for _ in range(count):
            new_id = len(images) + 1
            images.append({**image, "id": new_id})
            anns += [{**a, "id": len(anns) + k + 1, "image_id": new_id}
                     for k, a in enumerate(a for a in gt["annotations"] if a["image_id"] == image["id"])]
            res += [{**r, "image_id": new_id} for r in results if r["image_id"] == image["id"]]
    coco = coco_of({**gt, "images": images, "annotations": anns})
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(res), "bbox")
        if cat_id is not None:
            ev.params.catIds = [cat_id]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[stat])


@pytest.mark.parametrize("images, classes, dets", [(30, 4, 40), (6, 1, 150)])  # 150: over COCO's 100 per image
def test_identity_resample_is_cocoeval_ap(images: int, classes: int, dets: int) -> None:
    coco, results = synthetic_coco(images, classes, dets=dets, seed=3)
    crowd = {**coco.dataset["annotations"][0], "id": 10_000, "iscrowd": 1}  # crowd: matched, never counted
    coco = coco_of({**coco.dataset, "annotations": [*coco.dataset["annotations"], crowd]})
    ids = coco.getImgIds()
    expected = run_cocoeval(coco, results, ids).stats[0]
    got = resampled_ap(match_records_by_area(coco, results, ids)["all"], np.ones((1, len(ids)), dtype=np.int64))[0]
    assert abs(got - expected) < 1e-6
    assert resampled_ap(match_records_by_area(coco, [], ids)["all"], np.ones((1, len(ids)), dtype=np.int64))[0] == 0.0
    ones = np.ones((1, len(ids)), dtype=np.int64)
    stats = run_cocoeval(coco, results, ids).stats
    for area, stat in (("small", 3), ("medium", 4), ("large", 5)):  # COCOeval's APs, APm, APl (-1: no such box)
        got = resampled_ap(match_records_by_area(coco, results, ids)[area], ones)[0]
        assert (np.isnan(got) and stats[stat] == -1) or abs(got - stats[stat]) < 1e-6
    for k, cat_id in enumerate(coco.getCatIds()):  # one class: COCOeval restricted to it
        got = resampled_ap(match_records_by_area(coco, results, ids)["all"], ones, [k])[0]
        assert abs(got - cat_ap(coco, results, ids, cat_id)) < 1e-6


def cat_ap(coco: COCO, results: list[dict], ids: list[int], cat_id: int) -> float:
    """COCOeval's AP over one category."""
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(coco, coco.loadRes(results), "bbox")
        ev.params.imgIds, ev.params.catIds = ids, [cat_id]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[0])


def test_report_intervals_match_an_independent_bootstrap(tmp_path: Path) -> None:
    gt = ground_truth()
    coco = coco_of(gt)
    runs = {("worse_boxes", s): detections(gt, 0.12, 12, seed=10 + s) for s in range(2)}
    runs |= {("good_boxes", s): detections(gt, 0.02, 2, seed=20 + s) for s in range(2)}
    runs |= {("worse_again", s): detections(gt, 0.12, 12, seed=30 + s) for s in range(2)}
    results = [read_run(label, seed, fake_run(tmp_path / label / str(seed), coco, res))
               for (label, seed), res in runs.items()]
    resamples, seed = 20, 7
    report = build_report(results, coco, coco.getImgIds(), resamples, seed)

    counts, draws = documented_counts(resamples, seed), documented_seed_draws(resamples, seed)
    seed_mean = {label: literal_seed_mean(gt, runs, label, counts, draws)
                 for label in ("worse_boxes", "good_boxes", "worse_again")}
    for label, verdict in (("good_boxes", "better"), ("worse_again", "not distinguishable at this data size")):
        diffs = seed_mean[label] - seed_mean["worse_boxes"]
        got = report["comparisons"][label]
        assert got["diff"] == pytest.approx(diffs[0], abs=1e-9)
        assert [got["low"], got["high"]] == pytest.approx(np.percentile(diffs[1:], [2.5, 97.5]), abs=1e-9)
        assert got["verdict"] == verdict
    assert report["comparisons"]["good_boxes"]["low"] > 0
    assert report["configs"]["good_boxes"]["ap_recomputed"] == pytest.approx(
        [r.metrics["AP"] for r in results if r.label == "good_boxes"], abs=1e-6)

    paths = write_report(report, tmp_path / "report")
    assert [p.name for p in paths] == ["report.json", "report.md", "report.png"]
    assert json.loads(paths[0].read_text())["comparisons"]["good_boxes"]["verdict"] == "better"
    rows = [line for line in paths[1].read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 8 and "(baseline)" in rows[1] and "| better |" in rows[2]
    assert rows[4].startswith("| config | APs (") and rows[5].startswith("| worse_boxes | ")

    # the same interval for small boxes and for one class, against the literal bootstrap
    cat_id, name = coco.getCatIds()[0], coco.loadCats(coco.getCatIds()[0])[0]["name"]
    for group, key, stat, only in (("by_size", "APs", 3, None), ("by_class", name, 0, cat_id)):
        assert_breakdown_is_literal(report, group, key, gt, runs, counts, draws, stat, only)


def test_a_gain_that_one_seed_reverses_is_not_distinguishable() -> None:
    """Seed 0 gains 1.0 AP on every resample of the images, seed 1 loses 0.5: the images alone call the
    mean gain of 0.25 better; resampling the seeds too shows that the gain depends on the seed."""
    noise = np.random.default_rng(0).normal(0, 0.01, (2, 201))
    base = [np.zeros(201), np.zeros(201)]
    other = [1.0 + noise[0], -0.5 + noise[1]]
    images_only = paired_difference(base, other)
    assert images_only["verdict"] == "better" and images_only["low"] > 0.2
    both = paired_difference(base, other, seed_draws=resample_seeds(2, 200, 0))
    assert both["diff"] == pytest.approx(images_only["diff"]) and both["verdict"].startswith("not distinguishable")
    assert both["low"] < -0.4 and both["high"] > 0.9  # the all-seed-1 and all-seed-0 resamples
    steady = paired_difference(base, [0.25 + noise[0], 0.25 + noise[1]], seed_draws=resample_seeds(2, 200, 0))
    assert steady["verdict"] == "better"  # the same mean gain on both seeds stays a gain


def documented_counts(resamples: int, seed: int, images: int = 16) -> list[np.ndarray]:
    """The identity, then the ``(images,)`` counts of each resample as docs/compare.md describes them."""
    draws = np.random.default_rng(seed).integers(0, images, (resamples, images))
    return [np.ones(images, dtype=np.int64), *(np.bincount(row, minlength=images) for row in draws)]


def documented_seed_draws(resamples: int, seed: int, seeds: int = 2) -> np.ndarray:
    """``(B, seeds)``: the seeds each resample averages over, as docs/compare.md describes them."""
    return np.random.default_rng((seed, 1)).integers(0, seeds, (resamples, seeds))


def literal_seed_mean(gt: dict, runs: dict, label: str, counts: list[np.ndarray], draws: np.ndarray,
                      stat: int = 0, cat_id: int | None = None) -> np.ndarray:
    """``(1 + B,)``: :func:`literal_ap` of ``label``'s two seeds averaged on the full set, then on resample
    ``b`` the mean over the seeds ``draws[b - 1]`` (with repeats) of their AP on that resample."""
    per_seed = [[literal_ap(gt, runs[label, s], c, stat, cat_id) for c in counts] for s in range(2)]
    return np.array([(per_seed[0][0] + per_seed[1][0]) / 2,
                     *(np.mean([per_seed[s][b + 1] for s in row]) for b, row in enumerate(draws))])


def assert_breakdown_is_literal(report: dict, group: str, key: str, gt: dict, runs: dict, counts: list[np.ndarray],
                                draws: np.ndarray, stat: int, cat_id: int | None) -> dict:
    """good_boxes against worse_boxes under ``breakdown[group][key]`` equals the literal bootstrap of COCOeval's
    ``stats[stat]`` (over ``cat_id`` alone if given); returns the comparison's entry."""
    mean = {label: literal_seed_mean(gt, runs, label, counts, draws, stat, cat_id)
            for label in ("worse_boxes", "good_boxes")}
    diffs = mean["good_boxes"] - mean["worse_boxes"]
    got = report["comparisons"]["good_boxes"]["breakdown"][group][key]
    assert got["diff"] == pytest.approx(diffs[0], abs=1e-9)
    assert [got["low"], got["high"]] == pytest.approx(np.nanpercentile(diffs[1:], [2.5, 97.5]), abs=1e-9)
    assert report["configs"]["good_boxes"]["breakdown"][group][key] == pytest.approx(mean["good_boxes"][0], abs=1e-9)
    return got


def test_a_class_named_like_a_size_keeps_both_intervals(tmp_path: Path) -> None:
    """A class named "APs": the AP of small boxes and that class's AP each equal the literal bootstrap, apart in
    report.json (``by_size`` / ``by_class``, also the box counts) and as two columns of the table, sizes first."""
    gt = {**ground_truth(), "categories": [{"id": 1, "name": "APs"}, {"id": 2, "name": "b"}]}
    coco = coco_of(gt)
    runs = {(label, s): detections(gt, jitter, false_positives, seed=first + s)
            for label, jitter, false_positives, first in (("worse_boxes", 0.12, 12, 10), ("good_boxes", 0.02, 2, 20))
            for s in range(2)}
    results = [read_run(label, seed, fake_run(tmp_path / label / str(seed), coco, res))
               for (label, seed), res in runs.items()]
    report = build_report(results, coco, coco.getImgIds(), resamples=10, seed=3)
    counts, draws = documented_counts(10, 3), documented_seed_draws(10, 3)
    size = assert_breakdown_is_literal(report, "by_size", "APs", gt, runs, counts, draws, 3, None)
    cls = assert_breakdown_is_literal(report, "by_class", "APs", gt, runs, counts, draws, 0, 1)
    assert abs(size["diff"] - cls["diff"]) > 1e-3 and abs(size["low"] - cls["low"]) > 1e-3
    assert report["ground_truth"] == {"by_size": {"APs": 7, "APm": 28, "APl": 0},  # 1 of the 7 small boxes is "APs"
                                      "by_class": {"APs": 14, "b": 21}}
    assert list(report["configs"]["good_boxes"]["breakdown"]["by_size"]) == ["APs", "APm"]  # no large box in val

    table = [line for line in write_report(report, tmp_path / "report")[1].read_text().splitlines()
             if line.startswith("| ") and "---" not in line][3:]
    assert table[0] == "| config | APs (7 boxes) | APm (28 boxes) | APs (14 boxes) | b (21 boxes) |"
    breakdown = report["configs"]["good_boxes"]["breakdown"]
    assert size["verdict"] == cls["verdict"] == "better"  # bold
    assert table[2].split(" | ")[1:4:2] == [
        f"{100 * breakdown[group]['APs']:.1f} "
        f"(**{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]**)"
        for group, d in (("by_size", size), ("by_class", cls))]


def test_unpaired_seeds_are_refused(tmp_path: Path) -> None:
    gt = ground_truth()
    coco = coco_of(gt)
    runs = [RunResult("a", 0, tmp_path, {}, tmp_path), RunResult("b", 1, tmp_path, {}, tmp_path)]
    with pytest.raises(ValueError, match="pairs runs by seed"):
        build_report(runs, coco, coco.getImgIds())


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("args, message", [
    (["--configs", "missing.yaml"], "config file not found"),
    (["--set", "train.epoch=2"], "unknown key 'train.epoch'. Did you mean 'epochs'?"),
    (["--set", "model.head.num_classes=0"], "model.head.num_classes must be an integer >= 1"),
    (["--seeds", "0"], "--seeds must be a positive number"),
    (["--shard", "3/2"], "--shard must be I/N with 0 <= I < N"),
    (["--variants", "fp32 train.amp=null"], "expected \"NAME: key=value"),
    (["--out", "FILE"], "is a file; give a folder"),
    (["--set", "model.head.num_convs=2"], "holds a run made with other settings (model.head.num_convs"),
    (["--variants", "two: data.val.num_images=2", "three: data.val.num_images=3"],
     "fcos_r18_fpn_shapes-three evaluates on other val images or annotations than fcos_r18_fpn_shapes-two"),
])
def test_bad_input_one_message_nothing_run_or_changed(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "out"
    run_dir = out / "runs" / CONFIG.stem / "seed0"
    run_dir.mkdir(parents=True)
    sets = tiny_shapes(tmp_path / "data")
    cfg = load_config(CONFIG, sets)
    cfg["work_dir"] = str(run_dir)
    dump_config(cfg, run_dir / "config.yaml")  # an earlier sweep's run, made with the tiny settings
    (tmp_path / "FILE").write_text("keep")
    before = {**_tree(out), **_tree(tmp_path / "FILE")}
    args = [str(tmp_path / "FILE") if a == "FILE" else a for a in args]  # later options win in argparse
    result = run_main("compare", "--configs", str(CONFIG), "--seeds", "1", "--out", str(out), "--set", *sets, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1
    assert {**_tree(out), **_tree(tmp_path / "FILE")} == before and not (out / "logs").exists()


@pytest.mark.slow
def test_compare_end_to_end_reuses_finished_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two configs x 3 seeds on the tiny shapes settings, each run ``main(["train", ...])`` in this process
    (the argv ``python -m detkit`` gets in a child): shard 0 of 2, then the rest, then through the CLI the
    report from the finished runs without training anything."""
    out, sets = tmp_path / "cmp", tiny_shapes(tmp_path / "data")
    argv = ["compare", "--configs", str(CONFIG), str(DIOU), "--seeds", "3", "--out", str(out), "--bootstrap", "100",
            "--set", *sets]

    def in_process(run_argv: list[str], env: dict[str, str], log: Path) -> int:
        return main(run_argv)

    assert compare(build_parser().parse_args([*argv, "--shard", "0/2"]), launcher=in_process) == 0
    assert "3 of 6 runs finished; the report is written when all are" in capsys.readouterr().out
    assert sorted(p.parent.name for p in out.rglob("model_final.pth")) == ["seed0", "seed1", "seed2"]
    assert compare(build_parser().parse_args(argv), launcher=in_process) == 0
    assert "3 finished (reused), 3 to train" in capsys.readouterr().out
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.pth")}
    again = run_main(*argv)
    assert again.returncode == 0, again.stderr
    assert "6 finished (reused), 0 to train" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.pth")} == mtimes and len(mtimes) > 6
    md = (out / "report.md").read_text()
    table, breakdown = md.split("\nAP by object size and by class")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 2
    assert [line.split(" | ")[0] for line in breakdown.splitlines() if line.startswith("| ")][1:] == \
        [f"| {CONFIG.stem}", f"| {DIOU.stem}"]
    assert rows[0].startswith(f"| {CONFIG.stem} | 3 |") and rows[1].startswith(f"| {DIOU.stem} | 3 |")
    report = json.loads((out / "report.json").read_text())
    assert report["configs"][CONFIG.stem]["seeds"] == [0, 1, 2] and (out / "report.png").stat().st_size > 10_000
    assert all(w is not None for c in report["configs"].values() for w in c["per_seed"]["wall_s"])


def test_subprocess_launcher_env_log_and_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The child gets the argv and the added environment, its output lands in the log, its exit code is returned."""
    import sys

    from detkit.analysis import compare_sweep

    child = "import os, sys; print(sys.argv[1:], os.environ['CUDA_VISIBLE_DEVICES']); sys.exit(3)"
    monkeypatch.setattr(compare_sweep, "DETKIT", [sys.executable, "-c", child])
    log = tmp_path / "run.txt"
    log.write_text("earlier launch\n")
    assert compare_sweep.subprocess_launcher(["train", "--resume"], {"CUDA_VISIBLE_DEVICES": "1"}, log) == 3
    assert log.read_text() == "earlier launch\n['train', '--resume'] 1\n"


def test_sweep_one_run_per_device_in_parallel(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--devices 0,1``: at most one run per GPU at a time, CUDA_VISIBLE_DEVICES set, a failure reported with
    the end of its output and the other runs still done."""
    import threading
    import time

    from detkit.analysis.compare_sweep import Run, Sweep, recorded_wall

    active, peak, seen, lock = set(), [0], [], threading.Lock()

    def launcher(argv: list[str], env: dict[str, str], log: Path) -> int:
        with lock:
            assert env["CUDA_VISIBLE_DEVICES"] not in active
            active.add(env["CUDA_VISIBLE_DEVICES"])
            peak[0] = max(peak[0], len(active))
            seen.append((argv[argv.index("--work-dir") + 1], argv[-1], env["CUDA_VISIBLE_DEVICES"]))
        log.write_text("line 1\nout of memory\n")
        time.sleep(0.05)
        with lock:
            active.discard(env["CUDA_VISIBLE_DEVICES"])
        return 1 if argv[-1] == "train.seed=2" else 0

    runs = [Run("a", "a.yaml", ("train.epochs=1",), seed, tmp_path / f"a{seed}") for seed in range(5)]
    sweep = Sweep(runs, tmp_path / "logs", launcher, devices=["0", "1"])
    assert sweep.run()
    assert peak[0] == 2 and sorted(s[1] for s in seen) == [f"train.seed={k}" for k in range(5)]
    assert [(r.seed, code) for r, code in sweep.failed] == [(2, 1)]
    printed = capsys.readouterr().out
    assert "a/seed2 FAILED (exit 1" in printed and "out of memory" in printed and "[4/5]" in printed
    assert recorded_wall(tmp_path / "logs", runs[0]) > 0


def test_run_continues_a_checkpoint_and_restarts_a_run_that_saved_none(tmp_path: Path) -> None:
    from detkit.analysis.compare_sweep import Run

    run = Run("a", "a.yaml", ("train.epochs=2",), 1, tmp_path / "seed1")
    assert run.argv() == ["train", "--config", "a.yaml", "--work-dir", str(run.work_dir), "--set", "train.epochs=2",
                          "train.seed=1"]
    run.work_dir.mkdir()
    (run.work_dir / "log.txt").write_text("killed before the first checkpoint")
    assert "--overwrite" in run.argv() and "--resume" not in run.argv()
    (run.work_dir / "epoch_1.pth").write_bytes(b"")
    assert "--resume" in run.argv() and "--overwrite" not in run.argv()


def test_finished_after_the_last_epoch_or_an_early_stop(tmp_path: Path) -> None:
    import torch

    from detkit.analysis.compare import finished
    from detkit.analysis.compare_sweep import Run

    run, cfg = Run("a", "a.yaml", (), 0, tmp_path), {"train": {"epochs": 4}}
    assert not finished(run, cfg)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "bbox_epoch_2.json").write_text("[]")
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"type": "eval", "epoch": 2, "iter": 4, "AP": 0.1}) + "\n")
    assert not finished(run, cfg)  # evaluated at epoch 2 of 4, no checkpoint: interrupted
    torch.save({"model": {}, "epoch": 2, "stop_reason": None}, tmp_path / "latest.pth")
    assert not finished(run, cfg)
    torch.save({"model": {}, "epoch": 2, "stop_reason": "early stop after epoch 2"}, tmp_path / "latest.pth")
    assert finished(run, cfg)
    assert finished(run, {"train": {"epochs": 2}})


def test_unreadable_results_file_is_one_message(tmp_path: Path) -> None:
    gt = ground_truth()
    coco = coco_of(gt)
    run = read_run("a", 0, fake_run(tmp_path / "a", coco, detections(gt, 0.1, 2, seed=0)))
    run.results_file.write_text('[{"image_id": 1, "bbo')  # killed while writing
    with pytest.raises(ValueError, match=r"bbox_epoch_2.json: not a COCO results json .* delete .* run the command"):
        build_report([run], coco, coco.getImgIds())


def test_a_run_with_class_weight_auto_is_the_same_setting_as_its_numbers() -> None:
    """A run's config.yaml holds the class weights `auto` computed; the sweep's config still says `auto`:
    the same run (else the second call, other shards and the report refused every such run)."""
    from detkit.analysis.compare import first_difference, keep_auto_class_weights

    saved = {"model": {"head": {"losses": {"cls": {"type": "FocalLoss", "class_weight": [0.8, 1.2]},
                                           "bbox": [{"type": "GIoULoss"}]}}}}
    cfg = {"model": {"head": {"losses": {"cls": {"type": "FocalLoss", "class_weight": "auto"},
                                         "bbox": [{"type": "GIoULoss"}]}}}}
    keep_auto_class_weights(saved, cfg)
    assert first_difference(saved, cfg) is None
    other = {"model": {"head": {"losses": {"cls": {"type": "FocalLoss", "class_weight": [1.0, 1.0]}}}}}
    keep_auto_class_weights(other, {"model": {"head": {"losses": {"cls": {"type": "FocalLoss",
                                                                          "class_weight": [2.0, 1.0]}}}}})
    assert other["model"]["head"]["losses"]["cls"]["class_weight"] == [1.0, 1.0]  # lists stay compared


def test_a_breakdown_interval_under_a_twentieth_of_a_point_shows_hundredths() -> None:
    """An interval that excludes 0 by hundredths of a point is not printed as a bold "-0.0 [-0.0, -0.0]"."""
    entry = {"by_size": {"APl": 0.695}, "by_class": {"RBC": 0.64}}
    tiny = {"diff": -0.0002, "low": -0.0004, "high": -0.0001, "verdict": "worse"}
    wide = {"diff": -0.005, "low": -0.009, "high": -0.001, "verdict": "worse"}
    report = {"baseline": "whole", "labels": ["whole", "tiles"], "level": 0.95,
              "ground_truth": {"by_size": {"APl": 793}, "by_class": {"RBC": 904}},
              "configs": {"whole": {"breakdown": entry}, "tiles": {"breakdown": entry}},
              "comparisons": {"tiles": {"breakdown": {"by_size": {"APl": tiny}, "by_class": {"RBC": wide}}}}}
    assert breakdown_table(report)[-1] == "| tiles | 69.5 (**-0.02 [-0.04, -0.01]**) | 64.0 (**-0.5 [-0.9, -0.1]**) |"
