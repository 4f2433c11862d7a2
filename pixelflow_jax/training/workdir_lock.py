"""One training run per workdir: an owner lock, WORKDIR/train.lock.

It names its holder (host, pid, start time) and carries a heartbeat that the holder refreshes at
every logged step. A second run sees it at once and stops, naming the holder. A lock is stale,
and is taken over, when its holder is gone: on this host, no process with its pid and start time
exists (a restarted container reuses pids, its own included); from another host, its heartbeat is
older than train.lock_stale_after_s.

Creating the lock is atomic: O_EXCL on a local disk, an `ifGenerationMatch=0` upload (create only)
in a bucket. Process 0 of a job holds it for the job; every process learns the outcome.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import time

import jax
import numpy as np
from absl import logging

from pixelflow_jax import storage

LOCK_FILE = "train.lock"


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces
    except (OSError, ValueError, IndexError):
        return None


class WorkdirBusy(RuntimeError):
    """Another live run owns the workdir; the message names it."""


def _create_exclusively(path: str, data: bytes) -> bool:
    """Writes `path` only if it does not exist; False if it does."""
    if storage.is_url(path):
        import fsspec

        fs, key = fsspec.core.url_to_fs(path)
        if fs.exists(key):
            return False
        try:
            fs.pipe_file(key, data, mode="create")  # the store refuses it if another run created it first
        except Exception:  # a precondition failure (412), whatever the client calls it
            if fs.exists(key):
                return False
            raise
        return True
    storage.makedirs(os.path.dirname(path))
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return True


class WorkdirLock:
    def __init__(self, workdir: str, stale_after_s: float):
        self.path = storage.join(workdir, LOCK_FILE)
        self.stale_after_s = stale_after_s
        self.record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": process_start(os.getpid()),
                       "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "heartbeat": time.time()}
        self.held = False

    def acquire(self) -> None:
        """Takes the lock (process 0) and tells every process; raises WorkdirBusy everywhere if held."""
        problem = ""
        if jax.process_index() == 0:
            problem = self._try_acquire()
        from jax.experimental import multihost_utils

        if int(multihost_utils.broadcast_one_to_all(np.int32(bool(problem)))):
            raise WorkdirBusy(problem or f"{self.path}: the workdir is in use by another run (see process 0's error)")

    def _try_acquire(self) -> str:
        for _ in range(2):  # a second try after clearing a stale lock
            if _create_exclusively(self.path, json.dumps(self.record).encode()):
                self.held = True
                return ""
            holder = self._read()
            if holder is None or not self._stale(holder):
                return self._busy_message(holder)
            if self._read() == holder:  # still the stale one (a run taking it over at this instant: keep theirs)
                logging.warning("taking over %s from a run that is gone: host %s, pid %s, heartbeat %.0f s ago",
                                self.path, holder.get("host"), holder.get("pid"),
                                time.time() - float(holder.get("heartbeat", 0)))
                storage.remove(self.path)
        return self._busy_message(self._read())

    def _read(self) -> dict | None:
        try:
            return json.loads(storage.read_text(self.path))
        except (FileNotFoundError, ValueError):  # removed meanwhile, or being written
            return None

    def _stale(self, holder: dict) -> bool:
        if holder.get("host") == socket.gethostname():
            # A restarted container reuses its pids: the holder's pid may now be this very process,
            # or another one, started after the holder.
            pid, recorded_start = int(holder.get("pid", -1)), holder.get("pid_start")
            return not storage.process_alive(pid) or (
                recorded_start is not None and process_start(pid) not in (None, recorded_start))
        return time.time() - float(holder.get("heartbeat", 0)) > self.stale_after_s

    def _busy_message(self, holder: dict | None) -> str:
        if holder is None:
            return f"{self.path}: another run is starting in this workdir right now; use another --workdir"
        age = time.time() - float(holder.get("heartbeat", 0))
        return (f"{storage.dirname(self.path)} is in use by another training run: host {holder.get('host')}, pid "
                f"{holder.get('pid')}, started {holder.get('started')} (heartbeat {age:.0f} s ago). Wait for it or "
                f"stop it, or use another --workdir; if that run is gone for good, delete {self.path}")

    def heartbeat(self) -> None:
        if self.held:
            self.record["heartbeat"] = time.time()
            storage.write_json_atomically(self.path, self.record)

    def release(self) -> None:
        if self.held and self._read() == self.record:
            storage.remove(self.path)
        self.held = False

