"""`python tools/eval.py --checkpoint CKPT [--config CFG] [--show-dir DIR] ...`: the `eval` command
(`python -m detkit eval`), then the evaluation report (PR curves, confusion matrix, per-class AP,
lowest-recall images) in its output folder, and with --show-dir every val image drawn with ground
truth beside predictions."""

import sys

from detkit.analysis.cli import eval_main

if __name__ == "__main__":
    sys.exit(eval_main(sys.argv[1:]))
