"""`python tools/export.py --checkpoint CKPT --format onnx|torchscript --out FILE` (= `python -m detkit export`)."""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
