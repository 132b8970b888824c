#!/usr/bin/env python3
"""Plot runs' loss, learning rate and samples/s: same as `acc-clip plot RUN_DIR [...] --out FILE.png`."""

import os
import sys

# Run from a checkout without installing: the package lives one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from acc_clip.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["plot", *sys.argv[1:]]))
