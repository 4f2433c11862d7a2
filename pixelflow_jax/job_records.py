"""The line each started job appends to its workdir's log of jobs (samples/sampling_runs.jsonl,
training_runs.jsonl): when it ran, the command that started it, from which folder, what it read
and with which software and devices (software_versions.py). A number read from the workdir later
is then traced to the jobs that produced it, also after a rerun with other flags or on another
machine. Process 0 appends for the job; a failure stops every process together."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys

from pixelflow_jax import storage
from pixelflow_jax.multihost import write_on_process_0
from pixelflow_jax.software_versions import job_environment


def command_line() -> str:
    """This process's command, quoted as a shell would take it back (a job started from Python, a
    notebook or a test, names that program's command)."""
    return shlex.join([os.path.basename(sys.executable), *sys.argv])


def config_record(config) -> dict:
    """{"config": every field of the job's config, "config_fingerprint": a short hash of them}: two
    jobs of one fingerprint ran the same config, whatever files and flags it came from."""
    fields = json.loads(json.dumps(config.to_dict(), sort_keys=True, default=str))
    fingerprint = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]
    return {"config_fingerprint": fingerprint, "config": fields}


def job_record(fields: dict) -> dict:
    """`fields` with the time, the command, its working folder (relative paths in the command are
    relative to it) and the job's environment."""
    return {"time": storage.utc_now(), "command": command_line(), "cwd": os.getcwd(), **fields,
            "environment": job_environment()}


def append_job_record(path: str, fields: dict, rerun: str) -> None:
    """Appends job_record(fields) to `path` on process 0. A write that fails (a full disk, a folder
    in its place) is a StorageError naming `path`, the fix and `rerun` (what a rerun then does), and
    stops every other process with it: one process stopping alone left the others waiting in their
    next collective."""
    write_on_process_0(path, rerun, lambda path: storage.append_json_line(path, job_record(fields)),
                       doing="recording the job in")
