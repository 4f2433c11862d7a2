"""A sampling job's folder holds the images of one job: its settings are recorded, checked at each
restart, and images of other weights, prompts or settings are never adopted."""

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, as_process_0_of_2_after_process_1, c2i_config, fixture_dir, json_edited, t2i_config
from pixelflow_jax import CheckpointError, load_model, storage
from pixelflow_jax.validation import ConfigError, check


def test_a_sample_job_never_adopts_images_of_other_weights(tmp_path, converted):
    """A checkpoint path written again with other weights, or images no settings.json describes,
    would mix into samples.npz: both are refused. The same weights written again are the same
    checkpoint (a job was refused after its folder was converted again from the same release)."""
    from pixelflow_jax.api import resolve_checkpoint
    from pixelflow_jax.checkpoints.checkpoint import read_config, restore_params, save_checkpoint
    from pixelflow_jax.sampling.job_settings import check_settings

    copy = str(tmp_path / "copy")
    shutil.copytree(converted["c2i_tiny"], copy)
    before = resolve_checkpoint(copy).fingerprint()
    assert before == resolve_checkpoint(converted["c2i_tiny"]).fingerprint()  # a copy is the same checkpoint
    assert before != resolve_checkpoint(converted["t2i_tiny"]).fingerprint()
    samples = str(tmp_path / "samples")
    os.makedirs(samples)
    check_settings(samples, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": before})
    open(os.path.join(samples, "000000.png"), "wb").close()  # a first image

    config = read_config(copy)
    params = restore_params(copy, config)
    # The same weights converted again into the folder (orbax names its files afresh): the same job.
    save_checkpoint(copy, params, config, overwrite=True)
    assert resolve_checkpoint(copy).fingerprint() == before
    check_settings(samples, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": before})
    save_checkpoint(copy, jax.tree.map(lambda p: p + 1e-3, params), config, overwrite=True)
    after = resolve_checkpoint(copy).fingerprint()
    assert after != before
    with pytest.raises(ValueError, match=r"other settings \(differing: \['checkpoint_fingerprint'\]\): they are of "
                                         rf"other weights \(the files of {copy} changed since they were sampled "
                                         r"\(converted again, or replaced\)\); "
                                         rf"sample these into a new --workdir with --config.sample.checkpoint={copy}$"):
        check_settings(samples, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": after})
    check_settings(samples, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": before})
    # The same weights at another path (moved, copied, linked) are the same checkpoint.
    check_settings(samples, str(tmp_path), {"checkpoint": converted["c2i_tiny"], "checkpoint_fingerprint": before})

    os.remove(os.path.join(samples, "settings.json"))  # a job of an earlier version did not record the fingerprint
    storage.write_json_atomically(os.path.join(samples, "settings.json"), {"checkpoint": copy})
    check_settings(samples, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": after})

    orphans = str(tmp_path / "orphans")
    os.makedirs(orphans)
    open(os.path.join(orphans, "000000.png"), "wb").close()
    with pytest.raises(ValueError, match="holds the image 000000.png but no settings.json"):
        check_settings(orphans, str(tmp_path), {"checkpoint": copy, "checkpoint_fingerprint": after})
    assert not os.path.exists(os.path.join(orphans, "settings.json"))

    # The PNGs and settings.json deleted to save space, samples.npz, grid.png and eval.json kept: not overwritten.
    kept = tmp_path / "kept"
    (kept / "samples").mkdir(parents=True)
    (kept / "samples.npz").write_bytes(b"50k images")
    (kept / "eval.json").write_text("{}")
    with pytest.raises(ValueError, match="holds samples.npz and eval.json of an earlier sampling job whose "
                                         ".*settings.json is gone"):
        check_settings(str(kept / "samples"), str(kept), {"checkpoint": copy, "checkpoint_fingerprint": after})
    assert not (kept / "samples" / "settings.json").exists()
    for name in ("samples.npz", "eval.json"):
        (kept / name).unlink()
    (kept / "grid.png").write_bytes(b"a grid")
    with pytest.raises(ValueError, match="holds grid.png of an earlier sampling job"):
        check_settings(str(kept / "samples"), str(kept), {"checkpoint": copy, "checkpoint_fingerprint": after})

    # A job of a text run recorded float32 encoder weights; the same command now takes the run's bfloat16.
    text = tmp_path / "text"
    (text / "samples").mkdir(parents=True)
    recorded = {"checkpoint": copy, "checkpoint_fingerprint": after, "text_encoder_param_dtype": "float32"}
    check_settings(str(text / "samples"), str(text), recorded)
    (text / "samples" / "000000.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"rerun with the settings in settings.json \(its text_encoder_param_dtype: "
                                         r"--config.sample.text_encoder_param_dtype=float32\)$"):
        check_settings(str(text / "samples"), str(text), {**recorded, "text_encoder_param_dtype": "bfloat16"})


def test_a_text_job_never_adopts_images_whose_prompts_another_encoder_encoded(tmp_path, monkeypatch):
    """A T5 folder written again in place (another download, a conversion) gives other embeddings: the
    job records the encoder's files, as it does the checkpoint's, so a rerun cannot mix the two."""
    from configs import t2i
    from pixelflow_jax.sampling import sample_conditioning
    from pixelflow_jax.sampling.job_settings import check_settings
    from pixelflow_jax.text import prompts, t5_convert

    class Encoder:  # what TextPrompts reads of a PromptEncoder, without loading a T5
        folder = str(tmp_path / "t5")

    fingerprints = {"t5": "weights-a"}
    monkeypatch.setattr(prompts, "prompt_encoder_for", lambda *_: Encoder())
    monkeypatch.setattr(t5_convert, "folder_fingerprint", lambda folder: fingerprints[os.path.basename(folder)])
    sample = t2i.get_config("tiny").sample
    sample.update(prompts=("a red disk",), text_encoder=str(tmp_path / "t5"))
    settings = lambda: sample_conditioning.TextPrompts(sample, 20).settings()
    samples = str(tmp_path / "samples")
    os.makedirs(samples)
    check_settings(samples, str(tmp_path), settings())
    open(os.path.join(samples, "000000.png"), "wb").close()
    fingerprints["t5"] = "weights-b"  # the same path, other files
    with pytest.raises(ValueError, match=r"holds images whose prompts another text encoder encoded \(differing: "
                                         r"\['text_encoder_fingerprint'\]"):
        check_settings(samples, str(tmp_path), settings())
    # the same files moved: the same encoder
    fingerprints["moved"], Encoder.folder = "weights-a", str(tmp_path / "moved")
    sample.text_encoder = Encoder.folder
    check_settings(samples, str(tmp_path), settings())


def test_a_samples_file_in_the_workdir_is_named_not_a_traceback(tmp_path, converted):
    (tmp_path / "samples").write_text("my notes")
    command = [sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path}", "--mode=sample",
               f"--config.sample.checkpoint={converted['c2i_tiny']}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "samples is a file, where this job keeps its images" in result.stderr
    assert "Traceback" not in result.stderr and (tmp_path / "samples").read_text() == "my notes"

    kept = tmp_path / "kept"  # an earlier job's samples.npz, its samples/ deleted: refused, and nothing made
    kept.mkdir()
    (kept / "samples.npz").write_bytes(b"50k images")
    result = subprocess.run([*command[:3], f"--workdir={kept}", *command[4:]], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "holds samples.npz of an earlier sampling job" in result.stderr, result.stderr
    assert os.listdir(kept) == ["samples.npz"]  # samples/ was made, empty, before the refusal

    folder = tmp_path / "folder"  # written once every image exists: a traceback there, after the sampling
    (folder / "grid.png").mkdir(parents=True)
    result = subprocess.run([*command[:3], f"--workdir={folder}", *command[4:]], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 1 and "grid.png is a folder, where this job writes its grid.png" in result.stderr
    assert os.listdir(folder) == ["grid.png"]


def test_an_output_in_the_way_on_one_process_stops_every_process_with_it(tmp_path, monkeypatch):
    """A --distributed job's processes each look at the workdir: process 1, whose host saw a samples
    file in the way, stopped alone while process 0 went on into its next collective."""
    from pixelflow_jax.sampling.job_files import check_outputs_have_room
    from test_metrics import as_process_of_2

    (tmp_path / "samples").write_text("my notes")
    as_process_of_2(monkeypatch, 1)
    with pytest.raises(ValueError, match="samples is a file, where this job keeps its images"):
        check_outputs_have_room(str(tmp_path))
    (tmp_path / "samples").unlink()
    as_process_of_2(monkeypatch, 0, failed_elsewhere=1)  # the workdir is fine here, not on process 1
    with pytest.raises(ValueError, match=r"^process 1 of 2 stopped checking the job's outputs in the workdir \(its "
                                         r"error says why\)$"):
        check_outputs_have_room(str(tmp_path))


def test_a_samples_npz_folder_is_refused_on_the_process_that_sees_it_and_told_to_the_others(tmp_path, monkeypatch):
    from jax.experimental import multihost_utils

    from pixelflow_jax.sampling.job_files import check_outputs_have_room
    from test_metrics import as_process_of_2

    (tmp_path / "samples.npz").mkdir()
    as_process_of_2(monkeypatch, 1)
    shared, real_allgather = [], multihost_utils.process_allgather
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda flag: shared.append(int(flag)) or real_allgather(flag))
    with pytest.raises(ValueError, match=r"samples\.npz is a folder, where this job writes its samples\.npz"):
        check_outputs_have_room(str(tmp_path))
    assert shared == [1]  # the others stop with it


def test_a_record_without_a_checkpoints_name_names_no_sampled_checkpoint(tmp_path):
    from pixelflow_jax.sampling.job_files import sampled_checkpoint

    (tmp_path / "samples").mkdir()
    for record in ("{}", '{"checkpoint": 3}', '{"checkpoint": "/runs/a"'):  # no name, not a name, cut off
        (tmp_path / "samples" / "settings.json").write_text(record)
        assert sampled_checkpoint(str(tmp_path)) is None
    (tmp_path / "samples" / "settings.json").write_text('{"checkpoint": "/runs/a"}')
    assert sampled_checkpoint(str(tmp_path)) == "/runs/a"


def test_sample_settings_that_cannot_matter_or_cannot_be_read_are_named(tmp_path):
    from configs import c2i
    from pixelflow_jax.evaluation.evaluate import check_sample_count
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    dopri5 = {"solver": "dopri5", "shift": 1.0, "steps_per_stage": [10, 10, 10, 10], "seed": 0}
    check_settings(str(samples), str(tmp_path), dopri5)
    check_settings(str(samples), str(tmp_path), {**dopri5, "shift": 3.0, "steps_per_stage": [2, 2, 2, 2]})  # unused
    with pytest.raises(ValueError, match=r"differing: \['shift', 'solver', 'steps_per_stage'\]\)"):  # euler uses both
        check_settings(str(samples), str(tmp_path), {**dopri5, "solver": "euler", "shift": 3.0,
                                                     "steps_per_stage": [2, 2, 2, 2]})
    with pytest.raises(ValueError, match=r"differing: \['seed'\]\) of a job that has sampled no image yet .*if no "
                                         r"job samples into .*samples, delete .*settings.json and rerun"):
        check_settings(str(samples), str(tmp_path), {**dopri5, "seed": 1})  # one killed before its first image
    (samples / "000000.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds images sampled with other settings \(differing: \['seed'\]"):
        check_settings(str(samples), str(tmp_path), {**dopri5, "seed": 1})
    (samples / "settings.json").write_text('{"solver": "dopri5", ')  # a disk that filled up
    with pytest.raises(ValueError, match=r"samples/settings.json is damaged \(JSONDecodeError: .*use a new --workdir"):
        check_settings(str(samples), str(tmp_path), dopri5)
    (samples / "settings.json").write_text('["solver", "dopri5"]')  # JSON, but not the object written
    with pytest.raises(ValueError, match=r"settings.json is damaged \(ValueError: a JSON list, not an object\)"):
        check_settings(str(samples), str(tmp_path), dopri5)

    config = c2i.get_config("tiny")
    config.sample.num_images = 3
    with pytest.raises(ValueError, match=r"num_images=3 is too few to evaluate: precision and recall need more than 3"):
        check_sample_count(config.sample)
    from configs import t2i

    text = t2i.get_config()
    text.sample.num_images = 3  # a text job's count is its prompts', known later: not refused by a setting it ignores
    check_sample_count(text.sample)


def test_a_sampling_job_may_grow_into_its_folder_and_shrink_back_while_no_image_lies_past(tmp_path, caplog):
    """A larger num_images (10,000 images for a first FID, then 50,000) keeps the images on disk when
    each recorded image keeps its label or prompt; a smaller one is taken back while no image past it
    was sampled (50,000 typed for 5,000); another conditioning of a recorded image is refused."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    architecture = {"num_classes": 3}  # as a job records it (and the labels' check reads)
    check = lambda settings, record=True: check_settings(str(samples), str(tmp_path),
                                                         {"seed": 0, "architecture": architecture, **settings},
                                                         record=record)
    recorded = lambda: {k: v for k, v in json.loads((samples / "settings.json").read_text()).items()
                        if k != "architecture"}
    check({"num_images": 4, "labels": [0, 1, 2, 0]})
    (samples / "000000.png").write_bytes(b"")
    check({"num_images": 6, "labels": [0, 1, 2, 0, 1, 2]})  # the default labels, i mod 3
    assert recorded() == {"seed": 0, "num_images": 6, "labels": [0, 1, 2, 0, 1, 2]}
    check({"num_images": 4, "labels": [0, 1, 2, 0]}, record=False)  # the check before the weights load
    assert recorded()["num_images"] == 6
    with caplog.at_level(logging.INFO):
        check({"num_images": 4, "labels": [0, 1, 2, 0]})
    assert f"shrinking the job in {samples} from 6 to 4 images: none past the 4 was sampled" in caplog.text
    assert recorded() == {"seed": 0, "num_images": 4, "labels": [0, 1, 2, 0]}
    check({"num_images": 6, "labels": [0, 1, 2, 0, 1, 2]})
    for refused in ({"num_images": 8, "labels": [1, 1, 2, 0, 1, 2, 0, 1]},  # image 0 with another label
                    {"num_images": 8, "labels": [0, 1, 2, 0, 1, 2, 0, 1], "seed": 1}):
        with pytest.raises(ValueError, match=r"holds images sampled with other settings"):
            check(refused)
    assert recorded()["num_images"] == 6

    text = {"num_images": 4, "prompts": ["a fox", "a cat"], "images_per_prompt": 2, "negative_prompt": ""}
    for name in ("settings.json", "000000.png"):
        (samples / name).unlink()
    check(text)
    check({**text, "num_images": 6, "prompts": ["a fox", "a cat", "a dog"]})  # a prompt added at the end
    check(text)  # and taken back
    # the same prompt for each image, as four prompts of one image each: no image more, so no extension
    with pytest.raises(ValueError, match=r"other settings \(differing: \['images_per_prompt', 'prompts'\]"):
        check({**text, "prompts": ["a fox", "a fox", "a cat", "a cat"], "images_per_prompt": 1})
    check({**text, "num_images": 6, "prompts": ["a fox", "a cat", "a dog"]})
    with pytest.raises(ValueError, match=r"other settings \(differing: \['images_per_prompt', 'num_images'\]"):
        check({**text, "num_images": 9, "prompts": ["a fox", "a cat", "a dog"], "images_per_prompt": 3})
    (samples / "settings.json").unlink()
    one_prompt = {**text, "num_images": 2, "prompts": ["a fox"]}
    check(one_prompt)
    check({**one_prompt, "num_images": 5, "images_per_prompt": 5})  # more images of its one prompt


def test_a_sampling_job_refuses_to_shrink_past_images_it_sampled_and_names_them(tmp_path):
    """Images past the smaller count, as PNGs or in a finished job's samples.npz, would be left out
    of settings.json (a later extension with other labels would adopt them) or overwritten: the
    refusal names them, the count that keeps them and the files to remove."""
    from pixelflow_jax.sampling.job_settings import check_settings
    from pixelflow_jax.sampling.sample_run import write_images_npz

    samples = tmp_path / "samples"
    samples.mkdir()
    job = lambda count: {"seed": 0, "num_images": count, "labels": [i % 3 for i in range(count)]}
    check = lambda count: check_settings(str(samples), str(tmp_path), job(count))
    recorded = lambda: json.loads((samples / "settings.json").read_text())["num_images"]
    check(2)
    check(50)
    for i in (0, 1, 4, 6, 9, 10):  # the extension stopped after a few images
        (samples / f"{i:06d}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"this job asks for 4 images, fewer than the 50 that .*samples/settings.json "
                                         r"records, but .*samples holds 4 images numbered 4 or above \(000004.png to "
                                         r"000010.png\): .* To shrink it to 4, delete those 4 PNGs, then rerun; "
                                         r"to keep them, rerun asking for at least 11 images \(as recorded: "
                                         r"--config.sample.num_images=50\); or use a new --workdir"):
        check(4)
    assert recorded() == 50
    with pytest.raises(ValueError, match=r"holds 1 image numbered 10 or above \(000010.png\): .*delete that 1 PNG, "
                                         r"then rerun; to keep it,"):
        check(10)
    with pytest.raises(ValueError, match=r"holds 3 images numbered 6 or above \(000006.png, 000009.png, 000010.png\)"):
        check(6)  # three named each
    check(11)
    assert recorded() == 11
    given = {"seed": 0, "num_images": 11, "labels": [7, 1] * 5 + [3]}  # labels the user gave, not the default's
    (samples / "settings.json").write_text(json.dumps(given))
    with pytest.raises(ValueError, match=r"to keep them, rerun asking for at least 11 images \(as recorded: "
                                         r"--config.sample.num_images=11, each image with the --config.sample.labels "
                                         r"entry settings.json records for it\); or use"):
        check_settings(str(samples), str(tmp_path), {**given, "num_images": 4, "labels": given["labels"][:4]})
    (samples / "settings.json").write_text(json.dumps(job(11)))

    for i in (4, 6, 9, 10):
        (samples / f"{i:06d}.png").unlink()
    with open(tmp_path / "samples.npz", "wb") as npz:  # a finished job of 11 whose PNGs were deleted
        write_images_npz(npz, np.zeros((11, 2, 2, 3), np.uint8), 11, 2)
    with pytest.raises(ValueError, match=r"but .*samples.npz holds 11 images: .* To shrink it to 4, move "
                                         r".*samples.npz away, then rerun; to keep them, rerun asking for at least 11"):
        check(4)
    (samples / "000005.png").write_bytes(b"")  # and one PNG past the count: the larger of the two is kept
    with pytest.raises(ValueError, match=r"holds 1 image numbered 4 or above \(000005.png\) and .*samples.npz holds 11 "
                                         r"images: .* To shrink it to 4, delete that 1 PNG and move .*samples.npz "
                                         r"away, then rerun; to keep them, rerun asking for at least 11 images"):
        check(4)
    (samples / "000005.png").unlink()
    (tmp_path / "samples.npz").write_bytes(b"PK cut off")
    with pytest.raises(ValueError, match=r"cannot tell how many images .*samples.npz holds \(.*\), and a job asking "
                                         r"for fewer images than settings.json records would overwrite it: "
                                         r"move it away"):
        check(4)
    with open(tmp_path / "samples.npz", "wb") as npz:  # the smaller job's own, from before its extension
        write_images_npz(npz, np.zeros((4, 2, 2, 3), np.uint8), 4, 2)
    (samples / "000005.png").write_bytes(b"")  # a PNG past the count: samples.npz, of no more, is not named
    with pytest.raises(ValueError, match=r"holds 1 image numbered 4 or above \(000005.png\): a job may shrink .* "
                                         r"delete that 1 PNG, then rerun; to keep it, rerun asking for at least 6 "):
        check(4)
    (samples / "000005.png").unlink()
    check(4)
    assert recorded() == 4

    for name in ("settings.json", "000000.png", "000001.png", "../samples.npz"):
        (samples / name).unlink()
    text = {"seed": 0, "num_images": 2, "prompts": ["a fox"], "images_per_prompt": 2, "negative_prompt": ""}
    check_settings(str(samples), str(tmp_path), {**text, "num_images": 4, "prompts": ["a fox", "a cat"]})
    (samples / "000002.png").write_bytes(b"")  # of the second prompt: keeping it keeps that prompt's 2 images
    with pytest.raises(ValueError, match=r"to keep it, rerun asking for at least the first 2 of settings.json's "
                                         r"prompts, 2 images each \(as recorded: its 2 prompts, 4 images\); or use"):
        check_settings(str(samples), str(tmp_path), text)


def test_a_refused_shrink_names_the_images_past_its_count_by_id_past_a_million(tmp_path):
    """Names of seven digits sort before 999999.png as text: the last image is the highest id."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    job = lambda count: {"seed": 0, "num_images": count, "prompts": ["a fox"], "images_per_prompt": count}
    check_settings(str(samples), str(tmp_path), job(1_000_001))
    for name in ("000004.png", "999999.png", "1000000.png"):
        (samples / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"holds 3 images numbered 4 or above \(000004.png, 999999.png, 1000000.png\)"):
        check_settings(str(samples), str(tmp_path), job(4))


def test_an_euler_job_refuses_other_steps_or_shift_that_dopri5_ignores(tmp_path):
    """Euler's images depend on shift and steps_per_stage (only dopri5's adaptive steps use
    neither): a rerun with others would mix two sets of images in one samples.npz."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    euler = {"solver": "euler", "shift": 1.0, "steps_per_stage": [10, 10, 10, 10], "seed": 0}
    check_settings(str(samples), str(tmp_path), euler)
    (samples / "000000.png").write_bytes(b"")
    for name, value in (("shift", 3.0), ("steps_per_stage", [2, 2, 2, 2])):
        with pytest.raises(ValueError, match=rf"holds images sampled with other settings \(differing: \['{name}'\]"):
            check_settings(str(samples), str(tmp_path), {**euler, name: value})
    check_settings(str(samples), str(tmp_path), euler)


def test_a_checkpoint_folders_fingerprint_follows_its_config_and_weights_only(tmp_path, converted):
    """A release folder is config.yaml + model.pt, a converted one its config and params/ (by the
    weights' digest its config records; by its files where converted before 2026-12-03): any of them
    written again with other content makes another checkpoint (its images are not added to a job's),
    a file beside them (notes) does not. model.pt was left out, so release weights replaced in place
    passed as the same checkpoint."""
    from pixelflow_jax.api import resolve_checkpoint
    from pixelflow_jax.checkpoints.checkpoint import CONFIG_FILE, PARAMS_DIR, WEIGHTS_DIGEST

    release = tmp_path / "release"
    release.mkdir()
    for name in ("config.yaml", "model.pt"):
        shutil.copy(os.path.join(fixture_dir("c2i_tiny"), name), release / name)
    conversion = shutil.copytree(converted["c2i_tiny"], tmp_path / "converted")
    earlier = shutil.copytree(converted["c2i_tiny"], tmp_path / "converted_earlier")
    with json_edited(earlier / CONFIG_FILE) as values:
        del values[WEIGHTS_DIGEST]
    in_params = lambda folder: next(os.path.join(parent, files[0])
                                    for parent, _, files in os.walk(folder / PARAMS_DIR) if files)
    fingerprint = lambda folder: resolve_checkpoint(str(folder)).fingerprint()
    for folder, written in ((release, ["model.pt", "config.yaml"]), (earlier, [in_params(earlier), CONFIG_FILE])):
        before = fingerprint(folder)
        (folder / "notes.txt").write_text("sampled for the paper")
        assert fingerprint(folder) == before
        for name in written:
            with open(folder / name, "ab") as f:
                f.write(b"\n")
            assert fingerprint(folder) != before, name
            before = fingerprint(folder)

    before = fingerprint(conversion)
    (conversion / "notes.txt").write_text("sampled for the paper")
    with open(in_params(conversion), "ab") as f:  # not fingerprinted: a load checks the weights (test_convert)
        f.write(b"\n")
    assert fingerprint(conversion) == before
    with json_edited(conversion / CONFIG_FILE) as values:
        values["resolution"] = 128
    assert fingerprint(conversion) != before


def test_a_relative_checkpoint_path_is_recorded_as_an_absolute_one(monkeypatch):
    """settings.json records the checkpoint as its label: a relative one would name another folder
    (or none) for a rerun from another directory."""
    from pixelflow_jax.api import resolve_checkpoint

    monkeypatch.chdir(os.path.dirname(fixture_dir("c2i_tiny")))
    assert resolve_checkpoint("c2i_tiny").label == fixture_dir("c2i_tiny")
    assert resolve_checkpoint(os.path.join("c2i_tiny", "model.pt")).label == fixture_dir("c2i_tiny")


def test_a_job_recorded_without_a_fingerprint_still_refuses_another_checkpoint(tmp_path):
    """settings.json of an earlier version has no checkpoint_fingerprint: the checkpoint's path is
    then all that says which weights drew its images (no fingerprint on either side is no proof
    of the same weights)."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    storage.write_json_atomically(str(samples / "settings.json"), {"checkpoint": "/runs/a", "seed": 0})
    (samples / "000000.png").write_bytes(b"")
    check_settings(str(samples), str(tmp_path), {"checkpoint": "/runs/a", "seed": 0, "checkpoint_fingerprint": "f1"})
    with pytest.raises(ValueError, match=r"holds images sampled with other settings \(differing: \['checkpoint'\]"):
        check_settings(str(samples), str(tmp_path),
                       {"checkpoint": "/runs/b", "seed": 0, "checkpoint_fingerprint": "f1"})


def test_a_job_recorded_before_a_setting_was_recorded_goes_on_and_one_recorded_is_compared(tmp_path):
    """settings.json of an earlier version lacks the settings recorded since (SETTINGS_ADDED_LATER):
    their absence is no change, so a rerun of that job goes on; once recorded, each is compared."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "000000.png").write_bytes(b"")
    job = {"seed": 0, "checkpoint": "/runs/a", "text_encoder": "/t5"}
    added = {name: f"{name} of this job" for name in ("checkpoint_fingerprint", "text_encoder_param_dtype",
                                                       "param_dtype", "text_encoder_fingerprint")}
    storage.write_json_atomically(str(samples / "settings.json"), job)
    check_settings(str(samples), str(tmp_path), {**job, **added})
    for name in added:
        storage.write_json_atomically(str(samples / "settings.json"), {**job, name: added[name]})
        with pytest.raises(ValueError, match=rf"\(differing: \['{name}'\]"):
            check_settings(str(samples), str(tmp_path), {**job, **added, name: "another"})


def test_a_job_whose_pngs_were_deleted_is_not_taken_for_one_that_never_sampled(tmp_path):
    """samples.npz kept, the PNGs deleted to save space: the job did sample, so its settings.json is
    not one 'to delete and rerun' (that advice is for a job killed before its first image). A
    killed writer's temporaries are no images of a job (they are cleared once the job starts)."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "000003.png.tmp").write_bytes(b"\x89PNG partial")  # an earlier version's temporary
    (samples / ".000004.png.tmp-999999999-x").write_bytes(b"\x89PNG partial")
    check_settings(str(samples), str(tmp_path), {"seed": 0})
    (tmp_path / "samples.npz").write_bytes(b"50k images")
    with pytest.raises(ValueError, match=r"holds images sampled with other settings \(differing: \['seed'\]\); use "
                                         r"a new --workdir, or rerun with the settings in settings.json$"):
        check_settings(str(samples), str(tmp_path), {"seed": 1})


def test_images_a_job_did_not_record_are_named_by_the_first_id_and_only_names_it_writes_count(tmp_path):
    """PNGs without a settings.json are refused, naming the lowest id (of six digits or more); a
    user's 12345.png or a folder named like an image is no image of a job."""
    from pixelflow_jax.sampling.job_files import images_on_disk
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    (samples / "000000.png").mkdir(parents=True)
    (samples / "12345.png").write_bytes(b"a user's")
    assert images_on_disk(str(samples)) == {"12345.png"}
    check_settings(str(samples), str(tmp_path), {"seed": 0}, record=False)  # nothing of a job here
    (samples / "1000000.png").write_bytes(b"png")  # the millionth image
    with pytest.raises(ValueError, match=r"holds the image 1000000\.png but no settings\.json"):
        check_settings(str(samples), str(tmp_path), {"seed": 0}, record=False)
    for i in range(300, 100, -1):
        (samples / f"{i:06d}.png").write_bytes(b"png")
    with pytest.raises(ValueError, match=r"holds 201 images \(e\.g\. 000101\.png\) but no settings\.json"):
        check_settings(str(samples), str(tmp_path), {"seed": 0}, record=False)


def test_each_image_is_conditioned_on_what_settings_json_records_for_it(monkeypatch):
    """A batch of any image ids (a resumed job's missing ones) gets the label or prompt that
    settings.json records for those images (job_settings.per_image_conditioning, which a larger job
    is checked against), not that of the batch's rows; and every setting that changes an image's
    conditioning is recorded, so that a rerun with another one is refused."""
    from configs import c2i, t2i
    from pixelflow_jax.sampling import sample_conditioning
    from pixelflow_jax.sampling.job_settings import per_image_conditioning
    from pixelflow_jax.text import prompts as prompts_module, t5_convert

    sample = c2i.get_config("tiny").sample
    sample.num_images = 7
    labels = sample_conditioning.ClassLabels(sample, num_classes=3)
    assert labels.settings()["labels"] == [i % 3 for i in range(7)]  # the release's sample_ddp.py: i mod classes
    recorded, ids = per_image_conditioning(labels.settings()), np.array([5, 2, 6])
    cond, uncond = labels.batch(ids)
    assert cond["class_labels"].tolist() == [recorded[i] for i in ids] and uncond["class_labels"].tolist() == [3] * 3
    sample.labels = (2, 0)
    with pytest.raises(ValueError, match="labels has 2 entries but --config.sample.num_images is 7"):
        sample_conditioning.ClassLabels(sample, num_classes=3)
    sample.update(num_images=1, labels=(2,))  # a job of one image of a label given
    assert sample_conditioning.ClassLabels(sample, num_classes=3).labels.tolist() == [2]

    vocabulary = ["", "blurry", "a fox", "a cat", "a dog"]

    class Encoder:  # a prompt's embedding is its index in the vocabulary: which prompt a row got reads back
        folder = "/tmp/t5"

        def encode(self, prompts):
            index = np.array([vocabulary.index(p) for p in prompts], np.float32)
            return index[:, None, None] * np.ones((1, 2, 4), np.float32), np.ones((len(prompts), 2), bool)

    monkeypatch.setattr(prompts_module, "prompt_encoder_for", lambda s, width: Encoder())
    monkeypatch.setattr(t5_convert, "folder_fingerprint", lambda folder: "the encoder's files")
    sample = t2i.get_config("tiny").sample
    sample.update(prompts=["a fox", "a cat", "a dog"], images_per_prompt=2, text_encoder="/tmp/t5")
    text = sample_conditioning.TextPrompts(sample, 4)
    recorded = per_image_conditioning(text.settings())
    assert text.num_images == len(recorded) == 6
    cond, uncond = text.batch(ids[:2] - 1)  # images 4 and 1
    assert [vocabulary[int(e[0, 0])] for e in cond["encoder_hidden_states"]] == [recorded[4], recorded[1]]
    assert uncond["encoder_hidden_states"].max() == 0  # the negative prompt, ""
    sample.negative_prompt = "blurry"
    assert sample_conditioning.TextPrompts(sample, 4).settings() != text.settings()
    sample.prompts_file = "/tmp/prompts.txt"  # and prompts: which would the job take?
    with pytest.raises(ValueError, match="set exactly one of --config.sample.prompts"):
        sample_conditioning.TextPrompts(sample, 4)
    # A typo's count of images: settings.json's per-image list of 1e11 prompts took the host's memory,
    # at every rerun in that workdir
    sample.prompts_file, sample.images_per_prompt = "", 10**7
    with pytest.raises(ConfigError, match=r"3 prompts x --config.sample.images_per_prompt 10000000 = 30,000,000 "
                                          r"images, over the limit of 10,000,000"):
        sample_conditioning.TextPrompts(sample, 4)
    config = t2i.get_config("tiny")
    config.sample.update(prompts=["a fox"], images_per_prompt=10**11)
    with pytest.raises(ConfigError, match=r"sample.images_per_prompt must be in \[1, 10000000\], got 100000000000"):
        check(config, "sample")


def test_the_conditioning_refuses_a_job_of_no_images_itself():
    """Checked where the job's image count is made, not only by main.py's config check, which a
    Python caller of sample_run.run does not pass through."""
    from configs import c2i, t2i
    from pixelflow_jax.sampling import sample_conditioning

    sample = c2i.get_config("tiny").sample
    sample.num_images = 0
    with pytest.raises(ValueError, match="^--config.sample.num_images must be positive, got 0"):
        sample_conditioning.ClassLabels(sample, num_classes=3)
    sample = t2i.get_config("tiny").sample
    sample.update(prompts=["a fox"], images_per_prompt=0)
    with pytest.raises(ValueError, match="^--config.sample.images_per_prompt must be positive, got 0"):
        sample_conditioning.TextPrompts(sample, 4)


def test_a_text_job_records_its_encoder_as_loaded_and_encodes_its_negative_prompt_once(tmp_path, monkeypatch):
    """settings.json names the encoder by its absolute path and fingerprints the folder the encoder
    read (a bucket's local copy, not the bucket), and records each setting that changes an embedding;
    the negative prompt is encoded once for the whole job; the image limit itself is a job."""
    from configs import t2i
    from pixelflow_jax.sampling import sample_conditioning
    from pixelflow_jax.text import prompts as prompts_module, t5_convert

    encoded = []

    class Encoder:  # a PromptEncoder of a bucket's folder reads a local copy of it
        folder = str(tmp_path / "copy")

        def encode(self, prompts):
            encoded.append(list(prompts))
            return np.zeros((len(prompts), 2, 4), np.float32), np.ones((len(prompts), 2), bool)

    monkeypatch.setattr(prompts_module, "prompt_encoder_for", lambda s, width: Encoder())
    monkeypatch.setattr(t5_convert, "folder_fingerprint", lambda folder: f"the files of {os.path.basename(folder)}")
    monkeypatch.chdir(tmp_path)
    sample = t2i.get_config("tiny").sample
    sample.update(prompts="a fox", text_encoder="t5", negative_prompt="blurry")
    text = sample_conditioning.TextPrompts(sample, 4)
    settings = text.settings()
    assert settings["prompts"] == ["a fox"]  # one prompt given alone, not its letters
    assert settings["text_encoder"] == str(tmp_path / "t5")  # made absolute
    assert settings["text_encoder_fingerprint"] == "the files of copy"
    for name, other in (("max_text_tokens", 16), ("text_encoder_param_dtype", "bfloat16")):
        before = sample[name]
        sample[name] = other
        assert sample_conditioning.TextPrompts(sample, 4).settings() == {**settings, name: other}
        sample[name] = before
    for ids in ([0, 0], [0]):
        text.batch(np.array(ids))
    assert encoded == [["blurry"], ["a fox", "a fox"], ["a fox"]]
    sample.images_per_prompt = 10**7  # the limit
    assert sample_conditioning.TextPrompts(sample, 4).num_images == 10**7
    sample.images_per_prompt = 10**7 + 1
    with pytest.raises(ConfigError, match=r"1 prompt x --config.sample.images_per_prompt 10000001 = 10,000,001 images"):
        sample_conditioning.TextPrompts(sample, 4)


def test_a_blank_prompt_is_refused_not_sampled():
    from configs import t2i
    from pixelflow_jax.sampling.sample_conditioning import read_prompts

    sample = t2i.get_config("tiny").sample
    sample.prompts = ("a fox", " ")
    with pytest.raises(ValueError, match=r"every prompt must be a non-empty string, got \['a fox', ' '\]"):
        read_prompts(sample)


def test_sample_settings_are_checked_by_process_0_and_its_refusal_stops_every_process(tmp_path, monkeypatch):
    """Another job's settings.json recorded between this job's checks and its exclusive create is
    named; with several processes, process 0 alone checks, and the others learn its outcome (one
    raising alone left the others waiting at a barrier; a barrier some processes skipped, when the
    file already existed for them, was a name mismatch)."""
    import json

    import numpy as np
    from jax.experimental import multihost_utils

    from pixelflow_jax.sampling import job_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    other_job = lambda: (samples / "settings.json").write_text(json.dumps({"seed": 1}))
    monkeypatch.setattr(job_settings.storage, "create_json", lambda path, value: other_job() and False)
    with pytest.raises(ValueError, match=r"another job started sampling into .*samples at the same time, with other "
                                         r"settings \(differing: \['seed'\]\); use a new --workdir"):
        job_settings.check_settings(str(samples), str(tmp_path), {"seed": 0})

    reads = []
    monkeypatch.setattr(job_settings, "changed_settings", lambda *args: reads.append(args) or [])
    monkeypatch.setattr(job_settings.jax, "process_index", lambda: 1)
    monkeypatch.setattr(job_settings.jax, "process_count", lambda: 2)
    for refused_on_process_0 in (1, 0):
        monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                            lambda value: np.int32(refused_on_process_0))
        if refused_on_process_0:
            with pytest.raises(ValueError, match=r"process 0 refused the settings of .*samples \(its error says why\)"):
                job_settings.check_settings(str(samples), str(tmp_path), {"seed": 0})
        else:
            job_settings.check_settings(str(samples), str(tmp_path), {"seed": 0})
    assert reads == []  # process 1 reads nothing: what it would find depends on when it looks


def test_processes_reading_other_copies_of_the_prompts_file_stop_together_before_the_restore(
        tmp_path, converted, encoder_folder, monkeypatch):
    """Each process reads --config.sample.prompts_file on its own host: with a stale copy on one
    host the job sampled that host's prompts into its rows of each batch without a word (and a
    copy of another prompt count crashed in a collective); with none there, that process stopped
    alone and the others waited for it. A copy that is the same passes."""
    from pixelflow_jax.sampling import sample_run

    class Restoring(Exception):
        """The job got past its checks of the inputs."""

    def restore(*_):
        raise Restoring

    monkeypatch.setattr(sample_run, "read_sampling_model", restore)
    monkeypatch.setattr(sample_run, "check_shared_workdir", lambda workdir: None)  # it waits for process 0's file
    prompts = tmp_path / "prompts.txt"  # the same path on every host, each host's own copy
    config = t2i_config(**{"sample.checkpoint": converted["t2i_tiny"], "sample.text_encoder": encoder_folder,
                           "sample.prompts": (), "sample.prompts_file": str(prompts)})
    job = lambda: sample_run.run(config, str(tmp_path / "run"))
    host = socket.gethostname()
    stale = ("the processes of this job read different copies of their inputs: process 1 of 2 (on "
             f"{host}) reads other content than process 0 (on {host}) in --config.sample.prompts_file {prompts} "
             "(prompts: process 0: 3, process 1: 2). Each host reads its own copy there: copy process 0's to the "
             "other hosts")
    for host_1, stop, refusal in (("a red cat\nthe moon\n", Restoring, stale),
                                  (None, ValueError, "process 1 of 2 stopped reading the job's labels or prompts"),
                                  ("a red cat\nthe moon\na blue ring\n", Restoring, None)):
        with monkeypatch.context() as patched:
            prompts.unlink(missing_ok=True)
            if host_1:
                prompts.write_text(host_1)
            as_process_0_of_2_after_process_1(patched, job, stop)
            prompts.write_text("a red cat\nthe moon\na blue ring\n")  # process 0's
            with pytest.raises(ValueError if refusal else Restoring, match=refusal and re.escape(refusal)):
                job()
    assert not (tmp_path / "run").exists()


def test_a_job_compares_across_hosts_its_checkpoint_labels_prompts_file_and_text_encoder():
    """What each host reads for itself (sample_run.inputs_read): the checkpoint's files, the labels
    (class names and default labels come from the run's files on that host), the prompts a prompts
    file gave and the encoder's files; prompts given on the command line are read from no file."""
    from configs import c2i, t2i
    from pixelflow_jax.multihost import InputRead
    from pixelflow_jax.sampling.sample_run import inputs_read

    checkpoint = InputRead("--config.sample.checkpoint /run", "weights")
    labels = {"checkpoint": "/run", "checkpoint_fingerprint": "weights", "labels": [0, 1, 0]}
    assert inputs_read(c2i.get_config("tiny").sample, labels) == [
        checkpoint, InputRead("the labels (from --config.sample.labels, the run's class_index.json or its "
                              "train_settings.json)", "[0, 1, 0]")]
    sample = t2i.get_config("tiny").sample
    text = {"checkpoint": "/run", "checkpoint_fingerprint": "weights", "prompts": ["a fox", "a cat"],
            "text_encoder": "/t5", "text_encoder_fingerprint": "the files of t5"}
    encoder = InputRead("--config.sample.text_encoder /t5", "the files of t5")
    assert inputs_read(sample, text) == [checkpoint, encoder]
    sample.prompts_file = "/prompts.txt"
    assert inputs_read(sample, text) == [checkpoint, InputRead("--config.sample.prompts_file /prompts.txt",
                                                               '["a fox", "a cat"]', 2, "prompts"), encoder]


def test_a_prompts_file_is_read_as_a_user_wrote_it_or_named_with_its_problem(tmp_path):
    from pixelflow_jax.sampling.sample_conditioning import read_prompts_file

    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffa red disk\r\n\r\na blue ring\n".encode("utf-8"))  # a Windows editor's file
    assert read_prompts_file(str(path)) == ["a red disk", "a blue ring"]
    # Only line breaks end a prompt: a form feed or U+2028 (pasted from a web page) inside a line is
    # no break an editor shows, and splitting there would shift every later prompt's images.
    path.write_text("a red disk\x0con grey\na blue\u2028ring\x85now\ra green square\n", encoding="utf-8")
    assert read_prompts_file(str(path)) == ["a red disk\x0con grey", "a blue\u2028ring\x85now", "a green square"]
    path.write_text("  a red disk \n")  # as written: settings.json records the prompt the file gives
    assert read_prompts_file(str(path)) == ["  a red disk "]
    for content, message in ((" \n\n", "holds no prompts"), ("caf\xe9\n".encode("latin-1"), "is not UTF-8 text")):
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        with pytest.raises(ValueError, match=f"prompts_file {path} {message}"):
            read_prompts_file(str(path))
    with pytest.raises(ValueError, match="is a folder: give a text file"):
        read_prompts_file(str(tmp_path))
    # Windows' "Unicode": UTF-16 with its byte-order mark said "not UTF-8 (invalid start byte at byte 0)";
    # without the mark it read as UTF-8, a NUL beside each letter, and each line sampled as two prompts.
    for encoding, named in (("utf-16", "UTF-16"), ("utf-32", "UTF-32"), ("utf-16-le", "UTF-16LE"),
                            ("utf-16-be", "UTF-16BE")):
        path.write_bytes("a red disk\r\na blue ring\r\n".encode(encoding))
        with pytest.raises(ValueError, match=f"prompts_file {path} is {named} text, not UTF-8: convert it, e.g. "
                                             f"iconv -f {named} -t UTF-8 {path} > prompts.utf8.txt"):
            read_prompts_file(str(path))


def test_a_benchmarks_prompts_as_json_or_a_table_are_refused_rather_than_sampled_as_their_text(tmp_path):
    """GenEval's metadata.jsonl, PartiPrompts' TSV and DrawBench's CSV given as a prompts file were
    sampled line by line: each image of a JSON record's text, of a row's columns, and of the header."""
    from pixelflow_jax.sampling.sample_conditioning import read_prompts_file

    path = tmp_path / "prompts"
    refused = {
        '{"tag": "single_object", "include": [{"class": "bench"}], "prompt": "a photo of a bench"}\n'
        '{"tag": "colors", "prompt": "a photo of a red cow"}\n':
            "its lines are JSON objects (keys tag, include, prompt); write each one's prompt alone, e.g. jq -r "
            f".prompt {path} > prompts.txt, and give that file",
        "Prompt\tCategory\tChallenge\tNote\nbond\tAbstract\tBasic\t-\n":
            "its first line, 'Prompt\\tCategory\\tChallenge\\tNote', is a table's header, and each line a row of 4 "
            "columns; write the 'Prompt' column alone, without the header",
        'Prompts,Category\nA red colored car.,Colors\n"A black, colored car.",Colors\n':
            "its first line, 'Prompts,Category', is a table's header, and each line a row of 2 columns; write the "
            "'Prompts' column alone, without the header",
        "caption\na red fox\n": "its first line, 'caption', is a column's header, not a prompt; remove that line",
        '[\n  "a red fox",\n  "a blue car"\n]\n': "it is a JSON list of 2 entries; write each prompt alone on a line",
        '\n  ["a red fox", "a blue car"]\n': "it is a JSON list of 2 entries; write each prompt alone on a line",
        '{\n  "prompts": ["a red fox", "a blue car"]\n}\n':
            "it is a JSON object of 1 entry; write each prompt alone on a line",
        '{"k1": 1, "k2": 2, "k3": 3, "k4": 4, "k5": 5, "k6": 6, "Prompt": "a red cow"}\n' * 2:
            f"its lines are JSON objects (keys k1, k2, k3, k4, k5, k6); write each one's prompt alone, e.g. jq -r "
            f".Prompt {path} > prompts.txt, and give that file",
        '"Prompt","Category"\n"A red colored car.","Colors"\n':
            "its first line, '\"Prompt\",\"Category\"', is a table's header, and each line a row of 2 columns; write "
            "the 'Prompt' column alone, without the header",
        "Prompt," + ",".join(f"column_{i:02d}" for i in range(1, 13)) + "\n":  # 126 characters, shown to 120
            "its first line, 'Prompt," + ",".join(f"column_{i:02d}" for i in range(1, 12)) + ",col', is a table's "
            "header, and each line a row of 13 columns; write the 'Prompt' column alone, without the header",
        # nested past what Python's json reads: its RecursionError came out of the sampling job as a traceback
        "[" * 100_000 + "]" * 100_000 + "\n":
            f"it is JSON nested more than {sys.getrecursionlimit()} levels deep, past what Python reads; write each "
            "prompt alone on a line",
        "a red fox\n" + "[" * 100_000 + "]" * 100_000 + "\n": "it is JSON nested more than",
    }
    for text, problem in refused.items():
        path.write_text(text)
        with pytest.raises(ValueError, match=re.escape(f"prompts_file {path} is not one plain prompt per line: "
                                                       f"{problem}")):
            read_prompts_file(str(path))
    # prompts that only look like these: a prompt starting with a column's name, brackets, braces
    plain = ["text, bold letters on a sign", "caption: a red fox", "[a red fox]", "{a red fox}", "prompt",
             '{"style": "photo"}']  # one line of JSON among prompts: a prompt too
    path.write_text("\n".join(plain) + "\n")
    assert read_prompts_file(str(path)) == plain


def test_blank_lines_that_move_prompts_off_their_line_numbers_are_named(tmp_path, caplog):
    """They were skipped without a word: the images of the prompt on line 4 were those of prompt 1."""
    from pixelflow_jax.sampling.sample_conditioning import read_prompts_file

    path = tmp_path / "prompts.txt"
    path.write_text("a red disk\n\n  \na blue ring\na green square\n\n")
    with caplog.at_level(logging.WARNING):
        assert read_prompts_file(str(path)) == ["a red disk", "a blue ring", "a green square"]
    assert f"prompts_file {path}: blank lines 2, 3 skipped: the prompt on line 4 is prompt 1 (prompts count " \
           "non-blank lines, from 0, and a sampling job's image i shows prompt i // images_per_prompt)" in caplog.text
    caplog.clear()
    for text in ("a red disk\na blue ring\n\n\n", "a red disk\r\na blue ring\r\n"):  # after the last prompt, or
        path.write_bytes(text.encode())  # Windows' line ends (not a line and a blank one): they move nothing
        with caplog.at_level(logging.WARNING):
            read_prompts_file(str(path))
        assert "blank" not in caplog.text, text
    # one blank line (the common case) is named too; with blank lines in two places the warning names the
    # first prompt they moved, and a long run of them is cut after ten
    for text, named in (("a red disk\n\na blue ring\n", "blank line 2 skipped: the prompt on line 3 is prompt 1 "),
                        ("a red disk\n\na blue ring\n\na green square\n",
                         "blank lines 2, 4 skipped: the prompt on line 3 is prompt 1 "),
                        ("\n" * 12 + "a red disk\n", "blank lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, ... skipped: the "
                                                    "prompt on line 13 is prompt 0 "),
                        ("\n" * 10 + "a red disk\n", "blank lines 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 skipped: the "
                                                    "prompt on line 11 is prompt 0 ")):
        caplog.clear()
        path.write_text(text)
        with caplog.at_level(logging.WARNING):
            read_prompts_file(str(path))
        assert f"prompts_file {path}: {named}" in caplog.text


def test_a_prompt_of_only_invisible_characters_is_refused(tmp_path):
    """A line holding only a byte-order mark (two files joined) or a zero-width space tokenized to
    nothing: its images were the negative prompt's, unguided, without a word."""
    from pixelflow_jax.sampling.sample_conditioning import read_prompts

    path = tmp_path / "prompts.txt"
    path.write_text("a red disk\n\ufeff\na blue ring\n")
    sample = t2i_config(**{"sample.prompts_file": str(path)}).sample
    with pytest.raises(ValueError, match=re.escape("prompt 1 ('\\ufeff') holds no visible text, only zero-width, "
                                                   "byte-order-mark or control characters")):
        read_prompts(sample)
    sample.update(prompts_file="", prompts=("a red disk", "\u200b"))
    with pytest.raises(ValueError, match=re.escape("prompt 1 ('\\u200b') holds no visible text")):
        read_prompts(sample)
    sample.prompts = ("a red disk", "\u732b")
    assert read_prompts(sample) == ["a red disk", "\u732b"]


def test_sample_settings_a_text_job_does_not_use_are_refused():
    from configs import t2i

    for field, value in (("num_images", 10), ("labels", (1, 2))):
        config = t2i.get_config("tiny")
        config.sample[field] = value
        with pytest.raises(ConfigError, match=f"--config.sample.{field} does not apply to text-to-image sampling"):
            check(config, "sample")
    check(t2i.get_config("tiny"), "sample")
    config = t2i.get_config("tiny")
    config.sample.text_encoder_param_dtype = "fp16"  # named before the checkpoint loads
    with pytest.raises(ConfigError, match="--config.sample.text_encoder_param_dtype must be one of"):
        check(config, "sample")
    for count in (3_000_000_000, 10**8):  # past int32 ids; a typo that took 10 GB before its first log line
        with pytest.raises(ConfigError, match=r"--config.sample.num_images must be in \[1, 10000000\]"):
            check(c2i_config(**{"sample.num_images": count}), "sample")
    # Prompts of another type, and text settings inspect reads, are named before a checkpoint loads.
    for mode, field, value, message in (
            ("sample", "prompts", 5, "--config.sample.prompts must be a prompt or a list of prompts (strings), got 5"),
            ("sample", "prompts", None, "--config.sample.prompts must be a prompt or a list of prompts"),
            ("train", "prompts", ("a cat", 3), "--config.sample.prompts must be a prompt or a list of prompts"),
            ("inspect", "max_text_tokens", -5, "--config.sample.max_text_tokens must be in [0, 4096], got -5")):
        config = t2i.get_config("tiny")
        config.sample[field] = value
        if mode == "train":
            config.train.preview_every = 1
        with pytest.raises(ConfigError, match=re.escape(message)):
            check(config, mode)
    for mode in ("sample", "demo", "inspect"):  # the dtypes a sampling job builds its model with
        with pytest.raises(ConfigError, match="--config.model.param_dtype must be .*float16.*got 'float64'"):
            check(c2i_config(**{"model.param_dtype": "float64"}), mode)
    with pytest.raises(ConfigError, match=r"--config.train.ema_decay must be < 1"):  # the EMA would never move
        check(c2i_config(**{"train.ema_decay": 1.0}), "train")


def test_a_setting_a_checkpoint_cannot_honour_is_refused(converted):
    from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

    for path in (converted["c2i_tiny"], fixture_dir("c2i_tiny")):  # one set of weights each
        with pytest.raises(CheckpointError, match="holds one set of weights|with one set of weights"):
            load_model(path, weights="model")
    with pytest.raises(CheckpointError, match=r"--resolution=128 \(64 in .*config.yaml\): the config.yaml decides"):
        read_release_checkpoint(fixture_dir("c2i_tiny"), overrides={"resolution": 128, "num_stages": None})
    config, _ = read_release_checkpoint(fixture_dir("c2i_tiny"), overrides={"resolution": 64})  # agrees: fine
    assert config.resolution == 64


def test_two_sample_jobs_starting_together_in_one_folder_cannot_both_record_their_settings(tmp_path, monkeypatch):
    """Both saw no settings.json and both wrote one (the last rename won): two seeds, one folder."""
    from pixelflow_jax.sampling.job_settings import check_settings

    samples = tmp_path / "samples"
    samples.mkdir()
    real_exists = storage.exists

    def other_job_writes_first(path):  # the other job records its settings between the check and the write
        found = real_exists(path)
        if path.endswith("settings.json") and not found:
            (samples / "settings.json").write_text(json.dumps({"seed": 0}))
        return found

    monkeypatch.setattr(storage, "exists", other_job_writes_first)
    with pytest.raises(ValueError, match=r"differing: \['seed'\]"):
        check_settings(str(samples), str(tmp_path), {"seed": 1})
    assert json.loads((samples / "settings.json").read_text()) == {"seed": 0}
    assert os.listdir(samples) == ["settings.json"]  # no temporary left


def test_a_jobs_line_in_sampling_runs_names_the_step_read_its_batches_dtypes_and_resolved_kernel():
    """Each field from its own source: the step of the source read (None for a folder that is no
    training run), the batch run beside the one asked, the compute and weight dtypes apart, and the
    kernel 'auto' resolved to on this platform."""
    from types import SimpleNamespace

    import jax.numpy as jnp

    from pixelflow_jax.checkpoints.run_checkpoint import RunStep
    from pixelflow_jax.kernels.attention import resolve_backend
    from pixelflow_jax.sampling.sample_run import sampling_record

    model = SimpleNamespace(dtype="bfloat16", param_dtype="float32", attention="auto", compute_dtype=jnp.bfloat16)
    settings = dict(checkpoint="/runs/a/checkpoints/6", checkpoint_fingerprint="f1f2", weights="model", num_images=12)
    source = SimpleNamespace(run_step=RunStep("/runs/a", 6, latest=True))
    record = sampling_record(SimpleNamespace(batch_size=64), settings, source, SimpleNamespace(model=model), 16)
    assert record == dict(checkpoint="/runs/a/checkpoints/6", checkpoint_step=6, checkpoint_fingerprint="f1f2",
                          weights="model", num_images=12, batch_size=16, batch_size_asked=64, dtype="bfloat16",
                          param_dtype="float32", attention="auto",
                          attention_backend=resolve_backend("auto", jnp.bfloat16))
    assert record["attention_backend"] != "auto"
    converted = SimpleNamespace(run_step=None)
    assert sampling_record(SimpleNamespace(batch_size=64), settings, converted, SimpleNamespace(model=model),
                           16)["checkpoint_step"] is None
