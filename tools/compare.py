"""`python tools/compare.py --configs A.yaml B.yaml --seeds N --out DIR [...]` (same as `python -m detkit compare`):
configs x seeds trained as ordinary runs, then AP differences with paired-bootstrap intervals (docs/compare.md)."""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare", *sys.argv[1:]]))
