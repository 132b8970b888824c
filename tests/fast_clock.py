"""The trainer as `python -m acc_clip.train ARGS` runs it, with the save schedule's clock
(acc_clip.checkpoint.manager.monotonic, which --save-every-n-minutes reads) running $ACC_CLIP_CLOCK_SPEEDUP
times faster (default 1800: a second is half an hour), on process RANK faster still by a factor of
1 + RANK x $ACC_CLIP_CLOCK_RANK_SKEW (default 0), so that processes would find the interval over at different
steps, as when they started or saved at different moments.
A mock of time, because a test cannot wait for the default half-hour interval; every other clock of the run
keeps real time.

    python tests/fast_clock.py [-m acc_clip.train] ARGS     (background_trainer.Trainer's launcher form)
    accelerate launch ... tests/fast_clock.py [-m acc_clip.train] ARGS
"""

from __future__ import annotations

import os
import sys
import time

import acc_clip.checkpoint.manager as manager
import acc_clip.train.loop as train
from acc_clip.errors import run_command

SPEEDUP = float(os.environ.get("ACC_CLIP_CLOCK_SPEEDUP", "1800"))
SPEEDUP *= 1 + float(os.environ.get("ACC_CLIP_CLOCK_RANK_SKEW", "0")) * int(os.environ.get("RANK", "0"))
_start = time.monotonic()
assert manager.monotonic is time.monotonic  # the name the schedule reads; if it moved, this mock must follow
manager.monotonic = lambda: _start + (time.monotonic() - _start) * SPEEDUP  # type: ignore[assignment]

if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:2] == ["-m", "acc_clip.train"]:
        argv = argv[2:]
    sys.exit(run_command(train.main, argv))
