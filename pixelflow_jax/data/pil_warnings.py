"""PIL's warnings that say nothing to act on for a dataset, silenced for every module that opens
its images (the loader's decoding and the caption packer's header check)."""

from __future__ import annotations

import warnings

from PIL import Image


def silence_pil_warnings_without_a_fix() -> None:
    # "Could be decompression bomb DOS attack" for an image of 1-2x Image.MAX_IMAGE_PIXELS (89 Mpx, a
    # large scan): such an image decodes and trains. Larger ones raise, and the callers name them.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    # "Corrupt EXIF data" where a damaged EXIF block is read: the image trains as it would without one.
    warnings.filterwarnings("ignore", message="Corrupt EXIF data", category=UserWarning)
