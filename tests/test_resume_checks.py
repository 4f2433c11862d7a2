"""A resume trains on with the settings its run trained with: every change is refused, warned or
recorded, and a fine-tune's starting point is kept."""

import json
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import pytest

from pixelflow_jax import CheckpointError
from conftest import c2i_config, t2i_config


def test_init_from_given_to_a_run_that_trains_warns_unless_it_is_where_the_run_started(tmp_path, caplog, monkeypatch):
    """A resume reads no init_from. The same command rerun after a preemption passes quietly; an
    init_from the run did not start from (a fine-tune typed into an existing workdir) is a warning
    naming both, even after an allowed settings change rewrote the record."""
    from pixelflow_jax.training.resume_settings import check_resume, note_init_from_at_resume

    started, other = str(tmp_path / "base_run"), str(tmp_path / "other_run")
    tuned, scratch = str(tmp_path / "tuned"), str(tmp_path / "scratch")
    check_resume(tuned, c2i_config(**{"train.init_from": started}), step=0, num_records=100)
    check_resume(scratch, c2i_config(), step=0, num_records=100)

    def warnings_of(workdir, init_from):
        caplog.clear()
        with caplog.at_level("INFO"):
            note_init_from_at_resume(workdir, 40, init_from)
        assert "resumes from its step 40; train.init_from starts new runs only" in caplog.text
        return [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]

    assert warnings_of(tuned, started + "/") == []  # as typed again, a trailing slash aside
    monkeypatch.chdir(tmp_path)  # a relative path, typed again where the run was started
    check_resume(str(tmp_path / "relative"), c2i_config(**{"train.init_from": "base_run"}), step=0, num_records=100)
    assert warnings_of(str(tmp_path / "relative"), "base_run") == []
    [warning] = warnings_of(tuned, other)
    assert f"this run started from {started}, not from {other}. To train a new run from {other}, use a new " \
           "--workdir" in warning
    [warning] = warnings_of(scratch, started)
    assert f"this run trained from scratch, not from {started}" in warning
    changed = c2i_config(**{"train.init_from": other, "train.lr": 1e-3, "train.allow_resume_changes": True})
    check_resume(tuned, changed, step=40, num_records=100)  # rewrites train_settings.json
    assert warnings_of(tuned, started) == []


def test_init_from_weights_other_than_a_fine_tune_started_from_is_a_warning_at_its_resume(tmp_path, caplog):
    """A fine-tune from a run's EMA, rerun in its workdir with init_from_weights=model to try the
    raw weights instead: it resumed the EMA fine-tune with an INFO line saying init_from is not read
    (the path was the one it started from), as if the command were the same."""
    from pixelflow_jax.training.resume_settings import check_resume, note_init_from_at_resume

    started, tuned = str(tmp_path / "base_run"), str(tmp_path / "tuned")
    check_resume(tuned, c2i_config(**{"train.init_from": started}), step=0, num_records=100,
                 init_checkpoint=f"{started}/checkpoints/4", init_weights="ema")
    with caplog.at_level("WARNING"):
        note_init_from_at_resume(tuned, 40, started, "ema")  # the same command rerun: said in passing
        assert caplog.text == ""
        note_init_from_at_resume(tuned, 40, started, "model")
    assert (f"resumes from its step 40; train.init_from starts new runs only and is not read: this run started "
            f"from the ema weights of {started}/checkpoints/4, not from the model weights of {started}. To train a "
            f"new run from those, use a new --workdir") in caplog.text
    # A converted folder holds one set: no choice was made (api.weights_chosen), so none is recorded or compared.
    caplog.clear()
    converted, tuned = str(tmp_path / "converted"), str(tmp_path / "tuned_from_converted")
    check_resume(tuned, c2i_config(**{"train.init_from": converted}), step=0, num_records=100,
                 init_checkpoint=converted, init_weights=None)
    with caplog.at_level("WARNING"):
        note_init_from_at_resume(tuned, 40, converted, "model")
    assert caplog.text == ""


def test_a_resume_of_a_run_from_before_recorded_settings_says_which_version_wrote_it(tmp_path, caplog):
    """A run of 2026-11-26 (run_config.json without num_train_timesteps, no train_settings.json)
    resumed here trained other batches than its own version would have (a tiny demo run resumed at
    step 4: loss 0.153 at step 5, 0.145 by the version that wrote it), and was told only that its
    settings went unchecked, as a copy that missed the file is."""
    from pixelflow_jax.training.resume_settings import check_resume

    old_run = {"architecture": {"num_attention_heads": 2, "attention_head_dim": 16, "depth": 2, "patch_size": 4,
                                "in_channels": 3, "out_channels": 3, "num_classes": 10, "attention_bias": True,
                                "cross_attention_dim": 0}, "num_stages": 4, "resolution": 64}
    (tmp_path / "run_config.json").write_text(json.dumps(old_run))
    with caplog.at_level("WARNING"):
        check_resume(str(tmp_path), c2i_config(), step=4, num_records=100)
    assert "written by a version of 2026-11-26" in caplog.text
    assert "the steps from here are not those it would have trained" in caplog.text
    assert "resume it with the version that wrote it" in caplog.text
    caplog.clear()
    (tmp_path / "train_settings.json").unlink()  # a copy of a later run that missed the file: no such claim
    (tmp_path / "run_config.json").write_text(json.dumps({**old_run, "num_train_timesteps": 1000}))
    with caplog.at_level("WARNING"):
        check_resume(str(tmp_path), c2i_config(), step=4, num_records=100)
    assert "cannot be checked" in caplog.text and "2026-11-26" not in caplog.text


def test_a_resume_without_its_recorded_settings_says_it_goes_unchecked(tmp_path, caplog):
    """A run copied without train_settings.json resumed with any learning rate or batch size and
    said nothing: the check that refuses such changes had nothing to compare with."""
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE, STARTED_FROM, check_resume, \
        note_init_from_at_resume

    with caplog.at_level("WARNING"):
        check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)  # a new run: nothing to say
        assert caplog.text == ""
        (tmp_path / SETTINGS_FILE).unlink()
        check_resume(str(tmp_path), c2i_config(**{"train.lr": 1.0}), step=40, num_records=100, record=False)
        assert caplog.text == ""  # said once, by the call that records
        check_resume(str(tmp_path), c2i_config(**{"train.lr": 1.0}), step=40, num_records=100)
    assert f"resumes at step 40 without its {SETTINGS_FILE} (a run of a version before that file, or a copy that " \
           "missed it): this command's settings cannot be checked" in caplog.text
    recorded = json.loads((tmp_path / SETTINGS_FILE).read_text())
    assert recorded["train.lr"] == 1.0
    assert STARTED_FROM not in recorded  # recorded mid-run: what it started from is not this command's init_from
    caplog.clear()
    with caplog.at_level("WARNING"):
        note_init_from_at_resume(str(tmp_path), 40, "base_run")
    assert "this run did not record what it started from, not from base_run" in caplog.text  # not "from scratch"


def test_an_allowed_seed_change_says_which_draws_follow_it(tmp_path, caplog):
    """The key of a run's noise, timestep and dropout draws is in its checkpoint, made once from the
    seed it started with; the data order and crops follow config.seed. An allowed seed change said
    only 'seed: 0 -> 3', as if every draw would follow the new seed."""
    from pixelflow_jax.training.resume_settings import check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    with caplog.at_level("WARNING"):
        check_resume(str(tmp_path), c2i_config(**{"train.lr": 1e-3, "train.allow_resume_changes": True}), step=40,
                     num_records=100)
    assert "restored" not in caplog.text  # said of a seed change alone
    with caplog.at_level("WARNING"):
        check_resume(str(tmp_path), c2i_config(**{"seed": 3, "train.allow_resume_changes": True}), step=60,
                     num_records=100)
    assert ("seed: 0 -> 3 (the data order, crops and flips follow the new seed; the noise, timestep and dropout "
            "draws go on from the key restored with the checkpoint, made from the seed the run started with)"
            in caplog.text)


def test_a_batch_size_change_says_which_images_it_skips_or_reads_again(tmp_path, caplog):
    """The data position is the step, counted in batches of the batch size of the command: an allowed
    change of it skipped or repeated the images between, and the warning said only 'batch_size: 8 -> 16'."""
    from pixelflow_jax.training.resume_settings import check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=1000)
    with caplog.at_level("WARNING"):
        check_resume(str(tmp_path), c2i_config(**{"train.batch_size": 16, "train.allow_resume_changes": True}),
                     step=40, num_records=1000)
        check_resume(str(tmp_path), c2i_config(**{"train.batch_size": 4, "train.allow_resume_changes": True}),
                     step=50, num_records=1000)
    assert ("train.batch_size: 8 -> 16 (the data goes on from image 640 of its order, where the run was at image "
            "320: 320 images skipped)" in caplog.text)
    assert ("train.batch_size: 16 -> 4 (the data goes on from image 200 of its order, where the run was at image "
            "800: 600 images read again)" in caplog.text)


def test_a_new_run_in_a_workdir_of_deleted_checkpoints_is_not_compared_with_that_runs_changes(tmp_path):
    """A fine-tune restarted in its workdir after `rm -r checkpoints/`, with the learning rate it
    had changed to: the earlier run's settings_changes.jsonl stayed, and the new run's first resume
    undid that change on its own record and refused its own command as 'train.lr: 0.0001 -> 0.001'."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, check_resume

    workdir, faster = str(tmp_path), {"train.lr": 1e-3}
    check_resume(workdir, c2i_config(), step=0, num_records=100)
    check_resume(workdir, c2i_config(**faster, **{"train.allow_resume_changes": True}), step=40, num_records=100)
    check_resume(workdir, c2i_config(**faster), step=0, num_records=100)  # checkpoints/ deleted: a new run
    check_resume(workdir, c2i_config(**faster), step=20, num_records=100)  # its own command resumes it
    [record] = map(json.loads, open(tmp_path / CHANGES_FILE))  # the earlier run's history is kept, marked
    assert record["changes"] == {"train.lr": {"from": 0.0001, "to": 0.001}}
    assert record["discarded"] == "no step trained with it was kept: a new run started in this workdir"
    # Damaged, that history stopped the new run, calling it 'the settings changes of this run': kept aside.
    (tmp_path / CHANGES_FILE).write_text("{not json\n")
    check_resume(workdir, c2i_config(**faster), step=0, num_records=100)
    [aside] = [name for name in os.listdir(tmp_path) if name.startswith(f"{CHANGES_FILE}.earlier-run-")]
    assert (tmp_path / aside).read_text() == "{not json\n" and not (tmp_path / CHANGES_FILE).exists()
    check_resume(workdir, c2i_config(**faster), step=20, num_records=100)


def test_resuming_with_changed_settings_is_refused_unless_allowed_and_then_recorded(tmp_path):
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    workdir = str(tmp_path)
    check_resume(workdir, c2i_config(), step=0, num_records=100)  # a new run records its settings
    check_resume(workdir, c2i_config(), step=40, num_records=100)  # the same settings resume
    changed = c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16})
    with pytest.raises(ValueError) as error:
        check_resume(workdir, changed, step=40, num_records=100)
    assert "train.batch_size: 8 -> 16" in str(error.value) and "train.lr: 0.0001 -> 0.001" in str(error.value)
    assert "--config.train.allow_resume_changes=True" in str(error.value)
    changed.train.allow_resume_changes = True
    check_resume(workdir, changed, step=40, num_records=100)
    record = json.loads((tmp_path / CHANGES_FILE).read_text())
    assert record == {"step": 40, "changes": {"train.batch_size": {"from": 8, "to": 16},
                                              "train.lr": {"from": 0.0001, "to": 0.001}}}
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["train.lr"] == 0.001

    # Stopped before it saved a step with the change (kill -9): resumed at step 40 again, the change
    # trained nothing kept, so the run's own settings resume (they were refused as a change) and
    # the record is marked discarded.
    with pytest.raises(ValueError, match=r"train.batch_size: 16 -> 8"):  # refused before: nothing written
        check_resume(workdir, c2i_config(), step=41, num_records=100)
    check_resume(workdir, c2i_config(), step=40, num_records=100)
    record = json.loads((tmp_path / CHANGES_FILE).read_text())
    assert record["discarded"] == "no step trained with it was kept: the run resumed at step 40"
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["train.lr"] == 0.0001
    check_resume(workdir, c2i_config(), step=80, num_records=100)  # and on, unchanged
    check_resume(workdir, changed, step=80, num_records=100)  # the change again, this time kept (step 81 on)
    assert [c.get("discarded") is None for c in map(json.loads, open(tmp_path / CHANGES_FILE))] == [False, True]

    with pytest.raises(ValueError, match=r"data.num_records: 100 -> 99\).*settings.json \(and the data's files as "
                                         r"they were\), or pass"):  # an image deleted: another data order
        check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16}), step=81, num_records=99)
    with pytest.raises(ValueError, match="model.dtype: 'float32' -> 'bfloat16'"):  # other arithmetic every step
        check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16, "model.dtype": "bfloat16"}),
                     step=81, num_records=100)
    with pytest.raises(ValueError, match="data.demo_num_classes: 10 -> 12"):  # every demo image drawn anew
        check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16, "data.demo_num_classes": 12}),
                     step=81, num_records=100)

    from pixelflow_jax.training.resume_settings import check_optimiser_state

    # The refusal says "rerun with the values in train_settings.json": edited by hand and broken, it
    # gave a JSONDecodeError traceback, or (holding a list) a TypeError without an error line.
    recorded = (tmp_path / SETTINGS_FILE).read_text()
    for content in ('{"seed": 0, "trunc', "[]"):
        (tmp_path / SETTINGS_FILE).write_text(content)
        for call in (lambda: check_optimiser_state(workdir, c2i_config(), 40),
                     lambda: check_resume(workdir, c2i_config(), step=40, num_records=100)):
            with pytest.raises(ValueError, match=rf"{SETTINGS_FILE} is damaged \(.+\): it records the settings this "
                                                 r"run trained with.* or delete it to have it recorded again"):
                call()
    (tmp_path / SETTINGS_FILE).write_text(recorded)
    with pytest.raises(ValueError, match="data.random_flip: True -> False"):  # other images every step
        check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16, "data.random_flip": False}),
                     step=81, num_records=100)
    recorded = json.loads((tmp_path / SETTINGS_FILE).read_text())
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({k: v for k, v in recorded.items() if k != "data.random_flip"}))
    check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16}), step=81, num_records=100)
    with pytest.raises(ValueError, match="data.random_flip: True -> False"):  # a run before the setting flipped
        check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.batch_size": 16, "data.random_flip": False}),
                     step=81, num_records=100)

    # One image folder spelled three ways is one folder; an earlier version recorded it as typed.
    folder = c2i_config(**{"data.source": "folder", "data.root": "data/images"})
    settings = tmp_path / "folder" / SETTINGS_FILE
    check_resume(str(tmp_path / "folder"), folder, step=0, num_records=100)
    assert json.loads(settings.read_text())["data.root"] == os.path.realpath("data/images")
    for spelling in ("./data/images/", os.path.abspath("data/images")):
        folder.data.root = spelling
        check_resume(str(tmp_path / "folder"), folder, step=40, num_records=100)
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "data.root": "data/images/"}))
    check_resume(str(tmp_path / "folder"), folder, step=40, num_records=100)
    folder.data.root = "data/other"
    with pytest.raises(ValueError, match=r"data.root: '/.*/data/images' -> '/.*/data/other'"):
        check_resume(str(tmp_path / "folder"), folder, step=40, num_records=100)
    folder.data.update(root="data/images", tfds_name="imagenet_v2", demo_seed=7)  # fields a folder run never reads
    check_resume(str(tmp_path / "folder"), folder, step=40, num_records=100)
    # A symbolic link to the folder is the folder (it was refused as a data change, the listing the same)
    (tmp_path / "images").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "images")
    folder.data.root = str(tmp_path / "images")
    check_resume(str(tmp_path / "linked"), folder, step=0, num_records=100)
    folder.data.root = str(tmp_path / "link")
    check_resume(str(tmp_path / "linked"), folder, step=40, num_records=100)


def test_expand_ratio_is_compared_only_where_the_images_are_resized_by_it(tmp_path):
    """A centre crop (data.center_crop, the demo's) resizes to the resolution itself and never reads
    data.expand_ratio: a resume with another one trains on the same pixels. It was refused as a data
    change; where the random crop reads it, it still is, and so is switching between the two."""
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE, check_resume

    cropped, resized = (str(tmp_path / name) for name in ("cropped", "resized"))
    check_resume(cropped, c2i_config(**{"data.center_crop": True}), step=0, num_records=100)
    check_resume(cropped, c2i_config(**{"data.center_crop": True, "data.expand_ratio": 1.5}), step=40,
                 num_records=100)
    # a run recorded by an earlier version, expand_ratio and all, resumes the same way
    settings = tmp_path / "cropped" / SETTINGS_FILE
    settings.write_text(json.dumps({**json.loads(settings.read_text()), "data.expand_ratio": 1.125}))
    check_resume(cropped, c2i_config(**{"data.center_crop": True, "data.expand_ratio": 2.0}), step=40,
                 num_records=100)
    with pytest.raises(ValueError, match=r"data.center_crop: True -> False"):
        check_resume(cropped, c2i_config(**{"data.expand_ratio": 2.0}), step=40, num_records=100)
    check_resume(resized, c2i_config(), step=0, num_records=100)
    with pytest.raises(ValueError, match=r"data.expand_ratio: 1.125 -> 1.5"):
        check_resume(resized, c2i_config(**{"data.expand_ratio": 1.5}), step=40, num_records=100)


def test_a_resume_behind_several_recorded_changes_compares_with_the_settings_its_step_trained_with(tmp_path):
    """A change recorded at a resume at step S trains steps S+1 on. Resumed before two changes (their
    checkpoints set aside), the run's steps trained with the settings before the first; and a change
    discarded by a resume before it, which then recorded a change of its own, is not undone again."""
    from pixelflow_jax.training.resume_settings import check_resume, read_changes

    def lr(value, allowed=True):
        return c2i_config(**{"train.lr": value, "train.allow_resume_changes": allowed})

    def discarded_at(step):
        return f"no step trained with it was kept: the run resumed at step {step}"

    two = str(tmp_path / "two_changes")
    check_resume(two, lr(1e-4, allowed=False), step=0, num_records=100)
    check_resume(two, lr(1e-3), step=40, num_records=100)  # trains steps 41 on
    check_resume(two, lr(1e-2), step=60, num_records=100)  # trains steps 61 on
    check_resume(two, lr(1e-4, allowed=False), step=40, num_records=100)  # steps 1-40 trained with 1e-4
    assert [c.get("discarded") for c in read_changes(two)] == [discarded_at(40)] * 2

    behind = str(tmp_path / "discarded_behind_a_change")
    check_resume(behind, lr(1e-4, allowed=False), step=0, num_records=100)
    check_resume(behind, lr(1e-3), step=40, num_records=100)
    check_resume(behind, lr(1e-2), step=20, num_records=100)  # 1e-3 trained nothing kept; 1e-2 trains 21 on
    assert [c.get("discarded") for c in read_changes(behind)] == [discarded_at(20), None]
    check_resume(behind, lr(1e-2, allowed=False), step=30, num_records=100)  # steps 21-30 trained with 1e-2


def test_a_damaged_settings_changes_file_is_named_with_its_fix(tmp_path):
    """A line of settings_changes.jsonl that is JSON but no change record (edited by hand, or
    another file's) was a TypeError or KeyError traceback at the resume."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    for line in ("[]", '{"step": "40", "changes": {}}', '{"step": 40}'):
        (tmp_path / CHANGES_FILE).write_text(line + "\n")
        with pytest.raises(ValueError, match=rf"{CHANGES_FILE} is damaged \(ValueError: a line is not a change record "
                                             r".*\): it records the settings changes of this run. Put back its"):
            check_resume(str(tmp_path), c2i_config(), step=40, num_records=100)


def test_a_resume_checked_before_its_restore_writes_nothing_even_for_an_allowed_change(tmp_path):
    """record=False (train() checks before it restores the checkpoint, which may fail) only refuses:
    recording there, the resume's own check after the restore took the change for one recorded by a
    resume that trained nothing, and marked it discarded."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume, read_changes

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    recorded = (tmp_path / SETTINGS_FILE).read_text()
    allowed = c2i_config(**{"train.lr": 1e-3, "train.allow_resume_changes": True})
    check_resume(str(tmp_path), allowed, step=40, num_records=100, record=False)
    assert (tmp_path / SETTINGS_FILE).read_text() == recorded and not (tmp_path / CHANGES_FILE).exists()
    check_resume(str(tmp_path), allowed, step=40, num_records=100)
    assert read_changes(str(tmp_path)) == [{"step": 40, "changes": {"train.lr": {"from": 0.0001, "to": 0.001}}}]


def test_a_run_that_saved_no_step_starts_again_with_other_settings(tmp_path):
    """A run stopped before its first checkpoint (its learning rate mistyped, a schedule to add)
    keeps train_settings.json and no step: rerun with other settings it is a new run, which records
    them; nothing is compared, refused or recorded as a change."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, check_optimiser_state, check_resume, \
        recorded_settings

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    other = c2i_config(**{"train.lr": 1e-3, "train.lr_schedule": "cosine", "train.num_steps": 100})
    check_optimiser_state(str(tmp_path), other, step=0)  # no optimiser state to restore
    check_resume(str(tmp_path), other, step=0, num_records=99)
    recorded = recorded_settings(str(tmp_path))
    assert (recorded["train.lr"], recorded["train.lr_schedule"], recorded["data.num_records"]) == (1e-3, "cosine", 99)
    assert not (tmp_path / CHANGES_FILE).exists()


# What README's "Resuming with other settings" says a run records and a resume may not change.
EVERY_RUN = ("seed", "train.batch_size", "train.lr", "train.lr_schedule", "train.warmup_steps", "train.weight_decay",
             "train.grad_clip", "train.ema_decay", "train.grad_accum_steps", "model.dtype", "data.source",
             "data.center_crop", "data.random_flip", "data.expand_ratio")
TEXT_RUN = ("train.caption_dropout", "train.max_text_tokens", "train.text_encoder_dtype")
DEMO = ("data.demo_num_images", "data.demo_seed", "data.demo_num_classes")


@pytest.mark.parametrize("make,data,fields", [
    (c2i_config, {}, ("train.label_dropout", *DEMO)),
    (c2i_config, {"data.source": "tfds"}, ("train.label_dropout", "data.tfds_name", "data.split")),
    (c2i_config, {"data.source": "folder", "data.root": "/data/images"}, ("train.label_dropout", "data.root")),
    (t2i_config, {}, (*TEXT_RUN, *DEMO)),
    (t2i_config, {"data.source": "folder", "data.root": "/data/captioned"},
     (*TEXT_RUN, "data.root", "data.missing_captions")),
    (t2i_config, {"data.source": "array_record", "data.root": "/data/shards"}, (*TEXT_RUN, "data.root")),
])
def test_a_resume_is_refused_for_each_setting_that_decides_the_data_order_or_the_optimisation(tmp_path, make, data,
                                                                                              fields):
    """Every recorded field of a class and a text config and of each data source, one at a time (a
    field dropped from the record resumed silently)."""
    from pixelflow_jax.training.resume_settings import check_resume

    config = make(**data)
    check_resume(str(tmp_path), config, step=0, num_records=100)
    for field in (*EVERY_RUN, *fields):
        section, name = field.split(".") if "." in field else (None, field)
        value = (config[section] if section else config)[name]
        other = (not value if isinstance(value, bool) else value * 2 + 1 if isinstance(value, (int, float))
                 else value + "x")
        with pytest.raises(ValueError, match=re.escape(f"{field}: {value!r} -> {other!r}")):
            check_resume(str(tmp_path), make(**{**data, field: other}), step=40, num_records=100)


def test_a_resume_on_other_devices_or_with_another_memory_setting_is_warned_and_recorded(tmp_path, caplog):
    """remat, fsdp, the attention backend and the devices change the order of float operations
    (measured: 125 parameters ~4e-9 apart after remat 'full'): allowed, but no longer bit for bit."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    with pytest.raises(ValueError, match=r"other settings \(train.lr: 0.0001 -> 0.001\); resuming"):
        check_resume(str(tmp_path), c2i_config(**{"model.remat": "full", "train.lr": 1e-3}), step=40, num_records=100)
    assert not (tmp_path / CHANGES_FILE).exists()
    with caplog.at_level(logging.WARNING):
        check_resume(str(tmp_path), c2i_config(**{"model.remat": "full"}), step=40, num_records=100)
    assert "model.remat: 'none' -> 'full'): the steps compute in another order or precision" in caplog.text
    assert json.loads((tmp_path / CHANGES_FILE).read_text()) == {
        "step": 40, "changes": {"model.remat": {"from": "none", "to": "full"}}}
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["model.remat"] == "full"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        check_resume(str(tmp_path), c2i_config(**{"model.remat": "full"}), step=80, num_records=100)
    assert not caplog.text


def test_a_resume_under_another_matmul_precision_is_warned_and_recorded(tmp_path, caplog):
    """JAX_DEFAULT_MATMUL_PRECISION (or jax.default_matmul_precision around train()) decides the
    precision of training's matmuls on GPUs and TPUs (TF32, or one bfloat16 pass, by default): a run
    resumed under another one trained its remaining steps in other arithmetic, and nothing said so."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["run.matmul_precision"] is None
    with caplog.at_level(logging.WARNING), jax.default_matmul_precision("highest"):
        check_resume(str(tmp_path), c2i_config(), step=40, num_records=100)
    assert caplog.messages == [
        f"resuming {tmp_path} at step 40 on other devices or with another memory or precision setting "
        "(run.matmul_precision: None -> 'highest'): the steps compute in another order or precision, so the run "
        f"agrees with an uninterrupted one to float rounding, not bit for bit (recorded in {CHANGES_FILE})"]
    assert json.loads((tmp_path / CHANGES_FILE).read_text()) == {
        "step": 40, "changes": {"run.matmul_precision": {"from": None, "to": "highest"}}}


def test_a_precision_change_beside_an_allowed_change_is_warned_of_alone_as_numerics(tmp_path, caplog):
    """The numerics warning names the changes that only round otherwise: an allowed learning-rate
    change beside it is the other warning's, not one that agrees 'to float rounding'."""
    from pixelflow_jax.training.resume_settings import check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    changed = c2i_config(**{"train.lr": 1e-3, "train.allow_resume_changes": True})
    with caplog.at_level(logging.WARNING), jax.default_matmul_precision("highest"):
        check_resume(str(tmp_path), changed, step=40, num_records=100)
    [allowed, numerics] = caplog.messages
    assert "train.lr: 0.0001 -> 0.001" in allowed and "run.matmul_precision" not in allowed
    assert "(run.matmul_precision: None -> 'highest'): the steps" in numerics and "train.lr" not in numerics


def test_a_matmul_precision_under_its_other_name_is_no_change_at_a_resume(tmp_path, caplog):
    """jax takes 'float32' for 'highest' (and 'tensorfloat32' for 'high', 'bfloat16' for 'default'):
    a run started under one and resumed under the other was warned of another precision, and the
    same arithmetic recorded as a numerics change."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    with jax.default_matmul_precision("float32"):
        check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["run.matmul_precision"] == "highest"
    record = json.loads((tmp_path / SETTINGS_FILE).read_text())
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({**record, "run.matmul_precision": "tensorfloat32"}))  # 12-04's
    with caplog.at_level(logging.WARNING), jax.default_matmul_precision("high"):
        check_resume(str(tmp_path), c2i_config(), step=40, num_records=100)
    assert not caplog.text and not (tmp_path / CHANGES_FILE).exists()


def test_a_run_started_without_a_matmul_precision_resumes_under_its_default_name_without_a_change(tmp_path, caplog):
    """Unset, jax compiles its matmuls at XLA's DEFAULT precision, the one 'bfloat16' and 'default'
    name: a resume under JAX_DEFAULT_MATMUL_PRECISION=bfloat16 was warned of another precision."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    with caplog.at_level(logging.WARNING), jax.default_matmul_precision("bfloat16"):
        check_resume(str(tmp_path), c2i_config(), step=40, num_records=100)
    assert not caplog.text and not (tmp_path / CHANGES_FILE).exists(), caplog.text


def test_a_run_recorded_before_the_matmul_precision_resumes_under_any_without_a_change(tmp_path, caplog):
    """Runs recorded before 2026-12-04 have no run.matmul_precision: what they trained under is not
    known, so a resume under any precision is no change (and the record gains it)."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    record = json.loads((tmp_path / SETTINGS_FILE).read_text())
    del record["run.matmul_precision"]
    (tmp_path / SETTINGS_FILE).write_text(json.dumps(record))
    with caplog.at_level(logging.WARNING), jax.default_matmul_precision("highest"):
        check_resume(str(tmp_path), c2i_config(), step=40, num_records=100)
    assert not caplog.text and not (tmp_path / CHANGES_FILE).exists()


def test_attention_auto_and_the_kernel_it_picks_are_one_setting_at_a_resume(tmp_path, caplog):
    """'auto' is XLA on a CPU: a resume with --config.model.attention=xla was warned that it agrees
    with an uninterrupted run to float rounding only, though the losses were equal to every digit.
    The kernel that ran is recorded; a record of 'auto' (runs before 2026-12-01) compares as its pick."""
    from pixelflow_jax.kernels.attention import interpret_kernels
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE, check_resume

    check_resume(str(tmp_path), c2i_config(**{"model.attention": "auto"}), step=0, num_records=100)
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["model.attention"] == "xla"
    record = json.loads((tmp_path / SETTINGS_FILE).read_text())
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({**record, "model.attention": "auto"}))  # an earlier run's
    with caplog.at_level(logging.WARNING):
        check_resume(str(tmp_path), c2i_config(**{"model.attention": "xla"}), step=40, num_records=100)
        check_resume(str(tmp_path), c2i_config(**{"model.attention": "auto"}), step=40, num_records=100)
    assert not caplog.text
    with caplog.at_level(logging.WARNING), interpret_kernels():  # another kernel is a change
        check_resume(str(tmp_path), c2i_config(**{"model.attention": "pallas_gpu"}), step=40, num_records=100)
    assert "model.attention: 'xla' -> 'pallas_gpu'): the steps compute in another order or precision" in caplog.text


def test_a_data_folder_whose_files_were_renamed_or_moved_between_classes_does_not_resume(tmp_path):
    """Only the record count was compared: a file renamed (another place in the shuffle) or moved
    to another class (another label) resumed silently."""
    from PIL import Image

    from pixelflow_jax.data.sources import ImageFolderSource
    from pixelflow_jax.training.resume_settings import check_resume

    root = tmp_path / "images"
    for name in ("cat/a.png", "cat/b.png", "dog/c.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)
    listing = ImageFolderSource(str(root)).listing
    shutil.copytree(root, tmp_path / "moved")
    assert ImageFolderSource(str(tmp_path / "moved")).listing == listing  # the same files elsewhere
    config = c2i_config(**{"data.source": "folder", "data.root": str(root)})
    workdir = str(tmp_path / "run")
    check_resume(workdir, config, step=0, num_records=3, listing=listing)
    check_resume(workdir, config, step=40, num_records=3, listing=ImageFolderSource(str(root)).listing)
    for before, after in (("cat/a.png", "cat/z.png"), ("cat/z.png", "dog/z.png")):
        os.rename(root / before, root / after)
        with pytest.raises(ValueError, match=r"data.listing \(a hash of the data's file names, and classes where it "
                                             r"has them: files added, removed or renamed, or moved to another "
                                             r"class\): '[0-9a-f]{16}' -> "):
            check_resume(workdir, config, step=40, num_records=3, listing=ImageFolderSource(str(root)).listing)
    check_resume(workdir, config, step=40, num_records=3)  # a source without files (tfds, demo): nothing to compare


def test_the_same_files_at_another_path_resume_with_a_warning_and_a_record(tmp_path, caplog):
    """A cluster job that copies its data to the node's local disk (/scratch/$JOB/images) gives
    every resume another data.root: each was refused as a data change, though the listing, which
    decides the order and the labels, was the same: each job needed allow_resume_changes, which
    would let any other change of that command through as well."""
    from PIL import Image

    from pixelflow_jax.data.sources import ImageFolderSource
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    root = tmp_path / "images"
    for name in ("cat/a.png", "dog/b.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name)
    copy = tmp_path / "scratch" / "job2" / "images"
    shutil.copytree(root, copy)
    workdir = str(tmp_path / "run")
    folder = lambda path: c2i_config(**{"data.source": "folder", "data.root": str(path)})
    check_resume(workdir, folder(root), step=0, num_records=2, listing=ImageFolderSource(str(root)).listing)
    with caplog.at_level(logging.WARNING):
        check_resume(workdir, folder(copy), step=40, num_records=2, listing=ImageFolderSource(str(copy)).listing)
    assert (f"resuming {workdir} at step 40 with its data at another path (data.root: {str(root)!r} -> {str(copy)!r}): "
            "the same file names, in the same classes, so the same data order and labels; the files' contents are "
            f"not compared (a resized copy lists the same names) (recorded in {CHANGES_FILE})") in caplog.text
    assert json.loads((tmp_path / "run" / CHANGES_FILE).read_text())["changes"] == {
        "data.root": {"from": str(root), "to": str(copy)}}
    assert json.loads((tmp_path / "run" / SETTINGS_FILE).read_text())["data.root"] == str(copy)
    os.rename(copy / "cat" / "a.png", copy / "cat" / "z.png")  # other files there: refused, naming both
    with pytest.raises(ValueError, match=r"class\): '[0-9a-f]{16}' -> '[0-9a-f]{16}', " + re.escape(
            f"data.root: {str(copy)!r} -> {str(root)!r}); resuming")):
        check_resume(workdir, folder(root), step=80, num_records=2, listing=ImageFolderSource(str(copy)).listing)


def test_a_moved_root_resumes_only_with_the_same_record_count_and_a_change_at_the_same_root_names_no_move(tmp_path,
                                                                                                       caplog):
    """The listing names the files; records inside them (array_record shards rewritten under the
    same names) are counted apart: another count at another root is a data change. A resume at the
    same root with another change names no move (and does not look one up)."""
    from pixelflow_jax.training.resume_settings import check_resume

    workdir, listing = str(tmp_path / "run"), "0123456789abcdef"
    folder = lambda root, **more: c2i_config(**{"data.source": "folder", "data.root": root, **more})
    check_resume(workdir, folder("/data/shards"), step=0, num_records=2, listing=listing)
    with pytest.raises(ValueError, match=r"data\.num_records: 2 -> 3, data\.root: '/data/shards' -> '/scratch/shards'"):
        check_resume(workdir, folder("/scratch/shards"), step=40, num_records=3, listing=listing)
    with caplog.at_level(logging.WARNING):
        check_resume(workdir, folder("/data/shards", **{"seed": 1, "train.allow_resume_changes": True}), step=40,
                     num_records=2, listing=listing)
    assert "changed settings (allowed): seed" in caplog.text and "another path" not in caplog.text, caplog.text


def test_a_run_records_its_datas_class_count_and_a_resume_on_another_count_is_refused_unless_allowed(tmp_path):
    """Sampling a run cycles its default labels over the classes its data held (a fine-tune of 1000
    classes on a 10-class TFDS dataset trains ids 0-9): the count is recorded, and a resume on
    labels of another count is a data change. A run recorded before the count was resumes."""
    from configs import t2i
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    config, workdir = c2i_config(**{"model.num_classes": 1000}), tmp_path / "run"
    check_resume(str(workdir), config, step=0, num_records=100, num_classes=10)
    recorded = lambda: json.loads((workdir / SETTINGS_FILE).read_text()).get("data.num_classes")
    assert recorded() == 10
    check_resume(str(workdir), config, step=40, num_records=100, num_classes=10)
    with pytest.raises(ValueError, match=r"data.num_classes \(the class count of the data's labels: ids 0 to N - 1 "
                                         r"train\): 10 -> 12\); resuming"):
        check_resume(str(workdir), config, step=40, num_records=100, num_classes=12)
    config.train.allow_resume_changes = True
    check_resume(str(workdir), config, step=40, num_records=100, num_classes=12)
    assert recorded() == 12
    assert json.loads((workdir / CHANGES_FILE).read_text())["changes"] == {"data.num_classes": {"from": 10, "to": 12}}

    older = tmp_path / "older"  # recorded by an earlier version: no count, and none added at a resume
    check_resume(str(older), c2i_config(), step=0, num_records=100)
    check_resume(str(older), c2i_config(), step=40, num_records=100, num_classes=10)
    assert "data.num_classes" not in json.loads((older / SETTINGS_FILE).read_text())
    text = tmp_path / "text"  # the captioned demo set's count is its colours: no class a text model learns
    check_resume(str(text), t2i.get_config("tiny"), step=0, num_records=100, num_classes=10)
    assert "data.num_classes" not in json.loads((text / SETTINGS_FILE).read_text())


def test_a_cosine_run_resumes_only_with_its_end_and_older_runs_resume_as_constant(tmp_path):
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE, check_optimiser_state, check_resume

    cosine = c2i_config(**{"train.lr_schedule": "cosine", "train.num_steps": 100})
    check_resume(str(tmp_path / "cosine"), cosine, step=0, num_records=100)
    # the rate would jump
    with pytest.raises(ValueError, match=r"train.num_steps \(where the learning-rate schedule ends\): 100 -> 200"):
        check_resume(str(tmp_path / "cosine"), c2i_config(**{"train.lr_schedule": "cosine", "train.num_steps": 200}),
                     step=40, num_records=100)
    older = tmp_path / "older"  # recorded before schedules existed: it resumes with the release's constant rate
    check_resume(str(older), c2i_config(), step=0, num_records=100)
    settings = json.loads((older / SETTINGS_FILE).read_text())
    (older / SETTINGS_FILE).write_text(json.dumps({k: v for k, v in settings.items()
                                                   if k not in ("train.lr_schedule", "train.warmup_steps",
                                                                "data.num_records", "model.dtype")}))
    check_resume(str(older), c2i_config(), step=40, num_records=100)
    with pytest.raises(ValueError, match="train.lr_schedule: 'constant' -> 'cosine'"):
        check_resume(str(older), cosine, step=40, num_records=100)
    allowed = c2i_config(**{"train.warmup_steps": 10, "train.allow_resume_changes": True})
    with pytest.raises(ValueError, match="warmup_steps 0, this config asks for 'constant' and 10: .*keeps a step "
                                         "count in its optimiser state .*init_from"):
        check_optimiser_state(str(older), allowed, step=40)  # the optimiser states differ: no flag can allow it
    check_optimiser_state(str(older), c2i_config(**{"train.lr": 1.0}), step=40)


def test_a_step_folder_renamed_by_hand_is_refused_at_the_resume_not_trained_on_from_its_name(tmp_path):
    """checkpoints/4 renamed 40 resumed at step 40: the data taken up at batch 40, the noise keys at
    the state's step 4, and metrics.jsonl went from step 4 to 41."""
    from pixelflow_jax.training import checkpointing

    state = {"step": jnp.array(4, jnp.int32), "w": jnp.arange(2.0)}
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=5)
    checkpointing.save(manager, 4, state)
    manager.wait_until_finished()
    assert checkpointing.resume_point(manager, state, shardings)[0] == 4
    os.rename(tmp_path / "checkpoints" / "4", tmp_path / "checkpoints" / "40")
    manager.reload()
    with pytest.raises(CheckpointError, match=r"checkpoints/40 holds the train state of step 4, not 40 \(its folder "
                                              r"renamed by hand, or copied in from another run\?\): name it 4 again"):
        checkpointing.resume_point(manager, state, shardings)
    assert os.listdir(tmp_path / "checkpoints") == ["40"]  # nothing set aside: the weights are whole
    os.rename(tmp_path / "checkpoints" / "40", tmp_path / "checkpoints" / "2")  # a lower step than it counts
    manager.reload()
    with pytest.raises(CheckpointError, match=r"checkpoints/2 holds the train state of step 4, not 2 "):
        checkpointing.resume_point(manager, state, shardings)
    manager.close()


def test_a_resume_whose_steps_vanish_before_the_restore_is_named(tmp_path):
    """A resume builds only the state's shapes (the restore fills them): were the steps it found
    gone by the restore, those shapes must not go on as a train state."""
    from pixelflow_jax.training import checkpointing

    manager = checkpointing.checkpoint_manager(str(tmp_path), 3)
    shapes = {"w": jax.ShapeDtypeStruct((2,), jnp.float32)}
    with pytest.raises(CheckpointError, match="lists no step now, though the run found one as it started"):
        checkpointing.resume_point(manager, shapes, {"w": None})
    assert checkpointing.resume_point(manager, {"w": jnp.zeros(2)}, {"w": None})[0] == 0  # a new run's state
    manager.close()


def test_a_grad_accum_steps_change_says_what_it_changes_and_how_to_keep_the_run(tmp_path):
    """grad_accum_steps splits each step's batch into micro-batches: the refusal said only
    'train.grad_accum_steps: 1 -> 2' and 'a batch size, seed or data change also loses exact resume',
    none of which says why a memory setting is refused (each micro-batch draws its own noise,
    timesteps, stages and dropout from its own key: other numbers every step, not float rounding)."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, check_resume

    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    with pytest.raises(ValueError) as error:
        check_resume(str(tmp_path), c2i_config(**{"train.grad_accum_steps": 2}), step=40, num_records=100)
    message = str(error.value)
    assert "\n" not in message
    assert ("train.grad_accum_steps: 1 -> 2 (each step averages the same images, in the same data order, but draws "
            "its noise, timesteps, stages and dropout per micro-batch, each from its own key: every remaining step "
            "trains on other draws than the run would; for exact resume keep --config.train.grad_accum_steps=1, and "
            "save memory with model.remat or mesh.fsdp, which change float rounding only)") in message
    assert "--config.train.allow_resume_changes=True" in message
    # Accepted as any setting is, where the command allows it (README), and recorded.
    check_resume(str(tmp_path), c2i_config(**{"train.grad_accum_steps": 2, "train.allow_resume_changes": True}),
                 step=40, num_records=100)
    with open(tmp_path / CHANGES_FILE) as f:
        assert json.loads(f.read())["changes"] == {"train.grad_accum_steps": {"from": 1, "to": 2}}


def test_a_warmup_change_is_allowed_where_both_warmups_ended_before_the_resumed_update(tmp_path, caplog):
    """A constant rate past its warmup is train.lr whatever the warmup was: a resume with another
    warmup_steps, both ended, changes no remaining step's rate, and was refused as a change. A cosine
    schedule starts its decay where the warmup ends, so there every remaining rate moves; and an
    update count behind the step (skipped non-finite steps apply no update) can still be in a warmup."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    warmup = lambda steps, **more: c2i_config(**{"train.warmup_steps": steps, **more})
    check_resume(str(tmp_path), warmup(10), step=0, num_records=100)
    for refused_step, new in ((15, 20), (5, 8), (9, 5)):  # the new or the old warmup not yet over
        with pytest.raises(ValueError, match=fr"train.warmup_steps: 10 -> {new} \(the learning rate of the remaining"):
            check_resume(str(tmp_path), warmup(new), step=refused_step, num_records=100)
    with pytest.raises(ValueError, match=r"train.warmup_steps: 10 -> 20"):  # 2 skipped steps: update 18 is next
        check_resume(str(tmp_path), warmup(20), step=20, num_records=100, updates_done=18)
    with caplog.at_level(logging.WARNING):
        check_resume(str(tmp_path), warmup(20), step=20, num_records=100)
    assert ("train.warmup_steps: 10 -> 20: both warmups end by update 20, where this resume goes on, so no remaining "
            "step's learning rate changes (recorded in settings_changes.jsonl)") in caplog.text
    assert json.loads((tmp_path / CHANGES_FILE).read_text()) == {
        "step": 20, "changes": {"train.warmup_steps": {"from": 10, "to": 20}}}
    assert json.loads((tmp_path / SETTINGS_FILE).read_text())["train.warmup_steps"] == 20

    cosine = lambda steps: warmup(steps, **{"train.lr_schedule": "cosine", "train.num_steps": 100})
    check_resume(str(tmp_path / "cosine"), cosine(10), step=0, num_records=100)
    with pytest.raises(ValueError, match=r"train.warmup_steps: 10 -> 20 \(the learning rate of the remaining"):
        check_resume(str(tmp_path / "cosine"), cosine(20), step=50, num_records=100)


def test_an_ended_warmup_allows_only_itself_and_says_so_only_where_it_ended(tmp_path, caplog):
    """Both warmups over lets the warmup change alone: a seed changed with it is still refused, and
    named without the warmup. Accepted with allow_resume_changes, a warmup not yet over is an ordinary
    change, with no line that its rate is kept. The update count is the one the restore gives, even 0
    (every step skipped), and the line names that update, not the step."""
    from pixelflow_jax.training.resume_settings import check_resume

    warmup = lambda steps, **more: c2i_config(**{"train.warmup_steps": steps, **more})
    check_resume(str(tmp_path), warmup(10), step=0, num_records=100)
    with pytest.raises(ValueError, match=r"other settings \(seed: 0 -> 1 \(the data order") as error:
        check_resume(str(tmp_path), warmup(20, seed=1), step=20, num_records=100)
    assert "warmup_steps" not in str(error.value)
    with pytest.raises(ValueError, match=r"train.warmup_steps: 10 -> 20 \(the learning rate"):
        check_resume(str(tmp_path), warmup(20), step=20, num_records=100, updates_done=0)
    check_resume(str(tmp_path / "allowed"), warmup(10), step=0, num_records=100)
    with caplog.at_level(logging.WARNING):
        check_resume(str(tmp_path / "allowed"), warmup(20, **{"train.allow_resume_changes": True}), step=15,
                     num_records=100)
    assert "changed settings (allowed): train.warmup_steps: 10 -> 20" in caplog.text
    assert "both warmups end" not in caplog.text
    with caplog.at_level(logging.WARNING):
        check_resume(str(tmp_path), warmup(20), step=23, num_records=100, updates_done=21)
    assert "train.warmup_steps: 10 -> 20: both warmups end by update 21, where this resume goes on" in caplog.text


@pytest.mark.parametrize("schedules", [("cosine", "constant"), ("constant", "cosine")])
def test_a_warmup_changed_with_the_schedule_is_named_with_it(tmp_path, schedules):
    """A warmup change keeps the rate only where the schedule is constant before and after: changed
    with the schedule, past both warmups, it is refused and named along with the schedule."""
    from pixelflow_jax.training.resume_settings import check_resume

    config = lambda warmup, schedule: c2i_config(**{"train.warmup_steps": warmup, "train.lr_schedule": schedule,
                                                    "train.num_steps": 100})
    check_resume(str(tmp_path), config(10, schedules[0]), step=0, num_records=100)
    with pytest.raises(ValueError) as error:
        check_resume(str(tmp_path), config(20, schedules[1]), step=50, num_records=100)
    assert f"train.lr_schedule: {schedules[0]!r} -> {schedules[1]!r}" in str(error.value)
    assert "train.warmup_steps: 10 -> 20 (the learning rate" in str(error.value)


def test_a_warmup_of_another_type_is_refused_as_a_change_not_compared(tmp_path):
    """The Python API may pass a warmup_steps of any type: past both warmups, "20" is a change refused
    in the usual line, not a TypeError from comparing it with the update count."""
    from pixelflow_jax.training.resume_settings import check_resume

    check_resume(str(tmp_path), c2i_config(**{"train.warmup_steps": 10}), step=0, num_records=100)
    with pytest.raises(ValueError, match=r"train.warmup_steps: 10 -> '20' \(the learning rate"):
        check_resume(str(tmp_path), c2i_config(**{"train.warmup_steps": "20"}), step=50, num_records=100)


def test_a_new_run_leaves_changes_already_discarded_as_they_were_and_says_nothing(tmp_path, caplog):
    """Their reason (why no step they trained was kept) is their history: a later new run in the
    workdir neither rewrites it nor warns of changes it marked already."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, check_resume

    record = {"step": 40, "changes": {"train.lr": {"from": 0.0001, "to": 0.001}},
              "discarded": "no step trained with it was kept: the run resumed at step 40"}
    (tmp_path / CHANGES_FILE).write_text(json.dumps(record) + "\n")
    with caplog.at_level(logging.WARNING):
        check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    assert [json.loads(line) for line in open(tmp_path / CHANGES_FILE)] == [record]
    assert "marked discarded" not in caplog.text
    later = {"step": 60, "changes": {"train.lr": {"from": 0.0001, "to": 0.01}}}  # one the new run discards
    (tmp_path / CHANGES_FILE).write_text(json.dumps(record) + "\n" + json.dumps(later) + "\n")
    check_resume(str(tmp_path), c2i_config(), step=0, num_records=100)
    assert [json.loads(line) for line in open(tmp_path / CHANGES_FILE)] == [
        record, {**later, "discarded": "no step trained with it was kept: a new run started in this workdir"}]


def test_a_refused_resume_leaves_the_changes_it_would_discard_unmarked(tmp_path):
    """A refusal writes nothing: the changes a resume at their step would mark discarded stay as they
    were until a resume goes on."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, SETTINGS_FILE, check_resume

    workdir = str(tmp_path)
    check_resume(workdir, c2i_config(), step=0, num_records=100)
    check_resume(workdir, c2i_config(**{"train.lr": 1e-3, "train.allow_resume_changes": True}), step=40,
                 num_records=100)
    before = [(tmp_path / name).read_text() for name in (CHANGES_FILE, SETTINGS_FILE)]
    with pytest.raises(ValueError, match="train.batch_size: 8 -> 16"):
        check_resume(workdir, c2i_config(**{"train.batch_size": 16}), step=40, num_records=100)
    assert [(tmp_path / name).read_text() for name in (CHANGES_FILE, SETTINGS_FILE)] == before


def test_a_setting_a_discarded_change_added_is_dropped_from_the_record_not_kept_as_null(tmp_path):
    """Turning center_crop off added data.expand_ratio (the random crop reads it); resumed before that
    change trained a step, the run's record is the one before it, without that setting."""
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE, check_resume

    workdir, cropped = str(tmp_path), {"data.center_crop": True}
    check_resume(workdir, c2i_config(**cropped), step=0, num_records=100)
    check_resume(workdir, c2i_config(**{"train.allow_resume_changes": True}), step=40, num_records=100)
    assert "data.expand_ratio" in json.loads((tmp_path / SETTINGS_FILE).read_text())
    check_resume(workdir, c2i_config(**cropped), step=40, num_records=100)
    assert "data.expand_ratio" not in json.loads((tmp_path / SETTINGS_FILE).read_text())


def test_a_refused_change_of_the_datas_files_asks_for_them_as_they_were_and_a_scratch_run_records_no_init_read(
        tmp_path):
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE, STARTED_FROM_READ, check_resume

    workdir = str(tmp_path)
    check_resume(workdir, c2i_config(), step=0, num_records=100, listing="a")
    assert not set(STARTED_FROM_READ) & set(json.loads((tmp_path / SETTINGS_FILE).read_text()))
    with pytest.raises(ValueError, match=r"\(and the data's files as they were\)"):
        check_resume(workdir, c2i_config(), step=40, num_records=100, listing="b")


def test_a_change_of_data_source_undone_before_it_trained_a_step_resumes_with_the_first_sources_command(tmp_path):
    """A demo run resumed on a folder (allowed) and stopped before it saved a step: the demo command
    resumed at the same step was refused as 'data.demo_num_images: None -> 20000' (the folder's record
    dropped the demo's fields, and undoing the change could not give them back)."""
    from pixelflow_jax.training.resume_settings import CHANGES_FILE, check_resume

    workdir, folder = str(tmp_path / "run"), {"data.source": "folder", "data.root": str(tmp_path / "images")}
    check_resume(workdir, c2i_config(), step=0, num_records=100)
    check_resume(workdir, c2i_config(**folder, **{"train.allow_resume_changes": True}), step=40, num_records=100)
    check_resume(workdir, c2i_config(), step=40, num_records=100)
    [record] = map(json.loads, open(tmp_path / "run" / CHANGES_FILE))
    assert set(record["changes"]) == {"data.source", "data.root"} and record["discarded"]
