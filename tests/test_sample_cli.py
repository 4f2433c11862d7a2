"""`main.py --mode=sample` end to end on 8 fake CPU devices: files, resume, and clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import REPO

EIGHT_DEVICES = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}


def run_sample(workdir, checkpoint, *overrides):
    return subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}",
                           "--mode=sample", f"--config.sample.checkpoint={checkpoint}", *overrides],
                          capture_output=True, text=True, cwd=REPO, env=EIGHT_DEVICES, timeout=600)


def pngs(workdir):
    return sorted(f for f in os.listdir(os.path.join(workdir, "samples")) if f.endswith(".png"))


def test_sample_writes_pngs_npz_and_grid_and_resumes(tmp_path, converted):
    workdir = str(tmp_path / "run")
    args = ("--config.sample.num_images=12", "--config.sample.batch_size=8", "--config.sample.steps_per_stage=(1,2,1,2)")
    result = run_sample(workdir, converted["c2i_tiny"], *args)
    assert result.returncode == 0, result.stderr
    assert pngs(workdir) == [f"{i:06d}.png" for i in range(12)]
    arr = np.load(os.path.join(workdir, "samples.npz"))["arr_0"]
    assert arr.shape == (12, 64, 64, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[5], np.asarray(Image.open(os.path.join(workdir, "samples", "000005.png"))))
    assert Image.open(os.path.join(workdir, "grid.png")).size == (4 * 64, 3 * 64)
    assert json.load(open(os.path.join(workdir, "samples", "settings.json")))["steps_per_stage"] == [1, 2, 1, 2]

    # Interrupt: images 3 and 10 never written (one left as a half-written temp file), no .npz yet.
    samples = os.path.join(workdir, "samples")
    for i in (3, 10):
        os.remove(os.path.join(samples, f"{i:06d}.png"))
    open(os.path.join(samples, "000003.png.tmp"), "wb").write(b"\x89PNG partial")
    os.remove(os.path.join(workdir, "samples.npz"))
    kept = {f: os.stat(os.path.join(samples, f)).st_mtime_ns for f in pngs(workdir)}

    result = run_sample(workdir, converted["c2i_tiny"], *args)
    assert result.returncode == 0, result.stderr
    assert "2 of 12 images to sample (10 already on disk)" in result.stderr
    assert pngs(workdir) == [f"{i:06d}.png" for i in range(12)]
    assert all(os.stat(os.path.join(samples, f)).st_mtime_ns == t for f, t in kept.items())  # not redone
    resumed = np.load(os.path.join(workdir, "samples.npz"))["arr_0"]
    assert np.abs(resumed.astype(int) - arr.astype(int)).max() <= 1  # the same images (up to float rounding)

    # Other settings in the same workdir would mix images: refused.
    result = run_sample(workdir, converted["c2i_tiny"], *args[:2], "--config.sample.seed=1")
    assert result.returncode != 0 and "other settings" in result.stderr and "seed" in result.stderr


@pytest.mark.parametrize("override,message", [
    ("--config.sample.batch_size=6", "must be divisible by the number of devices (8)"),
    ("--config.sample.labels=(1,2000)", "labels must be"),
])
def test_bad_settings_fail_clearly(tmp_path, converted, override, message):
    result = run_sample(str(tmp_path / "run"), converted["c2i_tiny"], "--config.sample.num_images=2", override)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_missing_checkpoint_fails_clearly(tmp_path):
    result = run_sample(str(tmp_path / "run"), str(tmp_path / "nowhere"))
    assert result.returncode != 0 and "does not exist" in result.stderr and "Traceback" not in result.stderr
