"""``python -m feddymem.flower ...``: the same as ``feddymem flower ...``."""

import sys

from feddymem.cli import main

if __name__ == "__main__":
    sys.exit(main(["flower", *sys.argv[1:]]))
