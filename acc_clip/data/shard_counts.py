"""How many samples each webdataset shard holds, for shard sets nobody counted (webdataset's `ShardWriter`,
img2dataset): exactly-once training splits the epoch's positions by these counts (data/wds.py).

Where a shard's count comes from, first found wins:
  1. `sizes.json` beside it (open_clip's format, written by `acc-clip shards` and `acc-clip shards index`);
  2. img2dataset's `NNNNN_stats.json` beside `NNNNN.tar`: its `successes` field, the samples it wrote
     (its `count` is the rows it tried; acc-clip's own `_stats.json` has no `successes` and is not read here:
     its conversions always end with a sizes.json);
  3. the count cache, `$XDG_CACHE_HOME/acc_clip/shard_counts/` (default `~/.cache/...`), one JSON per folder,
     an entry per shard holding its byte size and modification time: an entry whose shard changed since is
     never used. Remote shards (URLs, `pipe:`) are there only after `acc-clip shards index URLS` read them;
  4. a local shard is counted by reading its tar headers only (tarfile's random-access reader seeks past each
     member's data), and the count goes to the cache. A compressed or otherwise unusual tar is read through
     webdataset itself instead.

Guarantee: a count is the number of samples webdataset's `tarfile_samples` (with warn_and_continue, as the
loader reads) yields for that file: members grouped by key (the name up to the first dot of its base name),
non-files, keys-less names and `__meta__` names left out, a member cut short by the end of a damaged file
dropped (tests/unit/data/test_shard_counts.py compares the two on odd tars, and on a tar cut at every block).

Every process counts for itself, the same files giving the same counts: no collective is needed in the
data layer, and the first process to finish writes the cache (atomically; the others write the same
entries), so later runs and the other epochs' loaders only stat the shards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import secrets
import tarfile
from collections.abc import Iterable
from typing import cast

import webdataset as wds
from webdataset.tariterators import base_plus_ext, meta_prefix, meta_suffix, tarfile_samples

from acc_clip.errors import DataError, describe_error
from acc_clip.io.atomic import write_atomically

log = logging.getLogger(__name__)

SIZES_JSON = "sizes.json"
# webdataset's tar_file_iterator skips member names matching this (its skip_meta default)
WDS_SKIP_META = r"__[^/]*__($|/)"


def is_remote(shard: str) -> bool:
    """A URL or a `pipe:` command, as webdataset opens them; anything else is a local path."""
    return "://" in shard or shard.startswith("pipe:")


# ---------------------------------------------------------------------------------------------
# Counting one shard


def _wds_key(name: str) -> str | None:
    """The sample key webdataset gives a member name, or None when it skips the member."""
    if "/" not in name and name.startswith(meta_prefix) and name.endswith(meta_suffix):
        return None
    if re.match(WDS_SKIP_META, name):
        return None
    return base_plus_ext(name)[0]


def count_tar_headers(path: str) -> int | None:
    """Samples in a local tar, from its headers alone; None when it is not a plain tar this can read that way
    (compressed, not a tar at all): `count_by_reading` then says what webdataset makes of it."""
    file_size = os.path.getsize(path)
    with open(path, "rb", buffering=0) as file:
        fast = _count_plain_headers(file, file_size)
    return fast if fast is not None else _count_with_tarfile(path, file_size)


_OCTAL = re.compile(rb"[0-7]*")
# mode, uid, gid, size, mtime, devmajor, devminor: tarfile refuses a header where one is no number
_NUMBER_FIELDS = ((100, 108), (108, 116), (116, 124), (124, 136), (136, 148), (329, 337), (337, 345))
_REGULAR, _SUPPORTED = (b"0", b"\0", b"7"), tuple(tarfile.SUPPORTED_TYPES)
_LEFT_TO_TARFILE = (b"L", b"K", b"S", b"g", b"X")  # GNU long names, sparse files, global pax headers
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
# Pax keywords that change nothing a count depends on; any other than these, path and size goes to tarfile.
_PAX_INERT = {b"mtime", b"atime", b"ctime", b"uid", b"gid", b"uname", b"gname", b"linkpath", b"comment"}


def _number(field: bytes) -> int | None:
    text = field.split(b"\0", 1)[0].strip()
    return int(text or b"0", 8) if _OCTAL.fullmatch(text) else None


def _pax_overrides(data: bytes) -> dict[bytes, bytes] | None:
    """The path and size a pax header sets, or None when it says more than this reads (tarfile then does)."""
    overrides, position = {}, 0
    while position < len(data) and data[position] != 0:
        match = _PAX_RECORD.match(data, position)
        if match is None:
            return None
        length, keyword = int(match.group(1)), match.group(2)
        if length < 1 or data[position + length - 1 : position + length] != b"\n":
            return None
        if keyword in (b"path", b"size"):
            overrides[keyword] = data[match.end() : position + length - 1]
        elif keyword not in _PAX_INERT:
            return None
        position += length
    return overrides


def _count_plain_headers(file, file_size: int) -> int | None:
    """The count from ustar/GNU/v7 headers and pax headers that set path, size or times (webdataset's
    TarWriter gives every member a pax mtime), several times faster than tarfile's own parse (its TarInfo
    costs ~20 us a header). None as soon as anything else shows (GNU long names, global headers, base-256
    numbers, a bad checksum), and tarfile reads the whole file instead. Ends where tarfile ends a damaged tar."""
    samples, last_key, offset, pax = 0, None, 0, None
    while True:
        file.seek(offset)
        header = file.read(tarfile.BLOCKSIZE)
        if len(header) < tarfile.BLOCKSIZE:  # cut inside a header: no tar at all if that is the first
            return samples if offset and pax is None else None
        if not any(header):  # the end marker
            return samples if pax is None else None
        numbers = [_number(header[a:b]) for a, b in _NUMBER_FIELDS]
        checksum = _number(header[148:156])
        kind = header[156:157]
        if None in numbers or checksum != 256 + sum(header) - sum(header[148:156]) or kind in _LEFT_TO_TARFILE:
            return None
        size = cast(int, numbers[3])
        if kind == b"x":
            if pax is not None or offset + tarfile.BLOCKSIZE + size > file_size:
                return None
            pax = _pax_overrides(file.read(size))
            if pax is None:
                return None
            offset += tarfile.BLOCKSIZE + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            continue
        name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        if kind == b"\0" and name.endswith("/"):
            kind = tarfile.DIRTYPE  # an old-style folder
        if prefix:
            name = prefix + "/" + name
        if pax is not None:
            try:
                name = pax[b"path"].decode("utf-8") if b"path" in pax else name
                size = int(pax[b"size"]) if b"size" in pax else size
            except ValueError:
                return None
            pax = None
        if kind in _REGULAR:
            if offset + tarfile.BLOCKSIZE + size > file_size:
                return samples  # its data is cut short: webdataset drops the member, and the tar ends there
            key = _wds_key(name)
            if key is not None and key != last_key:
                samples, last_key = samples + 1, key
        offset += tarfile.BLOCKSIZE
        if kind in _REGULAR or kind not in _SUPPORTED:  # tarfile skips the data of these only
            offset += -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE


def _count_with_tarfile(path: str, file_size: int) -> int | None:
    """The count from tarfile's random-access reader (headers parsed by tarfile, data sought past)."""
    samples, last_key = 0, None
    try:
        with tarfile.open(path, "r:") as tar:
            while True:
                try:
                    member = tar.next()
                except (tarfile.TarError, EOFError, OSError):
                    break  # a damaged end: webdataset stops there as well
                if member is None:
                    break
                if not member.isreg():
                    continue
                if member.offset_data + member.size > file_size:
                    break  # its data is cut short: webdataset drops the member, and the tar ends there
                key = _wds_key(member.name)
                if key is not None and key != last_key:
                    samples, last_key = samples + 1, key
    except tarfile.ReadError:
        return None  # the first header is no tar header
    return samples


def count_by_reading(url: str) -> int:
    """Samples webdataset yields for the shard at `url` (a path, a URL or `pipe:`), reading all of it. Its
    ignore_and_continue takes the loader's warn_and_continue path without the half-second sleep per error."""
    return sum(1 for _ in tarfile_samples([{"url": url}], handler=wds.ignore_and_continue))


def count_shard(shard: str) -> int:
    """Samples in one shard: tar headers for a local plain tar, a full read otherwise."""
    if not is_remote(shard):
        counted = count_tar_headers(shard)
        if counted is not None:
            return counted
    return count_by_reading(shard)


# ---------------------------------------------------------------------------------------------
# Counts others wrote


def read_sizes_json(path: str) -> dict[str, int]:
    """{shard file name: sample count}, {} when there is no such file; a file that is there but not
    that (damaged, hand-edited) is a one-line error, never taken as absent."""
    try:
        with open(path, encoding="utf-8") as f:
            sizes = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:  # unreadable, not UTF-8, not JSON
        raise DataError(f"{path}: not a readable sizes.json ({describe_error(error)})") from None
    if not isinstance(sizes, dict) or not all(_is_count(n) for n in sizes.values()):
        raise DataError(f'{path}: expected {{"shard.tar": sample count, ...}} with counts >= 0')
    return sizes


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def img2dataset_count(shard: str) -> int | None:
    """img2dataset's `successes` from `NNNNN_stats.json` beside `NNNNN.tar`, or None (no such file, or not
    img2dataset's: a file without that field is not taken for a count)."""
    if not shard.endswith(".tar"):
        return None
    try:
        with open(shard[: -len(".tar")] + "_stats.json", encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return None
    successes = stats.get("successes") if isinstance(stats, dict) else None
    return successes if _is_count(successes) else None


# ---------------------------------------------------------------------------------------------
# The cache


def cache_folder() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "acc_clip", "shard_counts")


def _folder_of(shard: str) -> str:
    return shard.rsplit("/", 1)[0] if is_remote(shard) else os.path.dirname(os.path.abspath(shard))


def _cache_path(folder: str) -> str:
    return os.path.join(cache_folder(), hashlib.sha256(folder.encode()).hexdigest()[:32] + ".json")


def _identity(shard: str) -> dict:
    """What must be unchanged for a cached count to hold: size and mtime of a local file; a remote shard
    is known by its URL alone (`acc-clip shards index` again after it changed)."""
    if is_remote(shard):
        return {}
    stat = os.stat(shard)
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_cache(folder: str) -> dict[str, dict]:
    try:
        with open(_cache_path(folder), encoding="utf-8") as f:
            document = json.load(f)
        return document["shards"] if document.get("folder") == folder else {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # a damaged cache is counted again, never trusted


def cached_count(shard: str, entries: dict[str, dict]) -> int | None:
    entry = entries.get(shard if is_remote(shard) else os.path.abspath(shard))
    if not isinstance(entry, dict) or not _is_count(entry.get("samples")):
        return None
    if {k: v for k, v in entry.items() if k != "samples"} != _identity(shard):
        return None  # the shard changed since it was counted
    return entry["samples"]


def store_counts(counts: dict[str, int]) -> None:
    """Add {shard: samples} to the cache, folder by folder. A cache that cannot be written costs a recount
    next time, not the run: it is said once and passed over."""
    by_folder: dict[str, dict[str, int]] = {}
    for shard, samples in counts.items():
        by_folder.setdefault(_folder_of(shard), {})[shard] = samples
    for folder, shards in by_folder.items():
        entries = _read_cache(folder)
        for shard, samples in shards.items():
            entries[shard if is_remote(shard) else os.path.abspath(shard)] = {**_identity(shard), "samples": samples}
        document = json.dumps({"folder": folder, "shards": entries}, sort_keys=True)
        # Through a name of this process's own: every process of a run writes these entries at about once.
        own = f"{_cache_path(folder)}.{secrets.token_hex(8)}"
        try:
            os.makedirs(cache_folder(), exist_ok=True)
            write_atomically(own, document)
            os.replace(own, _cache_path(folder))
        except Exception as error:  # noqa: BLE001 - any failure to write a cache leaves the counts correct
            log.warning("shard counts not cached in %s (%s)", cache_folder(), describe_error(error))


# ---------------------------------------------------------------------------------------------
# A whole set


def known_count(shard: str, sizes_json: dict[str, int], cache: dict[str, dict]) -> int | None:
    """A count someone already made: sizes.json, img2dataset's stats, the cache; None otherwise."""
    name = os.path.basename(shard)
    if name in sizes_json:
        return sizes_json[name]
    if not is_remote(shard) and (count := img2dataset_count(shard)) is not None:
        return count
    return cached_count(shard, cache)


def shard_counts(shards: list[str], *, count_local: bool = True) -> list[int] | None:
    """The sample count of every shard (see the module docstring for where each comes from), or None when
    a remote shard has none (or a local one and `count_local` is False). Local shards are counted and
    cached when nothing else knows them."""
    sizes_by_folder: dict[str, dict[str, int]] = {}
    cache_by_folder: dict[str, dict[str, dict]] = {}
    counts: list[int] = []
    counted: dict[str, int] = {}
    for shard in shards:
        folder = _folder_of(shard)
        if folder not in sizes_by_folder:
            sizes_by_folder[folder] = {} if is_remote(shard) else read_sizes_json(os.path.join(folder, SIZES_JSON))
            cache_by_folder[folder] = _read_cache(folder)
        count = known_count(shard, sizes_by_folder[folder], cache_by_folder[folder])
        if count is None:
            if is_remote(shard) or not count_local:
                return None
            count = counted[shard] = count_shard(shard)
        counts.append(count)
    if counted:
        log.info("counted the samples of %d shards from their tar headers (cached in %s)", len(counted), cache_folder())
        store_counts(counted)
    return counts


def count_and_cache(shards: Iterable[str]) -> dict[str, int]:
    """{shard: samples} for every shard, each counted now (remote ones read in full), and cached."""
    counts = {shard: count_shard(shard) for shard in shards}
    store_counts(counts)
    return counts
