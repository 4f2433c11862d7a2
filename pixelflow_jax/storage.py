"""The one path layer: every file the project reads or writes goes through here, so a path may be
local or an object-store URL (gs://; etils.epath with gcsfs).

Object stores have no atomic rename and no append. What keeps the project's promises there:
  - `write_atomically` uploads one complete object; a store publishes an object only when its
    upload completes, so a reader sees the whole file or none (locally: a temporary file renamed);
  - checkpoints are orbax's, finalised by a commit marker on object stores (a rename locally);
  - a file that grows (metrics.jsonl) is rewritten whole, not appended to;
  - folders do not exist on a store: `makedirs` does nothing there, and a "folder" exists once an
    object under it does.
A URL is never passed to os.path.abspath or open(): `absolute` leaves it as it is.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from concurrent import futures
from typing import Any, BinaryIO, Callable, Iterator

from pixelflow_jax.error_text import described

# Schemes this project writes and reads (hf:// is read-only, for checkpoints: see hub.py).
SUPPORTED_SCHEMES = ("gs",)


class StorageError(OSError):
    """A path cannot be reached or written; the message names the path, the cause and the fix."""


def is_url(path: str) -> bool:
    return "://" in str(path)


def scheme(path: str) -> str:
    return str(path).split("://", 1)[0] if is_url(path) else ""


# A URL that lost a slash or its colon ("gs:/bucket", "gs:bucket", "gs//bucket", "gs;//bucket"):
# taken as it is, it would be a local folder named "gs:" or "gs" that quietly fills the disk
# instead of the bucket.
_SCHEME = r"[A-Za-z][A-Za-z0-9+.-]*"  # RFC 3986's scheme
_KNOWN_SCHEMES = r"(?:gs|gcs|hf|s3|http|https|file)"
_BROKEN_URL = re.compile(rf"{_SCHEME}:/(?!/)|{_KNOWN_SCHEMES}:(?!//)|{_KNOWN_SCHEMES}[;.]?//", re.I)
# Characters an object path cannot keep: tensorstore (the checkpoints' arrays) reads "?" and "#" as
# the start of a URL query or fragment, and fsspec (listings, deletes) reads "*?[]" as wildcards,
# so a run's arrays would land in another folder, or a delete would match other runs' files.
_NOT_IN_OBJECT_PATHS = "?#*[]"


def user_path(path: str) -> str:
    """A path as a user wrote it (a flag, a config value, an API argument), ready for this layer:
    `~` expanded (the shell leaves `--flag=~/x` as it is), URLs unchanged, and a URL without its
    "//" refused rather than taken for a local folder."""
    if not isinstance(path, (str, os.PathLike)):
        raise StorageError(f"expected a path (a string or os.PathLike), got {path!r}")
    path = str(path)
    if broken := _BROKEN_URL.match(path):
        scheme_name = broken[0].rstrip(":;./")
        rest = path[broken.end():].lstrip("/\\")
        raise StorageError(f'{path} looks like a URL without its "://": write {meant_scheme(scheme_name)}://{rest} '
                           f"(or ./{path} for a local folder of that name)")
    if is_url(path) and not re.fullmatch(_SCHEME, scheme(path)):
        # runs/gs://b (a URL pasted after a folder): as a "scheme", runs/gs would be refused in odd words
        url = re.search(rf"(?<![A-Za-z0-9+.-]){_KNOWN_SCHEMES}://.*", path, re.I)  # not the gs:// of runs/mygs://
        raise StorageError(f'{path} holds "://" inside a path: a URL starts with its scheme'
                           + (f" (write {url[0]})" if url else "")
                           + ', and a local path holding "://" is refused, so that a mistyped URL never becomes a '
                             'local folder')
    if is_url(path) and scheme(path) == "file":
        raise StorageError(f"{path}: write the local path itself ({path.split('://', 1)[1] or '/'}), not a file:// URL")
    if is_url(path) and scheme(path) != "hf" and not path.split("://", 1)[1].split("/", 1)[0]:
        raise StorageError(f"{path} names no bucket: write {scheme(path)}://BUCKET/...")
    if is_url(path) and path != path.strip():
        raise StorageError(f"{path!r} starts or ends with a space, which an object name keeps: write {path.strip()!r}")
    if is_url(path) and scheme(path) != "hf" and (odd := sorted(set(_NOT_IN_OBJECT_PATHS) & set(path))):
        raise StorageError(f"{path}: {' and '.join(repr(c) for c in odd)} cannot be part of an object path here "
                           "(the checkpoint library reads '?' and '#' as the start of a URL query, the bucket "
                           "library reads '*', '?' and '[ ]' as wildcards): name the folder without them")
    if is_url(path) and {".", ".."} & set(path.split("://", 1)[1].split("/")[1:]):
        raise StorageError(f"{path}: object stores do not resolve '.' and '..' (they would be part of the names): "
                           "write the folder itself")
    if is_url(path) and "//" in path.split("://", 1)[1].rstrip("/"):
        # An empty folder name (an empty $PREFIX): epath drops it on writes, fsspec keeps it in listings
        # and locks, so a run would not find its own files.
        fixed = f"{scheme(path)}://{re.sub('/+', '/', path.split('://', 1)[1])}"
        raise StorageError(f'{path} has an empty folder name ("//"), which object-store tools read in two ways: '
                           f"write {fixed}")
    return path if is_url(path) else os.path.expanduser(path)


def meant_scheme(name: str) -> str:
    """The scheme a user most likely meant: gs for gcs, lower case for a known one."""
    meant = {"gcs": "gs"}.get(name.lower(), name.lower())
    return meant if meant in (*SUPPORTED_SCHEMES, "hf") else name


def check_supported(path: str) -> None:
    """A path this layer reads and writes: local or gs:// (hf:// paths are read by hub.py alone)."""
    if is_url(path) and scheme(path) not in SUPPORTED_SCHEMES:
        schemes = ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        meant = meant_scheme(scheme(path))
        if scheme(path) == "hf":
            raise StorageError(f"{path}: hf:// (the Hugging Face Hub) is read here for checkpoints and T5 folders "
                               f"only: outputs and other files are local or {schemes}")
        hint = ""
        if meant in (*SUPPORTED_SCHEMES, "hf"):
            why = ": schemes are lower case" if meant == scheme(path).lower() else ""
            hint = f" (write {meant}://{path.split('://', 1)[1]}{why})"
        raise StorageError(f"{path}: unsupported URL scheme {scheme(path)}://{hint}; paths are local or {schemes} "
                           "(hf:// reads checkpoints and T5 folders only)")


class _RetriesGivenUpInOneLine(logging.Filter):
    """gcsfs logs a 40-line traceback when it gives up on a request (out of retries, or an error it
    does not retry, such as a 403); the StorageError raised next names the path, the cause and what
    to check, so the log keeps gcsfs's one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and ("out of retries" in message or "non-retriable exception" in message):
            record.exc_info = record.exc_text = None
        return True


def _configure_gcsfs() -> None:
    """gcsfs caches folder listings per process by default, so files that other hosts (or other
    processes of this host) wrote stay invisible; every listing here must see the store as it is."""
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    gcsfs_log = logging.getLogger("gcsfs")
    if not any(isinstance(f, _RetriesGivenUpInOneLine) for f in gcsfs_log.filters):
        gcsfs_log.addFilter(_RetriesGivenUpInOneLine())


def _epath(path: str):
    check_supported(path)
    _configure_gcsfs()
    try:
        from etils import epath

        return epath.Path(path)
    except ImportError as e:
        raise StorageError(f"{path}: reading {scheme(path)}:// needs gcsfs: pip install gcsfs ({e})") from None


CHECK_ACCESS = ("check the network, that the bucket exists, and the credentials: `gcloud auth application-default "
                "login` or a service account")


def _remote(path: str, action):
    """action(epath.Path) for a URL; any failure other than a missing file becomes one StorageError
    naming the path, the cause and what to check."""
    p = _epath(path)
    try:
        return action(p)
    except (FileNotFoundError, StorageError):
        raise
    except Exception as e:  # gcsfs, google-auth and aiohttp raise many types for the same few causes
        raise StorageError(f"{path}: {described(e)} ({CHECK_ACCESS})") from None


def absolute(path: str) -> str:
    """Local paths made absolute; URLs unchanged."""
    return str(path) if is_url(path) else os.path.abspath(path)


def resolved(path: str) -> str:
    """A local path made absolute with its symbolic links resolved (so two names of one folder
    compare equal); a URL without its trailing slash."""
    return str(path).rstrip("/") if is_url(path) else os.path.realpath(path)


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def dirname(path: str) -> str:
    if is_url(path):
        head = str(path).rstrip("/").rsplit("/", 1)[0]
        return head if "://" in head and not head.endswith(":/") else str(path)
    return os.path.dirname(path)


def _remote_kind(path: str) -> str | None:
    """'file' or 'directory' for what a URL names, None where nothing is there. fsspec's own
    exists() and isdir() answer False for any error: a refused or failed request (403, 503) read as
    "no checkpoints here" would start a trained run anew. Here only a missing object is None."""
    def kind(_):
        import fsspec

        fs, key = fsspec.core.url_to_fs(path)
        try:
            return fs.info(key)["type"]
        except FileNotFoundError:
            return None

    return _remote(path, kind)


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
        import fsspec

        fs, root = fsspec.core.url_to_fs(path)
        fs.invalidate_cache(root)
        if _remote_kind(path) != "directory":
            return [], []
        entries = fs.ls(root, detail=True)
        name = lambda entry: entry["name"].rstrip("/").rsplit("/", 1)[-1]
        return (sorted(name(e) for e in entries if e["type"] == "file"),
                sorted(name(e) for e in entries if e["type"] == "directory"))

    return _remote(path, listing)


def file_sizes(folder: str) -> dict[str, int]:
    """{path relative to the folder: size} of every file below it (one listing on a store)."""
    if is_url(folder):
        def listing(_):
            import fsspec

            fs, root = fsspec.core.url_to_fs(folder)
            fs.invalidate_cache(root)
            root = root.rstrip("/") + "/"
            return {name[len(root):]: int(info["size"]) for name, info in fs.find(root, detail=True).items()}

        return _remote(folder, listing)
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
        with open_file(join(folder, name), "rb") as f:
            if size <= 3 * FINGERPRINT_SLICE:
                digest.update(f.read())
                continue
            for offset in (0, size // 2, size - FINGERPRINT_SLICE):
                f.seek(offset)
                digest.update(f.read(FINGERPRINT_SLICE))
    return digest.hexdigest()[:16]


def makedirs(path: str) -> None:
    if not is_url(path):  # a store has no folders: writing an object makes its "folder"
        os.makedirs(path, exist_ok=True)


def open_file(path: str, mode: str = "rb"):
    if is_url(path):
        return _remote(path, lambda p: p.open(mode))
    return open(path, mode)


def read_bytes(path: str) -> bytes:
    with open_file(path, "rb") as f:
        return f.read()


def read_text(path: str) -> str:
    return read_bytes(path).decode("utf-8")


def read_json(path: str) -> Any:
    return json.loads(read_text(path))


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


def write_atomically(path: str, data: bytes | str) -> None:
    """The whole file appears at once or not at all (see the module docstring)."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if is_url(path):
        def upload(p):
            with p.open("wb") as f:
                f.write(data)

        _remote(path, upload)
        return
    _write_local_atomically(path, lambda f: f.write(data))


def write_streamed_atomically(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """write_atomically for a writer that streams into a file (np.savez): locally through a
    temporary beside `path`, to a URL through a local temporary file uploaded whole."""
    if not is_url(path):
        _write_local_atomically(path, write)
        return
    with tempfile.NamedTemporaryFile(prefix="pixelflow_upload_") as local:
        write(local)
        local.flush()
        upload_file_atomically(local.name, path)


def _write_local_atomically(path: str, write: Callable[[BinaryIO], Any], temporary_prefix: str = "",
                            publish: Callable[[str, str], None] = os.replace) -> None:
    """Writes a local file through write(f) into a temporary beside it, then renames it into place
    (readable as umask allows; `publish=os.link` refuses an existing file instead). The temporary
    is `.NAME.tmp-HOST-PID-*`, which remove_temporaries clears after a kill, unless
    `temporary_prefix` names another."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    prefix = temporary_prefix or f".{os.path.basename(path)}.tmp-{writer_tag()}-"
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~umask())
        publish(tmp, path)
    finally:  # gone after os.replace; after os.link (or a failure) a second name to remove
        with contextlib.suppress(OSError):
            os.remove(tmp)


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


def temporary_dir(prefix: str) -> str:
    """A new folder in the system's temporary folder, PREFIX-WRITER-RANDOM (remove_abandoned_dirs)."""
    return tempfile.mkdtemp(prefix=f"{prefix}-{writer_tag()}-")


def remove_abandoned_dirs(prefix: str) -> None:
    """Deletes the temporary_dir(prefix) folders of killed writers (see ABANDONED_AFTER_S)."""
    for entry in os.scandir(tempfile.gettempdir()):
        match = re.fullmatch(re.escape(prefix) + "-" + WRITER, entry.name)
        with contextlib.suppress(OSError):  # another start removing it at the same time
            if match and entry.is_dir(follow_symlinks=False) and writer_gone(match, entry.path) and \
                    time.time() - newest_mtime(entry.path) > ABANDONED_AFTER_S:
                shutil.rmtree(entry.path, ignore_errors=True)


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
    stale = []
    for name in os.listdir(folder):
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


@contextlib.contextmanager
def writing(path: str, fix: str) -> Iterator[None]:
    """An OSError of the writes inside as one StorageError naming `path`, the cause and `fix`."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        raise StorageError(f"cannot write {path} ({type(e).__name__}: {e}); {fix}") from None


def write_json_atomically(path: str, value: Any) -> None:
    write_atomically(path, json.dumps(value, indent=2))


# What os.link raises on a file system without hard links (gcsfuse, s3fs, blobfuse mounts).
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def create_file(path: str, data: bytes) -> bool:
    """Writes `path` whole where nothing is there yet: False, and nothing written, when another
    writer got there first. Locally a complete temporary file is hard-linked into place (a link
    refuses an existing name; on a file system without hard links, some FUSE mounts, an exclusive
    create, then the write); in a bucket one create-only upload (ifGenerationMatch=0), which the
    store refuses if the object appeared since the existence check."""
    if is_url(path):
        import fsspec

        fs, key = fsspec.core.url_to_fs(path)
        if fs.exists(key):
            return False
        try:
            fs.pipe_file(key, data, mode="create")
        except Exception:  # a precondition failure (412), whatever the client calls it
            if fs.exists(key):
                return False
            raise
        return True
    try:
        _write_local_atomically(path, lambda f: f.write(data), publish=os.link)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:  # a full disk, an I/O error: not a reason to write unlinked
            raise
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~umask())
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except BaseException:  # not left half-written, where it would read as another writer's
        os.remove(path)
        raise
    return True


def create_json(path: str, value: Any) -> bool:
    """create_file for a JSON value."""
    return create_file(path, json.dumps(value, indent=2).encode("utf-8"))


def upload_file_atomically(local_file: str, path: str) -> None:
    """Publishes a finished local file at `path` (a URL: one upload; local: a rename or copy)."""
    if is_url(path):
        def upload(p):
            with open(local_file, "rb") as source, p.open("wb") as target:
                shutil.copyfileobj(source, target, 16 << 20)

        _remote(path, upload)
    else:
        def copy(target):
            with open(local_file, "rb") as source:
                shutil.copyfileobj(source, target, 16 << 20)

        _write_local_atomically(path, copy)


def remove(path: str) -> None:
    if is_url(path):
        _remote(path, lambda p: p.unlink(missing_ok=True))
    elif os.path.exists(path):
        os.remove(path)


def rmtree(path: str) -> None:
    if is_url(path):
        _remote(path, lambda p: p.rmtree() if p.exists() else None)
    else:
        shutil.rmtree(path, ignore_errors=True)


def move_folder(source: str, target: str) -> None:
    """Moves a folder to a path that does not exist yet (in an object store: copies every object,
    then deletes the originals)."""
    if is_url(source):
        def move(_):
            import fsspec

            fs, key = fsspec.core.url_to_fs(source)
            fs.mv(key, fsspec.core.url_to_fs(target)[1], recursive=True)

        _remote(source, move)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.move(source, target)  # a rename, or a copy where the target is on another disk


def size_and_mtime(path: str) -> tuple[int, float]:
    """(bytes, modification time in seconds since the epoch), local or in a bucket."""
    if is_url(path):
        stat = _remote(path, lambda p: p.stat())
        return int(stat.length), float(stat.mtime or 0)
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime


def cache_dir(*parts: str) -> str:
    """This project's local cache of remote files: $PIXELFLOW_CACHE_DIR, else
    $XDG_CACHE_HOME/pixelflow_jax, else ~/.cache/pixelflow_jax."""
    root = os.environ.get("PIXELFLOW_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "pixelflow_jax")
    return os.path.join(root, *parts)


def cached_copy(url: str, folder: str) -> str:
    """folder/NAME, a local copy of the file at `url`: downloaded again only when the remote's size
    or modification time differs from what NAME.source.json recorded. The copy appears whole
    (downloaded beside it, then renamed), so a killed download is never read as the file; its
    leftovers are deleted by the next download on the same host (the folder may be on a file
    system that other hosts share, where their downloads are theirs to clear)."""
    local = os.path.join(folder, basename(url))
    record_path = local + ".source.json"
    size, mtime = size_and_mtime(url)
    record = {"url": url, "size": size, "mtime": mtime}
    with contextlib.suppress(OSError, ValueError):
        with open(record_path) as f:
            if json.load(f) == record and os.path.getsize(local) == size:
                return local
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

    _write_local_atomically(local, download, temporary_prefix=f"{partial}{os.getpid()}-")
    write_json_atomically(record_path, record)
    return local


@contextlib.contextmanager
def removed_if_left_empty(folder: str, remover: bool = True) -> Iterator[None]:
    """A local folder that did not exist before the block is removed after it if nothing was
    written there (a job that failed at its start leaves no empty folder). `remover`: whether this
    process is the one that removes it (process 0 of a job)."""
    made_here = remover and not is_url(folder) and not os.path.exists(folder)
    try:
        yield
    finally:
        if made_here:
            with contextlib.suppress(OSError):  # rmdir removes only an empty folder
                os.rmdir(folder)


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
    """A local path with the file's content: the file itself, or a temporary download of a URL
    (for readers that need a real file: torch's mmap, safetensors, sentencepiece)."""
    if not is_url(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="pixelflow_download_") as folder:
        local = os.path.join(folder, basename(path))
        with open_file(path, "rb") as source, open(local, "wb") as target:
            shutil.copyfileobj(source, target, 16 << 20)
        yield local


def check_writable(folder: str) -> None:
    """Writes and deletes a probe file in `folder`, so that a missing bucket, missing credentials
    or no write access stop a job before its first step, with the cause."""
    probe = join(folder, f".write_check-{socket.gethostname()}-{os.getpid()}")
    if not is_url(folder) and os.path.isfile(folder):
        raise StorageError(f"{folder} is a file, not a folder: name a folder (new or existing) for the outputs")
    try:
        makedirs(folder)
        write_atomically(probe, b"")
        remove(probe)
    except StorageError:
        raise
    except Exception as e:  # gcsfs / google-auth / OS errors: one message with the cause
        hint = (f" ({CHECK_ACCESS}, and that they may write there)" if is_url(folder) else
                ": name a folder this user can write to (a training run in a read-only folder can still be sampled "
                "or exported into another: --config.sample.checkpoint=RUN, --jax_checkpoint=RUN)")
        raise StorageError(f"cannot write to {folder}: {described(e)}{hint}") from None


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
    """This process's umask (reading it means setting it: set back at once)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask
