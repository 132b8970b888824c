"""`acc-clip shards index SHARDS [--out FILE]`: count the samples of a shard set nobody counted and write
open_clip's sizes.json, so that training splits it exactly once per epoch.

SHARDS is what --train-data takes: a folder, 'DIR/{00000..00099}.tar', URLs ('http://host/{0..9}.tar') or
`pipe:` commands, several joined by '::'. Local shards are counted from their tar headers, remote ones are
read in full, as webdataset reads them (data/shard_counts.py). The counts go:
  - to sizes.json beside local shards (entries for other shards already there are kept), or to --out;
  - always into the count cache, where a training run over the same URLs on this machine finds them.
A remote set needs --out (nothing can be written beside it); the file lists shards by file name, as
open_clip's sizes.json does, so two shards with one name in different folders need separate runs."""

from __future__ import annotations

import json
import os

from acc_clip.data.shard_counts import SIZES_JSON, count_shard, is_remote, read_sizes_json, store_counts
from acc_clip.data.wds import expand_shard_urls
from acc_clip.errors import UsageError
from acc_clip.io.atomic import write_atomically
from acc_clip.prep.shards.convert import run_jobs


def _counted(shard: str) -> dict:
    return {"shard": shard, "samples": count_shard(shard)}


def index_shards(urls: str, *, out: str | None = None, workers: int | None = None) -> dict:
    """Count every shard of `urls` and write the sizes.json files; returns {"shards", "samples", "written"}."""
    shards = expand_shard_urls(urls)
    if out is None and any(is_remote(shard) for shard in shards):
        raise UsageError(
            f"{urls}: remote shards: give --out FILE for their sizes.json (nothing is written beside them)"
        )
    names = [os.path.basename(shard) for shard in shards]
    if out is not None and len(set(names)) < len(names):
        raise UsageError(f"{urls}: shards of one name in several folders cannot share one --out sizes.json")
    counts = {result["shard"]: result["samples"] for result in run_jobs(shards, workers, _counted)}
    store_counts(counts)
    by_file: dict[str, dict[str, int]] = {}
    for shard in shards:
        target = out if out is not None else os.path.join(os.path.dirname(shard), SIZES_JSON)
        by_file.setdefault(target, {})[os.path.basename(shard)] = counts[shard]
    for target, sizes in by_file.items():
        kept = read_sizes_json(target) if out is None else {}
        write_atomically(target, json.dumps({**kept, **sizes}, indent=1, sort_keys=True) + "\n")
    return {"shards": len(shards), "samples": sum(counts.values()), "written": sorted(by_file)}
