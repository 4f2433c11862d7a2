"""`main.py --mode=sample` end to end on 8 fake CPU devices: files, resume, and clear errors."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import REPO, cpu_devices, stop_handlers_kept

EIGHT_DEVICES = {**os.environ, "XLA_FLAGS": cpu_devices(8)}


def run_sample(workdir, checkpoint, *overrides, config="configs/c2i.py:tiny"):
    return subprocess.run([sys.executable, "main.py", f"--config={config}", f"--workdir={workdir}",
                           "--mode=sample", f"--config.sample.checkpoint={checkpoint}", *overrides],
                          capture_output=True, text=True, cwd=REPO, env=EIGHT_DEVICES, timeout=600)


def pngs(workdir):
    return sorted(f for f in os.listdir(os.path.join(workdir, "samples")) if f.endswith(".png"))


def sampling_jobs(workdir):
    """The lines of the workdir's samples/sampling_runs.jsonl, one per job."""
    with open(os.path.join(workdir, "samples", "sampling_runs.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_sample_writes_pngs_npz_and_grid_and_resumes(tmp_path, converted):
    workdir = str(tmp_path / "run")
    args = ("--config.sample.num_images=12", "--config.sample.batch_size=64",
            "--config.sample.steps_per_stage=(1,2,1,2)")
    result = run_sample(workdir, converted["c2i_tiny"], *args)
    assert result.returncode == 0, result.stderr
    assert "12 of 12 images to sample (0 already on disk), batch 16 over 8 devices" in result.stderr  # not 64
    assert pngs(workdir) == [f"{i:06d}.png" for i in range(12)]
    arr = np.load(os.path.join(workdir, "samples.npz"))["arr_0"]
    assert arr.shape == (12, 64, 64, 3) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr[5], np.asarray(Image.open(os.path.join(workdir, "samples", "000005.png"))))
    assert Image.open(os.path.join(workdir, "grid.png")).size == (4 * 64, 3 * 64)
    assert json.load(open(os.path.join(workdir, "samples", "settings.json")))["steps_per_stage"] == [1, 2, 1, 2]
    # What made the images: the command, the batch and attention kernel actually used, the software and devices.
    job, = sampling_jobs(workdir)
    assert shlex.split(job["command"])[-4:] == [f"--config.sample.checkpoint={converted['c2i_tiny']}", *args]
    assert (job["checkpoint"], job["checkpoint_step"]) == (converted["c2i_tiny"], None)  # not a training run
    assert (job["batch_size"], job["batch_size_asked"], job["attention"], job["attention_backend"]) == (
        16, 64, "auto", "xla")
    assert job["environment"]["devices"] == {"backend": "cpu", "platform_version": "cpu", "device_kind": "cpu",
                                             "device_count": 8, "local_device_count": 8, "process_count": 1}
    assert job["environment"]["packages"]["jax"] == jax.__version__

    # Interrupt: images 3 and 10 never written (left as half-written temp files of a killed writer),
    # no .npz yet; and image 7 damaged after it was written (emptied).
    samples = os.path.join(workdir, "samples")
    for i in (3, 10):
        os.remove(os.path.join(samples, f"{i:06d}.png"))
    open(os.path.join(samples, "000003.png.tmp"), "wb").write(b"\x89PNG partial")  # an earlier version's name
    open(os.path.join(samples, ".000010.png.tmp-999999999-x"), "wb").write(b"\x89PNG partial")
    open(os.path.join(samples, "000007.png"), "wb").close()
    Image.new("RGB", (32, 32)).save(os.path.join(samples, "000005.png"))  # not an image of this job
    open(os.path.join(workdir, "draft.tmp"), "wb").close()  # the user's own file
    os.remove(os.path.join(workdir, "samples.npz"))
    kept = {f: os.stat(os.path.join(samples, f)).st_mtime_ns for f in pngs(workdir) if f not in ("000005.png",
                                                                                                   "000007.png")}

    result = run_sample(workdir, converted["c2i_tiny"], *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("2 of 12 images to sample (10 already on disk), batch 16 over 8 devices") == 2
    assert "000007.png does not decode (damaged?): removed, sampling it again" in result.stderr
    assert "000005.png is a RGB 32x32 image, not RGB 64px: removed, sampling it again" in result.stderr
    assert sorted(os.listdir(samples)) == [f"{i:06d}.png" for i in range(12)] + ["sampling_runs.jsonl",
                                                                                 "settings.json"]  # no leftovers
    assert len(sampling_jobs(workdir)) == 2  # each job adds its line
    assert "draft.tmp" in os.listdir(workdir)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(os.path.join(workdir, "samples.npz")).st_mode & 0o777 == 0o666 & ~umask  # others may read it
    assert all(os.stat(os.path.join(samples, f)).st_mtime_ns == t for f, t in kept.items())  # not redone
    resumed = np.load(os.path.join(workdir, "samples.npz"))["arr_0"]
    assert np.abs(resumed.astype(int) - arr.astype(int)).max() <= 1  # the same images (up to float rounding)

    # Other settings in the same workdir would mix images: refused.
    result = run_sample(workdir, converted["c2i_tiny"], *args[:2], "--config.sample.seed=1")
    assert result.returncode != 0 and "other settings" in result.stderr and "seed" in result.stderr


@pytest.mark.parametrize("override,message", [
    ("--config.sample.batch_size=6", "must be divisible by the number of devices (8)"),
    ("--config.sample.labels=(1,2000)", "labels must be"),
    # it named the field without its flag: 'steps_per_stage needs one value per stage (4), got (1, 2, 3)'
    ("--config.sample.steps_per_stage=(1,2,3)", "--config.sample.steps_per_stage gives 3 values; "),
    ("--config.eval.reference=/nowhere/ref.npz", "set --config.eval.inception_weights"),  # early
    ("--config.eval.reference=/nowhere/ref.npz --config.eval.inception_weights=/nowhere/w.pth",
     "--config.eval.reference /nowhere/ref.npz is not found"),
])
def test_bad_settings_fail_clearly(tmp_path, converted, override, message):
    result = run_sample(str(tmp_path / "run"), converted["c2i_tiny"], "--config.sample.num_images=2",
                        *override.split())
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "samples").exists()


def test_missing_checkpoint_fails_clearly(tmp_path):
    result = run_sample(str(tmp_path / "run"), str(tmp_path / "nowhere"))
    assert result.returncode != 0 and "does not exist" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_prompts_to_pngs_with_a_text_conditional_checkpoint(tmp_path, converted):
    """The release's tiny t2i model (20-wide text embeddings) with a tiny random T5 of d_model 20
    and a tokenizer trained in the test: 2 prompts x 2 images, padded to a batch of 8."""
    from test_t5 import write_tiny_t5_folder

    encoder = str(tmp_path / "t5")
    write_tiny_t5_folder(encoder, d_model=20)
    workdir = str(tmp_path / "run")
    args = (f"--config.sample.text_encoder={encoder}", "--config.sample.images_per_prompt=2",
            "--config.sample.max_text_tokens=16")
    result = run_sample(workdir, converted["t2i_tiny"], *args, "--config.sample.prompts=('a red cat', 'the moon')",
                        config="configs/t2i.py:tiny")
    assert result.returncode == 0, result.stderr
    assert pngs(workdir) == [f"{i:06d}.png" for i in range(4)]
    images = np.load(os.path.join(workdir, "samples.npz"))["arr_0"]
    assert images.shape == (4, 64, 64, 3) and len({image.tobytes() for image in images}) == 4
    settings = json.load(open(os.path.join(workdir, "samples", "settings.json")))
    assert settings["prompts"] == ["a red cat", "the moon"] and settings["negative_prompt"] == ""
    # bfloat16 weights give other embeddings: no rerun mixes them
    assert settings["text_encoder_param_dtype"] == "float32"

    # The Python API draws the same images (up to float rounding: one uint8 level).
    from pixelflow_jax import load_model
    from pixelflow_jax.sampling.cascade import CascadeSampler
    from pixelflow_jax.text.prompts import PromptEncoder

    sampler = CascadeSampler(*load_model(converted["t2i_tiny"]))
    same = sampler.generate_from_prompts(PromptEncoder(encoder, max_length=16), ["a red cat"] * 2 + ["the moon"] * 2,
                                         steps_per_stage=3)
    assert np.abs(same.astype(int) - images.astype(int)).max() <= 1

    # The same prompts from a file are the same run: every image is already there.
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("a red cat\nthe moon\n")
    result = run_sample(workdir, converted["t2i_tiny"], *args, f"--config.sample.prompts_file={prompts_file}",
                        config="configs/t2i.py:tiny")
    assert result.returncode == 0 and "all 4 images of this job are on disk" in result.stderr, result.stderr

    for overrides, message in [((), "set exactly one of --config.sample.prompts"),
                               (("--config.sample.prompts=('a cat',)", "--config.sample.text_encoder="),
                                "set --config.sample.text_encoder")]:
        result = run_sample(str(tmp_path / "bad"), converted["t2i_tiny"], *args, *overrides,
                            config="configs/t2i.py:tiny")
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_images_gone_after_sampling_are_sampled_again_not_an_error_on_one_process(tmp_path, caplog):
    """finish() runs on process 0 only: an error there left the other processes waiting for it
    forever. A gone image is now counted like a damaged one, and every process samples it again."""
    from pixelflow_jax.sampling import sample_run

    folder, workdir = tmp_path / "samples", tmp_path
    folder.mkdir()
    for i in (0, 2):
        sample_run.save_png_atomically(sample_run.image_path(str(folder), i), np.zeros((8, 8, 3), np.uint8))
    with caplog.at_level("WARNING"):
        assert sample_run.finish(str(folder), str(workdir), num_images=3, resolution=8) == 1
    assert "1 images are missing after sampling (e.g. " in caplog.text and "000001.png" in caplog.text
    assert not (workdir / "samples.npz").exists()
    sample_run.save_png_atomically(sample_run.image_path(str(folder), 1), np.zeros((8, 8, 3), np.uint8))
    assert sample_run.finish(str(folder), str(workdir), num_images=3, resolution=8) == 0
    assert np.load(workdir / "samples.npz")["arr_0"].shape == (3, 8, 8, 3)


def test_an_extended_jobs_new_npz_removes_the_eval_json_of_the_earlier_images(tmp_path, caplog):
    """After an extension (2 -> 3 images) the eval.json of the 2 stood as the workdir's latest
    result. An evaluation of the whole set, or of another file, is kept."""
    from pixelflow_jax import storage
    from pixelflow_jax.sampling import sample_run

    folder, workdir = tmp_path / "samples", tmp_path
    folder.mkdir()
    npz = storage.absolute(str(workdir / "samples.npz"))
    for i in range(3):
        sample_run.save_png_atomically(sample_run.image_path(str(folder), i), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "link").symlink_to(workdir)  # the evaluation named the file through a link to the workdir
    through_link = storage.absolute(str(tmp_path / "link" / "samples.npz"))
    for scored, kept in (({"samples": npz, "num_samples": 3}, True),
                         ({"samples": "/other.npz", "num_samples": 2}, True),
                         ({"samples": npz, "num_samples": 2}, False),
                         ({"samples": through_link, "num_samples": 2}, False)):
        storage.write_json_keeping_history(str(workdir / "eval.json"), scored)
        with caplog.at_level("INFO"):
            assert sample_run.finish(str(folder), str(workdir), num_images=3, resolution=8) == 0
        assert (workdir / "eval.json").exists() == kept, scored
    assert "it scored the earlier 2 images" in caplog.text
    assert len((workdir / "eval_history.jsonl").read_text().splitlines()) == 4
    # not an evaluation this project wrote (a list, a count that is no number, a folder of that name): kept
    for other in ([1], {"samples": npz, "num_samples": "all"}):
        storage.write_json_atomically(str(workdir / "eval.json"), other)
        assert sample_run.finish(str(folder), str(workdir), num_images=3, resolution=8) == 0
        assert (workdir / "eval.json").exists()
    (workdir / "eval.json").unlink()
    (workdir / "eval.json").mkdir()
    assert sample_run.finish(str(folder), str(workdir), num_images=3, resolution=8) == 0


def test_a_shrunk_jobs_new_npz_removes_the_eval_json_of_the_larger_set(tmp_path):
    """A shrink refused for its larger samples.npz goes on once that file is moved away (as the refusal
    says): the eval.json that scored its 4 images stood beside the new 3-image samples.npz as its result."""
    from pixelflow_jax import storage
    from pixelflow_jax.sampling import sample_run

    folder, workdir = tmp_path / "samples", tmp_path
    folder.mkdir()
    for i in range(3):
        sample_run.save_png_atomically(sample_run.image_path(str(folder), i), np.zeros((8, 8, 3), np.uint8))
    npz = storage.absolute(str(workdir / "samples.npz"))
    storage.write_json_atomically(str(workdir / "eval.json"), {"samples": npz, "num_samples": 4})
    assert sample_run.finish(str(folder), str(workdir), num_images=3, resolution=8) == 0
    assert not (workdir / "eval.json").exists()


def test_a_grid_of_a_count_that_is_no_square_fills_rows_as_wide_as_its_root_rounded_up():
    from pixelflow_jax.sampling import sample_run

    images = np.arange(1, 6, dtype=np.uint8).reshape(5, 1, 1, 1)  # 5 images of 1 px: 3 per row, 2 rows
    assert sample_run.image_grid(images)[..., 0].tolist() == [[1, 2, 3], [4, 5, 0]]


def test_samples_npz_is_written_image_by_image_and_read_as_np_savez_writes_it(tmp_path, monkeypatch, caplog):
    """finish() held every image in memory for np.savez (50,000 at 256 px: 9.8 GB; a million: 196 GB)."""
    from pixelflow_jax import storage
    from pixelflow_jax.evaluation.npz_images import npz_batches
    from pixelflow_jax.sampling import sample_run

    images = np.random.default_rng(0).integers(0, 256, (70, 8, 8, 3), dtype=np.uint8)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(images):
        sample_run.save_png_atomically(sample_run.image_path(str(folder), i), image)
    held, most = [0], [0]
    real_read = sample_run.read_sample

    def counted_read(path, resolution):  # images read and not yet written into the .npz
        held[0] += 1
        most[0] = max(most[0], held[0])
        return real_read(path, resolution)

    real_write = sample_run.write_images_npz

    def counted_write(file, readable, count, resolution):
        def written():
            for image in readable:
                held[0] -= 1
                yield image
        real_write(file, written(), count, resolution)

    monkeypatch.setattr(sample_run, "read_sample", counted_read)
    monkeypatch.setattr(sample_run, "write_images_npz", counted_write)
    monkeypatch.setattr(storage.reads, "READ_AHEAD", 8)
    assert sample_run.finish(str(folder), str(tmp_path), num_images=70, resolution=8) == 0
    assert most[0] <= 8 + 1  # the read-ahead, and the one being written
    with np.load(tmp_path / "samples.npz") as f:
        assert f.files == ["arr_0"]
        np.testing.assert_array_equal(f["arr_0"], images)
    np.testing.assert_array_equal(np.concatenate(list(npz_batches(str(tmp_path / "samples.npz"), 32))), images)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    np.testing.assert_array_equal(grid[:8, :8], images[0])  # 64 images, 8 per row
    np.testing.assert_array_equal(grid[:8, 8:16], images[1])  # row by row
    np.testing.assert_array_equal(grid, sample_run.image_grid(images[:sample_run.GRID_IMAGES]))  # not the 65th

    (folder / sample_run.image_name(3)).write_bytes(b"not a png")
    os.remove(tmp_path / "samples.npz")
    with caplog.at_level("WARNING"):
        assert sample_run.finish(str(folder), str(tmp_path), num_images=70, resolution=8) == 1
    assert "000003.png does not decode (damaged?): removed, sampling it again" in caplog.text
    assert not (tmp_path / "samples.npz").exists() and not (folder / sample_run.image_name(3)).exists()
    assert [name for name in os.listdir(tmp_path) if name.startswith(".")] == []  # no temporary left


def test_an_image_of_another_mode_or_shape_is_sampled_again_not_written_into_samples_npz(tmp_path, caplog):
    """A grey, RGBA or non-square PNG is no image of this job: its bytes in arr_0 would shift every
    later image (a grey 8x8 image is 64 bytes, not 192) or give a mis-shaped array."""
    from pixelflow_jax.sampling import sample_run

    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(images):
        sample_run.save_png_atomically(sample_run.image_path(str(folder), i), image)
    Image.fromarray(images[1]).convert("L").save(folder / sample_run.image_name(1))
    Image.fromarray(images[2]).convert("RGBA").save(folder / sample_run.image_name(2))
    Image.fromarray(images[3][:7]).save(folder / sample_run.image_name(3))
    with caplog.at_level("WARNING"):
        assert sample_run.finish(str(folder), str(tmp_path), num_images=4, resolution=8) == 3
    for i, what in ((1, "a L 8x8"), (2, "a RGBA 8x8"), (3, "a RGB 8x7")):
        assert f"{sample_run.image_name(i)} is {what} image, not RGB 8px: removed" in caplog.text
        assert not (folder / sample_run.image_name(i)).exists()
    assert not (tmp_path / "samples.npz").exists()
    for i in (1, 2, 3):  # sampled again
        sample_run.save_png_atomically(sample_run.image_path(str(folder), i), images[i])
    assert sample_run.finish(str(folder), str(tmp_path), num_images=4, resolution=8) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "samples.npz")["arr_0"], images)


def test_a_png_whose_chunk_pil_cannot_parse_is_sampled_again_not_a_traceback(tmp_path, caplog):
    """A damaged length of a PNG's pixel chunk makes PIL raise SyntaxError, not OSError: it is one
    more damaged image, removed and sampled again, not an error that stops the job after sampling."""
    from pixelflow_jax.sampling import sample_run

    images = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, image in enumerate(images):
        sample_run.save_png_atomically(sample_run.image_path(str(folder), i), image)
    damaged = folder / sample_run.image_name(1)
    png = bytearray(damaged.read_bytes())
    png[png.index(b"IDAT") - 1] ^= 0x55  # the low byte of the chunk's length
    damaged.write_bytes(bytes(png))
    with pytest.raises(SyntaxError):  # what PIL makes of it
        with Image.open(damaged) as image:
            image.load()
    with caplog.at_level("WARNING"):
        assert sample_run.finish(str(folder), str(tmp_path), num_images=2, resolution=8) == 1
    assert "000001.png does not decode (damaged?): removed, sampling it again" in caplog.text
    assert not damaged.exists() and not (tmp_path / "samples.npz").exists()


def test_a_sampling_job_builds_its_model_with_the_configs_dtypes_and_attention(converted):
    """param_dtype=bfloat16 is what the training error recommends for sampling: it was ignored.
    config.model's dtype and attention backend apply too (README), not the converted folder's."""
    import jax
    from flax import nnx

    from configs import c2i
    from pixelflow_jax.api import load_for_sampling

    config = c2i.get_config("tiny")
    config.sample.checkpoint = converted["c2i_tiny"]
    config.model.update(param_dtype="bfloat16", dtype="float16", attention="xla")  # the folder's: float32, auto
    model, _, _ = load_for_sampling(config, "")
    assert (model.config.param_dtype, model.config.dtype, model.config.attention) == ("bfloat16", "float16", "xla")
    assert {leaf.dtype.name for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))} == {"bfloat16"}


def test_a_config_without_model_param_dtype_samples_float32_weights():
    """A config file written before model.param_dtype existed (it is read with a float32 default):
    its jobs keep the weights' float32 and record that, not another dtype."""
    from configs import c2i
    from pixelflow_jax.api import sampling_runtime

    config = c2i.get_config("tiny")
    del config.model["param_dtype"]
    assert sampling_runtime(config)["param_dtype"] == "float32"


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGHUP"])
def test_sigterm_stops_sampling_as_ctrl_c_does_keeping_the_images(tmp_path, converted, stop):
    """A SIGTERM (a preemptible VM, `kill`) ended the job at once and silently (exit 143, no line),
    losing the batch that had just finished; it now stops as Ctrl-C does, saying what was kept. So
    does a SIGHUP (the ssh session it was started from closed), which ended it so too (exit -1)."""
    import signal
    import time

    from pixelflow_jax.command_line import EXIT_HUNG_UP, EXIT_TERMINATED, HUNG_UP

    workdir = tmp_path / "run"
    with stop_handlers_kept():  # the job hears a hang-up, also in a suite run under nohup (SIG_IGN inherited)
        process = subprocess.Popen([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}",
                                    "--mode=sample", f"--config.sample.checkpoint={converted['c2i_tiny']}",
                                    "--config.sample.num_images=100000", "--config.sample.batch_size=8",
                                    "--config.sample.steps_per_stage=(1,1,1,1)"],
                                   cwd=REPO, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and not (workdir / "samples" / "000001.png").exists() and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(getattr(signal, stop))
    stderr = process.communicate(timeout=120)[1]
    assert process.returncode == (EXIT_TERMINATED if stop == "SIGTERM" else EXIT_HUNG_UP), stderr
    cause = "terminated (SIGTERM)" if stop == "SIGTERM" else HUNG_UP
    assert f"stopped: {cause}; the images written are kept: rerun the same command to go on" in stderr
    assert "Traceback" not in stderr
    names = os.listdir(workdir / "samples")
    assert "000001.png" in names and all(n.endswith(".png") or n in ("settings.json", "sampling_runs.jsonl")
                                         for n in names)  # no leftovers


def test_a_second_identical_sampling_job_in_one_process_compiles_nothing(tmp_path, converted):
    """A notebook calls sample_run.run again with the same checkpoint and settings: every program
    (the stages, the noise, the uint8 images and their finite flags) is the first job's."""
    from configs import c2i
    from pixelflow_jax.sampling import sample_run
    from test_sampling import counting_lowerings

    def job(name):
        config = c2i.get_config("tiny")
        config.sample.update(checkpoint=converted["c2i_tiny"], num_images=8, batch_size=8, steps_per_stage=(3, 1, 1, 2))
        # (step counts of its own: the first job compiles, whatever other tests ran in this process)
        with counting_lowerings() as compiled:
            sample_run.run(config, str(tmp_path / name))
        return compiled

    assert job("first") and job("second") == []  # (the first sees compilations: the count works)
    np.testing.assert_array_equal(np.load(tmp_path / "first" / "samples.npz")["arr_0"],
                                  np.load(tmp_path / "second" / "samples.npz")["arr_0"])


def sample_in_process(workdir, checkpoint, monkeypatch, seen=None, **sample):
    """Runs the --mode=sample job in this process with its noise and stage programs replaced by
    stand-ins (nothing compiles but the final uint8 conversion), so that each image shows what it
    was drawn for: every pixel is (the id its noise was drawn for, 0, its label), in levels.
    Returns the random keys' data, and per batch the labels of its rows (padding included).
    seen: a list given gets, per batch, where its arrays were and the job's mesh when its stages ran."""
    from configs import c2i
    from pixelflow_jax.sampling import cascade, sample_run
    from pixelflow_jax.scheduler import stage_resolutions

    keys, batches = [], []

    def noise_of_ids(key, ids, resolution, num_stages, channels, gamma):
        keys.append(jax.random.key_data(key).tolist())
        if seen is not None:
            seen.append({"ids": ids.sharding})
        noise = [id_noise(np.asarray(ids), size, channels) for size in stage_resolutions(resolution, num_stages)]
        return noise[0], noise[1:]

    def stage_program(graphdef, renoise, alpha, beta, solver):
        def run(state, x, noise, cond, uncond, schedule, guidance):
            labels = np.asarray(cond["class_labels"])
            if not renoise:
                batches.append(labels.tolist())
                if seen is not None:
                    seen[-1].update(labels=cond["class_labels"].sharding, mesh=jax.sharding.get_abstract_mesh(),
                                    weights={leaf.sharding for leaf in jax.tree.leaves(state)})
                return x
            latents = np.array(noise)
            latents[..., 2] = level_latents(labels)[:, None, None]
            return latents
        return run

    monkeypatch.setattr(sample_run, "draw_noise_jit", noise_of_ids)
    monkeypatch.setattr(cascade, "_stage_program", stage_program)
    config = c2i.get_config("tiny")
    config.sample.update(checkpoint=checkpoint, steps_per_stage=1, **sample)
    sample_run.run(config, str(workdir))
    return keys, batches


def level_latents(levels):
    """The latents that cascade.to_uint8 turns into these uint8 levels."""
    return np.asarray(levels, np.float32) / 127.5 - 1


def id_noise(ids, size, channels):
    """Noise whose channel 0 is each row's image id (in levels), the others 0."""
    noise = np.full((len(ids), size, size, channels), level_latents(0))
    noise[..., 0] = level_latents(ids)[:, None, None]
    return noise


def drawn_for(ids, labels, resolution=64):
    """The images sample_in_process's stand-ins draw for these ids and labels."""
    pixels = np.stack([ids, np.zeros(len(ids)), labels], axis=-1).astype(np.uint8)
    return np.broadcast_to(pixels[:, None, None], (len(ids), resolution, resolution, 3))


def test_a_job_draws_each_image_for_its_seed_id_and_label_and_a_rerun_samples_only_those_missing(tmp_path, converted,
                                                                                                   monkeypatch):
    """The CLI test above compares a resumed job with its own first run, so a wrong seed, or noise
    drawn by batch row instead of image id, passed it: here each image must show the id its noise
    was drawn for and its label, after a first run, a resume and an extension."""
    workdir, labels, seed = tmp_path / "run", (5, 3, 9, 1, 7), [0, 7]  # seed: jax.random.key(7)'s data
    job = lambda **sample: sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, **sample)
    assert job(num_images=5, labels=labels, seed=7) == ([seed], [[5, 3, 9, 1, 7, 7, 7, 7]])  # padded to 8 devices
    np.testing.assert_array_equal(np.load(workdir / "samples.npz")["arr_0"], drawn_for(range(5), labels))
    for i in range(5):
        np.testing.assert_array_equal(np.asarray(Image.open(workdir / "samples" / f"{i:06d}.png")),
                                      drawn_for([i], labels[i:i + 1])[0])
    settings = json.loads((workdir / "samples" / "settings.json").read_text())
    assert {k: settings[k] for k in ("seed", "num_images", "labels", "weights", "cfg_scale", "solver", "shift",
                                     "steps_per_stage")} == dict(seed=7, num_images=5, labels=list(labels),
                                                                 weights=None, cfg_scale=2.4, solver="euler", shift=1.0,
                                                                 steps_per_stage=[1, 1, 1, 1])

    for i in (1, 3):  # an interrupted job: the rerun samples these two alone, each as the first run would
        os.remove(workdir / "samples" / f"{i:06d}.png")
    os.remove(workdir / "samples.npz")
    assert job(num_images=5, labels=labels, seed=7) == ([seed], [[3, 1] + [1] * 6])
    np.testing.assert_array_equal(np.load(workdir / "samples.npz")["arr_0"], drawn_for(range(5), labels))

    more = labels + (2, 4)  # extended: the two new images only
    assert job(num_images=7, labels=more, seed=7) == ([seed], [[2, 4] + [4] * 6])
    np.testing.assert_array_equal(np.load(workdir / "samples.npz")["arr_0"], drawn_for(range(7), more))

    for name, value in (("seed", 8), ("cfg_scale", 3.0)):  # would mix two jobs' images
        with pytest.raises(ValueError, match=rf"other settings \(differing: \['{name}'\]\)"):
            job(num_images=7, labels=more, **{"seed": 7, name: value})


def test_a_jobs_noise_is_drawn_from_its_seeds_threefry_key_whatever_jaxs_default_generator(tmp_path, converted,
                                                                                           monkeypatch):
    """JAX_DEFAULT_PRNG_IMPL=rbg in a user's environment: a key made by jax's default would be rbg's,
    and every image of the job another than its seed's (draw_noise_jit draws under jax's defaults
    pinned, but from the key it is given). The key is threefry's for the seed, as without it."""
    with jax.default_prng_impl("rbg"):
        keys, _ = sample_in_process(tmp_path / "run", converted["c2i_tiny"], monkeypatch, num_images=1, seed=7)
    assert keys == [[0, 7]]  # jax.random.key(7, impl="threefry2x32")'s data


def test_each_image_is_its_seed_and_ids_own_noise_whatever_its_batch_and_the_devices_it_was_split_over(
        tmp_path, converted, monkeypatch):
    """README: an image depends only on the seed, its id and its label, not on the batch size, the
    device count or what else was in its batch. Stages that give back the last stage's block noise
    make each PNG that noise: it must be what draw_noise_jit draws for the image's id alone on one
    device (the scheduler's gamma, key(seed)), after a first job, a resume of two images and an
    extension, each image in another batch over the 8 devices."""
    import jax.numpy as jnp

    from configs import c2i
    from pixelflow_jax.sampling import cascade, sample_run
    from pixelflow_jax.scheduler import DEFAULT_GAMMA

    def stage_program(graphdef, renoise, alpha, beta, solver):
        return lambda state, x, noise, *rest: noise if renoise else x

    monkeypatch.setattr(cascade, "_stage_program", stage_program)
    workdir = tmp_path / "run"

    def job(num_images, batch_size):
        config = c2i.get_config("tiny")
        config.sample.update(checkpoint=converted["c2i_tiny"], steps_per_stage=1, seed=5, num_images=num_images,
                             batch_size=batch_size)
        sample_run.run(config, str(workdir))

    def alone(image_id):
        _, blocks = cascade.draw_noise_jit(jax.random.key(5), jnp.array([image_id]), 64, 4, 3, DEFAULT_GAMMA)
        return np.asarray(cascade.to_uint8(blocks[-1]))[0]

    job(6, 8)
    for i in (1, 4):
        os.remove(workdir / "samples" / f"{i:06d}.png")
    job(6, 16)
    job(20, 8)  # 14 more, in two batches
    images = np.load(workdir / "samples.npz")["arr_0"]
    for i in range(20):
        np.testing.assert_array_equal(images[i], alone(i), err_msg=f"image {i}")


def test_a_stop_while_a_batchs_pngs_are_written_ends_the_job_without_writing_that_batch_again(tmp_path, converted,
                                                                                               monkeypatch):
    """A batch's PNGs are written while the next batch computes. A Ctrl-C (or a failed write) among
    them ended the job only after the way out wrote that batch again, each PNG a second time (a
    bucket's uploads; the progress counting them twice)."""
    from pixelflow_jax.sampling import sample_run

    written = []

    def write_then_stop(folder, images, finite, ids, num_valid):
        written.append(ids[:num_valid].tolist())
        raise KeyboardInterrupt

    monkeypatch.setattr(sample_run, "write_local_images", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        sample_in_process(tmp_path / "run", converted["c2i_tiny"], monkeypatch, num_images=16, batch_size=8)
    assert written == [list(range(8))]


def test_a_jobs_batches_are_split_over_every_device_and_its_weights_and_finite_flags_held_by_each(tmp_path, converted,
                                                                                                 monkeypatch, caplog):
    """What the images alone do not show: each batch's ids and labels split over the 8 devices, the
    weights and the finite flags whole on each (a weight on one device is a cross-host transfer in
    a job of several processes, and every process reads every flag to stop alike), the stages run
    under the job's mesh (the Pallas kernels split batch and heads over it); the progress counts
    the images on disk and no padding row."""
    from pixelflow_jax.sampling import sample_run
    from pixelflow_jax.sharding import batch_sharding, make_mesh

    write, flags = sample_run.write_local_images, []
    monkeypatch.setattr(sample_run, "write_local_images",
                        lambda folder, images, finite, *rest: flags.append(finite.sharding) or write(folder, images,
                                                                                                    finite, *rest))
    workdir, seen, mesh = tmp_path / "run", [], make_mesh()
    job = lambda: sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, seen, num_images=5, batch_size=8)
    job()
    os.remove(workdir / "samples" / "000003.png")
    with caplog.at_level("INFO"):
        job()  # one image of 5, padded to 8 rows
    assert "sampling: 5/5 img (100%)" in caplog.text
    with caplog.at_level("INFO"):
        job()  # nothing to sample
    assert "all 5 images of this job are on disk" in caplog.text
    assert len(seen) == len(flags) == 2
    for batch, finite in zip(seen, flags):
        assert batch["mesh"] == mesh.abstract_mesh
        for split in (batch["ids"], batch["labels"]):
            assert split.is_equivalent_to(batch_sharding(mesh), 1)
        for whole in (*batch["weights"], finite):
            assert whole.is_fully_replicated and whole.device_set == set(jax.devices())


def test_a_batch_the_devices_do_not_divide_or_steps_for_other_stages_are_refused_before_the_weights_are_read(
        tmp_path, converted, monkeypatch):
    """The batch size before the checkpoint is looked at (naming one the devices divide), the steps
    as soon as its stage count is known, in the flag's words (the options' own check named neither)."""
    from conftest import c2i_config
    from pixelflow_jax.sampling import sample_run

    monkeypatch.setattr(sample_run, "read_sampling_model", lambda *args: pytest.fail("the weights were read"))
    for batch_size, advice in ((6, 8), (3, 8), (20, 16)):  # the largest multiple of 8 below it, at least 8
        config = c2i_config(**{"sample.checkpoint": str(tmp_path / "nowhere"), "sample.batch_size": batch_size})
        with pytest.raises(ValueError, match=rf"^sample.batch_size {batch_size} must be divisible by the number of "
                                             rf"devices \(8\); try {advice}$"):
            sample_run.run(config, str(tmp_path / "run"))
    config = c2i_config(**{"sample.checkpoint": converted["c2i_tiny"], "sample.steps_per_stage": (1, 2, 3)})
    with pytest.raises(ValueError, match=rf"^--config.sample.steps_per_stage gives 3 values; {converted['c2i_tiny']} "
                                         r"has 4 stages \(or give one number for all\)$"):
        sample_run.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_rerun_clears_the_half_written_files_of_a_killed_job_and_pads_what_is_left_to_the_devices_alone(
        tmp_path, converted, monkeypatch):
    """Not to sample.batch_size: 1 image in a batch of 64 rows would draw 63 padding rows."""
    workdir = tmp_path / "run"
    job = lambda: sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, num_images=2, batch_size=64)[1]
    assert job() == [[0, 1] + [1] * 6]  # the default labels, padded to 8 devices
    os.remove(workdir / "samples" / "000001.png")  # killed while writing it: its temporary files left
    for leftover in ("000001.png.tmp", ".000001.png.tmp-999999999-x"):
        (workdir / "samples" / leftover).write_bytes(b"\x89PNG partial")
    assert job() == [[1] * 8]
    assert sorted(os.listdir(workdir / "samples")) == ["000000.png", "000001.png", "sampling_runs.jsonl",
                                                       "settings.json"]


def test_a_resumed_job_samples_in_the_batch_shape_of_the_uninterrupted_job(tmp_path, converted, monkeypatch):
    """In bfloat16 (the XL config's) a batch of another shape rounds the model's matmuls otherwise: the
    3 images a killed job had left came out of a batch of 8 rows, a few levels from those of the job's
    batch of 16, with programs compiled for that shape (minutes at XL). A rerun that extends the job
    takes the larger job's shape."""
    workdir = tmp_path / "run"
    job = lambda count: [len(rows) for rows in sample_in_process(workdir, converted["c2i_tiny"], monkeypatch,
                                                                 num_images=count, batch_size=16)[1]]
    assert job(32) == [16, 16]
    for i in (3, 17, 30):
        os.remove(workdir / "samples" / f"{i:06d}.png")
    os.remove(workdir / "samples.npz")
    assert job(32) == [16]
    assert job(50) == [16, 16]  # 50 at 16: 4 batches of 13, rounded up to the 8 devices


def test_a_rerun_that_writes_samples_npz_again_unchanged_keeps_its_time_and_so_its_cached_features(
        tmp_path, converted, monkeypatch):
    """A finished job run again (its evaluation stopped, a sampling command with the eval flags run
    again to finish it) writes samples.npz again from its PNGs: the same bytes at a new time, which
    the feature cache's key holds, so the samples' whole Inception pass ran again."""
    workdir = tmp_path / "run"
    job = lambda: sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, num_images=8, batch_size=8)
    job()
    npz = workdir / "samples.npz"
    os.utime(npz, ns=(0, 10**18))  # a time no rewrite would give
    job()
    assert os.stat(npz).st_mtime_ns == 10**18
    Image.new("RGB", (64, 64), (9, 9, 9)).save(workdir / "samples" / "000003.png")  # another image: another file
    job()
    assert os.stat(npz).st_mtime_ns != 10**18 and (np.load(npz)["arr_0"][3] == 9).all()


def test_a_second_sampling_job_on_a_workdir_in_use_is_refused_before_it_writes_anything(tmp_path, converted,
                                                                                       monkeypatch):
    """Two jobs on one workdir at once (a SLURM array's tasks given one --workdir) each sampled every
    image, rewriting each other's PNGs and samples.npz: the second is refused in one line naming the
    first and --distributed, and writes nothing; once the first is done, a job takes the workdir."""
    from pixelflow_jax.training.workdir_lock import WorkdirLock

    workdir = tmp_path / "run"
    first = WorkdirLock(str(workdir), 120, "sample.lock", "sampling job")
    first.acquire()  # held by a live process of this host (this one)
    try:
        with pytest.raises(ValueError, match=rf"^{re.escape(str(workdir))} is in use by another sampling job: host "
                                             rf".+, pid {os.getpid()}, .+ run it once over all of them with "
                                             r"--distributed"):
            sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, num_images=2, labels=(1, 2))
        assert os.listdir(workdir) == ["sample.lock"]
    finally:
        first.release()
    sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, num_images=2, labels=(1, 2))
    assert "sample.lock" not in os.listdir(workdir) and pngs(workdir) == ["000000.png", "000001.png"]

def test_the_sampling_lock_beats_every_12_s_and_a_stop_the_moment_it_is_taken_still_releases_it(tmp_path,
                                                                                               monkeypatch):
    """WORKDIR/sample.lock is taken over from another host once 120 s silent, so its heartbeat is
    refreshed every 12 s (README); it is taken inside the job's `try`: a SIGTERM raised the moment
    after the lock was created, before acquire returned, left it behind, and a requeued job on another
    host was refused for 120 s."""
    from pixelflow_jax.command_line import Terminated
    from pixelflow_jax.sampling import sample_run
    from pixelflow_jax.training.workdir_lock import WorkdirLock

    with sample_run.one_sampling_job(str(tmp_path)):
        record = json.loads((tmp_path / "sample.lock").read_text())
    assert record["heartbeat_period_s"] == 12.0 and not (tmp_path / "sample.lock").exists()
    acquire = WorkdirLock.acquire

    def stopped_once_created(lock):
        acquire(lock)
        raise Terminated

    monkeypatch.setattr(WorkdirLock, "acquire", stopped_once_created)
    with pytest.raises(Terminated):
        with sample_run.one_sampling_job(str(tmp_path)):
            pass
    assert os.listdir(tmp_path) == []


def test_an_image_lost_after_every_pass_stops_the_job_after_three_passes(tmp_path, converted, monkeypatch, caplog):
    """An image gone when samples.npz is written is sampled again, twice at most: a store that keeps
    losing it stops the job with one error, not a loop for ever."""
    from pixelflow_jax import storage
    from pixelflow_jax.sampling import sample_run

    finish = sample_run.finish

    def losing_image_1(folder, *args):
        os.remove(os.path.join(folder, "000001.png"))
        return finish(folder, *args)

    monkeypatch.setattr(sample_run, "finish", losing_image_1)
    with caplog.at_level("INFO"), pytest.raises(storage.StorageError, match="missing or unreadable after 3 passes"):
        sample_in_process(tmp_path / "run", converted["c2i_tiny"], monkeypatch, num_images=2)
    assert caplog.text.count("1 of 2 images to sample (1 already on disk)") == 2


def test_a_job_records_each_setting_its_images_depend_on_from_the_checkpoint_and_the_config(tmp_path, converted,
                                                                                             monkeypatch):
    """settings.json is what a rerun is compared with: a field left out or read from the wrong place
    would let a job of other weights, dtypes, size or steps add its images to these."""
    from configs import c2i
    from pixelflow_jax.api import resolve_checkpoint

    def in_bfloat16(*args):
        config = get_config(*args)
        config.model.dtype = "bfloat16"  # with float32 weights: the two dtypes told apart
        return config

    get_config = c2i.get_config
    monkeypatch.setattr(c2i, "get_config", in_bfloat16)
    sample_in_process(tmp_path / "run", converted["c2i_tiny"], monkeypatch, num_images=2, labels=(3, 4), seed=7)
    source = resolve_checkpoint(converted["c2i_tiny"])
    architecture = dict(num_attention_heads=2, attention_head_dim=16, depth=2, patch_size=4, in_channels=3,
                        out_channels=3, num_classes=1000, attention_bias=True, cross_attention_dim=0)
    assert json.loads((tmp_path / "run" / "samples" / "settings.json").read_text()) == dict(
        checkpoint=converted["c2i_tiny"], weights=None, architecture=architecture, dtype="bfloat16",
        param_dtype="float32", resolution=64, num_stages=4, steps_per_stage=[1, 1, 1, 1], cfg_scale=2.4, shift=1.0,
        solver="euler", seed=7, num_images=2, checkpoint_fingerprint=source.fingerprint(), labels=[3, 4])


def test_a_converted_folders_job_records_no_choice_of_weights_and_takes_an_earlier_ema_record_as_its_own(
        tmp_path, converted, monkeypatch, caplog):
    """settings.json said weights 'ema' for a converted folder, which holds the one set it was
    written from (an export of a run's raw weights too): no choice of weights was made. A job that
    recorded 'ema' then is the same job: its rerun samples what is missing. The log names the
    folder alone, as the record does."""
    workdir = tmp_path / "run"
    job = lambda: sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, num_images=2, labels=(1, 2), seed=7)
    with caplog.at_level("INFO"):
        job()
    assert f"sampling {converted['c2i_tiny']}: 2 of 2 images to sample" in caplog.text
    assert "weights of" not in caplog.text
    path = workdir / "samples" / "settings.json"
    settings = json.loads(path.read_text())
    assert "weights" in settings and settings["weights"] is None
    path.write_text(json.dumps({**settings, "weights": "ema"}))  # as earlier versions recorded it
    os.remove(workdir / "samples" / "000001.png")
    os.remove(workdir / "samples.npz")
    assert job()[1] == [[2] * 8]  # the missing image alone, padded to 8 devices
    assert (workdir / "samples" / "000001.png").exists()


def test_only_an_earlier_ema_record_of_a_folder_of_one_set_of_weights_is_taken_as_no_choice():
    """The rule for records of before weights null is narrow: a run's job recorded for 'ema' and
    rerun for 'model', or a train.py checkpoint's recorded for 'model' and rerun for the default
    'ema' (null: no choice in such a file), reads other weights and is another job."""
    from pixelflow_jax.sampling.job_settings import changed_settings

    assert changed_settings({"weights": "ema"}, {"weights": None}) == []
    assert changed_settings({"weights": "ema"}, {"weights": "model"}) == ["weights"]
    assert changed_settings({"weights": "model"}, {"weights": None}) == ["weights"]
    assert changed_settings({"weights": "ema"}, {}) == ["weights"]  # only a recorded null is no choice


def test_an_earlier_jobs_settings_are_checked_before_the_weights_are_read_and_recorded_after(tmp_path, converted,
                                                                                           monkeypatch):
    """A rerun with another seed waited for the restore (minutes at XL) before its refusal; a job whose
    weights fail to load records nothing, so a corrected rerun is not refused as another job."""
    from pixelflow_jax.sampling import sample_run

    workdir = tmp_path / "run"
    job = lambda folder, **sample: sample_in_process(folder, converted["c2i_tiny"], monkeypatch, **sample)
    job(workdir, num_images=2, labels=(1, 2), seed=7)

    class Restored(Exception):
        pass

    def restore(config, source):
        raise Restored

    monkeypatch.setattr(sample_run, "read_sampling_model", restore)
    with pytest.raises(ValueError, match=r"other settings \(differing: \['seed'\]\)"):
        job(workdir, num_images=2, labels=(1, 2), seed=8)
    settings = (workdir / "samples" / "settings.json").read_text()
    with pytest.raises(Restored):  # an extension whose weights fail to load is not recorded
        job(workdir, num_images=3, labels=(1, 2, 3), seed=7)
    assert (workdir / "samples" / "settings.json").read_text() == settings
    with pytest.raises(Restored):
        job(tmp_path / "new", num_images=2, labels=(1, 2), seed=7)
    assert not (tmp_path / "new").exists()


def test_a_folder_runs_labels_cycle_over_its_class_folders_which_labels_may_name(caplog):
    """A fine-tune of a 1000-class model on two class folders trained ids 0 and 1 alone: its
    default labels cycle over those, and its class_index.json names them for sample.labels."""
    from configs import c2i
    from pixelflow_jax.sampling.sample_conditioning import ClassLabels, TrainedClasses
    from pixelflow_jax.validation import ConfigError, check

    folders, sample = TrainedClasses.of_folders(["cats", "dogs"]), c2i.get_config("tiny").sample
    sample.num_images = 5
    assert ClassLabels(sample, 1000, folders).labels.tolist() == [0, 1, 0, 1, 0]
    assert ClassLabels(sample, 1000).labels.tolist() == [0, 1, 2, 3, 4]  # no class folders: every class
    config = c2i.get_config("tiny")
    config.sample.labels = sample.labels = ("dogs", 1, "cats", 0, "dogs")  # names and ids mixed
    check(config, "sample")  # main.py's check before the job: names are for the job to resolve
    with caplog.at_level("WARNING"):
        assert ClassLabels(sample, 1000, folders).labels.tolist() == [1, 1, 0, 0, 1]
    assert not caplog.text
    sample.labels = ("cats", "birds", 0, 1, 0)
    with pytest.raises(ConfigError, match=r"names 'birds', not a class folder of this run; its class_index.json "
                                          r"names 'cats', 'dogs'$"):
        ClassLabels(sample, 1000, folders)
    many = [f"class{i:02d}" for i in range(25)]
    with pytest.raises(ConfigError, match=r"names 'class00', .*, 'class19', \.\.\. \(25 in all\)$"):
        ClassLabels(sample, 1000, TrainedClasses.of_folders(many))
    with pytest.raises(ConfigError, match=r"names 'class00', .*, 'class19'$"):  # twenty: each named, no '...'
        ClassLabels(sample, 1000, TrainedClasses.of_folders(many[:20]))
    for unquoted in ("cats,dogs", "(cats)", "(cats,dogs)"):  # unquoted names on the command line: one string
        sample.labels = (unquoted, 0, 1, 0, 1)
        with pytest.raises(ConfigError, match=r"""quote each name: --config.sample.labels='\("cats","dogs"\)'"""):
            ClassLabels(sample, 1000, folders)
    with pytest.raises(ConfigError, match=r"names the class '\(cats,dogs\)', but this checkpoint has no "
                                          r"class_index.json .*: give class ids"):
        ClassLabels(sample, 1000)

    sample.labels = (1, 7, 999, 7, 0)  # ids the run never trained: what the weights it started from knew
    with caplog.at_level("WARNING"):
        assert ClassLabels(sample, 1000, folders).labels.tolist() == [1, 7, 999, 7, 0]
    assert caplog.text.count("WARNING") == 1
    assert "asks for ids (7, 999) that this run never trained: it trained 2 class folders, ids 0 to 1 (its " \
           "class_index.json" in caplog.text
    for labels, named in (((2, 3, 4, 5, 6), "(2, 3, 4, 5, 6)"), ((2, 3, 4, 5, 6, 7), "(2, 3, 4, 5, 6, ... (6 ids))")):
        caplog.clear()
        sample.update(num_images=len(labels), labels=labels)  # from id 2, the class count: each never trained
        with caplog.at_level("WARNING"):
            ClassLabels(sample, 1000, folders)
        assert f"asks for ids {named} that this run never trained" in caplog.text


def test_a_number_that_names_another_class_folder_is_sampled_as_an_id_with_a_warning(caplog):
    """Folders '0' to '10' sort as text: the number 2 is id 2, the folder '10'. It is sampled as
    documented (numbers are ids), but a user who meant the folder '2' is told to quote it."""
    from configs import c2i
    from pixelflow_jax.sampling.sample_conditioning import ClassLabels, TrainedClasses
    from pixelflow_jax.validation import ConfigError

    folders, sample = TrainedClasses.of_folders(sorted(str(i) for i in range(11))), c2i.get_config("tiny").sample
    assert folders.folders[:4] == ("0", "1", "10", "2")
    sample.update(num_images=3, labels=(2, "2", 1))
    with caplog.at_level("WARNING"):
        assert ClassLabels(sample, 1000, folders).labels.tolist() == [2, 3, 1]
    assert caplog.text.count("WARNING") == 1
    assert ("gives numbers that are names of other class folders of this run (id 2 is the folder '10', the folder '2' "
            "is id 3): a number is an id") in caplog.text
    assert """quote it: --config.sample.labels='("2",)'""" in caplog.text
    caplog.clear()
    sample.labels = (0, 1, 12)  # numbers that are their own folders' ids, or no folder's name
    with caplog.at_level("WARNING"):
        ClassLabels(sample, 1000, folders)
    assert "names of other class folders" not in caplog.text
    three = ("id 2 is the folder '10', the folder '2' is id 3; id 3 is the folder '2', the folder '3' is id 4; id 4 is "
             "the folder '3', the folder '4' is id 5")
    for labels, named in (((2, 3, 4), f"({three}): a number"), ((2, 3, 4, 5), f"({three}; ...): a number")):
        caplog.clear()
        sample.update(num_images=len(labels), labels=labels)  # three such numbers are named, a fourth is not
        with caplog.at_level("WARNING"):
            ClassLabels(sample, 1000, folders)
        assert named in caplog.text
    caplog.clear()
    sample.update(num_images=1, labels=(-1,))  # a folder named '-1': the number -1 is no folder's id
    with caplog.at_level("WARNING"), pytest.raises(ConfigError, match="labels"):
        ClassLabels(sample, 1000, TrainedClasses.of_folders(["-1", "0", "1"]))
    assert "(id -1 is no folder, the folder '-1' is id 0)" in caplog.text


def test_a_class_folder_name_is_found_whichever_way_its_accents_are_encoded():
    """A folder copied from macOS spells é as e + a combining accent (NFD); typed on the command
    line it is one character (NFC): the error said 'names 'chats é', not a class folder', then
    listed 'chats é'. Two folders that differ only so are each found by their exact name alone."""
    from configs import c2i
    from pixelflow_jax.sampling.sample_conditioning import ClassLabels, TrainedClasses
    from pixelflow_jax.validation import ConfigError

    sample = c2i.get_config("tiny").sample
    sample.update(num_images=2, labels=("chats \u00e9", "dogs"))
    assert ClassLabels(sample, 10, TrainedClasses.of_folders(["chats e\u0301", "dogs"])).labels.tolist() == [0, 1]
    sample.labels = ("chats e\u0301", "dogs")  # typed as e + accent, the folder spelled with é
    assert ClassLabels(sample, 10, TrainedClasses.of_folders(["chats \u00e9", "dogs"])).labels.tolist() == [0, 1]
    both = TrainedClasses.of_folders(["caf\u00e9", "cafe\u0301"])
    sample.labels = ("cafe\u0301", "caf\u00e9")
    assert ClassLabels(sample, 10, both).labels.tolist() == [1, 0]
    # e with a dot below and a circumflex, its two marks in either order: both folders' NFC form is U+1EC7,
    # which names neither of them
    marks = TrainedClasses.of_folders(["e\u0323\u0302", "e\u0302\u0323"])
    sample.labels = ("e\u0302\u0323", "e\u0323\u0302")
    assert ClassLabels(sample, 10, marks).labels.tolist() == [1, 0]
    sample.labels = ("\u1ec7", "e\u0323\u0302")
    with pytest.raises(ConfigError, match="names '\u1ec7', not a class folder of this run"):
        ClassLabels(sample, 10, marks)


def test_a_job_of_every_class_is_not_resumed_with_the_default_labels_of_a_runs_class_folders(tmp_path):
    """A job that an earlier version sampled with labels i mod num_classes, from a run trained on
    10 class folders: this version's default labels, i mod 10, would mix two jobs' images."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    settings = lambda labels: {"architecture": {"num_classes": 1000}, "num_images": len(labels), "labels": labels}
    (samples / "settings.json").write_text(json.dumps(settings(list(range(30)))))
    (samples / "000000.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds images labelled i mod 1000 \(every class of the model: the default "
                                         r"labels before .* class_index.json\) and this job labels them i mod 10: "
                                         r"sample into a new --workdir"):
        check_settings(str(samples), str(tmp_path), settings([i % 10 for i in range(30)]))
    with pytest.raises(ValueError, match=r"other settings \(differing: \['labels'\]\); use a new --workdir"):
        check_settings(str(samples), str(tmp_path), settings([3] * 30))  # labels given: no default involved
    # 40 images of every class with another seed: labels 0 to 39 look like i mod 40, but no image is relabelled
    with pytest.raises(ValueError, match=r"other settings \(differing: \['labels', 'num_images', 'seed'\]\); use"):
        check_settings(str(samples), str(tmp_path), {**settings(list(range(40))), "seed": 1})
    check_settings(str(samples), str(tmp_path), settings(list(range(40))))  # a larger job of every class extends
    (samples / "settings.json").write_text(json.dumps(settings([3] * 30)))  # labels the user gave, then the default
    with pytest.raises(ValueError, match=r"other settings \(differing: \['labels'\]\); use a new --workdir"):
        check_settings(str(samples), str(tmp_path), settings([i % 10 for i in range(30)]))
    # two images, labels 0 and 1: as much i mod 1000 as i mod 2, but only the seed changed
    (samples / "settings.json").write_text(json.dumps({**settings([0, 1]), "seed": 0}))
    with pytest.raises(ValueError, match=r"other settings \(differing: \['seed'\]\); use a new --workdir"):
        check_settings(str(samples), str(tmp_path), {**settings([0, 1]), "seed": 1})


def test_an_extension_typed_by_mistake_is_taken_back_while_none_of_its_images_was_written(tmp_path, converted,
                                                                                         monkeypatch):
    """50 typed for 5: the extension records 50 once the weights load, and a rerun asking for 5 again
    was refused as a shrink whatever the extension had written. It is accepted while no image past
    5 exists; once the extension has written a batch, it is refused, naming those images."""
    from pixelflow_jax.sampling import sample_run

    workdir = tmp_path / "run"
    job = lambda num_images: sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, num_images=num_images,
                                               batch_size=8)
    recorded = lambda: json.loads((workdir / "samples" / "settings.json").read_text())["num_images"]

    class Stopped(Exception):
        pass

    def stop_at_batch(n):
        """Stops the job as its batch n is about to start, as a Ctrl-C would: the batches before it are written."""
        started = []

        def stop_if_preempted(passes):
            if len(started) == n:
                raise Stopped
            started.append(n)
        monkeypatch.setattr(sample_run, "stop_if_preempted", stop_if_preempted)

    job(5)
    stop_at_batch(0)
    with pytest.raises(Stopped):
        job(50)
    assert recorded() == 50 and pngs(workdir) == [f"{i:06d}.png" for i in range(5)]
    monkeypatch.setattr(sample_run, "stop_if_preempted", lambda passes: None)
    assert job(5) == ([], [])  # every image on disk: nothing sampled
    assert recorded() == 5 and np.load(workdir / "samples.npz")["arr_0"].shape[0] == 5

    stop_at_batch(1)
    with pytest.raises(Stopped):
        job(50)
    assert pngs(workdir) == [f"{i:06d}.png" for i in range(13)]  # its first batch: images 5 to 12
    monkeypatch.setattr(sample_run, "stop_if_preempted", lambda passes: None)
    with pytest.raises(ValueError, match=r"holds 8 images numbered 5 or above \(000005.png to 000012.png\): .* "
                                         r"delete those 8 PNGs, then rerun; "
                                         r"to keep them, rerun asking for at least 13"):
        job(5)
    assert recorded() == 50
    job(13)
    assert recorded() == 13 and np.load(workdir / "samples.npz")["arr_0"].shape[0] == 13


def test_a_disk_that_fills_up_stops_the_job_with_one_error_and_a_rerun_keeps_the_images_written(tmp_path, converted,
                                                                                                monkeypatch):
    """A full disk mid-job was an OSError traceback out of the PNG writer (and after the last image,
    out of the .npz writer): now one error naming the file, its cause and the fix, and the rerun on
    a disk with room goes on from the images already there."""
    import errno

    from pixelflow_jax import storage
    from pixelflow_jax.storage import writes

    workdir, write_local = tmp_path / "run", writes.write_local_atomically
    job = lambda: sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, num_images=12, batch_size=8)

    def disk_full_for(full):
        def write(path, *args, **kwargs):
            if full(os.path.basename(path)):
                raise OSError(errno.ENOSPC, "No space left on device")
            return write_local(path, *args, **kwargs)
        return write

    with monkeypatch.context() as disk:  # room for the first batch's eight images
        disk.setattr(writes, "write_local_atomically",
                     disk_full_for(lambda name: name[:6].isdigit() and int(name[:6]) >= 8))
        with pytest.raises(storage.StorageError, match=rf"^cannot write {workdir}/samples/000008.png \(OSError: "
                                                       r"\[Errno 28\] No space left on device\); free space, and rerun "
                                                       "the same command: the images already written are kept"):
            job()
    assert pngs(workdir) == [f"{i:06d}.png" for i in range(8)]
    with monkeypatch.context() as disk:  # room for every image, none for the .npz
        disk.setattr(writes, "write_local_atomically", disk_full_for(lambda name: name == "samples.npz"))
        with pytest.raises(storage.StorageError, match=rf"^cannot write {workdir}/samples.npz \(OSError: "):
            job()
    assert len(pngs(workdir)) == 12 and not (workdir / "samples.npz").exists()
    with monkeypatch.context() as disk:  # room for the .npz, none for the grid written after it
        disk.setattr(writes, "write_local_atomically", disk_full_for(lambda name: name == "grid.png"))
        with pytest.raises(storage.StorageError, match=rf"^cannot write {workdir}/grid.png \(OSError: \[Errno 28\] "
                                                       r"No space left on device\); free space, and .* the images already "
                                                       "written are kept"):
            job()
    assert len(pngs(workdir)) == 12 and not (workdir / "grid.png").exists()
    assert job()[1] == []  # nothing left to sample: the .npz and the grid from the images on disk
    assert (workdir / "grid.png").exists()
    labels = json.loads((workdir / "samples" / "settings.json").read_text())["labels"]
    np.testing.assert_array_equal(np.load(workdir / "samples.npz")["arr_0"], drawn_for(range(12), labels))


def test_settings_that_cannot_be_recorded_stop_the_job_with_one_error_on_every_process(tmp_path, converted,
                                                                                      monkeypatch):
    """samples/ on a read-only or full disk: settings.json failed with an OSError traceback on
    process 0 alone, outside the refusals that check_settings shares, so the other processes
    waited for it in the next collective. Now a StorageError naming the file, shared."""
    import errno

    from pixelflow_jax import storage
    from pixelflow_jax.storage import writes

    write_local = writes.write_local_atomically

    def read_only(path, *args, **kwargs):
        if os.path.basename(path) == "settings.json":
            raise OSError(errno.EROFS, "Read-only file system")
        return write_local(path, *args, **kwargs)

    monkeypatch.setattr(writes, "write_local_atomically", read_only)
    workdir = tmp_path / "run"
    with pytest.raises(storage.StorageError, match=rf"^cannot write {workdir}/samples/settings.json \(OSError: "
                                                   r"\[Errno 30\] Read-only file system\); make the workdir writable, "
                                                   "and rerun the same command: the images already written"):
        sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, num_images=2)
    assert not workdir.exists()  # the job that recorded nothing left nothing, not an empty samples/ either


def test_settings_stopped_by_the_file_size_limit_are_told_to_raise_it(tmp_path):
    """A sampling job whose settings.json a file size limit (`ulimit -f`) stopped was told to "free space
    or make the workdir writable", which would not have helped."""
    from conftest import error_under_a_file_size_limit

    folder, settings = tmp_path / "samples", {"num_images": 500, "labels": list(range(500))}
    said = error_under_a_file_size_limit("from pixelflow_jax.sampling.job_settings import check_settings\n"
                                         f"check_settings({str(folder)!r}, {str(tmp_path)!r}, {settings!r})", 1000)
    assert said.endswith(f"cannot write {folder}/settings.json (OSError: [Errno 27] File too large); raise the file "
                         "size limit in the job's shell, `ulimit -f unlimited` (up to what `ulimit -Hf` allows), or "
                         "ask the machine's administrators, and rerun the same command: the images already written "
                         "are kept and the job goes on from them"), said
    assert not (folder / "settings.json").exists()


def test_a_job_of_a_run_that_trained_on_is_told_how_to_finish_while_its_step_is_still_there(tmp_path, monkeypatch):
    """A job sampled a run's latest step, was stopped, and the run trained on: its rerun, reading the
    run's new latest step, was told only to start anew in another workdir, though naming the step
    it recorded finishes it. That step is named while it holds the same files, not once it is gone."""
    from pixelflow_jax import api
    from pixelflow_jax.api import resolve_checkpoint
    from pixelflow_jax.sampling.job_settings import check_settings

    run = tmp_path / "run"
    (run / "run_config.json").parent.mkdir()
    (run / "run_config.json").write_text("{}")
    for step in (300, 400):  # the step the job sampled, and the one the run saved since
        (run / "checkpoints" / str(step)).mkdir(parents=True)
        (run / "checkpoints" / str(step) / "weights").write_text(f"weights of step {step}")
    sampled, latest = run / "checkpoints" / "300", run / "checkpoints" / "400"
    of = lambda step: {"checkpoint": str(step), "checkpoint_fingerprint": resolve_checkpoint(str(step)).fingerprint()}
    samples = tmp_path / "job" / "samples"
    samples.mkdir(parents=True)
    check_settings(str(samples), str(samples.parent), of(sampled))
    (samples / "000000.png").write_bytes(b"")
    assert resolve_checkpoint(str(run)).label == str(latest)

    with pytest.raises(ValueError, match=rf"sample these into a new --workdir with "
                                         rf"--config.sample.checkpoint={latest}; "
                                         rf"to finish or extend the job of {samples}, rerun with "
                                         rf"--config.sample.checkpoint={sampled}, which still holds the weights"):
        check_settings(str(samples), str(samples.parent), of(latest))
    check_settings(str(samples), str(samples.parent), of(sampled))  # as the message says: the job goes on
    sampled_files = of(sampled)
    shutil.rmtree(sampled)  # rotated away (train.keep_checkpoints): nothing to finish the job with
    with pytest.raises(ValueError, match=rf"--config.sample.checkpoint={latest}$"):
        check_settings(str(samples), str(samples.parent), of(latest))
    (sampled / "weights").parent.mkdir()
    (sampled / "weights").write_text("other weights saved again as step 300")
    assert of(sampled) != sampled_files
    with pytest.raises(ValueError, match=rf"--config.sample.checkpoint={latest}$"):
        check_settings(str(samples), str(samples.parent), of(latest))
    # a job that sampled a Hub checkpoint: its commit is not looked up (that could mean a download)
    hub_samples = tmp_path / "hub_job" / "samples"
    hub_samples.mkdir(parents=True)
    check_settings(str(hub_samples), str(hub_samples.parent), {"checkpoint": "hf://org/model@" + "a" * 40,
                                                               "checkpoint_fingerprint": "of the Hub's files"})
    (hub_samples / "000000.png").write_bytes(b"")

    def looked_up(path):
        raise AssertionError(f"{path} looked up")

    monkeypatch.setattr(api, "resolve_checkpoint", looked_up)
    with pytest.raises(ValueError, match=rf"--config.sample.checkpoint={latest}$"):
        check_settings(str(hub_samples), str(hub_samples.parent), {"checkpoint": str(latest),
                                                                   "checkpoint_fingerprint": "of step 400"})


def test_a_job_whose_step_was_deleted_is_told_so_not_that_the_run_trained_on(tmp_path):
    """A job sampled a run's latest step, which was then deleted: its rerun, reading the run's
    earlier step, was told its images came from "a run that trained on since"."""
    from pixelflow_jax.api import resolve_checkpoint
    from pixelflow_jax.sampling.job_settings import check_settings

    run = tmp_path / "run"
    run.mkdir()
    (run / "run_config.json").write_text("{}")
    for step in (300, 400):
        (run / "checkpoints" / str(step)).mkdir(parents=True)
        (run / "checkpoints" / str(step) / "weights").write_text(f"weights of step {step}")
    of = lambda step: {"checkpoint": str(step), "checkpoint_fingerprint": resolve_checkpoint(str(step)).fingerprint()}
    earlier, latest = run / "checkpoints" / "300", run / "checkpoints" / "400"
    trained_on, deleted = tmp_path / "trained_on" / "samples", tmp_path / "deleted" / "samples"
    for samples, sampled in ((trained_on, earlier), (deleted, latest)):
        samples.mkdir(parents=True)
        check_settings(str(samples), str(samples.parent), of(sampled))
        (samples / "000000.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"other weights \(the run trained on since: they came from its step 300, "
                                         r"and this job samples step 400\)"):
        check_settings(str(trained_on), str(trained_on.parent), of(latest))
    shutil.rmtree(latest)
    assert resolve_checkpoint(str(run)).label == str(earlier)
    with pytest.raises(ValueError, match=r"other weights \(they came from the run's step 400 \(deleted since\), "
                                         rf"and this job samples its earlier step 300\); sample these into a new "
                                         rf"--workdir with --config.sample.checkpoint={earlier}$"):
        check_settings(str(deleted), str(deleted.parent), of(earlier))


def test_the_weights_a_job_came_from_and_those_it_samples_are_told_apart_by_their_paths(tmp_path, monkeypatch):
    """Steps of one run compare as numbers (900, then 1000); an earlier step named while the later
    one is still there is not 'deleted since'; one step saved again is named so. Another run's step,
    folders merely named by a number and a record without a path are no steps of one run, and a
    bucket's step is not looked up to tell whether it was deleted."""
    from pixelflow_jax import storage
    from pixelflow_jax.sampling.job_settings import run_and_step, weights_difference

    run = tmp_path / "run"
    step = lambda n: str(run / "checkpoints" / str(n))
    for n in (900, 1000):
        os.makedirs(step(n))
    assert weights_difference(step(900), step(1000)) == ("the run trained on since: they came from its step 900, and "
                                                         "this job samples step 1000")
    assert weights_difference(step(1000), step(900)) == ("they came from the run's step 1000, and this job samples its "
                                                         "earlier step 900")
    assert weights_difference(step(900), step(900)) == "the run's step 900 was saved again since, with other weights"
    exports = tmp_path / "exports"  # folders named by a step's number, not a run's checkpoints
    for sampled, sampling in ((step(900), str(tmp_path / "other" / "checkpoints" / "1000")),
                              (str(exports / "900"), str(exports / "1000"))):
        assert weights_difference(sampled, sampling) == f"they came from {sampled}, and this job samples {sampling}"
    assert run_and_step(str(run / "checkpoints" / "latest")) is None
    assert weights_difference(None, step(900)) == "a checkpoint changed since"

    def looked_up(path):
        raise AssertionError(f"{path} looked up")

    monkeypatch.setattr(storage, "exists", looked_up)
    assert weights_difference("gs://runs/r/checkpoints/1000", "gs://runs/r/checkpoints/900") == (
        "they came from the run's step 1000, and this job samples its earlier step 900")


@pytest.mark.parametrize("unreadable", [OSError(13, "Permission denied"), "bucket"])
def test_a_job_whose_sampled_checkpoint_cannot_be_read_now_gets_the_usual_refusal(tmp_path, monkeypatch, unreadable):
    """A rerun against another checkpoint whose recorded one cannot be read now (a bucket whose
    credentials expired, a folder no longer readable) is refused as before, not with a traceback
    from the look-up that would offer that checkpoint."""
    from pixelflow_jax import api, storage
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "job" / "samples"
    samples.mkdir(parents=True)
    check_settings(str(samples), str(samples.parent), {"checkpoint": "gs://runs/r/checkpoints/300",
                                                       "checkpoint_fingerprint": "of step 300"})
    (samples / "000000.png").write_bytes(b"")

    def cannot_read(path):
        raise unreadable if isinstance(unreadable, OSError) else storage.StorageError(f"cannot reach {path}")

    monkeypatch.setattr(api, "resolve_checkpoint", cannot_read)
    with pytest.raises(ValueError, match=r"--config.sample.checkpoint=/runs/r/checkpoints/400$"):
        check_settings(str(samples), str(samples.parent), {"checkpoint": "/runs/r/checkpoints/400",
                                                           "checkpoint_fingerprint": "of step 400"})


def test_settings_that_cannot_be_rewritten_for_a_larger_or_smaller_job_are_one_shared_error(tmp_path, monkeypatch):
    """A rerun that extends the job (more images) or takes back a larger count writes settings.json
    again: a read-only or full samples/ there is the same StorageError as for a new job, and process
    0 tells every process it failed (raised alone, it left the others waiting); the recorded
    settings stay as they were."""
    import errno

    from pixelflow_jax import storage
    from pixelflow_jax.sampling import job_settings
    from pixelflow_jax.storage import writes

    folder = tmp_path / "samples"
    folder.mkdir()
    recorded = {"num_images": 4, "labels": [0, 1, 2, 3]}
    job_settings.check_settings(str(folder), str(tmp_path), recorded)
    write_local, shared = writes.write_local_atomically, []

    def read_only(path, *args, **kwargs):
        if os.path.basename(path) == "settings.json":
            raise OSError(errno.EROFS, "Read-only file system")
        return write_local(path, *args, **kwargs)

    monkeypatch.setattr(writes, "write_local_atomically", read_only)
    monkeypatch.setattr(job_settings, "from_process_0", lambda value: shared.append(int(value)) or value)
    for settings in ({"num_images": 8, "labels": list(range(8))}, {"num_images": 2, "labels": [0, 1]}):
        shared.clear()
        with pytest.raises(storage.StorageError, match=rf"^cannot write {folder}/settings.json \(OSError: \[Errno 30\] "
                                                       r"Read-only file system\); make the workdir writable, and "
                                                       "rerun"):
            job_settings.check_settings(str(folder), str(tmp_path), settings)
        assert shared == [1]  # the failure told to the other processes
        assert json.loads((folder / "settings.json").read_text()) == recorded


def test_a_sigterm_to_any_process_of_a_distributed_job_stops_every_process_at_one_batch(tmp_path, converted,
                                                                                         monkeypatch):
    """In a --distributed job jax's preemption service holds SIGTERM: a SIGTERM to one process (or
    to all) was caught there and ignored, and the job sampled on to its end. Each batch now asks
    jax's sync point, which answers every process alike at the same batch (counted from 1, as the
    training loop counts its steps); the batch finished before it is kept."""
    from jax.experimental import multihost_utils

    from pixelflow_jax.command_line import Terminated

    asked = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda n: asked.append(n) or n == 2)
    with pytest.raises(Terminated):
        sample_in_process(tmp_path / "run", converted["c2i_tiny"], monkeypatch, num_images=24, batch_size=8)
    assert asked == [1, 2]
    assert sorted(os.listdir(tmp_path / "run" / "samples")) == [f"{i:06d}.png" for i in range(8)] + [
        "sampling_runs.jsonl", "settings.json"]


def test_a_job_counts_the_images_it_sampled_itself_not_those_it_found_on_disk(tmp_path, converted, monkeypatch):
    """A student's folder sampled by the teacher in place held forged PNGs under a genuine
    settings.json: the job found every image on disk and its evaluation scored them as sampled."""
    from pixelflow_jax.sampling import sample_run

    counts, run = [], sample_run.run
    monkeypatch.setattr(sample_run, "run", lambda *args: counts.append(run(*args)) or counts[-1])
    workdir = tmp_path / "run"
    job = lambda: sample_in_process(workdir, converted["c2i_tiny"], monkeypatch, num_images=3)
    job()
    os.remove(workdir / "samples" / "000001.png")
    job()
    job()
    assert counts == [3, 1, 0]
