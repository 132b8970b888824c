#!/usr/bin/env python3
"""Convert a CSV of image paths and captions into webdataset shards (same as `acc-clip shards`).

    python tools/csv_to_shards.py --csv train_data.csv --out shards/ [--resize 256] [--workers 8]
    python tools/csv_to_shards.py verify shards/
"""

import os
import sys

# Run from a checkout without installing: the package lives one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from acc_clip.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["shards", *sys.argv[1:]]))
