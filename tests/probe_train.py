"""The trainer as `python -m acc_clip.train ARGS` runs it, plus a record of what the fast-path flags
changed, written as JSON to $ACC_CLIP_PROBE at exit, so a test can tell a flag that worked from one
that was ignored (equal losses alone cannot: a dropped --grad-checkpointing also gives equal losses):

- checkpoint_calls: calls of torch.utils.checkpoint.checkpoint during the run (open_clip's
  transformers call it per block under --grad-checkpointing);
- channels_last: what the trainer chose, and image_weights_channels_last: whether the image tower's
  first convolution weight is really laid out channels_last;
- compiled: whether the model the loop steps is a torch.compile module.

    python tests/probe_train.py [-m acc_clip.train] ARGS     (helpers.run_trainer's launcher form)
"""

from __future__ import annotations

import atexit
import json
import os
import sys

import torch
import torch.utils.checkpoint

record: dict = {"checkpoint_calls": 0}
_checkpoint = torch.utils.checkpoint.checkpoint


def _counting_checkpoint(*args, **kwargs):
    record["checkpoint_calls"] += 1
    return _checkpoint(*args, **kwargs)


# Before open_clip is imported: its transformer binds `checkpoint` by name at import.
torch.utils.checkpoint.checkpoint = _counting_checkpoint

import acc_clip.train.loop as train  # noqa: E402
from acc_clip.errors import run_command  # noqa: E402
from acc_clip.runtime import parallel  # noqa: E402

_prepare_model = train.prepare_model  # an AttributeError here means the probe needs updating


def _probing_prepare_model(*args, **kwargs):
    model, optimizer, channels_last = _prepare_model(*args, **kwargs)
    conv = next(m for m in parallel.unwrap(model).visual.modules() if isinstance(m, torch.nn.Conv2d))
    weight = conv.weight
    record.update(
        channels_last=channels_last,
        image_weights_channels_last=weight.is_contiguous(memory_format=torch.channels_last)
        and not weight.is_contiguous(),
        compiled=isinstance(model, torch._dynamo.eval_frame.OptimizedModule),
    )
    return model, optimizer, channels_last


train.prepare_model = _probing_prepare_model


def _write_record() -> None:
    with open(os.environ["ACC_CLIP_PROBE"], "w") as file:
        json.dump(record, file)


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:2] == ["-m", "acc_clip.train"]:
        argv = argv[2:]
    atexit.register(_write_record)
    sys.exit(run_command(train.main, argv))  # as acc_clip.train's own __main__
