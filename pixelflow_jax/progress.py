"""Progress of long jobs (sampling, training, evaluation, conversion), from process 0 only.

On a terminal: a tqdm bar on stderr. Otherwise (logs of a batch job, a pod's worker output): one
log line at most every `log_every_s` seconds and at the end, with the count, the rate and the ETA,
so a log file is not flooded with carriage returns.
"""

from __future__ import annotations

import os
import sys
import time

import jax
from absl import logging

from pixelflow_jax.error_text import described


def say(message: str) -> None:
    """Prints a line of a job's on stdout. A stdout that cannot take it (a redirected log on a full
    disk, a pipe whose reader has gone: `| head`, a closed ssh session's) costs its lines, not the
    job, whose files keep them (metrics.jsonl, inspect.json, eval.json): one warning, and stdout goes
    to /dev/null for the rest of the job (else the lines held back failed again at exit, status 120)."""
    try:
        print(message, flush=True)
    except OSError as e:
        logging.warning("stdout cannot be written (%s): this job's further lines for it are dropped (its files keep "
                        "them)", described(e))
        stdout_to_devnull()


def stdout_to_devnull() -> None:
    try:
        stdout = sys.stdout.fileno()
    except (OSError, ValueError):  # a stream of no file descriptor: replaced instead
        sys.stdout = open(os.devnull, "w")
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stdout)
    finally:
        os.close(devnull)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class Progress:
    """Counts `total` units of work; `update(n)` after each chunk, `close()` at the end (or use it
    as a context manager). `initial` units were done before (a resumed job): the rate and the ETA
    count only this run's work, from the end of its first chunk (which also compiles). `log`
    receives the non-terminal lines (default: absl logging.info)."""

    def __init__(self, total: int, description: str, unit: str = "it", *, initial: int = 0,
                 interactive: bool | None = None, log_every_s: float = 30.0, stream=None, log=None):
        self.total, self.description, self.unit = int(total), description, unit
        self.done, self.initial = int(initial), int(initial)
        self.enabled = jax.process_index() == 0
        self.stream = stream or sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.log_every_s = log_every_s
        self.log = log or (lambda line: logging.info("%s", line))
        self.start = self.last_log = time.perf_counter()
        self.first_chunk_end: tuple[float, int] | None = None  # (time, done)
        self.bar = None
        if self.enabled and self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.initial, desc=description, unit=unit, file=self.stream,
                            dynamic_ncols=True)

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.perf_counter()
        if self.first_chunk_end is None:
            self.first_chunk_end = (now, self.done)
        if now - self.last_log >= self.log_every_s or self.done >= self.total:
            self.last_log = now
            self.log(self.line(now))

    def write(self, message: str) -> None:
        """Prints a line (process 0) without breaking the bar."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            say(message)

    def line(self, now: float | None = None) -> str:
        """'<description>: done/total unit (pct), rate unit/s, ETA m:ss, elapsed m:ss'."""
        now = now or time.perf_counter()
        elapsed = now - self.start
        rate = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        if self.first_chunk_end and self.done > self.first_chunk_end[1] and now > self.first_chunk_end[0]:
            # The first chunk also compiles (minutes for a large model): the rate starts after it.
            rate = (self.done - self.first_chunk_end[1]) / (now - self.first_chunk_end[0])
        elif self.first_chunk_end and self.done < self.total:
            rate = None  # only the first chunk, mostly compilation: no rate to tell yet
        left = self.total - self.done
        eta = format_duration(left / rate) if rate else "?"
        percent = 100 * self.done / self.total if self.total else 100.0
        return (f"{self.description}: {self.done}/{self.total} {self.unit} ({percent:.0f}%), "
                f"{'?' if rate is None else f'{rate:.3g}'} {self.unit}/s, ETA {eta}, "
                f"elapsed {format_duration(elapsed)}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
