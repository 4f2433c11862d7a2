"""Writing files, local or in a bucket, so that a reader sees a whole file or none (see the
package docstring), and creating files that only one writer may create."""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import tempfile
import uuid
from typing import Any, BinaryIO, Callable, Iterator

from pixelflow_jax.error_text import MACHINE_LIMITS, described
from pixelflow_jax.storage.paths import StorageError, is_url, join
from pixelflow_jax.storage.reads import (broken_link_words, exists, file_owner, missing_bucket_words, read_text,
                                           sticky_words)
from pixelflow_jax.storage.remote import CHECK_ACCESS, asked_of_the_bucket, on_remote
from pixelflow_jax.storage.temporaries import umask, writer_tag


def makedirs(path: str) -> None:
    if not is_url(path):  # a store has no folders: writing an object makes its "folder"
        os.makedirs(path, exist_ok=True)


def file_in_the_way(folder: str) -> str | None:
    """The absolute path `folder`, or its nearest existing parent, when that is not a folder (so
    the folder cannot be made); None when the folder exists or can be made."""
    while not os.path.lexists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    return None if os.path.isdir(folder) else folder


def make_local_parent(path: str) -> str:
    """Makes (if need be) and returns the folder of a local file; abspath: a bare name's dirname is ""."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    return folder


def write_atomically(path: str, data: bytes | str) -> None:
    """The whole file appears at once or not at all (see the package docstring)."""
    data = data.encode("utf-8") if isinstance(data, str) else data
    if is_url(path):
        def upload(p):
            with p.open("wb") as f:
                f.write(data)

        on_remote(path, upload)
        return
    write_local_atomically(path, lambda f: f.write(data))


def write_streamed_atomically(path: str, write: Callable[[BinaryIO], Any]) -> None:
    """write_atomically for a writer that streams into a file (np.savez): locally through a
    temporary beside `path`, to a URL through a local temporary file uploaded whole."""
    if not is_url(path):
        write_local_atomically(path, write)
        return
    folder = tempfile.gettempdir()
    # Not a NamedTemporaryFile: its close, which writes the last buffered bytes, fails again on a
    # full disk, and that failure skipped its removal (a 9.8 GB file left in the temporary folder).
    local = os.path.join(folder, f"pixelflow_upload_{uuid.uuid4().hex}")
    try:
        with local_copy_errors(path, folder):
            with os.fdopen(os.open(local, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                write(f)
        upload_file_atomically(local, path)
    finally:
        with contextlib.suppress(OSError):
            os.remove(local)


@contextlib.contextmanager
def local_copy_errors(path: str, folder: str) -> Iterator[None]:
    """A failure to write the local copy of `path` (a URL) in `folder` names that folder, not the
    bucket (a full disk there is no reason to look at the bucket: a samples.npz of 50,000 images
    needs 9.8 GB of it)."""
    try:
        yield
    except StorageError:  # the bucket's own errors (a read inside the writer) say what they are
        raise
    except OSError as e:
        raise StorageError(f"{path} is written on this machine first, in {folder}, then uploaded whole, and that "
                           f"local copy failed ({described(e)}): free space in {folder}, or point TMPDIR at a folder "
                           "with room for the file") from None


def write_local_atomically(path: str, write: Callable[[BinaryIO], Any], temporary_prefix: str = "",
                            publish: Callable[[str, str], None] = os.replace) -> None:
    """Writes a local file through write(f) into a temporary beside it, then renames it into place
    (readable as umask allows; `publish=os.link` refuses an existing file instead). The temporary
    is `.NAME.tmp-HOST-PID-*`, which remove_temporaries clears after a kill, unless
    `temporary_prefix` names another."""
    folder = make_local_parent(path)
    prefix = temporary_prefix or f".{os.path.basename(path)}.tmp-{writer_tag()}-"
    # Named before it exists, so that a stop raised at any line after its creation (a SIGTERM
    # handler raises between any two) finds it in the finally below: with mkstemp a SIGTERM between
    # the file's creation and the `try` left it behind (1 sampling job stopped in 12).
    tmp = os.path.join(folder, prefix + uuid.uuid4().hex)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.chmod(tmp, 0o666 & ~umask())
        publish(tmp, path)
    finally:  # gone after os.replace; after os.link (or a failure) a second name to remove
        with contextlib.suppress(OSError):
            os.remove(tmp)


@contextlib.contextmanager
def writing(path: str, rerun: str) -> Iterator[None]:
    """An OSError of the writes inside as one StorageError naming `path`, the cause, its fix and
    `rerun`: what rerunning the command does once the cause is fixed."""
    try:
        yield
    except StorageError:
        raise
    except OSError as e:
        cause = f"cannot write {path} ({type(e).__name__}: {e})"
        if theirs := file_of_another_user(e, path):  # no rerun of this user's goes through until they act
            raise StorageError(f"{cause}; {'it' if theirs == path else theirs} belongs to {file_owner(theirs)}"
                               f"{sticky_words(os.path.dirname(theirs))}. Ask them to run the command, or copy the "
                               "workdir into a folder of this user's own (`cp -r`) and rerun it there") from None
        raise StorageError(f"{cause}; {write_fix(e)}, and {rerun}") from None


def file_of_another_user(error: OSError, path: str) -> str | None:
    """The local file that another user owns, of those a refused write names (a rename's target, the
    file opened) and `path`: in a shared folder with the sticky bit only they may replace it, and it may
    not be writable to this user either. 'Make the workdir writable' is no fix: the folder often is."""
    if error.errno not in (errno.EACCES, errno.EPERM):
        return None
    for name in (error.filename2, error.filename, path):
        if isinstance(name, str) and not is_url(name):
            with contextlib.suppress(OSError):
                if os.stat(name).st_uid != os.geteuid():
                    return name
    return None


# What a write that this user may not make raises: no write access to the folder or the file, a disk mounted read-only.
REFUSALS = (errno.EACCES, errno.EPERM, errno.EROFS)


def write_fix(error: OSError) -> str:
    """What gets a failed write through: what lifts the limit of the machine it met (`ulimit -f` or a quota: more
    free space would not help), or write access; either, where the error does not say which."""
    if error.errno in MACHINE_LIMITS:
        return MACHINE_LIMITS[error.errno][1]()
    if error.errno in REFUSALS:
        return "make the workdir writable"
    return "free space or make the workdir writable"


def write_json_atomically(path: str, value: Any) -> None:
    write_atomically(path, json.dumps(value, indent=2))


def history_path(path: str) -> str:
    """NAME_history.jsonl, the history of NAME.json (write_json_keeping_history)."""
    return path.removesuffix(".json") + "_history.jsonl"


def write_json_keeping_history(path: str, value: dict) -> None:
    """Writes NAME.json (the latest result) after adding `value`, time-stamped, as a line of
    NAME_history.jsonl, so a result that the next run replaces is not lost. Locally the line is
    appended in one write, so two jobs finishing at once (evaluations against two references) both
    keep theirs; in a bucket, which has no append, the history is rewritten whole."""
    append_json_line(history_path(path), {"time": utc_now(), **value})
    write_json_atomically(path, value)


def utc_now() -> str:
    """The time now, as the project's records stamp it (UTC, ISO 8601, to the second)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def append_json_line(path: str, value: Any) -> None:
    """Adds `value` as one JSON line at the end of `path` (made, with its folder, where it is not
    there yet). Locally the line is appended in one write (O_APPEND), so the lines of writers
    appending at once each stay whole. A bucket has no append: the file is read, and written back
    whole with the line added, which is NOT safe for two writers at once (the later upload drops the
    other's line), so one process of a job appends (process 0), and two jobs must not append to
    one file at the same moment."""
    line = json.dumps(value) + "\n"
    if is_url(path):
        write_atomically(path, (read_text(path) if exists(path) else "") + line)
        return
    make_local_parent(path)
    # O_NOFOLLOW (POSIX): as a whole-file write replaces a link, an append never writes the file it points at
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP and os.path.islink(path):
            raise StorageError(f"{path} is a link (to {os.readlink(path)}); a log that jobs append to is not written "
                               "through one (its lines would go into another file): remove the link, or put the "
                               "file itself in its place") from None
        raise
    try:
        append_whole(descriptor, line.encode())
    finally:
        os.close(descriptor)


def append_whole(descriptor: int, data: bytes) -> None:
    """Writes `data` at the end of an O_APPEND file, all of it or none. A disk that fills up, a quota or
    a file size limit (`ulimit -f`) lets a write in part, without an error: the line was left cut
    short, and the next job's line joined to it, so neither read as JSON. The rest is written again,
    which raises the cause; the part written is then taken back (where no other writer appended
    after it) and the cause raised."""
    written = 0
    try:
        while written < len(data):
            written += os.write(descriptor, data[written:])
    except OSError:
        end = os.lseek(descriptor, 0, os.SEEK_CUR)  # just past this line's part
        if written and os.fstat(descriptor).st_size == end:
            os.ftruncate(descriptor, end - written)
        raise


# What os.link raises on a file system without hard links (gcsfuse, s3fs, blobfuse mounts).
NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS)


def create_file(path: str, data: bytes) -> bool:
    """Writes `path` whole where nothing is there yet: False, and nothing written, when another
    writer got there first. Locally a complete temporary file is hard-linked into place (a link
    refuses an existing name; on a file system without hard links, some FUSE mounts, an exclusive
    create, then the write); in a bucket one create-only upload (ifGenerationMatch=0), which the
    store refuses if the object appeared since the existence check."""
    return create_once(path, lambda f: f.write(data), lambda fs, key: fs.pipe_file(key, data, mode="create"))


def create_once(path: str, write: Callable[[BinaryIO], Any], upload: Callable[[Any, str], Any]) -> bool:
    """create_file's way of writing: write(file) locally, upload(fsspec file system, key) in a bucket."""
    if is_url(path):
        fs, key = asked_of_the_bucket(path)  # a file released by another host since a listing is free
        if fs.exists(key):
            return False
        try:
            upload(fs, key)
        except Exception:  # a precondition failure (412), whatever the client calls it
            if fs.exists(key):
                return False
            raise
        return True
    try:
        write_local_atomically(path, write, publish=os.link)
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
            write(f)
    except BaseException:  # not left half-written, where it would read as another writer's
        os.remove(path)
        raise
    return True


def create_json(path: str, value: Any) -> bool:
    """create_file for a JSON value."""
    return create_file(path, json.dumps(value, indent=2).encode("utf-8"))


def upload_file_atomically(local_file: str, path: str) -> None:
    """Publishes a finished local file at `path` (a URL: one upload; local: a rename or copy)."""
    copy = copying(local_file)
    if is_url(path):
        def upload(p):
            with p.open("wb") as target:
                copy(target)

        on_remote(path, upload)
    else:
        write_local_atomically(path, copy)


def upload_file_once(local_file: str, path: str) -> bool:
    """upload_file_atomically where nothing is at `path` yet: False, and nothing written, when
    another writer got there first (as create_file)."""
    def create() -> bool:
        return create_once(path, copying(local_file), lambda fs, key: fs.put_file(local_file, key, mode="create"))

    return on_remote(path, lambda _: create()) if is_url(path) else create()


def copying(local_file: str) -> Callable[[BinaryIO], None]:
    """A writer that copies `local_file` into the file it is given, 16 MiB at a time."""
    def copy(target: BinaryIO) -> None:
        with open(local_file, "rb") as source:
            shutil.copyfileobj(source, target, 16 << 20)

    return copy


def remove(path: str) -> None:
    if is_url(path):
        on_remote(path, lambda p: p.unlink(missing_ok=True))
    else:
        with contextlib.suppress(FileNotFoundError):  # not an exists() check first: another process may remove it
            os.remove(path)


def rmtree(path: str) -> None:
    if is_url(path):
        # reads.exists: epath's answers from a listing kept from before, and False for a refused request
        if exists(path):
            on_remote(path, lambda p: p.rmtree())
    else:
        shutil.rmtree(path, ignore_errors=True)


def move(source: str, target: str) -> None:
    """Moves a file or a folder to a path that does not exist yet (in an object store: copies each
    object within the store, then deletes the originals)."""
    if is_url(source):
        def move_objects(_):
            import fsspec

            fs, key = fsspec.core.url_to_fs(source)
            fs.mv(key, fsspec.core.url_to_fs(target)[1], recursive=True)

        on_remote(source, move_objects)
    else:
        make_local_parent(target)
        shutil.move(source, target)  # a rename, or a copy where the target is on another disk


def move_file_once(source: str, target: str) -> bool:
    """Moves a file to `target` where nothing is there yet: False, and nothing moved, when something
    is (another writer's file is never replaced, as by create_file). Locally a hard link refuses an
    existing name (without hard links: the name taken by an exclusive create, then replaced by the
    file). In a bucket the copy within the store takes no precondition: the target is checked just
    before it, which leaves that instant open."""
    if is_url(source):
        if exists(target):  # reads.exists: a failed request raises, where fsspec's exists() answers "free"
            return False
        move(source, target)
        return True
    try:
        os.link(source, target)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in NO_HARD_LINKS:
            raise
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666 & ~umask()))
        except FileExistsError:
            return False
        try:
            os.replace(source, target)  # over the empty file just created here
        except BaseException:
            os.remove(target)  # the name taken for this move only: no empty file under it
            raise
        return True
    os.remove(source)
    return True


def missing_folders(folder: str) -> list[str]:
    """A local `folder` and the folders above it that do not exist yet, deepest first."""
    missing, path = [], os.path.abspath(folder)
    while not os.path.lexists(path) and path != os.path.dirname(path):
        missing.append(path)
        path = os.path.dirname(path)
    return missing


@contextlib.contextmanager
def removed_if_left_empty(folder: str, remover: bool = True) -> Iterator[None]:
    """A local folder that did not exist before the block is removed after it if nothing was
    written there (a job that failed at its start leaves no empty folder), and so are the folders
    above it made with it (new/deeper/run left new/). `remover`: whether this process is the one that
    removes them (process 0 of a job)."""
    made_here = missing_folders(folder) if remover and not is_url(folder) else []
    try:
        yield
    finally:
        for path in made_here:
            with contextlib.suppress(OSError):  # rmdir removes only an empty folder
                os.rmdir(path)


# A job's workdir: the usual cause is a run or a sampling job's folder copied read-only (a shared disk), which
# every mode can still read from a workdir of its own.
READ_ONLY_RUN_FIX = ("name a folder this user can write to (what a read-only folder holds is still read from another "
                     "workdir: --config.sample.checkpoint=RUN samples, inspects or serves a training run, "
                     "--config.eval.samples=FOLDER/samples.npz evaluates a sampling job's images, and "
                     "convert_torch_ckpt.py --jax_checkpoint=RUN exports a run)")


def check_writable(folder: str, fix: str = READ_ONLY_RUN_FIX) -> None:
    """Writes and deletes a probe file in `folder`, so that a missing bucket, missing credentials
    or no write access stop a job before its first step, with the cause. `fix`: what to do when a
    local folder cannot be written, in the words of the command that writes there."""
    probe = join(folder, f".write_check.tmp-{writer_tag()}-probe")  # a kill leaves it to remove_temporaries
    if not is_url(folder) and (file := file_in_the_way(os.path.abspath(folder))):
        # a_file/out: the OS names only the folder it cannot make ("Not a directory")
        where = folder if file == os.path.abspath(folder) else f"{file} (above {folder})"
        if broken := broken_link_words(file):  # its folder moved or deleted since it was linked
            raise StorageError(f"{where} {broken}: point the link at the folder, or name the folder itself")
        raise StorageError(f"{where} is a file, not a folder: name a folder (new or existing) for the outputs")
    try:
        makedirs(folder)
        write_atomically(probe, b"")
        remove(probe)
    except StorageError:
        raise
    except Exception as e:  # gcsfs / google-auth / OS errors: one message with the cause
        if isinstance(e, FileNotFoundError) and (missing := missing_bucket_words(folder)):
            raise StorageError(f"cannot write to {folder}: it {missing}") from None
        hint = f" ({CHECK_ACCESS}, and that they may write there)" if is_url(folder) else f": {fix}"
        raise StorageError(f"cannot write to {folder}: {described(e)}{hint}") from None
