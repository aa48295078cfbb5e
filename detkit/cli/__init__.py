"""The command line: ``python -m detkit <command>``, and ``tools/<command>.py`` calling the same :func:`main`.

Each module adds its commands to one parser; :mod:`detkit.cli.errors` maps every command's errors to exit codes.
Modules import torch only inside their commands, so ``--help`` and argument errors stay fast.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from detkit.cli.analyze import add_analyze_parser, add_browse_parser, add_list_parser
from detkit.cli.benchmark import add_benchmark_parser
from detkit.cli.convert import add_convert_parser
from detkit.cli.evaluate import add_eval_parser
from detkit.cli.export import add_export_parser
from detkit.cli.infer import add_infer_parser
from detkit.cli.train import add_compare_parser, add_train_parser

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detkit", description="Config-driven object detection.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_list_parser, add_browse_parser, add_train_parser, add_eval_parser, add_infer_parser,
                add_export_parser, add_compare_parser, add_analyze_parser, add_convert_parser, add_benchmark_parser):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command (``argv`` without the program name; default ``sys.argv[1:]``); returns its exit code."""
    args = build_parser().parse_args(argv)
    from detkit.cli.errors import run_guarded  # lazy: the error classes import torch; --help never needs them

    return run_guarded(args.func, args)
