"""The persistent cache of compiled XLA programs for main.py's jobs of one process: a resume or a
sampling job loads what the last job compiled instead of compiling it again (minutes on XL)."""

from __future__ import annotations

import contextlib
import glob
import importlib
import os
import re
import warnings

from absl import logging


# The local cache of compiled programs: an LRU of this size, and programs that took this long to
# compile (the demo's sampling stages take ~0.5 s; jax's default, 1 s, would leave them out).
COMPILATION_CACHE_BYTES, COMPILATION_CACHE_MIN_COMPILE_S = 4 * 2**30, 0.2

# jax's warning for an entry it could not read, or not write whole (its module's name is the start
# of the entry's file name).
ENTRY_NOT_READ_OR_WRITTEN = re.compile(r"Error (?P<doing>reading|writing) persistent compilation cache entry for "
                                       r"'(?P<module>[^']+)'")
WHAT_BECAME_OF_IT = {"reading": "was damaged (cut short while written?): removed, and the program compiled again is "
                                "kept in its place",
                     "writing": "could not be written whole (a full disk?): removed, so that no job reads it cut short"}


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
    # Every one of these warnings to the hook, not only the first of each text: two programs of one
    # name that fail to be written on a full disk say the same.
    warnings.filterwarnings("always", message=r"Error (?:reading|writing) persistent compilation cache entry")
    warnings.showwarning = removing_damaged_entries(folder, warnings.showwarning)
    for variable, value in (("JAX_COMPILATION_CACHE_MAX_SIZE", COMPILATION_CACHE_BYTES),
                            ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", COMPILATION_CACHE_MIN_COMPILE_S)):
        if variable not in os.environ:  # the user's own settings stay
            jax.config.update(variable.lower(), value)


def removing_damaged_entries(folder: str, show_warning):
    """A warnings.showwarning that removes the entries of `folder` that jax warns it could not read or
    write and that do not decompress. jax writes an entry in place and never replaces one: an entry
    cut short (a job killed while writing it, a full disk) made every later job warn and compile the
    program again. Removed, it is written anew by the job that compiles it now. Other warnings, and
    entries that read whole (a program this processor rejects), are jax's to show."""
    def showwarning(message, category, filename, lineno, file=None, line=None):
        match = ENTRY_NOT_READ_OR_WRITTEN.search(str(message))
        removed = remove_damaged_entries(folder, match["module"]) if match else []
        for path in removed:
            logging.warning("%s %s", path, WHAT_BECAME_OF_IT[match["doing"]])
        if not removed:
            show_warning(message, category, filename, lineno, file, line)

    return showwarning


def remove_damaged_entries(folder: str, module: str) -> list[str]:
    """The cache entries of `module` in `folder` that do not decompress, removed."""
    # jax's own decompression (zstd or zlib, as it wrote them), a private function (jax 0.10-0.11): where a
    # later jax lacks it, nothing is removed and jax's warning is shown as it is.
    decompress = getattr(importlib.import_module("jax._src.compilation_cache"), "decompress_executable", None)
    if decompress is None:
        return []
    removed = []
    for path in glob.glob(os.path.join(glob.escape(folder), f"{glob.escape(module)}-*-cache")):
        try:
            with open(path, "rb") as f:
                decompress(f.read())
        except OSError:  # gone meanwhile (another job removed it), or unreadable: not ours to judge
            continue
        except Exception:  # the decompressors' errors for data cut short
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(path)
    return removed
