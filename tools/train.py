"""`python tools/train.py --config CFG [...]` (same as `python -m detkit train`)."""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
