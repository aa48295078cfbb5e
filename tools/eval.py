"""`python tools/eval.py --config CFG --checkpoint CKPT ...` (same as `python -m detkit eval`)."""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
