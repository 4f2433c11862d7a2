"""The one path layer: every file the project reads or writes goes through here, so a path may be
local or an object-store URL (gs://; etils.epath with gcsfs).

Object stores have no atomic rename and no append. What keeps the project's promises there:
  - `write_atomically` uploads one complete object; a store publishes an object only when its
    upload completes, so a reader sees the whole file or none (locally: a temporary file renamed);
  - checkpoints are orbax's, finalised by a commit marker on object stores (a rename locally);
  - a file that grows (metrics.jsonl, a result's history, a log of jobs: `append_json_line`) is
    rewritten whole, not appended to: one writer at a time;
  - folders do not exist on a store: `makedirs` does nothing there, and a "folder" exists once an
    object under it does.
A URL is never passed to os.path.abspath or open(): `absolute` leaves it as it is.

The modules, by job: paths (URLs told from local paths, checked as users write them), remote (the
bucket client and its errors), reads, writes, temporaries (who writes a temporary, clearing those
of killed writers) and cache (local copies of remote files). Callers use the names below, as
`storage.join(...)`.
"""

from pixelflow_jax.storage.cache import cache_dir, cached_copy
from pixelflow_jax.storage.paths import (StorageError, absolute, basename, check_supported, dirname, is_inside,
                                         is_url, join, resolved, user_path)
from pixelflow_jax.storage.reads import (broken_link_words, exists, file_fingerprint, file_owner, file_sizes,
                                           fingerprint, isdir, isfile, list_entries, list_files, list_folders, listdir,
                                           local_file, missing_bucket_words, missing_path_words, open_file, parse_json,
                                           read_bytes, read_in_order, read_json, read_json_lines, read_text,
                                           size_and_mtime, slash_after_a_file, sticky_words, too_deeply_nested)
from pixelflow_jax.storage.remote import CHECK_ACCESS
from pixelflow_jax.storage.temporaries import (WRITER, clear_leftovers_of_killed_writers, folders_of_gone_writers,
                                               make_folder, process_alive, remove_abandoned_dirs, remove_temporaries,
                                               temporary_dir, writer_gone, writer_tag)
from pixelflow_jax.storage.writes import (append_json_line, check_writable, create_file, create_json, file_in_the_way,
                                           history_path, makedirs, move, move_file_once, remove,
                                           removed_if_left_empty, rmtree, upload_file_atomically, upload_file_once,
                                           utc_now, write_atomically, write_json_atomically,
                                           write_json_keeping_history, write_streamed_atomically, writing)

__all__ = [
    "CHECK_ACCESS", "WRITER", "StorageError", "absolute", "append_json_line", "basename", "broken_link_words",
    "cache_dir", "cached_copy",
    "check_supported", "check_writable", "clear_leftovers_of_killed_writers", "create_file", "create_json", "dirname",
    "exists", "file_fingerprint", "file_in_the_way", "file_owner", "file_sizes", "fingerprint",
    "folders_of_gone_writers",
    "history_path", "is_inside", "is_url", "isdir", "isfile", "join", "list_entries", "list_files", "list_folders",
    "listdir", "local_file", "make_folder", "makedirs", "missing_bucket_words", "missing_path_words", "move",
    "move_file_once", "open_file", "parse_json", "process_alive",
    "read_bytes", "read_in_order", "read_json", "read_json_lines", "read_text", "remove", "remove_abandoned_dirs",
    "remove_temporaries",
    "removed_if_left_empty", "resolved", "rmtree", "size_and_mtime", "slash_after_a_file", "sticky_words",
    "temporary_dir", "too_deeply_nested", "upload_file_atomically",
    "upload_file_once", "user_path", "utc_now", "write_atomically", "write_json_atomically",
    "write_json_keeping_history", "write_streamed_atomically", "writer_gone", "writer_tag", "writing",
]
