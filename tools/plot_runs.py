#!/usr/bin/env python3
"""Plot runs' loss, learning rate and samples/s: same as `acc-clip plot RUN_DIR [...] --out FILE.png`."""

import sys

from acc_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))
