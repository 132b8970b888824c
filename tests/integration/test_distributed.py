"""Several processes on the CPU (gloo), launched as a user would with `accelerate launch
--config_file launch/cpu_2proc.yaml`: two processes with batch b give the same losses and weights
as one process with batch 2b on the same samples (features gathered with gradient, with and
without --local-loss), and with --accum-freq 2 the same as one process with batch 4b, gradients
being all-reduced once per update; ranks that hold unequal batches (a corrupt sample) even them out
without dropping good samples and go on; impossible requests fail with a clear error instead of hanging.

TINY_VIT throughout: batch norm would make per-rank statistics differ from whole-batch ones.
"""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest
import torch
from accelerate.state import AcceleratorState
from safetensors.torch import load_file

from acc_clip.data.csv import epoch_permutation
from background_trainer import ACCELERATE, two_processes
from dist_worker import (
    SCENARIOS,
    STEPS,
    TEACHER,
    accelerator_for_cpu,
    optimizers_for,
    reference_of,
    run_steps,
    tiny_config,
    without_key_bias,
)
from helpers import PLAIN_SGD, REPO, TINY_VIT, max_difference, read_metrics, run_trainer, tiny_train_args

# Measured on this CPU, 3 steps of TINY_VIT: losses within 2.4e-7; after plain SGD (lr 1, gradients ~1)
# every weight within 1.3e-6, so 1e-5 fails a gradient off by any factor. AdamW divides each gradient
# by its running RMS, so where a gradient is near zero, fp32 summation-order noise turns into an update
# of up to lr (1e-3) per step: measured 3.3e-5 once the key biases (zero gradient) are left out.
TOLERANCE = 1e-5
ADAMW_TOLERANCE = 1e-4
# CoCa's losses reach ~30 under SGD at lr 1 (the caption loss over a 49,408-token vocabulary): measured
# within 3.5e-7 relative, 1.1e-5 absolute. A caption loss weighed per process instead of per token is
# off by ~1e-3 relative.
LOSS_RELATIVE_TOLERANCE = 1e-6
VENDOR_COMMAND = (  # run_demo.py's default command line
    "--train-data COCO/train_data.csv --dataset-type auto --csv-separator , --csv-img-key filepath --csv-caption-key "
    "title --logs ./logs/ --workers 4 --batch-size 64 --epochs 32 --lr 0.0005 --beta1 0.9 --beta2 0.999 --eps 1e-08 "
    "--wd 0.2 --warmup 10000 --opt adamw --lr-scheduler cosine --lr-cooldown-end 0.0 --lr-cooldown-power 1.0 "
    "--save-frequency 1 --zeroshot-frequency 2 --val-frequency 1 --precision amp --model RN50 --pretrained '' "
    "--lock-image-unlocked-groups 0 --accum-freq 1 --seed 0 --lock-text-unlocked-layers 0 --log-every-n-steps 100"
)
LAUNCH_CONFIGS = {
    "single_card": ("NO", 1),
    "multi_gpu": ("MULTI_GPU", 8),
    "multi_node": ("MULTI_GPU", 16),
    "sdaa_single": ("NO", 1),
    "sdaa_multi": ("MULTI_SDAA", 4),
    "cpu_2proc": ("MULTI_GPU", 2),
    "fsdp": ("FSDP", 8),
    "cpu_2proc_fsdp": ("FSDP", 2),
}

pytestmark = pytest.mark.usefixtures("one_cpu_thread")  # two processes on a small shared CPU


@pytest.fixture(scope="module")
def worker_results(train_csv, tiny_teacher, tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        two_processes() + [str(REPO / "tests" / "dist_worker.py"), str(out), str(train_csv), tiny_teacher],
        timeout=600,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def references(train_csv, tiny_teacher):
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = accelerator_for_cpu()
    needed = {(reference_of(name), optimizer_name) for name in SCENARIOS for optimizer_name in optimizers_for(name)}
    results = {}
    for (batch, flags), optimizer_name in sorted(needed):
        flags_here = [tiny_teacher if flag == TEACHER else flag for flag in flags]
        config = tiny_config(train_csv, "--batch-size", str(batch), *flags_here)
        results[(batch, flags), optimizer_name] = run_steps(config, accelerator, STEPS, optimizer_name=optimizer_name)
    AcceleratorState._reset_state(reset_partial_state=True)
    return results


@pytest.mark.parametrize(
    "scenario, optimizer_name",
    [(name, optimizer_name) for name in SCENARIOS for optimizer_name in optimizers_for(name)],
)
def test_two_processes_match_one_process(worker_results, references, scenario, optimizer_name):
    saved = torch.load(worker_results / f"{scenario}-{optimizer_name}.pt")
    losses, weights, _ = references[reference_of(scenario), optimizer_name]
    assert saved["losses"] == pytest.approx(losses, rel=LOSS_RELATIVE_TOLERANCE, abs=TOLERANCE)
    if optimizer_name == "sgd":  # the update is the gradient: every weight, key biases included
        assert max_difference(saved["weights"], weights) <= TOLERANCE
    else:
        assert max_difference(without_key_bias(saved["weights"]), without_key_bias(weights)) <= ADAMW_TOLERANCE


def test_accumulation_all_reduces_once_per_update(worker_results):
    """The DDP communication hook runs once per gradient bucket per all-reduce. Two micro-batches
    per step must cost what one does; syncing every micro-batch would double it."""
    plain = torch.load(worker_results / "gather-adamw.pt")["all_reduces"]
    accumulated = torch.load(worker_results / "gather_accum2-adamw.pt")["all_reduces"]
    assert len(plain) == STEPS and all(calls > 0 for calls in plain)
    assert accumulated == plain


def test_ranks_with_unequal_batches_agree_and_train(worker_results):
    """Rank 1 lost one sample of each step's 8: in step 0 both trained 7 and rank 0 carried its eighth; in step 1
    rank 0 trained that one and 7 of its own and handed rank 1 its last: 30 samples, each once, none cut."""
    saved = torch.load(worker_results / "uneven.pt")
    rank_0, rank_1 = saved["trained"]
    assert [len(step) for step in rank_0] == [len(step) for step in rank_1] == [7, 8]
    every = [i for rank in (rank_0, rank_1) for step in rank for i in step]
    assert len(every) == len(set(every)) == 2 * 2 * 8 - 2
    assert all(torch.isfinite(torch.tensor(saved["losses"])))


def test_trainer_two_processes_accumulating_local_loss_match_one_process(train_csv, tmp_path):
    """The real trainer: 2 processes x batch 8 x --accum-freq 2 with --gather-with-grad --local-loss
    against 1 process x batch 32, 3 steps of plain SGD (PLAIN_SGD): metrics.jsonl losses and the saved weights."""
    common = ["--model", TINY_VIT, "--max-steps", "3", "--save-every-n-steps", "3", "--gather-with-grad", *PLAIN_SGD]
    # The one-process run goes through launch/run_demo.sh (single_card.yaml): the flags here override its defaults.
    demo = subprocess.run(
        [
            str(REPO / "launch" / "run_demo.sh"),
            str(train_csv),
            *tiny_train_args(train_csv, tmp_path, "one", *common, "--batch-size", "32"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env={**os.environ, "ACCELERATE": ACCELERATE},
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    run_trainer(
        tiny_train_args(train_csv, tmp_path, "two", *common, "--batch-size", "8", "--accum-freq", "2", "--local-loss"),
        launcher=two_processes(),
    )
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], abs=TOLERANCE)
    assert [r["samples_seen"] for r in two] == [r["samples_seen"] for r in one] == [32, 64, 96]
    weights = [
        load_file(tmp_path / run / "checkpoints" / "step_00000003" / "model.safetensors") for run in ("one", "two")
    ]
    assert max_difference(*weights) <= TOLERANCE
    log = (tmp_path / "two" / "out.log").read_text()
    assert "2 process(es)" in log and "backend gloo" in log


def test_trainer_carries_samples_when_a_rank_skips_a_corrupt_image(train_csv, tmp_path):
    """32 rows, 2 processes x 8: two steps. The row rank 1 reads first points at a corrupt JPEG: 31 good samples
    cannot make equal batches, so rank 0 carries one into step 1 and one is left over at the epoch's end, named."""
    rows = train_csv.read_text().splitlines()
    header, body = rows[0], rows[1:33]
    first_of_rank_1 = int(epoch_permutation(len(body), 0, 0)[8])
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a jpeg")
    body[first_of_rank_1] = f"{corrupt},{body[first_of_rank_1].split(',', 1)[1]}"
    csv = tmp_path / "train.csv"
    csv.write_text("\n".join([header, *body]) + "\n")
    run_trainer(
        tiny_train_args(
            csv, tmp_path, "cut", "--model", TINY_VIT, "--batch-size", "8", "--epochs", "1", "--gather-with-grad"
        ),
        launcher=two_processes(),
    )
    assert len(read_metrics(tmp_path / "cut")) == 2
    log = (tmp_path / "cut" / "out.log").read_text()
    carried = "over all processes 2 carried into a later step to keep the processes' batches equal, 1 left untrained"
    assert f"epoch 0 done: 2 steps, 0 samples skipped so far as missing or corrupt on this process; {carried}" in log
    assert "epoch 0: 1 good sample(s) left untrained (indices [" in log


def test_more_processes_than_samples_fails_clearly_without_hanging(train_csv, tmp_path):
    rows = train_csv.read_text().splitlines()
    csv = tmp_path / "one_row.csv"
    csv.write_text("\n".join(rows[:2]) + "\n")
    result = run_trainer(
        tiny_train_args(csv, tmp_path, "tiny", "--model", TINY_VIT, "--batch-size", "1"),
        launcher=two_processes(),
        timeout=120,
        check=False,
    )
    assert result.returncode != 0
    assert "error: 1 samples cannot fill one global batch of 2 (1 per process x 2 processes)" in result.stderr


def test_launch_configs_load_in_accelerate():
    from accelerate.commands.config.config_args import load_config_from_file

    assert {path.stem for path in (REPO / "launch").glob("*.yaml")} == set(LAUNCH_CONFIGS)
    for name, (distributed_type, processes) in LAUNCH_CONFIGS.items():
        config = load_config_from_file(str(REPO / "launch" / f"{name}.yaml"))
        assert (config.distributed_type.value, config.num_processes) == (distributed_type, processes), name
    assert load_config_from_file(str(REPO / "launch" / "multi_node.yaml")).num_machines == 2


def test_run_demo_is_the_vendor_command_under_single_card(monkeypatch):
    monkeypatch.setenv("DRY_RUN", "1")
    monkeypatch.delenv("TRAIN_DATA", raising=False)
    printed = subprocess.run(
        [str(REPO / "launch" / "run_demo.sh")], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    words = shlex.split(printed)
    assert words[1:4] == ["launch", "--config_file", str(REPO / "launch" / "single_card.yaml")]
    assert words[4:6] == ["-m", "acc_clip.train"]
    assert words[6:] == shlex.split(VENDOR_COMMAND)
    monkeypatch.setenv("TRAIN_DATA", "/data/coco.csv")
    from_env = shlex.split(
        subprocess.run(
            [str(REPO / "launch" / "run_demo.sh"), "--epochs", "1"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    )
    assert from_env[from_env.index("--train-data") + 1] == "/data/coco.csv" and from_env[-2:] == ["--epochs", "1"]
