"""``python -m feddymem.benchmarks ...``: the same as ``feddymem bench ...``."""

import sys

from feddymem.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
