"""Training curves of runs and dataset statistics (see docs/diagnostics.md).

``python tools/analyze.py curves RUN_DIR [RUN_DIR ...] [--keys ...] [--out FILE]``
``python tools/analyze.py dataset --config CFG [--set k=v ...] [--split train|val] [--out DIR]``
"""

import sys

from detkit.analysis.cli import analyze_main

if __name__ == "__main__":
    sys.exit(analyze_main(sys.argv[1:]))
