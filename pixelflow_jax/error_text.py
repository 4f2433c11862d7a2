"""How a one-line message quotes a library's error: the libraries under the project (gcsfs,
orbax, tensorstore, TFDS, torch) raise messages that run to pages (specs, remote tracebacks), and
some raise none at all. Also the advice for a limit any job may meet wherever it opens files (a data
worker, a checkpoint save): the open-files limit."""

from __future__ import annotations


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
    return (f"raise it in the job's shell, `ulimit -n {4096 if most == 'unlimited' else min(4096, hard)}` (this "
            f"process may open {soft} files; its hard limit, `ulimit -Hn`, allows {most})")
