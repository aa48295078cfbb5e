"""`python tools/compare.py ...` = `python -m detkit compare ...`:
configs x seeds of training runs, AP differences with paired-bootstrap intervals (`--help`)."""

from __future__ import annotations

import sys

from detkit.cli import main as detkit_main

COMMAND = "compare"


def main(argv: list[str] | None = None) -> int:
    return detkit_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
