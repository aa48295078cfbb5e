"""Train a detector from a YAML config: ``python tools/train.py --config CFG``."""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
