"""How a job of main.py ends after an error or a stop: at once, without the interpreter's teardown,
and in a job of several processes (--distributed) so that the others stop too instead of waiting
for it, with one line that says a process is gone where a collective failed for that. Light to
import (no jax): it also ends the jobs whose flags were wrong."""

from __future__ import annotations

import os
import re
import sys
import time

from absl import logging

EXIT_GRACE_S = 3  # process 0 hosts jax's coordination service: its exit stops every other process


# How a collective fails once another process of the job is gone (killed, or stopped by its own
# error): gloo's broken connection on CPU (XLA names the collective: 'Gloo all-reduce failed', 'Gloo
# collective permute failed'), the coordination service's missed heartbeats elsewhere.
PEER_GONE = re.compile(r"Gloo [\w -]+ failed|Connection reset by peer|stopped sending heartbeats|unhealthy|"
                       r"another task")


def another_process_gone(error: Exception) -> str | None:
    """The error line for a collective of a --distributed job that failed because another process
    is gone (its traceback says nothing: the other process's error is the one to read); None for
    any other error."""
    jax = sys.modules.get("jax")
    if not (jax is not None and jax.distributed.is_initialized() and type(error).__name__ == "JaxRuntimeError"
            and PEER_GONE.search(str(error))):
        return None
    from pixelflow_jax.error_text import first_line

    return (f"error: another process of this job is gone, so this one stops too (that process's log says why; "
            f"here: {first_line(error)})")


class StoppedTogether(SystemExit):
    """The exit of a preempted or interrupted training run: every process saved the same step and
    leaves with this status, so jax's shutdown barrier finds them all."""


def process_index_or_none(jax) -> int | None:
    """jax.process_index(), or None where asking fails (the error being handled may be the
    backend's own failure to start)."""
    try:
        return jax.process_index()
    except Exception:
        return None


def exit_now_after_an_error(stop: SystemExit):
    """Ends a run that failed without the interpreter's teardown.

    One process: the teardown could wait minutes (orbax's threads of a failed save wait out their
    own timeouts) and print tracebacks after the error line (tensorstore callbacks of reads still
    in flight). Several processes: one that failed alone waited forever in jax's shutdown barrier
    while the others waited for it in their next collective. Exiting at once instead, it makes them
    stop too: at once where the collective's connection closes (CPU), else when jax's coordination
    service misses its heartbeats (about 100 s), with jax's "another task died" error; the failed
    process's error line is the one to read. Process 0 waits a few seconds first, so that processes
    failing with it print their own errors. A training run that stopped on every process at one
    step (StoppedTogether: preempted, or Ctrl-C turned into the same stop) exits normally; other
    stops (a Ctrl-C that reached one host) may be one process's alone."""
    jax = sys.modules.get("jax")  # not imported for a flag error: nothing to shut down, nothing to start
    distributed = jax is not None and jax.distributed.is_initialized()
    if stop.code in (None, 0) or (distributed and isinstance(stop, StoppedTogether)):
        raise stop
    if isinstance(stop.code, str):
        print(stop.code, file=sys.stderr)
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    if distributed and process_index_or_none(jax) == 0:
        time.sleep(EXIT_GRACE_S)
    os._exit(stop.code if isinstance(stop.code, int) else 1)
