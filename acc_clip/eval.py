"""`python -m acc_clip.eval ...` / `accelerate launch -m acc_clip.eval ...`: the launcher entry point
of `acc-clip eval` (acc_clip/evaluation/command.py), as acc_clip.train is of `acc-clip train`."""

import sys

from acc_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
