"""``train`` (with ``--eval-only``) and ``compare`` (configs x seeds of training runs)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detkit.cli.common import add_run_arguments, add_set_argument, run_config
from detkit.registry import ConfigError


def cmd_train(args: argparse.Namespace) -> int:
    import detkit.build  # noqa: F401  (registers every component: DiagnosticsHook of detkit.analysis too)
    from detkit.engine.interrupt import TrainingInterrupted  # lazy (here and below): torch, kept out of --help
    from detkit.engine.runner import resume_command, run_training

    cfg = run_config(args)
    work_dir = Path(args.work_dir or cfg.get("work_dir") or Path("work_dirs") / Path(args.config).stem)
    cfg["work_dir"] = str(work_dir)
    if args.load_from:
        cfg["load_from"] = args.load_from
    resume = None if args.resume is None else (args.resume or "auto")
    if args.eval_only:
        return eval_only(cfg, work_dir, resume, args.device)
    try:
        run_training(cfg, work_dir, device=args.device, resume=resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        print(f"stopped by {stop.reason}; latest.pth saved in {work_dir}. Continue with:\n  {resume_command()}",
              file=sys.stderr)
        return stop.exit_code
    return 0


def eval_only(cfg: dict, work_dir: Path, resume: str | None, device: str | None) -> int:
    """``train --eval-only --resume [CKPT]``: evaluate those weights, into ``work_dir/eval_<name>/``."""
    from detkit.engine.checkpoint import find_resume_checkpoint  # lazy (here and below): torch, kept out of --help
    from detkit.engine.runner import evaluate_checkpoint

    if resume is None:
        raise ConfigError("--eval-only needs weights: give --resume CKPT (or --resume for the work dir's latest)")
    if resume == "auto":
        found = find_resume_checkpoint(work_dir) if work_dir.is_dir() else None
        if found is None:
            raise ConfigError(f"--eval-only --resume: no readable checkpoint in {work_dir}; give --resume CKPT")
        resume = str(found[0])
    evaluate_checkpoint(cfg, resume, work_dir / f"eval_{Path(resume).stem}", device=device)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from detkit.analysis.compare import compare  # lazy: torch, kept out of --help

    return compare(args)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a detector from a YAML config (also: tools/train.py)")
    add_run_arguments(p)
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                   help="resume from CKPT, or without a path from the work dir's newest readable checkpoint")
    p.add_argument("--eval-only", action="store_true", help="evaluate the --resume weights and exit")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a work dir that holds another run, deleting that run's files")
    p.add_argument("--load-from", default=None, metavar="WEIGHTS",
                   help="start a new run (epoch 0) from a detector's weights: a detkit checkpoint or "
                        "torchvision:<Weights>.<NAME>, e.g. torchvision:FCOS_ResNet50_FPN_Weights.COCO_V1")
    p.set_defaults(func=cmd_train)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="train configs x seeds and compare their AP with paired-bootstrap "
                                       "intervals (also: tools/compare.py; docs/compare.md)")
    p.add_argument("--configs", nargs="+", required=True, metavar="CFG",
                   help="YAML configs; the first (with the first variant) is the baseline")
    p.add_argument("--seeds", type=int, default=3, help="runs per config, train.seed=0..N-1 (default 3)")
    add_set_argument(p)
    p.add_argument("--variants", nargs="+", action="extend", default=[], metavar='"NAME: K=V ..."',
                   help='named override sets, each run for every config, e.g. "fp32: train.amp=null" '
                        '"bf16: train.amp=bf16"')
    p.add_argument("--eval-variants", nargs="+", action="extend", default=[], metavar='"NAME: K=V ..."',
                   help="named eval.* / train.amp override sets: every run's final weights evaluated again with "
                        "each, a row <config>@NAME, e.g. \"sliced: 'eval.tiles={size: 256, overlap: 64, "
                        "full_image: true}'\" (after all runs finished, not with --shard)")
    p.add_argument("--out", required=True, help="folder for runs/, logs/ and report.{md,json,png}")
    p.add_argument("--devices", default=None, metavar="0,1,...",
                   help="GPUs: one run per GPU at a time, in parallel (CUDA_VISIBLE_DEVICES per run)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="train only runs I, I+N, I+2N, ... of the sorted list (0 <= I < N)")
    p.add_argument("--bootstrap", type=int, default=1000, metavar="N", help="bootstrap resamples (default 1000)")
    p.add_argument("--bootstrap-seed", type=int, default=0, metavar="S", help="seed of the resamples")
    p.set_defaults(func=cmd_compare)
