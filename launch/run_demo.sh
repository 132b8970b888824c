#!/usr/bin/env bash
# The vendor's run_demo.py default run (open_clip_train's flags, unchanged) on acc_clip, one card.
#
#   launch/run_demo.sh [TRAIN_CSV] [more acc_clip.train flags, which override the defaults below]
#
# TRAIN_CSV: the first argument, else $TRAIN_DATA, else COCO/train_data.csv (as run_demo.py).
# ACCELERATE_CONFIG picks another launch config (default launch/single_card.yaml);
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
train_data=${TRAIN_DATA:-COCO/train_data.csv}
if [[ $# -gt 0 && $1 != -* ]]; then
    train_data=$1
    shift
fi

command=(
    "${ACCELERATE:-accelerate}" launch --config_file "${ACCELERATE_CONFIG:-$here/single_card.yaml}"
    -m acc_clip.train
    --train-data "$train_data" --dataset-type auto --csv-separator , --csv-img-key filepath
    --csv-caption-key title --logs ./logs/ --workers 4 --batch-size 64 --epochs 32 --lr 0.0005
    --beta1 0.9 --beta2 0.999 --eps 1e-08 --wd 0.2 --warmup 10000 --opt adamw --lr-scheduler cosine
    --lr-cooldown-end 0.0 --lr-cooldown-power 1.0 --save-frequency 1 --zeroshot-frequency 2
    --val-frequency 1 --precision amp --model RN50 --pretrained '' --lock-image-unlocked-groups 0
    --accum-freq 1 --seed 0 --lock-text-unlocked-layers 0 --log-every-n-steps 100
    "$@"
)
if [[ -n ${DRY_RUN:-} ]]; then
    printf '%q ' "${command[@]}"
    echo
    exit 0
fi
exec "${command[@]}"
