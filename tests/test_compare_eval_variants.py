"""``compare --eval-variants``: on fake finished runs (hand-made metrics.jsonl, results and model_final.pth, as in
tests/test_compare.py) with a stub in place of ``evaluate_checkpoint``: the rows ``<config>@<NAME>``, paired by
seed; an eval variant equal to the run's own evaluation is a difference of exactly 0; forbidden keys; reuse."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from detkit.analysis import RunDataError
from detkit.analysis.compare import compare
from detkit.cli import build_parser
from detkit.config import dump_config, load_config
from detkit.data import build_dataset
from detkit.engine.evaluator import run_cocoeval
from detkit.registry import ConfigError
from tests.cli_runner import run_main, tiny_shapes
from tests.test_compare import CONFIG, DIOU, _tree, detections, fake_run

SAME = "same: eval.tiles=null train.amp=null"  # the runs' own evaluation settings (tiny_shapes: fp32, no tiles)
SLICED = "sliced: 'eval.tiles={size: 32, overlap: 8}'"


def shifted(results: list[dict]) -> list[dict]:
    """What the stub's "sliced" evaluation returns: every box 3 pixels to the right."""
    return [{**r, "bbox": [r["bbox"][0] + 3.0, *r["bbox"][1:]]} for r in results]


class StubEvaluation:
    """In place of ``evaluate_checkpoint(cfg, checkpoint, work_dir)``: writes ``results.json`` and an ``eval``
    record into ``work_dir`` as it does; the run's own results when ``eval.tiles`` is null, else :func:`shifted`."""

    def __init__(self, coco: Any) -> None:
        self.coco, self.calls = coco, []

    def __call__(self, cfg: dict, checkpoint: str, work_dir: Path) -> dict:
        self.calls.append((Path(checkpoint), work_dir, cfg["eval"]["tiles"], cfg["train"]["amp"]))
        own = json.loads((Path(checkpoint).parent / "results" / "bbox_epoch_2.json").read_text())
        results = own if cfg["eval"]["tiles"] is None else shifted(own)
        stats = run_cocoeval(self.coco, results).stats[:6]
        metrics = dict(zip(("AP", "AP50", "AP75", "APs", "APm", "APl"), [float(v) if v >= 0 else None for v in stats]))
        with open(work_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"type": "eval", "epoch": 2, "iter": 8, "checkpoint": checkpoint, **metrics}) + "\n")
        (work_dir / "results.json").write_text(json.dumps(results))
        return metrics


def finished_sweep(tmp_path: Path) -> tuple[list[str], Any, dict[tuple[str, int], list[dict]]]:
    """Two configs x 2 seeds of finished runs in ``tmp_path/out`` made with the tiny shapes settings (6 val
    images): the ``compare`` argv, the val dataset and each run's results."""
    sets = [*tiny_shapes(tmp_path / "data"), "data.val.num_images=6"]
    out, runs = tmp_path / "out", {}
    dataset: Any = None
    for k, config in enumerate((CONFIG, DIOU)):
        for seed in range(2):
            cfg = load_config(config, [*sets, f"train.seed={seed}"])
            work_dir = out / "runs" / config.stem / f"seed{seed}"
            cfg["work_dir"] = str(work_dir)
            dataset = dataset or build_dataset(cfg["data"]["val"], "data.val")
            runs[config.stem, seed] = detections(dataset.coco.dataset, 0.04 + 0.04 * k, 3, seed=10 * k + seed)
            fake_run(work_dir, dataset.coco, runs[config.stem, seed])
            dump_config(cfg, work_dir / "config.yaml")
            torch.save({"model": {}, "epoch": 2, "iter": 8}, work_dir / "model_final.pth")
    argv = ["compare", "--configs", str(CONFIG), str(DIOU), "--seeds", "2", "--out", str(out), "--bootstrap", "50",
            "--set", *sets]
    return argv, dataset, runs


def no_training(argv: list[str], env: dict[str, str], log: Path) -> int:
    raise AssertionError(f"every run is finished, yet {argv} was launched")


def test_eval_variants_are_rows_paired_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv, dataset, runs = finished_sweep(tmp_path)
    stub = StubEvaluation(dataset.coco)
    args = build_parser().parse_args([*argv, "--eval-variants", SAME, SLICED])
    assert compare(args, launcher=no_training, evaluate=stub) == 0
    out, a, b = Path(args.out), CONFIG.stem, DIOU.stem
    assert sorted((str(c[1].relative_to(out)), c[2], c[3]) for c in stub.calls) == sorted(
        (f"runs/{label}/seed{seed}/eval-{name}", tiles, None) for label in (a, b) for seed in range(2)
        for name, tiles in (("same", None), ("sliced", {"size": 32, "overlap": 8})))
    assert all(c[0] == c[1].parent / "model_final.pth" for c in stub.calls)
    printed = capsys.readouterr().out
    assert "0 done (reused), 8 to evaluate" in printed and f"[8/8] {b}@sliced/seed1 evaluated in" in printed

    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == [a, f"{a}@same", f"{a}@sliced", b, f"{b}@same", f"{b}@sliced"]
    configs, comparisons = report["configs"], report["comparisons"]
    for label in (a, b):
        for name in ("same", "sliced"):
            row = configs[f"{label}@{name}"]
            assert row["seeds"] == [0, 1]
            assert row["work_dirs"] == [str(out / "runs" / label / f"seed{s}" / f"eval-{name}") for s in range(2)]
            saved = [json.loads((Path(w) / "variant.json").read_text()) for w in row["work_dirs"]]
            assert row["per_seed"]["wall_s"] == [s["wall_s"] for s in saved]
            assert saved[0]["overrides"] == (["eval.tiles=null", "train.amp=null"] if name == "same"
                                             else ["eval.tiles={size: 32, overlap: 8}"])
        # the same weights, the same settings: each seed's AP equals its run's, the difference is exactly 0
        assert configs[f"{label}@same"]["ap_recomputed"] == configs[label]["ap_recomputed"]
        sliced = [run_cocoeval(dataset.coco, shifted(runs[label, s])).stats[0] for s in range(2)]
        assert configs[f"{label}@sliced"]["ap_recomputed"] == pytest.approx(sliced, abs=1e-6)
        assert abs(sliced[0] - sliced[1]) > 1e-3  # so the rows are paired with the right seed
    same = comparisons[f"{a}@same"]
    assert same["diff"] == same["low"] == same["high"] == 0.0
    assert all(d["diff"] == d["low"] == d["high"] == 0.0
               for group in same["breakdown"].values() for d in group.values())
    base = sum(configs[a]["ap_recomputed"]) / 2
    for label in (f"{b}@same", f"{a}@sliced", f"{b}@sliced"):  # each against the baseline's own evaluation
        assert comparisons[label]["diff"] == pytest.approx(sum(configs[label]["ap_recomputed"]) / 2 - base, abs=1e-9)
    assert comparisons[f"{b}@same"]["diff"] == pytest.approx(comparisons[b]["diff"], abs=1e-12)
    assert set(comparisons[f"{a}@sliced"]["breakdown"]) == {"by_size", "by_class"}

    md = (out / "report.md").read_text()
    assert f"| {a}@sliced | 2 | " in md and f"| {b}@same | " in md.split("AP by object size")[1]
    assert "sliced: `eval.tiles={size: 32, overlap: 8}`" in md


@pytest.mark.parametrize("variant, message", [
    ("bad: model.head.score_thr=0.1", "--eval-variants bad: model.head.score_thr is not an evaluation setting"),
    ("bad: eval.score_thr=0.2 data.train.x=1", "--eval-variants bad: data.train.x is not an evaluation setting"),
    ("bad: eval.score_thr=2", "@bad (--eval-variants bad): eval.score_thr must be a number in [0, 1]"),
    ("bad eval.score_thr=0.2", "--eval-variants 'bad eval.score_thr=0.2': expected \"NAME: key=value"),
])
def test_bad_eval_variant_one_message_nothing_written(tmp_path: Path, variant: str, message: str) -> None:
    out = tmp_path / "out"
    result = run_main("compare", "--configs", str(CONFIG), "--seeds", "1", "--out", str(out),
                      "--set", *tiny_shapes(tmp_path / "data"), "--eval-variants", variant)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.count("error:") == 1 and not out.exists()


def test_rerun_reuses_evaluations_and_refuses_other_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    argv, dataset, _ = finished_sweep(tmp_path)
    stub = StubEvaluation(dataset.coco)
    assert compare(build_parser().parse_args([*argv, "--eval-variants", SLICED]), no_training, stub) == 0
    first = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(stub.calls) == 4
    capsys.readouterr()
    assert compare(build_parser().parse_args([*argv, "--eval-variants", SLICED]), no_training, stub) == 0
    assert len(stub.calls) == 4 and "4 done (reused), 0 to evaluate" in capsys.readouterr().out
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == first

    before = _tree(tmp_path / "out")
    other = build_parser().parse_args([*argv, "--eval-variants", "sliced: 'eval.tiles={size: 32, overlap: 16}'"])
    with pytest.raises(ConfigError, match=r"seed0/eval-sliced holds an evaluation with other overrides \(eval.tiles="
                                          r"\{size: 32, overlap: 8\}\).* delete that folder"):
        compare(other, no_training, stub)
    (tmp_path / "out" / "runs" / DIOU.stem / "seed1" / "model_final.pth").unlink()
    with pytest.raises(RunDataError, match="model_final.pth"):  # every run's weights checked before evaluating
        compare(build_parser().parse_args([*argv, "--eval-variants", SAME]), no_training, stub)
    del before[str(tmp_path / "out" / "runs" / DIOU.stem / "seed1" / "model_final.pth")]
    assert _tree(tmp_path / "out") == before and len(stub.calls) == 4


@pytest.mark.slow
def test_end_to_end_same_settings_reproduce_the_last_evaluation(tmp_path: Path) -> None:
    """One tiny training run (in this process), then through ``evaluate_checkpoint`` its model_final.pth with the
    run's own settings: the very detections of its last evaluation (the weights it scored), and a sliced row."""
    from detkit.cli import main

    out = tmp_path / "out"
    argv = ["compare", "--configs", str(CONFIG), "--seeds", "1", "--out", str(out), "--bootstrap", "20",
            "--set", *tiny_shapes(tmp_path / "data"), "--eval-variants", SAME, SLICED]
    assert compare(build_parser().parse_args(argv), launcher=lambda run, env, log: main(run)) == 0
    run = out / "runs" / CONFIG.stem / "seed0"
    assert json.loads((run / "eval-same" / "results.json").read_text()) == \
        json.loads((run / "results" / "bbox_epoch_1.json").read_text())
    report = json.loads((out / "report.json").read_text())
    assert report["labels"] == [CONFIG.stem, f"{CONFIG.stem}@same", f"{CONFIG.stem}@sliced"]
    same = report["comparisons"][f"{CONFIG.stem}@same"]
    assert same["diff"] == same["low"] == same["high"] == 0.0
    assert (run / "eval-sliced" / "results.json").is_file()
    assert report["configs"][f"{CONFIG.stem}@sliced"]["seeds"] == [0]
