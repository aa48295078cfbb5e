"""Command line shared by ``python -m detkit`` and the scripts in ``tools/``."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Sequence

from detkit.data.coco import DatasetError
from detkit.engine.checkpoint import CheckpointError
from detkit.engine.hooks.nan_guard import NonFiniteLossError
from detkit.engine.interrupt import TrainingInterrupted
from detkit.registry import REGISTRIES, ConfigError, Registry, format_params


def _first_doc_line(obj: object) -> str:
    doc = inspect.getdoc(obj) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def format_registry(registry: Registry) -> str:
    """Every component of ``registry`` with its parameters, defaults and first docstring line."""
    lines = [f"{registry.name} ({len(registry)})"]
    for name, obj in registry.items():
        lines.append(f"  {name}({format_params(obj)})")
        doc = _first_doc_line(obj)
        if doc:
            lines.append(f"      {doc}")
    if not len(registry):
        lines.append("  (none registered)")
    return "\n".join(lines)


def cmd_list(args: argparse.Namespace) -> int:
    import detkit.build  # noqa: F401  (fills the registries)

    names = args.registries or list(REGISTRIES)
    for name in names:
        if name not in REGISTRIES:
            raise ConfigError(f"unknown registry '{name}'; known: {', '.join(REGISTRIES)}")
    print("\n\n".join(format_registry(REGISTRIES[n]) for n in names))
    return 0


def _config(args: argparse.Namespace) -> dict:
    """The resolved config of ``--config`` with ``--set`` applied and its ``imports`` imported."""
    from detkit.config import import_modules, load_config

    cfg = load_config(args.config, args.set)
    import_modules(cfg)
    return cfg


def cmd_browse(args: argparse.Namespace) -> int:
    from detkit.data import build_dataset
    from detkit.visualize import draw_detections, save_grid

    cfg = _config(args)
    dataset = build_dataset(cfg["data"][args.split], f"data.{args.split}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    drawn = []
    for index in range(min(args.n, len(dataset))):
        image, target = dataset[index]
        picture = draw_detections(image, target["boxes"], target["labels"], dataset.classes)
        save_grid([picture], out / f"{args.split}_{index:03d}.png", nrow=1)
        drawn.append(picture)
    if drawn:
        save_grid(drawn, out / f"{args.split}_grid.png")
    print(f"wrote {len(drawn)} samples of data.{args.split} ({len(dataset)} images, classes "
          f"{dataset.classes}) to {out}")
    return 0


def _load(args: argparse.Namespace) -> tuple[dict, Path]:
    """``_config`` plus the work dir (``--work-dir``, ``work_dir`` of the config, or work_dirs/<name>)."""
    cfg = _config(args)
    work_dir = Path(args.work_dir or cfg.get("work_dir") or Path("work_dirs") / Path(args.config).stem)
    cfg["work_dir"] = str(work_dir)
    return cfg, work_dir


def cmd_train(args: argparse.Namespace) -> int:
    from detkit.engine.runner import resume_command, run_training

    cfg, work_dir = _load(args)
    if args.load_from:
        cfg["load_from"] = args.load_from
    resume = None if args.resume is None else (args.resume or "auto")
    if args.eval_only:
        return _eval_only(cfg, work_dir, resume, args.device)
    try:
        run_training(cfg, work_dir, device=args.device, resume=resume, overwrite=args.overwrite)
    except TrainingInterrupted as stop:
        print(f"stopped by {stop.reason}; latest.pth saved in {work_dir}. Continue with:\n  {resume_command()}",
              file=sys.stderr)
        return stop.exit_code
    return 0


def _eval_only(cfg: dict, work_dir: Path, resume: str | None, device: str | None) -> int:
    """``train --eval-only --resume [CKPT]``: evaluate those weights, into ``work_dir/eval_<name>/``."""
    from detkit.engine.checkpoint import find_resume_checkpoint
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


def _checkpoint_config(args: argparse.Namespace) -> dict | None:
    """``--config`` (imports imported: the user named it), else None: the checkpoint's own config is used,
    whose ``imports`` are never imported (a checkpoint must not run code)."""
    if args.config:
        return _config(args)
    if args.set:
        from detkit.config import apply_override
        from detkit.engine.checkpoint import load_checkpoint

        cfg = dict(load_checkpoint(args.checkpoint).get("config") or {})
        for item in args.set:
            apply_override(cfg, item)
        return cfg
    return None


def eval_work_dir(args: argparse.Namespace) -> Path:
    """Where ``eval`` writes: ``--work-dir``, else ``eval_<checkpoint name>/`` next to the checkpoint (or the
    training run's files), never over them."""
    checkpoint = Path(args.checkpoint)
    return Path(args.work_dir) if args.work_dir else checkpoint.parent / f"eval_{checkpoint.stem}"


def cmd_eval(args: argparse.Namespace) -> int:
    from detkit.engine.checkpoint import load_checkpoint
    from detkit.engine.runner import evaluate_checkpoint

    cfg = _checkpoint_config(args)
    if cfg is None:
        cfg = load_checkpoint(args.checkpoint).get("config") or {}
        if "model" not in cfg:
            raise ConfigError(f"{args.checkpoint}: the checkpoint stores no config; give --config")
    evaluate_checkpoint(cfg, args.checkpoint, eval_work_dir(args), device=args.device)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from detkit.api import load_detector
    from detkit.engine.inference import infer_images
    from detkit.engine.run_log import setup_logging

    setup_logging(None, 0)
    if not 0.0 <= args.score_thr <= 1.0:
        raise ConfigError(f"--score-thr must lie in [0, 1], got {args.score_thr}")
    detector = load_detector(args.checkpoint, args.device or "auto", config=_checkpoint_config(args))
    infer_images(detector, args.images, args.out, args.score_thr)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from detkit.export import ExportError, export_checkpoint

    try:
        check = export_checkpoint(args.checkpoint, args.format, args.out, dynamo=not args.legacy_exporter)
    except ExportError as err:  # the exporter failed or its file failed the check: nothing was written
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} ({check['mib']:.1f} MiB): uint8 images (B, 3, H, W) -> boxes (B, N, 4), scores (B, N), "
          f"labels (B, N) (empty slots: score 0, label -1). Check against PyTorch on a 256x320 image: max box "
          f"difference {check['box_diff']:.2g} px, max score difference {check['score_diff']:.2g}, labels equal")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from detkit.analysis import AnalysisError
    from detkit.analysis.compare import compare

    try:
        return compare(args)
    except AnalysisError as err:  # a run folder without its evaluation: bad data, not a bad argument
        print(f"error: {err}", file=sys.stderr)
        return 1


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set train.epochs=3 model.head.losses.bbox.type=DIoULoss")


def add_run_arguments(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    parser.add_argument("--config", required=config_required,
                        help="YAML config" if config_required
                        else "YAML config (default: the one stored in the checkpoint)")
    parser.add_argument("--work-dir", default=None, help="output folder (default: work_dirs/<config name>)")
    parser.add_argument("--device", default=None, choices=["auto", "cpu", "cuda"],
                        help="default: train.device of the config (auto: GPU when available)")
    add_set_argument(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detkit", description="Config-driven object detection.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="list registered components with their parameters")
    p_list.add_argument("registries", nargs="*", metavar="REGISTRY",
                        help=f"any of: {', '.join(REGISTRIES)} (default: all)")
    p_list.set_defaults(func=cmd_list)
    p_browse = sub.add_parser("browse", help="draw transformed samples with their GT boxes to PNGs")
    p_browse.add_argument("--config", required=True)
    p_browse.add_argument("--split", default="train", choices=["train", "val"])
    p_browse.add_argument("--out", required=True, help="folder for the PNGs")
    p_browse.add_argument("-n", type=int, default=16, help="number of samples")
    add_set_argument(p_browse)
    p_browse.set_defaults(func=cmd_browse)
    p_train = sub.add_parser("train", help="train a detector from a YAML config (also: tools/train.py)")
    add_run_arguments(p_train)
    p_train.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                         help="resume from CKPT, or without a path from the work dir's newest readable checkpoint")
    p_train.add_argument("--eval-only", action="store_true", help="evaluate the --resume weights and exit")
    p_train.add_argument("--overwrite", action="store_true",
                         help="start a new run in a work dir that holds another run, deleting that run's files")
    p_train.add_argument("--load-from", default=None, metavar="WEIGHTS",
                         help="start a new run (epoch 0) from a detector's weights: a detkit checkpoint or "
                              "torchvision:<Weights>.<NAME>, e.g. torchvision:FCOS_ResNet50_FPN_Weights.COCO_V1")
    p_train.set_defaults(func=cmd_train)
    p_eval = sub.add_parser("eval", help="COCO-evaluate a checkpoint on data.val (also: tools/eval.py)")
    add_run_arguments(p_eval, config_required=False)
    p_eval.add_argument("--checkpoint", required=True)
    p_eval.set_defaults(func=cmd_eval)
    p_infer = sub.add_parser("infer", help="detect objects in image files (also: tools/infer.py)")
    add_run_arguments(p_infer, config_required=False)
    p_infer.add_argument("--checkpoint", required=True)
    p_infer.add_argument("--images", nargs="+", required=True, help="image files or folders (searched recursively)")
    p_infer.add_argument("--out", required=True, help="folder for the drawn PNGs and results.json")
    p_infer.add_argument("--score-thr", type=float, default=0.3)
    p_infer.set_defaults(func=cmd_infer)
    p_export = sub.add_parser("export", help="export a checkpoint to ONNX or TorchScript (also: tools/export.py)")
    p_export.add_argument("--checkpoint", required=True)
    p_export.add_argument("--format", required=True, choices=["onnx", "torchscript"])
    p_export.add_argument("--out", required=True,
                          help="the file to write (.onnx or .pt); replaced only once the new file passed the check")
    p_export.add_argument("--legacy-exporter", action="store_true",
                          help="ONNX through torch.onnx's TorchScript-based exporter (faster to export; same graph)")
    p_export.set_defaults(func=cmd_export)
    p_compare = sub.add_parser("compare", help="train configs x seeds and compare their AP with paired-bootstrap "
                                               "intervals (also: tools/compare.py; docs/compare.md)")
    p_compare.add_argument("--configs", nargs="+", required=True, metavar="CFG",
                           help="YAML configs; the first (with the first variant) is the baseline")
    p_compare.add_argument("--seeds", type=int, default=3, help="runs per config, train.seed=0..N-1 (default 3)")
    add_set_argument(p_compare)
    p_compare.add_argument("--variants", nargs="+", action="extend", default=[], metavar='"NAME: K=V ..."',
                           help='named override sets, each run for every config, e.g. "fp32: train.amp=null" '
                                '"bf16: train.amp=bf16"')
    p_compare.add_argument("--out", required=True, help="folder for runs/, logs/ and report.{md,json,png}")
    p_compare.add_argument("--devices", default=None, metavar="0,1,...",
                           help="GPUs: one run per GPU at a time, in parallel (CUDA_VISIBLE_DEVICES per run)")
    p_compare.add_argument("--shard", default=None, metavar="I/N",
                           help="train only runs I, I+N, I+2N, ... of the sorted list (0 <= I < N)")
    p_compare.add_argument("--bootstrap", type=int, default=1000, metavar="N",
                           help="bootstrap resamples (default 1000)")
    p_compare.add_argument("--bootstrap-seed", type=int, default=0, metavar="S", help="seed of the resamples")
    p_compare.set_defaults(func=cmd_compare)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (DatasetError, CheckpointError, NonFiniteLossError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except OSError as err:  # disk full, read-only folder, permissions: the path and the reason
        where = f"{err.filename}: " if err.filename else ""
        print(f"error: {where}{err.strerror or err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
