"""``eval``: COCO-evaluate a checkpoint on data.val, then write the evaluation report (PR curves, confusion
matrix, per-class AP, lowest-recall images) beside its results, and with ``--show-dir`` every val image
drawn with its ground truth beside the predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from detkit.cli.common import add_run_arguments, checkpoint_config
from detkit.registry import ConfigError


def eval_work_dir(args: argparse.Namespace) -> Path:
    """Where ``eval`` writes: ``--work-dir``, else ``eval_<checkpoint name>/`` next to the checkpoint (or the
    training run's files), never over them."""
    checkpoint = Path(args.checkpoint)
    return Path(args.work_dir) if args.work_dir else checkpoint.parent / f"eval_{checkpoint.stem}"


def cmd_eval(args: argparse.Namespace) -> int:
    from detkit.analysis.show import check_show_dir  # lazy (here and below): torch, kept out of --help
    from detkit.data import build_dataset
    from detkit.engine.checkpoint import load_checkpoint
    from detkit.engine.runner import evaluate_checkpoint

    cfg = checkpoint_config(args)
    if cfg is None:
        cfg = load_checkpoint(args.checkpoint).get("config") or {}
        if "model" not in cfg:
            raise ConfigError(f"{args.checkpoint}: the checkpoint stores no config; give --config")
    val = (cfg.get("data") or {}).get("val")
    if args.show_dir and val:  # checked before the evaluation runs; without data.val the evaluation says so
        images: Any = build_dataset({**val, "transforms": []}, "data.val")  # COCO-style: img_dir, ids, coco
        check_show_dir(args.show_dir, images.img_dir)
    work_dir = eval_work_dir(args)
    evaluate_checkpoint(cfg, args.checkpoint, work_dir, device=args.device)
    report_evaluation(cfg, args.checkpoint, work_dir, args.show_dir)
    return 0


def report_evaluation(cfg: dict, checkpoint: str, work_dir: Path, show_dir: str | None) -> None:
    """The report of the evaluation just written to ``work_dir/results.json`` (and ``show_dir``'s drawings)."""
    from detkit.analysis.report import write_eval_report  # lazy (here and below): torch, kept out of --help
    from detkit.analysis.show import write_show_dir
    from detkit.analysis.tide import tide_errors
    from detkit.analysis.tide_plot import write_tide
    from detkit.data import build_dataset
    from detkit.engine.checkpoint import load_checkpoint
    from detkit.engine.evaluator import EvalSettings, eval_classes, run_cocoeval

    settings = EvalSettings.from_config(cfg)
    results = json.loads((work_dir / "results.json").read_text())
    spec = cfg["data"]["val"]
    dataset: Any = build_dataset(spec, "data.val")  # COCO-style (CocoDataset and kin, TiledDataset): ids, coco
    # the classes the evaluation scored: the checkpoint's matched to the val set's by name, as the evaluation did
    state = load_checkpoint(checkpoint, mmap=True)
    matched = eval_classes(dataset, state.get("classes"), None, "the checkpoint")
    coco_eval = run_cocoeval(matched.coco, results, dataset.ids, settings.backend) if results else None
    files = write_eval_report(work_dir, coco_eval, matched.coco, results, matched.classes, dataset.ids,
                              settings.iou_thr, settings.score_thr, title=Path(checkpoint).name)
    files += write_tide(tide_errors(matched.coco, results, dataset.ids), work_dir)  # where the AP goes
    print(f"wrote {', '.join(f.name for f in files)} to {work_dir}")
    if show_dir:
        originals = build_dataset({**spec, "transforms": []}, "data.val")  # original pixels, as results.json
        n = write_show_dir(originals, results, show_dir, settings.score_thr)
        print(f"drew {n} val images (ground truth | predictions, score >= {settings.score_thr:g}) into {show_dir}")


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="COCO-evaluate a checkpoint on data.val and write its report (also: "
                                    "tools/eval.py)",
                       description="COCO-evaluate a checkpoint on data.val, then write the evaluation report (PR "
                                   "curves, confusion matrix, per-class AP, lowest-recall images) into the output "
                                   "folder.")
    add_run_arguments(p, config_required=False)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--show-dir", default=None, metavar="DIR",
                   help="also draw every val image with its ground truth beside the predictions into DIR")
    p.set_defaults(func=cmd_eval)
