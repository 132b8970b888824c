"""`acc-clip eval ...` (also `accelerate launch -m acc_clip.eval ...`): evaluate a
checkpoint with the training loop's own evaluator; one JSON line per evaluation on stdout (main
process), all metrics together in `--out`."""

from __future__ import annotations

import argparse
import json
import sys

from acc_clip.checkpoint.format import load_weights
from acc_clip.config import TrainConfig
from acc_clip.evaluation.evaluator import Evaluator
from acc_clip.loss import create_objective
from acc_clip.model.build import open_clip_model
from acc_clip.runtime.device import make_accelerator, plan_device


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="acc-clip eval", description="Evaluate a checkpoint: retrieval and zero-shot.")
    parser.add_argument("--model", required=True, help="open_clip model name, or local-dir:PATH")
    parser.add_argument("--checkpoint", required=True,
                        help="open_clip epoch_N.pt, a plain state dict, or an acc_clip checkpoints/step_N folder")
    parser.add_argument("--siglip", action="store_true",
                        help="a model trained with --siglip: it has a logit bias, and the validation loss is SigLIP's")
    parser.add_argument("--coca-caption-loss-weight", type=float, default=2.0,
                        help="a CoCa model's validation loss: the run's caption loss weight")
    parser.add_argument("--coca-contrastive-loss-weight", type=float, default=1.0,
                        help="a CoCa model's validation loss: the run's contrastive loss weight")
    parser.add_argument("--val-data", help="validation CSV (one image,caption pair per row) or shard folder")
    parser.add_argument("--val-num-samples", type=int,
                        help="samples the validation set holds (needed for shards without sizes.json)")
    parser.add_argument("--dataset-type", choices=("auto", "csv", "webdataset"), default="auto")
    parser.add_argument("--skip-bad-rows", action="store_true",
                        help="skip CSV rows whose field count differs from the header's (counted, named) instead of stopping")
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--csv-separator", default="\t")
    parser.add_argument("--zeroshot-data", help="folder with one sub-folder per class, or a filepath,label CSV")
    parser.add_argument("--zeroshot-classnames", help="class names, one per line (default: folder names)")
    parser.add_argument("--zeroshot-templates", help="prompt templates, one per line, {} = class name")
    parser.add_argument("--imagenet-val", help="ImageNet validation folder (1000 class sub-folders)")
    parser.add_argument("--imagenet-v2", help="ImageNetV2 matched-frequency folder (sub-folders 0..999), or the "
                                              "folder holding its ImageNetV2-matched-frequency, as open_clip_train")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto", help="cpu forces the CPU")
    parser.add_argument("--out", help="also write all metrics to this JSON file")
    args = parser.parse_args(argv)
    if not (args.val_data or args.zeroshot_data or args.imagenet_val or args.imagenet_v2):
        parser.error("nothing to evaluate: give --val-data, --zeroshot-data, --imagenet-val and/or --imagenet-v2")
    args.seed = 0  # evaluation reads in order: the seed orders nothing
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import open_clip

    accelerator = make_accelerator(plan_device("cpu" if args.device == "cpu" else None, "fp32"))
    siglip_init = {"init_logit_bias": -10.0} if args.siglip else {}  # the parameter exists; its value is loaded
    model, _, preprocess_val = open_clip_model(args.model, "", "--model", "--checkpoint", **siglip_init)
    load_weights(model, args.checkpoint, "--checkpoint")
    model.to(accelerator.device)
    if accelerator.is_main_process:
        print(f"acc-clip eval: {args.checkpoint} on {accelerator.num_processes} process(es), "
              f"device {accelerator.device}", file=sys.stderr)
    # The validation loss is the objective's that the model's name and --siglip select (CoCa, SigLIP or CLIP).
    objective = create_objective(TrainConfig(model=args.model, siglip=args.siglip,
                                             coca_caption_loss_weight=args.coca_caption_loss_weight,
                                             coca_contrastive_loss_weight=args.coca_contrastive_loss_weight),
                                 0, 1, accelerator.device)
    evaluator = Evaluator(args, preprocess_val, open_clip.get_tokenizer(args.model), accelerator, objective)
    results = evaluator.evaluate(model)
    if accelerator.is_main_process:
        for name, metrics in results.items():
            print(json.dumps({"eval": name, **metrics}), flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=2)
    return 0

