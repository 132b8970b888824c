#!/usr/bin/env python3
"""Generate the small COCO-shaped demo dataset (same as `acc-clip demo-data`)."""

import sys

from acc_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["demo-data", *sys.argv[1:]]))
