"""`python tools/infer.py ...` = `python -m detkit infer ...`: detect objects in image files and folders (`--help`)."""

from __future__ import annotations

import sys

from detkit.cli import main as detkit_main

COMMAND = "infer"


def main(argv: list[str] | None = None) -> int:
    return detkit_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
