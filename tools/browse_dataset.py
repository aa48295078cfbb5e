"""`python tools/browse_dataset.py ...` = `python -m detkit browse ...`:
draw transformed samples with their GT boxes to PNGs (`--help`)."""

from __future__ import annotations

import sys

from detkit.cli import main as detkit_main

COMMAND = "browse"


def main(argv: list[str] | None = None) -> int:
    return detkit_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
