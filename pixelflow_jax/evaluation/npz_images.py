"""The images of an .npz as ADM's evaluation reads them (arr_0: uint8 N x H x W x 3): the layout
checked from the header and the first images' pixel values, with the fix for each wrong one;
counted and streamed in row batches (a 50k batch is 10 GB), never read whole; and what a file that
is no .npz of images probably is."""

from __future__ import annotations

import contextlib
import io
import json
import zipfile
import zlib

import numpy as np
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.evaluation import metrics
from pixelflow_jax.workdir_files import SAMPLES_NPZ


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
def open_images(path: str):
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
    with open_images(path) as (_, shape, _, _):
        return shape[0]


def npz_row_count(path: str) -> int:
    """arr_0's length, without the checks an evaluation makes: a sampling job's own samples.npz
    may hold fewer images than precision and recall need."""
    with _open_array(path) as (_, shape, _, _, _):
        return shape[0]


def npz_images_crc(path: str) -> int:
    """arr_0's CRC from the zip's directory (no image is read)."""
    with open_images(path) as (_, _, _, crc):
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
    with open_images(path) as (member, shape, dtype, _):
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        data_start = member.tell()
        stop = shape[0] if stop is None else stop
        for start in range(first, stop, batch_size):
            count = min(batch_size, stop - start)
            try:
                if start == first and first:
                    _skip(member, first * row_bytes, checked=stop == shape[0])
                data = member.read(count * row_bytes)
            except DAMAGED_MEMBER as e:
                raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}): write or download it again") from None
            if len(data) != count * row_bytes:  # counted from where the data ended: a skip may have passed it
                held = (member.tell() - data_start) // row_bytes
                raise ValueError(f"{path} is truncated: arr_0 ends after {held} of its {shape[0]} images; write or "
                                 "download it again")
            yield np.frombuffer(data, dtype).reshape(count, *shape[1:])


def npz_for_folder(folder: str) -> str:
    """What to pass instead of a folder of images: the .npz in it or beside it that a sampling job
    wrote (its samples/ folder holds the PNGs), or how to make one."""
    for candidate in (storage.join(folder, SAMPLES_NPZ), storage.join(storage.dirname(folder.rstrip("/")),
                                                                      SAMPLES_NPZ)):
        if storage.isfile(candidate):
            return f" (pass {candidate}, the images a sampling job packed)"
    return (f"; a sampling job packs its images into WORKDIR/{SAMPLES_NPZ}, and other images go into one with "
            "numpy.savez(PATH, arr_0=images), images a uint8 N x H x W x 3 array")


def npz_contents(path: str) -> str:
    """Each member's name, CRC-32 and size, from the .npz's zip directory (no image is read)."""
    with contextlib.ExitStack() as opened:
        archive = opened_archive(opened, path)
        return json.dumps([(info.filename, info.CRC, info.file_size) for info in archive.infolist()])
