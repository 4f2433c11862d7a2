"""`main.py --mode=eval`: FID, sFID, Inception Score, precision and recall of a sample batch
against a reference batch, the numbers ADM's evaluation suite prints, without TensorFlow.

    config.eval.samples            .npz with arr_0 = uint8 (N, H, W, 3) (what --mode=sample writes)
    config.eval.reference          .npz with arr_0 (e.g. ADM's VIRTUAL_imagenet256_labeled.npz);
                                   its precomputed mu / sigma (and mu_s / sigma_s) are used when present
    config.eval.inception_weights  pytorch-fid's pt_inception-2015-12-05-6726825d.pth

Images are streamed from the .npz in batches (a 50k batch is 10 GB), run through the Inception
with the batch split over the devices (and the images over the processes of a --distributed job,
which gather the features), and their features cached next to the run
(WORKDIR/eval_features/), keyed by the path, size, modification time and CRC of the images and by
the Inception weights: a second evaluation of the same files reads the cache (a damaged cache file
is computed again). Results: printed, WORKDIR/eval.json (the latest) and a line of
WORKDIR/eval_history.jsonl (every evaluation); NaN or inf anywhere (features, stored statistics,
a metric) is an error, so they hold finite numbers only.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import zipfile
import zlib

import jax
import numpy as np
from absl import logging

from pixelflow_jax import storage, validation
from pixelflow_jax.checkpoints.checkpoint import CheckpointError
from pixelflow_jax.error_text import described
from pixelflow_jax.evaluation import metrics
from pixelflow_jax.multihost import (InputRead, block_size, check_same_inputs, check_shared_workdir, failing_together,
                                     from_process_0, gather_rows, hashed, named, processes_where, rows_of_this_process,
                                     seen_within_the_wait, stop_if_preempted_at_the_next_pass)
from pixelflow_jax.progress import Progress, say
from pixelflow_jax.sharding import batch_for, replicate_on_local_devices
from pixelflow_jax.workdir_files import EVAL_JSON, SAMPLES_NPZ, settings_path

FEATURES = ("pool", "spatial", "logits")
INPUT_ERRORS = (ValueError, CheckpointError, storage.StorageError)  # what check_inputs raises for bad input
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
IMAGENET_256_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                              "VIRTUAL_imagenet256_labeled.npz")
# The shapes of ADM's stored reference statistics: pool_3 (2048) and mixed_6/conv's first 7 channels (7 x 17 x 17).
STATISTICS_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}


# What reading a damaged .npz member raises: a CRC mismatch, a cut-off file, and for a compressed
# (np.savez_compressed) member a deflate stream that no longer decodes (zlib.error, no OSError).
DAMAGED_MEMBER = (OSError, EOFError, zipfile.BadZipFile, zlib.error)

# The first bytes of the image files a user may hand over for an .npz of images.
IMAGE_SIGNATURES = {b"\x89PN": "PNG", b"\xff\xd8\xff": "JPEG"}


def not_an_npz_hint(path: str) -> str:
    """What a file that is no zip archive probably is: a .npy, a PNG or JPEG (a sampling job's image,
    a dataset's), a download's error page or Git LFS pointer, or an .npz cut off."""
    try:
        with storage.open_file(path, "rb") as f:
            start = f.read(64)
    except OSError:
        return ""
    if not start:
        return "; it is empty (a write that never finished?): write or download it again"
    if start.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):  # wget saves a 404's HTML or a bucket's XML error
        return ("; it is a web page or an XML document (the error page a failed download saves?), not the .npz: "
                "download it again from its address")
    if start.startswith(b"version https://git-lfs"):  # a repository cloned without its large files
        return "; it is a Git LFS pointer, not the .npz: fetch the file with git lfs pull"
    if start.startswith(b"\x93NUMPY"):
        return "; it is a .npy file: save the images with np.savez(path, images) instead"
    if kind := IMAGE_SIGNATURES.get(start[:3]):  # one of samples/*.png: the set to evaluate is the job's .npz
        return (f"; it is a {kind} image, and an evaluation reads a set of images from one .npz"
                f"{npz_for_folder(storage.dirname(path))}")
    if start.startswith(b"PK"):
        return "; it is cut off (a download or a write that stopped?): write or download it again"
    return ""


@contextlib.contextmanager
def _open_images(path: str):
    """(arr_0 member positioned at its data, shape, dtype, the member's CRC-32) of an .npz of
    images; closes the member, the archive and, for a URL, the downloaded stream when done."""
    with _open_array(path) as (member, shape, fortran, dtype, crc):
        if len(shape) == 1 and dtype != object and (images := image_arrays_beside_arr_0(path)):
            # np.savez(path, labels, images): the images are there, second
            raise ValueError(f"{path}: arr_0 holds {shape[0]} values of one dimension (labels?), and the images "
                             f"(N, H, W, 3) are {images[0]}; an evaluation reads the images as arr_0: write them "
                             "first, np.savez(path, images, labels), or by name, np.savez(path, arr_0=images, "
                             "labels=labels)")
        check_images(path, shape, fortran, dtype)
        yield member, shape, dtype, crc


def image_arrays_beside_arr_0(path: str) -> list[str]:
    """The .npz's other arrays shaped as images (N, H, W, 3), named with their shapes, as 'arr_1
    (6, 8, 8, 3)'; [] where none is (or the file cannot be read again)."""
    found = []
    try:
        with contextlib.ExitStack() as opened:
            archive = opened_archive(opened, path)
            for name in archive.namelist():
                if name == "arr_0.npy" or not name.endswith(".npy"):
                    continue
                with archive.open(name) as member:
                    shape = npy_header(member)[0]
                if len(shape) == 4 and shape[-1] == 3:
                    found.append(f"{name.removesuffix('.npy')} {shape}")
    except (*DAMAGED_MEMBER, ValueError):  # arr_0's own problem is still named
        return []
    return found


def opened_archive(opened: contextlib.ExitStack, path: str) -> zipfile.ZipFile:
    """The .npz at `path` as a zip archive (a URL's stream downloaded as it is read), closed with `opened`."""
    source = opened.enter_context(storage.open_file(path, "rb")) if storage.is_url(path) else path
    return opened.enter_context(zipfile.ZipFile(source))


def npy_header(member) -> tuple[tuple, bool, np.dtype]:
    """(shape, Fortran order, dtype) of an .npy member, read from its header; the member is left
    positioned at its data."""
    version = np.lib.format.read_magic(member)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read_header(member)


@contextlib.contextmanager
def _open_array(path: str):
    """(arr_0 member positioned at its data, shape, Fortran order, dtype, the member's CRC-32) of an
    .npz, whatever arr_0 holds."""
    with contextlib.ExitStack() as opened:
        try:
            archive = opened_archive(opened, path)
        except (OSError, zipfile.BadZipFile) as e:
            hint = not_an_npz_hint(path)
            raise ValueError(f"{path} is not an .npz with an arr_0 array of images: {e}{hint}") from None
        if "arr_0.npy" not in archive.namelist():
            names = archive.namelist()
            if names and not all(name.endswith(".npy") for name in names):  # a zip, not an .npz (a torch .pt)
                raise ValueError(f"{path} is a zip archive but not an .npz (it holds {names[0]} and {len(names) - 1} "
                                 "more files); pass the .npz of images that --mode=sample writes")
            keys = [name.removesuffix(".npy") for name in names]
            statistics = (" (statistics alone do not do: precision and recall compare images, which ADM's reference "
                          "batches hold as arr_0 beside mu and sigma)" if {"mu", "sigma"} <= set(keys) else "")
            raise ValueError(f"{path} has no arr_0 array of images (its arrays: {', '.join(keys) or 'none'})"
                             f"{statistics}; write the images as arr_0, e.g. np.savez(path, images)")
        try:
            member = opened.enter_context(archive.open("arr_0.npy"))
            shape, fortran, dtype = npy_header(member)
        except (*DAMAGED_MEMBER, ValueError) as e:
            raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}): write or download it again") from None
        yield member, shape, fortran, dtype, archive.getinfo("arr_0.npy").CRC


FLOAT_IMAGES_FIX = ("convert images in [0, 1] with (x * 255).round().clip(0, 255).astype(np.uint8), images in [-1, 1] "
                    "with ((x + 1) * 127.5).round().clip(0, 255).astype(np.uint8)")
# Channels first (PyTorch's layout) -> RGB channels last, by the channel count: RGB, RGBA, grey.
CHANNELS_FIRST_FIXES = {3: "images.transpose(0, 2, 3, 1)", 4: "images.transpose(0, 2, 3, 1)[..., :3]",
                        1: "np.repeat(images.transpose(0, 2, 3, 1), 3, axis=-1)"}
# How many of a file's first images check_pixel_values reads (a few MB even at 512 px).
PIXEL_CHECK_IMAGES = 16
# (x + 1) * 127.5 of images in [0, 1] leaves no pixel below 127; natural images have darker ones.
WASHED_OUT_MINIMUM = 127


def check_images(path: str, shape: tuple, fortran: bool, dtype: np.dtype) -> None:
    """arr_0 as ADM's evaluation reads it, or an error that says how to write it so."""
    if dtype == object:  # its shape is that of the list pickled, not of the images
        raise ValueError(f"{path}: arr_0 holds Python objects (saved with allow_pickle: a list of images of different "
                         "sizes?), not uint8 images (N, H, W, 3); resize the images to one size and save "
                         "np.stack(images).astype(np.uint8)")
    channels = shape[-1] if len(shape) == 4 else None
    if len(shape) == 3 and shape[-1] in (3, 4):  # one RGB(A) image, not grey ones 3 or 4 pixels wide
        raise ValueError(f"{path}: arr_0 must be a batch of images (N, H, W, 3), got one image {shape}; save all "
                         f"the images in one array, np.stack(images) (precision and recall need more than "
                         f"{metrics.NEIGHBOURHOOD}, FID thousands)")
    if len(shape) == 3 or channels == 1:
        raise ValueError(f"{path}: arr_0 must be RGB images (N, H, W, 3), got grey ones {shape}; write "
                         "np.repeat(images.reshape(*images.shape[:3], 1), 3, axis=-1)")
    if channels == 4:
        raise ValueError(f"{path}: arr_0 must be RGB images (N, H, W, 3), got RGBA {shape}; write images[..., :3]")
    if len(shape) == 4 and shape[1] in CHANNELS_FIRST_FIXES and channels != 3:  # PyTorch's layout
        raise ValueError(f"{path}: arr_0 must be images (N, H, W, 3), got channels first {shape}; write "
                         f"{CHANNELS_FIRST_FIXES[shape[1]]}")
    if len(shape) != 4 or channels != 3:
        raise ValueError(f"{path}: arr_0 must be images (N, H, W, 3), got shape {shape}")
    if min(shape[1:3]) < 1:
        raise ValueError(f"{path}: arr_0 holds images of {shape[1]}x{shape[2]} pixels, which have no content")
    if fortran:  # read in row batches, which Fortran order does not store together
        raise ValueError(f"{path}: arr_0 is stored in Fortran (column-major) order; write np.ascontiguousarray(images)")
    if dtype != np.uint8:
        if np.issubdtype(dtype, np.floating):
            fix = f"{FLOAT_IMAGES_FIX}, and 0-255 values with x.round().clip(0, 255).astype(np.uint8)"
        elif dtype == np.uint16:  # 16-bit images: clipping to 255 would saturate nearly every pixel
            fix = ("convert 16-bit images (0-65535) with (x // 257).astype(np.uint8), and 0-255 values with "
                   "x.astype(np.uint8)")
        elif dtype == np.bool_:  # masks or binarised images: True is white
            fix = "convert them with x.astype(np.uint8) * 255"
        else:
            fix = "convert 0-255 values with x.clip(0, 255).astype(np.uint8)"
        raise ValueError(f"{path}: arr_0 must be uint8 images (values 0-255, as ADM's evaluation reads them), got "
                         f"{dtype}; {fix}")
    if shape[0] <= metrics.NEIGHBOURHOOD:
        images = f"{shape[0]} image{'s' if shape[0] != 1 else ''}"
        raise ValueError(f"{path} holds {images}: precision and recall need more than {metrics.NEIGHBOURHOOD} (FID "
                         "wants thousands)")


def check_pixel_values(path: str) -> None:
    """uint8 images made from floats in [0, 1] or [-1, 1] by x.astype(np.uint8), unscaled, hold
    only 0 and 1 (and 255 where -1 wrapped), or only 0 where no value reached 1 or -1 exactly (a
    tanh's or a sigmoid's, unclipped): they passed as (near-)black images and got an FID of hundreds
    without a word. Read from the file's first images."""
    count = min(npz_image_count(path), PIXEL_CHECK_IMAGES)
    (first_images,) = npz_batches(path, count, stop=count)
    values = set(np.unique(first_images).tolist())
    if min(values) >= WASHED_OUT_MINIMUM:  # a sign, not a proof: bright images may hold no darker pixel
        logging.warning("%s: its first %d images hold no pixel value below %d: images in [0, 1] converted as if in "
                        "[-1, 1], with (x + 1) * 127.5? Write them again with (x * 255).round().clip(0, 255)"
                        ".astype(np.uint8); they are evaluated as they are", path, count, min(values))
    if values == {0}:  # or a sampling job's own samples, of a model that draws only black
        found, other_cause = "are black (every pixel 0)", "; or the model draws only black: look at its images"
    elif values <= {0, 1, 255} and 1 in values:
        found, other_cause = f"hold only the pixel values {sorted(values)}", ""
    else:
        return
    raise ValueError(f"{path}: its first {count} images {found}: floats in [0, 1] or [-1, 1] cast to uint8 without "
                     f"scaling them to 0-255? Write them again from the floats: {FLOAT_IMAGES_FIX}{other_cause}")


def npz_image_count(path: str) -> int:
    with _open_images(path) as (_, shape, _, _):
        return shape[0]


def npz_row_count(path: str) -> int:
    """arr_0's length, without the checks an evaluation makes: a sampling job's own samples.npz
    may hold fewer images than precision and recall need."""
    with _open_array(path) as (_, shape, _, _, _):
        return shape[0]


def npz_images_crc(path: str) -> int:
    """arr_0's CRC from the zip's directory (no image is read)."""
    with _open_images(path) as (_, _, _, crc):
        return crc


def _skip(member, size: int, checked: bool) -> None:
    """Moves an .npz member `size` bytes on. zipfile checks a member's CRC where its data ends, over
    every byte read from its start: a block that reads to the end (checked) reads through the bytes
    before it. Python 3.12's seek jumps over a stored member's bytes and turns that check off, so
    nothing would notice damage there; 3.11's read through them."""
    if not checked:
        member.seek(size, io.SEEK_CUR)  # (a compressed member is read through to there)
        return
    while size > 0:
        skipped = len(member.read(min(size, 1 << 24)))
        if not skipped:  # cut off: the block's own read comes out short and says so
            return
        size -= skipped


def npz_batches(path: str, batch_size: int, first: int = 0, stop: int | None = None):
    """Yields rows [first, stop) of arr_0 of an (uncompressed or compressed) .npz in row batches,
    never all at once."""
    with _open_images(path) as (member, shape, dtype, _):
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        stop = shape[0] if stop is None else stop
        for start in range(first, stop, batch_size):
            count = min(batch_size, stop - start)
            try:
                if start == first and first:
                    _skip(member, first * row_bytes, checked=stop == shape[0])
                data = member.read(count * row_bytes)
            except DAMAGED_MEMBER as e:
                raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}): write or download it again") from None
            if len(data) != count * row_bytes:
                raise ValueError(f"{path} is truncated: arr_0 ends after {start + len(data) // row_bytes} of its "
                                 f"{shape[0]} images; write or download it again")
            yield np.frombuffer(data, dtype).reshape(count, *shape[1:])


@functools.partial(jax.jit, static_argnums=0)
def _inception(graphdef, params, images):
    """One compiled program per image shape, shared by every FeatureExtractor."""
    from flax import nnx

    return nnx.merge(graphdef, params)(images)


class FeatureExtractor:
    """Inception features of image batches, the batch split over this process's devices."""

    def __init__(self, weights_path: str, batch_size: int):
        from flax import nnx

        from pixelflow_jax.evaluation.inception_convert import load_inception

        model = load_inception(weights_path)
        # Part of the feature cache's key: weights overwritten in place get features of their own, also
        # where a copy kept the size and the time (cp -p, rsync -t): the fingerprint reads slices of the content.
        self.weights_id = [storage.absolute(weights_path), *storage.size_and_mtime(weights_path),
                           storage.file_fingerprint(weights_path)]
        self.graphdef, params = nnx.split(model)
        # Each process computes the features of its block of the images (multihost.rows_of_this_process).
        self.params, self.rows = replicate_on_local_devices(params)
        devices = self.rows.mesh.size
        self.batch_size = -(-batch_size // devices) * devices  # a multiple of the device count

    @functools.cached_property
    def widths(self) -> dict[str, int]:
        """Each feature's width, from the model's output shapes (traced, not run)."""
        image = jax.ShapeDtypeStruct((1, 32, 32, 3), np.uint8)
        shapes = jax.eval_shape(functools.partial(_inception, self.graphdef), self.params, image)
        return {name: int(shape.shape[-1]) for name, shape in zip(FEATURES, shapes)}

    def __call__(self, path: str) -> dict[str, np.ndarray]:
        """Every image's features, on every process: each computes its block of the images, then
        the processes gather them. Damage in one process's block (a truncated file) stops every
        process with an error, not only that one while the others wait in the gather."""
        total = npz_image_count(path)
        first, stop = rows_of_this_process(total)
        try:
            mine, damage = self.features_of_rows(path, first, stop, block_size(total)), None
        except ValueError as e:  # npz_batches' "damaged" and "truncated"
            mine, damage = None, e
        if failed := processes_where(damage is not None):
            raise damage or ValueError(f"{path}: {named(failed)} found it damaged (see that error); write or "
                                       "download it again")
        return {name: gather_rows(value, total) for name, value in mine.items()}

    def features_of_rows(self, path: str, first: int, stop: int, largest_block: int) -> dict[str, np.ndarray]:
        """The features of rows [first, stop), in the batches of the job's largest block, as many on
        every process (see rounds_of_batches)."""
        parts = {name: [] for name in FEATURES}
        # 12 images padded to a batch of 10**6 ran out of memory: the batch fits the images.
        batch_size = batch_for(max(1, largest_block), self.batch_size, self.rows.mesh.size)
        rounds = -(-largest_block // batch_size)
        pending = None  # the batch dispatched last: read once the next one is dispatched

        def collect(outputs, count):
            for name, value in zip(FEATURES, outputs):
                parts[name].append(np.asarray(value)[:count])
            progress.update(count)

        with Progress(stop - first, f"Inception features of {storage.basename(path)}", "img") as progress:
            for images in rounds_of_batches(path, batch_size, first, stop, rounds):
                if images is None:  # this block's images are all dispatched
                    continue
                count = len(images)
                padded = np.concatenate([images, np.repeat(images[-1:], batch_size - count, 0)])
                # uint8 to the devices (a quarter of float32's bytes); the model casts them exactly.
                outputs = _inception(self.graphdef, self.params, jax.device_put(padded, self.rows))
                if pending:
                    collect(*pending)
                pending = outputs, count
            if pending:
                collect(*pending)
        return {name: np.concatenate(value) if value else np.zeros((0, self.widths[name]), np.float32)  # no rows here
                for name, value in parts.items()}


def rounds_of_batches(path: str, batch_size: int, first: int, stop: int, rounds: int):
    """Yields the row batches of [first, stop) (npz_batches), then None for each of the `rounds`
    this block has no batch for, each round after asking jax's preemption sync point. A SIGTERM to
    any process of a --distributed job then stops every one at one round: the sync point is met
    only by processes that ask it in the same passes, and the blocks differ in their batch counts
    (the last processes' are smaller). (Before, jax's service caught the SIGTERM and the evaluation
    ran on to its end.) A damaged block's error is raised after the last round, which the other
    processes still ask: raised at once, its process waited in processes_where while the others
    could stop at the sync point."""
    damage = None
    with contextlib.closing(npz_batches(path, batch_size, first, stop)) as batches:  # and the file
        for _ in range(rounds):
            stop_if_preempted_at_the_next_pass()  # one process: a SIGTERM received stops it here
            images = None
            if damage is None:
                try:
                    images = next(batches, None)
                except ValueError as e:  # npz_batches' "damaged" and "truncated"
                    damage = e
            yield images
    if damage is not None:
        raise damage


# Part of the feature cache's key: raise it when the features' computation changes (inception.py),
# so that features cached by an earlier version are computed again.
FEATURES_VERSION = 2  # 2: float32 resize coordinates, as TensorFlow


# What process 0 found where the features of a file are cached; every process takes the path it says.
ABSENT, CACHED, FOLDER_IN_THE_WAY = 0, 1, 2


def feature_cache_key(extract: FeatureExtractor, path: str) -> np.ndarray:
    """Two int32s naming the features of `path`'s images by the Inception `extract` runs."""
    size, mtime = storage.size_and_mtime(path)
    crc = npz_images_crc(path)  # files of one image count have one size, and a copy may keep the mtime
    return hashed(json.dumps([storage.absolute(path), size, mtime, crc, *extract.weights_id, FEATURES_VERSION]), 2)


def cache_file(cache_dir: str, path: str, key: np.ndarray) -> str:
    return storage.join(cache_dir, f"{storage.basename(path)}.{np.asarray(key, np.int32).tobytes().hex()}.npz")


def cache_as_process_0_finds_it(extract: FeatureExtractor, path: str,
                                cache_dir: str) -> tuple[str, int, dict[str, np.ndarray] | None]:
    """(process 0's cache file for `path`, what it found there: ABSENT, CACHED or FOLDER_IN_THE_WAY,
    the features it read: on process 0 where CACHED, else None), the same on every process."""
    features, found_and_key = None, np.zeros(3, np.int32)
    if jax.process_index() == 0:
        key = feature_cache_key(extract, path)
        cache = cache_file(cache_dir, path, key)
        if storage.isdir(cache):
            found = FOLDER_IN_THE_WAY
        else:
            features = read_cache(cache, path, extract.widths) if storage.isfile(cache) else None
            found = ABSENT if features is None else CACHED
        found_and_key = np.array([found, *key], np.int32)
    found, *key = (int(word) for word in from_process_0(found_and_key))
    return cache_file(cache_dir, path, np.array(key, np.int32)), found, features


def read_on_every_process(cache: str, path: str, widths: dict[str, int],
                          features: dict[str, np.ndarray] | None) -> dict[str, np.ndarray] | None:
    """The features process 0 read from `cache` (`features` there), read by every other process
    too; None on every process where one of them cannot read them: all compute them again."""
    if jax.process_index() != 0:
        if seen_within_the_wait(cache):
            features = read_cache(cache, path, widths)
        else:
            logging.warning("process %d does not see %s, the cached features of %s that process 0 found",
                            jax.process_index(), cache, path)
    if unread := processes_where(features is None):
        logging.warning("%s could not read the cached features %s (its log says why): every process computes the "
                        "features of %s again", named(unread), cache, path)
        return None
    return features


def read_cache(cache: str, path: str, widths: dict[str, int]) -> dict[str, np.ndarray] | None:
    """The features cached in `cache`, or None (with a warning) where they cannot be read or are
    not those of `path`'s images (cache_problem)."""
    try:
        with storage.open_file(cache, "rb") as file, np.load(file) as f:
            features = {name: f[name] for name in FEATURES}
    except Exception as e:  # only a cache: computed again
        logging.warning("the cached features %s cannot be read (%s: %s): computing them again", cache,
                        type(e).__name__, str(e)[:200])
        return None
    if problem := cache_problem(features, npz_image_count(path), widths):
        logging.warning("the cached features %s %s: computing them again", cache, problem)
        return None
    return features


def cache_problem(features: dict[str, np.ndarray], count: int, widths: dict[str, int]) -> str | None:
    """What makes features read from the cache unfit for `count` images, or None. A cache file that
    reads but was cut or altered gave other metrics without a word (FID from the rows it held)."""
    for name, value in features.items():
        if value.shape != (count, widths[name]):
            return f"hold {name} of shape {value.shape}, not ({count}, {widths[name]})"
        if not np.isfinite(value).all():
            return f"hold NaN or inf in {name}"
    return None


def cached_features(extract: FeatureExtractor, path: str, cache_dir: str) -> dict[str, np.ndarray]:
    """The features of `path`'s images: from the cache, or computed (and cached by process 0).
    Process 0 looks in the cache for the job and every process follows it: each looking for itself, a
    process that did not see the file yet (NFS caches listings, a bucket read failing on one host)
    ran the Inception while the others read the cache, and waited in the gather for peers that never
    came (or, the other way round, read a cache the others recomputed)."""
    cache, found, features = cache_as_process_0_finds_it(extract, path, cache_dir)
    if found == FOLDER_IN_THE_WAY:  # found only after the Inception pass, when the cache is written
        raise ValueError(f"{cache} is a folder, where the evaluation caches the features of {path}: move it away")
    if found == CACHED and (features := read_on_every_process(cache, path, extract.widths, features)) is not None:
        logging.info("features of %s from %s", path, cache)
        return features
    features = extract(path)
    if not all(np.isfinite(value).all() for value in features.values()):  # never cached
        raise ValueError(f"the Inception features of {path} hold NaN or inf: check the Inception weights "
                         f"{extract.weights_id[0]} (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, intact?)")
    if jax.process_index() == 0:  # every process holds the same (gathered) features
        encoded = io.BytesIO()
        np.savez(encoded, **features)
        try:
            storage.write_atomically(cache, encoded.getvalue())
        except OSError as e:  # only a cache: a full disk must not throw away the Inception pass just made
            logging.warning("could not cache the features of %s in %s (%s): the evaluation goes on; the next one "
                            "computes them again", path, cache, described(e))
    return features


def _stored_array(npz, key: str, path: str) -> np.ndarray:
    """One stored statistic, read whole: a damaged member (a CRC error) or one of other than float values
    is named with the file, not left to a traceback."""
    try:
        value = npz[key]
    except (*DAMAGED_MEMBER, ValueError) as e:  # ValueError: an object (pickled) array
        raise ValueError(f"{path}: its stored {key} cannot be read ({type(e).__name__}: {e}); download or write the "
                         "file again, or leave the statistics out of it to have them computed from its arr_0 "
                         "images") from None
    if not np.issubdtype(value.dtype, np.floating):
        raise ValueError(f"{path}: its stored {key} holds {value.dtype} values, not the floating-point statistics "
                         "ADM stores; leave the statistics out of the file to have them computed from its arr_0 "
                         "images")
    return value


def stored_statistics(path: str) -> dict[str, np.ndarray]:
    """The reference .npz's precomputed mu / sigma / mu_s / sigma_s (ADM's reference batches carry
    them), checked: pairs complete, ADM's shapes, finite."""
    with storage.open_file(path, "rb") as file, np.load(file) as f:
        stored = {k: _stored_array(f, k, path) for k in STATISTICS_SHAPES if k in f.files}
    for mean, covariance in (("mu", "sigma"), ("mu_s", "sigma_s")):
        if (mean in stored) != (covariance in stored):
            present, absent = (mean, covariance) if mean in stored else (covariance, mean)
            raise ValueError(f"{path} holds the statistic {present} without {absent}: store both or neither")
    for key, value in stored.items():
        if not np.isfinite(value).all():
            raise ValueError(f"{path}: its stored {key} holds NaN or inf; recompute the statistics, or leave "
                             "them out of the file to have them computed from its arr_0 images")
    for key, value in stored.items():
        if value.shape != STATISTICS_SHAPES[key]:
            raise ValueError(f"{path}: its stored {key} has shape {value.shape}, not {STATISTICS_SHAPES[key]} (the "
                             "FID Inception's); leave the statistics out of the file to have them computed from "
                             "its arr_0 images")
    for key in ("sigma", "sigma_s"):  # a covariance: symmetric, no negative variance along any direction
        if key in stored:
            sigma = stored[key].astype(np.float64)
            # Rounding to the stored precision moves a singular covariance's zero eigenvalues by about its eps
            # (float16: -5e-4 of the largest entry, an FID change of 2e-6 relative), and computing it in float32
            # (a torch or jax script's own statistics, stored in any precision) by float32's eps times the
            # square root of the image count (-2e-6 at 500 images, ~-3e-5 at 50k): 1e-4 leaves room for both.
            tolerance = max(1e-4, 8 * float(np.finfo(stored[key].dtype).eps)) * max(float(np.abs(sigma).max()), 1e-30)
            if np.abs(sigma - sigma.T).max() > tolerance or np.linalg.eigvalsh(sigma).min() < -tolerance:
                raise ValueError(f"{path}: its stored {key} is not a covariance matrix (symmetric, positive "
                                 "semi-definite); recompute the statistics, or leave them out of the file to have "
                                 "them computed from its arr_0 images")
    return stored


def reference_statistics(path: str, features: dict) -> tuple[tuple, tuple]:
    """((mu, sigma), (mu_s, sigma_s)): the .npz's own where present, else from the features."""
    stored = stored_statistics(path)
    pool = (stored["mu"], stored["sigma"]) if "mu" in stored else metrics.gaussian_statistics(features["pool"])
    spatial = ((stored["mu_s"], stored["sigma_s"]) if "mu_s" in stored
               else metrics.gaussian_statistics(features["spatial"]))
    return pool, spatial


def npz_for_folder(folder: str) -> str:
    """What to pass instead of a folder of images: the .npz in it or beside it that a sampling job
    wrote (its samples/ folder holds the PNGs), or how to make one."""
    for candidate in (storage.join(folder, SAMPLES_NPZ), storage.join(storage.dirname(folder.rstrip("/")),
                                                                      SAMPLES_NPZ)):
        if storage.isfile(candidate):
            return f" (pass {candidate}, the images a sampling job packed)"
    return (f"; a sampling job packs its images into WORKDIR/{SAMPLES_NPZ}, and other images go into one with "
            "numpy.savez(PATH, arr_0=images), images a uint8 N x H x W x 3 array")


def slash_after_a_file(path: str) -> str:
    """The hint for a file's name given with a / after it (a shell's completion of a folder's name),
    or ''."""
    if path.endswith("/") and storage.isfile(path.rstrip("/")):
        return f" (the / at its end names a folder, and {path.rstrip('/')} is a file: drop the /)"
    return ""


def check_inputs(samples: str | None, reference: str, inception_weights: str, workdir: str) -> None:
    """What an evaluation needs, checked before any work: the files' headers and stored statistics
    are read (for --mode=sample before sampling, when the samples do not exist yet: samples=None;
    then the Inception weights are loaded too, which an evaluation does next anyway). Each process
    checks what it sees, and a problem any of them finds stops all of them."""
    with failing_together(INPUT_ERRORS, "checking the evaluation's input files"):
        check_input_files(samples, reference, inception_weights)
        read = inputs_read(samples, reference, inception_weights) if jax.process_count() > 1 else []
    # Each process reads its block of each .npz and its Inception from its own host's copy.
    check_same_inputs(read)
    check_shared_workdir(workdir)  # not only once the features are to be cached
    with failing_together(INPUT_ERRORS, "checking the evaluation's outputs in the workdir"):
        check_nothing_in_the_way_of_outputs(workdir)


def inputs_read(samples: str | None, reference: str, inception_weights: str) -> list[InputRead]:
    """What this process finds in the evaluation's files, by content: each .npz's members (the zip
    directory's CRCs and sizes) and the image count, the Inception weights' fingerprint. A stale
    copy of another image count on one host crashed the gather of the features, or, where the
    processes' blocks came out the same size, mixed its images (and a padding row) into the metrics."""
    files = {"--config.eval.reference": reference, **({} if samples is None else {"--config.eval.samples": samples})}
    read = [InputRead(f"{flag} {path}", npz_contents(path), npz_image_count(path), "images")
            for flag, path in files.items()]
    return [*read, InputRead(f"--config.eval.inception_weights {inception_weights}",
                             storage.file_fingerprint(inception_weights))]


def npz_contents(path: str) -> str:
    """Each member's name, CRC-32 and size, from the .npz's zip directory (no image is read)."""
    with contextlib.ExitStack() as opened:
        archive = opened_archive(opened, path)
        return json.dumps([(info.filename, info.CRC, info.file_size) for info in archive.infolist()])


def check_input_files(samples: str | None, reference: str, inception_weights: str) -> None:
    files = {"eval.reference": reference, **({} if samples is None else {"eval.samples": samples})}
    unset = [f"--config.{name}" for name, path in {**files, "eval.inception_weights": inception_weights}.items()
             if not path]
    if unset:
        raise ValueError(f"set {', '.join(unset)}: the samples and the reference are .npz files of images (arr_0: "
                         "uint8 N x H x W x 3; the samples default to the workdir's samples.npz, where a sampling "
                         "job wrote one), the weights pytorch-fid's pt_inception-2015-12-05-6726825d.pth (see the "
                         "README)")
    for name, path in files.items():
        if not storage.isfile(path):
            kind = "a folder, not an .npz file" if storage.isdir(path) else "not found"
            fix = (f": ADM's ImageNet 256 reference batch is {IMAGENET_256_REFERENCE_URL}; any .npz of uint8 images "
                   "(arr_0: N x H x W x 3) of the data you trained on serves" if name == "eval.reference" else "")
            if storage.isdir(path):
                fix += npz_for_folder(path)
            elif storage.isfile(f"{path}.npz"):  # np.savez(path, ...) adds the ending the name lacks
                fix = f" (numpy.savez added .npz to the name it was given: pass {path}.npz)"
            elif hint := slash_after_a_file(path):  # a shell's completion of a folder's name
                fix = hint
            raise ValueError(f"--config.{name} {path} is {kind}{fix}")
    if not storage.isfile(inception_weights):
        from pixelflow_jax.evaluation.inception_convert import WEIGHTS_URL

        found = ("is a folder, not the weights file" if storage.isdir(inception_weights) else
                 f"not found{slash_after_a_file(inception_weights)}")
        raise CheckpointError(f"Inception weights {inception_weights} {found}: download {WEIGHTS_URL} and pass its "
                              "path as --config.eval.inception_weights")
    for path in files.values():
        check_pixel_values(path)  # the format, read from the header, and the first images' values
    stored_statistics(reference)
    if samples is None:
        from pixelflow_jax.evaluation.inception_convert import load_inception

        load_inception(inception_weights)


def check_nothing_in_the_way_of_outputs(workdir: str) -> None:
    for name, folder in (("eval_features", True), (EVAL_JSON, False), (storage.history_path(EVAL_JSON), False)):
        path = storage.join(workdir, name)
        if storage.isfile(path) if folder else storage.isdir(path):  # found only after the Inception pass
            raise ValueError(f"{path} is a {'file' if folder else 'folder'}, where the evaluation keeps its "
                             f"{'feature cache' if folder else 'results'}: move it away, or use another --workdir")


def check_sample_count(sample_config) -> None:
    """Before a class-conditional sampling job that ends with an evaluation: precision and recall
    need more images than the neighbourhood they count (a text job's count is known later)."""
    if "prompts" not in sample_config and sample_config.num_images <= metrics.NEIGHBOURHOOD:
        raise ValueError(f"--config.sample.num_images={sample_config.num_images} is too few to evaluate: precision "
                         f"and recall need more than {metrics.NEIGHBOURHOOD} images (FID wants thousands)")


def evaluate(samples: str, reference: str, inception_weights: str, workdir: str, batch_size: int = 100) -> dict:
    with storage.removed_if_left_empty(workdir, remover=jax.process_index() == 0):
        return _evaluate(samples, reference, inception_weights, workdir, batch_size)


def _evaluate(samples: str, reference: str, inception_weights: str, workdir: str, batch_size: int) -> dict:
    check_inputs(samples, reference, inception_weights, workdir)
    cache_dir = storage.join(workdir, "eval_features")
    if jax.process_index() == 0:  # a killed evaluation's half-written cache file (~1 GB at 50k images) or eval.json
        storage.clear_leftovers_of_killed_writers(workdir, cache_dir)
    extract = FeatureExtractor(inception_weights, batch_size)
    with (_open_images(samples) as (_, sample_shape, _, sample_crc),
          _open_images(reference) as (_, reference_shape, _, reference_crc)):
        if (sample_shape, sample_crc) == (reference_shape, reference_crc):  # a sanity check, or a mix-up
            logging.warning("the samples %s and the reference %s hold the same images (their shapes and CRCs agree): "
                            "the metrics are those of a perfect match (FID 0, precision and recall 1), not a measure "
                            "of the samples", samples, reference)
        warn_if_swapped(samples, reference)
        if sample_shape[1:3] != reference_shape[1:3]:
            logging.warning("the samples %s are %dx%d px but the reference %s holds %dx%d px images: the metrics "
                            "compare different resolutions (both are resized to 299 px for the Inception)",
                            samples, *sample_shape[1:3], reference, *reference_shape[1:3])
    sample_features = cached_features(extract, samples, cache_dir)
    reference_features = cached_features(extract, reference, cache_dir)
    # A SIGTERM after the last Inception round (or while the cache was read, where no round asks) set
    # jax's sync point one past it: asked here, it stops every process before the metrics, not never.
    stop_if_preempted_at_the_next_pass()
    (mu, sigma), (mu_s, sigma_s) = reference_statistics(reference, reference_features)
    precision, recall = metrics.precision_recall(reference_features["pool"], sample_features["pool"])
    results = dict(
        fid=metrics.frechet_distance(*metrics.gaussian_statistics(sample_features["pool"]), mu, sigma),
        sfid=metrics.frechet_distance(*metrics.gaussian_statistics(sample_features["spatial"]), mu_s, sigma_s),
        inception_score=metrics.inception_score(sample_features["logits"]),
        precision=precision, recall=recall,
        num_samples=len(sample_features["pool"]), num_reference=len(reference_features["pool"]),
        samples=storage.absolute(samples), reference=storage.absolute(reference),
        inception_weights=extract.weights_id[0], features_version=FEATURES_VERSION,
    )
    not_finite = [name for name in METRICS if not np.isfinite(results[name])]
    if not_finite:  # the checks above should make this impossible; eval.json must never hold NaN
        raise ValueError(f"{', '.join(not_finite)} came out NaN or inf for {samples} against {reference}")
    return results


def statistics_stored_in(path: str) -> list[str]:
    """The names of ADM's statistics (mu, sigma, mu_s, sigma_s) an .npz holds beside its images."""
    with contextlib.ExitStack() as opened:
        names = opened_archive(opened, path).namelist()
    return [key for key in STATISTICS_SHAPES if f"{key}.npy" in names]


def warn_if_swapped(samples: str, reference: str) -> None:
    """ADM's reference batches carry their statistics and sample batches do not: samples that hold
    them against a reference that does not are likely the two files swapped, which trades precision
    for recall and scores the reference's Inception Score without a word."""
    if (stored := statistics_stored_in(samples)) and not statistics_stored_in(reference):
        logging.warning("the samples %s hold stored statistics (%s), as ADM's reference batches do, and the reference "
                        "%s holds none: are the two swapped? Precision and recall trade places and the Inception "
                        "Score is that of the other set when they are (--config.eval.samples is the generated "
                        "images, --config.eval.reference the real ones)", samples, ", ".join(stored), reference)


def own_job_image_count(workdir: str) -> int | None:
    """How many images the workdir's sampling job asks for; None where no job's readable record is."""
    try:
        return int(storage.read_json(settings_path(workdir))["num_images"])
    except (FileNotFoundError, ValueError, KeyError, TypeError):  # no job's record (or damaged): nothing to compare
        return None


def check_own_samples_written(npz: str, workdir: str) -> None:
    """A sampling job stopped before all its images were sampled has not packed them into
    samples.npz yet: the evaluation said to set --config.eval.samples, as if the workdir held no job."""
    if (asked := own_job_image_count(workdir)) is not None:
        raise ValueError(f"this workdir's sampling job ({settings_path(workdir)}) has not written {npz} yet: it packs "
                         f"its images there once all {asked} are sampled. Rerun its --mode=sample command to finish "
                         "it, or set --config.eval.samples to evaluate another .npz")


def check_own_samples_finished(npz: str, workdir: str) -> None:
    """The workdir's samples.npz is its sampling job's whole output once that job has finished; a
    job extended to more images and stopped part-way left the smaller earlier file, which scored
    the earlier images without a word."""
    if (asked := own_job_image_count(workdir)) is None:
        return
    settings = settings_path(workdir)
    held = npz_image_count(npz)
    if held != asked:
        raise ValueError(f"{npz} holds {held} images, but this workdir's sampling job asks for {asked} ({settings}): "
                         "it has not finished. Rerun its --mode=sample command to finish it (samples.npz is "
                         f"rewritten then), or set --config.eval.samples={npz} to evaluate the {held} anyway")


def samples_to_evaluate(samples: str, workdir: str) -> str:
    """`samples`, or where that is unset the workdir's own samples.npz; ValueError where that is a
    sampling job's unfinished output."""
    own = storage.join(workdir, SAMPLES_NPZ)
    names_own = not samples or storage.resolved(samples) == storage.resolved(own)
    if names_own and not storage.isfile(own):  # (no job here: evaluate's checks name what is missing)
        check_own_samples_written(own, workdir)
    elif not samples:
        check_own_samples_finished(own, workdir)
        logging.info("evaluating %s, this workdir's samples (--config.eval.samples names others)", own)
        return own
    elif names_own:
        try:  # named on purpose (this README's eval command names it): evaluated, but never without a word
            check_own_samples_finished(own, workdir)
        except ValueError as unfinished:
            logging.warning("%s (evaluated anyway, as --config.eval.samples names it)", unfinished)
    return samples


def samples_chosen_by_process_0(samples: str, workdir: str) -> str:
    """samples_to_evaluate as process 0 finds it, on every process, which then waits (a moment) to
    see that file: each process choosing for itself, one whose host showed it the samples.npz that
    process 0 had just written (a sampling job's evaluation) late, or not its job's settings.json,
    refused alone or went on alone, and the others waited for it in their next collective."""
    chosen, problem = samples, None
    if jax.process_index() == 0:
        try:
            chosen = samples_to_evaluate(samples, workdir)
        except ValueError as e:
            problem = e
    refused, own = (bool(flag) for flag in from_process_0(np.array([problem is not None, chosen != samples],
                                                                   np.int32)))
    if refused:
        raise problem or ValueError(f"process 0 refused to evaluate the samples of {workdir} (its error says why)")
    chosen = storage.join(workdir, SAMPLES_NPZ) if own else samples
    if chosen and jax.process_index() != 0:
        seen_within_the_wait(chosen)  # evaluate's checks name a file still missing
    return chosen


def run(config, workdir: str, samples: str | None = None) -> dict:
    """Evaluates config.eval.samples (or `samples`; neither: the workdir's own samples.npz, that of
    a sampling job there) and writes WORKDIR/eval.json (process 0)."""
    config, workdir = validation.job_config(config, "eval"), validation.job_workdir(workdir)
    e = config.eval
    # As the config's paths are: `~` expanded; a bytes path, an array of images or a URL of another scheme a
    # ConfigError.
    if validation.is_set(samples):
        samples = validation.setting_path("samples", samples)
    samples = samples_chosen_by_process_0(samples or e.get("samples", ""), workdir)
    results = evaluate(samples, e.reference, e.inception_weights, workdir, int(e.batch_size))
    for name in METRICS:  # on stdout, once (eval.json keeps them)
        say(f"{name}: {results[name]:.4f}")
    if jax.process_index() == 0:
        path = storage.join(workdir, EVAL_JSON)
        with storage.writing(path, "the metrics are printed above; free space or make the workdir writable, and "
                                   "rerun the same command to record them"):
            storage.write_json_keeping_history(path, results)
    return results
