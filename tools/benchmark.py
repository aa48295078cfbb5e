"""`python tools/benchmark.py ...` = `python -m detkit benchmark ...`:
throughput, memory and time split of a config; losses, assigners, loading against peers (`--help`)."""

from __future__ import annotations

import sys

from detkit.cli import main as detkit_main

COMMAND = "benchmark"


def main(argv: list[str] | None = None) -> int:
    return detkit_main([COMMAND, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
