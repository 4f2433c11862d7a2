"""Records to training pixels: decode to RGB (16-bit and float grey scaled to 8 bits; an image
longer than 16:1 cut to its centred 16:1 window), resize the shorter side (Lanczos) or the ADM
centre crop, tokenize a caption; an unreadable record is replaced by a random other one and
counted, and so are images smaller than the resolution (upscaled) and images whose EXIF orientation
(not applied, as in the release) asks for a turn. Then the random crop and flip.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any

import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from pixelflow_jax.data.pil_warnings import silence_pil_warnings_without_a_fix
from pixelflow_jax.data.sources import DataError

MAX_UNREADABLE_IN_A_ROW = 64  # draws, each replacing the last: more says the dataset is corrupt
silence_pil_warnings_without_a_fix()  # an image too large to decode is skipped and counted as unreadable


def to_rgb(image: Any) -> Image.Image:
    """Encoded bytes or a pixel array -> an RGB PIL image (grey, CMYK, palette, RGBA all converted)."""
    return rgb_of(opened(image))


def opened(image: Any) -> Image.Image:
    """Encoded bytes (decoded now, so that a truncated file fails here) or a pixel array as a PIL
    image; a palette image, or a 16-bit RGB PNG, with a transparent colour as RGBA (the palette's
    as PIL recommends; the PNG's, which PIL misreads, by with_transparent_colour_as_alpha)."""
    if isinstance(image, (bytes, bytearray)):
        try:
            pil = Image.open(io.BytesIO(image))
        except UnidentifiedImageError:  # its message names a BytesIO object's address: say what it means
            raise UnidentifiedImageError("not an image (its header is no format PIL reads)") from None
        pil.load()
        if is_16_bit_rgb_png(image) and "transparency" in pil.info:
            pil = with_transparent_colour_as_alpha(pil, image)
    else:
        array = np.asarray(image)
        pil = Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)
    if pil.mode == "P" and "transparency" in pil.info:
        pil = pil.convert("RGBA")
    return pil


def is_16_bit_rgb_png(data: bytes) -> bool:
    """From the IHDR chunk, which a PNG holds first: bit depth 16, colour type 2 (RGB, no alpha)."""
    return data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data[24:26] == bytes([16, 2])


def with_transparent_colour_as_alpha(pil: Image.Image, data: bytes) -> Image.Image:
    """A 16-bit RGB PNG (`pil`, decoded from `data`) with its transparent colour (tRNS) as alpha.
    PIL keeps each sample's high byte and compares those with the 16-bit colour: a pixel of that
    colour stayed opaque, and for a colour below 256 others became transparent. Decoded again
    with the little-endian unpacker, which reads the low byte of these big-endian samples."""
    low = Image.open(io.BytesIO(data))
    low.tile = [(*tile[:3], "RGB;16L") for tile in low.tile]
    low.load()
    samples = np.asarray(pil, np.uint16) << 8 | np.asarray(low, np.uint16)
    transparent = np.all(samples == np.asarray(pil.info["transparency"], np.uint16), axis=-1)
    return Image.merge("RGBA", (*pil.split(), Image.fromarray(np.where(transparent, 0, 255).astype(np.uint8))))


def rgb_of(pil: Image.Image) -> Image.Image:
    """An opened image as RGB: 16-bit and float grey scaled to 8 bits, alpha dropped (not composited)."""
    return grey_to_8_bit(pil).convert("RGB")


# The modes PIL opens images with an alpha channel in (not every mode with a band named A: LAB's is a colour axis).
ALPHA_MODES = ("RGBA", "LA", "PA")


def has_transparent_pixels(pil: Image.Image) -> bool:
    """Whether an opened image has pixels that are not opaque: an alpha channel below 255 somewhere,
    or an RGB or grey image's transparent colour (PNG's tRNS). rgb_of drops that transparency."""
    if pil.mode in ALPHA_MODES:
        return pil.getchannel("A").getextrema()[0] < 255
    colour = pil.info.get("transparency")
    if colour is None:
        return False
    if pil.mode.startswith("I") and isinstance(colour, int):  # 16-bit grey: PIL's convert() ignores its tRNS
        return bool(np.any(np.asarray(pil) == colour))
    if pil.mode not in ("1", "L", "RGB"):
        return False
    return pil.convert("RGBA").getchannel("A").getextrema()[0] < 255  # the transparent colour applied as alpha


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


EXIF_ORIENTATION_TAG = 0x0112
# What each EXIF orientation asks a viewer to do to the stored pixels (1, upright, asks nothing).
ORIENTATION_WORDS = {2: "mirror left to right to show", 3: "turn 180 degrees to show",
                     4: "mirror top to bottom to show", 5: "mirror along the diagonal from the top left to show",
                     6: "turn 90 degrees clockwise to show", 7: "mirror along the diagonal from the top right to show",
                     8: "turn 90 degrees anticlockwise to show"}


def exif_orientation(pil: Image.Image) -> int:
    """The image's EXIF orientation where it asks for a turn or a mirror (2-8; rgb_of does not apply
    it, as the release does not); 1 for an upright image, one without the tag, or with a value
    outside 1-8."""
    try:
        value = pil.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # a damaged EXIF block (struct.error, SyntaxError, ...) spoils no image: it is not applied
        return 1
    return value if value in ORIENTATION_WORDS else 1


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
        # What this process named an image for ('transparent', 'upscaled', 'exif_oriented'): once each, as a
        # logo set has thousands of transparent images; the loader's counts follow in the log.
        self.kinds_named: set[str] = set()

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
                pil = opened(record["image"])
                transparent = has_transparent_pixels(pil)
                orientation = exif_orientation(pil)
                image = cut_to_aspect_ratio(rgb_of(pil))
            except MemoryError:  # the settings' fault (a resolution too large), not a bad file's
                raise
            except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad files
                name = (record or {}).get("name") or self._name(record_index)
                if isinstance(e, Image.DecompressionBombError):  # a valid image; PIL's words call it an attack
                    e = (f"{str(e).split(', could be')[0]}: PIL decodes no image that large (its memory guard, "
                         "PIL.Image.MAX_IMAGE_PIXELS): downscale the file")
                if record_index not in self.reported:
                    self.reported.add(record_index)
                    logging.warning("skipping unreadable record %s: %s", name, e)
                last_error = f"{name}: {e}"  # names the caption when it is the cause
                continue
            upscaled = min(image.size) < self.resolution
            if self.center_crop:
                pixels = adm_center_crop(image, self.resolution)
            else:
                pixels = np.asarray(resize_shorter_side(image, self.resize_to))
            named = record.get("name") or record_index  # the record's name, made only for a message
            if transparent:
                self._name_once("transparent", named, "has transparent pixels, which train as the colour stored under "
                                "them (often black), as the alpha channel is dropped: flatten such images onto a "
                                "background first where that matters")
            if upscaled:
                self._name_once("upscaled", named, "is %d x %d px, below data.resolution (%d px) on its shorter side: "
                                "it is upscaled, which trains the model on blurred pixels; where many images are, set "
                                "--config.data.resolution to their size", *pil.size, self.resolution)  # the file's size
            if orientation != 1:
                self._name_once("exif_oriented", named, "has an EXIF orientation (%d: %s) that is not applied, as in "
                                "the release: it trains as stored, sideways or mirrored; turn such images upright "
                                "first where that matters, e.g. with PIL.ImageOps.exif_transpose", orientation,
                                ORIENTATION_WORDS[orientation])
            return {"image": pixels, **conditioning, "skipped": np.int32(attempt),
                    "transparent": np.int32(transparent), "upscaled": np.int32(upscaled),
                    "exif_oriented": np.int32(orientation != 1)}
        raise DataError(f"{MAX_UNREADABLE_IN_A_ROW} records drawn in a row (from {self._name(index)} on, each "
                        f"replacing the last) are unusable (the last, {last_error}); is the dataset corrupt?")

    def _name_once(self, kind: str, named: str | int, problem: str, *args) -> None:
        """Logs 'NAME PROBLEM (further ones are counted, not named)' for the first image of `kind` this
        process draws; `named` is the record's name, or its index to name it by."""
        if kind in self.kinds_named:
            return
        self.kinds_named.add(kind)
        logging.warning("%s " + problem + " (further ones are counted, not named)",
                        named if isinstance(named, str) else self._name(named), *args)

    def _conditioning(self, record: dict) -> dict:
        if self.tokenizer is None:
            return {"label": np.int32(record["label"])}
        from pixelflow_jax.data.caption_data import decode_caption

        tokens, mask, truncated = self.tokenizer.tokenize([decode_caption(record["caption"])])
        return {"tokens": tokens[0], "token_mask": mask[0], "truncated": np.int32(truncated[0]),
                "unknown_text": np.int32(self.tokenizer.has_unknown_text(tokens)[0])}

    def _name(self, index: int) -> str:
        """Record `index` named for a message where it could not be read (no name of its own)."""
        if hasattr(self.source, "record_name"):  # shards: which one is damaged
            return self.source.record_name(index)
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
