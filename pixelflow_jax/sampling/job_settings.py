"""A sampling job's settings.json: recorded by the first run, and what a rerun may change.

An image depends only on (seed, id, its label or prompt), so a rerun with the same settings
resumes the job; one asking for more images extends it; one asking for fewer takes an extension
back while no image past its count was sampled. Any other change would mix two jobs' images in
one folder, and is refused with what to do instead.
"""

from __future__ import annotations

from typing import NoReturn

import jax
import numpy as np
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.evaluation.npz_images import npz_row_count
from pixelflow_jax.multihost import from_process_0
from pixelflow_jax.sampling.job_files import SAMPLES_NPZ, WRITE_RERUN, earlier_outputs, image_id, sampled_images
from pixelflow_jax.workdir_files import SETTINGS_JSON

# Settings that jobs started by earlier versions did not record: their absence is no change.
SETTINGS_ADDED_LATER = ("checkpoint_fingerprint", "text_encoder_param_dtype", "param_dtype", "text_encoder_fingerprint")


def check_settings(folder: str, workdir: str, settings: dict, record: bool = True) -> None:
    """Records the settings on the first run; a rerun with different settings would mix images,
    and so would images already there that no settings describe. A samples.npz that no settings
    describe (its PNGs and settings.json deleted to save space) is not overwritten either. Two jobs
    starting together in one new folder: one records its settings, the other is checked against them.
    A rerun may ask for more images (an extension), or for fewer while no image past its count was
    sampled (a larger count taken back). With record=False nothing is written: the refusals only
    (before the weights are read, so that a job whose weights then fail to load records nothing).

    Process 0 checks and records for the job, and every process learns the outcome, so that all
    of them stop together (one raising alone would leave the others waiting for it)."""
    problem = None
    if jax.process_index() == 0:
        try:
            check_and_record_settings(folder, workdir, settings, record)
        except (ValueError, storage.StorageError) as e:
            problem = e
    if int(from_process_0(np.int32(problem is not None))):
        problem = problem or ValueError(f"process 0 refused the settings of {folder} (its error says why)")
    if problem:
        raise problem


def check_and_record_settings(folder: str, workdir: str, settings: dict, record: bool = True) -> None:
    path = storage.join(folder, SETTINGS_JSON)
    if storage.exists(path):
        recorded = read_settings(path)
        changed = changed_settings(recorded, settings)
        if not changed:
            return
        if (count := extended_from(recorded, settings, changed)) is not None:
            # Each image depends only on the seed, its id and its conditioning: the recorded ones stay valid.
            if record:
                logging.info("extending the job in %s from %d to %d images: those on disk are kept", folder, count,
                             settings["num_images"])
                record_settings(path, settings)
            return
        if extended_from(settings, recorded, changed) is not None:  # the recorded job extends this one
            shrink_job(folder, workdir, recorded, settings, record)
            return
        refuse_other_settings(folder, workdir, recorded, settings, changed)
    if images := sampled_images(folder):
        count = f"{len(images)} images (e.g. {images[0]})" if len(images) > 1 else f"the image {images[0]}"
        raise ValueError(f"{folder} holds {count} but no settings.json saying what "
                         "they were sampled with, so they cannot join this job: use a new --workdir, or move them away")
    if earlier := earlier_outputs(workdir):
        raise ValueError(f"{workdir} holds {' and '.join(earlier)} of an earlier sampling job whose {path} is gone, "
                         "so this job would overwrite them with other images: use a new --workdir, or move them away")
    if not record:
        return
    with storage.writing(path, WRITE_RERUN):
        created = storage.create_json(path, settings)
    if created:
        return
    if changed := changed_settings(read_settings(path), settings):  # another job's came first
        raise ValueError(f"another job started sampling into {folder} at the same time, with other settings "
                         f"(differing: {changed}); use a new --workdir")


def record_settings(path: str, settings: dict) -> None:
    """settings.json written whole; a failure (a full disk, a read-only folder) is a StorageError
    naming it, which check_settings shares with every process."""
    with storage.writing(path, WRITE_RERUN):
        storage.write_json_atomically(path, settings)


def refuse_other_settings(folder: str, workdir: str, recorded: dict, settings: dict,
                          changed: list[str]) -> NoReturn:
    """Raises for a rerun whose settings differ from the recorded ones in more than its image count,
    with what to do for the setting that changed."""
    path = storage.join(folder, SETTINGS_JSON)
    if not sampled_images(folder) and not earlier_outputs(workdir):  # not replaced: a job may be starting
        raise ValueError(f"{path} records other settings (differing: {changed}) of a job that has sampled no "
                         "image yet (it stopped before its first, or is still starting): if no job samples "
                         f"into {folder}, delete {path} and rerun; or use a new --workdir")
    if "checkpoint_fingerprint" in changed:
        finish = (f"; to finish or extend the job of {folder}, rerun with --config.sample.checkpoint="
                  f"{recorded['checkpoint']}, which still holds the weights its images came from"
                  if recorded_checkpoint_unchanged(recorded) else "")
        raise ValueError(f"{folder} holds images sampled with other settings (differing: {changed}): they are of "
                         f"other weights ({weights_difference(recorded.get('checkpoint'), settings['checkpoint'])}); "
                         f"sample these into a new --workdir with --config.sample.checkpoint={settings['checkpoint']}"
                         f"{finish}")
    if "text_encoder_fingerprint" in changed:  # the recorded images' prompts were encoded by other weights
        raise ValueError(f"{folder} holds images whose prompts another text encoder encoded (differing: {changed}; "
                         f"the files of {settings['text_encoder']} changed, or another encoder is named): sample "
                         "into a new --workdir, or rerun with the encoder folder as it was")
    if "labels" in changed and (cycles := default_cycles_of(recorded, settings)):
        raise ValueError(f"{folder} holds images labelled i mod {cycles[0]} (every class of the model: the default "
                         "labels before sampling a run trained on fewer classes than its model cycled over those, "
                         "the class count its train_settings.json records or its class folders in "
                         f"class_index.json) and this job labels them i mod {cycles[1]}: sample into a new "
                         "--workdir (most images there are of ids this run never trained on)")
    # Until 2026-11-29 a text run's sampling took float32 encoder weights whatever the run trained with.
    dtype = (" (its text_encoder_param_dtype: --config.sample.text_encoder_param_dtype="
             f"{recorded.get('text_encoder_param_dtype')})"
             if "text_encoder_param_dtype" in changed else "")
    raise ValueError(f"{folder} holds images sampled with other settings (differing: {changed}); "
                     f"use a new --workdir, or rerun with the settings in settings.json{dtype}")


def weights_difference(sampled: str | None, sampling: str) -> str:
    """How the checkpoint the job's images came from and the one this rerun samples differ, as
    their paths tell: two steps of one run (trained on since, or a later step deleted), one step
    saved again, or one folder whose files changed."""
    before, now = run_and_step(sampled), run_and_step(sampling)
    if before and now and before[0] == now[0]:
        if now[1] > before[1]:
            return f"the run trained on since: they came from its step {before[1]}, and this job samples step {now[1]}"
        if now[1] < before[1]:
            deleted = " (deleted since)" if not storage.is_url(sampled) and not storage.exists(sampled) else ""
            return (f"they came from the run's step {before[1]}{deleted}, and this job samples its earlier "
                    f"step {now[1]}")
        return f"the run's step {now[1]} was saved again since, with other weights"
    if sampled == sampling:
        return f"the files of {sampling} changed since they were sampled (converted again, or replaced)"
    return f"they came from {sampled}, and this job samples {sampling}" if sampled else "a checkpoint changed since"


def run_and_step(checkpoint: str | None) -> tuple[str, int] | None:
    """(run, step) of a path RUN/checkpoints/STEP, whether or not the step is still there."""
    from pixelflow_jax.checkpoints.run_checkpoint import CHECKPOINTS, is_step_name

    if not isinstance(checkpoint, str):
        return None
    parent, name = storage.dirname(checkpoint), storage.basename(checkpoint)
    if storage.basename(parent) != CHECKPOINTS or not is_step_name(name):
        return None
    return storage.dirname(parent), int(name)


def recorded_checkpoint_unchanged(recorded: dict) -> bool:
    """Whether the checkpoint a job recorded still holds the files it sampled from: a run that
    trained on since keeps its earlier step for a while (train.keep_checkpoints), and naming that
    step finishes the job. Hub paths are not looked up (that could mean a download)."""
    from pixelflow_jax.api import resolve_checkpoint
    from pixelflow_jax.checkpoints import hub
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    path, fingerprint = recorded.get("checkpoint"), recorded.get("checkpoint_fingerprint")
    if not isinstance(path, str) or not fingerprint or hub.is_hub_path(path):
        return False
    try:
        return resolve_checkpoint(path).fingerprint() == fingerprint
    except (CheckpointError, OSError, storage.StorageError):  # gone (rotated away, deleted) or unreadable
        return False


# What may differ between a job and the larger one that extends it.
PER_IMAGE_SETTINGS = ("num_images", "labels", "prompts", "images_per_prompt")


def per_image_conditioning(settings: dict) -> list | None:
    """What each image of a job is sampled for: its label, or its prompt."""
    if "labels" in settings:
        return list(settings["labels"])
    if "prompts" in settings:
        return [prompt for prompt in settings["prompts"] for _ in range(int(settings["images_per_prompt"]))]
    return None


def extended_from(recorded: dict, settings: dict, changed: list[str]) -> int | None:
    """The recorded job's image count when `settings` only ask for more images, the recorded ones
    each with the label or prompt it had (sample.labels's default, i mod num_classes, extends;
    so do prompts added after the recorded ones); None otherwise."""
    if not set(changed) <= set(PER_IMAGE_SETTINGS):
        return None
    before, after = per_image_conditioning(recorded), per_image_conditioning(settings)
    if before is None or after is None or len(after) <= len(before) or after[:len(before)] != before:
        return None
    return len(before)


def default_cycles_of(recorded: dict, settings: dict) -> tuple[int, int] | None:
    """(num_classes, k) when the recorded job labels image i with class i mod num_classes and this
    one with i mod k, fewer: the default labels of a job that an earlier version sampled, which
    did not read the classes a run trained (its class folders, or its data's class count), and
    those of this version."""
    before, after = recorded.get("labels"), settings.get("labels")
    if not (isinstance(before, list) and isinstance(after, list) and after):
        return None
    shared = min(len(before), len(after))
    if before[:shared] == after[:shared]:  # no recorded image labelled otherwise: some other setting changed
        return None
    num_classes, k = settings["architecture"]["num_classes"], max(after) + 1
    if k < num_classes and before == cycle(len(before), num_classes) and after == cycle(len(after), k):
        return num_classes, k
    return None


def cycle(count: int, period: int) -> list[int]:
    """Labels i mod period, for images 0 to count - 1."""
    return [i % period for i in range(count)]


def shrink_job(folder: str, workdir: str, recorded: dict, settings: dict, record: bool) -> None:
    """Records the smaller job of `settings` (the recorded one extends it) when nothing holds an
    image past its count, so that a larger count typed by mistake can be taken back. Refused
    otherwise: settings.json must describe every image kept (a later extension with other labels or
    prompts would adopt those images), and a finished job's samples.npz must not be overwritten by
    a smaller one."""
    count = int(settings["num_images"])
    beyond, npz_count = pngs_from(folder, count), npz_count_of(workdir)
    if beyond or npz_count > count:
        raise ValueError(shrink_refusal(folder, workdir, recorded, count, beyond, npz_count))
    if record:
        logging.info("shrinking the job in %s from %d to %d images: none past the %d was sampled", folder,
                     int(recorded["num_images"]), count, count)
        record_settings(storage.join(folder, SETTINGS_JSON), settings)


def pngs_from(folder: str, first_id: int) -> list[str]:
    """The job's PNGs numbered `first_id` or above, by id."""
    return sorted((name for name in sampled_images(folder) if image_id(name) >= first_id), key=image_id)


def npz_count_of(workdir: str) -> int:
    """How many images the workdir's samples.npz holds (0: none there)."""
    path = storage.join(workdir, SAMPLES_NPZ)
    if not storage.isfile(path):
        return 0
    try:
        return npz_row_count(path)
    except ValueError as e:  # it may hold images past a smaller job's count, which would overwrite it
        raise ValueError(f"cannot tell how many images {path} holds ({e}), and a job asking for fewer images than "
                         "settings.json records would overwrite it: move it away and rerun, or use a new --workdir"
                         ) from None


def shrink_refusal(folder: str, workdir: str, recorded: dict, count: int, beyond: list[str], npz_count: int) -> str:
    """Names what holds images past `count`, and the ways on: remove them, keep them, or a new workdir."""
    npz = storage.join(workdir, SAMPLES_NPZ)
    held, remove = [], []
    if beyond:
        names = ", ".join(beyond) if len(beyond) <= 3 else f"{beyond[0]} to {beyond[-1]}"
        images = f"{len(beyond)} images" if len(beyond) > 1 else "1 image"
        held.append(f"{folder} holds {images} numbered {count} or above ({names})")
        remove.append(f"delete {'those' if len(beyond) > 1 else 'that'} {images.replace('image', 'PNG')}")
    if npz_count > count:
        held.append(f"{npz} holds {npz_count} images")
        remove.append(f"move {npz} away")
    them = "it" if len(beyond) == 1 and npz_count <= count else "them"
    keep = max(npz_count, image_id(beyond[-1]) + 1 if beyond else 0)
    recorded_count = int(recorded["num_images"])
    if "labels" in recorded:
        labels = list(recorded["labels"])
        given = "" if labels == cycle(len(labels), max(labels, default=0) + 1) else (
            ", each image with the --config.sample.labels entry settings.json records for it")  # not the default
        at_least = f"at least {keep} images (as recorded: --config.sample.num_images={recorded_count}{given})"
    else:  # a text job's count is its prompts times images_per_prompt
        per_prompt = int(recorded["images_per_prompt"])
        at_least = (f"at least the first {-(-keep // per_prompt)} of settings.json's prompts, {per_prompt} images "
                    f"each (as recorded: its {len(recorded['prompts'])} prompts, {recorded_count} images)")
    return (f"this job asks for {count} images, fewer than the {recorded_count} that "
            f"{storage.join(folder, 'settings.json')} records, but {' and '.join(held)}: a job may shrink only while "
            f"no image past its new count was sampled. To shrink it to {count}, {' and '.join(remove)}, then rerun; "
            f"to keep {them}, rerun asking for {at_least}; or use a new --workdir")


def read_settings(path: str) -> dict:
    """The settings a job recorded at `path`; a damaged file is an error naming it."""
    try:
        recorded = storage.read_json(path)
        if not isinstance(recorded, dict):
            raise ValueError(f"a JSON {type(recorded).__name__}, not an object")
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}), so the images beside it cannot be "
                         "trusted to be this job's: use a new --workdir, or move the samples folder away") from None
    return recorded


def changed_settings(previous: dict, settings: dict) -> list[str]:
    """The names of the settings that differ from the `previous` ones (a job's record), ignoring
    what cannot change the images."""
    settings = {k: v for k, v in settings.items() if k in previous or k not in SETTINGS_ADDED_LATER}
    changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
    for path, fingerprint in (("checkpoint", "checkpoint_fingerprint"), ("text_encoder", "text_encoder_fingerprint")):
        if previous.get(fingerprint) and previous.get(fingerprint) == settings.get(fingerprint):
            changed = [k for k in changed if k != path]  # the same files at another path: a copy, a link, a move
    if previous.get("weights") == "ema" and "weights" in settings and settings["weights"] is None:
        # Until 2026-12-01 a folder of one set of weights was recorded as read for the default 'ema'.
        changed = [k for k in changed if k != "weights"]
    if settings.get("solver") == "dopri5":  # its adaptive steps use neither
        changed = [k for k in changed if k not in ("shift", "steps_per_stage")]
    return changed
