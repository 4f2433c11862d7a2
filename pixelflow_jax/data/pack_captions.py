"""Packs a captioned image folder (NAME.jpg + NAME.txt, as img2dataset writes) into ArrayRecord
shards for text-to-image training (config.data.source='array_record'):

    python -m pixelflow_jax.data.pack_captions --folder=DIR --output=gs://BUCKET/shards [--records_per_shard=5000]

Each record is msgpack {"image": the file's bytes as stored, "caption": UTF-8 text, "name": the
image's path in the folder, for messages}. Images are not re-encoded, so packing is I/O bound:
files are read storage.reads.READ_THREADS at a time. Shards are named captions-00003-of-00012.array_record and
each appears whole (written locally, then renamed or uploaded); a pack that fails part-way, or is
stopped (Ctrl-C, SIGTERM), removes the shards it wrote (and the folder it made for them); an output
folder that already holds shards is refused (a shard another pack writes there meanwhile, at its
own name or at one the smaller set below is renamed to, is never replaced: the pack stops), and so
is a folder without one usable caption (nothing is written).
Files whose header is no image's are skipped and counted (a pack of none is refused); each shard
holds the next records_per_shard images, and a set that came out smaller than the captions
promised is renamed to its size at the end.
"""

from __future__ import annotations

import argparse
import sys

from pixelflow_jax.command_line import (Terminated, exit_without_teardown, handle_ctrl_c_from_the_start,
                                        raise_dropped_stops, stop_behind, stop_cause, stop_on_scheduler_signals,
                                        stop_on_sigterm)


def main() -> None:
    try:  # the handlers first (a stop the moment after one is in place is handled below too): these
        # imports take seconds (jax), and a stop meanwhile is one line too
        stop_on_sigterm()  # the shards written are removed, as on Ctrl-C
        stop_on_scheduler_signals()  # SLURM's --signal=USR1@120 too
        handle_ctrl_c_from_the_start()
        from pixelflow_jax import validation
        from pixelflow_jax.data.caption_data import MISSING_CAPTION_CHOICES
        from pixelflow_jax.data.caption_shards import counted, pack
        from pixelflow_jax.data.sources import DataError
        from pixelflow_jax.progress import say
        raise_dropped_stops()  # received while importing, inside jax's gc callback, which dropped it
    # A Ctrl-C, or one an import reworded (jaxlib's: an ImportError); any other error is a bug.
    except (KeyboardInterrupt, Terminated, Exception) as error:
        if (stop := stop_behind(error)) is None:
            raise
        cause, status = stop_cause(stop)
        exit_without_teardown(f"stopped: {cause}; nothing was packed", status)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="captioned image folder (local or gs://)")
    parser.add_argument("--output", required=True, help="folder for the shards (local or gs://)")
    parser.add_argument("--records_per_shard", type=int, default=5000)
    parser.add_argument("--missing_captions", choices=MISSING_CAPTION_CHOICES, default="error")
    args = parser.parse_args()
    try:
        output = validation.user_path("--output", args.output)
        counts = pack(args.folder, output, args.records_per_shard, args.missing_captions)  # pack reads --folder
    except (DataError, ValueError, OSError) as e:  # OSError: storage.StorageError, and local disks' own errors
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except (KeyboardInterrupt, Terminated) as stop:
        cause, status = stop_cause(stop)
        print(f"stopped: {cause}; nothing was packed into {args.output} (the shards written are removed)",
              file=sys.stderr)
        sys.exit(status)
    say(f"wrote {counted(counts['records'], 'record', 'records')} in {counted(counts['shards'], 'shard', 'shards')} "
        f"to {output}; skipped {counted(counts['skipped_captions'], 'unusable caption', 'unusable captions')}, "
        f"{counted(counts['skipped_images'], 'file that is not an image', 'files that are not images')} and "
        f"{counted(counts['missing_captions'], 'image without a caption', 'images without a caption')}")


if __name__ == "__main__":
    try:
        main()
    except (KeyboardInterrupt, Terminated) as stop:  # outside main's own handling: its arguments, its last line
        cause, status = stop_cause(stop)
        exit_without_teardown(f"stopped: {cause}", status)
