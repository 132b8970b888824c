"""`acc-clip export CHECKPOINT --out model.pt`: an open_clip `epoch_N.pt` from a step checkpoint."""

from __future__ import annotations

import argparse
import os

from acc_clip.checkpoint.format import (OPTIMIZER_FILE, SCALER_FILE, WEIGHTS_FILE, Progress, atomic_torch_save,
                                        load_if_present, open_clip_checkpoint, plain_key, read_manifest)


def export_checkpoint(checkpoint: str, out: str) -> str:
    """Write an open_clip epoch_N.pt from a step checkpoint folder; returns a line saying what was
    written. Its `epoch` is the number of epochs completed, as open_clip counts: a checkpoint in
    the middle of epoch e exports as epoch e, and open_clip_train would resume it at e's start."""
    from safetensors.torch import load_file

    manifest = read_manifest(checkpoint, source="export")
    weights = {plain_key(k): v for k, v in load_file(os.path.join(checkpoint, WEIGHTS_FILE)).items()}
    optimizer_state, scaler_state = (load_if_present(os.path.join(checkpoint, name))
                                     for name in (OPTIMIZER_FILE, SCALER_FILE))
    progress = Progress(**manifest["progress"])
    steps_per_epoch = manifest.get("data", {}).get("steps_per_epoch")
    completed = progress.epoch + int(steps_per_epoch is not None and progress.step_in_epoch == steps_per_epoch)
    atomic_torch_save(open_clip_checkpoint(weights, optimizer_state, scaler_state, completed, manifest["name"]), out)
    return (f"wrote {out}: model {manifest['model']}, {completed} epoch(s) completed, global step "
            f"{progress.global_step}")


def main(argv: list[str]) -> int:
    """`acc-clip export CHECKPOINT --out model.pt`: an open_clip epoch_N.pt from a step checkpoint."""
    parser = argparse.ArgumentParser(prog="acc-clip export", description=main.__doc__)
    parser.add_argument("checkpoint", help="a checkpoints/step_NNNNNNNN folder")
    parser.add_argument("--out", required=True, help="the .pt file to write")
    args = parser.parse_args(argv)
    print(export_checkpoint(args.checkpoint, args.out))
    return 0
