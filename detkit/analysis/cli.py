"""``tools/analyze.py`` (training curves of runs, dataset statistics) and ``tools/eval.py`` (the ``eval``
command plus the evaluation report and ``--show-dir``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence

from detkit.analysis import AnalysisError
from detkit.cli import add_run_arguments, add_set_argument, eval_work_dir
from detkit.data.coco import DatasetError
from detkit.engine.checkpoint import CheckpointError
from detkit.registry import ConfigError

CURVE_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")  # picture formats matplotlib writes (jpg through Pillow)


def run_guarded(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``func(args)`` with bad input reported as one ``error:`` line and a non-zero exit, no traceback."""
    try:
        return func(args)
    except (ConfigError, AnalysisError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DatasetError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


def cmd_curves(args: argparse.Namespace) -> int:
    from detkit.analysis.training_curves import plot_curves, read_metrics
    from detkit.engine.inference import is_inside

    out = Path(args.out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file path such as {out / 'curves.png'}")
    if out.suffix.lower() not in CURVE_SUFFIXES:
        raise ConfigError(f"--out {out}: {out.suffix or 'no suffix'} is not a picture format; give a "
                          f"{', '.join(CURVE_SUFFIXES)} file, e.g. {out.with_suffix('.png')}")
    for run_dir in args.run_dirs:
        if out.exists() and is_inside(out, run_dir):
            raise ConfigError(f"--out {out} is a file of the run {run_dir}; write the curves outside the run's files")
    runs = [read_metrics(d) for d in args.run_dirs]
    names = [r.name for r in runs]
    for run, run_dir in zip(runs, args.run_dirs):  # two runs of the same folder name: tell them apart
        if names.count(run.name) > 1:
            run.name = str(run_dir)
    path = plot_curves(runs, args.out, args.keys)
    print(f"wrote {path} ({len(runs)} run(s))")
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    from detkit.analysis.dataset_stats import (
        config_health,
        dataset_stats,
        format_health,
        format_stats,
        plot_dataset_stats,
    )
    from detkit.cli import _config
    from detkit.data import build_dataset

    cfg = _config(args)
    if args.split not in (cfg.get("data") or {}):
        raise ConfigError(f"data.{args.split}: the config has no dataset for split '{args.split}'")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be a positive number of images, got {args.limit}")
    dataset = build_dataset(cfg["data"][args.split], f"data.{args.split}")
    stats = dataset_stats(dataset, args.limit, f"data.{args.split}")
    health = config_health(cfg, args.split, dataset, args.limit)
    name = f"{Path(args.config).stem} data.{args.split}"
    print(format_stats(stats, name))
    print(format_health(health) if isinstance(health, dict) else f"assigner health: not measured ({health})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = plot_dataset_stats(stats, out / f"dataset_{args.split}.png", title=f"{name} ({len(stats.boxes_per_image)} "
                                                                            f"images, after its transforms)",
                             health=health if isinstance(health, dict) else None)
    summary = {**stats.summary(), "images_without_boxes_ids": list(map(str, stats.empty)), "assigner_health": health}
    (out / f"dataset_{args.split}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {png} and {out / f'dataset_{args.split}.json'}")
    return 0


def analyze_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/analyze.py", description="Training curves and dataset statistics.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_curves = sub.add_parser("curves", help="loss terms, total, lr, AP/AP50 of one or more runs, overlaid")
    p_curves.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="training work dirs (with metrics.jsonl)")
    p_curves.add_argument("--keys", nargs="+", default=None,
                          help="what to draw (default: every loss term, total, lr, AP, AP50), e.g. bbox AP "
                               "per_class/circle grad_norm")
    p_curves.add_argument("--out", default="curves.png",
                          help="the picture to write: .png, .pdf, .svg or .jpg (default: curves.png)")
    p_curves.set_defaults(func=cmd_curves)
    p_data = sub.add_parser("dataset", help="class counts, boxes per image, box sizes, images without boxes, "
                                            "the config's assigner health (positives per box)")
    p_data.add_argument("--config", required=True)
    p_data.add_argument("--split", default="train", choices=["train", "val"])
    p_data.add_argument("--out", default="dataset_stats", help="folder for dataset_<split>.png/.json")
    p_data.add_argument("--limit", type=int, default=None, help="read only the first N images")
    add_set_argument(p_data)
    p_data.set_defaults(func=cmd_dataset)
    return parser


def analyze_main(argv: Sequence[str] | None = None) -> int:
    args = analyze_parser().parse_args(argv)
    return run_guarded(args.func, args)


def eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tools/eval.py", description=(
        "COCO-evaluate a checkpoint on data.val (as `python -m detkit eval`), then write the evaluation report "
        "(PR curves, confusion matrix, per-class AP, lowest-recall images) into the output folder."))
    add_run_arguments(parser, config_required=False)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--show-dir", default=None, metavar="DIR",
                        help="also draw every val image with its ground truth beside the predictions into DIR")
    return parser


def eval_main(argv: Sequence[str] | None = None) -> int:
    """``detkit eval`` with the same arguments, then the report (and ``--show-dir``) from its results.json."""
    from detkit.cli import main

    argv = list(sys.argv[1:] if argv is None else argv)
    args = eval_parser().parse_args(argv)
    if args.show_dir and (code := run_guarded(check_show_target, args)):
        return code
    rest = [a for i, a in enumerate(argv) if not (a == "--show-dir" or a.startswith("--show-dir=")
                                                  or (i and argv[i - 1] == "--show-dir"))]
    code = main(["eval", *rest])
    return code or run_guarded(report_evaluation, args)


def eval_config(args: argparse.Namespace) -> dict:
    """The config ``detkit eval`` evaluates with: ``--config`` (and ``--set``), else the checkpoint's."""
    from detkit.cli import _checkpoint_config
    from detkit.engine.checkpoint import load_checkpoint

    return _checkpoint_config(args) or load_checkpoint(args.checkpoint).get("config") or {}


def check_show_target(args: argparse.Namespace) -> int:
    """``--show-dir`` checked against the val images' folder before the evaluation runs."""
    from detkit.analysis.show import check_show_dir
    from detkit.data import build_dataset

    spec = (eval_config(args).get("data") or {}).get("val")
    if spec:  # without one, the evaluation itself says what is missing
        check_show_dir(args.show_dir, build_dataset({**spec, "transforms": []}, "data.val").img_dir)
    return 0


def report_evaluation(args: argparse.Namespace) -> int:
    """The report of the evaluation ``detkit eval`` just wrote (same config, same output folder)."""
    from detkit.analysis.report import write_eval_report
    from detkit.analysis.show import write_show_dir
    from detkit.data import build_dataset
    from detkit.engine.checkpoint import load_checkpoint
    from detkit.engine.evaluator import EvalSettings, eval_classes, run_cocoeval

    cfg = eval_config(args)
    work_dir = eval_work_dir(args)
    settings = EvalSettings.from_config(cfg)
    results = json.loads((work_dir / "results.json").read_text())
    spec = cfg["data"]["val"]
    dataset = build_dataset(spec, "data.val")
    # the classes the evaluation scored: the checkpoint's matched to the val set's by name, as `eval` did
    state = load_checkpoint(args.checkpoint, mmap=True)
    matched = eval_classes(dataset, state.get("classes"), None, "the checkpoint")
    coco_eval = run_cocoeval(matched.coco, results, dataset.ids, settings.backend) if results else None
    files = write_eval_report(work_dir, coco_eval, matched.coco, results, matched.classes, dataset.ids,
                              settings.iou_thr, settings.score_thr, title=Path(args.checkpoint).name)
    print(f"wrote {', '.join(f.name for f in files)} to {work_dir}")
    if args.show_dir:
        originals = build_dataset({**spec, "transforms": []}, "data.val")  # original pixels, as results.json
        n = write_show_dir(originals, results, args.show_dir, settings.score_thr)
        print(f"drew {n} val images (ground truth | predictions, score >= {settings.score_thr:g}) into {args.show_dir}")
    return 0
