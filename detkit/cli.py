"""Command line shared by ``python -m detkit`` and the scripts in ``tools/``."""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path
from typing import Sequence

from detkit.data.coco import DatasetError
from detkit.engine.checkpoint import CheckpointError
from detkit.engine.trainer import NonFiniteLossError
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
    from detkit.engine import Trainer

    cfg, work_dir = _load(args)
    resume = None if args.resume is None else (args.resume or "auto")
    if args.eval_only and resume is None:
        raise ConfigError("--eval-only needs weights: give --resume CKPT (or --resume for the work dir's latest)")
    trainer = Trainer(cfg, work_dir, device=args.device, resume=resume, build_train=not args.eval_only)
    if args.eval_only:
        trainer.evaluate()
    else:
        trainer.train()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from detkit.engine import evaluate_checkpoint

    cfg, work_dir = _load(args)
    if not args.work_dir:  # next to the training run's files, never over them
        work_dir = work_dir / f"eval_{Path(args.checkpoint).stem}"
    evaluate_checkpoint(cfg, args.checkpoint, work_dir, device=args.device)
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from detkit.engine.inference import infer_images
    from detkit.engine.run_log import setup_logging

    cfg, _ = _load(args)
    setup_logging(None, 0)
    infer_images(cfg, args.checkpoint, args.images, args.out, args.score_thr, args.device or "auto")
    return 0


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set train.epochs=3 model.head.losses.bbox.type=DIoULoss")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config")
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
    p_train.set_defaults(func=cmd_train)
    p_eval = sub.add_parser("eval", help="COCO-evaluate a checkpoint on data.val (also: tools/eval.py)")
    add_run_arguments(p_eval)
    p_eval.add_argument("--checkpoint", required=True)
    p_eval.set_defaults(func=cmd_eval)
    p_infer = sub.add_parser("infer", help="detect objects in image files (also: tools/infer.py)")
    add_run_arguments(p_infer)
    p_infer.add_argument("--checkpoint", required=True)
    p_infer.add_argument("--images", nargs="+", required=True, help="image files or folders")
    p_infer.add_argument("--out", required=True, help="folder for the drawn PNGs and results.json")
    p_infer.add_argument("--score-thr", type=float, default=0.3)
    p_infer.set_defaults(func=cmd_infer)
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


if __name__ == "__main__":
    sys.exit(main())
