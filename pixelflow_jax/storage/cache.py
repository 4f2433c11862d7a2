"""Local copies of remote files, fetched again only when the remote one changed."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from typing import Iterator

from pixelflow_jax.error_text import described
from pixelflow_jax.storage.paths import StorageError, basename, is_url
from pixelflow_jax.storage.reads import file_version, open_file
from pixelflow_jax.storage.writes import write_json_atomically, write_local_atomically
from pixelflow_jax.storage.temporaries import process_alive

def cache_dir(*parts: str) -> str:
    """This project's local cache of remote files: $PIXELFLOW_CACHE_DIR, else
    $XDG_CACHE_HOME/pixelflow_jax (an absolute one: the XDG rule), else ~/.cache/pixelflow_jax."""
    root = os.environ.get("PIXELFLOW_CACHE_DIR")
    if root and is_url(root):  # abspath would make it a folder named gs: in the current one
        raise StorageError(f"PIXELFLOW_CACHE_DIR={root} is a URL: it holds local copies of remote files, so set it "
                           "to a local folder")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME", "")
        root = os.path.join(xdg if os.path.isabs(xdg) else os.path.join(home_folder(), ".cache"), "pixelflow_jax")
    return os.path.join(os.path.abspath(os.path.expanduser(root)), *parts)


def home_folder() -> str:
    """The user's home folder. StorageError where it is unknown (see unknown_home_folder): expanduser
    then leaves "~", and the cache would be a folder named ~ in the current one."""
    if why := unknown_home_folder():
        raise StorageError(f"{why}: set PIXELFLOW_CACHE_DIR to a writable folder for pixelflow_jax's local cache "
                           "(or set HOME)")
    return os.path.expanduser("~")


def unknown_home_folder() -> str | None:
    """Why the user's home folder is unknown (HOME unset and a uid without a passwd entry, as in
    some containers; HOME a relative path or empty), or None where it is known."""
    empty = os.environ.get("HOME") == ""  # (a cron job's or a container's): Python reads it as "/", so /.cache
    if os.path.isabs(os.path.expanduser("~")) and not empty:
        return None
    why = ("HOME is empty, which Python reads as the root folder /" if empty else
           f"HOME={os.environ['HOME']!r} is no absolute path" if "HOME" in os.environ else
           f"HOME is unset and uid {os.getuid()} has no passwd entry")
    return f"this user's home folder is unknown ({why})"


def cached_copy(url: str, folder: str) -> str:
    """folder/NAME, a local copy of the file at `url`: downloaded again only when the remote's size,
    modification time or generation differs from what NAME.source.json recorded. The copy appears whole
    (downloaded beside it, then renamed), so a killed download is never read as the file; its
    leftovers are deleted by the next download on the same host (the folder may be on a file
    system that other hosts share, where their downloads are theirs to clear)."""
    local = os.path.join(folder, basename(url))
    record_path = local + ".source.json"
    record = {"url": url, **file_version(url)}
    # A record of an earlier version holds no generation: its copy is taken as the generation there now
    # (as before; not downloaded again), and its record gains it.
    of_earlier_versions = {key: value for key, value in record.items() if key != "generation"}
    with contextlib.suppress(OSError, ValueError):
        with open(record_path) as f:
            recorded = json.load(f)
        if recorded in (record, of_earlier_versions) and os.path.getsize(local) == record["size"]:
            if recorded != record:
                # Only adds the generation: on a full disk the copy still serves, and a later read adds it.
                with contextlib.suppress(OSError):
                    write_json_atomically(record_path, record)
            return local
    with cache_errors(url, folder):
        os.makedirs(folder, exist_ok=True)
        partial = f".{basename(url)}.download-{socket.gethostname()}-"
        for name in os.listdir(folder):
            pid = name[len(partial):].split("-", 1)[0]
            if name.startswith(partial) and pid.isdigit() and not process_alive(int(pid)):
                with contextlib.suppress(OSError):
                    os.remove(os.path.join(folder, name))

        def download(target):
            with open_file(url, "rb") as source:
                shutil.copyfileobj(source, target, 16 << 20)

        write_local_atomically(local, download, temporary_prefix=f"{partial}{os.getpid()}-")
        write_json_atomically(record_path, record)
    return local


@contextlib.contextmanager
def cache_errors(url: str, folder: str) -> Iterator[None]:
    """A local copy that cannot be written (a full disk, a cache folder that is a file or read-only)
    names the cache folder and the variable that moves it, not the bucket; the bucket's own errors,
    and a file gone from it (a caller's FileNotFoundError), stay as they are."""
    try:
        yield
    except (StorageError, FileNotFoundError):
        raise
    except OSError as e:
        raise StorageError(f"cannot keep a local copy of {url} in {folder} ({described(e)}): free space there (or "
                           "make it a writable folder), or set PIXELFLOW_CACHE_DIR to a folder with room for it"
                           ) from None
