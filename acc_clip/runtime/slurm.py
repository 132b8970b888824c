"""`srun` with one task per device, as open_clip_train supports it: SLURM's task variables become the
ones torch's env:// rendezvous and Accelerate's PartialState read.

open_clip_train, when not under torchrun, reads SLURM_PROCID (rank), SLURM_LOCALID (local rank) and
SLURM_NTASKS (world size). Accelerate reads RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT.
`place_from_slurm` writes the second set from the first, before the Accelerator is built, and only for
a process that srun started as one of several tasks: a launcher that already set RANK, WORLD_SIZE or
LOCAL_RANK (accelerate launch, torchrun; launch/slurm/train.sbatch runs one per node) decides instead,
and a one-task job has nothing to place.

srun is told apart from the batch script by SLURM_STEP_NUM_TASKS, which srun sets for each step and
sbatch does not: the batch script itself runs with SLURM_PROCID=0 and the allocation's SLURM_NTASKS,
so a trainer started there without srun would otherwise wait forever for tasks that never start.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from acc_clip.errors import ResourceError

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # set by accelerate launch and torchrun
# The step's own nodes first: rank 0 runs on the first node of the step, which srun -N may make a
# later node of the job.
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
# torchrun's and accelerate launch's default; two jobs sharing a node need their own MASTER_PORT.
DEFAULT_MASTER_PORT = 29500
# One host of a SLURM hostlist: text, then any number of [ranges] each followed by text.
HOSTLIST_ITEM = re.compile(r"[^\[\],]*(?:\[[0-9,\-]+\][^\[\],]*)*")


@dataclass(frozen=True)
class SlurmPlacement:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int

    def variables(self) -> dict[str, str]:
        return {
            "RANK": str(self.rank),
            "LOCAL_RANK": str(self.local_rank),
            "WORLD_SIZE": str(self.world_size),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }

    def describe(self) -> str:
        return (
            f"placed by SLURM (srun): rank {self.rank} of {self.world_size}, local rank {self.local_rank}, "
            f"process group at {self.master_addr}:{self.master_port}"
        )


def read_int(environ: Mapping[str, str], name: str, *, minimum: int, below: int | None = None) -> int:
    value = environ.get(name)
    if value is None:
        raise ResourceError(f"{name} is not set, but SLURM started this process as one of several srun tasks")
    try:
        number = int(value)
    except ValueError:
        raise ResourceError(f"{name}={value!r} is not an integer") from None
    if number < minimum or (below is not None and number >= below):
        expected = f"from {minimum} to {below - 1}" if below is not None else f"of at least {minimum}"
        raise ResourceError(f"{name}={value!r}: expected an integer {expected}")
    return number


def first_host(nodelist: str, variable: str) -> str:
    """The first host of a SLURM hostlist (`node[01-03,07],gpu5` -> `node01`); digits keep their padding."""
    match = HOSTLIST_ITEM.match(nodelist)
    item = match.group(0) if match else ""
    rest = nodelist[len(item) :]
    if not item or (rest and not rest.startswith(",")):
        raise ResourceError(
            f"{variable}={nodelist!r} is not a SLURM host list; set MASTER_ADDR to the first task's host"
        )
    return re.sub(r"\[([0-9]+)[^\]]*\]", r"\1", item)


def master_address(environ: Mapping[str, str]) -> str:
    if environ.get("MASTER_ADDR"):
        return environ["MASTER_ADDR"]
    for variable in NODELIST_VARIABLES:
        if environ.get(variable):
            return first_host(environ[variable], variable)
    raise ResourceError(
        f"none of MASTER_ADDR, {', '.join(NODELIST_VARIABLES)} is set: set MASTER_ADDR to the host of SLURM task 0"
    )


def slurm_placement(environ: Mapping[str, str]) -> SlurmPlacement | None:
    """Where srun placed this process, or None when it is not one of several srun tasks or a launcher
    already placed it. Bad or inconsistent variables raise a one-line ResourceError naming them."""
    if any(name in environ for name in LAUNCHER_VARIABLES):
        return None
    if "SLURM_PROCID" not in environ or "SLURM_STEP_NUM_TASKS" not in environ:
        return None
    world_size = read_int(environ, "SLURM_NTASKS", minimum=1)
    if world_size == 1:
        return None
    step_tasks = read_int(environ, "SLURM_STEP_NUM_TASKS", minimum=1)
    if step_tasks != world_size:  # srun --preserve-env keeps the allocation's SLURM_NTASKS
        raise ResourceError(
            f"SLURM_NTASKS={world_size} but SLURM_STEP_NUM_TASKS={step_tasks}: start the trainer "
            "with srun, one task per device, without --preserve-env"
        )
    rank = read_int(environ, "SLURM_PROCID", minimum=0, below=world_size)
    # A node's local ids count its tasks in order of their global ids, so none exceeds its task's rank.
    local_rank = read_int(environ, "SLURM_LOCALID", minimum=0, below=rank + 1)
    port = (
        read_int(environ, "MASTER_PORT", minimum=1, below=65536) if environ.get("MASTER_PORT") else DEFAULT_MASTER_PORT
    )
    return SlurmPlacement(rank, local_rank, world_size, master_address(environ), port)


def batch_script_warning(environ: Mapping[str, str]) -> str | None:
    """A line to log when the trainer runs in a SLURM allocation of several tasks without srun or a
    launcher: it then trains as one process, which is rarely what the allocation was for."""
    if any(name in environ for name in LAUNCHER_VARIABLES) or "SLURM_STEP_NUM_TASKS" in environ:
        return None
    tasks = environ.get("SLURM_NTASKS", "1")
    if not tasks.isdigit() or int(tasks) < 2:
        return None
    return (
        f"SLURM_NTASKS={tasks}, but this process was not started by srun or accelerate launch: training as "
        "one process (see launch/slurm/README.md)"
    )


def place_from_slurm(environ: MutableMapping[str, str] = os.environ) -> SlurmPlacement | None:
    """Write RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT from srun's variables, so that the
    Accelerator, built next, starts the process group from env://. Returns the placement (None: left alone)."""
    placement = slurm_placement(environ)
    if placement is not None:
        environ.update(placement.variables())
    return placement
