#!/usr/bin/env python3
"""open_clip_train and acc_clip side by side on the same data, for each objective; the same as
`python -m benchmarks.parity_open_clip ...` (see there):

    python tools/parity_open_clip.py --objective siglip --train-data DATA.csv --open-clip-arithmetic

Exit status: 0 when the curves pass, the batches are open_clip_train's and the learning rates its
schedule's; 1 otherwise; on bad input, its kind's status (acc_clip/errors.py: 2 a flag, 3 the data, ...).
"""

import os
import sys

if __name__ == "__main__":
    # The parity check lives with the benchmarks, beside this checkout's configs/, not in the package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from benchmarks.parity_open_clip import main

    sys.exit(main())
