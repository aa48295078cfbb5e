"""`python tools/eval.py ...` = `python -m detkit eval ...`:
COCO-evaluate a checkpoint on data.val and write the evaluation report (--show-dir: val images drawn) (`--help`)."""

from __future__ import annotations

import sys

from detkit.cli import main as detkit_main

COMMAND = "eval"


def main(argv: list[str] | None = None) -> int:
    return detkit_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
