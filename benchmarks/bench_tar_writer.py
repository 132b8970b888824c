#!/usr/bin/env python3
"""The shard tar writer against the standard library's tarfile, side by side in one run.

    python -m benchmarks.bench_tar_writer [--samples 3000] [--image-bytes 24000] [--rounds 7]

Writes the same members (per sample a .jpg of --image-bytes, a .txt caption and a .json record, as
`acc-clip shards` copy mode does) into a file with acc_clip/shards/tar.py and with `tarfile`
(TarInfo with the same fixed metadata, ustar format), alternating the two, and prints the median
seconds of each, samples per second and the ratio. Checks first that both write the same bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

from acc_clip.prep.shards.tar import finish_tar, write_member


def members(samples: int, image_bytes: int) -> list[tuple[str, bytes]]:
    payload = os.urandom(image_bytes)
    result = []
    for number in range(samples):
        key = f"{number:09d}"
        result += [
            (key + ".jpg", payload),
            (key + ".txt", b"a red circle on a blue square"),
            (key + ".json", b'{"height": 256, "key": "%s", "row": %d, "width": 341}' % (key.encode(), number)),
        ]
    return result


def write_acc_clip(path: str, items: list[tuple[str, bytes]]) -> None:
    with open(path, "wb") as file:
        for name, data in items:
            write_member(file, name, data)
        finish_tar(file)


def write_tarfile(path: str, items: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime, info.uid, info.gid, info.uname, info.gname = (
                len(data),
                0o644,
                0,
                0,
                0,
                "",
                "",
            )
            tar.addfile(info, io.BytesIO(data))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--image-bytes", type=int, default=24000, help="24 KB: a 256 px q90 shard image")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    items = members(args.samples, args.image_bytes)
    writers = {"acc_clip": write_acc_clip, "tarfile": write_tarfile}
    with tempfile.TemporaryDirectory() as folder:
        paths = {name: os.path.join(folder, f"{name}.tar") for name in writers}
        for name, writer in writers.items():
            writer(paths[name], items)
        contents = {name: Path(path).read_bytes() for name, path in paths.items()}
        print(f"same bytes: {contents['acc_clip'] == contents['tarfile']} ({len(contents['acc_clip'])} bytes)")
        seconds: dict[str, list[float]] = {name: [] for name in writers}
        for _ in range(args.rounds):
            for name, writer in writers.items():
                started = time.perf_counter()
                writer(paths[name], items)
                seconds[name].append(time.perf_counter() - started)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    for name, value in median.items():
        print(
            f"{name:>8}: {value:.3f} s median of {args.rounds} [{min(seconds[name]):.3f}-{max(seconds[name]):.3f}], "
            f"{args.samples / value:.0f} samples/s"
        )
    print(f"acc_clip's writer is {median['tarfile'] / median['acc_clip']:.2f}x tarfile's speed")


if __name__ == "__main__":
    main()
