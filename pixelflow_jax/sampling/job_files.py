"""The files of a sampling job's workdir, and what lies there from an earlier job.

    WORKDIR/samples/000000.png ...   one PNG per image, named by image id
    WORKDIR/samples/settings.json    what the images were sampled with (job_settings.py)
    WORKDIR/samples/sampling_runs.jsonl  a line per job that sampled here (job_records.py)
    WORKDIR/samples.npz              every image of the job, for evaluation
    WORKDIR/grid.png                 the first images, to look at
"""

from __future__ import annotations

import re

from pixelflow_jax import storage
from pixelflow_jax.multihost import failing_together
from pixelflow_jax.workdir_files import EVAL_JSON, SAMPLES_NPZ, settings_path

GRID_PNG = "grid.png"
SAMPLING_RUNS = "sampling_runs.jsonl"  # in the samples folder

IMAGE_NAME = re.compile(r"\d{6,}\.png")
# What a rerun does after a failed write of the job's files, once its cause is fixed (a full disk, a folder made
# read-only).
WRITE_RERUN = "rerun the same command: the images already written are kept and the job goes on from them"


def image_name(image_id: int) -> str:
    return f"{image_id:06d}.png"


def image_path(folder: str, image_id: int) -> str:
    return storage.join(folder, image_name(image_id))


def images_on_disk(folder: str) -> set[str]:
    """Names of the finished PNGs (one listing, not one request per image on an object store)."""
    return set(storage.list_files(folder))


def image_id(name: str) -> int:
    return int(name.removesuffix(".png"))


def sampled_images(folder: str) -> list[str]:
    return sorted(name for name in images_on_disk(folder) if IMAGE_NAME.fullmatch(name))


def earlier_outputs(workdir: str) -> list[str]:
    """What a sampling job leaves in its workdir besides samples/: what the next job would overwrite."""
    return [name for name in (SAMPLES_NPZ, GRID_PNG, EVAL_JSON) if storage.exists(storage.join(workdir, name))]


def sampled_checkpoint(workdir: str) -> str | None:
    """The checkpoint the sampling job in `workdir` recorded (samples/settings.json), or None where
    no job's readable record is."""
    try:
        checkpoint = storage.read_json(settings_path(workdir))["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError):  # none there (or damaged, or a folder): no job to name
        return None
    return checkpoint if isinstance(checkpoint, str) else None


def check_outputs_have_room(workdir: str) -> None:
    """samples.npz and grid.png are written once every image exists: a folder in their place (a
    rerun's workdir) failed there with a traceback, after the sampling. samples/ holds the images.
    Every process stops when one finds a problem (another host's view of the workdir may lag): one
    stopping alone left the others in their next collective."""
    with failing_together((ValueError,), "checking the job's outputs in the workdir"):
        for name in (SAMPLES_NPZ, GRID_PNG):
            if storage.isdir(path := storage.join(workdir, name)):
                raise ValueError(f"{path} is a folder, where this job writes its {name}: move it away, or use a "
                                 "new --workdir")
        if storage.isfile(folder := storage.join(workdir, "samples")):
            raise ValueError(f"{folder} is a file, where this job keeps its images: use a new --workdir, or move "
                             "it away")
