"""What a training run logs (process 0): metrics.jsonl, TensorBoard events and a readable line
per logged step, with the model FLOP utilisation where the device's peak is known."""

from __future__ import annotations

import json
import math
import os
import shutil
import time

import jax
import numpy as np
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.training.event_file import EventFile

# Dense bf16 peak FLOP/s per device, for the MFU estimate (no entry: no MFU).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "TPU v4": 275e12, "TPU v5 lite": 197e12,
              "TPU v5": 459e12, "TPU v6 lite": 918e12}


def peak_flops(device) -> float | None:
    kind = getattr(device, "device_kind", "")
    matches = [v for k, v in PEAK_FLOPS.items() if k in kind]
    return matches[0] if matches else None


SCALARS, IMAGES = "", "previews"  # folders of tensorboard/
LOCAL_EVENTS_PREFIX = "pixelflow_events"  # the local copies of a bucket run's event files (storage.temporary_dir)


# In a bucket, metrics.jsonl and the scalars' event file are uploaded whole, at most this often
# (and at each save and at the end): GCS takes about one write per second to one object, and each
# upload of a growing file costs its whole size, so a run logging every step would be throttled.
BUCKET_UPLOAD_INTERVAL_S = 30.0

# What a rerun does after a failed log write, once its cause is fixed (the checkpoints are unaffected).
WRITE_RERUN = "rerun the same command: it resumes from its latest checkpoint"


def json_values(record: dict) -> dict:
    """The record with non-finite floats as None: json.dumps writes NaN and Infinity, which
    standard JSON readers (jq, JavaScript, strict parsers) refuse."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}


class MetricsLog:
    """metrics.jsonl (one object per logged step), TensorBoard events (WORKDIR/tensorboard) and a
    readable line on stdout; process 0 only.

    In an object store (no append), metrics.jsonl is rewritten whole and the event files are written
    locally and uploaded whole, at most every BUCKET_UPLOAD_INTERVAL_S, at each save (upload(),
    called by the training loop) and at the end: a reader always sees complete files, at most that
    old. The preview images are uploaded as they come (one a preview)."""

    def __init__(self, workdir: str, resumed_step: int):
        self.path = storage.join(workdir, "metrics.jsonl")
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self.lines = []
        with storage.writing(self.path, WRITE_RERUN):
            if storage.exists(self.path):  # drop what a crashed run logged past its checkpoint
                steps = [(line, self._step_of(line)) for line in storage.read_text(self.path).splitlines()]
                self.lines = [line + "\n" for line, step in steps if step is not None and step <= resumed_step]
                storage.write_atomically(self.path, "".join(self.lines))
        self.events = events = storage.join(workdir, "tensorboard")
        self.remote_events = events if storage.is_url(events) else None
        if self.remote_events:  # a killed bucket run leaves its local copies, removed here
            storage.remove_abandoned_dirs(LOCAL_EVENTS_PREFIX)
        self.local_events = storage.temporary_dir(LOCAL_EVENTS_PREFIX) if self.remote_events else events
        self.resumed_step = resumed_step
        self.uploaded_at = -math.inf  # when the scalars last went to the bucket; the first goes at once
        # Scalars in tensorboard/, preview images in tensorboard/previews/ (a run of its own in
        # TensorBoard): in a bucket each file is uploaded whole (the scalars' with metrics.jsonl,
        # the images' at each preview), and the scalars' file stays small while the images' grows
        # by a grid per preview.
        self.event_files = {}
        self.event_file(SCALARS)

    def _step_of(self, line: str) -> int | None:
        """The step of a metrics line; None for a line a killed run left half-written (dropped)."""
        if not line.strip():
            return None
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            logging.warning("%s: dropping an unreadable line (half-written by a killed run?): %.80s", self.path, line)
            return None

    def event_file(self, folder: str) -> EventFile:
        """The event file of tensorboard/`folder` ('' for the top)."""
        if folder not in self.event_files:
            self.event_files[folder] = EventFile(os.path.join(self.local_events, folder),
                                                 purge_step=self.resumed_step + 1)
        return self.event_files[folder]

    def image(self, name: str, image: np.ndarray, step: int) -> None:
        if self.enabled:
            with storage.writing(self.events, WRITE_RERUN):
                self.event_file(IMAGES).add_image(name, image, step)
                self.event_file(IMAGES).flush()
                self._publish_events(IMAGES)

    def close(self, upload_metrics: bool = True) -> None:
        """Closes the event files and, in a bucket, uploads them and metrics.jsonl once more;
        upload_metrics=False for a run that lost its workdir to another run, whose metrics.jsonl it
        would replace (the event files have names of their own)."""
        if self.enabled:
            for event_file in self.event_files.values():
                event_file.close()
            if self.remote_events:
                if upload_metrics:
                    self._upload_metrics()
                with storage.writing(self.events, WRITE_RERUN):
                    for folder in self.event_files:
                        self._publish_events(folder)
                shutil.rmtree(self.local_events, ignore_errors=True)

    def upload(self) -> None:
        """In a bucket: metrics.jsonl and the scalars' events as logged so far (a no-op locally,
        where each record is appended at once)."""
        if self.enabled and self.remote_events:
            self._upload_metrics()
            with storage.writing(self.events, WRITE_RERUN):
                self._publish_events(SCALARS)
            self.uploaded_at = time.monotonic()

    def _upload_metrics(self) -> None:
        with storage.writing(self.path, WRITE_RERUN):
            storage.write_atomically(self.path, "".join(self.lines))

    def _publish_events(self, folder: str) -> None:
        if self.remote_events:
            local = os.path.join(self.local_events, folder)
            for name in os.listdir(local):
                if os.path.isfile(os.path.join(local, name)):
                    storage.upload_file_atomically(os.path.join(local, name),
                                                   storage.join(self.remote_events, *filter(None, (folder, name))))

    def add_to_step(self, step: int, values: dict) -> None:
        """Adds `values` to the logged line of `step` (a preview drawn after a stop during that step);
        nothing if that line was never written (a kill before it)."""
        if not self.enabled or not values:
            return
        at = [i for i, line in enumerate(self.lines) if self._step_of(line) == step]
        if not at:
            return
        self.lines[at[-1]] = json.dumps(json_values({**json.loads(self.lines[at[-1]]), **values}),
                                        allow_nan=False) + "\n"
        with storage.writing(self.path, WRITE_RERUN):
            storage.write_atomically(self.path, "".join(self.lines))
        self._add_scalars(values, step)

    def _add_scalars(self, values: dict, step: int) -> None:
        with storage.writing(self.events, WRITE_RERUN):
            for name, value in values.items():
                self.event_file(SCALARS).add_scalar(name, value, step)
            self.event_file(SCALARS).flush()

    def write(self, record: dict) -> str:
        """Logs the record; returns it as a readable line (for stdout)."""
        if not self.enabled:
            return ""
        line = json.dumps(json_values(record), allow_nan=False) + "\n"
        self.lines.append(line)
        if not self.remote_events:
            with storage.writing(self.path, WRITE_RERUN):
                with open(self.path, "a") as f:
                    f.write(line)
        self._add_scalars({k: v for k, v in record.items() if k != "step"}, record["step"])
        if self.remote_events and time.monotonic() - self.uploaded_at >= BUCKET_UPLOAD_INTERVAL_S:
            self.upload()
        extras = " ".join(f"{k} {v:.4g}" for k, v in record.items() if k.startswith("loss_stage"))
        mfu = f" mfu {record['mfu']:.1%}" if "mfu" in record else ""
        return (f"step {record['step']}: loss {record['loss']:.4f} ({extras}) grad_norm {record['grad_norm']:.3f} "
                f"{record['images_per_s']:.1f} img/s{mfu} non-finite steps skipped {record['skipped_steps']}")
