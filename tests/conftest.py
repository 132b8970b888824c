"""Shared fixtures only: a tiny COCO-shaped dataset and its CSVs, one CPU thread for a module's trainers,
an Accelerator, the trainer in the test process, a tiny teacher. Plain helpers (model configs, the
trainer as a subprocess, readers of what a run wrote, ...) are in helpers.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers import SMALL_CSV_ROWS, TINY_VIT, coco_csv, make_flat_colour_csv, write_image, write_model_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory) -> Path:
    from acc_clip.prep.demo_data import make_demo_data

    root = tmp_path_factory.mktemp("demo")
    make_demo_data(root / "coco", num_train=64, num_val=21, size=(160, 120), seed=0, zeroshot_per_class=3)
    return root / "coco"


@pytest.fixture(scope="session")
def train_csv(demo_dataset) -> Path:
    """64 images x 5 captions = 320 rows."""
    return coco_csv(demo_dataset, "train")


@pytest.fixture(scope="session")
def val_csv(demo_dataset) -> Path:
    """21 images x 5 captions = 105 rows."""
    return coco_csv(demo_dataset, "val")


@pytest.fixture(scope="session")
def flat_csv(tmp_path_factory) -> Path:
    """64 flat-colour images x 5 captions = 320 rows, the shape of `train_csv`."""
    return make_flat_colour_csv(tmp_path_factory.mktemp("flat"))


@pytest.fixture(scope="session")
def small_csv(train_csv, tmp_path_factory) -> Path:
    """The first 160 rows of `train_csv`: 10 steps per epoch at batch 16, for the many-run resume tests."""
    lines = train_csv.read_text().splitlines(keepends=True)
    out = tmp_path_factory.mktemp("csv") / "train160.csv"
    out.write_text("".join(lines[: SMALL_CSV_ROWS + 1]))
    return out


@pytest.fixture(scope="module")
def one_cpu_thread():
    """OMP_NUM_THREADS=1 for the trainers a module starts: one thread per process gives the same
    reduction order, so the same losses to the last bit, in every run (and is kind to a shared CPU).
    Use it with `pytestmark = pytest.mark.usefixtures("one_cpu_thread")`."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def accelerator():
    """A CPU Accelerator for in-process tests; its global state is reset so other modules may use others."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def in_process(monkeypatch):
    """For tests that run the trainer inside the test process: train() sets up what a process sets up
    once (the root logger's handlers, SIGTERM/SIGINT handlers, torch's thread count, Accelerate's
    global state); they are put back afterwards. One compute thread: the tiny model's ops are too
    small to share, and two spinning OpenMP threads on a loaded 2-core machine made a run 9x slower."""
    import logging
    import signal

    import torch
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # with it set, train() leaves the thread count alone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    signals = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    for signum, handler in signals.items():
        signal.signal(signum, handler)
    for handler in set(root.handlers) - set(handlers):
        handler.close()  # the run's out.log
    root.handlers[:], root.level = handlers, level
    torch.set_num_threads(threads)


@pytest.fixture
def train_in_process(in_process, capsys):
    """`acc-clip train ARGS` in this process, for runs that end in a one-line error before training
    (a process start costs seconds; the code path from the command line to the error is the same).
    Returns (exit status, the stderr lines that start with 'error:')."""
    from acc_clip.cli import main

    def run(args: list[str]) -> tuple[int, list[str]]:
        status = main(["train", *args])
        return status, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]

    return run


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> str:
    """A TINY_VIT teacher with weights (seed 1) in a local-dir: folder."""
    from acc_clip.checkpoint.export import write_seeded_local_dir

    return write_seeded_local_dir(TINY_VIT, str(tmp_path_factory.mktemp("teacher") / "tiny-vit-teacher"), seed=1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(name, model in eval mode, preprocess, tokenizer) of TINY_MODEL_CFG with weights drawn from seed 0."""
    import open_clip
    import torch

    name = write_model_dir(tmp_path_factory.mktemp("model"))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None, output_dict=True)
    return name, model.eval(), preprocess, open_clip.get_tokenizer(name)


@pytest.fixture(scope="module")
def odd_val_csv(tmp_path_factory):
    """11 rows (odd): 8 distinct images, two of them with two captions, and a row whose image is missing."""
    root = tmp_path_factory.mktemp("val")
    images = [write_image(root / f"img{i}.png", seed=i) for i in range(8)]
    rows = [(images[i], f"a photo of thing number {i}") for i in range(8)]
    rows += [(images[2], "another caption of two"), (images[5], "five again")]
    # row 3: with 2 processes, rank 1 reads rows 1, 3, 5, 7, 9 and has 4 good rows to rank 0's 6
    rows.insert(3, (str(root / "missing.png"), "this image does not exist"))
    path = root / "val.csv"
    path.write_text("filepath\ttitle\n" + "".join(f"{f}\t{c}\n" for f, c in rows))
    return str(path)


# The longest modules first: `make test` gives whole files to its two workers (--dist loadfile) in collection
# order, and a long module collected last ran alone for minutes at the end of the suite.
LONGEST_FIRST = (
    "test_fsdp.py",
    "test_parity_objectives.py",
    "test_distributed.py",
    "test_bench_train.py",
    "test_objectives.py",
    "test_resume_matrix.py",
    "test_resume_checks.py",
    "test_resume.py",
    "test_parity.py",
    "test_train_shards.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: place for place, name in enumerate(LONGEST_FIRST)}
    items[:] = [
        item for _, item in sorted(enumerate(items), key=lambda pair: (rank.get(pair[1].path.name, len(rank)), pair[0]))
    ]
