#!/usr/bin/env python3
"""Stand-in for the vendor's compare_loss script: same as `acc-clip compare-loss REF NEW [...]`.

Exit status: 0 pass, 1 fail, 2 bad input.
"""

import os
import sys

# Run from a checkout without installing: the package lives one folder up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from acc_clip.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["compare-loss", *sys.argv[1:]]))
