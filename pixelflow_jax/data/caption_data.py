"""Captioned training data for text-to-image runs: random-access sources of (encoded image, caption).

    folder        ROOT/**/NAME.jpg + ROOT/**/NAME.txt (UTF-8 caption; NAME.TXT too), the layout
                  img2dataset's `files` output writes (ROOT/00000/000000012.jpg + .txt + .json);
                  hidden files and folders are left out. An image without a caption file is an
                  error that names it, or (data.missing_captions='skip') is left out and counted.
    array_record  ROOT/*.array_record shards of msgpack records {"image": bytes, "caption": str},
                  written from a captioned folder by `python -m pixelflow_jax.data.pack_captions`: the
                  format for pods (a few large files instead of millions of small ones). A numbered
                  set with a shard missing (NAME-00001-of-00003), or a shard that cannot be opened,
                  holds no records or holds other records (a TFDS build's), is an error naming it.
    demo          demo_data.CaptionedDemoSource ("a red disk", ...), built in.

Each record gives {"image": bytes or pixels, "caption": bytes or str, "name"}; decoding.py decodes
both (a caption that is not UTF-8 (UTF-16 or UTF-32, named by its byte-order mark), holds NULs
(UTF-16 without the mark), or is empty once a BOM and blanks are stripped, is skipped and counted
like an unreadable image) and tokenizes the caption for the frozen text encoder.
"""

from __future__ import annotations

import bisect
import codecs
import collections
import itertools
import os
import re
import unicodedata
from concurrent import futures
from typing import NamedTuple

from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.error_text import first_line
from pixelflow_jax.data.sources import (IMAGE_EXTENSIONS, SPLIT_NAMES, DataError, check_array_record_reads,
                                        ignored_name, listing_fingerprint, require_folder, training_split, walk_files,
                                        warn_unlisted)

CAPTION_EXTENSION = ".txt"
RECORD_EXTENSION = ".array_record"
MISSING_CAPTION_CHOICES = ("error", "skip")


class CaptionError(ValueError):
    """A caption that cannot train (not UTF-8, holding NULs, empty): its record is skipped and counted."""


# Byte-order marks of the encodings Windows editors save "Unicode" text in; UTF-32's first, since
# its little-endian mark starts with UTF-16's. (UTF-8's own mark is read and dropped.)
FOREIGN_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
                (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))


def marked_encoding(text: bytes) -> str | None:
    """UTF-16 or UTF-32 when `text` starts with that encoding's byte-order mark."""
    return next((name for bom, name in FOREIGN_BOMS if text.startswith(bom)), None)


def unmarked_encoding(text: bytes | str) -> str | None:
    """UTF-16LE/BE (or UTF-32LE/BE) when `text` holds NULs where that encoding puts them: that is
    how UTF-16 without its byte-order mark reads as UTF-8, each ASCII letter beside a NUL (which no
    text holds), and UTF-32 beside three. NULs elsewhere (one at the end of a file) are no encoding."""
    nul = b"\x00" if isinstance(text, bytes) else "\x00"
    if nul not in text:
        return None
    for width in (4, 2):  # UTF-32's pattern also fits UTF-16's: tried first
        if len(text) % width:  # whole code units only
            continue
        units = [text[i:i + width] for i in range(0, len(text), width)]
        for order, letter, padding in (("LE", slice(0, 1), slice(1, None)), ("BE", slice(-1, None), slice(0, -1))):
            ascii_units = sum(unit[padding] == nul * (width - 1) for unit in units)
            # Most units are an ASCII letter and its NULs (other characters fill both bytes), and no letter is a NUL.
            if 2 * ascii_units >= len(units) and not any(unit[letter] == nul for unit in units):
                return f"UTF-{8 * width}{order}"
    return None


def nul_count_words(text: bytes | str) -> str:
    """'3 NUL characters (the first at character 10)', or bytes for bytes."""
    nul, unit = (b"\x00", "byte") if isinstance(text, bytes) else ("\x00", "character")
    count = text.count(nul)
    return f"{count} NUL {unit}{'s' if count > 1 else ''} (the first at {unit} {text.index(nul)})"


def decode_caption(caption: bytes | str) -> str:
    if isinstance(caption, (bytes, bytearray)):
        caption = bytes(caption)
        if encoding := marked_encoding(caption):
            raise CaptionError(f"caption is {encoding} (it starts with a {encoding} byte-order mark), not UTF-8; "
                               f"{conversion(encoding)}")
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as e:
            legacy = windows_1252_text(caption, e.start)
            raise CaptionError(f"caption is not UTF-8 ({e.reason} at byte {e.start}); " + (
                f"it reads as {legacy}: {conversion(WINDOWS_1252)}" if legacy else "re-save it as UTF-8")) from None
    if encoding := unmarked_encoding(caption):
        raise CaptionError(f"caption holds NUL characters, as {encoding} text without a byte-order mark does; "
                           f"{conversion(encoding)}")
    if "\x00" in caption:  # a tool that padded or cut the file: no encoding puts them there
        raise CaptionError(f"caption holds {nul_count_words(caption)}, which no text holds; remove them, e.g. "
                           "tr -d '\\000' < NAME.txt > NAME.clean.txt, then replace NAME.txt with it")
    caption = caption.removeprefix("\ufeff").strip()  # a BOM (Windows editors write one) is no caption
    if not has_visible_text(caption):
        raise CaptionError("caption is empty, or only zero-width or control characters, which tokenize to nothing "
                           "(caption dropout already trains the empty prompt); write a caption or remove the image")
    return caption


WINDOWS_1252 = "WINDOWS-1252"


def windows_1252_text(data: bytes, start: int) -> str | None:
    """Where `data`, not UTF-8, is text in Windows-1252 (older Windows tools' and many scraped
    captions': é as one byte, a curly quote as another): the words "Windows-1252 text" and the text
    around byte `start`, quoted; None where it holds bytes that encoding leaves undefined, or ones
    that do not show."""
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        return None
    if not all(character.isprintable() or character in "\t\r\n" for character in text):
        return None
    return f"Windows-1252 text ({text[max(0, start - 30):start + 30]!r})"


def has_visible_text(text: str) -> bool:
    """Whether text holds a character that shows: zero-width spaces, byte-order marks and control
    characters alone tokenize to nothing, which trains (or samples) as the empty prompt."""
    return any(character.isprintable() and not character.isspace() for character in text)


def conversion(encoding: str) -> str:
    return (f"convert the file to UTF-8, e.g. iconv -f {encoding} -t UTF-8 NAME.txt > NAME.utf8.txt, then replace "
            "NAME.txt with it")


class CaptionedFolderSource:
    """Images with sidecar captions (NAME.ext + NAME.txt, the extensions in any case) anywhere
    under root; hidden files and folders and lost+found are left out. Messages name the settings
    as `root_flag` and `missing_flag` (the packer's flags are not the trainer's)."""

    def __init__(self, root: str, missing_captions: str = "error", root_flag: str = "--config.data.root",
                 missing_flag: str = "--config.data.missing_captions"):
        if missing_captions not in MISSING_CAPTION_CHOICES:
            raise DataError(f"{missing_flag} must be one of {MISSING_CAPTION_CHOICES}, got {missing_captions!r}")
        if not root:
            raise DataError(f"{root_flag} is not set: set it to a folder of images with a caption file each "
                            "(NAME.jpg + NAME.txt, as img2dataset writes)")
        require_folder(root, f"captioned image folder {root} does not exist; set {root_flag} to a folder of images "
                             "with a caption file each (NAME.jpg + NAME.txt, as img2dataset writes)")
        warn_of_split_folders(root, root_flag)
        unlisted: list[str] = []
        files = walk_files(root, unlisted=unlisted)
        warn_unlisted(root, unlisted)
        captions = caption_files(root, files)
        images = [path for path in files if path.lower().endswith(IMAGE_EXTENSIONS)]
        by_name = collections.defaultdict(list)
        for path in images:
            by_name[os.path.splitext(path)[0]].append(path)
        if shared := [paths for name, paths in by_name.items() if len(paths) > 1 and name in captions]:
            # One NAME.txt would caption both (cat.jpg and cat.png), which is right for at most one.
            raise DataError(f"{len(shared)} names under {root} belong to more than one image, which would share one "
                            f"caption file, e.g. {shared[:3]}; give each image its own name and caption file (or "
                            "remove the copies)")
        self.records = [(path, captions[os.path.splitext(path)[0]]) for path in images
                        if os.path.splitext(path)[0] in captions]
        missing = [path for path in images if os.path.splitext(path)[0] not in captions]
        self.missing_captions = len(missing)
        self.listing = listing_fingerprint(root, self.records)
        # cat.jpg.txt (named after the whole file name, as some tools write) is not read as cat.jpg's caption
        whole_name = [captions[path] for path in missing if path in captions]
        whole_name_hint = (f"; {len(whole_name)} of them have a caption file named after the image's whole file "
                           f"name, e.g. {whole_name[0]}: name those NAME{CAPTION_EXTENSION}" if whole_name else "")
        hints = whole_name_hint + other_case_hint(missing, captions)
        if missing:
            sidecars = set(json_sidecars(missing, files))  # named as such, not as tables of captions
            hints += other_tools_captions_hint(root, [path for path in files if path not in sidecars],
                                               none_captioned=not self.records)
            hints += json_sidecars_hint([path for path in files if path in sidecars])
        if missing and missing_captions == "error":
            raise DataError(f"{len(missing)} of {len(images)} images under {root} have no caption file "
                            f"(NAME{CAPTION_EXTENSION} beside NAME.jpg), e.g. {missing[:3]}{hints}; add the "
                            f"captions or set {missing_flag}=skip to leave those images out")
        if missing:
            logging.warning("%s: %d images without a caption file left out (missing_captions=skip), e.g. %s%s",
                            root, len(missing), missing[:3], hints)
        image_names = {os.path.splitext(path)[0] for path in images}
        orphans = sorted(path for name, path in captions.items() if name not in image_names)
        if orphans:  # often images lost in a copy, or in a format not read here
            logging.warning("%s: %d caption files have no image beside them (read: %s), e.g. %s", root, len(orphans),
                            ", ".join(IMAGE_EXTENSIONS), orphans[:3])
        if not self.records:
            shards = [path for path in files if path.endswith(RECORD_EXTENSION)]
            packed = (f"; it holds {len(shards)} ArrayRecord shards (e.g. {shards[0]}), which train with "
                      "--config.data.source=array_record" if shards else "")
            # (img2dataset's webdataset output has a Parquet table beside each archive: of URLs, not images)
            other_format = archives_hint(root, files) or dataset_tables_hint(files)
            raise DataError(f"no captioned images under {root} (expected NAME.ext + NAME{CAPTION_EXTENSION} with ext "
                            f"one of {', '.join(IMAGE_EXTENSIONS)}){packed}{f'; {other_format}' if other_format else ''}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        image, caption = self.records[index]
        return {"image": storage.read_bytes(image), "caption": storage.read_bytes(caption), "name": image}


def warn_of_split_folders(root: str, root_flag: str) -> None:
    """A dataset's top folder (ROOT/train/, ROOT/val/: only split folders) is read whole, every
    split trained on, which can be meant (a final model on all the data) but mostly is not: the log
    names the split to give instead."""
    files, folders = storage.list_entries(root)
    folders = [name for name in folders if not ignored_name(name)]
    splits = [name for name in folders if name.lower() in SPLIT_NAMES]
    if len(splits) < 2 or len(splits) < len(folders) or any(name.lower().endswith(IMAGE_EXTENSIONS) for name in files):
        return
    logging.warning("%s holds only the split folders %s, and every one is read (a captioned folder is read at any "
                    "depth), the validation or test images among them: to train on one split, set %s=%s", root,
                    ", ".join(splits), root_flag, storage.join(root, training_split(splits)))


def caption_files(root: str, files: list[str]) -> dict[str, str]:
    """{NAME: its caption file} of `files`: NAME.txt, or NAME.TXT (any case) without one; where a
    name has several, one warning names the files and the one read (NAME.txt, else the first listed)."""
    found = collections.defaultdict(list)
    for path in files:
        name, extension = os.path.splitext(path)
        if extension.lower() == CAPTION_EXTENSION:
            found[name].append(path)
    read = {name: next((path for path in paths if path.endswith(CAPTION_EXTENSION)), paths[0])
            for name, paths in found.items()}
    if doubled := [name for name, paths in found.items() if len(paths) > 1]:
        examples = "; ".join(f"{read[name]} is read, not {', '.join(p for p in found[name] if p != read[name])}"
                             for name in doubled[:3])
        logging.warning("%s: %d images have more than one caption file, differing only in the extension's case, "
                        "e.g. %s", root, len(doubled), examples)
    return read


def other_case_hint(missing: list[str], captions: dict[str, str]) -> str:
    """Where images lack captions: those whose caption file's name differs only in case (IMG_1.JPG
    beside img_1.txt), one name on macOS's and Windows' file systems, where such a folder was made,
    or only in its Unicode form (café with é as one character or as e + accent), which shows alike
    and is one name on macOS; '' where there are none."""
    by_form = {unicode_form(name): path for name, path in captions.items()}
    by_lower = {unicode_form(name).lower(): path for name, path in captions.items()}
    other_form, other_case = [], []
    for name in (unicode_form(os.path.splitext(path)[0]) for path in missing):
        if name in by_form:
            other_form.append(by_form[name])
        elif name.lower() in by_lower:
            other_case.append(by_lower[name.lower()])
    hint = ""
    if other_case:
        hint += (f"; {len(other_case)} of them have a caption file whose name differs from the image's only in case, "
                 f"e.g. {other_case[0]} (one name on macOS and Windows, two here): rename those to the image's name")
    if other_form:
        hint += (f"; {len(other_form)} of them have a caption file whose name differs from the image's only in its "
                 "Unicode form (an accent written apart from its letter, as macOS writes names, or not), e.g. "
                 f"{other_form[0]}: rename those to the image's name (convmv -r --nfc -f utf8 -t utf8 --notest ROOT "
                 "renames a folder's names to one form)")
    return hint


def unicode_form(name: str) -> str:
    """A file name in Unicode's composed form (NFC): é as one character, as macOS does not store it."""
    return unicodedata.normalize("NFC", name)


# Captions as other tools keep them, which this reader does not take: Hugging Face's imagefolder
# (one metadata file for the folder, as diffusers' training scripts read) and NAME.caption sidecars.
METADATA_FILES = ("metadata.jsonl", "metadata.csv", "metadata.parquet")
OTHER_SIDECAR_EXTENSION = ".caption"
# Tables a folder's captions are often kept in under any name (captions.csv, train.jsonl, ...).
TABLE_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".parquet")


def other_tools_captions_hint(root: str, files: list[str], none_captioned: bool) -> str:
    """Where images lack captions: the caption files of other layouts found among `files`, named
    as not read, with the layout to convert them to; '' where there are none. Where no image has a
    caption file, any table at the top of `root` is named too (where some have, a table there is
    more likely something else: a list of sources, a results file)."""
    found = [path for path in files if os.path.basename(path) in METADATA_FILES or
             path.lower().endswith(OTHER_SIDECAR_EXTENSION)]
    top = storage.dirname(storage.join(root, "name"))
    if none_captioned:
        found += [path for path in files if path not in found and storage.dirname(path) == top and
                  path.lower().endswith(TABLE_EXTENSIONS)]
    if not found:
        return ""
    named, verb = first_and_more(found, "such file")
    return (f"; {named} (another tool's captions) {verb} not read: write each image's caption into "
            f"NAME{CAPTION_EXTENSION} beside it")


JSON_SIDECAR_EXTENSION = ".json"


def json_sidecars(missing: list[str], files: list[str]) -> list[str]:
    """The NAME.json files among `files` of the images `missing` their captions (img2dataset writes
    one beside every image, the caption in it and in NAME.txt only given a caption column)."""
    names = {os.path.splitext(path)[0] for path in missing}
    return [path for path in files if os.path.splitext(path)[1].lower() == JSON_SIDECAR_EXTENSION and
            os.path.splitext(path)[0] in names]


def json_sidecars_hint(sidecars: list[str]) -> str:
    """Images' NAME.json files (json_sidecars), named as not read; '' where there are none."""
    if not sidecars:
        return ""
    named, verb = first_and_more(sidecars, "such file")
    return (f"; {named} (per-image metadata, as img2dataset writes beside each image, with the caption in "
            f"NAME{CAPTION_EXTENSION} only when given --caption_col) {verb} not read: write each image's caption into "
            f"NAME{CAPTION_EXTENSION} beside it")


def first_and_more(paths: list[str], noun: str) -> tuple[str, str]:
    """How a hint names the files it found, with its verb: ('a.tar and 3 more archives', 'are'), ('a.tar', 'is')."""
    more = len(paths) - 1
    if not more:
        return paths[0], "is"
    return f"{paths[0]} and {more} more {noun}{'s' if more > 1 else ''}", "are"


# Archives of a captioned set (webdataset's .tar shards, as img2dataset's webdataset output writes), not read.
ARCHIVE_EXTENSIONS = {".tar": "tar -xf $f -C", ".tar.gz": "tar -xzf $f -C", ".tgz": "tar -xzf $f -C",
                      ".zip": "unzip -q $f -d"}


def archives_hint(root: str, files: list[str]) -> str:
    """Where a folder holds no captioned images: the archives among `files` (full paths), named as
    not read, with a command that extracts them beside themselves; '' where there are none."""
    archives = [path for path in files if path.lower().endswith(tuple(ARCHIVE_EXTENSIONS))]
    if not archives:
        return ""
    kind = next(e for e in ARCHIVE_EXTENSIONS if archives[0].lower().endswith(e))
    extension = archives[0][-len(kind):]  # as spelled: the shell's *.zip finds no 00000.ZIP
    named, verb = first_and_more(archives, "archive")
    where = storage.dirname(archives[0])
    command = (f"for f in {where}/*{extension}; do mkdir ${{f%{extension}}}; {ARCHIVE_EXTENSIONS[kind]} "
               f"${{f%{extension}}}; done" if not storage.is_url(root) else "on a local copy of them")
    return (f"{named} {verb} not read (webdataset shards, as img2dataset's webdataset output writes, hold the images "
            f"and captions): extract them into folders, e.g. {command}")


# A Hugging Face dataset as the Hub serves it (Parquet shards) or as datasets' save_to_disk writes it (Arrow files).
DATASET_TABLE_EXTENSIONS = (".parquet", ".arrow")


def dataset_tables_hint(files: list[str]) -> str:
    """Where a folder holds no captioned images: its dataset tables among `files`, named as not
    read, with the layout to write their rows in; '' where there are none."""
    tables = [path for path in files if path.lower().endswith(DATASET_TABLE_EXTENSIONS)]
    if not tables:
        return ""
    named, verb = first_and_more(tables, "such file")
    return (f"{named} {verb} not read (a Hugging Face dataset's tables, which hold its images and captions): write "
            f"each row's image into a file, NAME.jpg, and its caption into NAME{CAPTION_EXTENSION} beside it")


def encode_record(image: bytes, caption: str, name: str = "") -> bytes:
    """A shard record: the image file's bytes, its caption and (for messages) the file's path (a
    name that is not UTF-8, as zip archives from Windows hold, with its odd bytes written as \\xe9)."""
    import msgpack

    name = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return msgpack.packb({"image": bytes(image), "caption": caption, "name": name}, use_bin_type=True)


NOT_CAPTIONED = "not a msgpack map with 'image' (bytes) and 'caption' (text)"


def decode_record(record: bytes) -> dict:
    import msgpack

    try:
        value = msgpack.unpackb(record, raw=False)
    except (ValueError, msgpack.UnpackException):  # no msgpack (a TFDS tf.Example): ExtraData, FormatError, ...
        value = None
    if (not isinstance(value, dict) or not isinstance(value.get("image"), bytes)
            or not isinstance(value.get("caption"), str)):
        raise DataError(f"an ArrayRecord record is {NOT_CAPTIONED} (write shards with python -m "
                        "pixelflow_jax.data.pack_captions)")
    return value


# pack_captions names its shards captions-00001-of-00003.array_record (six digits and more past
# 99,999 shards): such a set must be whole.
SHARD_NAME = re.compile(r"(.+)-\d{5,}-of-(\d{5,})" + re.escape(RECORD_EXTENSION))
TFDS_SHARD_NAME = re.compile(r".+" + re.escape(RECORD_EXTENSION) + r"-\d{5,}-of-\d{5,}")  # tfds build's files
REPACK = "copy the shards again, or pack the folder again with python -m pixelflow_jax.data.pack_captions"


def record_shards(root: str) -> list[str]:
    """The shards in root, refused when a numbered set (NAME-NNNNN-of-NNNNN) lacks one or mixes two packs."""
    require_folder(root, f"ArrayRecord folder {root} does not exist; set --config.data.root to the folder that "
                         "python -m pixelflow_jax.data.pack_captions wrote")
    files = [name for name in storage.list_files(root) if not ignored_name(name)]
    names = [name for name in files if name.endswith(RECORD_EXTENSION)]
    if not names:
        tfds_files = [name for name in files if TFDS_SHARD_NAME.fullmatch(name)]
        raise DataError(f"{root} has no *{RECORD_EXTENSION} shards" + (
            f": {tfds_files[0]} and the like are a TFDS build's, of class labels; a class-conditional model reads "
            "them with data.source='tfds' and data.tfds_data_dir the folder that holds the dataset's folder"
            if tfds_files else archived_shards_hint(root, files) or unpacked_folder_hint(root, files)))
    sizes: dict[str, set[str]] = {}  # NAME -> the set sizes (-of-NNNNN) its shards give
    for match in filter(None, map(SHARD_NAME.fullmatch, names)):
        sizes.setdefault(match[1], set()).add(match[2])
    for prefix, totals in sizes.items():
        if len(totals) > 1:
            raise DataError(f"{root} mixes the shard sets {', '.join(f'{prefix}-*-of-{n}' for n in sorted(totals))} "
                            "(two packs of the data); keep one set")
        (total,) = totals
        missing = [name for name in (f"{prefix}-{i:05d}-of-{total}{RECORD_EXTENSION}" for i in range(int(total)))
                   if name not in names]
        if missing:
            raise DataError(f"{root} lacks {len(missing)} of the {int(total)} shards of {prefix}: "
                            f"{missing[:5]}{' ...' if len(missing) > 5 else ''}; {REPACK}")
    return [storage.join(root, name) for name in names]


def archived_shards_hint(root: str, files: list[str]) -> str:
    """For a folder without shards that holds archives (webdataset's .tar): extract, then pack."""
    archives = archives_hint(root, [storage.join(root, name) for name in files])
    return (f": {archives}, then pack them with python -m pixelflow_jax.data.pack_captions --folder={root} "
            "--output=SHARDS") if archives else ""


def unpacked_folder_hint(root: str, files: list[str]) -> str:
    """For a folder without shards that holds images, or the sub-folders img2dataset writes them
    in: it reads as a captioned image folder, or packs into shards; '' for any other folder."""
    folders = [name for name in storage.list_folders(root) if not ignored_name(name)]
    images = [name for name in files if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not (images or folders):
        return ""
    return (f": it holds {'images' if images else 'folders'} ({(images or folders)[0]}, ...), so it may be a captioned "
            "image folder: train on it with --config.data.source=folder, or pack it into shards first with python -m "
            f"pixelflow_jax.data.pack_captions --folder={root} --output=SHARDS")


def count_records(shard: str) -> int:
    """The records in a shard; a shard that cannot be opened, holds none, or whose first record is
    not the packer's (a TFDS build's shard, another tool's) is an error naming it: read one by one,
    such records would only be skipped as unreadable once training."""
    from array_record.python.array_record_module import ArrayRecordReader

    try:
        reader = ArrayRecordReader(shard)
        count = reader.num_records()
        first = reader.read([0])[0] if count else None
        reader.close()
    except Exception as e:  # a truncated file: RuntimeError "should be at least 64KB big", ...
        if not str(e).strip():  # one cut at exactly 64 KiB (a copy's first block) fails without a word
            raise DataError(f"cannot read ArrayRecord shard {shard}: it is truncated or damaged (the reader's "
                            f"{type(e).__name__} gives no detail, as for a file cut off at a 64 KiB boundary); "
                            f"{REPACK}") from None
        raise DataError(f"cannot read ArrayRecord shard {shard} ({first_line(e)}); if it is truncated or damaged, "
                        f"{REPACK}") from None
    if count == 0:
        raise DataError(f"ArrayRecord shard {shard} holds no records; {REPACK}")
    try:
        decode_record(first)
    except DataError:
        raise DataError(f"ArrayRecord shard {shard} holds no captioned records: its first record is {NOT_CAPTIONED}. "
                        "Pack captioned images with python -m pixelflow_jax.data.pack_captions (a TFDS build's "
                        "shards hold class labels: those train a class-conditional model, "
                        "data.source='tfds')") from None
    return count


class WholeShard(NamedTuple):
    """array_record's FileInstruction for a whole shard, so the data source need not count it again."""

    filename: str
    skip: int
    take: int
    examples_in_shard: int


class CaptionRecordSource:
    """ArrayRecord shards of (image, caption) records, local or in a bucket (read in place: each
    record is one ranged read, so nothing is copied to local disk first)."""

    def __init__(self, root: str):
        from grain.sources import ArrayRecordDataSource

        check_array_record_reads(root)
        self.root, self.shards = root, record_shards(root)
        with futures.ThreadPoolExecutor(min(64, len(self.shards))) as pool:  # one read each: in parallel on a bucket
            counts = list(pool.map(count_records, self.shards))
        self.source = ArrayRecordDataSource([WholeShard(shard, 0, n, n) for shard, n in zip(self.shards, counts)])
        self.listing = listing_fingerprint(root, zip(self.shards, counts))
        self.ends = list(itertools.accumulate(counts))  # record i is in shard bisect_right(ends, i)

    def __len__(self) -> int:
        return len(self.source)

    def record_name(self, index: int) -> str:
        """Record `index` as its shard and place there: a record that cannot be read has no name."""
        shard = bisect.bisect_right(self.ends, index)
        return f"{self.root}:{index} (record {index - ([0] + self.ends)[shard]} of {self.shards[shard]})"

    def __getitem__(self, index: int) -> dict:
        record = decode_record(self.source[index])
        packed_from = f" ({record['name']})" if record.get("name") else ""  # shards of earlier versions: no name
        return {"image": record["image"], "caption": record["caption"], "name": f"{self.root}:{index}{packed_from}"}


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
