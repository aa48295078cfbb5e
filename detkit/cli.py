"""Command line shared by ``python -m detkit`` and the scripts in ``tools/``."""

from __future__ import annotations

import argparse
import inspect
import sys
from typing import Sequence

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


def cmd_browse(args: argparse.Namespace) -> int:
    from pathlib import Path

    from detkit.config import load_config
    from detkit.data import build_dataset
    from detkit.visualize import draw_detections, save_grid

    cfg = load_config(args.config, args.set)
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


def cmd_train(args: argparse.Namespace) -> int:
    print("detkit train: not implemented yet (the trainer lands with issue 5); "
          f"config given: {args.config}", file=sys.stderr)
    return 2


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set train.epochs=3 model.head.losses.bbox.type=DIoULoss")


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
    p_train = sub.add_parser("train", help="train a detector from a YAML config")
    p_train.add_argument("--config", required=True)
    p_train.set_defaults(func=cmd_train)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
