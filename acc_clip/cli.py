"""`acc-clip COMMAND ...`: one entry point that dispatches to each command module's `main(argv)`.

Bad input surfaces as `AccClipError`, printed here as one line, exit status 2.
"""

from __future__ import annotations

import importlib
import sys

from acc_clip.errors import AccClipError, user_error_exit_code

# command -> (module whose main(argv) runs it, one-line help); modules are imported only when their command runs.
COMMANDS = {
    "train": ("acc_clip.train.loop", "train a CLIP model (also: accelerate launch -m acc_clip.train)"),
    "demo-data": ("acc_clip.prep.demo_data", "generate the small COCO-shaped demo dataset"),
    "coco-csv": ("acc_clip.prep.coco_csv", "COCO captions JSON -> filepath,title CSV"),
    "shards": ("acc_clip.prep.shards.command", "CSV -> webdataset shards; `shards verify DIR` checks them"),
    "compare-loss": ("acc_clip.reports.compare_loss", "the seed's loss-curve check, one-sided and two-sided"),
    "plot": ("acc_clip.reports.plot", "plot loss, lr and samples/s of one or more runs"),
    "eval": ("acc_clip.evaluation.command", "evaluate a checkpoint: retrieval and zero-shot"),
    "export": ("acc_clip.checkpoint.export", "write an open_clip epoch_N.pt from a step checkpoint"),
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
        return user_error_exit_code()
    module_name, _ = COMMANDS[command]
    function = importlib.import_module(module_name).main
    try:
        return int(function(rest) or 0)
    except AccClipError as error:
        print(f"error: {error}", file=sys.stderr)
        return user_error_exit_code()


if __name__ == "__main__":
    sys.exit(main())
