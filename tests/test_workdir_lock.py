"""One training run owns a workdir: its lock is taken, refreshed, released and taken over exactly
when it should be, locally and in a bucket."""

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, cpu_devices
from pixelflow_jax import storage


def test_a_workdir_has_one_owner_and_a_dead_owners_lock_is_taken_over(tmp_path, caplog):
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock, process_start

    first = WorkdirLock(str(tmp_path), stale_after_s=60)
    first.acquire()
    with pytest.raises(WorkdirBusy, match=rf"is in use by another training run: host {socket.gethostname()}, "
                                          rf"pid {os.getpid()}, started .*delete {tmp_path / LOCK_FILE}"):
        WorkdirLock(str(tmp_path), stale_after_s=60).acquire()
    first.release()
    assert not (tmp_path / LOCK_FILE).exists()

    lock_file = tmp_path / LOCK_FILE
    here, this_process_started = socket.gethostname(), process_start(os.getpid())
    for holder, taken in (({"host": here, "pid": 999999999}, True),  # its process is gone
                          # a restarted container: the holder's pid is now this process, started later
                          ({"host": here, "pid": os.getpid(), "pid_start": this_process_started - 1}, True),
                          ({"host": "elsewhere", "pid": 1, "heartbeat": time.time() - 3600}, True),  # silent
                          ({"host": "elsewhere", "pid": 1, "heartbeat": time.time()}, False),  # alive
                          # another container with this hostname: its pids are not ours (pid 1 here is
                          # not its pid 1), so its heartbeat decides: one that missed two refreshes is gone
                          ({"host": here, "pid": os.getpid(), "pid_start": this_process_started,
                            "pid_namespace": "pid:[1]", "heartbeat": time.time() - 2 * 60 - 11}, True),
                          ({"host": here, "pid": 999999999, "pid_namespace": "pid:[1]",
                            "heartbeat": time.time() - 60}, False)):  # was taken over: two runs in one workdir
        lock_file.write_text(json.dumps(holder))
        lock = WorkdirLock(str(tmp_path), stale_after_s=600)
        if taken:
            lock.acquire()
            assert json.loads(lock_file.read_text())["pid"] == os.getpid()
            assert f"taking over {lock_file} from a run that is gone: host {holder['host']}" in caplog.text
            lock.release()
        else:
            with pytest.raises(WorkdirBusy, match=f"host {holder['host']}, pid {holder['pid']}"):
                lock.acquire()
    # A holder refreshing every 60 s is not judged by this run's shorter limit (30 s), and the error
    # says when a gone holder's lock is taken over.
    lock_file.write_text(json.dumps({"host": "elsewhere", "pid": 1, "heartbeat_period_s": 60,
                                     "heartbeat": time.time() - 100}))
    with pytest.raises(WorkdirBusy, match=r"heartbeat 100 s ago\).*its lock is taken over once its heartbeat is 130 s "
                                          r"old \(rerun then\)"):
        WorkdirLock(str(tmp_path), stale_after_s=30).acquire()


def test_an_unreadable_lock_is_stale_after_a_minute_and_a_lock_is_never_written_empty(tmp_path, monkeypatch):
    """A start killed between creating its lock and writing it left an empty train.lock, which
    blocked the workdir for ever ("another run is starting right now")."""
    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, UNREADABLE_STALE_S, WorkdirBusy, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    lock_file.write_bytes(b"")
    with pytest.raises(WorkdirBusy, match="starting in this workdir right now"):
        WorkdirLock(str(tmp_path), stale_after_s=600).acquire()  # fresh: maybe a start writing it
    old = time.time() - UNREADABLE_STALE_S - 5
    os.utime(lock_file, (old, old))
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    lock.release()

    def killed_while_writing(fd, data):
        raise KeyboardInterrupt

    def no_hard_links(source, target):  # gcsfuse, s3fs, blobfuse
        raise OSError(38, "Function not implemented")

    with monkeypatch.context() as patch:
        patch.setattr(workdir_lock.os, "link", no_hard_links)
        lock = WorkdirLock(str(tmp_path), stale_after_s=600)
        lock.acquire()
        assert json.loads(lock_file.read_text())["pid"] == os.getpid()
        with pytest.raises(WorkdirBusy):
            WorkdirLock(str(tmp_path), stale_after_s=600).acquire()
        lock.release()

    monkeypatch.setattr(workdir_lock.os, "fdopen", killed_while_writing)
    with pytest.raises(KeyboardInterrupt):
        WorkdirLock(str(tmp_path), stale_after_s=600).acquire()
    assert not lock_file.exists()  # only a temporary, named as storage.remove_temporaries clears them


@pytest.mark.parametrize("left", ["by a gone run", "unreadable"])
def test_a_left_lock_this_user_may_not_delete_is_refused_naming_its_owner(tmp_path, monkeypatch, caplog, left):
    """A shared folder with the sticky bit (chmod 1777, as group scratch folders often are): another
    user's lock left there by a killed run cannot be deleted by this user. The run stopped with a bare
    'PermissionError: [Errno 1] Operation not permitted' after warning that it was taking the lock over."""
    import errno
    import pwd

    from pixelflow_jax.training.workdir_lock import LOCK_FILE, UNREADABLE_STALE_S, WorkdirBusy, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    if left == "by a gone run":
        lock_file.write_text(json.dumps({"host": socket.gethostname(), "pid": 999999999}))
        left_by = f"a training run that is gone (host {socket.gethostname()}, pid 999999999)"
    else:
        lock_file.write_bytes(b"")
        old = time.time() - UNREADABLE_STALE_S - 5
        os.utime(lock_file, (old, old))
        left_by = "a start killed while writing it"
    os.chmod(tmp_path, 0o1777)
    real_remove = os.remove

    def owners_only(path, *args, **kwargs):  # what the sticky bit does to a user who does not own the lock
        if os.fspath(path) == str(lock_file):
            raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), os.fspath(path))
        return real_remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", owners_only)
    owner = f"{pwd.getpwuid(os.getuid()).pw_name} (uid {os.getuid()})"
    if os.geteuid() == 0:  # the lock of another owner than its folder's: the lock's owner is the one named
        os.chown(lock_file, 4242, 4242)
        owner = "uid 4242"
    with caplog.at_level(logging.WARNING), pytest.raises(WorkdirBusy) as refused:
        WorkdirLock(str(tmp_path), stale_after_s=600).acquire()
    assert str(refused.value) == (
        f"{lock_file} was left by {left_by}, but this user cannot delete it (Operation not permitted): it belongs to "
        f"{owner}, and {tmp_path} has the sticky bit: only a file's owner (or the folder's) may delete it. Ask them "
        f"to delete it, or use another --workdir")
    assert "taking over" not in caplog.text and "removed" not in caplog.text  # nothing was taken over
    assert lock_file.exists()


def test_a_stop_the_moment_after_the_lock_is_written_still_releases_it(tmp_path, monkeypatch):
    """A SIGTERM that landed between the lock's link into place and the run's note that it held it
    left train.lock behind (seen as 1 failure in ~50 runs of test_main's SIGTERM-while-a-training-
    run-starts test under load): a restart elsewhere was refused for train.lock_stale_after_s."""
    from pixelflow_jax.command_line import Terminated
    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirLock

    real_create = workdir_lock.storage.create_file

    def created_then_stopped(path, data):
        assert real_create(path, data)
        raise Terminated

    monkeypatch.setattr(workdir_lock.storage, "create_file", created_then_stopped)
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    try:  # as train() holds it: acquired inside the try whose finally releases
        with pytest.raises(Terminated):
            lock.acquire()
    finally:
        lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_stop_before_the_locks_heartbeat_thread_starts_still_releases_the_lock(tmp_path, monkeypatch):
    """A stop between the heartbeat thread's creation and its start: release() joined the thread
    that never started, whose RuntimeError ("cannot join thread before it is started") replaced
    the stop and left train.lock behind."""
    import threading

    from pixelflow_jax.command_line import Terminated
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirLock

    real_start = threading.Thread.start

    def stopped_before_the_heartbeat_starts(thread):
        if thread.name == "workdir-lock-heartbeat":
            raise Terminated
        real_start(thread)

    monkeypatch.setattr(threading.Thread, "start", stopped_before_the_heartbeat_starts)
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    with pytest.raises(Terminated):
        try:  # as train() holds it
            lock.acquire()
        finally:
            lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_lock_is_refreshed_by_a_thread_and_a_run_whose_lock_was_taken_over_stops(tmp_path):
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    lock = WorkdirLock(str(tmp_path), stale_after_s=10)  # refreshed every second
    lock.acquire()
    first = json.loads(lock_file.read_text())["heartbeat"]
    deadline = time.time() + 30
    while json.loads(lock_file.read_text())["heartbeat"] == first and time.time() < deadline:
        time.sleep(0.2)
    assert json.loads(lock_file.read_text())["heartbeat"] > first  # no training step needed
    lock.check_held()
    from pixelflow_jax.training import workdir_lock

    lock.release()  # its thread stopped, the beats below are this test's
    lock = WorkdirLock(str(tmp_path), stale_after_s=10)
    lock.acquire()
    lock._stop.set()
    real_write = workdir_lock.storage.write_json_atomically

    def unavailable(path, value):
        raise OSError("503 Service Unavailable")

    workdir_lock.storage.write_json_atomically = unavailable
    try:
        with pytest.raises(OSError, match="503"):
            lock.heartbeat()  # the thread logs it and beats again
    finally:
        workdir_lock.storage.write_json_atomically = real_write
    lock.heartbeat()
    lock.check_held()  # a missed beat is no takeover
    rival = {"host": "elsewhere", "pid": 7, "heartbeat": time.time()}
    real_write(str(lock_file), rival)  # it judged this run gone and took over
    lock.heartbeat()
    assert json.loads(lock_file.read_text()) == rival and not lock.held  # not overwritten, and no longer held
    with pytest.raises(WorkdirBusy, match="taken over by another run \\(host elsewhere, pid 7\\).*without saving"):
        lock.check_held()
    lock.release()
    assert json.loads(lock_file.read_text()) == rival  # not removed either


def test_a_lock_whose_create_was_refused_after_it_landed_is_held_and_a_lost_lock_stops_the_next_save(
        tmp_path, monkeypatch):
    """A bucket client retries an upload whose response was lost, and the create-only retry is
    refused because the first attempt landed: the lock is this run's, held and released. And a
    run whose lock another run replaced since the last heartbeat is stopped before it saves."""
    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    real_create = workdir_lock.storage.create_file

    def landed_but_refused(path, data):
        assert real_create(path, data)
        return False

    monkeypatch.setattr(workdir_lock.storage, "create_file", landed_but_refused)
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    assert lock.held
    lock.release()
    assert not lock_file.exists()
    monkeypatch.undo()

    lock = WorkdirLock(str(tmp_path), stale_after_s=600)  # refreshed every 60 s: no beat in this test
    lock.acquire()
    rival = {"host": "elsewhere", "pid": 7, "heartbeat": time.time()}
    workdir_lock.storage.write_json_atomically(str(lock_file), rival)
    lock.check_held()  # a logged step trusts the last heartbeat
    with pytest.raises(WorkdirBusy, match="taken over by another run \\(host elsewhere, pid 7\\)"):
        lock.check_held(read_now=True)  # a save reads the lock first
    lock.release()
    assert json.loads(lock_file.read_text()) == rival


def test_a_lock_in_a_bucket_is_created_only_if_absent_even_when_a_rival_slips_in(bucket, monkeypatch):
    """In a bucket the lock is one create-only upload (ifGenerationMatch=0): a rival run whose lock
    lands between this run's existence check and its upload keeps it, and this run backs off."""
    import fsspec

    from pixelflow_jax import storage
    from pixelflow_jax.training.workdir_lock import LOCK_FILE

    path = f"{bucket}/run/{LOCK_FILE}"
    assert storage.create_file(path, b"first") and not storage.create_file(path, b"second")
    assert storage.read_bytes(path) == b"first"

    contested = f"{bucket}/contested/{LOCK_FILE}"
    fs, _ = fsspec.core.url_to_fs(contested)  # fsspec's cached instance: the one the lock will use
    checks, real_exists = [], fs.exists

    def absent_at_the_first_check(key, **kwargs):
        checks.append(key)
        return len(checks) > 1 and real_exists(key, **kwargs)

    monkeypatch.setattr(fs, "exists", absent_at_the_first_check)
    storage.write_atomically(contested, b"rival")  # lands after this run's check (which will say "absent")
    assert not storage.create_file(contested, b"mine")
    assert len(checks) == 2 and storage.read_bytes(contested) == b"rival"


def test_a_second_training_on_a_busy_workdir_stops_at_once(tmp_path):
    from pixelflow_jax.training.workdir_lock import LOCK_FILE

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                  "started": "2026-11-27T05:00:00+00:00"}))
    env = {**os.environ, "XLA_FLAGS": cpu_devices(1, one_process=False)}
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "is in use by another training run" in result.stderr
    assert f"pid {os.getpid()}, started 2026-11-27T05:00:00+00:00" in result.stderr
    assert sorted(os.listdir(tmp_path)) == [LOCK_FILE]  # nothing written


def test_a_log_write_that_fails_is_one_error_and_the_lock_release_never_hides_it(tmp_path, monkeypatch, caplog):
    from pixelflow_jax.training.metrics_log import MetricsLog
    from pixelflow_jax.training.workdir_lock import WorkdirLock

    log = MetricsLog(str(tmp_path), resumed_step=0)
    (tmp_path / "metrics.jsonl").mkdir()  # not writable as a file, even for root
    record = {"step": 1, "loss": 0.5, "grad_norm": 1.0, "images_per_s": 10.0, "skipped_steps": 0}
    with pytest.raises(storage.StorageError, match=r"cannot write .*metrics.jsonl \(IsADirectoryError: .*rerun the "
                                                   "same command: it resumes from its latest checkpoint"):
        log.write(record)
    log.close()

    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()

    def cannot_remove(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(storage, "remove", cannot_remove)
    with caplog.at_level(logging.WARNING):
        lock.release()  # in a finally block: raising here would replace the run's own error
    assert "could not remove" in caplog.text and "Permission denied" in caplog.text and not lock.held


def test_a_lock_copied_with_its_workdir_is_taken_over_on_the_same_host(tmp_path, caplog):
    """cp -a of a running run's workdir: the copy's lock names a live run (this process) working in
    the original folder, so the copy could never be resumed while that run went on."""
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    (tmp_path / "original").mkdir()
    (tmp_path / "copy").mkdir()
    original = WorkdirLock(str(tmp_path / "original"), stale_after_s=600)
    original.acquire()
    try:
        shutil.copy(tmp_path / "original" / LOCK_FILE, tmp_path / "copy" / LOCK_FILE)
        with pytest.raises(WorkdirBusy):  # the original folder stays locked
            WorkdirLock(str(tmp_path / "original"), stale_after_s=600).acquire()
        copy = WorkdirLock(str(tmp_path / "copy"), stale_after_s=600)
        with caplog.at_level(logging.WARNING):
            copy.acquire()
        assert copy.held and "a copy of the lock of " + str(tmp_path / "original") in caplog.text
        copy.release()
        # One folder under two paths (a bind mount, an export mounted twice) is not a copy.
        lock = tmp_path / "original" / LOCK_FILE
        lock.write_text(json.dumps({**json.loads(lock.read_text()),  # (pathlib would drop the "/.")
                                    "workdir": os.path.join(str(tmp_path / "original"), ".")}))
        with pytest.raises(WorkdirBusy):
            WorkdirLock(str(tmp_path / "original"), stale_after_s=600).acquire()
    finally:
        original.release()


def test_a_lock_whose_folder_is_gone_is_a_copy_and_another_hosts_lock_is_judged_by_its_heartbeat(tmp_path):
    """A workdir copied (or moved) away from a live run's folder that is gone since: its lock
    names a live process of this host, yet its run no longer works there. Another host's lock
    names its own mount point of a shared folder, which proves nothing here: taken over as a
    copy, two runs would train in one workdir. And such a gone holder is taken over once its
    heartbeat is older than this run's lock_stale_after_s, not only after two of its refreshes."""
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    mine = WorkdirLock(str(tmp_path), stale_after_s=600).record  # this process: alive
    lock_file.write_text(json.dumps({**mine, "workdir": str(tmp_path / "gone")}))
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    assert lock.held and json.loads(lock_file.read_text())["token"] == lock.record["token"]
    lock.release()

    stale_after_s = 100.0
    other_host = {**WorkdirLock(str(tmp_path), stale_after_s=stale_after_s).record, "host": "elsewhere",
                  "workdir": "/mnt/shared/run"}  # its mount point of this folder
    lock_file.write_text(json.dumps(other_host))
    with pytest.raises(WorkdirBusy, match="host elsewhere") as busy:
        WorkdirLock(str(tmp_path), stale_after_s=stale_after_s).acquire()
    # A run copied off that host (tar, rsync) brings its lock: the message names the folder it was taken in.
    assert str(busy.value).endswith(f". That run works in /mnt/shared/run on its host: if this folder is a copy of "
                                    f"that one (its lock came along), delete {lock_file} and rerun")
    lock_file.write_text(json.dumps({**other_host, "heartbeat": time.time() - stale_after_s + 10}))
    with pytest.raises(WorkdirBusy, match="host elsewhere"):  # past two of its refreshes (30 s), not past 100 s
        WorkdirLock(str(tmp_path), stale_after_s=stale_after_s).acquire()
    lock_file.write_text(json.dumps({**other_host, "heartbeat": time.time() - stale_after_s - 10}))
    lock = WorkdirLock(str(tmp_path), stale_after_s=stale_after_s)
    lock.acquire()
    assert lock.held
    lock.release()


@pytest.mark.parametrize("holder_job, holder_restart, my_restart, taken", [
    ("4242", 0, "1", True),  # the run before the requeue, on a node that failed
    ("4242", 1, "3", True),
    ("4242", 0, None, False),  # another srun step of this job's own run, working on one workdir
    ("4242", 1, "1", False),
    ("4242", 2, "1", False),
    ("4243", 0, "1", False),  # another job
    (None, None, "1", False),  # a run outside Slurm
])
def test_a_requeued_slurm_jobs_earlier_run_leaves_a_lock_taken_over_at_once_on_any_host(
        tmp_path, monkeypatch, caplog, holder_job, holder_restart, my_restart, taken):
    """Slurm requeues a job (its node failed, or a preemption) only once its earlier run has ended:
    that run's lock, fresh as its heartbeat may be on another host, is stale. Any other holder waits
    out its heartbeat as before."""
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    holder = {**WorkdirLock(str(tmp_path), stale_after_s=600).record, "host": "node-a", "pid": 1}
    if holder_job is not None:
        holder.update(slurm_job=holder_job, slurm_restart=holder_restart)
    (tmp_path / LOCK_FILE).write_text(json.dumps(holder))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if my_restart is not None:
        monkeypatch.setenv("SLURM_RESTART_COUNT", my_restart)
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    if not taken:
        with pytest.raises(WorkdirBusy, match="host node-a"):
            lock.acquire()
        return
    with caplog.at_level(logging.WARNING):
        lock.acquire()
    assert lock.held and json.loads((tmp_path / LOCK_FILE).read_text())["slurm_restart"] == int(my_restart)
    assert f"from this Slurm job's run before its requeue (job 4242, restart {holder_restart}; host node-a" in caplog.text
    lock.release()


def test_a_busy_message_asks_about_a_copy_only_for_another_hosts_lock_naming_another_folder(tmp_path):
    """This host's live run in this folder under another of its names (a bind mount) is no copy;
    another host's run recorded under this folder's own path is not 'in another folder'."""
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    (tmp_path / "sub").mkdir()
    lock_file = tmp_path / LOCK_FILE
    live = WorkdirLock(str(tmp_path), stale_after_s=600).record  # this process: alive, this host
    unrecorded = {key: value for key, value in live.items() if key != "workdir"}  # a lock that names no folder
    for holder in ({**live, "workdir": f"{tmp_path}/sub/.."}, {**live, "host": "elsewhere"},
                   {**unrecorded, "host": "elsewhere"}):
        lock_file.write_text(json.dumps(holder))
        with pytest.raises(WorkdirBusy) as busy:
            WorkdirLock(str(tmp_path), stale_after_s=600).acquire()
        assert str(busy.value).endswith(f"delete {lock_file}") and "That run works in" not in str(busy.value)


def test_the_lock_is_refreshed_ten_times_per_stale_period_within_1_to_60_s():
    from pixelflow_jax.training.workdir_lock import heartbeat_period

    assert [heartbeat_period(s) for s in (5, 100, 300, 6000)] == [1.0, 10.0, 30.0, 60.0]


def test_only_the_process_holding_the_lock_runs_its_heartbeat_thread(tmp_path, monkeypatch):
    from pixelflow_jax.training import workdir_lock

    monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 1)  # process 0 took it: nothing to refresh here
    lock = workdir_lock.WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    assert not lock.held and lock._thread is None


def test_a_run_that_lost_its_lock_never_removes_the_new_owners_and_a_removed_lock_is_written_again(tmp_path):
    """A run whose lock another run took over (it stalled) and that ends before its next beat must
    leave the new owner's lock: removed, a third run could start in the workdir. And a lock file
    removed under a live run (by hand) is no takeover: its next beat writes it again, and the run
    goes on refreshing it."""
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)  # refreshed every 60 s: no beat in this test
    lock.acquire()
    rival = {"host": "elsewhere", "pid": 7, "heartbeat": time.time()}
    storage.write_json_atomically(str(lock_file), rival)
    lock.release()
    assert json.loads(lock_file.read_text()) == rival

    lock_file.unlink()
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    try:
        lock_file.unlink()
        lock.heartbeat()
        assert lock.held and json.loads(lock_file.read_text())["token"] == lock.record["token"]
        lock.check_held(read_now=True)
    finally:
        lock.release()
    lock.heartbeat()  # a beat after the release (the thread's last, racing it) writes no lock again
    assert not lock_file.exists()


def test_a_process_start_time_is_read_from_proc_even_when_its_name_holds_parentheses(tmp_path):
    """process_start tells a live holder from a process that reuses its pid (a restarted
    container): a wrong field of /proc/PID/stat (an always-0 one, or the memory size, which
    changes) either never sees the reuse or takes a live run's lock over. The process name comes
    before the fields and may hold ") ", so the fields are counted from its last ")"."""
    from pixelflow_jax.training.workdir_lock import process_start

    ticks = os.sysconf("SC_CLK_TCK")
    named = tmp_path / "a) b c"
    named.symlink_to(shutil.which("sleep"))
    with open("/proc/uptime") as f:
        spawned_at = float(f.read().split()[0])  # seconds since boot
    child = subprocess.Popen([str(named), "30"])
    try:
        def name() -> str:
            with open(f"/proc/{child.pid}/comm") as f:
                return f.read()

        deadline = time.time() + 10  # the kernel names the process a moment after Popen returns
        while ") b c" not in name() and time.time() < deadline:
            time.sleep(0.01)
        assert ") b c" in name()
        assert abs(process_start(child.pid) / ticks - spawned_at) < 5
        assert process_start(child.pid) > process_start(os.getpid())  # started after this test's process
    finally:
        child.kill()
        child.wait()


def test_proc_that_cannot_be_read_gives_no_pid_namespace_nor_start_and_a_live_pid_keeps_its_lock(tmp_path,
                                                                                                   monkeypatch):
    """/proc unreadable (a sandbox refuses the namespace link) or a stat line cut short: unknown,
    not an error; a live holder of this host whose start time cannot be read now is no reused pid."""
    import io

    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    def refused(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(workdir_lock.os, "readlink", refused)
    assert workdir_lock.pid_namespace() is None
    for stat in ("4242 (name", "4242 (name) S 1 2"):  # no ")", too few fields
        monkeypatch.setattr(workdir_lock, "open", lambda path, text=stat: io.StringIO(text), raising=False)
        assert workdir_lock.process_start(4242) is None, stat

    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "pid_start": 1}))
    with pytest.raises(WorkdirBusy, match=f"pid {os.getpid()}"):
        WorkdirLock(str(tmp_path), stale_after_s=600).acquire()


def test_process_0s_outcome_decides_on_every_process(tmp_path, monkeypatch):
    """Another process learns from process 0 that the workdir is busy or its lock was taken over,
    though it read no lock itself (it would train on alone, or wait for the others for ever)."""
    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import WorkdirBusy, WorkdirLock

    monkeypatch.setattr(workdir_lock.jax, "process_index", lambda: 1)
    monkeypatch.setattr(workdir_lock, "from_process_0", lambda value: np.int32(1))
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    with pytest.raises(WorkdirBusy, match=r"the workdir is in use by another run \(see process 0's error\)"):
        lock.acquire()
    with pytest.raises(WorkdirBusy, match=r"taken over by another run \(host \?, pid \?\)"):
        lock.check_held()


def test_any_error_taking_the_lock_is_a_busy_workdir_and_a_lock_that_keeps_vanishing_is_a_start(tmp_path,
                                                                                                  monkeypatch):
    """A storage client's own error (not an OSError) stops every process with it, none waits; a lock
    that exists at each create but is gone at each read is another run starting, and so is a lock
    file of JSON that is no object."""
    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    def client_error(path, data):
        raise RuntimeError("bucket said no")

    with monkeypatch.context() as patch:
        patch.setattr(workdir_lock.storage, "create_file", client_error)
        with pytest.raises(WorkdirBusy, match="cannot take the workdir lock: RuntimeError: bucket said no"):
            WorkdirLock(str(tmp_path), stale_after_s=600).acquire()
    with monkeypatch.context() as patch:
        patch.setattr(workdir_lock.storage, "create_file", lambda path, data: False)
        lock = WorkdirLock(str(tmp_path), stale_after_s=600)
        with pytest.raises(WorkdirBusy, match="another run is starting in this workdir right now"):
            lock.acquire()
        assert not lock.held
    (tmp_path / LOCK_FILE).write_text("[1, 2]")
    with pytest.raises(WorkdirBusy, match="another run is starting in this workdir right now"):
        WorkdirLock(str(tmp_path), stale_after_s=600).acquire()


@pytest.mark.parametrize("left, rival_writes", [
    ("", {"host": "elsewhere", "pid": 8}),  # an old unreadable lock, replaced by a live run's
    ("", ""),  # an old unreadable lock, replaced by a run starting (unreadable, but new)
    ({"host": "elsewhere", "pid": 7, "heartbeat": 0}, {"host": "elsewhere", "pid": 8}),  # a stale holder's
])
def test_a_lock_another_run_takes_over_between_two_reads_is_left_to_it(tmp_path, monkeypatch, left, rival_writes):
    """A stale lock is read again before its removal: a run that took it over meanwhile keeps its own."""
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirBusy, WorkdirLock

    lock_file = tmp_path / LOCK_FILE
    lock_file.write_text(json.dumps(left) if left else "")
    old = time.time() - 3600
    os.utime(lock_file, (old, old))
    reads, real_read = [], WorkdirLock._read

    def rival_between_reads(self):
        reads.append(1)
        if len(reads) == 2:  # the read again before the removal
            lock_file.write_text(json.dumps({**rival_writes, "heartbeat": time.time()}) if rival_writes else "")
        return real_read(self)

    monkeypatch.setattr(WorkdirLock, "_read", rival_between_reads)
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    with pytest.raises(WorkdirBusy, match="pid 8" if rival_writes else "starting in this workdir right now"):
        lock.acquire()
    assert (json.loads(lock_file.read_text())["pid"] if rival_writes else lock_file.read_text()) == \
        (8 if rival_writes else "")  # the rival's lock, untouched


def test_the_heartbeat_thread_beats_on_after_a_failed_write(tmp_path, monkeypatch):
    """A storage hiccup is logged and the next beat tries again: raised in the thread, it ended the
    refreshes, and the live run's lock went stale for another run to take over."""
    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import WorkdirLock

    real_write, writes = workdir_lock.storage.write_json_atomically, []

    def first_write_fails(path, value):
        writes.append(path)
        if len(writes) == 1:
            raise OSError("503 Service Unavailable")
        real_write(path, value)

    monkeypatch.setattr(workdir_lock, "heartbeat_period", lambda stale_after_s: 0.01)
    monkeypatch.setattr(workdir_lock.storage, "write_json_atomically", first_write_fails)
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    try:
        deadline = time.time() + 10
        while len(writes) < 2 and time.time() < deadline:
            time.sleep(0.01)
    finally:
        lock.release()
    assert len(writes) >= 2


def test_a_release_waits_for_a_stuck_heartbeat_no_longer_than_its_limit(tmp_path, monkeypatch, caplog):
    """A beat whose write hangs in a storage client's retries holds the lock's guard: release()
    stopped waiting for the thread after its limit, then waited for the guard as long as the
    write hung, past a preemption's grace. The lock is left, taken over later as a gone run's."""
    import threading

    from pixelflow_jax.training import workdir_lock
    from pixelflow_jax.training.workdir_lock import LOCK_FILE, WorkdirLock

    stuck, unstuck = threading.Event(), threading.Event()

    def hanging_write(path, value):
        stuck.set()
        unstuck.wait(30)

    monkeypatch.setattr(workdir_lock, "heartbeat_period", lambda stale_after_s: 0.01)
    monkeypatch.setattr(workdir_lock, "HEARTBEAT_JOIN_S", 0.1)
    lock = WorkdirLock(str(tmp_path), stale_after_s=600)
    lock.acquire()
    monkeypatch.setattr(workdir_lock.storage, "write_json_atomically", hanging_write)
    try:
        assert stuck.wait(10)
        release = threading.Thread(target=lock.release)
        with caplog.at_level(logging.WARNING):
            release.start()
            release.join(5)
        assert not release.is_alive() and not lock.held
        assert f"{tmp_path / LOCK_FILE}: its last refresh is still being written" in caplog.text
    finally:
        unstuck.set()
