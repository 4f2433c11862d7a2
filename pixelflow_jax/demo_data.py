"""A built-in, procedurally generated class-conditional dataset: no download, any size.

Class c is a saturated shape whose hue is c * 360 / num_classes degrees (and whose outline is one of
five shapes, c mod 5) on a grey textured background. Image i has label i mod num_classes and is
drawn from a generator seeded with (seed, i): the same seed gives the same images.

`classify` reads the class back from an image: the hue of its saturated pixels. It is the
check for the data itself (every generated image must pass) and, later, a score for samples of a
model trained on it (class agreement).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

SHAPES = ("disk", "square", "triangle", "diamond", "ring")
SATURATED = 110  # HSV saturation (0..255) above which a pixel counts as foreground; background <= ~40


def class_hue(label: int, num_classes: int) -> float:
    """Hue of a class in degrees."""
    return 360.0 * label / num_classes


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


def demo_image(index: int, *, seed: int = 0, num_classes: int = 10, resolution: int = 64) -> tuple[np.ndarray, int]:
    """(uint8 (resolution, resolution, 3) image, label) of image `index`."""
    label = index % num_classes
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:resolution, 0:resolution].astype(np.float32) / resolution

    # Background: grey gratings plus fine noise, slightly tinted, always well below SATURATED.
    grey = np.full((resolution, resolution), rng.uniform(90, 160), np.float32)
    for _ in range(3):
        freq, angle, phase = rng.uniform(2, 9), rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
        grey += rng.uniform(10, 30) * np.sin(2 * np.pi * freq * (xx * np.cos(angle) + yy * np.sin(angle)) + phase)
    grey += rng.normal(0, 6, grey.shape)
    tint = rng.uniform(-6, 6, 3).astype(np.float32)
    image = grey[..., None] + tint

    # Foreground: the class's shape in the class's hue, random size, position and shading.
    r = rng.uniform(0.18, 0.3) * resolution
    cy, cx = rng.uniform(r, resolution - r, 2)
    pyy, pxx = np.mgrid[0:resolution, 0:resolution].astype(np.float32)
    mask = _shape_mask(SHAPES[label % len(SHAPES)], pyy, pxx, cy, cx, r)
    colour = _hsv_to_rgb(class_hue(label, num_classes), rng.uniform(0.8, 1.0), rng.uniform(0.75, 1.0))
    shading = 1.0 + 0.12 * ((pyy - cy) / r)[..., None]
    image = np.where(mask[..., None], colour * shading, image)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), label


def classify(image: np.ndarray, num_classes: int = 10) -> int:
    """The class whose hue is nearest the mean hue of the image's saturated pixels; -1 if none."""
    hsv = np.asarray(Image.fromarray(np.asarray(image, np.uint8)).convert("HSV"), np.float32)
    foreground = hsv[..., 1] > SATURATED
    if foreground.sum() < 0.01 * foreground.size:
        return -1
    angles = hsv[..., 0][foreground] / 255.0 * 2 * np.pi
    mean_hue = np.degrees(np.arctan2(np.sin(angles).mean(), np.cos(angles).mean())) % 360
    distances = [abs((mean_hue - class_hue(c, num_classes) + 180) % 360 - 180) for c in range(num_classes)]
    return int(np.argmin(distances))


class DemoSource:
    """Random-access source of demo images (grain-compatible: __len__ and __getitem__)."""

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
