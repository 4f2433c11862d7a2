"""Who writes a temporary file or folder, and the clearing of those whose writer was killed."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator

from pixelflow_jax.storage.paths import is_url

# A local temporary names its writer, `HOST-PID` (earlier versions: `PID`), then a random part
# without dashes. On a disk that several hosts share a cleaner can only ask its own host whether a
# writer still runs, so another host's temporary counts as abandoned once it is a day old.
WRITER = r"(?:(?P<host>.+)-)?(?P<pid>\d+)-[^-]*"
OTHER_HOSTS_TEMPORARIES_EXPIRE_S = 24 * 3600


_THIS_PROCESS_STARTED = time.time()  # (at import: before this process writes anything)


def writer_tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def writer_gone(match: re.Match, path: str) -> bool:
    """Whether the writer named in `match` (of a pattern holding WRITER) can no longer finish `path`."""
    if match["host"] in (None, socket.gethostname()):
        pid = int(match["pid"])
        if pid == os.getpid():  # a restarted container reuses pids: this process's own, or a predecessor's
            with contextlib.suppress(OSError):
                return os.path.getmtime(path) < _THIS_PROCESS_STARTED
            return False
        return not process_alive(pid)
    with contextlib.suppress(OSError):
        return time.time() - os.path.getmtime(path) > OTHER_HOSTS_TEMPORARIES_EXPIRE_S
    return False


# A temporary folder of this host's /tmp whose writer is gone is left alone until nothing in it
# changed for this long: containers that share /tmp and the hostname (docker --network=host) see
# each other's folders but not each other's processes.
ABANDONED_AFTER_S = 3600


def temporary_folder_problem() -> str | None:
    """Why the temporary folder asked for (TMPDIR, else TEMP or TMP) is not the one Python uses, or
    None: one missing, a file, or one that cannot be written (full, read-only) is passed over in
    silence for /tmp, or for the current folder where /tmp cannot be written either."""
    variable = next((v for v in ("TMPDIR", "TEMP", "TMP") if os.environ.get(v)), None)
    if variable is None:
        return None
    asked, used = os.environ[variable], tempfile.gettempdir()
    if os.path.realpath(asked) == os.path.realpath(used):
        return None
    return (f"{variable}={asked} is not a folder this user can write to (missing, a file, read-only or full): "
            f"temporary files go to {used} instead; create it, or point {variable} at a writable folder")


def temporary_dir(prefix: str) -> str:
    """A new folder in the system's temporary folder, PREFIX-WRITER-RANDOM (remove_abandoned_dirs)."""
    return tempfile.mkdtemp(prefix=f"{prefix}-{writer_tag()}-")


def folders_of_gone_writers(parent: str, name: re.Pattern) -> Iterator[tuple[re.Match, str]]:
    """(match, path) of each folder in a local `parent` whose name matches `name` (a pattern holding
    WRITER) and whose writer is gone; links are not followed."""
    for entry in os.scandir(parent):
        match = name.fullmatch(entry.name)
        gone = False
        with contextlib.suppress(OSError):  # another start removing it at the same time
            gone = bool(match) and entry.is_dir(follow_symlinks=False) and writer_gone(match, entry.path)
        if gone:
            yield match, entry.path


def remove_abandoned_dirs(prefix: str) -> None:
    """Deletes the temporary_dir(prefix) folders of killed writers (see ABANDONED_AFTER_S)."""
    for _, path in folders_of_gone_writers(tempfile.gettempdir(), re.compile(re.escape(prefix) + "-" + WRITER)):
        with contextlib.suppress(OSError):
            if time.time() - newest_mtime(path) > ABANDONED_AFTER_S:
                shutil.rmtree(path, ignore_errors=True)


def newest_mtime(folder: str) -> float:
    times = [os.path.getmtime(folder)]
    for root, _, files in os.walk(folder):
        times += [os.path.getmtime(os.path.join(root, name)) for name in files]
    return max(times)


# The temporaries of this project's writers, `.NAME.tmp-WRITER`, and the `NAME.tmp` of sampling jobs
# of earlier versions. A user's own `draft.tmp` is not one.
_TEMPORARY = re.compile(rf"\..+\.tmp-{WRITER}|(?:\d+\.png|grid\.png|samples\.npz|settings\.json)\.tmp(?:\.npz)?")


def remove_temporaries(folder: str) -> int:
    """Deletes the temporary files that killed writers of this project left in a local folder;
    call it before anyone writes there. Object stores have none (an unfinished upload is never an
    object). Returns how many."""
    if is_url(folder) or not os.path.isdir(folder):
        return 0
    try:
        names = os.listdir(folder)
    except OSError as error:  # unreadable, or removed since: the job's own writes there will say what is wrong
        logging.warning("could not look for the temporary files of an interrupted run in %s (%s); any there are "
                        "left in place", folder, error.strerror or type(error).__name__)
        return 0
    stale = []
    for name in names:
        match = _TEMPORARY.fullmatch(name)
        if match and (match["pid"] is None or writer_gone(match, os.path.join(folder, name))):
            stale.append(name)
    for name in stale:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
    return len(stale)


def clear_leftovers_of_killed_writers(*folders: str) -> None:
    """remove_temporaries on each folder a job is about to own, saying where files went."""
    for folder in folders:
        if remove_temporaries(folder):
            logging.info("removed the temporary files of an interrupted run from %s", folder)


def process_alive(pid: int) -> bool:
    """Whether a process of this host with that id runs (a writer that may still finish)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def umask() -> int:
    """This process's umask. Read from Linux's /proc: the portable way sets it to read it, and for that
    instant a file another thread creates (orbax saves from threads) would get the mode 0666 or 0777."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)  # elsewhere (macOS; Linux before 4.7): set, and set back at once
    os.umask(mask)
    return mask


def make_folder(parent: str, prefix: str = "") -> str:
    """tempfile.mkdtemp in `parent` with the mode os.makedirs gives (0777 less the umask): mkdtemp's
    0700 would hide what is written there from the owner's group and others (a converted output
    takes its temporary's mode; the demo page's images are served from such folders)."""
    folder = tempfile.mkdtemp(prefix=prefix, dir=parent)
    os.chmod(folder, 0o777 & ~umask())
    return folder
