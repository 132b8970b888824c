"""`acc-clip COMMAND ...`: one entry point that dispatches to each command module's `main(argv)`.

Bad input surfaces as an AccClipError, printed here as one line with the exit status of its kind
(errors.py). Adding a command: its module with `main(argv)`, and one line in COMMANDS."""

from __future__ import annotations

import importlib
import sys

from acc_clip.errors import UsageError, run_command

# command -> (module whose main(argv) runs it, one-line help); modules are imported only when their command runs.
COMMANDS = {
    "train": ("acc_clip.train.loop", "train a CLIP model (also: python -m acc_clip.train)"),
    "launch": (
        "acc_clip.runtime.launcher",
        "run train or eval under Accelerate's launcher, passing its exit status and one-line error through",
    ),
    "eval": ("acc_clip.evaluation.command", "evaluate a checkpoint: retrieval and zero-shot"),
    "export": (
        "acc_clip.checkpoint.export",
        "write an open_clip epoch_N.pt or local-dir folder from a step checkpoint",
    ),
    "demo-data": ("acc_clip.prep.demo_data", "generate the small COCO-shaped demo dataset"),
    "coco-csv": ("acc_clip.prep.coco_csv", "COCO captions JSON -> filepath,title CSV"),
    "shards": (
        "acc_clip.prep.shards.command",
        "CSV -> webdataset shards; `shards verify DIR` checks, `shards index SHARDS` counts them",
    ),
    "compare-loss": ("acc_clip.reports.compare_loss", "the seed's loss-curve check, one-sided and two-sided"),
    "plot": ("acc_clip.reports.plot", "plot loss, lr and samples/s of one or more runs"),
}


def usage() -> str:
    width = max(len(c) for c in COMMANDS)
    lines = ["usage: acc-clip COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return UsageError.exit_status
    module_name, _ = COMMANDS[command]
    return run_command(importlib.import_module(module_name).main, rest)


if __name__ == "__main__":
    sys.exit(main())
