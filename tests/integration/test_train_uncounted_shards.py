"""Shards written by webdataset's own ShardWriter (img2dataset's layout: no sizes.json) train every sample
exactly once per epoch: from a local folder (counted from the tar headers) on 1 and 2 processes, and over
HTTP from a server on 127.0.0.1 once `acc-clip shards index` counted them. Never indexed, open_clip_train's
command (`--train-num-samples`) runs as open_clip_train reads such a set, and says what exactly-once needs.
Which samples each step trained on comes from --log-samples (samples.jsonl)."""

from __future__ import annotations

import csv
import functools
import http.server
import sys
import threading
from collections import defaultdict
from pathlib import Path

import pytest
import webdataset as wds

from acc_clip import cli
from helpers import read_samples, run_trainer, tiny_train_args, without_csv_separator

# torch's launcher, as tests/integration/test_train_shards_2proc.py starts two processes on gloo
TWO_PROCESSES = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
TWO_PROCESSES += ["--no-python", "--", sys.executable]
SHARDS, PER_SHARD = 4, 40
SAMPLES = SHARDS * PER_SHARD  # 160 of the demo CSV's 320 rows
BATCH = 8
EPOCHS = 2


@pytest.fixture(scope="module")
def writer_shards(train_csv, tmp_path_factory) -> Path:
    """The demo CSV's first 160 rows as 4 ShardWriter shards of 40, keys the row numbers."""
    folder = tmp_path_factory.mktemp("writer_shards")
    with open(train_csv, newline="") as file:
        rows = list(csv.DictReader(file))[:SAMPLES]
    with wds.ShardWriter(str(folder / "%05d.tar"), maxcount=PER_SHARD, verbose=0) as sink:
        for number, row in enumerate(rows):
            image = Path(row["filepath"]).read_bytes()
            sink.write({"__key__": f"{number:09d}", "jpg": image, "txt": row["title"].encode()})
    assert sorted(p.name for p in folder.iterdir()) == [f"{i:05d}.tar" for i in range(SHARDS)]
    return folder


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> dict[str, str]:
    """A count cache of the test's own, for this process and the trainers it starts."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return {"XDG_CACHE_HOME": str(tmp_path / "cache")}


@pytest.fixture
def http_url(writer_shards):
    """The shard folder served by a thread on 127.0.0.1; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=str(writer_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # noqa: A002 - the base class's signature
        pass


def train(data: str, logs: Path, env: dict[str, str], *extra: str, processes: int = 1):
    args = tiny_train_args(
        Path("DATA"), logs, "run", "--batch-size", str(BATCH), "--epochs", str(EPOCHS), "--log-samples", *extra
    )
    args[args.index("DATA")] = data  # a URL: a Path would make 'http://' 'http:/'
    launcher = TWO_PROCESSES if processes == 2 else None
    return run_trainer(without_csv_separator(args), launcher=launcher, env=env)


def samples_by_epoch(run_dir: Path) -> dict[int, list[int]]:
    seen: dict[int, list[int]] = defaultdict(list)
    for record in read_samples(run_dir):
        assert len(record["indices"]) == BATCH
        seen[record["epoch"]] += record["indices"]
    return seen


def assert_every_sample_once_per_epoch(run_dir: Path, processes: int) -> None:
    seen = samples_by_epoch(run_dir)
    assert sorted(seen) == list(range(EPOCHS))
    for epoch in range(EPOCHS):
        assert sorted(seen[epoch]) == list(range(SAMPLES)), f"epoch {epoch}"
    ranks = {record["rank"] for record in read_samples(run_dir)}
    assert ranks == set(range(processes))


@pytest.mark.parametrize("processes", [1, 2])
def test_a_shard_writer_folder_trains_every_sample_once_per_epoch(writer_shards, own_cache, tmp_path, processes):
    result = train(str(writer_shards), tmp_path / "logs", own_cache, "--workers", "2", processes=processes)
    assert_every_sample_once_per_epoch(tmp_path / "logs" / "run", processes)
    assert "no sample counts" not in result.stdout + result.stderr
    assert not (writer_shards / "sizes.json").exists()  # counted from the headers, into the cache only
    assert list((tmp_path / "cache" / "acc_clip" / "shard_counts").iterdir())


def test_http_shards_train_exactly_once_after_shards_index(writer_shards, own_cache, http_url, tmp_path, capsys):
    urls = f"{http_url}/{{00000..00003}}.tar"
    assert cli.main(["shards", "index", urls, "--out", str(tmp_path / "sizes.json"), "--workers", "1"]) == 0
    assert f"{SAMPLES} samples in {SHARDS} shards" in capsys.readouterr().out
    assert (tmp_path / "sizes.json").read_text().count(f": {PER_SHARD}") == SHARDS
    result = train(urls, tmp_path / "logs", own_cache, "--workers", "1", processes=2)
    assert "no sample counts" not in result.stdout + result.stderr
    assert_every_sample_once_per_epoch(tmp_path / "logs" / "run", 2)


def test_open_clip_command_on_an_uncounted_pipe_set_runs_and_warns(writer_shards, own_cache, tmp_path):
    """open_clip_train's command for shards without counts: --train-num-samples, here over `pipe:cat`."""
    urls = f"pipe:cat {writer_shards}/{{00000..00003}}.tar"
    result = train(urls, tmp_path / "logs", own_cache, "--workers", "2", "--train-num-samples", "96")
    output = result.stdout + result.stderr
    assert "no sample counts for these 4 shards" in output
    assert "acc-clip shards index SHARDS" in output
    seen = samples_by_epoch(tmp_path / "logs" / "run")
    assert [len(seen[epoch]) for epoch in range(EPOCHS)] == [96, 96]  # --train-num-samples per epoch
    assert set(seen[0] + seen[1]) <= set(range(SAMPLES))
