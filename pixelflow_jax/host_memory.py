"""Host-memory setting for runs whose JAX devices are the CPU.

XLA:CPU allocates each execution's temporary buffers with malloc and frees them afterwards. glibc
serves large requests with fresh mmap'd pages and hands freed memory back to the kernel, so every
step pays for zero-filling the same megabytes again: on the demos' steps (many buffers of ~1 MB,
such as the block scans' gradient accumulators) keeping them made a step 20-30% faster on a 2-core
machine (README, Training). Raising glibc's mmap and trim thresholds keeps freed buffers
in the process for the next step. The cost is memory: up to TRIM_THRESHOLD bytes of freed heap stay
with the process instead of going back to the system. Accelerator runs keep their buffers on the
device and are left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util

import jax

# mallopt's parameter numbers (glibc malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD = 1 << 30  # requests below 1 GiB come from the heap, so their pages are reused
TRIM_THRESHOLD = 2**31 - 1  # up to ~2 GiB of freed heap is kept for reuse (mallopt takes a C int)


def _glibc_mallopt():
    """glibc's mallopt, or None on a C library without it (macOS, musl): the setting is speed only."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    return getattr(ctypes.CDLL(name), "mallopt", None)


def reuse_freed_buffers_on_cpu() -> bool:
    """Keeps freed host buffers for reuse when the default backend is the CPU; True if set."""
    if jax.default_backend() != "cpu":
        return False
    mallopt = _glibc_mallopt()
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
