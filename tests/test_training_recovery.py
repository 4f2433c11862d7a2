"""A training run survives what goes wrong around it: damaged metrics lines and checkpoints, bad
steps, stops at a step or a preview, and what killed runs left behind."""

import json
import logging
import os
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelflow_jax import CheckpointError, storage
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.training.run_config import check_run_config
from conftest import c2i_config
from test_storage import tensorboard_events


def test_a_half_written_metrics_line_is_dropped_with_a_warning(tmp_path, caplog):
    from pixelflow_jax.training.train import MetricsLog

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n\n{"step": null}\n[2]\n{"step": 2, "loss": 0.4}\n'
                    '{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    with caplog.at_level(logging.WARNING):
        log = MetricsLog(str(tmp_path), resumed_step=2)
        log.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]
    assert caplog.text.count("metrics.jsonl: dropping an unreadable line") == 3  # not for the blank line


def test_a_resumes_metrics_rewrite_stopped_by_the_file_size_limit_is_told_to_raise_it(tmp_path):
    """A resume rewrites metrics.jsonl without the lines past its checkpoint; under a file size limit
    (`ulimit -f`) below the file's size the run was told to "make the workdir writable (or free space)",
    which would not have helped."""
    from conftest import error_under_a_file_size_limit

    path = tmp_path / "metrics.jsonl"
    logged = "".join(json.dumps({"step": step, "loss": 0.5, "note": "x" * 100}) + "\n" for step in range(1, 30))
    path.write_text(logged)
    said = error_under_a_file_size_limit("from pixelflow_jax.training.metrics_log import MetricsLog\n"
                                         f"MetricsLog({str(tmp_path)!r}, resumed_step=20)", 1000)
    assert said.endswith(f"cannot write {path} (OSError: [Errno 27] File too large); raise the file size limit in the "
                         "job's shell, `ulimit -f unlimited` (up to what `ulimit -Hf` allows), or ask the machine's "
                         "administrators, and rerun the same command: it resumes from its latest checkpoint"), said
    assert path.read_text() == logged  # a rewrite whole or none


def test_only_process_0_logs(tmp_path, monkeypatch):
    from pixelflow_jax.training.metrics_log import MetricsLog

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    log = MetricsLog(str(tmp_path), resumed_step=0)
    assert log.write({"step": 1, "loss": 0.5, "grad_norm": 1.0, "images_per_s": 2.0, "skipped_steps": 0}) == ""
    log.image("preview", np.zeros((8, 8, 3), np.uint8), 1)
    log.add_to_step(1, {"preview_hue_agreement": 0.5})
    log.upload()
    log.close()
    assert os.listdir(tmp_path) == []


def test_the_readable_line_gives_each_stages_loss_and_the_mfu(tmp_path):
    from pixelflow_jax.training.metrics_log import MetricsLog

    log = MetricsLog(str(tmp_path), resumed_step=0)
    line = log.write({"step": 3, "loss": 0.5, "loss_stage0": 0.25, "loss_stage1": 0.75, "grad_norm": 1.0,
                      "images_per_s": 10.0, "skipped_steps": 2, "mfu": 0.125})
    log.close()
    assert line == ("step 3: loss 0.5000 (loss_stage0 0.25 loss_stage1 0.75) grad_norm 1.000 10.0 img/s mfu 12.5% "
                    "non-finite steps skipped 2")


def test_a_warmup_longer_than_the_run_is_named(caplog):
    from pixelflow_jax.model import ModelConfig
    from pixelflow_jax.training import train

    for warmup, warned in ((4, False), (100, True)):
        config = c2i_config(**{"train.warmup_steps": warmup, "train.num_steps": 6, "train.batch_size": 32})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            train.validate(config, ModelConfig.from_mapping(config.model), train.make_mesh(1))
        assert ("train.warmup_steps (100) is not below train.num_steps (6): this run ends before its learning rate "
                "reaches train.lr") in caplog.text if warned else "warmup" not in caplog.text


def test_a_skipped_steps_non_finite_metrics_are_standard_json(tmp_path):
    """grad_norm Infinity was written as `Infinity`, which jq and JavaScript refuse."""
    from pixelflow_jax.training.train import MetricsLog

    log = MetricsLog(str(tmp_path), resumed_step=0)
    line = log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf"), "images_per_s": 2.0,
                      "skipped_steps": 1})
    log.close()
    assert "loss nan" in line and "grad_norm inf" in line  # the readable line keeps them
    strict = json.loads((tmp_path / "metrics.jsonl").read_text(),
                        parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert strict == {"step": 1, "loss": None, "grad_norm": None, "images_per_s": 2.0, "skipped_steps": 1}


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    import jax

    from pixelflow_jax.training import checkpointing

    state = {"w": jax.numpy.arange(4.0)}
    shardings = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=5)
    for step in (2, 4):
        checkpointing.save(manager, step, {"w": state["w"] * step})
    checkpointing.save(manager, 5, {"w": state["w"] * np.nan})  # as damaged bytes can read back: no error, NaN
    manager.wait_until_finished()
    for root, _, files in os.walk(tmp_path / "checkpoints" / "4" / "state"):
        for name in files:
            open(os.path.join(root, name), "wb").close()  # damaged: every file emptied
    with caplog.at_level(logging.WARNING):
        step, restored = checkpointing.resume_point(manager, state, shardings)
    assert step == 2 and np.asarray(restored["w"]).tolist() == [0.0, 2.0, 4.0, 6.0]
    assert "checkpoints/5 cannot be restored (ValueError: it holds non-finite values" in caplog.text
    assert "checkpoints/4 cannot be restored" in caplog.text and "trying the one before it" in caplog.text
    # Set aside, so that saves go on from step 2 (orbax saves only steps after its latest one).
    assert manager.all_steps() == [2] and sorted(p.name.split("-")[0]
                                                 for p in (tmp_path / "unreadable_checkpoints").iterdir()) == ["4", "5"]
    checkpointing.save(manager, 3, restored)
    checkpointing.wait_for_saves(manager)
    assert manager.all_steps() == [2, 3]
    with pytest.raises(CheckpointError, match="orbax did not save step 1 in .* it already holds step 3"):
        checkpointing.save(manager, 1, restored)


def test_resuming_again_in_one_process_compiles_no_finiteness_check():
    """A second train() in one process (a notebook's) compiled the check of the restored state again:
    it was a jit of a lambda made per call."""
    import jax

    from pixelflow_jax.training import checkpointing
    from test_sampling import counting_lowerings

    state = lambda value: {"w": jax.numpy.full((3,), value), "step": jax.numpy.int32(1)}
    assert checkpointing.all_finite(state(1.0))
    with counting_lowerings() as compiled:
        finite, infinite = checkpointing.all_finite(state(2.0)), checkpointing.all_finite(state(np.inf))
    assert compiled == [] and finite and not infinite


@pytest.mark.parametrize("times,names", [((1000, 2000), ["4-1000", "4-2000"]), ((1000, 1000), ["4-1000", "4-1000-2"])])
def test_a_step_set_aside_at_two_resumes_keeps_both_copies_side_by_side(tmp_path, monkeypatch, times, names):
    """A step that does not restore at two resumes (saved again in between, and damaged again) is set
    aside each time under its step and the time: neither copy replaces the other or goes inside it,
    even within one second (the second copy went inside the first)."""
    from types import SimpleNamespace

    from pixelflow_jax.training import checkpointing

    state = {"w": jnp.arange(4.0)}
    shardings = {"w": jax.sharding.SingleDeviceSharding(jax.devices()[0])}
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=5)
    clock = iter(times)  # the resumes' times
    monkeypatch.setattr(checkpointing, "time", SimpleNamespace(time=lambda: next(clock)))
    checkpointing.save(manager, 2, state)
    for _ in range(2):
        checkpointing.save(manager, 4, {"w": state["w"] * np.nan})
        manager.wait_until_finished()
        assert checkpointing.resume_point(manager, state, shardings)[0] == 2
    aside = tmp_path / "unreadable_checkpoints"
    assert sorted(os.listdir(aside)) == names
    step_folder = sorted(os.listdir(tmp_path / "checkpoints" / "2"))  # what each copy holds: a step folder's files
    assert sorted(os.listdir(aside / names[0])) == sorted(os.listdir(aside / names[1])) == step_folder
    manager.close()


def test_a_checkpoint_with_one_non_finite_value_is_skipped_and_one_where_none_restores_is_an_error(tmp_path, caplog):
    """One NaN among finite values (damaged bytes of one chunk) is as unusable as all NaN: resumed,
    the run would train from it. And where no step restores, the run stops naming them, rather than
    start afresh (or fail later with another message) in a workdir that holds its checkpoints."""
    from pixelflow_jax.training import checkpointing

    state = {"w": jnp.arange(4.0), "b": jnp.ones(2)}
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), state)
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=5)
    checkpointing.save(manager, 2, state)
    checkpointing.save(manager, 4, {**state, "w": state["w"].at[1].set(jnp.nan)})
    manager.wait_until_finished()
    with caplog.at_level(logging.WARNING):
        step, restored = checkpointing.resume_point(manager, state, shardings)
    assert step == 2 and "checkpoints/4 cannot be restored (ValueError: it holds non-finite values" in caplog.text
    for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
        for name in files:
            open(os.path.join(root, name), "wb").close()  # damaged: every file emptied
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints can be restored \(steps \[2\]\)"):
        checkpointing.resume_point(manager, state, shardings)
    assert manager.all_steps() == [2]  # nothing set aside: the user decides
    manager.close()


def test_a_run_already_trained_to_num_steps_says_so(tmp_path, capsys, monkeypatch):
    import jax

    from pixelflow_jax.training import checkpointing, train

    config = c2i_config()
    config.train.update(num_steps=4, batch_size=32)  # 4 stages x the 8 test devices
    check_run_config(str(tmp_path), ModelConfig.from_mapping(config.model), config)
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=2)
    checkpointing.save(manager, 4, {"w": jax.numpy.zeros(2)})
    manager.wait_until_finished()
    dead, here = 999999999, socket.gethostname()  # what killed writers of the run left: removed once it is ours
    (tmp_path / "previews").mkdir()
    left = [tmp_path / f".run_config.json.tmp-{here}-{dead}-a",
            tmp_path / "previews" / f".step_0000002.png.tmp-{here}-{dead}-b"]
    live = tmp_path / f".metrics.jsonl.tmp-{here}-{os.getpid()}-c"  # a live writer's (this process): kept
    for path in left + [live]:
        path.write_bytes(b"")
    killed_save = tmp_path / "checkpoints" / "6.orbax-checkpoint-tmp-1732" / "state"  # renamed to 6 when done
    killed_save.mkdir(parents=True)
    (killed_save / "data").write_bytes(b"partial")
    assert train.train(config, str(tmp_path)) == {}
    assert "already trained to step 4 (train.num_steps = 4): nothing to do" in capsys.readouterr().out
    assert not any(path.exists() for path in left) and live.exists()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["4"]
    monkeypatch.setattr("sys.stdout", open("/dev/full", "w", buffering=1))  # a log on a full disk: the line is lost
    assert train.train(config, str(tmp_path)) == {}


def test_a_cosine_run_trained_to_num_steps_says_raising_them_changes_its_rate(tmp_path, capsys):
    """A cosine rate ends at num_steps: the run trained to them was told to raise num_steps, and the
    rerun that did was then refused as a change of schedule."""
    import jax

    from pixelflow_jax.training import checkpointing, train

    config = c2i_config(**{"train.lr_schedule": "cosine"})
    config.train.update(num_steps=4, batch_size=32)  # 4 stages x the 8 test devices
    check_run_config(str(tmp_path), ModelConfig.from_mapping(config.model), config)
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=2)
    checkpointing.save(manager, 4, {"w": jax.numpy.zeros(2)})
    manager.wait_until_finished()
    assert train.train(config, str(tmp_path)) == {}
    assert ("already trained to step 4 (train.num_steps = 4): nothing to do; raise --config.train.num_steps to "
            "train further: its cosine learning rate ends at num_steps, so a resume with more needs "
            "--config.train.allow_resume_changes=True (the rate then rises again, to what the longer schedule gives "
            f"at step 4), or fine-tune it in a new --workdir with --config.train.init_from={tmp_path}"
            ) in capsys.readouterr().out


def test_a_resume_with_changed_settings_is_refused_before_the_checkpoint_is_restored(tmp_path):
    """The stand-in checkpoint below cannot restore into a train state: only a check made before
    the restore gives the settings error."""
    import jax

    from pixelflow_jax.training import checkpointing, train
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE

    config = c2i_config()
    config.train.update(num_steps=4, batch_size=32)
    check_run_config(str(tmp_path), ModelConfig.from_mapping(config.model), config)
    manager = checkpointing.checkpoint_manager(str(tmp_path), keep=2)
    checkpointing.save(manager, 2, {"w": jax.numpy.zeros(2)})
    manager.wait_until_finished()
    (tmp_path / SETTINGS_FILE).write_text(json.dumps({"train.lr": 0.5}))
    with pytest.raises(ValueError, match=r"trained to step 2 with other settings \(.*train.lr: 0.5 -> 0.0001"):
        train.train(config, str(tmp_path))


@pytest.mark.slow
def test_a_run_stops_after_max_bad_steps_without_logging_or_saving_a_step_past_them(tmp_path, monkeypatch):
    """lr 1e30 makes every update overflow, so every step is skipped. The loop reads a step's
    non-finite count after queueing the next step, except on steps it logs or saves."""
    from pixelflow_jax.training import train

    dispatched = []
    make_train_step = train.make_train_step

    def counted(*args, **kwargs):
        step = make_train_step(*args, **kwargs)
        return lambda *inputs: dispatched.append(1) or step(*inputs)

    monkeypatch.setattr(train, "make_train_step", counted)

    def stopped_run(workdir, max_bad_steps):
        dispatched.clear()
        config = c2i_config()
        config.train.update(num_steps=8, batch_size=32, lr=1e30, max_bad_steps=max_bad_steps, log_every=2,
                            checkpoint_every=2, preview_every=0)
        with pytest.raises(train.TrainingStopped) as stop:
            train.train(config, str(workdir))
        log = workdir / "metrics.jsonl"
        logged = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        return (str(stop.value), train.complete_steps(str(workdir)), [(r["step"], r["skipped_steps"]) for r in logged],
                len(dispatched))

    # Step 3 is read while step 4 is queued, before step 4's save: step 2 (the initial weights) stays.
    assert stopped_run(tmp_path / "three", 3) == (
        "3 non-finite steps in a row (train.max_bad_steps); stopped at step 3 without saving: the last good "
        "checkpoint is step 2", [2], [(2, 2)], 4)
    # Step 2 is due to be logged and saved: it is read first, and nothing of it is written.
    assert stopped_run(tmp_path / "two", 2) == (
        "2 non-finite steps in a row (train.max_bad_steps); stopped at step 2 without saving: no checkpoint of "
        "this run was saved", [], [], 2)


def test_what_killed_runs_left_is_cleaned_up_on_the_next_run(tmp_path):
    from pixelflow_jax.checkpoints.checkpoint import atomic_output_dir
    from pixelflow_jax.demo_app import demo_output_dir

    dead = 999999999  # no such process
    (tmp_path / f".out.tmp-{dead}-abc").mkdir()
    (tmp_path / f".out.old-{dead}-def" / "previous").mkdir(parents=True)  # killed mid-swap: the only copy
    (tmp_path / f".out.old-{dead}-def" / "previous" / "model.pt").write_bytes(b"old")
    with pytest.raises(CheckpointError, match="already exists"):  # the old output is put back, not replaced
        with atomic_output_dir(str(tmp_path / "out")):
            pass
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "model.pt").read_bytes() == b"old"

    # Killed after the swap, before the old copy was removed: the output in place is the newer one.
    (tmp_path / f".out.old-{dead}-ghi" / "previous").mkdir(parents=True)
    (tmp_path / f".out.old-{dead}-ghi" / "previous" / "model.pt").write_bytes(b"older")
    with pytest.raises(CheckpointError, match="already exists"):
        with atomic_output_dir(str(tmp_path / "out")):
            pass
    assert sorted(os.listdir(tmp_path)) == ["out"] and (tmp_path / "out" / "model.pt").read_bytes() == b"old"

    # On a disk shared by hosts: another host's writer may be alive, so its temporary is kept for a day.
    (tmp_path / ".out.tmp-other-host.example-7-abc").mkdir()
    with atomic_output_dir(str(tmp_path / "out"), overwrite=True):
        pass
    assert sorted(os.listdir(tmp_path)) == [".out.tmp-other-host.example-7-abc", "out"]

    (tmp_path / "samples").mkdir()
    here, day_old = socket.gethostname(), time.time() - 25 * 3600
    ours = [f".000001.png.tmp-{dead}-x", "000002.png.tmp", "samples.npz.tmp.npz", f".000005.png.tmp-{here}-{dead}-z",
            f".000009.png.tmp-{here}-{os.getpid()}-t",  # a predecessor's with this pid (a restarted container)
            ".000006.png.tmp-other-host.example-7-w"]  # the last two a day old
    kept = [f".000003.png.tmp-{os.getpid()}-y", f".000007.png.tmp-{here}-{os.getpid()}-v",  # live writers'
            ".000008.png.tmp-other-host.example-7-u", "000004.png", "cache.tmp.npz", "draft.tmp"]  # a user's
    for name in ours + kept:
        (tmp_path / "samples" / name).write_bytes(b"")
    for name in ours[-2:]:
        os.utime(tmp_path / "samples" / name, (day_old, day_old))
    assert storage.remove_temporaries(str(tmp_path / "samples")) == len(ours)
    assert sorted(os.listdir(tmp_path / "samples")) == sorted(kept)

    outputs = tmp_path / "demo_outputs"  # the user's files, a killed page, a page still serving
    outputs.mkdir()
    (outputs / "keep.png").write_bytes(b"")
    (outputs / "my_favourites").mkdir()
    (outputs / f"page-{here}-{dead}-a" / "request").mkdir(parents=True)
    serving = outputs / f"page-{here}-{os.getppid()}-b"
    serving.mkdir()
    (serving / "0.png").write_bytes(b"")
    mine = demo_output_dir(str(tmp_path))
    assert os.path.dirname(mine) == str(outputs) and os.path.basename(mine).startswith(f"page-{here}-{os.getpid()}-")
    assert sorted(os.listdir(outputs)) == sorted(["keep.png", "my_favourites", serving.name, os.path.basename(mine)])
    assert os.listdir(serving) == ["0.png"]  # a second page on the workdir left the first one's images


@pytest.mark.slow
def test_a_step_is_saved_before_its_preview_and_a_preemption_skips_the_preview(tmp_path, monkeypatch):
    """With the default cadences every preview step is a save step, and the first preview compiles
    the sampler (minutes on XL): saved after it, a preemption's grace period could run out first
    and lose a checkpoint interval."""
    from pixelflow_jax.training import train

    events = []
    save = train.save
    monkeypatch.setattr(train, "save",
                        lambda manager, step, state: events.append(("save", step)) or save(manager, step, state))
    previews_under_a_mesh = []

    def preview(*args, **kwargs):  # under the training mesh (splash attention on a TPU of several chips needs it)
        previews_under_a_mesh.append(not jax.sharding.get_abstract_mesh().empty)
        events.append(("preview", args[5]))
        return {}

    monkeypatch.setattr(train, "write_preview", preview)

    class PreemptedAtStep2:
        cause, interrupted, hung_up = "preempted (SIGTERM)", False, False

        def __init__(self):
            self.step = 0

        def reached(self):  # a new run: its calls are its steps
            self.step += 1
            return self.step == 2 and not signal_during_the_step

        def requested_alone(self):  # a signal that came after reached(2) had answered False
            return self.step == 2 and signal_during_the_step

        def close(self):
            pass

    monkeypatch.setattr(train, "PreemptionWatch", PreemptedAtStep2)
    config = c2i_config()
    config.train.update(num_steps=4, batch_size=32, log_every=1, checkpoint_every=1, preview_every=1)
    for signal_during_the_step in (False, True):
        events.clear()
        workdir = tmp_path / str(signal_during_the_step)
        with pytest.raises(train.TrainingPreempted, match="saved step 2"):
            train.train(config, str(workdir))
        saved = [1, 2] if config.train.checkpoint_every == 1 else [2]
        assert events == [("save", 1), ("preview", 1), ("save", 2)][2 - len(saved):]  # no preview at step 2
        assert train.complete_steps(str(workdir)) == saved
        config.train.checkpoint_every = 3  # the signalled step saves although no save was due
    assert previews_under_a_mesh == [True, True]

    # The skipped preview is drawn by the run that resumes at its step (from the EMA restored, that
    # step's own); a stop during the last step says so and what a rerun still does.
    events.clear()
    with pytest.raises(train.TrainingPreempted, match="saved step 4 on every process; the run's last step; rerun "
                                                      "the same command to draw its preview"):
        train.train(config, str(workdir))  # resumed at 2, signalled during its second step (4)
    assert events == [("preview", 2), ("save", 3), ("preview", 3), ("save", 4)]
    events.clear()
    assert train.train(config, str(workdir)) == {} and events == [("preview", 4)]  # (the stand-in draws no file)


def test_a_stop_at_the_last_step_with_no_preview_owed_says_the_run_is_complete():
    """Preempted at its last step, with its preview drawn (or none due), a run has nothing left: the
    message must not send the user to rerun for a preview; Ctrl-C and SIGTERM keep their exit codes."""
    import types

    from pixelflow_jax.command_line import EXIT_HUNG_UP, EXIT_INTERRUPTED, EXIT_TERMINATED
    from pixelflow_jax.training import train

    for interrupted, hung_up, status in ((False, False, EXIT_TERMINATED), (True, False, EXIT_INTERRUPTED),
                                         (False, True, EXIT_HUNG_UP)):
        stop = train.preempted_at(types.SimpleNamespace(cause="SIGTERM", interrupted=interrupted, hung_up=hung_up),
                                  4, 4, False)
        assert (str(stop), stop.exit_status) == (
            "SIGTERM: saved step 4 on every process; the run's last step: the run is complete", status)


def test_a_preview_drawn_after_a_stop_joins_its_steps_logged_line(tmp_path):
    from pixelflow_jax.training.metrics_log import MetricsLog

    lines = [{"step": 4, "loss": 0.5}, {"step": 5, "loss": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    log = MetricsLog(str(tmp_path), resumed_step=5)
    log.add_to_step(5, {"preview_hue_agreement": 0.75})
    log.add_to_step(6, {"preview_hue_agreement": 1.0})  # a step never logged (killed before): nothing
    log.add_to_step(4, {"preview_lpips": 0.5})  # the line of that step, not of a later one
    log.close()
    assert [json.loads(line) for line in open(tmp_path / "metrics.jsonl")] == [
        {"step": 4, "loss": 0.5, "preview_lpips": 0.5}, {"step": 5, "loss": 0.25, "preview_hue_agreement": 0.75}]
    assert ("preview_hue_agreement", 5, "simple_value") in tensorboard_events(str(tmp_path / "tensorboard"))
