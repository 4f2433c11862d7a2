"""How a one-line message quotes a library's error: the libraries under the project (gcsfs,
orbax, tensorstore, TFDS, torch) raise messages that run to pages (specs, remote tracebacks), and
some raise none at all. Also the advice for the limits of a machine that any job may meet wherever it
writes or opens files (a job's files, a checkpoint save, a data worker): room, quota, file size, open files."""

from __future__ import annotations

import errno


def first_line(error: BaseException) -> str:
    """The first line of the error's message, or its type's name where the message is empty."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def described(error: BaseException) -> str:
    """'TypeName: first line of the message', or the type's name alone where the message is empty."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def open_files_fix() -> str:
    """What to do about a job stopped by the open-files limit: raise it (fewer grain workers alone did not
    help at `ulimit -n 16`: the checkpoint save then met the limit)."""
    import resource  # Unix only: imported where a limit was met

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= soft:  # only an administrator raises a hard limit
        return (f"this process may open {soft} files, as many as its hard limit (`ulimit -Hn`) allows: ask the "
                "machine's administrators for more")
    most = "unlimited" if hard == resource.RLIM_INFINITY else str(hard)
    asked = 4096 if most == "unlimited" else min(4096, hard)
    return (f"raise the open-files limit in the job's shell, `ulimit -n {asked}` (this process may open {soft} files; "
            f"its hard limit, `ulimit -Hn`, allows {most})")


# The limits of a machine that stop a write (a job's file, a checkpoint save), by errno: what the error means, and
# what lifts the limit, in words that stand alone (a function: the open-files limit's names this process's limits).
# Python ignores SIGXFSZ, so a write past the shell's file size limit fails with EFBIG instead of killing the job.
MACHINE_LIMITS = {
    errno.ENOSPC: ("no space left on the device", lambda: "free space"),
    errno.EDQUOT: ("this user's disk quota is used up", lambda: "make room in this user's disk quota"),
    errno.EFBIG: ("a file grew past the largest this process may write (the file size limit, ulimit -f)",
                  lambda: "raise the file size limit in the job's shell, `ulimit -f unlimited` (up to what "
                          "`ulimit -Hf` allows), or ask the machine's administrators"),
    errno.EMFILE: ("this process has as many files open as it may (the open-files limit, ulimit -n)", open_files_fix),
}
