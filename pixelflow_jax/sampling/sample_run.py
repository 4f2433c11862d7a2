"""`main.py --mode=sample`: sample a checkpoint (a training run, converted, release or Hub folder)
to PNGs, an ADM-format .npz and a grid.

    WORKDIR/samples/000000.png ...   one PNG per image, named by image id
    WORKDIR/samples/settings.json    what the images were sampled with (job_settings.py: a rerun must
                                     match, add images, or drop images not sampled yet)
    WORKDIR/samples/sampling_runs.jsonl  a line per job started here: its command, checkpoint step, batch,
                                     attention kernel, software and devices (job_records.py)
    WORKDIR/samples.npz              arr_0 = uint8 (N, H, W, 3), written once every image exists
    WORKDIR/grid.png                 the first (up to 64) images, to look at
    WORKDIR/sample.lock              the job working there (one at a time: training/workdir_lock.py)

The batch is sharded over every device (sharding.make_mesh); in a multi-host run each process
writes the images its devices hold. A checkpoint of a run on the built-in demo data gets the demo's
measure of its images, hue and outline agreement, printed (demo_check.py). A rerun skips every
image already on disk: an image depends only on (seed, id, its label or prompt), so resumed images
are those an uninterrupted run would write (Euler: up to float rounding; dopri5: within its
tolerance, since its step sizes are the batch's). Class- and text-conditional checkpoints: see
sample_conditioning.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import zipfile
from typing import Iterator

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils
from PIL import Image

from pixelflow_jax import random_numbers, storage, validation
from pixelflow_jax.api import (check_steps_for_stages, fetch_weights, read_sampling_model, read_through_rotation,
                               run_trained_classes, sampling_runtime, sampling_source, weights_chosen, weights_of)
from pixelflow_jax.evaluation.evaluate import INPUT_ERRORS
from pixelflow_jax.evaluation.npz_images import npz_images_crc
from pixelflow_jax.job_records import append_job_record
from pixelflow_jax.kernels.attention import resolve_backend
from pixelflow_jax.multihost import (InputRead, check_same_inputs, check_shared_workdir, failing_together,
                                     from_process_0, stop_if_preempted)
from pixelflow_jax.progress import Progress
from pixelflow_jax.sampling.cascade import (CascadeSampler, SamplingOptions, check_finite, draw_noise_jit,
                                            finished_images)
from pixelflow_jax.sampling import demo_check
from pixelflow_jax.sampling.job_files import (GRID_PNG, SAMPLES_NPZ, SAMPLING_RUNS, WRITE_RERUN,
                                              check_outputs_have_room, image_name, image_path, images_on_disk)
from pixelflow_jax.sampling.job_settings import check_settings
from pixelflow_jax.sampling.sample_conditioning import conditioning_for
from pixelflow_jax.sharding import batch_for, batch_sharding, global_array, make_mesh, replicated
from pixelflow_jax.training.workdir_lock import SAMPLE_LOCK_FILE, WorkdirBusy, WorkdirLock
from pixelflow_jax.workdir_files import EVAL_JSON

GRID_IMAGES = 64
MAX_PASSES = 3  # sampling passes: the first, then again for images found damaged
# A sampling job killed without its release (kill -9, SIGKILL after a grace period) and resumed on
# another host is refused until then; its lock's heartbeat is refreshed every tenth of it.
SAMPLE_LOCK_STALE_S = 120.0


def save_png_atomically(path: str, image: np.ndarray) -> None:
    """A PNG appears complete or not at all, so an interrupted run never leaves a truncated image."""
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format="PNG")
    storage.write_atomically(path, encoded.getvalue())


def image_grid(images: np.ndarray) -> np.ndarray:
    n, h, w, c = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * h, cols * w, c), np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, cols)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid


def write_local_images(folder: str, images: jax.Array, finite: jax.Array, ids: np.ndarray, num_valid: int) -> None:
    """Writes the rows this process holds (one replica of each), skipping padding rows. A batch
    with a row that came out NaN or inf (`finite`: cascade.finished_images' flags, replicated, so that every
    process stops alike) is an error before anything is written, not black PNGs."""
    check_finite(np.asarray(finite)[:num_valid], ids[:num_valid])
    for shard in images.addressable_shards:
        if shard.replica_id != 0:
            continue
        rows = range(*shard.index[0].indices(images.shape[0]))
        for row, image in zip(rows, np.asarray(shard.data)):
            if row < num_valid:
                path = image_path(folder, int(ids[row]))
                with storage.writing(path, WRITE_RERUN):
                    save_png_atomically(path, image)


def run(config, workdir: str) -> int:
    """Samples the job; returns how many of its images it sampled itself (sample_in_owned_workdir)."""
    config, workdir = validation.job_config(config, "sample"), validation.job_workdir(workdir)
    with storage.removed_if_left_empty(workdir, remover=jax.process_index() == 0):  # a job refused at its start
        return _sample(config, workdir)


def _sample(config, workdir: str) -> int:
    s = config.sample
    num_devices = jax.device_count()
    if s.batch_size % num_devices:  # before any download or restore
        raise ValueError(f"sample.batch_size {s.batch_size} must be divisible by the number of devices "
                         f"({num_devices}); try {max(num_devices, s.batch_size // num_devices * num_devices)}")
    source, ckpt = sampling_source(config, workdir)
    # The settings, labels or prompts, text encoder and workdir are checked before the weights are read.
    check_steps_for_stages(s, source, ckpt.num_stages)
    options = SamplingOptions.create(ckpt.num_stages, s.steps_per_stage, cfg_scale=s.cfg_scale, shift=s.shift,
                                     solver=s.solver)
    # Each process reads the run's class list, the prompts file and the text encoder from its own host.
    with failing_together(INPUT_ERRORS, "reading the job's labels or prompts"):
        trained = None if ckpt.model.cross_attention_dim else run_trained_classes(source, ckpt.model.num_classes)
        conditioning = conditioning_for(s, ckpt.model, trained)
    check_shared_workdir(workdir)  # a workdir this job cannot write: known before the restore (minutes at XL)
    check_outputs_have_room(workdir)
    with one_sampling_job(workdir):
        return sample_in_owned_workdir(config, workdir, source, ckpt, options, conditioning)


@contextlib.contextmanager
def one_sampling_job(workdir: str) -> Iterator[None]:
    """Holds WORKDIR/sample.lock while the job works: a second job on the workdir (a SLURM array's
    tasks given one --workdir) sampled every image again beside the first, each rewriting the other's
    PNGs and samples.npz. Taken in the `try`: a stop the moment after its creation still releases it."""
    lock = WorkdirLock(workdir, SAMPLE_LOCK_STALE_S, SAMPLE_LOCK_FILE, "sampling job")
    try:
        try:
            lock.acquire()
        except WorkdirBusy as e:
            raise ValueError(f"{e}. Jobs on one workdir at once would each sample every image: to share a job's "
                             "images out over several GPUs or hosts, run it once over all of them with --distributed "
                             "(srun, one process per GPU)") from None
        yield
    finally:
        lock.release()


def sample_in_owned_workdir(config, workdir: str, source, ckpt, options: SamplingOptions, conditioning) -> int:
    """_sample once the job holds the workdir's sampling lock: its settings checked against an earlier
    job's and recorded, the weights restored, then every image not on disk sampled and the .npz written.
    Returns how many images this job sampled: the others were on disk, as an earlier job (or anyone
    with the folder) left them, and an evaluation that follows records the count (eval.json)."""
    s = config.sample
    num_devices = jax.device_count()
    folder = storage.join(workdir, "samples")
    fetch_weights(source)  # the settings record the weights' files: fetched now, restored after
    num_images = conditioning.num_images

    def checked_and_read(source):
        """The job's settings of `source`, checked against an earlier job's before the restore
        (minutes at XL), and the model read: again for the run's newer step where its training
        rotated this one away (read_through_rotation), so that the settings name the step read."""
        settings = job_settings(config, source, ckpt, options, conditioning)
        check_same_inputs(inputs_read(s, settings))  # process 0 checks and records its own settings alone
        check_settings(folder, workdir, settings, record=False)
        return settings, *read_sampling_model(config, source), source

    settings, model, ckpt, source = read_through_rotation(source, checked_and_read)
    check_settings(folder, workdir, settings)  # before samples/ is made: a refused job leaves nothing
    storage.makedirs(folder)
    if jax.process_index() == 0:  # before any process writes here
        storage.clear_leftovers_of_killed_writers(folder, workdir)
    # The whole job's batch shape, however few images a rerun has left: in bfloat16 another shape rounds the
    # model's matmuls otherwise (images a few levels apart), and it would be compiled again.
    batch_size = batch_for(num_images, int(s.batch_size), num_devices)
    append_job_record(storage.join(folder, SAMPLING_RUNS), sampling_record(s, settings, source, ckpt, batch_size),
                      WRITE_RERUN)
    multihost_utils.sync_global_devices("sample settings checked")

    sampled_ids = set()
    for _ in range(MAX_PASSES):
        missing = images_to_sample(folder, num_images)
        sampled_ids.update(missing.tolist())
        if len(missing):
            logging.info("sampling %s: %d of %d images to sample (%d already on disk), batch %d "
                         "over %d devices", weights_of(source, s.weights), len(missing), num_images,
                         num_images - len(missing), batch_size, num_devices)
            sample_batches(model, ckpt, options, conditioning, missing, folder, batch_size, int(s.seed))
        else:
            logging.info("all %d images of this job are on disk (%s)", num_images, weights_of(source, s.weights))
        multihost_utils.sync_global_devices("all images written")
        removed = finish(folder, workdir, num_images, ckpt.resolution) if jax.process_index() == 0 else 0
        # Every process learns whether process 0 removed unreadable images, to sample them again.
        if not int(from_process_0(np.int32(removed))):
            if jax.process_index() == 0:
                demo_check.print_for(source.run_step and source.run_step.run, conditioning,
                                     storage.join(workdir, SAMPLES_NPZ))
            return len(sampled_ids)  # samples.npz is written: an evaluation may read it next
    # Every process gets here together (the count above is broadcast), so none waits for the others.
    raise storage.StorageError(f"images in {folder} were missing or unreadable after {MAX_PASSES} passes (see the "
                               "warnings): is the storage failing, or is another job deleting them?")


def job_settings(config, source, ckpt, options: SamplingOptions, conditioning) -> dict:
    """What samples/settings.json records of a job: what its images depend on."""
    s, runtime = config.sample, sampling_runtime(config)
    return dict(checkpoint=source.label, weights=weights_chosen(source, s.weights),
                architecture=ckpt.model.architecture(),
                dtype=runtime["dtype"], param_dtype=runtime["param_dtype"],
                resolution=ckpt.resolution, num_stages=ckpt.num_stages,
                steps_per_stage=list(options.steps_per_stage),
                cfg_scale=options.cfg_scale, shift=options.shift, solver=options.solver, seed=int(s.seed),
                num_images=conditioning.num_images, checkpoint_fingerprint=source.fingerprint(),
                **conditioning.settings())


def sampling_record(sample_config, settings: dict, source, ckpt, batch_size: int) -> dict:
    """What this job's line of samples/sampling_runs.jsonl says besides job_records' own: the
    weights read (of a training run, the step read: its new latest where its rotation deleted the
    one first chosen), the batch and the attention kernel the images were computed with ('auto'
    resolved for this platform; a call whose shapes the kernel refuses runs xla, as
    kernels/attention.py says)."""
    model = ckpt.model
    return dict(checkpoint=settings["checkpoint"], checkpoint_step=source.run_step.step if source.run_step else None,
                checkpoint_fingerprint=settings["checkpoint_fingerprint"], weights=settings["weights"],
                num_images=settings["num_images"], batch_size=batch_size,
                batch_size_asked=int(sample_config.batch_size),
                dtype=model.dtype, param_dtype=model.param_dtype, attention=model.attention,
                attention_backend=resolve_backend(model.attention, model.compute_dtype))


def inputs_read(sample_config, settings: dict) -> list[InputRead]:
    """What this process read from the files of the job that each host may hold its own copy of,
    by content: the checkpoint, the labels (class names are looked up in the run's class_index.json,
    and the default labels cycle over the classes its train_settings.json records), the prompts
    file and the text encoder."""
    read = [InputRead(f"--config.sample.checkpoint {settings['checkpoint']}", settings["checkpoint_fingerprint"])]
    if "labels" in settings:
        read.append(InputRead("the labels (from --config.sample.labels, the run's class_index.json or its "
                              "train_settings.json)", json.dumps(settings["labels"])))
    if sample_config.get("prompts_file"):
        prompts = settings["prompts"]
        read.append(InputRead(f"--config.sample.prompts_file {sample_config.prompts_file}", json.dumps(prompts),
                              len(prompts), "prompts"))
    if "text_encoder_fingerprint" in settings:
        read.append(InputRead(f"--config.sample.text_encoder {settings['text_encoder']}",
                              settings["text_encoder_fingerprint"]))
    return read


def images_to_sample(folder: str, num_images: int) -> np.ndarray:
    """The ids of the job's images not on disk, as process 0 lists them. Every process samples the
    same batches: listing for itself, a process whose listing lagged (a file system's cache) would
    count another number of batches, and the processes would wait for each other for ever."""
    absent = np.zeros(num_images, np.int32)
    if jax.process_index() == 0:
        done = images_on_disk(folder)
        absent = np.array([image_name(i) not in done for i in range(num_images)], np.int32)
    return np.flatnonzero(from_process_0(absent)).astype(np.int64)


def sample_batches(model, ckpt, options, conditioning, missing, folder, batch_size, seed) -> None:
    mesh = make_mesh()
    batch, everywhere = batch_sharding(mesh), replicated(mesh)
    # Replicated from the host copy: the weights sit on one device of this process, and a direct
    # device_put onto every process's devices is a cross-host transfer most backends refuse.
    nnx.update(model, jax.tree.map(lambda a: global_array(np.asarray(a), everywhere), nnx.state(model)))
    sampler = CascadeSampler(model, ckpt)
    # The finite flags replicated, so that every process stops alike on a bad image.
    finish_batch = jax.jit(finished_images, out_shardings=(batch, everywhere))
    key = random_numbers.key(seed)
    total = conditioning.num_images
    progress = Progress(total, "sampling", "img", initial=total - len(missing))
    written = None  # the batch dispatched last: its PNGs are written while the next one computes

    def write(images, finite, ids, num_valid):
        write_local_images(folder, images, finite, ids, num_valid)
        progress.update(num_valid)

    with progress, jax.set_mesh(mesh):  # Pallas attention kernels split batch and heads over it
        try:
            for passes, first in enumerate(range(0, len(missing), batch_size), start=1):
                stop_if_preempted(passes)
                ids = missing[first:first + batch_size]
                num_valid = len(ids)
                ids = np.concatenate([ids, np.full(batch_size - num_valid, ids[-1])])  # static batch shape
                cond, uncond = (jax.tree.map(lambda a: global_array(a, batch), c) for c in conditioning.batch(ids))
                initial, blocks = draw_noise_jit(key, global_array(ids, batch), ckpt.resolution,
                                                 ckpt.num_stages, model.config.in_channels, sampler.scheduler.gamma)
                latents = sampler.sample(initial, blocks, cond, uncond, options)  # dispatched, not awaited
                if written:
                    previous, written = written, None
                    write(*previous)  # PNG encoding and uploads overlap this batch's sampling
                written = *finish_batch(latents), ids, num_valid
        finally:  # also when the next batch failed or Ctrl-C came: the finished one is kept
            if written:
                write(*written)


def read_sample(path: str, resolution: int) -> tuple[np.ndarray | None, str]:
    """(the image, "") or (None, what is wrong with it): a file that does not decode (truncated,
    empty, not a PNG), or not an RGB image of the job's size (not written by this job)."""
    try:
        with Image.open(io.BytesIO(storage.read_bytes(path))) as image:
            if image.mode != "RGB" or image.size != (resolution, resolution):
                return None, f"is a {image.mode} {image.size[0]}x{image.size[1]} image, not RGB {resolution}px"
            return np.asarray(image), ""
    except (OSError, SyntaxError, ValueError):  # PIL's errors for damaged files
        return None, "does not decode (damaged?)"


class UnreadableSamples(Exception):
    """Images found unreadable while samples.npz was written: it is not published."""

    def __init__(self, count: int):
        super().__init__(f"{count} unreadable images")
        self.count = count


def write_images_npz(file, images, count: int, resolution: int) -> None:
    """An .npz as np.savez(file, arr_0=...) writes it (one uncompressed arr_0.npy member), from
    `count` images given one at a time: the job's images are never all in memory (50,000 at 256 px
    are 9.8 GB)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (count, resolution, resolution, 3)}
    with zipfile.ZipFile(file, "w", zipfile.ZIP_STORED, allowZip64=True) as archive, \
            archive.open("arr_0.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(member, header)
        for image in images:
            member.write(np.ascontiguousarray(image, np.uint8).tobytes())


def finish(folder: str, workdir: str, num_images: int, resolution: int) -> int:
    """The ADM .npz and the grid, once every image exists and is one this job wrote (process 0
    only). An image that is not (gone, damaged after it was written, or another size) is named in
    a warning, removed, and counted: the caller samples it again. Returns how many (0: the .npz
    is written)."""
    done = images_on_disk(folder)
    absent = [i for i in range(num_images) if image_name(i) not in done]
    if absent:  # written, then gone: a failing store or another job; process 0 alone must not raise
        logging.warning("%d images are missing after sampling (e.g. %s): sampling them again", len(absent),
                        image_path(folder, absent[0]))
        return len(absent)
    grid = []

    def readable_images():
        """The images in order, each read once; an unreadable one is named, removed and counted,
        and the .npz then given up (UnreadableSamples) once every image was read."""
        unreadable = 0
        # Reads in threads: from a bucket each PNG is its own request, and one after another the job
        # waits out every request's latency; PNG decoding releases the GIL too.
        read = storage.read_in_order(lambda i: read_sample(image_path(folder, i), resolution), range(num_images))
        for i, (image, problem) in enumerate(read):
            if image is None:
                unreadable += 1
                logging.warning("%s %s: removed, sampling it again", image_path(folder, i), problem)
                storage.remove(image_path(folder, i))
                continue
            if i < GRID_IMAGES:
                grid.append(image)
            if not unreadable:
                yield image
        if unreadable:
            raise UnreadableSamples(unreadable)

    npz_path = storage.join(workdir, SAMPLES_NPZ)
    earlier = local_npz_identity(npz_path)
    try:
        with storage.writing(npz_path, WRITE_RERUN):
            storage.write_streamed_atomically(npz_path, lambda f: write_images_npz(f, readable_images(), num_images,
                                                                                   resolution))
    except UnreadableSamples as e:
        return e.count
    keep_the_time_of_an_unchanged_npz(npz_path, earlier)
    grid_path = storage.join(workdir, GRID_PNG)
    with storage.writing(grid_path, WRITE_RERUN):
        save_png_atomically(grid_path, image_grid(np.stack(grid)))
    logging.info("wrote %s (arr_0: %s uint8) and %s", npz_path, (num_images, resolution, resolution, 3), grid_path)
    remove_outdated_evaluation(workdir, npz_path, num_images)
    return 0


def local_npz_identity(path: str) -> tuple[int, int, int] | None:
    """(arr_0's CRC-32, the file's size, its modification time in ns) of a local .npz; None where
    there is none (or it cannot be read, or it lies in a bucket, whose times cannot be set)."""
    if storage.is_url(path):
        return None
    try:
        crc = npz_images_crc(path)
        status = os.stat(path)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return None
    return crc, status.st_size, status.st_mtime_ns


def keep_the_time_of_an_unchanged_npz(path: str, earlier: tuple[int, int, int] | None) -> None:
    """samples.npz written again with the same bytes (a finished job run again, to finish its evaluation)
    keeps its earlier modification time: the evaluation's feature cache, keyed by it, serves its features
    still (they were computed again, the samples' whole Inception pass)."""
    now = local_npz_identity(path)
    if earlier and now and now[:2] == earlier[:2]:
        with contextlib.suppress(OSError):  # a file system without settable times: the features are computed again
            os.utime(path, ns=(os.stat(path).st_atime_ns, earlier[2]))


def remove_outdated_evaluation(workdir: str, npz_path: str, num_images: int) -> None:
    """An extended job's new samples.npz outdates the eval.json that scored the earlier, smaller
    one: left there, it stood as the workdir's latest result for images it never saw. Its line in
    eval_history.jsonl stays. A scoring of another file, or of this job's whole set, is kept."""
    path = storage.join(workdir, EVAL_JSON)
    if not storage.isfile(path):
        return
    try:
        scored = storage.read_json(path)
        # Resolved: the evaluation may have named the file through a link (or the job its workdir so).
        outdated = (storage.resolved(scored["samples"]) == storage.resolved(npz_path)
                    and int(scored["num_samples"]) != num_images)
    except (ValueError, KeyError, TypeError):  # not an evaluation this project wrote: not ours to remove
        return
    if outdated:
        storage.remove(path)
        logging.info("removed %s: it scored the earlier %d images of %s (its line stays in %s); evaluate the %d "
                     "with --mode=eval", path, int(scored["num_samples"]), npz_path,
                     storage.history_path(path), num_images)
