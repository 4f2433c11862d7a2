"""The built-in, procedurally generated datasets: no download, any size.

Every image is one saturated shape (disk, square, triangle, diamond or ring) in one of
`num_colours` hues (hue = colour * 360 / num_colours degrees) on a plain grey background (a gentle
tinted ramp), at a random size, position and shading. Image i is drawn from a generator seeded with (seed, i): the
same seed gives the same images.

- class-conditional (`demo_image`): image i has class c = i mod num_classes, drawn in colour c and
  shape c mod 5, so a class fixes both.
- captioned (`captioned_demo_image`): colour and shape are drawn independently, and the caption
  names them in one of several wordings ("a red disk", "a square in blue", ...), so prompts can ask
  for combinations the training set shows rarely.

`classify` reads the hue and the shape back from an image: the check for the data itself (every
generated image must pass) and a score for samples of a model trained on it.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import numpy as np
from PIL import Image

SHAPES = ("disk", "square", "triangle", "diamond", "ring")
# Names of the hues of 10 colours (0, 36, ..., 324 degrees); other counts name hues by degree.
COLOUR_NAMES = ("red", "orange", "yellow", "lime", "green", "cyan", "azure", "blue", "purple", "pink")
CAPTION_WORDINGS = ("a {colour} {shape}", "{colour} {shape}", "a {shape} in {colour}",
                    "a picture of a {colour} {shape}", "a {colour} {shape} on a grey background")
SATURATED = 110  # HSV saturation (0..255) above which a pixel counts as foreground; background <= ~40
# Shape radius as a fraction of the image side: large, so that at 32 px (the demo configs) a ring's
# hole and a square's corners span several 4-pixel patches (in equal runs, 54% of sampled outlines
# came out right against 48% with 0.24-0.34).
RADIUS_RANGE = (0.30, 0.42)


def class_hue(label: int, num_classes: int) -> float:
    """Hue of a class (or colour) in degrees."""
    return 360.0 * label / num_classes


def colour_name(colour: int, num_colours: int) -> str:
    return COLOUR_NAMES[colour] if num_colours == len(COLOUR_NAMES) else f"hue {round(class_hue(colour, num_colours))}"


def _hsv_to_rgb(hue_degrees: float, saturation: float, value: float) -> np.ndarray:
    rgb = Image.new("HSV", (1, 1), (int(round(hue_degrees / 360 * 255)) % 256, int(saturation * 255),
                                    int(value * 255))).convert("RGB")
    return np.asarray(rgb, np.float32)[0, 0]


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float) -> np.ndarray:
    dy, dx = yy - cy, xx - cx
    if shape == "disk":
        return dy**2 + dx**2 <= r**2
    if shape == "square":
        return np.maximum(np.abs(dy), np.abs(dx)) <= 0.8 * r
    if shape == "triangle":
        return (dy <= 0.8 * r) & (np.abs(dx) <= (dy + r) * 0.6)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    return (dy**2 + dx**2 <= r**2) & (dy**2 + dx**2 >= (0.55 * r) ** 2)  # ring


def _draw(rng: np.random.Generator, colour: int, num_colours: int, shape: int, resolution: int) -> np.ndarray:
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32) / resolution

    # Background: a grey ramp, slightly tinted, always well below SATURATED. Plain on purpose: a
    # model trained for minutes on a CPU spends its capacity on the shapes, not on texture.
    angle = rng.uniform(0, 2 * np.pi)
    grey = rng.uniform(90, 160) + rng.uniform(0, 25) * ((xx - 0.5) * np.cos(angle) + (yy - 0.5) * np.sin(angle))
    tint = rng.uniform(-6, 6, 3).astype(np.float32)
    image = grey.astype(np.float32)[..., None] + tint

    # Foreground: the shape in the colour's hue, random size, position and shading.
    r = rng.uniform(*RADIUS_RANGE) * resolution
    cy, cx = rng.uniform(r, resolution - r, 2)
    pyy, pxx = np.mgrid[0:resolution, 0:resolution].astype(np.float32)
    mask = _shape_mask(SHAPES[shape], pyy, pxx, cy, cx, r)
    rgb = _hsv_to_rgb(class_hue(colour, num_colours), rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0))
    shading = 1.0 + 0.12 * ((pyy - cy) / r)[..., None]
    image = np.where(mask[..., None], rgb * shading, image)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def demo_image(index: int, *, seed: int = 0, num_classes: int = 10, resolution: int = 64) -> tuple[np.ndarray, int]:
    """(uint8 (resolution, resolution, 3) image, label) of image `index` of the class-conditional set."""
    label = index % num_classes
    rng = np.random.default_rng([seed, index])
    return _draw(rng, label, num_classes, label % len(SHAPES), resolution), label


def caption_of(colour: int, shape: int, num_colours: int, wording: int = 0) -> str:
    """The caption of a colour and shape in one of CAPTION_WORDINGS ("a red disk", "an orange ring")."""
    text = CAPTION_WORDINGS[wording].format(colour=colour_name(colour, num_colours), shape=SHAPES[shape])
    return re.sub(r"\ba (?=[aeiou])", "an ", text)


class CaptionedDemoImage(NamedTuple):
    image: np.ndarray  # uint8 (resolution, resolution, 3)
    caption: str
    colour: int
    shape: int  # index into SHAPES


def captioned_demo_image(index: int, *, seed: int = 0, num_colours: int = 10,
                         resolution: int = 64) -> CaptionedDemoImage:
    """Image `index` of the captioned set: colour, shape and wording drawn independently."""
    rng = np.random.default_rng([seed, index, 1])  # a stream of its own: not the class set's images
    colour, shape = int(rng.integers(num_colours)), int(rng.integers(len(SHAPES)))
    caption = caption_of(colour, shape, num_colours, wording=int(rng.integers(len(CAPTION_WORDINGS))))
    return CaptionedDemoImage(_draw(rng, colour, num_colours, shape, resolution), caption, colour, shape)


# ---------------------------------------------------------------------------------------- reading


class Reading(NamedTuple):
    hue: int  # the class (colour) whose hue is nearest; -1 without a saturated foreground
    shape: int  # index into SHAPES of the outline that fits the foreground best; -1 without one


@functools.lru_cache(maxsize=None)
def _unit_shape_moments(shape: str) -> tuple[float, float, float]:
    """(area / r^2, centroid row offset / r, centroid column offset / r) of a shape of radius r."""
    n = 801
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    r = n / 4
    mask = _shape_mask(shape, yy, xx, n / 2, n / 2, r)
    return mask.sum() / r**2, (yy[mask].mean() - n / 2) / r, (xx[mask].mean() - n / 2) / r


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy import ndimage

    labelled, count = ndimage.label(mask)
    if count <= 1:
        return mask
    sizes = ndimage.sum_labels(mask, labelled, index=np.arange(1, count + 1))
    return labelled == 1 + int(np.argmax(sizes))


def _best_fit(mask: np.ndarray, shape: str) -> float:
    """The highest IoU of `mask` with `shape` placed by the mask's area and centroid (then nudged by
    up to a pixel and 10% in size, as a sample's outline is never exact)."""
    area, offset_y, offset_x = _unit_shape_moments(shape)
    yy, xx = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(np.float32) + 0.5
    r = np.sqrt(mask.sum() / area)
    cy, cx = yy[mask].mean() - offset_y * r, xx[mask].mean() - offset_x * r
    best = 0.0
    for scale in (0.9, 1.0, 1.1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ideal = _shape_mask(shape, yy, xx, cy + dy, cx + dx, r * scale)
                best = max(best, (ideal & mask).sum() / max((ideal | mask).sum(), 1))
    return best


def classify(image: np.ndarray, num_classes: int = 10) -> Reading:
    """The hue class (nearest to the mean hue of the saturated pixels) and the shape (best fit of
    the largest saturated region's outline) of an image."""
    hsv = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).convert("HSV"), np.float32)
    foreground = hsv[..., 1] > SATURATED
    if foreground.sum() < 0.01 * foreground.size:
        return Reading(-1, -1)
    angles = hsv[..., 0][foreground] / 255.0 * 2 * np.pi
    mean_hue = np.degrees(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360
    distances = [abs((mean_hue - class_hue(c, num_classes) + 180) % 360 - 180) for c in range(num_classes)]
    region = _largest_component(foreground)
    shape = int(np.argmax([_best_fit(region, name) for name in SHAPES])) if region.sum() >= 4 else -1
    return Reading(int(np.argmin(distances)), shape)


def agreement(images, colours, shapes, num_colours: int) -> dict[str, float]:
    """Fractions of images whose hue and whose shape read back as asked."""
    readings = [classify(image, num_colours) for image in images]
    return {"hue_agreement": float(np.mean([r.hue == c for r, c in zip(readings, colours)])),
            "shape_agreement": float(np.mean([r.shape == s for r, s in zip(readings, shapes)]))}


# ---------------------------------------------------------------------------------------- sources


class DemoSource:
    """Random-access source of the class-conditional demo set (grain: __len__ and __getitem__)."""

    def __init__(self, num_images: int, *, seed: int = 0, num_classes: int = 10, resolution: int = 64):
        if num_images < 1 or num_classes < 1:
            raise ValueError(f"the demo dataset needs num_images >= 1 and num_classes >= 1, got "
                             f"{num_images}, {num_classes}")
        self.num_images, self.seed, self.num_classes, self.resolution = num_images, seed, num_classes, resolution

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        image, label = demo_image(index, seed=self.seed, num_classes=self.num_classes, resolution=self.resolution)
        return {"image": image, "label": label, "name": f"demo:{index}"}


class CaptionedDemoSource(DemoSource):
    """Random-access source of the captioned demo set: {'image', 'caption', 'name'}."""

    def __getitem__(self, index: int) -> dict:
        drawn = captioned_demo_image(index, seed=self.seed, num_colours=self.num_classes, resolution=self.resolution)
        return {"image": drawn.image, "caption": drawn.caption, "name": f"demo:{index}"}

    def captions(self, count: int) -> list[str]:
        """The first `count` captions (what the demo's tokenizer is trained on)."""
        return [captioned_demo_image(i, seed=self.seed, num_colours=self.num_classes, resolution=8).caption
                for i in range(min(count, len(self)))]


def demo_preview_prompts(count: int, num_colours: int, seed: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(prompts, colours, shapes) for previews of the captioned demo: every (colour, shape) pair
    once, in a seeded order, before any repeats; in the training set's first wording."""
    num_pairs = num_colours * len(SHAPES)
    pairs = np.random.default_rng([seed, 7]).permutation(num_pairs)[np.arange(count) % num_pairs]
    colours, shapes = pairs // len(SHAPES), pairs % len(SHAPES)
    return [caption_of(c, s, num_colours) for c, s in zip(colours, shapes)], colours, shapes
