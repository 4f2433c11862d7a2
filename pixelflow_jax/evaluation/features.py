"""The Inception features (pool, spatial, logits) of an .npz's images: the batch split over this
process's devices and the images over the processes of a --distributed job, which gather them;
cached in WORKDIR/eval_features/, keyed by the path, size, modification time and CRC of the images
and by the Inception weights, so that a second evaluation of the same files reads them (a damaged
cache file is computed again); one entry per images file, the features of what it holds now. A
file replaced while it is read is refused, its features neither used nor cached."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
from typing import Callable

import jax
import numpy as np
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.error_text import described
from pixelflow_jax.evaluation.npz_images import npz_batches, npz_image_count, npz_images_crc
from pixelflow_jax.multihost import (block_size, from_process_0, gather_rows, hashed, named, processes_where,
                                     rows_of_this_process, seen_within_the_wait, stop_if_preempted_at_the_next_pass)
from pixelflow_jax.progress import Progress
from pixelflow_jax.sharding import batch_for, replicate_on_local_devices

FEATURES = ("pool", "spatial", "logits")


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
        self.computed: list[str] = []  # the files whose features it computed (the others' came from the cache)

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
        self.computed.append(path)
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

        with Progress(stop - first, f"Inception features of {progress_name(path)}", "img") as progress:
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


def progress_name(path: str) -> str:
    """The images file as a progress line names it: with its folder, since an evaluation of a sampling
    job against another job's samples.npz reads two files of one name."""
    folder = storage.basename(storage.dirname(path))
    return f"{folder}/{storage.basename(path)}" if folder else storage.basename(path)


def feature_cache_key(extract: FeatureExtractor, path: str) -> np.ndarray:
    """Two int32s naming the features of `path`'s images by the Inception `extract` runs."""
    size, mtime = storage.size_and_mtime(path)
    crc = npz_images_crc(path)  # files of one image count have one size, and a copy may keep the mtime
    return hashed(json.dumps([storage.absolute(path), size, mtime, crc, *extract.weights_id, FEATURES_VERSION]), 2)


def cache_file(cache_dir: str, path: str, key: np.ndarray) -> str:
    """NAME.PATH.KEY.npz: PATH (8 hex digits) is shared by the entries of one images file, whatever it held."""
    return storage.join(cache_dir, f"{cache_entry_prefix(path)}{np.asarray(key, np.int32).tobytes().hex()}.npz")


def cache_entry_prefix(path: str) -> str:
    return f"{storage.basename(path)}.{hashed(storage.absolute(path), 1).tobytes().hex()}."


def remove_earlier_entries(cache: str, path: str) -> None:
    """Removes the cache entries of `path` other than `cache`, just written for what it holds now:
    those of what it held before (samples sampled again), of other weights, or named by an earlier
    version (is_entry_of), never read again and ~1 GB each at 50k images. Complete entries only (a
    writer's temporary has another name); an evaluation reading one as it goes reads on locally (its
    file stays open) or computes again."""
    folder = storage.dirname(cache)
    try:
        names = storage.list_files(folder)
    except OSError as e:  # only a cache: the evaluation goes on (a bucket's listing failed after its write)
        logging.warning("could not list %s to remove the earlier cached features of %s (%s)", folder, path,
                        described(e))
        return
    for name in names:
        if name != storage.basename(cache) and is_entry_of(name, path):
            try:
                storage.remove(storage.join(folder, name))
            except OSError as e:  # only a cache: the evaluation goes on
                logging.warning("could not remove %s, earlier cached features of %s (%s)",
                                storage.join(folder, name), path, described(e))


CACHE_KEY_FILE = r"[0-9a-f]{16}\.npz"


def is_entry_of(name: str, path: str) -> bool:
    """Whether `name` is an entry of `path`'s features: NAME.PATH.KEY.npz, or NAME.KEY.npz as versions
    before 2026-12-02 named them (never read since). The latter is not claimed where it is also some
    file's NAME.PATH.KEY.npz: that of a file named as NAME begins, when NAME ends in 8 hex digits."""
    if re.fullmatch(re.escape(cache_entry_prefix(path)) + CACHE_KEY_FILE, name):
        return True
    return bool(re.fullmatch(re.escape(f"{storage.basename(path)}.") + CACHE_KEY_FILE, name)
                and not re.fullmatch(r".+\.[0-9a-f]{8}\." + CACHE_KEY_FILE, name))


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


def features_of_a_file_left_in_place(extract: FeatureExtractor, path: str, cache_dir: str,
                                     cache: str) -> dict[str, np.ndarray]:
    """extract(path), where `path` is still the file `cache` is named for once every process has read
    it; else ValueError. A file moved into its place meanwhile (a sampling job's new samples.npz) gave
    the new file's features under the old one's key, or, from a bucket, whose reads are ranges of
    whatever object the name holds, a mix of the two: unnoticed in a block not read to its end, and
    "damaged" in one that is."""
    try:
        features = extract(path)  # its ValueErrors (damage) are raised on every process together
    except ValueError:
        if replaced_while_read(extract, path, cache_dir, cache):
            raise ValueError(replaced_words(path)) from None
        raise
    if replaced_while_read(extract, path, cache_dir, cache):
        raise ValueError(replaced_words(path))
    return features


def replaced_while_read(extract: FeatureExtractor, path: str, cache_dir: str, cache: str) -> bool:
    """Whether `path` is no longer the file `cache` is named for, as process 0 finds it, on every process."""
    return replaced_as_process_0_finds(lambda: cache_file(cache_dir, path, feature_cache_key(extract, path)) == cache)


def replaced_as_process_0_finds(still_in_place: Callable[[], bool]) -> bool:
    """not still_in_place(), asked on process 0 and told to every process; a file gone, or no longer an
    .npz of images (OSError, ValueError), is replaced."""
    replaced = False
    if jax.process_index() == 0:
        try:
            replaced = not still_in_place()
        except (OSError, ValueError):
            replaced = True
    return bool(from_process_0(np.int32(replaced)))


def replaced_words(path: str) -> str:
    return (f"{path} was replaced while its images were read (by a sampling job?): its features are neither used "
            "nor cached; evaluate it again once it stays as it is")


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
    features = features_of_a_file_left_in_place(extract, path, cache_dir, cache)
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
        else:
            remove_earlier_entries(cache, path)
    return features
