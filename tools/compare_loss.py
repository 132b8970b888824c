#!/usr/bin/env python3
"""Stand-in for the vendor's compare_loss script: same as `acc-clip compare-loss REF NEW [...]`.

Exit status: 0 pass, 1 fail, 2 bad input.
"""

import sys

from acc_clip.cli import main

if __name__ == "__main__":
    sys.exit(main(["compare-loss", *sys.argv[1:]]))
