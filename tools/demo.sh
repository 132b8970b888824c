#!/usr/bin/env bash
# The demo: generate the COCO-shaped demo data, make the CSVs, train a tiny CLIP under
# `acc-clip launch` (Accelerate's launcher) on the CPU, and show validation retrieval before and after, zero-shot top-1,
# and a loss plot. Run from the repository root (`make demo` installs first, then calls this).
set -euo pipefail
export HF_HUB_OFFLINE=1
DATA=${DATA:-demo_data}
RUN=${RUN:-demo_run/demo}

acc-clip demo-data "$DATA"
acc-clip coco-csv --annotations "$DATA/annotations/captions_train2017.json" --images-dir "$DATA/train2017" \
    --out "$DATA/train_data.csv"
acc-clip coco-csv --annotations "$DATA/annotations/captions_val2017.json" --images-dir "$DATA/val2017" \
    --out "$DATA/val_data.csv"

rm -rf "$RUN"
acc-clip launch --config_file launch/single_card.yaml train --config configs/demo.yaml \
    --train-data "$DATA/train_data.csv" --val-data "$DATA/val_data.csv" \
    --zeroshot-data "$DATA/zeroshot" --zeroshot-classnames "$DATA/zeroshot/classnames.txt" \
    --zeroshot-templates "$DATA/zeroshot/templates.txt" \
    --logs "$(dirname "$RUN")" --name "$(basename "$RUN")"

acc-clip plot "$RUN" --out "$RUN/loss.png"
python - "$RUN" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(f"{sys.argv[1]}/results.jsonl")]
first, last = rows[0], rows[-1]
loss = [json.loads(line)["loss"] for line in open(f"{sys.argv[1]}/metrics.jsonl")]
chance = 1 / last["coco_num_images"]
print(f"\ntrain loss: {loss[0]:.3f} at the first step -> {sum(loss[-10:]) / 10:.3f} (mean of the last 10)")
print(f"validation image->text R@1 (COCO protocol, {last['coco_num_images']} images, chance {chance:.4f}): "
      f"{first['coco_image_to_text_R@1']:.4f} before -> {last['coco_image_to_text_R@1']:.4f} after "
      f"({last['coco_image_to_text_R@1'] / chance:.1f}x chance)")
print(f"validation text->image R@1: {first['coco_text_to_image_R@1']:.4f} -> {last['coco_text_to_image_R@1']:.4f}")
print(f"zero-shot top-1 ({last['zeroshot_num_samples']} images): {first['zeroshot_top1']:.4f} -> {last['zeroshot_top1']:.4f}")
print(f"loss plot: {sys.argv[1]}/loss.png")
PY
