"""srun's task variables as the ones Accelerate reads (acc_clip/runtime/slurm.py): placed for srun
with several tasks, left alone under a launcher, with one task or in the batch script itself; host
lists; one-line errors naming the variable at fault."""

from __future__ import annotations

import pytest

from acc_clip.errors import AccClipError
from acc_clip.runtime.slurm import (
    DEFAULT_MASTER_PORT,
    batch_script_warning,
    first_host,
    place_from_slurm,
    slurm_placement,
)


def srun_task(rank: int, local_rank: int, tasks: int = 2, **extra: str) -> dict[str, str]:
    """What srun sets for one of `tasks` tasks (the ones that matter here), on nodes gpu[07-08]."""
    return {
        "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(local_rank),
        "SLURM_NTASKS": str(tasks),
        "SLURM_STEP_NUM_TASKS": str(tasks),
        "SLURM_JOB_NODELIST": "gpu[07-08]",
        "SLURM_JOB_ID": "123",
        **extra,
    }


def test_srun_with_two_tasks_sets_what_accelerate_reads():
    environ = srun_task(1, 1)
    placement = place_from_slurm(environ)
    assert (placement.rank, placement.local_rank, placement.world_size) == (1, 1, 2)
    assert {k: environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "1",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(DEFAULT_MASTER_PORT),
    }
    assert placement.describe() == (
        f"placed by SLURM (srun): rank 1 of 2, local rank 1, process group at gpu07:{DEFAULT_MASTER_PORT}"
    )


def test_two_nodes_give_global_and_local_ranks_apart():
    environ = srun_task(5, 1, tasks=8, SLURM_STEP_NODELIST="gpu[08-09]")
    place_from_slurm(environ)
    # The step's first node, not the job's: srun -N may start a step on later nodes of the job.
    assert (environ["RANK"], environ["LOCAL_RANK"], environ["WORLD_SIZE"], environ["MASTER_ADDR"]) == (
        "5",
        "1",
        "8",
        "gpu08",
    )


def test_master_address_and_port_already_set_are_kept():
    environ = srun_task(0, 0, MASTER_ADDR="10.0.0.5", MASTER_PORT="31234")
    place_from_slurm(environ)
    assert (environ["MASTER_ADDR"], environ["MASTER_PORT"]) == ("10.0.0.5", "31234")


@pytest.mark.parametrize("launcher", [{"RANK": "0", "WORLD_SIZE": "8", "LOCAL_RANK": "0"}, {"LOCAL_RANK": "3"}])
def test_a_launcher_inside_an_allocation_is_left_alone(launcher):
    """accelerate launch (or torchrun) run by srun once per node: it placed its processes itself."""
    environ = {**srun_task(1, 0), **launcher}
    before = dict(environ)
    assert place_from_slurm(environ) is None and environ == before
    assert batch_script_warning(environ) is None


def test_one_task_is_left_alone():
    environ = srun_task(0, 0, tasks=1)
    before = dict(environ)
    assert place_from_slurm(environ) is None and environ == before
    assert batch_script_warning(environ) is None


def test_no_slurm_is_left_alone():
    assert place_from_slurm({}) is None and batch_script_warning({}) is None


def test_the_batch_script_itself_is_left_alone_with_a_warning():
    """sbatch runs its script with SLURM_PROCID=0 and the allocation's SLURM_NTASKS but no step variables:
    placing it would wait forever for 3 tasks that never start."""
    environ = {"SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "gpu07"}
    before = dict(environ)
    assert place_from_slurm(environ) is None and environ == before
    warning = batch_script_warning(environ)
    assert "SLURM_NTASKS=4" in warning and "training as one process" in warning


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("localhost", "localhost"),
        ("node01", "node01"),
        ("node[01-03]", "node01"),
        ("node[07,09-12]", "node07"),
        ("node[003-010],other[1-2]", "node003"),
        ("alpha,beta", "alpha"),
        ("rack[2-3]-gpu[01-04]", "rack2-gpu01"),
        ("n-1.cluster", "n-1.cluster"),
    ],
)
def test_first_host_of_a_slurm_host_list(nodelist, host):
    assert first_host(nodelist, "SLURM_JOB_NODELIST") == host


@pytest.mark.parametrize("nodelist", ["node[01-03", "node[a-c]", ",node1", "node]1", "[]"])
def test_a_host_list_that_cannot_be_read_names_its_variable(nodelist):
    with pytest.raises(AccClipError, match=r"^SLURM_JOB_NODELIST=.* is not a SLURM host list; set MASTER_ADDR"):
        slurm_placement(srun_task(0, 0, SLURM_JOB_NODELIST=nodelist))


@pytest.mark.parametrize(
    "change, variable",
    [
        ({"SLURM_NTASKS": "two", "SLURM_STEP_NUM_TASKS": "two"}, "SLURM_NTASKS"),
        ({"SLURM_NTASKS": "0"}, "SLURM_NTASKS"),
        ({"SLURM_PROCID": "2"}, "SLURM_PROCID"),
        ({"SLURM_PROCID": "-1"}, "SLURM_PROCID"),
        ({"SLURM_PROCID": "x"}, "SLURM_PROCID"),
        ({"SLURM_LOCALID": "1", "SLURM_PROCID": "0"}, "SLURM_LOCALID"),
        ({"SLURM_LOCALID": ""}, "SLURM_LOCALID"),
        ({"SLURM_STEP_NUM_TASKS": "4"}, "SLURM_STEP_NUM_TASKS"),
        ({"MASTER_PORT": "70000"}, "MASTER_PORT"),
        ({"MASTER_PORT": "port"}, "MASTER_PORT"),
    ],
)
def test_bad_or_inconsistent_variables_give_one_line_naming_them(change, variable):
    with pytest.raises(AccClipError) as raised:
        place_from_slurm({**srun_task(1, 1), **change})
    message = str(raised.value)
    assert variable in message and "\n" not in message, message


def test_a_missing_local_id_or_host_is_named():
    environ = srun_task(1, 1)
    del environ["SLURM_LOCALID"]
    with pytest.raises(AccClipError, match=r"^SLURM_LOCALID is not set"):
        slurm_placement(environ)
    environ = srun_task(1, 1)
    del environ["SLURM_JOB_NODELIST"]
    with pytest.raises(AccClipError, match="MASTER_ADDR, SLURM_STEP_NODELIST, SLURM_JOB_NODELIST, SLURM_NODELIST"):
        slurm_placement(environ)
