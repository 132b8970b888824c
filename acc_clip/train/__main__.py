"""`python -m acc_clip.train ...` and `accelerate launch ... -m acc_clip.train ...`: the `train` command."""

import sys

from acc_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
