"""Finding, listing and reading files, local or in a bucket. Where a bucket is asked, only a
missing object reads as missing: any other failure is a StorageError (remote.py)."""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import os
import pwd
import shutil
import stat
import sys
import tempfile
from concurrent import futures
from typing import Any, Callable, Iterator

from pixelflow_jax.error_text import described
from pixelflow_jax.storage.paths import StorageError, basename, is_url, join
from pixelflow_jax.storage.remote import asked_of_the_bucket, on_remote


def _remote_kind(path: str) -> str | None:
    """'file' or 'directory' for what a URL names, None where nothing is there. fsspec's own
    exists() and isdir() answer False for any error: a refused or failed request (403, 503) read as
    "no checkpoints here" would start a trained run anew. Here only a missing object is None, and
    the bucket is asked, not a listing kept from before (a step another host saved since)."""
    def kind(_):
        fs, key = asked_of_the_bucket(path)
        try:
            return fs.info(key)["type"]
        except FileNotFoundError:
            return None

    return on_remote(path, kind)


def exists(path: str) -> bool:
    return _remote_kind(path) is not None if is_url(path) else os.path.exists(path)


def isdir(path: str) -> bool:
    return _remote_kind(path) == "directory" if is_url(path) else os.path.isdir(path)


def isfile(path: str) -> bool:
    return _remote_kind(path) == "file" if is_url(path) else os.path.isfile(path)


def listdir(path: str) -> list[str]:
    """Names under a folder (one level); [] when it does not exist."""
    if is_url(path):
        files, folders = list_entries(path)
        return sorted(files + folders)
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def list_files(path: str) -> list[str]:
    """Names of the files (not sub-folders) directly in a folder, in one listing."""
    return list_entries(path)[0]


def list_folders(path: str) -> list[str]:
    """Names of the sub-folders directly in a folder."""
    return list_entries(path)[1]


def list_entries(path: str, others: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(files, sub-folders) directly in a folder, sorted, from one listing (a walk through a
    bucket makes one request per folder, not two); ([], []) when it does not exist. `others`, if
    given, gets the names of a local folder's entries that are neither (links to nothing, sockets)."""
    if not is_url(path):
        if not os.path.isdir(path):
            return [], []
        entries = list(os.scandir(path))
        files, folders = sorted(e.name for e in entries if e.is_file()), sorted(e.name for e in entries if e.is_dir())
        if others is not None:
            others += sorted(e.name for e in entries if not e.is_file() and not e.is_dir())
        return files, folders

    def listing(_):
        fs, root = asked_of_the_bucket(path)
        if _remote_kind(path) != "directory":
            return [], []
        entries = fs.ls(root, detail=True)
        name = lambda entry: entry["name"].rstrip("/").rsplit("/", 1)[-1]
        return (sorted(name(e) for e in entries if e["type"] == "file"),
                sorted(name(e) for e in entries if e["type"] == "directory"))

    return on_remote(path, listing)


def file_sizes(folder: str) -> dict[str, int]:
    """{path relative to the folder: size} of every file below it (one listing on a store)."""
    if is_url(folder):
        def listing(_):
            fs, root = asked_of_the_bucket(folder)
            root = root.rstrip("/") + "/"
            return {name[len(root):]: int(info["size"]) for name, info in fs.find(root, detail=True).items()}

        return on_remote(folder, listing)
    return {os.path.relpath(os.path.join(parent, name), folder): os.path.getsize(os.path.join(parent, name))
            for parent, _, names in os.walk(folder) for name in names}


FINGERPRINT_SLICE = 64 << 10


def fingerprint(folder: str, entries: tuple[str, ...] = ()) -> str:
    """A short hash of what a folder holds (only its `entries`, files or sub-folders, if given):
    every file's name and size, the whole of each small file, and three slices (start, middle,
    end) of each large one. It changes when the folder is written again with other weights (orbax
    names its data files afresh; a zip's central directory at the end holds each entry's CRC) and
    survives a copy; it reads a few MB at most."""
    digest = hashlib.sha256()
    for name, size in sorted(file_sizes(folder).items()):
        if entries and name.split("/", 1)[0] not in entries:
            continue
        digest.update(f"{name}\0{size}\0".encode())
        _digest_content(digest, join(folder, name), size)
    return digest.hexdigest()[:16]


def file_fingerprint(path: str) -> str:
    """fingerprint of one file: its size and content, as fingerprint reads a folder's files."""
    size = size_and_mtime(path)[0]
    digest = hashlib.sha256(f"{size}\0".encode())
    _digest_content(digest, path, size)
    return digest.hexdigest()[:16]


def _digest_content(digest, path: str, size: int) -> None:
    """The whole of a small file, three slices (start, middle, end) of a large one."""
    with open_file(path, "rb") as f:
        if size <= 3 * FINGERPRINT_SLICE:
            digest.update(f.read())
            return
        for offset in (0, size // 2, size - FINGERPRINT_SLICE):
            f.seek(offset)
            digest.update(f.read(FINGERPRINT_SLICE))


def broken_link_words(path: str) -> str | None:
    """For a local link whose target was moved or deleted, what to say of it instead of "does not
    exist" (`ls` still shows the link); None for any other path."""
    if not is_url(path) and os.path.islink(path) and not os.path.exists(path):
        return f"is a link to {os.readlink(path)}, which does not exist (moved or deleted?)"
    return None


def slash_after_a_file(path: str) -> str:
    """The hint for a file's name given with a / after it (a shell's completion of a folder's name),
    or ''."""
    if str(path).endswith("/") and isfile(str(path).rstrip("/")):
        return f" (the / at its end names a folder, and {str(path).rstrip('/')} is a file: drop the /)"
    return ""


def missing_bucket_words(path: str) -> str | None:
    """For a URL whose bucket does not exist (a typo in its name), what to say of the path instead
    of "does not exist", which sent users looking for the run inside a bucket that is not there;
    None for a local path or a bucket that exists."""
    if not is_url(path):
        return None
    bucket = path.split("://", 1)[1].split("/", 1)[0]

    def bucket_missing(_) -> bool:
        import fsspec

        fs, _ = fsspec.core.url_to_fs(path)
        # GCS's bucket GET alone: 404 for a bucket that does not exist, 403 for one these credentials
        # may not describe (objectAdmin lacks storage.buckets.get). fs.info(bucket) takes a 403 to
        # a listing, and an empty bucket so listed would have been called missing.
        try:
            fs.call("GET", "b/{}", bucket, json_out=True)
        except FileNotFoundError:
            return True
        except Exception:  # forbidden or unreachable: not known to be missing
            return False
        return False

    if not on_remote(path, bucket_missing):
        return None
    where = ("is a bucket that" if not path.split("://", 1)[1].strip("/").count("/")
             else f"is in the bucket {path.split('://', 1)[0]}://{bucket}, which")
    return f"{where} does not exist (a typo? `gcloud storage ls` lists the buckets these credentials can see)"


def missing_path_words(path: str) -> str | None:
    """What to say of a path that does not exist where more is known than that: a local link whose
    target is gone, or a URL whose bucket does not exist; None otherwise."""
    return broken_link_words(path) or missing_bucket_words(path)


def open_file(path: str, mode: str = "rb"):
    if not is_url(path):
        return open(path, mode)
    if "r" in mode:  # a read is sized by the file's info: the bucket's, not a listing kept from before
        return on_remote(path, lambda _: _opened_as_the_bucket_has_it(path, mode))
    return on_remote(path, lambda p: p.open(mode))


def _opened_as_the_bucket_has_it(url: str, mode: str):
    fs, key = asked_of_the_bucket(url)
    return fs.open(key, mode)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    return parse_json(read_text(path))


def read_json_lines(path: str) -> list:
    """A JSON Lines file's values, in order (blank lines skipped), each read as parse_json reads."""
    return [parse_json(line) for line in read_text(path).splitlines() if line.strip()]


def parse_json(text: str) -> Any:
    """json.loads, with nesting deeper than Python reads a ValueError, as other damage is (a crafted
    file's RecursionError came out of the checkpoint readers as a traceback)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(too_deeply_nested()) from None


def too_deeply_nested() -> str:
    """Why a file of nested lists or mappings was not read (JSON's and YAML's parsers recurse)."""
    return f"nested more than {sys.getrecursionlimit()} levels deep, past what Python reads"


# From a bucket each file is a request: one after another, a job over a million files waits out a
# million round trips. In threads, in order, with at most READ_AHEAD files held at once.
READ_THREADS = 16

READ_AHEAD = 64


def read_in_order(read: Callable[[Any], Any], items) -> Iterator:
    """read(item) for each item, in the items' order, READ_THREADS reads at a time and at most
    READ_AHEAD results held; an error is raised where its item comes."""
    with futures.ThreadPoolExecutor(READ_THREADS) as pool:
        pending: collections.deque = collections.deque()
        for item in items:
            pending.append(pool.submit(read, item))
            if len(pending) >= READ_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def size_and_mtime(path: str) -> tuple[int, float]:
    """(bytes, modification time in seconds since the epoch), local or in a bucket."""
    version = file_version(path)
    return version["size"], version["mtime"]


def file_version(path: str) -> dict:
    """{"size": bytes, "mtime": seconds since the epoch}, and for an object of a bucket that numbers
    its versions (GCS) its "generation": a rewrite within the second that keeps the size changes
    only that."""
    if is_url(path):
        def ask(_):
            fs, key = asked_of_the_bucket(path)
            return fs.info(key)

        info = on_remote(path, ask)
        # Whole seconds, as epath's stat gave them: the records of local copies made so far stay valid.
        mtime = int(info["mtime"].timestamp()) if info.get("mtime") else 0
        generation = {"generation": str(info["generation"])} if info.get("generation") else {}
        return {"size": int(info["size"]), "mtime": float(mtime), **generation}
    stat = os.stat(path)
    return {"size": stat.st_size, "mtime": stat.st_mtime}


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
    """A local path with the file's content: the file itself, or a temporary download of a URL
    (for readers that need a real file: torch's mmap, safetensors, sentencepiece)."""
    if not is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="pixelflow_download_") as folder:
        local = os.path.join(folder, basename(path))
        try:
            with open_file(path, "rb") as source, open(local, "wb") as target:
                shutil.copyfileobj(source, target, 16 << 20)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):  # the bucket's errors say what they are
                raise
            # A full temporary folder is no reason to look at the file (a release model.pt is 2.7 GB).
            raise StorageError(f"{path} is read through a copy on this machine, in {tempfile.gettempdir()}, and that "
                               f"copy failed ({described(e)}): free space there, or point TMPDIR at a folder with "
                               "room for the file") from None
        yield local


def file_owner(path: str) -> str:
    """The user owning a local file, by name where this host knows it ('alice (uid 1001)')."""
    try:
        uid = os.stat(path).st_uid
    except OSError:
        return "another user"
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:  # a uid without a passwd entry (a container's user, another host's)
        return f"uid {uid}"


def sticky_words(folder: str) -> str:
    """Why a user who may write in `folder` still cannot delete another's file there, where that is why."""
    try:
        sticky = bool(os.stat(folder).st_mode & stat.S_ISVTX)
    except OSError:
        return ""
    return f", and {folder} has the sticky bit: only a file's owner (or the folder's) may delete it" if sticky else ""
