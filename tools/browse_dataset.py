"""Write PNGs of transformed samples with their GT boxes drawn.

``python tools/browse_dataset.py --config CFG [--split train|val] --out DIR -n 16 [--set k=v ...]``
"""

import sys

from detkit.cli import main

if __name__ == "__main__":
    sys.exit(main(["browse", *sys.argv[1:]]))
