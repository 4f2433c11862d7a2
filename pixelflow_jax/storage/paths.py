"""Paths as users write them: local folders and object-store URLs told apart, and a URL that
lost part of its "://" refused rather than taken for a local folder. No I/O here, but for local
names looked up on disk: one that starts or ends with whitespace (check_spaced_names), a ".." after a
link (physical_parent_steps) and an accented one (spelled_as_on_disk)."""

from __future__ import annotations

import os
import re
import unicodedata

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


def not_a_path(value) -> str:
    """What was given for a path, shortly: an array (a notebook's images passed for their file) by
    its shape, as its repr runs to pages."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return (f"an array of shape {tuple(value.shape)} ({value.dtype}): save it to a file, e.g. np.savez(path, "
                "images), and pass that file's path")
    return repr(value)


def user_path(path: str) -> str:
    """A path as a user wrote it (a flag, a config value, an API argument), ready for this layer:
    `~` expanded (the shell leaves `--flag=~/x` as it is), ".." taken as the system takes it
    (physical_parent_steps), an accented name found in the Unicode form it has on disk
    (spelled_as_on_disk), URLs unchanged, a URL without its "//" refused rather than taken for a
    local folder, and a new local name with a space at its start or end refused (check_spaced_names)."""
    if not isinstance(path, (str, os.PathLike)):
        raise StorageError(f"expected a path (a string or os.PathLike), got {not_a_path(path)}")
    path = str(path)
    if broken := _BROKEN_URL.match(path):
        scheme_name = broken[0].rstrip(":;./")
        rest = path[broken.end():].lstrip("/\\")
        meant, local = meant_scheme(scheme_name), f"or ./{path} for a local folder of that name"
        if meant.lower() == "file":  # file:/x is a file URL, not a broken one
            raise StorageError(f"{path}: write the local path itself ({file_url_path(rest)}), "
                               f"not a file: URL ({local})")
        if meant not in (*SUPPORTED_SCHEMES, "hf"):  # a mended URL would only be refused next for its scheme
            raise StorageError(f'{path} looks like a URL without its "://", and {scheme_name}:// is not read here: '
                               f"{SUPPORTED_PATHS} ({local})")
        raise StorageError(f'{path} looks like a URL without its "://": write {meant}://{rest} ({local})')
    if is_url(path) and not re.fullmatch(_SCHEME, scheme(path)):
        # runs/gs://b (a URL pasted after a folder): as a "scheme", runs/gs would be refused in odd words
        url = re.search(rf"(?<![A-Za-z0-9+.-]){_KNOWN_SCHEMES}://.*", path, re.I)  # not the gs:// of runs/mygs://
        raise StorageError(f'{path} holds "://" inside a path: a URL starts with its scheme'
                           + (f" (write {url[0]})" if url else "")
                           + ', and a local path holding "://" is refused, so that a mistyped URL never becomes a '
                             'local folder')
    if is_url(path) and (bucket_url := gcs_url_of_web_address(path)):
        raise StorageError(f"{path} is the web address of {bucket_url}; buckets are read by their gs:// URLs: "
                           f"write {bucket_url}")
    if is_url(path) and (inner := re.match(rf"{_KNOWN_SCHEMES}:/+", path.split("://", 1)[1], re.I)):
        # --workdir=gs://$BUCKET/run with BUCKET=gs://name: mended by collapsing "//", it named gs://gs:/name/run
        fixed = f"{meant_scheme(inner[0].rstrip(':/'))}://{path.split('://', 1)[1][inner.end():]}"
        raise StorageError(f"{path} starts with two schemes (a variable that already holds one, after another?): "
                           f"write {fixed}")
    if is_url(path) and scheme(path).lower() == "file":
        raise StorageError(f"{path}: write the local path itself ({file_url_path(path.split('://', 1)[1])}), "
                           "not a file:// URL")
    if is_url(path) and scheme(path) in SUPPORTED_SCHEMES and not path.split("://", 1)[1].split("/", 1)[0]:
        # gs:///run, most likely gs://$BUCKET/run with BUCKET empty: the path after it is kept
        named = path.split("://", 1)[1].lstrip("/") or "..."
        raise StorageError(f"{path} names no bucket: write {scheme(path)}://BUCKET/{named}")
    if is_url(path) and path != path.strip():
        raise StorageError(f"{path!r} starts or ends with a space, which an object name keeps: write {path.strip()!r}")
    if is_url(path) and (spaced := [name for name in path.split("://", 1)[1].split("/") if name != name.strip()]):
        # gs://b/a /x (a quoting slip): unlike a local name, whether "a " exists would take a request,
        # so such a folder name is refused outright, as one at the URL's end is above.
        fixed = f"{scheme(path)}://" + "/".join(name.strip() for name in path.split("://", 1)[1].split("/"))
        raise StorageError(f"{path!r}: the folder name {spaced[0]!r} starts or ends with whitespace, which an object "
                           f"name keeps (a quoting slip?): write {fixed!r}")
    if is_url(path) and scheme(path) == "gs" and (refusal := bucket_name_refusal(path)):
        raise StorageError(refusal)
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
    if is_url(path):
        return path
    if (bucket_url := gcs_url_of_web_address(f"https://{path}")) and not os.path.lexists(path.split(os.sep)[0]):
        # storage.googleapis.com/b/run, its scheme lost in a copy: a new local folder of that name otherwise
        raise StorageError(f"{path} is the web address of {bucket_url} without its https://; buckets are read by "
                           f"their gs:// URLs: write {bucket_url} (or ./{path} for a local folder of that name)")
    path = spelled_as_on_disk(physical_parent_steps(os.path.expanduser(path)))
    check_spaced_names(path)
    check_unexpanded_variables(path)
    return path


# GCS's rule for bucket names (lower case letters, digits, "-", "_" and "."; starting and ending with a letter or digit)
_BUCKET_NAME = re.compile(r"[a-z0-9](?:[a-z0-9._-]*[a-z0-9])?")


def bucket_name_refusal(url: str) -> str | None:
    """Why a gs:// URL's bucket cannot exist, or None. The emulator and GCS answer such a name in
    other ways (a missing bucket, a 400), so it is named here: most often BUCKET, the README's
    placeholder, pasted as it is, or a name typed with capitals."""
    bucket = url.split("://", 1)[1].split("/", 1)[0]
    if _BUCKET_NAME.fullmatch(bucket):
        return None
    placeholder = " (BUCKET in the README's commands stands for your bucket's name)" if bucket == "BUCKET" else ""
    if variable := _VARIABLE.search(bucket):  # gs://$BUCKET/run from a container's exec-form command, a config file
        expanded = os.path.expandvars(url)
        meant = expanded if expanded != url else f"the bucket's name; {variable[0]} is not set here either"
        placeholder = f" ({variable[0]} is not expanded here, as a shell would: write {meant})"
    lowered = url.replace(f"://{bucket}", f"://{bucket.lower()}", 1)
    fix = f": write {lowered}" if _BUCKET_NAME.fullmatch(bucket.lower()) and not placeholder else ""
    return (f"{url}: {bucket!r} cannot be a bucket's name, which holds only lower case letters, digits, '-', '_' "
            f"and '.', and starts and ends with a letter or digit{placeholder}{fix}")


# Addresses of a bucket's objects on the web, as the Cloud console's pages and buttons give them
# (a folder's page, an object's details page, its "public URL" and "authenticated URL").
_WEB_ADDRESS_OF_OBJECTS = re.compile(
    r"https?://(?:(?:storage\.googleapis\.com|storage\.cloud\.google\.com)/"
    r"|console\.cloud\.google\.com/storage/browser/(?:_details/)?)([^/?#;]+)/?([^?#;]*)", re.I)


def gcs_url_of_web_address(path: str) -> str | None:
    """The gs:// URL of a bucket folder or object given by its web address, e.g.
    https://console.cloud.google.com/storage/browser/b/runs/a;tab=objects?project=p is gs://b/runs/a;
    None for any other path. Taken as a download address, such a workdir was refused with a wget to run."""
    from urllib.parse import unquote

    if not (address := _WEB_ADDRESS_OF_OBJECTS.match(str(path))):
        return None
    bucket, objects = unquote(address[1]), unquote(address[2]).rstrip("/")
    return f"gs://{bucket}/{objects}" if objects else f"gs://{bucket}"


def spelled_as_on_disk(path: str) -> str:
    """A local path whose names that do not exist are taken as the one name on disk that is the
    same text in another Unicode form. Folders copied from macOS keep names such as "müde" with the
    accent as a character of its own: the same on screen as the "müde" typed here, but other
    bytes, so a run there read as missing, and a training started a second folder of that name."""
    if path.isascii():  # (an ASCII name has no other form)
        return path
    names = path.split(os.sep)
    for index, name in enumerate(names):
        if not name or os.path.lexists(os.sep.join(names[:index + 1])):
            continue
        parent = os.sep.join(names[:index]) or (os.sep if index else os.curdir)
        try:
            same = [n for n in os.listdir(parent) if same_text(n, name)]
        except OSError:  # the parent is missing too, or cannot be listed: nothing further exists to find
            return os.sep.join(names)
        if len(same) != 1:
            return os.sep.join(names)
        names[index] = same[0]
    return os.sep.join(names)


def physical_parent_steps(path: str) -> str:
    """A local path whose ".." steps are taken as the system takes them: from the folder a link
    before them leads to. os.path.abspath (orbax's folders, the run's records) drops "link/.." as
    text, so with --workdir=link/../run a run's checkpoints went to one folder, its other files to
    another. The names after the last ".." are kept as written (links there stay links)."""
    names = path.split(os.sep)
    if ".." not in names:
        return path
    last = len(names) - 1 - names[::-1].index("..")
    return os.path.join(os.path.realpath(os.sep.join(names[:last + 1])), *names[last + 1:])


def same_text(a: str, b: str) -> bool:
    return unicodedata.normalize("NFC", a) == unicodedata.normalize("NFC", b)


def check_spaced_names(path: str) -> None:
    """Refuses a local path in which a file or folder name that does not exist yet starts or ends
    with whitespace: a quoting slip (--workdir='runs/a ') would otherwise make a folder whose name
    ends in a space, which `ls` shows as runs/a. A name that exists is kept as it is: it was made
    on purpose, or by such a slip before this check (a run to resume, data to read), and no
    other path reaches it."""
    names = path.split(os.sep)
    for index, name in enumerate(names):
        if name != name.strip() and not os.path.lexists(os.sep.join(names[:index + 1])):
            # a tab or newline is named whitespace (the repr shows which)
            blank, fix = ("a space", "space") if name.strip(" ") == name.strip() else ("whitespace", "whitespace")
            edges = " and ".join(edge for edge, char in (("starts", name[0]), ("ends", name[-1])) if char.isspace())
            # The names before it exist as spelled (stripped, they would name other folders); those after are new.
            fixed = os.sep.join(names[:index] + [part.strip() for part in names[index:]])
            raise StorageError(f"{path!r}: the name {name!r} {edges} with {blank} and does not exist (a quoting "
                               f"slip?): remove the {fix}" + (f", as in {fixed!r}" if fixed.strip(os.sep) else ""))


# $NAME or ${NAME}: an environment variable as a shell writes it.
_VARIABLE = re.compile(r"\$(\w+|\{\w+\})")


def check_unexpanded_variables(path: str) -> None:
    """Refuses a local path in which a name that does not exist holds an environment variable
    unexpanded: a shell expands $HOME, but a container's exec-form command, a config file or a
    Python string does not, and --workdir=$HOME/runs/a so given made a folder named "$HOME" in the
    current one. A name that exists is kept as it is (made on purpose, or by such a slip before)."""
    names = path.split(os.sep)
    for index, name in enumerate(names):
        if (variable := _VARIABLE.search(name)) and not os.path.lexists(os.sep.join(names[:index + 1])):
            expanded = os.path.expandvars(path)
            fix = (f"write the path it stands for, as in {expanded!r}" if expanded != path else
                   f"{variable[0]} is not set here either: write the path itself")
            raise StorageError(f"{path!r}: {variable[0]} is not expanded here (a shell expands it; a container's "
                               f"exec-form command, a config file and Python do not), and no name {name!r} exists: "
                               + fix)


def file_url_path(rest: str) -> str:
    """The local path a file URL names, from what follows its "file:" and slashes: a file URL's
    path is absolute and its host, if any, this machine: file://localhost/tmp/x is /tmp/x, and so
    is file://tmp/x, a slash short of file:///tmp/x (read as a URL, "tmp" would be a host)."""
    rest = rest.lstrip("/")
    if rest.lower().startswith("localhost/"):
        rest = rest[len("localhost/"):]
    return "/" + rest


def meant_scheme(name: str) -> str:
    """The scheme a user most likely meant: gs for gcs, lower case for a known one."""
    meant = {"gcs": "gs"}.get(name.lower(), name.lower())
    return meant if meant in (*SUPPORTED_SCHEMES, "hf") else name


# What check_supported and a broken URL's refusal say is read.
SUPPORTED_PATHS = ("paths are local or " + ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
                   + " (hf:// reads checkpoints and T5 folders only)")


def check_supported(path: str) -> None:
    """A path this layer reads and writes: local or gs:// (hf:// paths are read by hub.py alone)."""
    if is_url(path) and scheme(path) not in SUPPORTED_SCHEMES:
        schemes = ", ".join(f"{s}://" for s in SUPPORTED_SCHEMES)
        meant = meant_scheme(scheme(path))
        if scheme(path) == "hf":
            raise StorageError(f"{path}: hf:// (the Hugging Face Hub) is read here for checkpoints and T5 folders "
                               f"only: outputs and other files are local or {schemes}")
        hint = ""
        if scheme(path).lower() in ("http", "https"):  # a download address (as the README gives them), or an output
            hint = (": nothing is downloaded or uploaded at run time (an input: download it first, wget "
                    f"{path}, and pass the file's path)")
        elif meant in (*SUPPORTED_SCHEMES, "hf"):
            why = ": schemes are lower case" if meant == scheme(path).lower() else ""
            hint = f" (write {meant}://{path.split('://', 1)[1]}{why})"
        raise StorageError(f"{path}: unsupported URL scheme {scheme(path)}://{hint}; {SUPPORTED_PATHS}")


def absolute(path: str) -> str:
    """Local paths made absolute; URLs unchanged."""
    return str(path) if is_url(path) else os.path.abspath(path)


def resolved(path: str) -> str:
    """A local path made absolute with its symbolic links resolved (so two names of one folder
    compare equal); a URL without its trailing slash."""
    return str(path).rstrip("/") if is_url(path) else os.path.realpath(path)


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` lies below `folder`, not being it: a local path with symbolic links resolved
    (resolved), a URL by its names, so gs://b/x/y is inside gs://b/x and gs://b/xy is not; a
    trailing slash on either changes nothing."""
    return resolved(path).startswith(resolved(folder).rstrip("/") + "/")


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def basename(path: str) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else os.path.basename(path)


def dirname(path: str) -> str:
    if is_url(path):
        head = str(path).rstrip("/").rsplit("/", 1)[0]
        return head if "://" in head else str(path)  # gs://b's "head" is gs:/: a bucket is its own parent
    return os.path.dirname(path)
