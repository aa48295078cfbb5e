"""`python tools/infer.py --config CFG --checkpoint CKPT ...` (same as `python -m detkit infer`)."""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["infer", *sys.argv[1:]]))
