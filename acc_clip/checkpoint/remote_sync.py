"""A copy of the run folder on remote storage, kept up to date in the background, and the way back
for `--resume latest` on a machine that lost (or never had) the local folder.

`--remote-sync URL` mirrors `<logs>/<name>/` to `URL/<name>/` (open_clip's layout) every
`--remote-sync-frequency` seconds, and once more when the process exits, through fsspec:
`--remote-sync-protocol s3` needs s3fs and an s3:// URL; `fsspec` takes any URL fsspec knows
(file://, gs://, ...).

Consistency. A step checkpoint is copied only once it is complete locally, its manifest last, so
a remote folder without the manifest is an interrupted copy: never fetched back, copied again next
time. Partial local saves (`.tmp-*`) are never copied. With --keep-checkpoints, remote checkpoints
older than the newest local one and no longer kept locally are removed remotely too.

Ownership. Every run folder has a run id (`<run>/run_id`), also written to `URL/<name>/run_id` by
the first run that copies there, and into every checkpoint's manifest. A run whose id differs from
the remote folder's is refused at start in one line (two machines or a repeated command with the
same --name), and stops copying if another run claims the folder meanwhile: one run never overwrites
another's files. Only checkpoints whose manifest carries this run's id are pruned or fetched back.
A machine that lost the local folder continues the remote run with `--resume latest`: a run folder
without checkpoints takes over the remote folder's id (said in a warning).

Liveness. The owner writes `URL/<name>/heartbeat.json` (run id, host, pid, UTC epoch seconds) when it
claims the folder and then every min(--remote-sync-frequency, --remote-stale-after / 3) seconds, also
between the files of a long copy, and marks it stopped when it ends short of SIGKILL (a normal end,
preemption's exit 75, an error). `--resume latest` refuses to adopt a run whose heartbeat is fresher
than --remote-stale-after and not stopped: its owner may still run. A SIGKILLed owner leaves a fresh
heartbeat, adopted once it is stale; a remote folder from an older acc_clip has none and is adopted.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import socket
import threading
import time

from acc_clip.checkpoint.folders import STEP_PREFIX, TMP_PREFIX, complete_checkpoints
from acc_clip.errors import ResourceError, UsageError, describe_error
from acc_clip.io.atomic import write_atomically
from acc_clip.io.sealed import MANIFEST, list_files
from acc_clip.runtime.run_dir import CHECKPOINTS_DIR, METRICS_FILE, RUN_ID_FILE, adopt_run_id, run_id

log = logging.getLogger(__name__)

HEARTBEAT_FILE = "heartbeat.json"  # in the remote run folder only: who copies there, and when last


def open_remote(url: str, protocol: str):
    """The fsspec filesystem and root path of `url`; one line naming what is wrong otherwise."""
    import fsspec

    if protocol == "s3":
        if not url.startswith("s3://"):
            raise UsageError(
                f"--remote-sync {url}: --remote-sync-protocol s3 needs an s3:// URL "
                "(use --remote-sync-protocol fsspec for other storage)"
            )
        if importlib.util.find_spec("s3fs") is None:
            raise ResourceError("--remote-sync-protocol s3 needs the s3fs package, which is not installed")
    elif protocol != "fsspec":
        raise UsageError(f"--remote-sync-protocol {protocol!r}: expected s3 or fsspec")
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ValueError, ImportError) as error:
        raise ResourceError(f"--remote-sync {url}: fsspec cannot open it ({error})") from None
    return fs, root.rstrip("/")


class RemoteSync:
    def __init__(
        self,
        run_dir: str,
        url: str,
        protocol: str,
        every_seconds: float,
        *,
        prune: bool = False,
        stale_after: float = 900,
    ):
        self.run_dir = run_dir
        self.stale_after = stale_after  # seconds: an older heartbeat of another run means its owner is gone
        self.fs, root = open_remote(url, protocol)
        self.remote_dir = f"{root}/{os.path.basename(os.path.normpath(run_dir))}"
        self.every_seconds = every_seconds
        self.prune = prune
        self.run_id = run_id(run_dir)
        self._foreign: str | None = None  # the id of another run that claimed the remote folder meanwhile
        # Checkpoints copied before run ids existed carry none: this run's own when it found the remote
        # folder without an owner (an older acc_clip wrote it under this name), nobody's otherwise.
        self._owns_unmarked = False
        self._copied: dict[str, tuple[int, int]] = {}  # local file -> (size, mtime_ns) when last copied
        self._lock = threading.Lock()  # one copy at a time: the thread's and the final one
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # More often than the staleness, so that a live owner's heartbeat is never taken for a dead one's.
        self._beat_every = min(every_seconds, stale_after / 3)
        self._beating = False  # from the claim to stop(): this run keeps the remote heartbeat fresh
        self._beaten_at = 0.0  # time.monotonic() of the last heartbeat written (or tried)
        self._stop_registered = False

    # ownership --------------------------------------------------------------------------------
    def _remote_owner(self) -> str | None:
        path = f"{self.remote_dir}/{RUN_ID_FILE}"
        return self.fs.cat_file(path).decode().strip() if self.fs.exists(path) else None

    def claim(self, may_adopt: bool) -> None:
        """Make the remote folder this run's, before anything is copied or fetched. `may_adopt`: this
        run folder holds no checkpoint and resumes (`--resume latest`), so it continues the remote run."""
        owner = self._remote_owner()
        if owner in (None, self.run_id):
            self._owns_unmarked = owner is None
            self._claim_if_free(owner)
        elif may_adopt:
            gone = self._check_owner_gone(owner)
            log.warning(
                "--remote-sync: continuing the run copied at %s (run id %s) in %s%s",
                self.remote_dir,
                owner,
                self.run_dir,
                gone,
            )
            adopt_run_id(self.run_dir, owner)
            self.run_id = owner
        else:
            raise UsageError(
                f"--remote-sync: {self.remote_dir} holds another run's copy (run id {owner}; this "
                f"run's is {self.run_id}, in {os.path.join(self.run_dir, RUN_ID_FILE)}): pick "
                "another --name, or continue that run with --resume latest from a new run folder"
            )
        self._write_heartbeat(stopped=False)
        self._stop_at_exit()  # a run that fails before start() still marks its heartbeat stopped

    def _claim_if_free(self, owner: str | None) -> None:
        if owner is None:
            self.fs.makedirs(self.remote_dir, exist_ok=True)
            self.fs.pipe_file(f"{self.remote_dir}/{RUN_ID_FILE}", (self.run_id + "\n").encode())

    def _still_ours(self) -> bool:
        """Whether the remote folder is still this run's; once another run claimed it, copying stops for good."""
        if self._foreign is None:
            owner = self._remote_owner()
            if owner not in (None, self.run_id):
                self._foreign = owner
                log.warning(
                    "remote sync: %s now belongs to run %s, not this run (%s); no longer copying there",
                    self.remote_dir,
                    owner,
                    self.run_id,
                )
            else:
                self._claim_if_free(owner)
        return self._foreign is None

    # liveness ---------------------------------------------------------------------------------
    def _check_owner_gone(self, owner: str) -> str:
        """Refuse to adopt `owner`'s run while its heartbeat says it still runs; otherwise what the heartbeat
        says, for the adoption's warning. The age is this machine's clock minus the owner's (the time it
        wrote, not the storage's mtime, which not every fsspec backend gives): machines' clocks differ by
        seconds, seldom more, which is why the staleness is counted in minutes."""
        beat = self._read_heartbeat()
        if beat is None or beat["run_id"] == self.run_id:
            return ""
        age = max(0.0, time.time() - beat["time"])
        where = f"{beat.get('host', '?')} (pid {beat.get('pid', '?')})"
        if beat.get("stopped") is True:
            return f"; its owner on {where} stopped {age:.0f} s ago"
        if age < self.stale_after:
            raise UsageError(
                f"--resume latest: {self.remote_dir} belongs to run {beat['run_id']}, which may still run on {where}: "
                f"its heartbeat is {age:.0f} s old, fresher than --remote-stale-after {self.stale_after:g} s; "
                "stop that run first or wait for it to end (a run that was killed is adopted once its "
                "heartbeat is older than --remote-stale-after)"
            )
        return f"; its heartbeat from {where} is {age:.0f} s old, stale (--remote-stale-after {self.stale_after:g})"

    def _read_heartbeat(self) -> dict | None:
        """The remote folder's heartbeat; None when there is none (an older acc_clip copied the run) or
        its body cannot be read (said in a warning)."""
        path = f"{self.remote_dir}/{HEARTBEAT_FILE}"
        try:
            beat = json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None
        except ValueError:  # not UTF-8, not JSON
            beat = None
        if not (
            isinstance(beat, dict)
            and isinstance(beat.get("run_id"), str)
            and isinstance(beat.get("time"), (int, float))
        ):
            log.warning("--remote-sync: %s cannot be read; taken as no heartbeat", path)
            return None
        return beat

    def _write_heartbeat(self, stopped: bool) -> None:
        """In one write: a reader sees the previous heartbeat or this one, never a mix."""
        self._beating, self._beaten_at = not stopped, time.monotonic()
        beat = {
            "run_id": self.run_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "time": time.time(),  # UTC epoch seconds
            "stopped": stopped,
        }
        self._replace_whole(f"{self.remote_dir}/{HEARTBEAT_FILE}", (json.dumps(beat) + "\n").encode())

    def _replace_whole(self, path: str, data: bytes) -> None:
        """An object store replaces an object in one PUT; a local (or mounted) folder needs a rename for that."""
        from fsspec.implementations.local import LocalFileSystem

        if isinstance(self.fs, LocalFileSystem):
            write_atomically(path, data)
        else:
            self.fs.pipe_file(path, data)

    def _beat(self, stopped: bool = False) -> None:
        """Refresh the heartbeat while this run owns the remote folder (the caller holds self._lock)."""
        if self._beating and self._still_ours():
            self._write_heartbeat(stopped)

    def _beat_logged(self, stopped: bool = False) -> None:
        try:
            with self._lock:
                self._beat(stopped)
        except Exception as error:  # fsspec backends raise their own types
            log.warning("remote sync: cannot write %s/%s (%s)", self.remote_dir, HEARTBEAT_FILE, describe_error(error))

    def _manifest_run_id(self, name: str) -> str | None:
        try:
            manifest = json.loads(self.fs.cat_file(f"{self.remote_dir}/{CHECKPOINTS_DIR}/{name}/{MANIFEST}"))
        except (ValueError, OSError):
            return None
        marked = manifest.get("run_id") if isinstance(manifest, dict) else None
        return self.run_id if marked is None and self._owns_unmarked else marked

    # background -------------------------------------------------------------------------------
    def start(self) -> None:
        """Copy every `every_seconds` in a daemon thread, and a last time at exit, however the
        process ends short of SIGKILL (normal end, preemption exit, error)."""
        self._thread = threading.Thread(target=self._loop, name="remote-sync", daemon=True)
        self._thread.start()
        self._stop_at_exit()
        log.info("copying %s to %s every %s s", self.run_dir, self.remote_dir, self.every_seconds)

    def _stop_at_exit(self) -> None:
        if not self._stop_registered:
            atexit.register(self.stop)
            self._stop_registered = True

    def _loop(self) -> None:
        """Copy every `every_seconds`; refresh the heartbeat every `_beat_every` in between."""
        next_sync = time.monotonic() + self.every_seconds
        while not self._stop.wait(min(self._beat_every, max(0.0, next_sync - time.monotonic()))):
            if time.monotonic() >= next_sync:
                self._sync_logged()
                next_sync = time.monotonic() + self.every_seconds
            self._beat_logged()

    def stop(self) -> None:
        """The last copy, then the heartbeat marked stopped: a run that ended (normally, preempted, on an
        error) is adopted at once, without waiting for its heartbeat to go stale."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            self._sync_logged()
        self._beat_logged(stopped=True)

    def _sync_logged(self) -> None:
        # A remote that is down must not stop training: say so, and try again next time.
        try:
            copied = self.sync_once()
            if copied:
                log.info("remote sync: %d file(s) copied to %s", copied, self.remote_dir)
        except Exception as error:  # fsspec backends raise their own types
            log.warning(
                "remote sync to %s failed (%s: %s); retrying in %s s",
                self.remote_dir,
                type(error).__name__,
                error,
                self.every_seconds,
            )

    # one copy ---------------------------------------------------------------------------------
    def sync_once(self) -> int:
        """Copy what changed since the last copy; returns the number of files copied."""
        with self._lock:
            if not self._still_ours():
                return 0
            copied = self._copy_loose_files()
            local = complete_checkpoints(os.path.join(self.run_dir, CHECKPOINTS_DIR))
            remote = set(self._remote_complete())
            for folder in local:
                if os.path.basename(folder) not in remote:
                    copied += self._copy_checkpoint(folder)
            if self.prune and local:
                self._prune_remote({os.path.basename(f) for f in local}, os.path.basename(local[-1]))
            return copied

    def _copy_loose_files(self) -> int:
        """Everything but step checkpoint folders and partial saves, when its size or time changed."""
        copied = 0
        for folder, subfolders, files in os.walk(self.run_dir):
            subfolders[:] = [d for d in subfolders if not d.startswith((TMP_PREFIX, STEP_PREFIX))]
            for name in files:
                if name.endswith(".tmp"):
                    continue
                local = os.path.join(folder, name)
                try:
                    stat = os.stat(local)
                except FileNotFoundError:  # removed meanwhile (an old epoch_N.pt)
                    continue
                if self._copied.get(local) == (stat.st_size, stat.st_mtime_ns):
                    continue
                self._put(local)
                self._copied[local] = (stat.st_size, stat.st_mtime_ns)
                copied += 1
        return copied

    def _copy_checkpoint(self, folder: str) -> int:
        try:
            names = list(list_files(folder))  # relative paths: a sharded checkpoint has sub-folders
            for name in [n for n in names if n != MANIFEST] + [MANIFEST]:
                self._put(os.path.join(folder, name))
        except FileNotFoundError:  # pruned locally while being copied; its remote copy has no manifest
            return 0
        return len(names)

    def _put(self, local: str) -> None:
        remote = f"{self.remote_dir}/{os.path.relpath(local, self.run_dir).replace(os.sep, '/')}"
        self.fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        self.fs.put_file(local, remote)
        if time.monotonic() - self._beaten_at >= self._beat_every:  # a long copy must not let it go stale
            self._beat()

    def _remote_complete(self) -> list[str]:
        """Names of the remote checkpoints whose manifest arrived, oldest first."""
        pattern = f"{self.remote_dir}/{CHECKPOINTS_DIR}/{STEP_PREFIX}*/{MANIFEST}"
        return sorted(path.rstrip("/").split("/")[-2] for path in self.fs.glob(pattern))

    def _prune_remote(self, kept_locally: set[str], newest_local: str) -> None:
        for name in self._remote_complete():
            if name < newest_local and name not in kept_locally and self._manifest_run_id(name) == self.run_id:
                self.fs.rm(f"{self.remote_dir}/checkpoints/{name}", recursive=True)

    # the way back -----------------------------------------------------------------------------
    def fetch_newest_checkpoint(self) -> str | None:
        """Copy the newest complete remote checkpoint into the local checkpoints folder when it is
        newer than every local one (and metrics.jsonl, when there is none locally); returns the
        local folder, or None when nothing was fetched."""
        local_dir = os.path.join(self.run_dir, CHECKPOINTS_DIR)
        try:
            with self._lock:
                remote = self._remote_complete()
        except Exception as error:  # fsspec backends raise their own types
            raise ResourceError(
                f"--resume latest: cannot list the remote copy {self.remote_dir} ({describe_error(error)})"
            ) from None
        ours = [name for name in remote if self._manifest_run_id(name) == self.run_id]
        if len(ours) < len(remote):
            log.warning(
                "--resume latest: %d checkpoint(s) in %s were not saved by this run (%s), not fetched: %s",
                len(remote) - len(ours),
                self.remote_dir,
                self.run_id,
                ", ".join(sorted(set(remote) - set(ours))),
            )
        local = [os.path.basename(f) for f in complete_checkpoints(local_dir)]
        if not ours or (local and local[-1] >= ours[-1]):
            return None
        name = ours[-1]
        partial, final = os.path.join(local_dir, TMP_PREFIX + name), os.path.join(local_dir, name)
        os.makedirs(partial, exist_ok=True)
        remote_folder = f"{self.remote_dir}/checkpoints/{name}"
        prefix = remote_folder + "/"  # fsspec lists paths as remote_dir holds them: without the protocol
        files = sorted(path[len(prefix) :] for path in self.fs.find(remote_folder) if path.startswith(prefix))
        for file_name in [n for n in files if n != MANIFEST] + [MANIFEST]:
            target = os.path.join(partial, *file_name.split("/"))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            self.fs.get_file(f"{remote_folder}/{file_name}", target)
        os.replace(partial, final)
        metrics = os.path.join(self.run_dir, METRICS_FILE)
        if not os.path.exists(metrics) and self.fs.exists(f"{self.remote_dir}/{METRICS_FILE}"):
            self.fs.get_file(f"{self.remote_dir}/{METRICS_FILE}", metrics)
        log.info("--resume latest: fetched %s from %s", name, remote_folder)
        return final
