"""Captioned training data for text-to-image runs: random-access sources of (encoded image, caption).

    folder        ROOT/**/NAME.jpg + ROOT/**/NAME.txt (UTF-8 caption), the layout img2dataset's
                  `files` output writes (ROOT/00000/000000012.jpg + .txt + .json). An image without
                  a caption file is an error that names it, or (data.missing_captions='skip') is left
                  out and counted.
    array_record  ROOT/*.array_record shards of msgpack records {"image": bytes, "caption": str},
                  written from a captioned folder by `python -m pixelflow_jax.data.pack_captions`: the
                  format for pods (a few large files instead of millions of small ones).
    demo          demo_data.CaptionedDemoSource ("a red disk", ...), built in.

Each record gives {"image": bytes or pixels, "caption": bytes or str, "name"}; data.py decodes
both (a caption that is not UTF-8, or empty, is skipped and counted like an unreadable image) and
tokenizes the caption for the frozen text encoder.
"""

from __future__ import annotations

import os

from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.data.loader import IMAGE_EXTENSIONS, DataError, check_array_record_reads

CAPTION_EXTENSION = ".txt"
RECORD_EXTENSION = ".array_record"
MISSING_CAPTION_CHOICES = ("error", "skip")


class CaptionError(ValueError):
    """A caption that cannot train (not UTF-8, empty): its record is skipped and counted."""


def decode_caption(caption: bytes | str) -> str:
    if isinstance(caption, (bytes, bytearray)):
        try:
            caption = bytes(caption).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CaptionError(f"caption is not UTF-8 ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
    caption = caption.strip()
    if not caption:
        raise CaptionError("caption is empty (caption dropout already trains the empty prompt); write a caption "
                           "or remove the image")
    return caption


def _walk_files(root: str) -> list[str]:
    """Every file under root (any depth), as full paths, in sorted order."""
    paths = [storage.join(root, name) for name in storage.list_files(root)]
    for folder in storage.list_folders(root):
        paths += _walk_files(storage.join(root, folder))
    return paths


class CaptionedFolderSource:
    """Images with sidecar captions (NAME.ext + NAME.txt) anywhere under root."""

    def __init__(self, root: str, missing_captions: str = "error"):
        if missing_captions not in MISSING_CAPTION_CHOICES:
            raise DataError(f"data.missing_captions must be one of {MISSING_CAPTION_CHOICES}, got {missing_captions!r}")
        if not storage.isdir(root):
            raise DataError(f"captioned image folder {root} does not exist; set config.data.root to a folder of "
                            "images with a caption file each (NAME.jpg + NAME.txt, as img2dataset writes)")
        files = _walk_files(root)
        captions = {path[:-len(CAPTION_EXTENSION)] for path in files if path.endswith(CAPTION_EXTENSION)}
        images = [path for path in files if path.lower().endswith(IMAGE_EXTENSIONS)]
        self.records = [(path, os.path.splitext(path)[0] + CAPTION_EXTENSION) for path in images
                        if os.path.splitext(path)[0] in captions]
        missing = [path for path in images if os.path.splitext(path)[0] not in captions]
        self.missing_captions = len(missing)
        if missing and missing_captions == "error":
            raise DataError(f"{len(missing)} of {len(images)} images under {root} have no caption file "
                            f"(NAME{CAPTION_EXTENSION} beside NAME.jpg), e.g. {missing[:3]}; add the captions or set "
                            "--config.data.missing_captions=skip to leave those images out")
        if missing:
            logging.warning("%s: %d images without a caption file left out (data.missing_captions=skip), e.g. %s",
                            root, len(missing), missing[:3])
        if not self.records:
            raise DataError(f"no captioned images under {root} (expected NAME.ext + NAME{CAPTION_EXTENSION} with ext "
                            f"one of {', '.join(IMAGE_EXTENSIONS)})")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        image, caption = self.records[index]
        return {"image": storage.read_bytes(image), "caption": storage.read_bytes(caption), "name": image}


def encode_record(image: bytes, caption: str) -> bytes:
    import msgpack

    return msgpack.packb({"image": bytes(image), "caption": caption}, use_bin_type=True)


def decode_record(record: bytes) -> dict:
    import msgpack

    value = msgpack.unpackb(record, raw=False)
    if not isinstance(value, dict) or "image" not in value or "caption" not in value:
        raise DataError("an ArrayRecord record is not a msgpack map with 'image' and 'caption' (write shards with "
                        "python -m pixelflow_jax.data.pack_captions)")
    return value


def record_shards(root: str) -> list[str]:
    if not storage.isdir(root):
        raise DataError(f"ArrayRecord folder {root} does not exist; set config.data.root to the folder that "
                        f"python -m pixelflow_jax.data.pack_captions wrote")
    shards = [storage.join(root, name) for name in storage.list_files(root) if name.endswith(RECORD_EXTENSION)]
    if not shards:
        raise DataError(f"{root} has no *{RECORD_EXTENSION} shards")
    return shards


class CaptionRecordSource:
    """ArrayRecord shards of (image, caption) records, local or in a bucket (read in place: each
    record is one ranged read, so nothing is copied to local disk first)."""

    def __init__(self, root: str):
        from grain.sources import ArrayRecordDataSource

        check_array_record_reads(root)
        self.root, self.shards = root, record_shards(root)
        self.source = ArrayRecordDataSource(self.shards)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = decode_record(self.source[index])
        return {"image": record["image"], "caption": record["caption"], "name": f"{self.root}:{index}"}


def make_captioned_source(data_config):
    """The configured captioned source (for models with text cross-attention)."""
    kind = data_config.source
    if kind == "folder":
        return CaptionedFolderSource(data_config.root, data_config.missing_captions)
    if kind == "array_record":
        return CaptionRecordSource(data_config.root)
    if kind == "demo":
        from pixelflow_jax.data.demo_data import CaptionedDemoSource

        return CaptionedDemoSource(data_config.demo_num_images, seed=data_config.demo_seed,
                                   num_classes=data_config.demo_num_classes, resolution=data_config.resolution)
    raise DataError(f"config.data.source {kind!r} has no captions; a text-conditional model trains on 'folder' "
                    "(NAME.jpg + NAME.txt), 'array_record' or 'demo'")
