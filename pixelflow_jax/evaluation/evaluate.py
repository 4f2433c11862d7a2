"""`main.py --mode=eval`: FID, sFID, Inception Score, precision and recall of a sample batch
against a reference batch, the numbers ADM's evaluation suite prints, without TensorFlow.

    config.eval.samples            .npz with arr_0 = uint8 (N, H, W, 3) (what --mode=sample writes)
    config.eval.reference          .npz with arr_0 (e.g. ADM's VIRTUAL_imagenet256_labeled.npz);
                                   its precomputed mu / sigma (and mu_s / sigma_s) are used when present
    config.eval.inception_weights  pytorch-fid's pt_inception-2015-12-05-6726825d.pth

Images are streamed from the .npz in batches (npz_images.py) and run through the Inception, whose
features are cached next to the run (features.py): a second evaluation of the same files reads
them. Results: printed, WORKDIR/eval.json (the latest) and a line of WORKDIR/eval_history.jsonl
(every evaluation), with what produced them (the files' CRC-32s, the batch, the software and
devices: what_produced_the_metrics); NaN or inf anywhere (features, stored statistics, a metric)
is an error, so they hold finite numbers only.
"""

from __future__ import annotations

import contextlib

import jax
import numpy as np
from absl import logging

from pixelflow_jax import storage, validation
from pixelflow_jax.checkpoints.checkpoint import CheckpointError
from pixelflow_jax.evaluation import metrics
from pixelflow_jax.evaluation.features import (FEATURES_VERSION, FeatureExtractor, cached_features,
                                              replaced_as_process_0_finds)
from pixelflow_jax.evaluation.npz_images import (DAMAGED_MEMBER, check_pixel_values, npz_contents, npz_for_folder,
                                                 npz_image_count, npz_images_crc, open_images, opened_archive)
from pixelflow_jax.job_records import command_line
from pixelflow_jax.multihost import (InputRead, check_same_inputs, check_shared_workdir, failing_together,
                                     from_process_0, seen_within_the_wait, stop_if_preempted_at_the_next_pass,
                                     write_on_process_0)
from pixelflow_jax.progress import say
from pixelflow_jax.software_versions import job_environment
from pixelflow_jax.workdir_files import EVAL_JSON, SAMPLES_NPZ, settings_path

INPUT_ERRORS = (ValueError, CheckpointError, storage.StorageError)  # what check_inputs raises for bad input
METRICS = ("fid", "sfid", "inception_score", "precision", "recall")
IMAGENET_256_REFERENCE_URL = ("https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/"
                              "VIRTUAL_imagenet256_labeled.npz")
# What eval.json's sampling_job copies from the settings.json of the job that sampled the images.
SAMPLING_JOB_FIELDS = ("checkpoint", "checkpoint_fingerprint", "weights", "seed", "num_images", "solver",
                       "steps_per_stage", "cfg_scale")
# The shapes of ADM's stored reference statistics: pool_3 (2048) and mixed_6/conv's first 7 channels (7 x 17 x 17).
STATISTICS_SHAPES = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}


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
            kind = ("is a folder, not an .npz file" if storage.isdir(path) else
                    storage.missing_bucket_words(path) or "is not found")
            fix = (f": ADM's ImageNet 256 reference batch is {IMAGENET_256_REFERENCE_URL}; any .npz of uint8 images "
                   "(arr_0: N x H x W x 3) of the data you trained on serves" if name == "eval.reference" else "")
            if storage.isdir(path):
                fix += npz_for_folder(path)
            elif storage.isfile(f"{path}.npz"):  # np.savez(path, ...) adds the ending the name lacks
                fix = f" (numpy.savez added .npz to the name it was given: pass {path}.npz)"
            elif hint := storage.slash_after_a_file(path):  # a shell's completion of a folder's name
                fix = hint
            raise ValueError(f"--config.{name} {path} {kind}{fix}")
    if not storage.isfile(inception_weights):
        from pixelflow_jax.evaluation.inception_convert import WEIGHTS_URL

        found = ("is a folder, not the weights file" if storage.isdir(inception_weights) else
                 storage.missing_bucket_words(inception_weights)
                 or f"not found{storage.slash_after_a_file(inception_weights)}")
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
    with (open_images(samples) as (_, sample_shape, _, sample_crc),
          open_images(reference) as (_, reference_shape, _, reference_crc)):
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
        sampling_job=sampling_job_of(samples),
        **what_produced_the_metrics(extract, (samples, sample_crc), (reference, reference_crc)),
    )
    not_finite = [name for name in METRICS if not np.isfinite(results[name])]
    if not_finite:  # the checks above should make this impossible; eval.json must never hold NaN
        raise ValueError(f"{', '.join(not_finite)} came out NaN or inf for {samples} against {reference}")
    check_left_in_place(samples, sample_crc)
    check_left_in_place(reference, reference_crc)
    return results


def what_produced_the_metrics(extract: FeatureExtractor, samples: tuple[str, int], reference: tuple[str, int]) -> dict:
    """What eval.json records beside the metrics so that they can be traced: the CRC-32 of each
    file's images (arr_0, from the zip directory) and of the reference's stored statistics that FID
    and sFID used ({} where the .npz holds none: they came from its images), the Inception batch,
    which files' features came from the feature cache (computed by an earlier evaluation, with its
    own batch and software: its line in eval_history.jsonl), the command and the software and devices."""
    (samples_path, samples_crc), (reference_path, reference_crc) = samples, reference
    return dict(samples_crc32=crc32_text(samples_crc), reference_crc32=crc32_text(reference_crc),
                reference_statistics_crc32=stored_statistics_crc32(reference_path), batch_size=extract.batch_size,
                features_from_cache={"samples": samples_path not in extract.computed,
                                     "reference": reference_path not in extract.computed},
                command=command_line(), environment=job_environment())


def sampling_job_of(samples: str) -> dict | None:
    """What the sampling job that wrote `samples` (a samples.npz beside its samples/settings.json)
    sampled, for eval.json: a grader's eval.json named only the images' CRC, not the checkpoint, step
    (its path), weights and seed behind them. None where the file is no sampling job's. Read as
    recorded, not checked against the images: a job's folder is trusted (README: Evaluation); a field an
    older version did not record is null."""
    if storage.basename(samples) != SAMPLES_NPZ:
        return None
    path = storage.absolute(settings_path(storage.dirname(samples)))
    if not storage.exists(path):
        return None
    try:
        settings = storage.read_json(path)
        return dict(settings=path, **{key: settings.get(key) for key in SAMPLING_JOB_FIELDS})
    except (OSError, ValueError, AttributeError) as e:  # damaged, a folder, or no mapping
        logging.warning("%s cannot be read as a sampling job's settings (%s: %s): eval.json records no sampling job "
                        "for %s", path, type(e).__name__, e, samples)
        return dict(settings=path, unreadable=f"{type(e).__name__}: {e}")


def crc32_text(crc: int) -> str:
    """A CRC-32 as the 8 hex digits `crc32` and `unzip -v` print."""
    return f"{crc:08x}"


def check_left_in_place(path: str, crc_at_start: int) -> None:
    """ValueError on every process where process 0 finds other images in `path` than when the
    evaluation began. A sampling job's new samples.npz moved into place meanwhile had the earlier
    images' metrics recorded under its name, after the job had removed the eval.json it outdated; a
    reference replaced once its features were read had its stored statistics (FID's) read from the
    new file, and precision and recall from the old one's features."""
    if replaced_as_process_0_finds(lambda: npz_images_crc(path) == crc_at_start):
        raise ValueError(f"{path} was replaced while it was evaluated (by a sampling job?): the metrics are not "
                         "recorded; evaluate it again")


def stored_statistics_crc32(path: str) -> dict[str, str]:
    """ADM's statistics (mu, sigma, mu_s, sigma_s) an .npz holds beside its images, each with its
    member's CRC-32 (crc32_text), from the zip directory (no array is read)."""
    with contextlib.ExitStack() as opened:
        archive = opened_archive(opened, path)
        names = set(archive.namelist())
        return {key: crc32_text(archive.getinfo(f"{key}.npy").CRC) for key in STATISTICS_SHAPES
                if f"{key}.npy" in names}


def statistics_stored_in(path: str) -> list[str]:
    """The names of ADM's statistics (mu, sigma, mu_s, sigma_s) an .npz holds beside its images."""
    return list(stored_statistics_crc32(path))


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
    except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):  # none, damaged, or no folder
        return None


def check_own_samples_written(npz: str, workdir: str) -> None:
    """A sampling job stopped before all its images were sampled has not packed them into
    samples.npz yet: the evaluation said to set --config.eval.samples, as if the workdir held no job."""
    if (asked := own_job_image_count(workdir)) is not None:
        raise ValueError(f"this workdir's sampling job ({settings_path(workdir)}) has not written {npz} yet: it packs "
                         f"its images there once all {asked} are sampled. Rerun its --mode=sample command to finish "
                         "it, or set --config.eval.samples to evaluate another .npz")


def check_own_samples_finished(npz: str, workdir: str, job: str = "this workdir's sampling job") -> None:
    """The workdir's samples.npz is its sampling job's whole output once that job has finished; a
    job extended to more images and stopped part-way left the smaller earlier file, which scored
    the earlier images without a word. `job`: that job, in the error's words."""
    if (asked := own_job_image_count(workdir)) is None:
        return
    settings = settings_path(workdir)
    held = npz_image_count(npz)
    if held != asked:
        raise ValueError(f"{npz} holds {held} images, but {job} asks for {asked} ({settings}): "
                         "it has not finished. Rerun its --mode=sample command to finish it (samples.npz is "
                         f"rewritten then), or set --config.eval.samples={npz} to evaluate the {held} anyway")


def warn_if_unfinished(npz: str, job_workdir: str, job: str) -> None:
    """check_own_samples_finished as a warning, for samples named on purpose: evaluated anyway."""
    try:
        check_own_samples_finished(npz, job_workdir, job)
    except ValueError as unfinished:
        logging.warning("%s (evaluated anyway, as --config.eval.samples names it)", unfinished)


def samples_to_evaluate(samples: str, workdir: str) -> str:
    """`samples`, or where that is unset the workdir's own samples.npz; ValueError where that is a
    sampling job's unfinished output, a warning where a named samples.npz (this workdir's or
    another's) is."""
    own = storage.join(workdir, SAMPLES_NPZ)
    names_own = not samples or storage.resolved(samples) == storage.resolved(own)
    if names_own and not storage.isfile(own):  # (no job here: evaluate's checks name what is missing)
        check_own_samples_written(own, workdir)
    elif not samples:
        check_own_samples_finished(own, workdir)
        logging.info("evaluating %s, this workdir's samples (--config.eval.samples names others)", own)
        return own
    elif names_own:  # named on purpose (this README's eval command names it): evaluated, but never without a word
        warn_if_unfinished(own, workdir, "this workdir's sampling job")
    elif storage.basename(samples) == SAMPLES_NPZ:  # another sampling job's, evaluated in a workdir of its own
        job_workdir = storage.dirname(samples)
        warn_if_unfinished(samples, job_workdir, f"the sampling job of {job_workdir}")
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


def run(config, workdir: str, samples: str | None = None, images_sampled_by_this_job: int | None = None) -> dict:
    """Evaluates config.eval.samples (or `samples`; neither: the workdir's own samples.npz, that of
    a sampling job there) and writes WORKDIR/eval.json (process 0). images_sampled_by_this_job: at
    the end of a sampling job, how many of the images it sampled itself (sample_run.run), recorded so
    that a grader can tell images it sampled from images found in the folder; None for --mode=eval."""
    config, workdir = validation.job_config(config, "eval"), validation.job_workdir(workdir)
    e = config.eval
    # As the config's paths are: `~` expanded; a bytes path, an array of images or a URL of another scheme a
    # ConfigError.
    if validation.is_set(samples):
        samples = validation.setting_path("samples", samples)
    samples = samples_chosen_by_process_0(samples or e.get("samples", ""), workdir)
    results = evaluate(samples, e.reference, e.inception_weights, workdir, int(e.batch_size))
    results["images_sampled_by_this_job"] = images_sampled_by_this_job
    for name in METRICS:  # on stdout, once (eval.json keeps them)
        say(f"{name}: {results[name]:.4f}")
    path = storage.join(workdir, EVAL_JSON)
    # Written by process 0; a failure there stops the others with it, not with a success of their own.
    write_on_process_0(path, "rerun the same command to record them (the metrics are printed above)",
                       lambda path: storage.write_json_keeping_history(path, results))
    return results
