"""`python tools/train.py ...` = `python -m detkit train ...`: train a detector from a YAML config (`--help`)."""

from __future__ import annotations

import sys

from detkit.cli import main as detkit_main

COMMAND = "train"


def main(argv: list[str] | None = None) -> int:
    return detkit_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
