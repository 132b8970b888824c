#!/usr/bin/env python3
"""Generate the small COCO-shaped demo dataset (same as `acc-clip demo-data`)."""

import os
import sys

# Run from a checkout without installing: the package lives one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from acc_clip.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["demo-data", *sys.argv[1:]]))
