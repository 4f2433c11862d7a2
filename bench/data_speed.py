"""Decode + augment throughput of the input pipeline on ImageNet-like JPEGs (CPU only).

    python bench/data_speed.py                      # 256 px, 400 JPEGs of ~500x375, 1 and 2 workers

Writes the JPEGs to a temporary folder (smooth random content, so they compress like photos, about
the size of ImageNet's), then measures:
  - images/s of one core doing what a grain worker does (decode, RGB, Lanczos resize, crop, flip);
  - images/s of the whole loader with N worker processes.
A training step at S img/s needs about S / (images/s per core) cores of decoding per host.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from harness import non_negative_int, positive_int  # noqa: E402
from pixelflow_jax.data.decoding import DecodedSource, RandomCropFlip  # noqa: E402
from pixelflow_jax.data.loader import ImageLoader, build_dataset  # noqa: E402
from pixelflow_jax.data.sources import ImageFolderSource  # noqa: E402


def write_jpegs(root: str, count: int, seed: int = 0) -> float:
    """ImageNet-like JPEGs (sizes around 500x375, quality 90); returns the mean file size in KB."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "class0"))
    sizes = []
    for i in range(count):
        w, h = (500, 375) if i % 3 else (375, 500)
        coarse = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), np.uint8)
        image = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-12, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        path = os.path.join(root, "class0", f"{i:05d}.jpg")
        Image.fromarray(noisy).save(path, quality=90)
        sizes.append(os.path.getsize(path))
    return float(np.mean(sizes)) / 1024


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=positive_int, default=256)
    parser.add_argument("--images", type=positive_int, default=400)
    parser.add_argument("--batch", type=positive_int, default=32)
    parser.add_argument("--workers", type=non_negative_int, nargs="*", default=[1, 2])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as root:
        mean_kb = write_jpegs(root, args.images)
        source = ImageFolderSource(root)
        decoded = DecodedSource(source, args.resolution)
        augment = RandomCropFlip(args.resolution)
        rng = np.random.default_rng(0)
        start = time.perf_counter()
        for i in range(len(source)):
            out = augment(decoded[i], rng)
        per_core = len(source) / (time.perf_counter() - start)
        assert out["image"].shape == (args.resolution, args.resolution, 3)

        loader_rates = {}
        for workers in args.workers:
            loader = ImageLoader(build_dataset(source, batch_size=args.batch, resolution=args.resolution, seed=0,
                                               num_workers=workers))
            next(loader)  # start-up (worker processes) is not throughput
            batches = max(10, 3 * args.images // args.batch)  # well past the prefetch buffers
            start = time.perf_counter()
            for _ in range(batches):
                next(loader)
            loader_rates[workers] = batches * args.batch / (time.perf_counter() - start)
            loader.close()

    print(json.dumps(dict(resolution=args.resolution, images=args.images, mean_jpeg_kb=round(mean_kb, 1),
                          images_per_s_one_core=round(per_core, 1),
                          loader_images_per_s_by_workers={k: round(v, 1) for k, v in loader_rates.items()},
                          cpu_count=os.cpu_count()), indent=2))


if __name__ == "__main__":
    main()
