"""`python tools/analyze.py ...` = `python -m detkit analyze ...`:
training curves of runs (curves), dataset statistics (dataset), TIDE errors of results files (tide) (`--help`)."""

from __future__ import annotations

import sys

from detkit.cli import main as detkit_main

COMMAND = "analyze"


def main(argv: list[str] | None = None) -> int:
    return detkit_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
