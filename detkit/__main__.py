import sys

from detkit.cli import main

sys.exit(main())
