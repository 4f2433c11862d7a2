"""When to stop for a preemption (SIGTERM), agreed by every process of the job.

On a pod or a cluster the SIGTERM of a preemption reaches the hosts at different moments (or only
some of them). Each process checks at every step whether the job has reached its preemption sync
point: jax's preemption service (started by jax.distributed.initialize) catches SIGTERM on any
process and makes every process answer True at the same step, so all of them save that step and
stop together. A single process catches SIGTERM itself.

Ctrl-C (SIGINT) stops the same way, saving the step: it is turned into a SIGTERM to this process,
so every process of a job agrees on the step as for a preemption. A second Ctrl-C stops at once,
without saving. So does a hang-up (SIGHUP: the ssh session or terminal the run was started from
closed), which else ended the run at once, losing the steps since its last checkpoint; a run started
under nohup, which ignores SIGHUP, keeps running as nohup asks.

Python lets only the main thread catch signals: train() run in another thread (a notebook's
background training) trains without these handlers, and a Ctrl-C or SIGTERM there saves nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

import jax
from absl import logging

from pixelflow_jax.command_line import HUNG_UP, hang_up_passed_on, takes_over_hang_ups, termination_signal


class PreemptionWatch:
    def __init__(self):
        self.distributed = jax.process_count() > 1
        self.calls = 0  # of reached(): the step count jax's sync point is agreed in (see reached)
        self.requested = False
        self.interrupted = False  # by Ctrl-C rather than a preemption
        self.hung_up = hang_up_passed_on()  # by SIGHUP rather than a preemption (from the run's start-up on)
        self.previous_handlers = {}
        if threading.current_thread() is not threading.main_thread():  # signal.signal would raise ValueError
            logging.warning("training outside the main thread, where Python cannot catch signals: a Ctrl-C or "
                            "SIGTERM saves no step for this run (a rerun resumes from its last checkpoint)")
            return
        self.previous_handlers[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_sigint)
        if takes_over_hang_ups(signal.getsignal(signal.SIGHUP)):  # nohup's SIG_IGN stays
            self.previous_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_sighup)
        if not self.distributed:  # with several processes, jax's own SIGTERM handler must stay
            self.previous_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, self._on_sigterm)

    @property
    def cause(self) -> str:
        if self.hung_up:
            return HUNG_UP
        return "interrupted (Ctrl-C)" if self.interrupted else f"preempted ({termination_signal()[0]})"

    def _on_sigterm(self, *_) -> None:
        self.requested = True

    def _on_sigint(self, *_) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True
        print("\nCtrl-C: saving this step on every process, then stopping (Ctrl-C again: stop now, without saving)",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    def _on_sighup(self, *_) -> None:  # nothing printed: the terminal is gone
        if not (self.hung_up or self.interrupted):
            self.hung_up = True
            os.kill(os.getpid(), signal.SIGTERM)

    def reached(self) -> bool:
        """Whether to save this step and stop; call at every step, on every process. jax counts in
        the numbers it is given, from 0 before the first call: a notice that came before it (a
        SIGTERM while a resumed run compiled) set the sync point to 1, which a resumed run's step
        numbers (301, 302, ...) never met, and the run ignored every later SIGTERM. So the calls
        are counted here, from 1, the same on every process."""
        self.calls += 1
        if self.distributed:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(self.calls)
        return self.requested

    def requested_alone(self) -> bool:
        """Whether a single process has been asked to stop, even after reached() answered for this
        step (the signal came while the step ran): a preview due next would delay the stop. With
        several processes False: only the sync point may decide, so that all stop at one step."""
        return not self.distributed and self.requested

    def close(self) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}
