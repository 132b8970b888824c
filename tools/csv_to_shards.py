#!/usr/bin/env python3
"""Convert a CSV of image paths and captions into webdataset shards (same as `acc-clip shards`).

python tools/csv_to_shards.py --csv train_data.csv --out shards/ [--resize 256] [--workers 8]
python tools/csv_to_shards.py verify shards/
"""

import sys

from acc_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["shards", *sys.argv[1:]]))
