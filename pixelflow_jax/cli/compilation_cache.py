"""The persistent cache of compiled XLA programs for main.py's jobs of one process: a resume or a
sampling job loads what the last job compiled instead of compiling it again (minutes on XL)."""

from __future__ import annotations

import os

from absl import logging


# The local cache of compiled programs: an LRU of this size, and programs that took this long to
# compile (the demo's sampling stages take ~0.5 s; jax's default, 1 s, would leave them out).
COMPILATION_CACHE_BYTES, COMPILATION_CACHE_MIN_COMPILE_S = 4 * 2**30, 0.2


def keep_compiled_programs(on_cpu: bool) -> None:
    """The persistent compilation cache, for jobs of one process: in a job of several, a process
    that loads a program while its peers still compile it waits in its first collective, past
    gloo's timeout on CPU; those jobs set JAX_COMPILATION_CACHE_DIR themselves. On CPUs only when
    asked: XLA:CPU rejects its cached programs on some processors (an error line per program, jax
    issue 38445), and a resume on several CPU devices hung in their collectives once loaded."""
    import jax

    from pixelflow_jax import storage

    if jax.config.jax_compilation_cache_dir or (jax.default_backend() == "cpu" and not on_cpu):
        return
    try:
        folder = storage.cache_dir("xla")
    except storage.StorageError as e:  # no home folder: the job runs as well without
        logging.info("compiled programs are not kept: %s", e)
        return
    try:
        os.makedirs(folder, exist_ok=True)
        writable = os.access(folder, os.W_OK)
    except OSError:
        writable = False
    if not writable:  # jax would warn at every program; the job runs as well without
        logging.info("compiled programs are not kept: %s cannot be written", folder)
        return
    jax.config.update("jax_compilation_cache_dir", folder)
    for variable, value in (("JAX_COMPILATION_CACHE_MAX_SIZE", COMPILATION_CACHE_BYTES),
                            ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", COMPILATION_CACHE_MIN_COMPILE_S)):
        if variable not in os.environ:  # the user's own settings stay
            jax.config.update(variable.lower(), value)
