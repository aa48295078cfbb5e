"""``infer``: detections on image files and folders, drawn, plus a COCO-results json (:mod:`detkit.infer`)."""

from __future__ import annotations

import argparse

from detkit.cli.common import add_run_arguments, checkpoint_config
from detkit.registry import ConfigError


def cmd_infer(args: argparse.Namespace) -> int:
    from detkit.api import load_detector  # lazy (here and below): torch, kept out of --help
    from detkit.engine.run_log import setup_logging
    from detkit.infer import infer_images
    from detkit.ops.tiles import tile_size

    setup_logging(None, 0)
    if not 0.0 <= args.score_thr <= 1.0:
        raise ConfigError(f"--score-thr must lie in [0, 1], got {args.score_thr}")
    tiles = None if args.tile is None else {"size": tile_size(args.tile, "--tile")}
    detector = load_detector(args.checkpoint, args.device or "auto", config=checkpoint_config(args))
    infer_images(detector, args.images, args.out, args.score_thr, tiles=tiles)
    return 0


def add_infer_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("infer", help="detect objects in image files (also: tools/infer.py)")
    add_run_arguments(p, config_required=False)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--images", nargs="+", required=True, help="image files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="folder for the drawn PNGs and results.json")
    p.add_argument("--score-thr", type=float, default=0.3)
    p.add_argument("--tile", type=int, default=None, metavar="SIZE",
                   help="sliced inference: SIZE-pixel tiles overlapping by 20%%, plus the whole image resized, "
                        "merged by class-aware NMS (docs/small_objects.md)")
    p.set_defaults(func=cmd_infer)
