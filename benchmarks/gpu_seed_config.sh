#!/usr/bin/env bash
# The seed configuration's training throughput on one GPU, in one command: open_clip_train against
# acc_clip on the same 640x480 demo data, RN50, amp, batch 64, 4 loader workers, 100 steps a run,
# runs alternated: open_clip from the CSV, acc_clip from the same CSV, acc_clip from --resize 256
# shards, and both acc_clip runs again with --decode-on-device (benchmarks/bench_train.py --mode
# csv,shards --variant decode_on_device=--decode-on-device). Sized to finish within 8 minutes: a round that
# would end past the budget is not started, and the results so far are kept.
#
#   bash benchmarks/gpu_seed_config.sh               # on the GPU machine
#   bash benchmarks/gpu_seed_config.sh --fast-paths  # instead: the model step (synthetic data) with
#                                                    # acc_clip's fast paths on and off, 2 rounds
#   bash benchmarks/gpu_seed_config.sh --input-paths # instead: acc_clip from shards with pinned memory
#                                                    # off and with JPEG decoding on the GPU, 2 rounds
#   bash benchmarks/gpu_seed_config.sh --dry-run [--fast-paths|--input-paths]  # anywhere: tiny model
#
# Needs torch and torchvision. Packages the machine lacks come from wheels in .whl/ (where
# the lead carries them), installed offline into /tmp/site; nothing is fetched. Everything is
# printed, MFU included (benchmarks/mfu.py); with $OUT set, the results JSON, the MFU figures and the run
# logs' tails also go there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

# Offline installs, a no-op without .whl/: one wheel at a time, and only for distributions this
# Python lacks, so a wheel built for another interpreter, or an older copy, never shadows its own.
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PYTHON" - <<'EOF'
import glob, importlib.metadata as metadata, os, subprocess, sys
for wheel in sorted(glob.glob(".whl/*.whl")):
    name = os.path.basename(wheel).split("-")[0]
    try:
        metadata.version(name)
        continue
    except metadata.PackageNotFoundError:
        pass
    result = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                             "--target", "/tmp/site", wheel], capture_output=True, text=True)
    print(f"installed {os.path.basename(wheel)}" if result.returncode == 0 else
          f"could not install {os.path.basename(wheel)}: {result.stderr.strip().splitlines()[-1:]}")
EOF
fi
export PYTHONPATH=/tmp/site:$PWD
export HF_HUB_OFFLINE=1

DRY_RUN=0 FAST_PATHS=0 INPUT_PATHS=0
for arg in "$@"; do
  case $arg in
    --dry-run) DRY_RUN=1 ;;
    --fast-paths) FAST_PATHS=1 ;;
    --input-paths) INPUT_PATHS=1 ;;
    *) echo "unknown argument $arg (expected --dry-run, --fast-paths, --input-paths)" >&2; exit 2 ;;
  esac
done
if ((DRY_RUN)); then
  SETTINGS=(--model "local-dir:configs/models/tiny-rn" --precision fp32 --batch-size 16 --workers 2
            --steps 6 --skip 2 --runs 1 --images 60 --size 320x240 --samples-per-shard 32)
  BUDGET=300
else
  SETTINGS=(--model RN50 --precision amp --batch-size 64 --workers 4 --steps 100 --skip 20 --runs 3
            --images 2000 --size 640x480 --samples-per-shard 256)
  BUDGET=${BUDGET:-450}  # seconds; of the 480 s: the rest for start-up, installs and the summary
fi
if ((FAST_PATHS)); then
  # The model step alone, so the input pipeline does not hide what a fast path does.
  BENCH=(--mode model --variant no_channels_last=--no-channels-last --variant compile=--torchcompile
         --variant grad_checkpointing=--grad-checkpointing --variant no_cudnn_benchmark=--no-cudnn-benchmark
         --runs 2)
  NAME=bench_train_fast_paths
elif ((INPUT_PATHS)); then
  # The input side's switches, on the real input path (shards); open_clip from the CSV as the baseline.
  BENCH=(--mode shards --resize 256 --variant no_pin_memory=--no-pin-memory
         --variant decode_on_device=--decode-on-device --runs 2)
  NAME=bench_train_input_paths
else
  # decode_on_device: JPEG decoding with nvjpeg in the training process (acc_clip --decode-on-device)
  BENCH=(--mode csv,shards --resize 256 --variant decode_on_device=--decode-on-device)
  NAME=bench_train_seed
fi

"$PYTHON" - <<'EOF'
import importlib, os, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      f"{' ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ''}, {os.cpu_count()} CPUs")
for module in ("torchvision", "open_clip", "open_clip_train", "accelerate", "webdataset", "pandas", "acc_clip"):
    print(f"  {module} {getattr(importlib.import_module(module), '__version__', '')}")
EOF

RESULTS=${OUT:-/tmp}/$NAME.json
LOGS=${TMPDIR:-/tmp}/${NAME}_runs
rm -rf "$LOGS"
rm -f "$RESULTS"  # the MFU step below reads this run's results, never an earlier one's
status=0
# Later flags win: BENCH's --runs overrides SETTINGS'.
"$PYTHON" -m benchmarks.bench_train "${SETTINGS[@]}" "${BENCH[@]}" \
  --data-dir "${TMPDIR:-/tmp}/bench_train_data" --out "$LOGS" --json "$RESULTS" \
  --time-budget $((BUDGET - SECONDS)) || status=$?
# MFU of each contender (benchmarks/mfu.py): its samples/s times the model's FLOPs per sample as acc_clip
# counts them, the same count for both trainers, over the GPU's dense peak for --precision; acc_clip's own
# logged figures beside. Extra lines only: a failure here is said and leaves the exit status to the runs.
if [[ -f "$RESULTS" ]]; then
  "$PYTHON" -m benchmarks.mfu --results "$RESULTS" --json "${OUT:-/tmp}/${NAME}_mfu.json" \
    || echo "mfu: not computed (the error is above)"
fi
echo "results JSON: $RESULTS"
if [[ -n "${OUT:-}" && -d "$LOGS" ]]; then
  # The last lines of every run's log, so a failure can be read without the machine.
  for log in "$LOGS"/*.stdout; do echo "== $log"; tail -n 5 "$log"; done > "$OUT/${NAME}_tails.txt"
fi
echo "total $SECONDS s"
exit $status
