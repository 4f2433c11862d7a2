"""Training input pipelines (grain): full-resolution uint8 images and their conditioning (int32
class labels, or the T5 tokens of a caption for text-conditional models).

Every stage's inputs are built later, on the device, from these full-resolution images, so the
loader only decodes and augments. The data path, top to bottom:

  source (tfds | folder | demo)  random access: record i -> encoded bytes or pixels + label
   (captioned: folder |          or + caption (caption_data.py)
    array_record | demo)
  -> DecodedSource               decode to RGB (16-bit and float grey scaled to 8 bits), resize the
                                 shorter side to round(R * 1.125) with Lanczos (or the ADM centre
                                 crop); tokenize the caption (too long:
                                 truncated and counted); a draw of an unreadable image or an
                                 unusable caption is replaced by one of a random other record, and
                                 counted
  -> shuffle (one global order, the same in every process; reshuffled every epoch), repeat forever
  -> random crop R + random horizontal flip (seeded by the element's global position)
  -> the rows of every global batch that this process's devices hold (ProcessRows: read from the
     batch sharding, so row r of the global array is image r of the global batch whatever the
     device order), from global batch `start_batch` on (a resumed run starts at its step)
  -> worker processes + prefetch
  -> ImageLoader: numpy batches (images, labels | (tokens, mask)), skip and truncation counts
  -> to_global_batch: jax.Arrays sharded over the mesh's batch axes

grain and TFDS are imported lazily: the model, sampler and train step do not need them.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import importlib.metadata
import io
import math
import os
import re
import signal
import sys
import unicodedata
import warnings
from typing import Any, Iterator

import jax
import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from pixelflow_jax import storage
from pixelflow_jax.error_text import first_line

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp",
                    ".gif")
MAX_UNREADABLE_IN_A_ROW = 64  # draws, each replacing the last: more says the dataset is corrupt
# PIL warns of a "decompression bomb DOS attack" for an image of 1-2x Image.MAX_IMAGE_PIXELS (89 Mpx,
# a large scan): such an image decodes and trains, so the warning says nothing to act on. Larger
# ones raise, and are skipped and counted as unreadable.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
CLASS_INDEX_FILE = "class_index.json"


class DataError(RuntimeError):
    """The dataset cannot be used as configured; the message names the path and the fix."""


# ArrayRecord's reader opens gs:// objects itself (ranged reads with the machine's Google
# credentials) from array-record 0.8.3 on; older versions take the URL for a local file name.
ARRAY_RECORD_READS_GCS_FROM = (0, 8, 3)


def installed_array_record_version() -> str | None:
    try:
        return importlib.metadata.version("array-record")
    except importlib.metadata.PackageNotFoundError:
        return None


def check_array_record_reads(path: str) -> None:
    """Stops a run whose ArrayRecord files are in a bucket when the installed reader cannot open them."""
    if not storage.is_url(path):
        return
    version = installed_array_record_version()
    if version is None or tuple(int(n) for n in re.findall(r"\d+", version)[:3]) < ARRAY_RECORD_READS_GCS_FROM:
        installed = f"array-record {version} reads only local files" if version else "array-record is not installed"
        raise DataError(f"{path} is in a bucket, but {installed}; install array-record>="
                        f"{'.'.join(map(str, ARRAY_RECORD_READS_GCS_FROM))} (pip install -r requirements.txt), "
                        "or copy the files to a local disk")


# ----------------------------------------------------------------------------------------- sources


def ignored_name(name: str) -> bool:
    """Hidden files and folders (macOS's ._x.jpg and .DS_Store, .ipynb_checkpoints, .Trash) and a
    file system's lost+found hold no training data."""
    return name.startswith(".") or name == "lost+found"


def read_with_folder(path: str, root: str) -> bool:
    """Whether `path` is folder `root` or lies where a folder source reads inside it (not below a
    hidden or ignored folder): a run's or a pack's output there would become data."""
    root, path = storage.resolved(root).rstrip("/"), storage.resolved(path)
    if path == root:
        return True
    if not path.startswith(root + "/"):
        return False
    return not any(ignored_name(part) for part in path[len(root) + 1:].split("/"))


def walk_files(root: str, above: tuple[str, ...] = (), unlisted: list[str] | None = None) -> list[str]:
    """Every file under root (any depth) as a full path, in a fixed order (a folder's files sorted,
    then its sub-folders' in sorted order), leaving out ignored names. Symbolic links are followed;
    one back to a folder above it (`above`: their real paths) is refused. Entries of a local folder
    that are neither files nor folders (links to nothing, sockets) are left out, and added to
    `unlisted` when it is given, so the caller can say so once."""
    if not storage.is_url(root):
        real = os.path.realpath(root)
        if real in above:
            link = next((p for p in parents_and_self(root) if leads_back(p)), root)
            raise DataError(f"{link} is a symbolic link to {os.path.realpath(link)}, a folder that holds it: reading "
                            "it would never end; remove the link")
        above += (real,)
    others: list[str] = []
    files, folders = storage.list_entries(root, others)
    if unlisted is not None:
        unlisted += [os.path.join(root, name) for name in others if not ignored_name(name)]
    paths = [storage.join(root, name) for name in files if not ignored_name(name)]
    for folder in folders:
        if not ignored_name(folder):
            paths += walk_files(storage.join(root, folder), above, unlisted)
    return paths


def warn_unlisted(root: str, unlisted: list[str]) -> None:
    """One warning for the entries under root walk_files left out as neither files nor folders."""
    if unlisted:
        example = unlisted[0]
        what = (f"a symbolic link to {os.readlink(example)}, which does not exist" if os.path.islink(example)
                else "not a regular file")
        logging.warning("%d entries under %s are not read: they are neither files nor folders, e.g. %s (%s); "
                        "mend or remove them", len(unlisted), root, example, what)


def parents_and_self(path: str) -> list[str]:
    """path, then each folder above it: a/b/c, a/b, a."""
    paths = [path]
    while (parent := os.path.dirname(paths[-1])) not in ("", paths[-1]):
        paths.append(parent)
    return paths


def leads_back(path: str) -> bool:
    """Whether path is a symbolic link to a folder that holds it (the link a walk loops through)."""
    if not os.path.islink(path):
        return False
    target, here = os.path.realpath(path), os.path.realpath(os.path.dirname(path))
    return here == target or here.startswith(target.rstrip("/") + "/")


def listing_fingerprint(root: str, rows) -> str:
    """A short hash of a dataset's listing (each row: a file's path, what it trains as): a resume on
    the same number of records whose files were renamed, or moved to another class, is another
    data order, and another labelling."""
    text = "\n".join("\t".join(value.removeprefix(root).lstrip("/") if isinstance(value, str) else str(value)
                               for value in row) for row in rows)  # paths relative to the root: a moved root is the same
    # surrogateescape: file names that are not UTF-8 (zip archives from Windows) hash as their bytes.
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def require_folder(root: str, message: str) -> None:
    """Raises DataError(message) unless root is a folder. storage.isdir answers False for a bucket
    it cannot reach (gcsfs swallows the error), so exists() asks first: it raises that StorageError."""
    if not storage.exists(root):
        raise DataError(message)
    if not storage.isdir(root):
        raise DataError(f"{root} is a file, not a folder: {message.split('; ', 1)[-1]}")


class ImageFolderSource:
    """root/<class name>/**/<image>, like torchvision's ImageFolder: class ids from sorted folder
    names, each class folder read at any depth; hidden names and lost+found are left out."""

    def __init__(self, root: str, classes: list[str] | None = None, class_index: str = "the run's class index"):
        """`classes`: the ids a run fixed (in `class_index`, named in messages); None: the folders found."""
        if not root:
            raise DataError("--config.data.root is not set: set it to a folder of class subfolders "
                            "(root/<class>/<image>)")
        require_folder(root, f"image folder {root} does not exist; set --config.data.root to a folder of class "
                             "subfolders (root/<class>/<image>)")
        found = [name for name in storage.list_folders(root) if not ignored_name(name)]
        self.classes = classes if classes is not None else found
        added, gone = sorted(set(found) - set(self.classes)), sorted(set(self.classes) - set(found))
        if added or gone:
            change = " and ".join(([f"has class folders {added} that {class_index} does not list"] if added else [])
                                  + ([f"lacks class folders {gone} that {class_index} lists"] if gone else []))
            nfc = lambda names: sorted(unicodedata.normalize("NFC", name) for name in names)
            respelled = (" (the names differ only in how their accented letters are encoded, NFC or NFD, as a "
                         "copy made on macOS can change them: rename the folders back)"
                         if added and nfc(added) == nfc(gone) else "")
            raise DataError(f"{root} {change}{respelled}: the run's checkpoints learned its class ids. Train on the "
                            "class folders it started with, or start a new --workdir")
        self.records: list[tuple[str, int]] = []
        empty, not_images = [], []
        unlisted: list[str] = []
        for label, name in enumerate(self.classes):
            files = walk_files(storage.join(root, name), unlisted=unlisted)
            images = [(path, label) for path in files if path.lower().endswith(IMAGE_EXTENSIONS)]
            not_images += [path for path in files if not path.lower().endswith(IMAGE_EXTENSIONS)]
            empty += [] if images else [name]
            self.records += images
        loose = [name for name in storage.list_files(root) if name.lower().endswith(IMAGE_EXTENSIONS)]
        warn_unlisted(root, unlisted)
        if not_images:
            logging.warning("%d files in the class folders of %s are not read (their names do not end in an image "
                            "extension: %s), e.g. %s", len(not_images), root, " ".join(IMAGE_EXTENSIONS), not_images[0])
        if loose and self.records:
            logging.warning("%d images in %s itself are not read (e.g. %s): a class's images go in %s/<class>/",
                            len(loose), root, loose[0], root)
        if not self.records:
            where = (f"the images in {root} itself are not read: put each class's images in a subfolder "
                     f"{root}/<class>/" if loose else f"expected {root}/<class>/<image>")
            raise DataError(f"no images found in class folders of {root} ({where}, with one of "
                            f"{', '.join(IMAGE_EXTENSIONS)})")
        if empty:
            raise DataError(f"{root}: classes without images: {empty[:10]}{' ...' if len(empty) > 10 else ''} "
                            f"(no file ending in {', '.join(IMAGE_EXTENSIONS)}); add images or remove the folders")
        self.listing = listing_fingerprint(root, self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        path, label = self.records[index]
        return {"image": storage.read_bytes(path), "label": label, "name": path}


class TfdsSource:
    """A built TFDS dataset read as a data source (ArrayRecord; no TensorFlow needed)."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        check_array_record_reads(data_dir or "")
        where = data_dir or "the default TFDS data dir (~/tensorflow_datasets)"
        build = (f"`tfds build {name} --manual_dir=DIR --data_dir={data_dir or '~/tensorflow_datasets'} "
                 "--file_format=array_record` (see README, Training data)")
        if data_dir and not storage.exists(data_dir):  # (a bucket it cannot reach raises the cause)
            raise DataError(f"TFDS data dir {data_dir} does not exist; build the dataset there with {build}")
        try:
            builder = tfds.builder(name, data_dir=data_dir or None)
            if not builder.is_prepared():  # tfds.data_source would download and build it into data_dir
                raise DataError(f"TFDS dataset {name!r} is not built under {where}: run {build}")
            self.source = builder.as_data_source(split=split)
        except DataError:
            raise
        except Exception as e:  # TFDS raises several types for "unknown dataset" and "no such split"
            raise DataError(f"cannot open TFDS dataset {name!r} split {split!r} in {where}: "
                            f"{first_line(e)}. "
                            f"Build it once with {build}") from None
        if len(self.source) == 0:
            raise DataError(f"TFDS dataset {name!r} split {split!r} in {data_dir} is empty")
        self.name = name

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict:
        record = self.source[index]
        return {"image": record["image"], "label": int(record["label"]), "name": f"{self.name}:{index}"}


def read_class_index(path: str) -> list[str]:
    """The class folder names a run's checkpoints learned as ids 0, 1, ...; a file that is not what
    the run wrote (damaged, or edited by hand) is an error naming it and the fix."""
    try:
        classes = storage.read_json(path)["classes"]
        if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
            raise TypeError(f"its classes are a {type(classes).__name__}, not a list of folder names")
        return classes
    except (ValueError, KeyError, TypeError) as e:  # not JSON, no "classes", not a list of names
        raise DataError(f"{path} is damaged ({type(e).__name__}: {e}): it holds the class ids this run's checkpoints "
                        "learned. Put back its earlier content, or delete it to have it written again from the class "
                        "folders' sorted names (the same ids, unless class folders were added or removed "
                        "since)") from None


def make_source(data_config, class_index_dir: str | None = None, num_classes: int | None = None,
                ids_learned: bool = True):
    """The configured source. For folders, the class list is written to class_index_dir/
    class_index.json, or read back from it once a checkpoint of the run has learned those ids
    (`ids_learned`), so the ids of a run stay as they were; it must fit the model's num_classes
    (id num_classes is the null class, and higher ids have no embedding)."""
    kind = data_config.source
    if kind == "tfds":
        return TfdsSource(data_config.tfds_name, data_config.split, data_config.tfds_data_dir)
    if kind == "folder":
        classes = None
        index_path = storage.join(class_index_dir, CLASS_INDEX_FILE) if class_index_dir else None
        if index_path and ids_learned and storage.exists(index_path):
            classes = read_class_index(index_path)
        source = ImageFolderSource(data_config.root, classes, index_path or "the run's class index")
        if num_classes is not None and len(source.classes) > num_classes:
            raise DataError(f"{data_config.root} has {len(source.classes)} classes but the model has "
                            f"model.num_classes = {num_classes}: ids from {num_classes} on would train as the null "
                            f"class or past the class table. Set --config.model.num_classes={len(source.classes)} "
                            "(a new --workdir) or remove class folders")
        if num_classes is not None and len(source.classes) < num_classes:  # previews show classes never trained
            logging.warning("%s has %d classes but the model has model.num_classes = %d: classes %d to %d never "
                            "train (--config.model.num_classes=%d fits the folder, in a new --workdir)", data_config.root,
                            len(source.classes), num_classes, len(source.classes), num_classes - 1, len(source.classes))
        if index_path and classes is None and jax.process_index() == 0:  # (re)written until a checkpoint uses it
            storage.write_json_atomically(index_path, {"root": storage.absolute(data_config.root),
                                                       "classes": source.classes})
        return source
    if kind == "demo":
        from pixelflow_jax.data.demo_data import DemoSource

        return DemoSource(data_config.demo_num_images, seed=data_config.demo_seed,
                          num_classes=data_config.demo_num_classes, resolution=data_config.resolution)
    if kind == "array_record":
        raise DataError("data.source='array_record' holds captioned records for text-conditional models; a "
                        "class-conditional model trains on 'tfds', 'folder' or 'demo'")
    raise DataError(f"unknown config.data.source {kind!r}; choose 'tfds', 'folder' or 'demo' ('array_record' for "
                    "text-conditional models)")


# ------------------------------------------------------------------------- decoding and augmenting


def to_rgb(image: Any) -> Image.Image:
    """Encoded bytes or a pixel array -> an RGB PIL image (grey, CMYK, palette, RGBA all converted)."""
    if isinstance(image, (bytes, bytearray)):
        try:
            pil = Image.open(io.BytesIO(image))
        except UnidentifiedImageError:  # its message names a BytesIO object's address: say what it means
            raise UnidentifiedImageError("not an image (its header is no format PIL reads)") from None
        pil.load()  # decode now, so a truncated file fails here
    else:
        array = np.asarray(image)
        pil = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    if pil.mode == "P" and "transparency" in pil.info:
        pil = pil.convert("RGBA")  # a transparent palette goes through RGBA, as PIL recommends
    return grey_to_8_bit(pil).convert("RGB")


def grey_to_8_bit(pil: Image.Image) -> Image.Image:
    """16- and 32-bit integer and float grey images (modes I;16*, I, F) as 8-bit grey; others as
    they are. PIL's convert() clips these values to 0..255 instead of scaling them (a 16-bit PNG
    comes out nearly white, a float TIFF black), so they are scaled here: integers as 16-bit data
    (PNG and TIFF store 16-bit grey in these modes), floats as [0, 1]. An image outside that range
    has no known scale and is refused (skipped and counted) rather than guessed at."""
    if not (pil.mode.startswith("I") or pil.mode == "F"):
        return pil
    values = np.asarray(pil, dtype=np.float64)
    top = 1.0 if pil.mode == "F" else 65535.0
    if not np.all((values >= 0) & (values <= top)):  # NaN fails too
        raise ValueError(f"a mode {pil.mode} image with values outside [0, {top:g}] (found "
                         f"{values.min():g}..{values.max():g}); save it as 8- or 16-bit")
    return Image.fromarray(np.round(values * (255 / top)).astype(np.uint8), "L")


# An image longer than this ratio of its sides (a 1 x 3000 spacer GIF, a banner) is cut to its
# centred window of this ratio before the resize: resized whole, the shorter side to 288 px made a
# 1 x 3000 image 288 x 864,000 pixels (2.5 GB and ~4 s per draw, measured), of which the crop keeps
# a square. Images up to this ratio are resized whole, as the release does.
MAX_ASPECT_RATIO = 16


def cut_to_aspect_ratio(image: Image.Image, ratio: int = MAX_ASPECT_RATIO) -> Image.Image:
    """The centred window of `image` whose long side is at most `ratio` times its short side."""
    w, h = image.size
    longest = ratio * min(w, h)
    if max(w, h) <= longest:
        return image
    if w > h:
        left = (w - longest) // 2
        return image.crop((left, 0, left + longest, h))
    top = (h - longest) // 2
    return image.crop((0, top, w, top + longest))


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """torchvision Resize(size, LANCZOS): shorter side -> size, the other scaled and truncated to int."""
    w, h = image.size
    if w <= h:
        new = (size, int(size * h / w))
    else:
        new = (int(size * w / h), size)
    return image if new == (w, h) else image.resize(new, resample=Image.LANCZOS)


def adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """The ADM / DiT centre crop: box-halve while >= 2x, bicubic to the shorter side, centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top, left = (array.shape[0] - size) // 2, (array.shape[1] - size) // 2
    return array[top:top + size, left:left + size]


class DecodedSource:
    """Decodes and resizes records of a source (and tokenizes their captions when given a
    tokenizer). A draw of an unreadable record is replaced by a draw of another record, picked at
    random (fixed per index and attempt, so every process and rerun picks the same), and counted in
    the element's `skipped`. (The next record in source order, as before 2026-11-29, trained the
    image after a run of bad files once per bad file, and shifted draws from one class to the next.)"""

    def __init__(self, source, resolution: int, expand_ratio: float = 1.125, center_crop: bool = False,
                 tokenizer=None):
        self.source, self.resolution, self.center_crop = source, resolution, center_crop
        self.resize_to = round(resolution * expand_ratio)
        self.tokenizer = tokenizer  # text.T5Tokenizer for captioned sources
        self.reported: set[int] = set()  # unreadable records this process has named (once each)

    def __len__(self) -> int:
        return len(self.source)

    def replacement(self, index: int, attempt: int) -> int:
        """The record drawn at `attempt` for position `index`: itself first, then random others."""
        if attempt == 0:
            return index
        return int(np.random.default_rng([index, attempt]).integers(len(self.source)))

    def __getitem__(self, index: int) -> dict:
        for attempt in range(MAX_UNREADABLE_IN_A_ROW):
            record_index = self.replacement(index, attempt)
            record = None
            try:
                record = self.source[record_index]
                conditioning = self._conditioning(record)
                image = cut_to_aspect_ratio(to_rgb(record["image"]))
            except MemoryError:  # the settings' fault (a resolution too large), not a bad file's
                raise
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
                name = (record or {}).get("name") or self._name(record_index)
                if record_index not in self.reported:
                    self.reported.add(record_index)
                    logging.warning("skipping unreadable record %s: %s", name, e)
                last_error = f"{name}: {e}"  # names the caption when it is the cause
                continue
            if self.center_crop:
                pixels = adm_center_crop(image, self.resolution)
            else:
                pixels = np.asarray(resize_shorter_side(image, self.resize_to))
            return {"image": pixels, **conditioning, "skipped": np.int32(attempt)}
        raise DataError(f"{MAX_UNREADABLE_IN_A_ROW} records drawn in a row (from {self._name(index)} on, each "
                        f"replacing the last) are unusable (the last, {last_error}); is the dataset corrupt?")

    def _conditioning(self, record: dict) -> dict:
        if self.tokenizer is None:
            return {"label": np.int32(record["label"])}
        from pixelflow_jax.data.caption_data import decode_caption

        tokens, mask, truncated = self.tokenizer.tokenize([decode_caption(record["caption"])])
        return {"tokens": tokens[0], "token_mask": mask[0], "truncated": np.int32(truncated[0]),
                "unknown_text": np.int32(self.tokenizer.has_unknown_text(tokens)[0])}

    def _name(self, index: int) -> str:
        records = getattr(self.source, "records", None)
        return records[index][0] if records else f"record {index}"


@dataclasses.dataclass(frozen=True)
class RandomCropFlip:
    """Random R x R crop (after the resize; a no-op after the centre crop) and horizontal flip
    (unless flip=False; its draw is made either way, so the crops do not depend on it)."""

    resolution: int
    flip: bool = True

    def __call__(self, element: dict, rng: np.random.Generator) -> dict:
        image = element["image"]
        h, w = image.shape[:2]
        top = int(rng.integers(0, h - self.resolution + 1))
        left = int(rng.integers(0, w - self.resolution + 1))
        image = image[top:top + self.resolution, left:left + self.resolution]
        if rng.random() < 0.5 and self.flip:
            image = image[:, ::-1]
        return {**element, "image": np.ascontiguousarray(image)}


# ----------------------------------------------------------------------------------------- pipeline


@dataclasses.dataclass(frozen=True)
class ProcessRows:
    """The rows of each global batch that one process reads: blocks of `block` consecutive rows,
    numbered from the batch's start (block j: rows [j*block, (j+1)*block)), in increasing order."""

    block: int
    blocks: tuple[int, ...]

    @classmethod
    def contiguous(cls, batch_size: int, process_index: int = 0, process_count: int = 1) -> "ProcessRows":
        """Process i of n reads rows [i*b, (i+1)*b) with b = batch_size / n."""
        if batch_size % process_count:
            raise DataError(f"global batch {batch_size} is not divisible by the {process_count} processes")
        return cls(batch_size // process_count, (process_index,))

    @classmethod
    def of_sharding(cls, sharding, batch_size: int) -> "ProcessRows":
        """The rows this process's devices hold of a (batch_size, ...) array with `sharding`. A mesh
        lays devices out by the chips' topology (on TPU pods one host's chips need not be
        neighbours in it), and jax.make_array_from_process_local_data puts a process's rows at its
        devices' places in order: reading rows [i*b, (i+1)*b) regardless, image r of the global
        batch would be at another row than r, so each image's noise and stage would depend on the
        devices' order, and a resume on another topology would train on other pairings."""
        runs = []  # the rows as maximal runs of consecutive rows, so that the blocks are as large as can be
        for start, stop in sorted({index[0].indices(batch_size)[:2]
                                   for index in sharding.addressable_devices_indices_map((batch_size,)).values()}):
            if runs and start <= runs[-1][1]:
                runs[-1][1] = max(runs[-1][1], stop)
            else:
                runs.append([start, stop])
        block = math.gcd(*(end for run in runs for end in run))
        return cls(block, tuple(j for start, stop in runs for j in range(start // block, stop // block)))

    @property
    def per_batch(self) -> int:
        return self.block * len(self.blocks)


class RowsOfBatches:
    """Element k: this process's rows of global batch k, from `blocks` (a dataset of blocks of
    rows, block k*blocks_per_batch + j being block j of batch k)."""

    def __init__(self, blocks, rows: ProcessRows, batch_size: int):
        self.blocks, self.rows, self.blocks_per_batch = blocks, rows, batch_size // rows.block

    def __len__(self) -> int:
        return len(self.blocks) // self.blocks_per_batch

    def __getitem__(self, k: int) -> dict:
        parts = [self.blocks[k * self.blocks_per_batch + j] for j in self.rows.blocks]
        return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def build_dataset(source, *, batch_size: int, resolution: int, seed: int, expand_ratio: float = 1.125,
                  center_crop: bool = False, random_flip: bool = True, rows: ProcessRows | None = None,
                  start_batch: int = 0, num_workers: int = 0, prefetch_batches: int = 2, tokenizer=None):
    """The grain IterDataset of this process's rows (`rows`; default: all) of each global batch of
    `batch_size` images: {'image': uint8 (b, R, R, 3), 'label': int32 (b,), 'skipped': int32 (b,)}
    with b = rows.per_batch; with a tokenizer, 'tokens' and 'token_mask' int32 (b, L) and
    'truncated' int32 (b,) replace 'label'. Infinite, reshuffled every epoch, deterministic for a seed.

    Every process computes the same global order and takes its rows of each global batch, and the
    crop/flip randomness is keyed by an image's global position, so the global batches do not
    depend on how many processes read them (one host with 8 devices trains on what two hosts with 4
    each train on). The iterator starts at global batch `start_batch`: a resumed run passes its
    step, so its position needs no checkpoint of its own and a checkpoint resumes with any number
    of processes.
    """
    import grain

    rows = rows or ProcessRows.contiguous(batch_size)
    decoded = DecodedSource(source, resolution, expand_ratio, center_crop, tokenizer)
    blocks = (grain.MapDataset.source(decoded)
              .seed(seed)
              .shuffle()
              .repeat()
              .random_map(RandomCropFlip(resolution, random_flip))
              .batch(rows.block, drop_remainder=True))
    dataset = (grain.MapDataset.source(RowsOfBatches(blocks, rows, batch_size))
               [start_batch:]
               # grain's default reads up to 500 elements (here: batches) ahead on 16 threads: tens
               # of GB at ImageNet sizes. prefetch_batches bounds both, in each worker.
               .to_iter_dataset(grain.ReadOptions(num_threads=prefetch_batches, prefetch_buffer_size=prefetch_batches)))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags; outside main.py use defaults
            flags.FLAGS.mark_as_parsed()
        quiet_shared_memory_cleanup()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                                   per_worker_buffer_size=prefetch_batches),
                                      worker_init_fn=functools.partial(init_worker, os.getpid()))
    return dataset


def quiet_shared_memory_cleanup() -> None:
    """Batches the workers made but the trainer never took (those prefetched when it stops) stay in
    shared memory until multiprocessing's resource tracker removes them at exit, with a warning of
    "leaked shared_memory objects" that every run would end with. The tracker is a process of its
    own, started with this process's -W options: this one, added before it starts, silences that
    warning there (the cleanup itself still happens)."""
    option = "ignore:resource_tracker:UserWarning"
    if option not in sys.warnoptions:
        sys.warnoptions.append(option)


def init_worker(trainer_pid: int, *_) -> None:
    """In each loader worker:
    - Ctrl-C is ignored: a terminal's Ctrl-C reaches every process of the group, and the trainer
      saves a step on it (preemption.py) with batches the workers still have to make;
    - the worker dies with the trainer (Linux): after a kill -9 of the trainer it would otherwise
      go on holding its memory. Strictly, the kernel signals it when the trainer's thread that
      started it ends: grain's prefetch thread, which lives until the loader is closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != trainer_pid:  # the trainer died before the call above
            os._exit(1)


class RunningCount:
    """A count of something the loader met, logged when it first happens and again each time it
    doubles: a few lines over a run, not one per batch."""

    def __init__(self, what: str):
        self.what, self.count, self.next_log = what, 0, 1

    def add(self, n: int) -> None:
        self.count += n
        if n and self.count >= self.next_log:
            logging.warning("so far, %d %s (logged again at %d)", self.count, self.what, 2 * self.count)
            self.next_log = 2 * self.count


class ImageLoader:
    """Iterates per-process numpy batches (images uint8 (B, R, R, 3), conditioning: labels int32
    (B,), or (tokens, mask) int32 (B, L) for captions) and logs the running counts of skipped
    records, and of captions truncated or holding text the tokenizer does not know (counted each
    time a batch holds one)."""

    def __init__(self, dataset):
        self.iterator = iter(dataset)
        self.skipped = RunningCount("draws of unusable records skipped (each replaced by a random other record)")
        self.truncated = RunningCount("captions drawn were longer than train.max_text_tokens and were truncated")
        self.unknown_text = RunningCount("captions drawn held text the tokenizer does not know (read as <unk>: "
                                         "emoji, or a script outside its vocabulary)")

    def __iter__(self) -> Iterator[tuple[np.ndarray, Any]]:
        return self

    def __next__(self) -> tuple[np.ndarray, Any]:
        batch = next(self.iterator)
        self.skipped.add(int(batch["skipped"].sum()))
        if "tokens" not in batch:
            return batch["image"], batch["label"].astype(np.int32)
        self.truncated.add(int(batch["truncated"].sum()))
        self.unknown_text.add(int(batch["unknown_text"].sum()))
        return batch["image"], (batch["tokens"], batch["token_mask"])

    def close(self) -> None:
        """Stops the worker processes (they prefetch until closed) and frees the shared memory of
        the batches they made now: at interpreter exit grain's cleanup of it raises in __del__."""
        close = getattr(self.iterator, "close", None)
        if close is not None:
            close()
        self.iterator = None
        gc.collect()


def open_source(config, class_index_dir: str | None = None, captioned: bool = False, ids_learned: bool = True):
    """The records of config.data: captioned ones for a text-conditional model. Opening them finds
    a missing or unreadable dataset, so a run does it before it writes anything."""
    if captioned:
        from pixelflow_jax.data.caption_data import make_captioned_source

        return make_captioned_source(config.data)
    return make_source(config.data, class_index_dir, num_classes=config.model.num_classes, ids_learned=ids_learned)


def make_loader(config, batch_size: int, sharding, start_batch: int = 0, tokenizer=None, source=None) -> ImageLoader:
    """The loader of this process for config.data (or the `source` open_source gave), reading the
    rows of each global batch that its devices hold in `sharding` (the batch's), from global batch
    `start_batch` on. With a tokenizer
    (text-conditional models) it reads captioned data and gives token batches instead of labels."""
    data = config.data
    if source is None:
        source = open_source(config, captioned=tokenizer is not None)
    dataset = build_dataset(source, batch_size=batch_size, resolution=data.resolution, seed=config.seed,
                            expand_ratio=data.expand_ratio, center_crop=data.center_crop,
                            random_flip=data.get("random_flip", True),  # a config file of an earlier version
                            rows=ProcessRows.of_sharding(sharding, batch_size), start_batch=start_batch,
                            num_workers=data.num_workers, prefetch_batches=data.prefetch_batches, tokenizer=tokenizer)
    return ImageLoader(dataset)


def to_global_batch(images: np.ndarray, conditioning: Any, sharding) -> tuple[Any, Any]:
    """Per-process batches -> global jax.Arrays sharded along the batch dimension by `sharding`
    (a NamedSharding whose spec's first entry names the mesh's batch axes); `conditioning` is an
    array or a tuple of arrays (tokens, mask)."""
    to_global = lambda a: jax.make_array_from_process_local_data(sharding, a)
    return to_global(images), jax.tree.map(to_global, conditioning)
