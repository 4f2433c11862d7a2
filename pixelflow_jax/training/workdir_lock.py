"""One training run per workdir: an owner lock, WORKDIR/train.lock (and one sampling job per
workdir: WORKDIR/sample.lock, the same kind of lock).

It names its holder (host, pid, start time) and carries a heartbeat that a thread of the holder
refreshes every heartbeat_period(stale_after_s) seconds, whatever the run is doing (compiling,
restoring, a long step). A second run sees it at once and stops, naming the holder. A lock is
stale, and is taken over, when its holder is gone: on this host, no process with its pid and start
time exists (a restarted container reuses pids, its own included); from another PID namespace of
this host (another container, or this one restarted), its heartbeat missed two of the holder's
refreshes; from another host, its heartbeat is older than train.lock_stale_after_s (and than two
of the holder's refreshes, whatever this run's setting). A lock of this very Slurm job before a
requeue (same SLURM_JOB_ID, a lower SLURM_RESTART_COUNT) is stale at once, on any host: Slurm starts
a requeued job only once its earlier run has ended (a node that failed under it included). A lock
that cannot be read (a start killed while writing it) is stale after UNREADABLE_STALE_S.

Creating the lock is atomic: a complete temporary file hard-linked into place on a local disk, an
`ifGenerationMatch=0` upload (create only) in a bucket. Process 0 of a job holds it for the job;
every process learns the outcome. Before each refresh the holder checks that the lock is still
its own: one taken over (this host stalled past stale_after_s) stops the run at its next logged
step, on every process, without saving; before each save process 0 reads the lock again, so a run
that lost it since the last refresh saves nothing. (Two runs that take over one stale lock at the
same instant may both start: the one whose lock was replaced stops at its first refresh or save.)
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.multihost import from_process_0

LOCK_FILE = "train.lock"
SAMPLE_LOCK_FILE = "sample.lock"
UNREADABLE_STALE_S = 60.0  # a live run writes its lock whole within this
HEARTBEAT_JOIN_S = 30.0  # how long release() waits for a beat being written (a preemption's grace is ~30 s)


def heartbeat_period(stale_after_s: float) -> float:
    """Refreshes often enough that a live run is never stale: ten chances per stale_after_s."""
    return max(1.0, min(60.0, stale_after_s / 10))


def pid_namespace() -> str | None:
    """This process's PID namespace ('pid:[4026531836]'), None where unknown. Containers of one
    host may share its hostname (Kubernetes hostNetwork, docker --network host, --hostname)
    while each sees only its own pids."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (Linux /proc); None where unknown."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])  # field 22; the name before ")" may hold spaces
    except (OSError, ValueError, IndexError):
        return None


def slurm_run() -> dict:
    """Which run of which Slurm job this is (none outside Slurm): SLURM_RESTART_COUNT is set, from 1,
    once a job has been requeued."""
    job = os.environ.get("SLURM_JOB_ID", "")
    if not job:
        return {}
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    return {"slurm_job": job, "slurm_restart": int(restart) if restart.isdigit() else 0}


def copied_from_another_host(holder: dict, lock: WorkdirLock) -> str:
    """For a busy message: the folder another host's holder works in, when it is not this one's
    path, and what to do if this folder is a copy of it (a run copied off a cluster brings its
    lock, whose heartbeat is minutes old at most). Its mount point of a shared folder may differ
    too, so this is a question, not a takeover."""
    recorded = holder.get("workdir")
    if holder.get("host") == socket.gethostname() or recorded in (None, lock.record["workdir"]):
        return ""
    return (f". That run works in {recorded} on its host: if this folder is a copy of that one (its lock came "
            f"along), delete {lock.path} and rerun")


class WorkdirBusy(RuntimeError):
    """Another live run owns the workdir; the message names it."""


class WorkdirLock:
    def __init__(self, workdir: str, stale_after_s: float, lock_file: str = LOCK_FILE, job: str = "training run"):
        self.path = storage.join(workdir, lock_file)
        self.job = job  # what holds the lock, in the busy message
        self.stale_after_s = stale_after_s
        self.record = {"host": socket.gethostname(), "workdir": storage.resolved(workdir), "pid": os.getpid(),
                       "pid_start": process_start(os.getpid()), "pid_namespace": pid_namespace(),
                       "heartbeat_period_s": heartbeat_period(stale_after_s),
                       "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "token": uuid.uuid4().hex,  # this lock's own: two in one process and second differ
                       "heartbeat": time.time(), **slurm_run()}
        self.held = False
        self.lost_to: dict | None = None  # the run that took the lock over, once one has
        self._guard = threading.Lock()  # the heartbeat thread and release() both rewrite the lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        """Takes the lock (process 0) and tells every process; raises WorkdirBusy everywhere if held."""
        problem = ""
        if jax.process_index() == 0:
            try:
                problem = self._try_acquire()
            except Exception as e:  # storage errors: every process stops with them, none waits
                problem = f"{self.path}: cannot take the workdir lock: {type(e).__name__}: {e}"
        if int(from_process_0(np.int32(bool(problem)))):
            raise WorkdirBusy(problem or f"{self.path}: the workdir is in use by another run (see process 0's error)")
        if self.held:
            self._thread = threading.Thread(target=self._beat, name="workdir-lock-heartbeat", daemon=True)
            self._thread.start()

    def _try_acquire(self) -> str:
        for _ in range(2):  # a second try after clearing a stale lock
            if storage.create_file(self.path, json.dumps(self.record).encode()):
                self.held = True
                return ""
            holder = self._read()
            if holder is not None and self._is_mine(holder):
                # A bucket upload whose response was lost is retried by the client, and the retry
                # is refused because the first attempt landed: the lock is this run's.
                self.held = True
                return ""
            if holder is None:
                age = self._age_s()
                if age is not None and age <= UNREADABLE_STALE_S:
                    return self._busy_message(None)
                if age is not None and self._read() is None and (self._age_s() or 0) > UNREADABLE_STALE_S:
                    # (read again: a run that took it over meanwhile has written a readable lock)
                    if problem := self._remove_left_lock("a start killed while writing it"):
                        return problem
                    logging.warning("removed %s: unreadable for %.0f s (a start killed while writing it)",
                                    self.path, age)
                continue
            if not self._stale(holder):
                return self._busy_message(holder)
            if self._read() == holder:  # still the stale one (a run taking it over at this instant: keep theirs)
                if problem := self._remove_left_lock(f"a {self.job} that is gone (host {holder.get('host')}, pid "
                                                     f"{holder.get('pid')})"):
                    return problem
                if self._before_requeue(holder):
                    logging.warning("taking over %s from this Slurm job's run before its requeue (job %s, restart %d; "
                                    "host %s, pid %s)", self.path, holder["slurm_job"], holder["slurm_restart"],
                                    holder.get("host"), holder.get("pid"))
                elif self._copied(holder):
                    logging.warning("taking over %s: a copy of the lock of %s (host %s, pid %s), copied with the "
                                    "workdir", self.path, holder["workdir"], holder.get("host"), holder.get("pid"))
                else:
                    logging.warning("taking over %s from a run that is gone: host %s, pid %s, heartbeat %.0f s ago",
                                    self.path, holder.get("host"), holder.get("pid"),
                                    time.time() - float(holder.get("heartbeat", 0)))
        return self._busy_message(self._read())

    def _remove_left_lock(self, left_by: str) -> str:
        """Deletes a lock that `left_by` left behind; the problem, naming its owner, where this user may not
        (another user's lock in a folder with the sticky bit, as shared folders have: only its owner deletes it)."""
        try:
            storage.remove(self.path)
        except PermissionError as e:
            owner, sticky = storage.file_owner(self.path), storage.sticky_words(storage.dirname(self.path))
            return (f"{self.path} was left by {left_by}, but this user cannot delete it ({e.strerror}): it belongs "
                    f"to {owner}{sticky}. Ask them to delete it, or use another --workdir")
        return ""

    def _read(self) -> dict | None:
        try:
            holder = json.loads(storage.read_text(self.path))
        except (FileNotFoundError, ValueError):  # removed meanwhile, being written, or damaged
            return None
        return holder if isinstance(holder, dict) else None

    def _age_s(self) -> float | None:
        """Seconds since the lock file was written; None if it is gone."""
        try:
            return time.time() - storage.size_and_mtime(self.path)[1]
        except FileNotFoundError:
            return None

    def _copied(self, holder: dict) -> bool:
        """A lock copied along with its workdir: its run, on this host, works in another folder.
        (Other hosts may mount a shared folder elsewhere, so their paths prove nothing; on this
        host one folder can have two paths, a bind mount or a second mount of one export.)"""
        recorded, here = holder.get("workdir"), self.record["workdir"]
        if holder.get("host") != socket.gethostname() or recorded in (None, here):
            return False
        if storage.is_url(here):
            return True
        try:
            return not os.path.samefile(recorded, here)
        except OSError:  # the recorded folder is gone: the lock came with a moved or copied folder
            return True

    def _silence_limit_s(self, holder: dict) -> float | None:
        """How old the holder's heartbeat may grow before the holder counts as gone; None where its
        pid decides instead (a process of this host and PID namespace). Never under two of the
        holder's own refresh periods, whatever this run's lock_stale_after_s."""
        refreshes = 2 * max(float(holder.get("heartbeat_period_s", 0)), heartbeat_period(self.stale_after_s)) + 10
        namespaces = holder.get("pid_namespace"), self.record["pid_namespace"]
        if holder.get("host") != socket.gethostname():
            return max(self.stale_after_s, refreshes)
        if None not in namespaces and namespaces[0] != namespaces[1]:
            # Another container of this host (or this one restarted): its pids are not ours to look
            # up, but it shares our clock, so a holder that missed two refreshes is gone.
            return refreshes
        return None

    def _before_requeue(self, holder: dict) -> bool:
        """The lock of this Slurm job's earlier run, which Slurm ended before requeueing the job."""
        mine = self.record.get("slurm_job")
        return mine is not None and holder.get("slurm_job") == mine and isinstance(holder.get("slurm_restart"), int) \
            and holder["slurm_restart"] < self.record["slurm_restart"]

    def _stale(self, holder: dict) -> bool:
        if self._before_requeue(holder) or self._copied(holder):
            return True
        if (limit := self._silence_limit_s(holder)) is not None:
            return time.time() - float(holder.get("heartbeat", 0)) > limit
        # The holder is a process of this host and PID namespace. A restarted container reuses its
        # pids: the holder's pid may now be this very process, or another one, started after it.
        pid, recorded_start = int(holder.get("pid", -1)), holder.get("pid_start")
        return not storage.process_alive(pid) or (
            recorded_start is not None and process_start(pid) not in (None, recorded_start))

    def _busy_message(self, holder: dict | None) -> str:
        if holder is None:
            return (f"{self.path}: another run is starting in this workdir right now; use another --workdir (a lock "
                    f"that stays unreadable is removed after {UNREADABLE_STALE_S:.0f} s)")
        age = time.time() - float(holder.get("heartbeat", 0))
        limit = self._silence_limit_s(holder)
        gone = (f"if that run is gone, its lock is taken over once its heartbeat is {limit:.0f} s old (rerun then), "
                f"or delete {self.path}" if limit is not None else f"if that run is gone for good, delete {self.path}")
        return (f"{storage.dirname(self.path)} is in use by another {self.job}: host {holder.get('host')}, pid "
                f"{holder.get('pid')}, started {holder.get('started')} (heartbeat {age:.0f} s ago). Wait for it or "
                f"stop it, or use another --workdir; {gone}{copied_from_another_host(holder, self)}")

    def _is_mine(self, holder: dict) -> bool:
        """By the holder's identity, not its heartbeat (a beat whose write failed is still ours)."""
        return holder.get("token") == self.record["token"]

    def heartbeat(self) -> None:
        """Refreshes the lock if it is still this run's; else records who took it over."""
        with self._guard:
            if not self.held:
                return
            holder = self._read()
            if holder is not None and not self._is_mine(holder):
                self.lost_to, self.held = holder, False
                logging.error("%s was taken over by host %s, pid %s: this run stops at its next logged step",
                              self.path, holder.get("host"), holder.get("pid"))
                return
            # A failed write (a storage hiccup) leaves the last beat; ownership is judged by identity.
            storage.write_json_atomically(self.path, {**self.record, "heartbeat": time.time()})

    def _beat(self) -> None:
        while not self._stop.wait(heartbeat_period(self.stale_after_s)):
            self._heartbeat_or_warn()

    def _heartbeat_or_warn(self) -> None:
        try:
            self.heartbeat()
        except Exception as e:  # a storage hiccup is no takeover: the next beat tries again
            logging.warning("could not refresh %s: %s", self.path, e)

    def check_held(self, read_now: bool = False) -> None:
        """At a logged step, on every process: raises WorkdirBusy everywhere if another run took the
        lock over (it resumed from this run's checkpoints; saving more would mix the two runs).
        read_now (before a save): process 0 reads the lock itself instead of trusting the last
        heartbeat, so a run that lost its lock since then saves nothing (two runs that took over
        one stale lock at the same instant: the one whose lock was replaced)."""
        if read_now and jax.process_index() == 0:
            self._heartbeat_or_warn()  # (a storage hiccup here: the save's own errors follow)
        lost = bool(int(from_process_0(np.int32(self.lost_to is not None))))
        if lost:
            holder = self.lost_to or {}
            raise WorkdirBusy(f"{self.path} was taken over by another run (host {holder.get('host', '?')}, pid "
                              f"{holder.get('pid', '?')}) while this one ran: this host stalled past "
                              f"train.lock_stale_after_s ({self.stale_after_s:.0f} s). Stopped without saving; "
                              "the other run owns the workdir now")

    def release(self) -> None:
        self._stop.set()
        # Only a thread that started: a stop between its creation and its start left a thread whose
        # join raised RuntimeError, which replaced the stop and kept the lock below from being removed.
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=HEARTBEAT_JOIN_S)  # a write stuck in retries: not past a preemption's grace
            if self._thread.is_alive():  # that write holds the guard below for as long as it hangs
                logging.warning("%s: its last refresh is still being written, so it is left for the next run to take "
                                "over as a gone run's lock", self.path)
                self.held = False
                return
        with self._guard:
            try:
                holder = self._read()
                # By its token, not self.held: a stop raised the moment after the create (a SIGTERM
                # between the link into place and `held = True`) left a lock of its own behind.
                if holder is not None and self._is_mine(holder):
                    storage.remove(self.path)
            except OSError as e:  # raised here it would hide the error that ended the run
                logging.warning("could not remove %s (%s): the next run takes it over as a gone run's lock",
                                self.path, e)
            self.held = False

