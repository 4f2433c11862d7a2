"""What the two command-line tools (main.py, convert_torch_ckpt.py) share: usage errors in one
line, stopping on SIGTERM as on Ctrl-C (from their first instruction on), and keeping library noise
that follows an error out of the terminal. Light to import: the tools import it before jax."""

from __future__ import annotations

import os
import signal
import sys
import traceback


# 128 + the signal's number, as a shell reports a process that SIGINT or SIGTERM ended: a scheduler
# sees a stopped job, not a finished one.
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM


class Terminated(BaseException):
    """SIGTERM (a preemption, `kill`): raised where the job is, as Ctrl-C's KeyboardInterrupt is, so
    that what the job finished is kept (and what it half-wrote removed) before it stops."""


_sigterm_received = [False]


def stop_on_sigterm() -> None:
    """Without it a SIGTERM ends the process at once and silently: a sampling job loses the batch
    that had just finished, a conversion leaves its temporary folder. Not for jobs of several
    processes, where jax's preemption service holds SIGTERM."""
    def on_sigterm(*_):
        _sigterm_received[0] = True
        raise Terminated

    signal.signal(signal.SIGTERM, on_sigterm)


def stop_if_terminated() -> None:
    """Raises Terminated again for a SIGTERM already received: the handler raises wherever the
    interpreter is, and where that is a gc callback (jax's) or a __del__, Python prints the
    exception and drops it, and a sampling job of 100,000 images ran on. Loops call this per batch."""
    if _sigterm_received[0]:
        raise Terminated


def stop_cause(stop: BaseException) -> tuple[str, int]:
    """(what stopped the job, its exit status)."""
    if isinstance(stop, KeyboardInterrupt):
        return "interrupted (Ctrl-C)", EXIT_INTERRUPTED
    return "terminated (SIGTERM)", EXIT_TERMINATED


def usage_error(message: str):
    """A command line written wrongly, in one line and a pointer to the help (absl's UsageError prints
    the whole help first, pages above the message)."""
    sys.exit(f"error: {message}\nPass --helpshort or --helpfull to see help on flags.")


_ctrl_c_received = [False]


def on_ctrl_c(*_):
    """Python's own SIGINT handling, and a record of it: the KeyboardInterrupt is raised wherever the
    interpreter is, and where that is a gc callback (jax's, often run while jax imports) Python prints
    it and drops it, and the job ran on; raise_dropped_ctrl_c raises it again."""
    _ctrl_c_received[0] = True
    raise KeyboardInterrupt


def raise_dropped_ctrl_c() -> None:
    """Raises KeyboardInterrupt for a Ctrl-C already received (a tool calls it once its imports are done)."""
    if _ctrl_c_received[0]:
        raise KeyboardInterrupt


def quiet_library_noise(unraisable, previous=sys.__unraisablehook__) -> None:
    """An unraisablehook that drops two kinds of noise and prints the rest:
    - a KeyboardInterrupt or Terminated dropped where Python ignores exceptions (on_ctrl_c and
      stop_on_sigterm record them, and the tool raises them again: their tracebacks say nothing);
    - when a restore fails (a damaged checkpoint, a full disk), the tensorstore reads still in
      flight finish after orbax's event loop has closed, and each one's callback error was printed:
      dozens of identical tracebacks above the one-line error."""
    frames = traceback.extract_tb(unraisable.exc_traceback) if unraisable.exc_traceback else []
    if (unraisable.exc_type is KeyboardInterrupt and _ctrl_c_received[0]) or (
            unraisable.exc_type is Terminated and _sigterm_received[0]):  # raised again later (stop_if_terminated)
        return
    if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
            and frames and frames[-1].name == "_check_closed"):
        return
    previous(unraisable)


def raise_dropped_stops() -> None:
    """A Ctrl-C or SIGTERM that Python dropped (inside jax's gc callback) raised again: before a
    job's work that must not start once it was asked to stop (a conversion's write, a training loop)."""
    raise_dropped_ctrl_c()
    stop_if_terminated()


def handle_ctrl_c_from_the_start() -> None:
    """For a tool's first lines: Ctrl-C recorded (on_ctrl_c) and library noise kept quiet."""
    signal.signal(signal.SIGINT, on_ctrl_c)
    sys.unraisablehook = quiet_library_noise


def exit_without_teardown(message: str, status: int) -> None:
    """Prints `message` and ends the process without the interpreter's teardown: after a failed
    restore, the tensorstore reads still in flight are collected there, and each printed its
    traceback ("Exception ignored in <coroutine ...>") after the error line, hundreds of lines."""
    print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
