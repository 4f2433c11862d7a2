"""When to stop for a preemption (SIGTERM), agreed by every process of the job.

On a pod or a cluster the SIGTERM of a preemption reaches the hosts at different moments (or only
some of them). Each process checks at every step whether the job has reached its preemption sync
point: jax's preemption service (started by jax.distributed.initialize) catches SIGTERM on any
process and makes every process answer True at the same step, so all of them save that step and
stop together. A single process catches SIGTERM itself.
"""

from __future__ import annotations

import signal

import jax


class PreemptionWatch:
    def __init__(self):
        self.distributed = jax.process_count() > 1
        self.requested = False
        self.previous_handler = None
        if not self.distributed:  # with several processes, jax's own SIGTERM handler must stay
            self.previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_) -> None:
        self.requested = True

    def reached(self, step: int) -> bool:
        """Whether to save `step` and stop; call at every step, on every process."""
        if self.distributed:
            from jax.experimental import multihost_utils

            return multihost_utils.reached_preemption_sync_point(step)
        return self.requested

    def close(self) -> None:
        if self.previous_handler is not None:
            signal.signal(signal.SIGTERM, self.previous_handler)
            self.previous_handler = None
