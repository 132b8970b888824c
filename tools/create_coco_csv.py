#!/usr/bin/env python3
"""COCO captions JSON -> filepath,title CSV (same as `acc-clip coco-csv`)."""

import sys

from acc_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["coco-csv", *sys.argv[1:]]))
