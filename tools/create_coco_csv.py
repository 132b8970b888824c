#!/usr/bin/env python3
"""COCO captions JSON -> filepath,title CSV (same as `acc-clip coco-csv`)."""

import os
import sys

# Run from a checkout without installing: the package lives one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from acc_clip.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["coco-csv", *sys.argv[1:]]))
