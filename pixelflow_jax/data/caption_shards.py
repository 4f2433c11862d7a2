"""Packs a captioned image folder into ArrayRecord shards: the work of the packer tool
(`python -m pixelflow_jax.data.pack_captions`, whose doc describes the shards), for Python callers
and tests."""

from __future__ import annotations

import io
import os
import tempfile

from PIL import Image

from pixelflow_jax import storage, validation
from pixelflow_jax.data.caption_data import (RECORD_EXTENSION, CaptionedFolderSource, CaptionError, decode_caption,
                                             encode_record)
from pixelflow_jax.data.pil_warnings import silence_pil_warnings_without_a_fix
from pixelflow_jax.data.sources import DataError, read_with_folder
from pixelflow_jax.progress import Progress, say

silence_pil_warnings_without_a_fix()  # its header check opens every image the loader will


def pack(folder: str, output: str, records_per_shard: int = 5000, missing_captions: str = "error") -> dict:
    """Writes the shards; returns the counts {"records", "shards", "skipped_captions",
    "skipped_images", "missing_captions"} (the last: images without a caption file, skipped)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    if records_per_shard < 1:
        raise ValueError(f"--records_per_shard must be positive, got {records_per_shard}")
    if not str(output).strip():
        raise ValueError("--output is empty: name a folder for the shards")
    # As the packer's flags are read: a mistyped URL (gs:/b) is refused, never packed into a local folder of that name.
    folder, output = validation.user_path("--folder", folder), validation.user_path("--output", output)
    if read_with_folder(output, folder):
        raise ValueError(f"--output {output} is inside the captioned folder {folder}, which the shards would then "
                         "be part of; choose a folder outside it")
    if storage.isfile(output):
        raise ValueError(f"--output {output} is a file; name a folder for the shards")
    existing = [name for name in storage.list_files(output) if name.endswith(RECORD_EXTENSION)]
    if existing:
        raise ValueError(f"{output} already holds {counted(len(existing), 'shard', 'shards')} (e.g. {existing[0]}; a "
                         "pack killed with SIGKILL part-way leaves the shards it finished); pack into an empty folder, "
                         "or delete the old shards first")
    source = CaptionedFolderSource(folder, missing_captions, root_flag="--folder", missing_flag="--missing_captions")
    records, skipped = [], 0
    # Captions first: a bad one is known before any shard.
    captions = storage.read_in_order(storage.read_bytes, [caption_path for _, caption_path in source.records])
    for (image_path, _), caption in zip(source.records, captions):
        try:
            records.append((image_path, decode_caption(caption)))
        except CaptionError as e:
            skipped += 1
            show_skip(skipped, image_path, e, "unusable captions")
    captions.close()  # its threads end here
    if not records:
        raise ValueError(f"none of the {len(source.records)} captioned images under {folder} has a usable caption "
                         "(see the lines above); nothing written")
    planned = -(-len(records) // records_per_shard)  # fewer if files turn out to be no images
    with storage.removed_if_left_empty(output):  # a pack that wrote nothing leaves no empty folder behind
        storage.makedirs(output)
        progress = Progress(len(records), "packing", "image")
        written, skipped_images, uploading = [], 0, False
        images = storage.read_in_order(storage.read_bytes, [image_path for image_path, _ in records])
        unread = iter(records)
        try:
            with tempfile.TemporaryDirectory(prefix="pixelflow_pack_") as scratch:
                while True:  # each shard takes the next records_per_shard images
                    local = os.path.join(scratch, f"shard-{len(written)}")
                    writer = ArrayRecordWriter(local, "group_size:1")  # one record per chunk: fast random access
                    packed = 0
                    for image_path, caption in unread:
                        image = next(images)
                        progress.update()
                        if problem := not_an_image(image):
                            skipped_images += 1
                            show_skip(skipped_images, image_path, problem, "files that are not images")
                            continue
                        writer.write(encode_record(image, caption, image_path))
                        packed += 1
                        if packed == records_per_shard:
                            break
                    writer.close()
                    if not packed:  # the reader refuses an empty shard
                        break
                    # Listed before its upload, so that a stop as the upload ends cannot leave it behind.
                    written.append(storage.join(output, shard_name(len(written), planned)))
                    uploading = True
                    published = storage.upload_file_once(local, written[-1])
                    uploading = False
                    if not published:  # another pack's: neither replaced nor removed here
                        raise DataError(f"{written.pop()} appeared while this pack was writing it: another pack is "
                                        f"writing into {output}; let one pack write there")
                    os.remove(local)
            if len(written) < planned:  # the names give the set's size: rename a set that came out smaller
                for index, path in enumerate(written):
                    renamed = storage.join(output, shard_name(index, len(written)))
                    if not storage.move_file_once(path, renamed):  # another's: neither replaced nor removed here
                        raise DataError(f"{renamed} appeared while this pack renamed its {len(written)} shards to "
                                        "their count, and this pack did not write it: another pack is writing into "
                                        f"{output}, or a file was put there; it is kept. Let one pack write there, "
                                        "into an empty folder")
                    written[index] = renamed
        except BaseException as e:  # a part of a pack is no dataset (Ctrl-C, SIGTERM too): leave the folder as it was
            for path in written:
                storage.remove(path)
            if not isinstance(e, Exception):
                raise
            finished = len(written) - uploading  # a shard whose upload failed was never written
            removed = (f"the {counted(finished, 'shard it had written is', 'shards it had written are')} removed"
                       if finished else "no shard had been written")
            raise DataError(f"{type(e).__name__}: {e} (packing stopped; {removed})") from e
        finally:
            images.close()  # a pack that stopped: the reads still in flight end here
            progress.close()
        if not written:
            raise DataError(f"none of the {len(records)} captioned files under {folder} is an image (see the lines "
                            "above); nothing written")
        return {"records": len(records) - skipped_images, "shards": len(written), "skipped_captions": skipped,
                "skipped_images": skipped_images, "missing_captions": source.missing_captions}


# Skips named one by one, of each kind; then only counted (a scraped set may skip millions).
SHOWN_SKIPS = 20


def show_skip(count: int, image_path: str, problem, kind: str) -> None:
    """Names the `count`th skip of a kind while it is among the first SHOWN_SKIPS; the first past
    them says that the rest are counted (a pack of exactly SHOWN_SKIPS skips has no rest)."""
    if count <= SHOWN_SKIPS:
        say(f"skipping {image_path}: {problem}")
    if count == SHOWN_SKIPS + 1:
        say(f"(further {kind} are counted in the summary, not named)")


def counted(count: int, one: str, many: str) -> str:
    """'1 shard', '2 shards': the summary of a small pack reads as English."""
    return f"{count} {one if count == 1 else many}"


def shard_name(index: int, num_shards: int) -> str:
    return f"captions-{index:05d}-of-{num_shards:05d}{RECORD_EXTENSION}"


def not_an_image(data: bytes) -> str | None:
    """Why a file is no image by its header (empty, text, an unknown format); None for an image.
    Only the header is read, to keep packing I/O bound: damage further in is found by the loader,
    which skips the image and counts it."""
    try:
        with Image.open(io.BytesIO(data)):
            return None
    except Image.DecompressionBombError as e:  # the loader would not decode it either
        return f"too large to decode ({e})"
    except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        return f"not an image ({type(e).__name__})"
