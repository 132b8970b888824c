"""SLURM as a user meets it, without SLURM: two `python -m acc_clip.train` processes given the
variables srun gives two tasks train exactly like one process with twice the batch; the sbatch
template parses and, dry, prints one `accelerate launch` per node with that node's machine rank."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from acc_clip.errors import ResourceError
from background_trainer import free_port
from helpers import PLAIN_SGD, REPO, TINY_VIT, max_difference, read_metrics, tiny_train_args

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
TOLERANCE = 1e-5  # test_distributed.py's: with plain SGD, losses and weights agree to ~1e-6
PLACEMENT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def without_launcher_or_slurm() -> dict[str, str]:
    """This process's environment less anything a launcher or SLURM set (a test run inside a job)."""
    return {k: v for k, v in os.environ.items() if k not in PLACEMENT and not k.startswith("SLURM_")}


def srun_tasks(args: list[str], tasks: int, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`srun --ntasks TASKS python -m acc_clip.train ARGS` on one node, as far as the processes can tell."""
    port = str(free_port())  # the default 29500 may be held by another test run on this machine
    processes = []
    for rank in range(tasks):
        env = {
            **without_launcher_or_slurm(),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "SLURM_JOB_ID": "1",
            "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank),
            "SLURM_NTASKS": str(tasks),
            "SLURM_STEP_NUM_TASKS": str(tasks),
            "SLURM_JOB_NODELIST": "localhost",
            "MASTER_PORT": port,
        }
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "acc_clip.train", *args],
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=timeout)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def test_two_srun_tasks_train_like_one_process_with_twice_the_batch(train_csv, tmp_path):
    common = ["--model", TINY_VIT, "--max-steps", "3", "--save-every-n-steps", "3", "--gather-with-grad", *PLAIN_SGD]
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "acc_clip.train",
            *tiny_train_args(train_csv, tmp_path, "one", *common, "--batch-size", "16"),
        ],
        cwd=REPO,
        env={**without_launcher_or_slurm(), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    tasks = srun_tasks(tiny_train_args(train_csv, tmp_path, "two", *common, "--batch-size", "8"), 2)
    for rank, task in enumerate(tasks):
        assert task.returncode == 0, f"task {rank}:\n{task.stderr[-3000:]}"
    one_rows, two_rows = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["samples_seen"] for r in two_rows] == [r["samples_seen"] for r in one_rows] == [16, 32, 48]
    assert [r["loss"] for r in two_rows] == pytest.approx([r["loss"] for r in one_rows], abs=TOLERANCE)
    weights = [
        load_file(tmp_path / run / "checkpoints" / "step_00000003" / "model.safetensors") for run in ("one", "two")
    ]
    assert max_difference(*weights) <= TOLERANCE
    log = (tmp_path / "two" / "out.log").read_text()
    assert "2 process(es)" in log and "backend gloo" in log
    assert "placed by SLURM (srun): rank 0 of 2, local rank 0, process group at localhost:" in log


def sbatch(args: list[str], tmp_path, **env: str) -> subprocess.CompletedProcess:
    """launch/slurm/train.sbatch ARGS as the batch script of a 3-node job with 4 GPUs a node."""
    environ = {
        **without_launcher_or_slurm(),
        "PYTHONPATH": str(REPO),
        "SLURM_JOB_NODELIST": "gpu[07-09]",
        "SLURM_JOB_NUM_NODES": "3",
        "SLURM_GPUS_ON_NODE": "4",
        "SLURM_SUBMIT_DIR": str(REPO),
        "PATH": f"{tmp_path}:{os.environ['PATH']}",
        **env,
    }
    return subprocess.run([str(SBATCH), *args], capture_output=True, text=True, timeout=60, cwd=tmp_path, env=environ)


def test_sbatch_template_is_valid_bash():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True, timeout=30)


def node_lines(stdout: str) -> list[list[str]]:
    """The dry run's commands, one per node (its other lines are comments)."""
    return [shlex.split(line) for line in stdout.splitlines() if not line.startswith("#")]


def test_sbatch_dry_run_prints_one_acc_clip_launch_per_node(tmp_path):
    from accelerate.commands.launch import launch_command_parser

    train = ["--train-data", "/shared/my data.csv", "--batch-size", "64", "--gather-with-grad"]
    result = sbatch(train, tmp_path, DRY_RUN="1", SLURM_JOB_ID="4242", SLURM_JOB_NAME="coco")
    assert result.returncode == 0, result.stderr
    lines = node_lines(result.stdout)
    assert len(lines) == 3
    for node, words in enumerate(lines):
        assert words[:2] == ["acc-clip", "launch"]  # keeps the trainers' exit 75, which accelerate launch makes 1
        launch = launch_command_parser().parse_args(words[2:])  # accelerate launch accepts every option
        assert (launch.machine_rank, launch.num_machines, launch.num_processes) == (node, 3, 12)
        assert (launch.main_process_ip, launch.main_process_port) == ("gpu07", 29500)
        assert launch.config_file == str(REPO / "launch" / "multi_node.yaml")
        assert launch.module and launch.training_script == "acc_clip.train"
        # a requeued job resumes in the same run folder: named after the job, whose id a requeue keeps
        assert launch.training_script_args == [*train, "--resume", "latest", "--name", "coco-4242"]
    comments = [line for line in result.stdout.splitlines() if line.startswith("#")]
    assert comments[0].startswith("# sbatch asks for --signal=USR1@120")
    assert comments[1].startswith("# on exit 75: scontrol requeue 4242")


def test_sbatch_keeps_a_given_name_and_resume(tmp_path):
    train = ["--name", "mine", "--resume", "/ckpt/step_00000010"]
    words = node_lines(sbatch(train, tmp_path, DRY_RUN="1").stdout)[0]
    assert words[words.index("acc_clip.train") + 1 :] == train


def test_sbatch_keeps_master_address_and_port_and_needs_the_gpu_count(tmp_path):
    words = node_lines(
        sbatch([], tmp_path, DRY_RUN="1", MASTER_ADDR="10.1.2.3", MASTER_PORT="31000", GPUS_PER_NODE="2").stdout
    )[0]
    assert words[words.index("--main_process_ip") + 1 : words.index("--main_process_port") + 2] == [
        "10.1.2.3",
        "--main_process_port",
        "31000",
    ]
    assert words[words.index("--num_processes") + 1] == "6"
    result = sbatch([], tmp_path, DRY_RUN="1", SLURM_GPUS_ON_NODE="")
    assert result.returncode == 2 and result.stderr.strip().startswith("error: GPUS_PER_NODE=''")


def stand_ins(tmp_path, srun_status: int = 0) -> None:
    """SLURM's commands, which cannot exist here: an srun that runs its command once per node with that node's
    SLURM_NODEID and then exits `srun_status`, an scontrol that records its arguments, and an acc-clip that
    prints its own."""
    (tmp_path / "srun").write_text(
        "#!/usr/bin/env bash\nwhile [[ $1 == --* ]]; do shift; done\n"
        f'for node in 0 1 2; do SLURM_NODEID=$node "$@" || exit; done\nexit {srun_status}\n'
    )
    (tmp_path / "scontrol").write_text(  # `scontrol show hostnames` fails: the script reads the host list itself
        f'#!/usr/bin/env bash\n[[ $1 == requeue ]] || exit 1\necho "$@" >> {tmp_path / "scontrol.calls"}\n'
    )
    (tmp_path / "acc-clip").write_text('#!/usr/bin/env bash\nprintf "%q " "$(basename "$0")" "$@"\necho\n')
    for stand_in in ("srun", "scontrol", "acc-clip"):
        (tmp_path / stand_in).chmod(0o755)


def test_sbatch_runs_on_each_node_what_the_dry_run_prints(tmp_path):
    stand_ins(tmp_path)
    train = ["--train-data", "a b.csv", "--name", "$HOME"]  # words that must reach the trainer unchanged
    ran = sbatch(train, tmp_path, ACC_CLIP=str(tmp_path / "acc-clip"))
    printed = sbatch(train, tmp_path, ACC_CLIP=str(tmp_path / "acc-clip"), DRY_RUN="1")
    assert ran.returncode == 0 and printed.returncode == 0, ran.stderr + printed.stderr
    assert [words[1:] for words in node_lines(ran.stdout)] == [words[1:] for words in node_lines(printed.stdout)]
    assert [words[3] for words in node_lines(ran.stdout)] == ["0", "1", "2"]
    assert not (tmp_path / "scontrol.calls").exists()


@pytest.mark.parametrize("status, requeued", [(75, True), (1, False), (0, False), (137, False)])
def test_sbatch_requeues_the_job_on_exit_75_only(tmp_path, status, requeued):
    """75: the trainers stopped on a signal after saving (SLURM's USR1 before the time limit); a failure,
    a kill or the end of training must not come back."""
    stand_ins(tmp_path, srun_status=status)
    result = sbatch([], tmp_path, ACC_CLIP=str(tmp_path / "acc-clip"), SLURM_JOB_ID="4242", SLURM_RESTART_COUNT="2")
    assert result.returncode == status, result.stderr
    calls = (tmp_path / "scontrol.calls").read_text().splitlines() if requeued else []
    assert calls == (["requeue 4242"] if requeued else [])
    if requeued:
        assert "requeued job 4242 (3 of at most 100)" in result.stderr
    limited = sbatch(
        [], tmp_path, ACC_CLIP=str(tmp_path / "acc-clip"), SLURM_JOB_ID="1", MAX_REQUEUES="2", SLURM_RESTART_COUNT="2"
    )
    assert (tmp_path / "scontrol.calls").exists() == requeued  # the limit reached: no new call
    assert limited.returncode == status


def test_a_bad_slurm_variable_stops_the_trainer_in_one_line(train_csv, tmp_path, train_in_process, monkeypatch):
    for name in PLACEMENT:
        monkeypatch.delenv(name, raising=False)
    for name, value in {
        "SLURM_PROCID": "2",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "2",
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_JOB_NODELIST": "localhost",
    }.items():
        monkeypatch.setenv(name, value)
    status, errors = train_in_process(tiny_train_args(train_csv, tmp_path, "bad"))
    # the job's placement, not the command line: the machine's kind of error (acc_clip/errors.py)
    assert (status, errors) == (ResourceError.exit_status, ["error: SLURM_PROCID='2': expected an integer from 0 to 1"])
    assert not any(name in os.environ for name in PLACEMENT)  # nothing half-placed
