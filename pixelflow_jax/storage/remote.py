"""Object-store access (gs:// through etils.epath and gcsfs): one place that configures gcsfs and
turns its many error types into one StorageError naming the path, the cause and what to check."""

from __future__ import annotations

import logging

from pixelflow_jax.error_text import described
from pixelflow_jax.storage.paths import StorageError, check_supported, scheme

class _RetriesGivenUpInOneLine(logging.Filter):
    """gcsfs logs a 40-line traceback when it gives up on a request (out of retries, or an error it
    does not retry, such as a 403); the StorageError raised next names the path, the cause and what
    to check, so the log keeps gcsfs's one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and ("out of retries" in message or "non-retriable exception" in message):
            record.exc_info = record.exc_text = None
        return True


def configure_gcsfs() -> None:
    """gcsfs caches folder listings per process by default, so files that other hosts (or other
    processes of this host) wrote stay invisible; every listing here must see the store as it is."""
    import fsspec.config

    for protocol in ("gs", "gcs"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)
    gcsfs_log = logging.getLogger("gcsfs")
    if not any(isinstance(f, _RetriesGivenUpInOneLine) for f in gcsfs_log.filters):
        gcsfs_log.addFilter(_RetriesGivenUpInOneLine())


def epath_of(path: str):
    check_supported(path)
    configure_gcsfs()
    try:
        from etils import epath

        return epath.Path(path)
    except ImportError as e:
        raise StorageError(f"{path}: reading {scheme(path)}:// needs gcsfs: pip install gcsfs ({e})") from None


def asked_of_the_bucket(url: str):
    """(fsspec file system, key) of a URL, the listings that file system keeps of the key and its
    folders dropped, so that its next answer comes from the bucket. Listings are kept where a
    user's fsspec config (or gcsfs's default, for a file system made before configure_gcsfs) asks
    for it, and they miss what other hosts and processes wrote or deleted since."""
    import fsspec

    fs, key = fsspec.core.url_to_fs(url)
    fs.invalidate_cache(key)
    return fs, key


CHECK_ACCESS = ("check the network, that the bucket exists, and the credentials: `gcloud auth application-default "
                "login` or a service account")


def on_remote(path: str, action):
    """action(epath.Path) for a URL; any failure other than a missing file becomes one StorageError
    naming the path, the cause and what to check."""
    p = epath_of(path)
    try:
        return action(p)
    except (FileNotFoundError, StorageError):
        raise
    except Exception as e:  # gcsfs, google-auth and aiohttp raise many types for the same few causes
        raise StorageError(f"{path}: {described(e)} ({CHECK_ACCESS})") from None
