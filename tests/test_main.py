"""main.py itself: --mode=inspect end to end on the tiny config, and how errors are printed (the
training tests run its default mode, train, through main.py)."""

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO, cpu_devices, stop_handlers_kept


def test_inspect_mode_runs_every_stage(tmp_path):
    workdir = tmp_path / "run"
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}",
                             "--mode=inspect", "--config.model.depth=3"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.load(open(os.path.join(workdir, "inspect.json")))
    assert report["model"]["depth"] == 3  # the command-line override reached the model
    assert [s["tokens"] for s in report["stages"]] == [4, 16, 64, 256]
    assert report["parameters"]["total"] == sum(v for k, v in report["parameters"].items() if k != "total")
    history = [json.loads(line) for line in open(os.path.join(workdir, "inspect_history.jsonl"))]
    assert len(history) == 1 and history[0]["stages"] == report["stages"] and "time" in history[0]


def test_a_library_error_gets_its_traceback_and_ours_stay_one_line(capsys):
    import numpy as np
    import pytest

    sys.path.insert(0, REPO)
    import main
    from pixelflow_jax import validation

    try:
        validation.seed("seed", -1, where="")  # raised by this project: its message says what to do
    except validation.ConfigError as error:
        with pytest.raises(SystemExit, match="error: .*seed"):
            main.fail(error)
    assert "Traceback" not in capsys.readouterr().err
    try:
        np.zeros(2).reshape(3)  # raised inside a library: unexpected, its context matters
    except ValueError as error:
        with pytest.raises(SystemExit, match="error: cannot reshape"):
            main.fail(error)
    assert "Traceback" in capsys.readouterr().err
    # jax removes its own frames, so this error's last frame is in the package: its note tells.
    import jax
    import jax.numpy as jnp

    from pixelflow_jax.sampling import cascade

    try:
        cascade.draw_noise_jit(jax.random.key(0), jnp.arange(2), 8, 2, 3, "not a number")
    except TypeError as error:
        with pytest.raises(SystemExit):
            main.fail(error)
    assert "Traceback" in capsys.readouterr().err


def test_a_failed_run_exits_at_once_with_its_error_last(tmp_path):
    """A failed save leaves orbax threads that wait out their own timeouts (5 min) before the
    interpreter may exit, and tensorstore callbacks print tracebacks after the error line. Here a
    thread of that kind is started at interpreter start-up, and the run fails on a checkpoint that
    does not exist."""
    (tmp_path / "sitecustomize.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(600,), daemon=False).start()\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "XLA_FLAGS": cpu_devices(1, one_process=False)}
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'run'}",
                             "--mode=sample", f"--config.sample.checkpoint={tmp_path / 'nowhere'}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.rstrip().splitlines()[-1] == f"error: checkpoint {tmp_path / 'nowhere'} does not exist"


def test_orbax_fsspec_and_httpx_info_lines_are_kept_out_of_the_log_and_their_warnings_are_not():
    import logging

    from pixelflow_jax.command_line import keep_library_info_out_of_the_log, quiet_library_info

    def record(level, path):
        return logging.LogRecord("absl", level, path, 1, "message", None, None)

    orbax = "/usr/lib/python3.11/site-packages/orbax/checkpoint/checkpoint_manager.py"
    assert not quiet_library_info(record(logging.INFO, orbax))
    assert quiet_library_info(record(logging.WARNING, orbax))
    assert quiet_library_info(record(logging.INFO, "/home/me/orbax/pixelflow-jax/pixelflow_jax/training/train.py"))
    root_level = logging.root.level
    logging.root.setLevel(logging.INFO)  # as absl's app.run sets it in main.py (WARNING would pass any library)
    try:
        keep_library_info_out_of_the_log()  # fsspec's read caches: an INFO line per file opened in a bucket;
        # jax: "Unable to initialize backend 'tpu'"; httpx: the demo page's requests to itself as it starts
        for library in ("fsspec.caching", "jax._src.xla_bridge", "httpx"):
            logger = logging.getLogger(library)
            assert not logger.isEnabledFor(logging.INFO) and logger.isEnabledFor(logging.WARNING)
    finally:
        logging.root.setLevel(root_level)


def test_a_run_stopped_without_saving_says_which_step_a_rerun_resumes_from(tmp_path):
    """A second Ctrl-C during a run's first save said "the checkpoints saved before are kept" of a
    run that had none (the rerun started anew)."""
    sys.path.insert(0, REPO)
    import main

    assert main.what_a_rerun_resumes(str(tmp_path)) == ("no step of this run was saved: rerun the same command to "
                                                        "start it again")
    (tmp_path / "checkpoints" / "20.orbax-checkpoint-tmp").mkdir(parents=True)  # the save the Ctrl-C cut short
    assert main.what_a_rerun_resumes(str(tmp_path)).startswith("no step of this run was saved")
    for step in (10, 20):
        (tmp_path / "checkpoints" / str(step)).mkdir()
        (tmp_path / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").write_text("{}")
    assert main.what_a_rerun_resumes(str(tmp_path)).endswith("rerun the same command to resume from step 20")


def test_overrides_a_sampling_job_cannot_honour_are_named():
    from pixelflow_jax.cli.config_overrides import overrides_without_effect

    # model.dtype, param_dtype and attention are how the job runs the checkpoint's model: they count
    argv = ["main.py", "--config=configs/c2i.py:demo", "--config.data.resolution=64", "--config.model.depth=12",
            "--config.model.dtype=float32", "--config.seed=7", "--config.sample.seed=3", "--config.train.num_steps=9",
            "--config.data.root=/images", "--config.model.param_dtype=bfloat16", "--config.model.attention=xla",
            "--config.scheduler.num_stages=3", "--config.data.source=folder"]
    ignored = ["data.resolution", "model.depth", "seed", "scheduler.num_stages"]
    assert overrides_without_effect(argv, "sample") == ignored
    assert overrides_without_effect(argv, "demo") == ignored
    assert overrides_without_effect(argv, "train") == []
    assert overrides_without_effect(argv, "eval") == []
    # inspect's seed draws the inputs it times, of a checkpoint's model too
    assert overrides_without_effect(argv, "inspect", inspects_checkpoint=True) == [f for f in ignored if f != "seed"]
    assert overrides_without_effect(argv, "inspect", inspects_checkpoint=False) == []  # the config's own model


def test_training_overrides_given_to_another_mode_are_named_with_the_setting_that_mode_reads(tmp_path):
    """--mode=sample --config.train.lr=1e-3 ran without a word: a user who meant to change the job
    learned nothing. A notice (not an error: a training command is reused with --mode=sample) names
    train.*, mesh.* and data.* overrides, and the sampling setting where one has the same intent."""
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path}",
                             "--mode=sample", f"--config.sample.checkpoint={tmp_path / 'missing'}",
                             "--config.train.lr=1e-3", "--config.train.init_from_weights=model"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1 and "does not exist" in result.stderr  # the notice comes before any work
    assert ("--config.train.lr, --config.train.init_from_weights: only --mode=train uses them, so --mode=sample "
            "runs as if they were not given (for train.init_from_weights, --mode=sample reads "
            "--config.sample.weights)") in result.stderr, result.stderr
    from pixelflow_jax.cli.config_overrides import BUT_EVAL, overrides_of_other_modes

    argv = ["main.py", "--config=configs/t2i.py:tiny", "--config.train.num_steps=9", "--config.mesh.fsdp=2",
            "--config.data.root=/images", "--config.data.resolution=128", "--config.train.max_text_tokens=32",
            "--config.sample.cfg_scale=3", "--config.model.depth=3", "--config.demo.port=80",
            "--config.eval.batch_size=5"]
    training = ["train.num_steps", "mesh.fsdp", "data.root", "train.max_text_tokens"]
    # data.resolution and model.depth: a sampling job's other warning names them (the checkpoint decides them)
    assert overrides_of_other_modes(argv, "sample") == {("train",): training, ("demo",): ["demo.port"]}
    assert overrides_of_other_modes(argv, "demo") == {("train",): training, ("sample", "eval"): ["eval.batch_size"]}
    assert overrides_of_other_modes(argv, "inspect", inspects_checkpoint=True) == {
        ("train",): training, ("demo",): ["demo.port"], ("sample", "eval"): ["eval.batch_size"]}
    # the config's own model is inspected at its data.resolution and timed at its train.max_text_tokens
    assert overrides_of_other_modes(argv, "inspect")[("train",)] == ["train.num_steps", "mesh.fsdp", "data.root"]
    # an evaluation reads its .npz files alone
    assert overrides_of_other_modes(argv, "eval") == {
        ("train",): ["train.num_steps", "mesh.fsdp", "data.root", "data.resolution", "train.max_text_tokens"],
        BUT_EVAL: ["sample.cfg_scale", "model.depth"], ("demo",): ["demo.port"]}
    assert overrides_of_other_modes(argv, "train") == {("demo",): ["demo.port"], ("sample", "eval"): [
        "eval.batch_size"]}


def test_the_notice_of_overrides_another_mode_reads_names_the_modes_in_words(monkeypatch):
    from pixelflow_jax.cli import config_overrides

    warned = []
    monkeypatch.setattr(config_overrides.logging, "warning", lambda text, *args: warned.append(text % args))
    config_overrides.warn_of_overrides_without_effect(
        ["main.py", "--config.sample.checkpoint=x", "--config.model.depth=3", "--config.eval.batch_size=5"], "eval",
        False, "euler", evaluates=False)
    assert warned == ["--config.sample.checkpoint: only --mode=sample, demo and inspect use it, so --mode=eval runs as "
                      "if it was not given",
                      "--config.model.depth: only --mode=train, sample, demo and inspect use it, so --mode=eval runs "
                      "as if it was not given"]


def test_a_sampling_checkpoint_given_to_training_is_named_with_the_setting_training_starts_from(monkeypatch):
    """--mode=train --config.sample.checkpoint=hf://... trained from scratch without a word: a
    fine-tune is --config.train.init_from. The sampling settings the previews read are no notice."""
    from pixelflow_jax.cli import config_overrides

    warned = []
    monkeypatch.setattr(config_overrides.logging, "warning", lambda text, *args: warned.append(text % args))
    config_overrides.warn_of_overrides_without_effect(
        ["main.py", "--config.sample.checkpoint=hf://me/model", "--config.sample.cfg_scale=4",
         "--config.sample.prompts=('a',)", "--config.sample.weights=model", "--config.sample.seed=3"], "train", False,
        "euler", evaluates=False)
    assert warned == ["--config.sample.checkpoint, --config.sample.weights, --config.sample.seed: only --mode=sample, "
                      "demo and inspect use them, so --mode=train runs as if they were not given (for "
                      "sample.checkpoint, --mode=train reads --config.train.init_from; for sample.weights, "
                      "--mode=train reads --config.train.init_from_weights)"]


def test_euler_step_overrides_given_with_dopri5_are_named(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path}",
                             "--mode=sample", f"--config.sample.checkpoint={tmp_path / 'missing'}",
                             "--config.sample.solver=dopri5", "--config.sample.shift=2"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1 and "does not exist" in result.stderr  # the warning comes before any work
    assert "--config.sample.shift: the dopri5 solver chooses its own steps" in result.stderr, result.stderr
    from pixelflow_jax.cli.config_overrides import overrides_without_effect, step_overrides_dopri5_ignores

    argv = ["main.py", "--config=configs/c2i.py:demo", "--config.sample.solver=dopri5",
            "--config.sample.steps_per_stage=30", "--config.sample.shift=3", "--config.sample.cfg_scale=2"]
    assert step_overrides_dopri5_ignores(argv, "sample", "dopri5") == ["sample.steps_per_stage", "sample.shift"]
    assert step_overrides_dopri5_ignores(argv, "sample", "euler") == []
    assert step_overrides_dopri5_ignores(argv, "train", "dopri5") == []
    # a field given twice (the last value wins) is named once, in the order first given
    argv += ["--config.sample.steps_per_stage=5", "--config.model.depth=2", "--config.model.depth=3"]
    assert step_overrides_dopri5_ignores(argv, "sample", "dopri5") == ["sample.steps_per_stage", "sample.shift"]
    assert overrides_without_effect(argv, "sample") == ["model.depth"]


def test_eval_overrides_a_sampling_job_does_not_read_are_named(tmp_path, monkeypatch):
    """A sampling job given the Inception weights without eval.reference sampled its 50k images and
    ended without an evaluation, without a word; one given eval.samples evaluates its own samples.npz."""
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path}",
                             "--mode=sample", f"--config.sample.checkpoint={tmp_path / 'missing'}",
                             "--config.eval.inception_weights=pt_inception.pth"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1 and "does not exist" in result.stderr  # the warning comes before any work
    assert ("--config.eval.inception_weights: a sampling job ends with an evaluation only where "
            "--config.eval.reference is set, so this one will not evaluate its images; set it too, or evaluate them "
            "later with --mode=eval") in result.stderr, result.stderr
    from pixelflow_jax.cli.config_overrides import eval_overrides_sampling_ignores

    argv = ["main.py", "--config.eval.samples=other.npz", "--config.eval.batch_size=50",
            "--config.eval.reference=ref.npz", "--config.sample.num_images=8"]
    assert eval_overrides_sampling_ignores(argv, "sample", evaluates=False) == (
        ["eval.batch_size"], ["eval.samples"])  # the reference itself is what is missing
    assert eval_overrides_sampling_ignores(argv, "sample", evaluates=True) == ([], ["eval.samples"])
    assert eval_overrides_sampling_ignores(argv, "eval", evaluates=False) == ([], [])
    from pixelflow_jax.cli import config_overrides

    warned = []
    monkeypatch.setattr(config_overrides.logging, "warning", lambda text, *args: warned.append(text % args))
    config_overrides.warn_of_overrides_without_effect(argv, "sample", False, "euler", evaluates=True)
    assert warned == ["--config.eval.samples: a sampling job evaluates the samples.npz it writes in its workdir; "
                      "--mode=eval reads --config.eval.samples"]


def test_overrides_in_a_flag_file_or_with_one_dash_are_warned_of_too(tmp_path):
    """absl reads -config.FIELD and a --flagfile's lines as overrides; the warnings read the
    command line as typed, so a sampling job's model overrides in a flag file went unmentioned."""
    from pixelflow_jax.cli.config_overrides import overrides_without_effect

    (tmp_path / "flags.txt").write_text("--config.model.depth=12\n--config.sample.cfg_scale=2\n")
    argv = ["main.py", "--config=configs/c2i.py", f"--flagfile={tmp_path / 'flags.txt'}", "-config.seed=3",
            "--config.data.resolution=512", "-config.model.depth=4"]
    assert overrides_without_effect(argv, "sample") == ["model.depth", "seed", "data.resolution"]
    assert overrides_without_effect(argv[:2] + [f"--flagfile={tmp_path / 'gone.txt'}"], "sample") == []


def test_overrides_typed_are_named_beside_a_flag_file_that_cannot_be_read_and_a_flag_without_a_value():
    """An unreadable --flagfile is an error of its own: the overrides typed still count, and a
    boolean override written without '=' (--config.FIELD, as absl takes it) is no value to read."""
    from configs import c2i
    from pixelflow_jax.cli.config_overrides import joined_strings_error, overrides_without_effect

    argv = ["main.py", "--flagfile=/nowhere/flags.txt", "--config.seed=3", "--config.train.use_ema"]
    assert overrides_without_effect(argv, "sample") == ["seed"]
    assert joined_strings_error(argv, c2i.get_config("tiny")) is None


def test_the_warnings_of_overrides_without_effect_count_them_in_their_words(monkeypatch):
    from pixelflow_jax.cli import config_overrides

    warned = []
    monkeypatch.setattr(config_overrides.logging, "warning", lambda text, *args: warned.append(text % args))
    for fields in (["--config.seed=3", "--config.sample.shift=2"],
                   ["--config.seed=3", "--config.model.depth=2", "--config.sample.shift=2",
                    "--config.sample.steps_per_stage=9"]):
        config_overrides.warn_of_overrides_without_effect(["main.py", *fields], "sample", False, "dopri5",
                                                          evaluates=False)
    assert [line.split(";")[0].split(" only with")[0] for line in warned] == [
        "--config.seed: --mode=sample does not use it",
        "--config.sample.shift: the dopri5 solver chooses its own steps (to a tolerance) and uses this",
        "--config.seed, --config.model.depth: --mode=sample does not use them",
        "--config.sample.shift, --config.sample.steps_per_stage: the dopri5 solver chooses its own steps (to a "
        "tolerance) and uses these"]


def test_a_list_of_strings_without_a_comma_between_two_is_refused_not_joined(tmp_path):
    """Prompts written over several lines without a comma, ("a red disk"
    "a blue ring"), reached the job as the one prompt 'a red diska blue ring' (Python joins
    adjacent strings), and a class-name list as one unknown class."""
    from configs import c2i, t2i
    from pixelflow_jax.cli.config_overrides import joined_strings_error

    result = subprocess.run([sys.executable, "main.py", "--config=configs/t2i.py:tiny", f"--workdir={tmp_path / 'run'}",
                             "--mode=sample", '--config.sample.prompts=("a red disk"\n    "a blue ring")'],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1, result.stderr
    assert ("error: --config.sample.prompts gives the strings 'a red disk' and 'a blue ring' side by side without a "
            "comma, which Python joins into one string, 'a red diska blue ring': put a comma between them"
            in result.stderr), result.stderr
    assert not (tmp_path / "run").exists()
    labels = c2i.get_config("tiny")
    labels.sample.labels = ("catsdogs",)  # what ml_collections made of the override
    assert "'cats' and 'dogs' side by side" in joined_strings_error(
        ["main.py", '--config.sample.labels=("cats" "dogs")'], labels)
    config = t2i.get_config("tiny")
    config.sample.update(prompts=("a red disk", "a blue ring"), negative_prompt='"blurry" "dark"')
    # a comma (on a line of its own too) joins nothing; a text field keeps the quotes as typed
    assert joined_strings_error(["main.py", '--config.sample.prompts=("a red disk"\n, "a blue ring")',
                                 '--config.sample.negative_prompt="blurry" "dark"'], config) is None


def test_strings_side_by_side_are_found_first_in_a_value_holding_an_equals_sign_or_across_a_comment():
    """Values the list test above does not hold: one that starts with the strings (no bracket before
    them), one whose text holds '=' (split off as a field's), one with a comment between its lines."""
    from configs import t2i
    from pixelflow_jax.cli.config_overrides import joined_strings_error

    config = t2i.get_config("tiny")
    for value, pair in (('"a red disk" "a blue ring", "a cat"', "'a red disk' and 'a blue ring'"),
                        ('("x=1" "y")', "'x=1' and 'y'"),
                        ('("a red disk"  # the first\n "a blue ring")', "'a red disk' and 'a blue ring'")):
        error = joined_strings_error(["main.py", f"--config.sample.prompts={value}"], config)
        assert error and f"gives the strings {pair} side by side" in error, (value, error)


def test_a_training_run_is_not_told_that_the_sampling_settings_its_previews_read_go_unused():
    from pixelflow_jax.cli.config_overrides import overrides_of_other_modes

    argv = ["main.py", "--config.sample.cfg_scale=4", "--config.sample.shift=2", "--config.sample.negative_prompt=dark",
            "--config.sample.prompts=('a',)", "--config.sample.prompts_file=prompts.txt", "--config.sample.seed=3"]
    assert overrides_of_other_modes(argv, "train") == {("sample", "demo", "inspect"): ["sample.seed"]}


def test_the_warning_of_settings_the_checkpoint_decides_says_what_decides_them_instead(monkeypatch):
    """A sampling job's images take their seed from sample.seed; an inspection of a checkpoint is told
    how to inspect the config's own model instead."""
    from pixelflow_jax.cli import config_overrides

    warned = []
    monkeypatch.setattr(config_overrides.logging, "warning", lambda text, *args: warned.append(text % args))
    config_overrides.warn_of_overrides_without_effect(["main.py", "--config.seed=3"], "sample", False, "euler",
                                                      evaluates=False)
    config_overrides.warn_of_overrides_without_effect(["main.py", "--config.model.depth=3"], "inspect", True, "euler",
                                                      evaluates=False)
    assert warned == ["--config.seed: --mode=sample does not use it; the checkpoint decides the model, its stages and "
                      "resolution (the seed of the images is sample.seed)",
                      "--config.model.depth: --mode=inspect does not use it; the checkpoint decides the model, its "
                      "stages and resolution (the config's own model is inspected with an empty "
                      "--config.sample.checkpoint, in a --workdir that is not a training run)"]


def test_each_setting_a_notice_points_to_is_one_the_mode_told_reads_in_place_of_one_it_does_not():
    """COUNTERPARTS: '(for F, --mode=M reads --config.G)' is shown only where M does not read F, and G
    must be a setting of the configs that M reads."""
    from configs import c2i, t2i
    from pixelflow_jax.cli.config_overrides import COUNTERPARTS, readers_of

    fields = {f"{section}.{name}" for config in (c2i.get_config("tiny"), t2i.get_config("tiny"))
              for section, values in config.items() if hasattr(values, "keys") for name in values}
    for field, (counterpart, modes) in COUNTERPARTS.items():
        assert {field, counterpart} <= fields, (field, counterpart)
        for mode in modes:
            assert mode not in readers_of(field) and mode in readers_of(counterpart), (field, mode)


def test_a_boolean_flag_given_another_word_is_named_with_the_values_it_takes():
    """--config.train.allow_resume_changes=yes said "('Non-boolean argument to boolean flag', 'yes')"."""
    from absl import flags

    from pixelflow_jax.cli.config_file import flag_error_message

    values = flags.FlagValues()
    flags.DEFINE_bool("allow_resume_changes", False, "", flag_values=values)
    with pytest.raises(flags.Error) as error:
        values(["main.py", "--allow_resume_changes=yes"])
    assert flag_error_message(error.value) == ("flag --allow_resume_changes=yes: --allow_resume_changes takes True "
                                               "or False")


def test_running_out_of_memory_names_the_setting_to_lower(monkeypatch):
    """A batch or resolution too large for the device ended in jax's traceback."""
    from types import SimpleNamespace

    import jax
    import jax.numpy as jnp
    import pytest

    sys.path.insert(0, REPO)
    import main

    def too_large(argv):
        jax.block_until_ready(jnp.ones((10**13,), jnp.float32))  # 40 TB: refused at once, as a big batch is

    from configs import c2i

    config = c2i.get_config("tiny")
    monkeypatch.setattr(main, "run_mode", too_large)
    monkeypatch.setattr(main, "FLAGS", SimpleNamespace(mode="sample", config=config))
    with pytest.raises(SystemExit, match=r"^error: --mode=sample ran out of memory \(RESOURCE_EXHAUSTED: Out of "
                                         r"memory allocating 40000000000000 bytes.\): lower "
                                         r"--config.sample.batch_size$"):
        main.main(["main.py"])
    config.eval.reference = "ref.npz"  # the job ends with an evaluation, whose batch may be the one too large
    with pytest.raises(SystemExit, match=r"lower --config.sample.batch_size or --config.eval.batch_size$"):
        main.main(["main.py"])

    monkeypatch.setattr(main, "FLAGS", SimpleNamespace(mode="train", config=config))  # first what a resume takes
    with pytest.raises(SystemExit, match=r"ran out of memory .*: set --config.model.remat=dots_attention, dots or "
                                         r"full \(least memory\), or raise "
                                         r"--config.mesh.fsdp \(a resumed run takes these\); or raise "
                                         r"--config.train.grad_accum_steps .* only with --config.train.allow_resume_"):
        main.main(["main.py"])

    for disk in ("No space left on device", "Disk quota exceeded"):
        def disk_full(argv):
            raise OSError(f"RESOURCE_EXHAUSTED: Error writing local file: {disk}")

        monkeypatch.setattr(main, "run_mode", disk_full)
        with pytest.raises(OSError, match=disk):  # not called a memory problem
            main.main(["main.py"])


def test_the_open_files_limit_is_one_error_line_naming_the_limit_and_the_fix(monkeypatch):
    """A shared machine's low `ulimit -n` (16): the demo's grain worker could not start ("Too many open
    files"), and the loader's close then failed to join it, so the job ended on two tracebacks, the last
    an AssertionError ("can only join a started process") that did not name the cause."""
    import errno
    import resource
    from types import SimpleNamespace

    sys.path.insert(0, REPO)
    import main

    def worker_not_started(argv):
        try:
            raise OSError(errno.EMFILE, "Too many open files")
        finally:
            assert False, "can only join a started process"  # grain's close of that worker

    monkeypatch.setattr(main, "run_mode", worker_not_started)
    monkeypatch.setattr(main, "FLAGS", SimpleNamespace(mode="train", config=None))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (16, 65536))
    with pytest.raises(SystemExit) as stopped:
        main.main(["main.py"])
    assert str(stopped.value) == (
        "error: --mode=train reached this process's limit of open files ([Errno 24] Too many open files): raise the "
        "open-files limit in the job's shell, `ulimit -n 4096` (this process may open 16 files; its hard limit, "
        "`ulimit -Hn`, allows 65536)")
    # A hard limit under 4096: the command asked for goes no higher, where a shell would refuse it.
    monkeypatch.setattr(resource, "getrlimit", lambda which: (16, 1024))
    with pytest.raises(SystemExit, match=r"`ulimit -n 1024` \(this process may open 16 files; its hard limit, "
                                         r"`ulimit -Hn`, allows 1024\)$"):
        main.main(["main.py"])
    # `ulimit -n 16` in bash sets the hard limit too: only an administrator raises it again.
    monkeypatch.setattr(resource, "getrlimit", lambda which: (16, 16))
    monkeypatch.setattr(main, "FLAGS", SimpleNamespace(mode="sample", config=None))
    with pytest.raises(SystemExit, match=r"\): this process may open 16 files, as many as its hard limit "
                                         r"\(`ulimit -Hn`\) allows: ask the machine's administrators for more$"):
        main.main(["main.py"])


def test_only_the_callbacks_of_reads_that_outlived_their_event_loop_are_kept_quiet(monkeypatch):
    """A damaged checkpoint printed 30-130 'Event loop is closed' tracebacks above its error line;
    a dropped stop is delivered again instead of printed."""
    import asyncio
    import signal
    from types import SimpleNamespace

    from pixelflow_jax.command_line import quiet_library_noise

    loop = asyncio.new_event_loop()
    loop.close()
    shown, delivered_again = [], []
    from pixelflow_jax import command_line

    monkeypatch.setattr(command_line, "deliver_again_later", delivered_again.append)

    def dropped_sigterm():
        command_line._stop_signal[0] = signal.SIGTERM  # raised again by stop_if_terminated: no traceback
        raise command_line.Terminated

    def same_words_elsewhere():  # not asyncio's check of a closed loop: shown
        raise RuntimeError("Event loop is closed")

    late_callbacks = (lambda: loop.call_soon_threadsafe(print), lambda: 1 / 0, dropped_sigterm, same_words_elsewhere)
    for late_callback in late_callbacks:
        try:
            late_callback()
        except BaseException as error:
            quiet_library_noise(SimpleNamespace(exc_type=type(error), exc_value=error,
                                                exc_traceback=error.__traceback__),
                                previous=lambda unraisable: shown.append(unraisable.exc_type))
    command_line._stop_signal[0] = None
    assert shown == [ZeroDivisionError, RuntimeError] and delivered_again == [signal.SIGTERM]


def test_a_failed_restore_in_a_python_session_drops_its_late_reads_errors_and_a_success_leaves_the_hook(monkeypatch):
    """load_model of a damaged step in a notebook printed 20-60 'Event loop is closed' tracebacks (in
    3 runs of 4), during the failure and after the CheckpointError was caught: only the command-line
    tools' hook dropped them."""
    import asyncio
    import sys
    from types import SimpleNamespace

    from pixelflow_jax.command_line import late_restore_callbacks_dropped

    loop = asyncio.new_event_loop()
    loop.close()
    shown = []
    session_hook = lambda unraisable: shown.append(unraisable.exc_type)  # noqa: E731 (a notebook's own)
    monkeypatch.setattr(sys, "unraisablehook", session_hook)

    def unraisable(late_callback):
        try:
            late_callback()
        except Exception as error:
            sys.unraisablehook(SimpleNamespace(exc_type=type(error), exc_value=error,
                                               exc_traceback=error.__traceback__))

    with late_restore_callbacks_dropped():  # a restore that succeeds
        unraisable(lambda: loop.call_soon_threadsafe(print))  # a late read while it ran
    assert sys.unraisablehook is session_hook and shown == []
    with pytest.raises(OSError), late_restore_callbacks_dropped():
        raise OSError("a damaged step")
    with late_restore_callbacks_dropped():  # a second restore: no second hook in the chain
        pass
    for late_callback in (lambda: loop.call_soon_threadsafe(print), lambda: 1 / 0):
        unraisable(late_callback)  # after the failure was caught
    # One of orbax's reads left unfinished, closed by the collector (seen once in a full suite run),
    # and a coroutine of other code, whose error is shown.
    namespace = {}
    exec(compile("async def read(): pass", "/venv/lib/site-packages/orbax/checkpoint/serialization.py", "exec"),
         namespace)
    for coroutine, error in ((namespace["read"](), Exception("Encountered error while reading array index")),
                             (asyncio.sleep(0), KeyError("mine"))):
        sys.unraisablehook(SimpleNamespace(exc_type=type(error), exc_value=error, exc_traceback=None, object=coroutine))
        coroutine.close()
    assert shown == [ZeroDivisionError, KeyError]


def test_a_failed_restore_under_asyncio_run_drops_the_shutdown_reports_of_orbaxs_reads(caplog):
    """orbax 0.12.4 restores in asyncio.run, whose shutdown cancels the reads a failure left running
    and logs the error of each that fails as it is cancelled: a damaged step's sampling job and
    export printed 2,300-11,000 lines of them above the one-line error, in 5 runs of 10 (0.12.8
    restores in a loop of its own, whose late reads the hook above drops). Another coroutine's report
    is still shown."""
    import asyncio

    from pixelflow_jax.command_line import late_restore_callbacks_dropped

    orbaxs, mine = {"asyncio": asyncio}, {"asyncio": asyncio}
    source = ("async def read():\n"
              "    try:\n"
              "        await asyncio.sleep(60)\n"
              "    except asyncio.CancelledError:\n"
              "        raise Exception('Encountered error while reading array index')\n")
    exec(compile(source, "/venv/lib/site-packages/orbax/checkpoint/serialization.py", "exec"), orbaxs)
    exec(compile(source, "/home/me/my_reads.py", "exec"), mine)

    async def failing_restore(read):
        asyncio.ensure_future(read())
        await asyncio.sleep(0)  # the read starts
        raise OSError("a damaged step")

    with caplog.at_level("ERROR", logger="asyncio"):
        for read in (orbaxs["read"], mine["read"]):
            with pytest.raises(OSError), late_restore_callbacks_dropped():
                asyncio.run(failing_restore(read))
    assert ["my_reads.py" in record.getMessage() for record in caplog.records] == [True]


def test_a_hook_a_session_installs_during_a_restore_stays_after_the_restore_succeeds(monkeypatch):
    """The hook in place before the restore comes back only if the restore's own is still there: a
    notebook's hook installed meanwhile (a debugger's, IPython's) is not replaced by an older one."""
    import sys

    from pixelflow_jax.command_line import late_restore_callbacks_dropped

    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: None)
    installed_meanwhile = lambda unraisable: None  # noqa: E731
    with late_restore_callbacks_dropped():
        sys.unraisablehook = installed_meanwhile
    assert sys.unraisablehook is installed_meanwhile


def test_a_stop_stands_behind_an_error_only_when_it_is_one_or_was_received_before_it(monkeypatch):
    from pixelflow_jax import command_line

    monkeypatch.setattr(command_line, "_ctrl_c_received", [False])
    monkeypatch.setattr(command_line, "_stop_signal", [None])
    for stop in (KeyboardInterrupt(), command_line.Terminated()):  # raised by a test or a caller, no signal
        assert command_line.stop_behind(stop) is stop
    assert command_line.stop_behind(OSError("disk full")) is None  # a bug's error: its traceback is due
    command_line._stop_signal[0] = signal.SIGTERM
    assert isinstance(command_line.stop_behind(ImportError("initialization failed")), command_line.Terminated)


def test_a_ctrl_c_held_while_a_tool_started_is_raised_as_its_handling_takes_over(monkeypatch):
    """Held by hold_ctrl_c_while_starting (the tool's imports), it stopped the tool only at its next
    check, after jax's import: seconds of a job that was asked to stop."""
    import logging
    import signal
    import sys

    from pixelflow_jax import command_line

    monkeypatch.setattr(command_line, "_ctrl_c_received", [False])
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(logging.getLogger("absl"), "filters", list(logging.getLogger("absl").filters))
    previous = signal.getsignal(signal.SIGINT)
    try:
        command_line.hold_ctrl_c_while_starting()
        signal.raise_signal(signal.SIGINT)  # only recorded
        with pytest.raises(KeyboardInterrupt):
            command_line.handle_ctrl_c_from_the_start()
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_during_a_tools_first_import_is_raised_once_the_import_is_complete(tmp_path, monkeypatch):
    """Raised inside the import of jax's extension, a Ctrl-C crashed the converter (SIGSEGV, seen in a
    full suite with a Ctrl-C 1.5 s after its start): held during the import, it is raised after."""
    import logging
    import signal
    import sys

    from pixelflow_jax import command_line

    (tmp_path / "interrupted_module.py").write_text(
        "import os, signal\nos.kill(os.getpid(), signal.SIGINT)\nsum(range(1000))\ncompleted = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "interrupted_module", raising=False)
    monkeypatch.setattr(command_line, "_ctrl_c_received", [False])
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(logging.getLogger("absl"), "filters", list(logging.getLogger("absl").filters))
    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(KeyboardInterrupt):
            command_line.handle_ctrl_c_from_the_start("interrupted_module")
        assert sys.modules["interrupted_module"].completed
        assert signal.getsignal(signal.SIGINT) is command_line.on_ctrl_c
    finally:
        signal.signal(signal.SIGINT, previous)
        sys.modules.pop("interrupted_module", None)


def test_a_stop_that_a_library_logs_as_its_failure_is_dropped_from_the_log_and_other_errors_kept():
    """A second Ctrl-C during the stop's save printed orbax's "Save Finalize thread failed" and a
    14-line traceback above the job's own "stopped: interrupted" line."""
    import logging

    from absl import logging as absl_logging

    from pixelflow_jax import command_line

    shown = []
    handler = logging.Handler()
    handler.emit = lambda record: shown.append(record.getMessage())
    logger = logging.getLogger("absl")  # where an absl.logging call (orbax's) leaves its record
    logger.addHandler(handler)
    stop_filter = command_line.LoggedStopsDropped()
    logger.addFilter(stop_filter)
    try:
        for error in (KeyboardInterrupt(), command_line.Terminated(), OSError("disk full")):
            try:
                raise error
            except BaseException:
                absl_logging.exception("Save Finalize thread failed: %s", type(error).__name__)
        absl_logging.warning("a plain warning")
    finally:
        logger.removeFilter(stop_filter)
        logger.removeHandler(handler)
    assert shown == ["Save Finalize thread failed: OSError", "a plain warning"]


DROPS_A_CTRL_C = """
import os, signal, time
from pixelflow_jax import command_line

command_line.handle_ctrl_c_from_the_start()


class Drops:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # its handler runs here, where Python drops the exception
        sum(range(1000))  # bytecodes for the handler to run between


Drops()
try:
    time.sleep(5)
    print("ran on")
except KeyboardInterrupt:
    print("delivered again")
Drops()
try:
    command_line.raise_dropped_ctrl_c()  # the job raises it itself first
except KeyboardInterrupt:
    print("raised")
try:
    time.sleep(0.5)
    print("once")
except KeyboardInterrupt:
    print("twice")
"""


def test_a_ctrl_c_python_dropped_is_delivered_again_and_one_the_job_raised_meanwhile_is_not():
    """A Ctrl-C whose KeyboardInterrupt Python dropped (raised in a gc callback or a __del__) let an
    inspect job that was starting run to its end (seen once in a full suite)."""
    result = subprocess.run([sys.executable, "-c", DROPS_A_CTRL_C], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.stdout.split() == ["delivered", "again", "raised", "once"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr[-3000:]


A_SIGTERM_AFTER_THE_MODE = """
import runpy, sys
from pixelflow_jax import command_line, inspect_model

run = inspect_model.run


def run_then_sigterm(*args, **kwargs):  # the job's work done, a SIGTERM in its last instants
    run(*args, **kwargs)
    raise command_line.Terminated


inspect_model.run = run_then_sigterm
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_sigterm_in_a_jobs_last_instants_stops_in_one_line(tmp_path):
    """Past a mode's own handling (inspect has none for a stop) a SIGTERM was a Terminated traceback,
    exit status 1: main.py's last resort handled a Ctrl-C only."""
    argv = ["main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'run'}", "--mode=inspect"]
    result = subprocess.run([sys.executable, "-c", A_SIGTERM_AFTER_THE_MODE.format(argv=argv)], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1] == "stopped: terminated (SIGTERM)"


A_LIBRARY_REWORDS_A_CTRL_C = """
import os, runpy, signal, sys, time
import {module} as module


def reworded(*args, **kwargs):  # as tensorstore's import: a Ctrl-C inside it became an ImportError
    try:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    except KeyboardInterrupt:
        raise ImportError("initialization failed")


module.{name} = reworded
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


A_CTRL_C_REWORDED_WHILE_JAX_IMPORTS = """
import importlib.abc, os, runpy, signal, sys, time


class RewordsACtrlC(importlib.abc.MetaPathFinder):  # as jaxlib's extension: "error while initializing"
    def find_spec(self, name, path, target=None):
        if name == "jax":
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
            except KeyboardInterrupt:
                raise {error}("Encountered an error while initializing the extension.")


sys.meta_path.insert(0, RewordsACtrlC())
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("error", ["ImportError", "RuntimeError", "KeyboardInterrupt"])  # jaxlib's, any library's
@pytest.mark.parametrize("tool", ["main", "converter", "packer"])
def test_a_ctrl_c_reworded_while_jax_imports_stops_in_one_line(tmp_path, tool, error):
    """Under load a Ctrl-C landed inside jaxlib's extension import, which raised ImportError: the
    converter, whose imports sit before its handling of errors, printed that traceback, exit status 1
    (seen in a full suite run). The caption packer imported jax before it handled Ctrl-C at all: a
    Ctrl-C in its first seconds printed a KeyboardInterrupt traceback."""
    argv = {"main": ["main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'run'}", "--mode=inspect"],
            "converter": ["convert_torch_ckpt.py", f"--output={tmp_path / 'out'}",
                          f"--torch_checkpoint={os.path.join(REPO, 'tests', 'fixtures', 'c2i_tiny')}"],
            "packer": [os.path.join("pixelflow_jax", "data", "pack_captions.py"), f"--folder={tmp_path}",
                       f"--output={tmp_path / 'out'}"]}[tool]
    script = A_CTRL_C_REWORDED_WHILE_JAX_IMPORTS.format(argv=argv, error=error)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130 and "stopped: interrupted (Ctrl-C)" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and error not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


A_CTRL_C_AS_A_MODULE_STARTS_TO_IMPORT = """
import importlib.abc, os, runpy, signal, sys


class CtrlCAt(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # bytecodes for the handler to run between


sys.meta_path.insert(0, CtrlCAt())
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def tool_argv(tool, tmp_path):
    return {"main": ["main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'run'}", "--mode=inspect"],
            "converter": ["convert_torch_ckpt.py", f"--output={tmp_path / 'out'}",
                          f"--torch_checkpoint={os.path.join(REPO, 'tests', 'fixtures', 'c2i_tiny')}"],
            "packer": [os.path.join("pixelflow_jax", "data", "pack_captions.py"), f"--folder={tmp_path}",
                       f"--output={tmp_path / 'out'}"]}[tool]


@pytest.mark.parametrize("tool", ["main", "converter", "packer"])
def test_a_ctrl_c_while_numpy_imports_stops_in_one_line(tmp_path, tool):
    """jaxlib's extension imported numpy from C: a Ctrl-C inside that import printed numpy's
    traceback above the one line (the converter's test of a Ctrl-C 1 s into its start failed so
    under load), and at other moments of it the process died of SIGSEGV."""
    script = A_CTRL_C_AS_A_MODULE_STARTS_TO_IMPORT.format(module="numpy._core.multiarray",
                                                          argv=tool_argv(tool, tmp_path))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1].startswith("stopped: interrupted (Ctrl-C)"), result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("tool", ["main", "converter"])
def test_a_ctrl_c_while_the_first_imports_run_stops_in_one_line(tmp_path, tool):
    """Above their handling of Ctrl-C, main.py and the converter import absl (up to 2 s on a busy
    machine): a Ctrl-C there printed a KeyboardInterrupt traceback and the process died of SIGINT."""
    script = A_CTRL_C_AS_A_MODULE_STARTS_TO_IMPORT.format(module="absl", argv=tool_argv(tool, tmp_path))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1].startswith("stopped: interrupted (Ctrl-C)"), result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


A_SIGTERM_THE_MOMENT_ITS_HANDLER_IS_IN_PLACE = """
import os, runpy, signal, sys
from pixelflow_jax import command_line

install = command_line.stop_on_sigterm


def installed_then_signalled():
    install()
    os.kill(os.getpid(), signal.SIGTERM)


command_line.stop_on_sigterm = installed_then_signalled  # before the tool imports it
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("tool", ["train", "sample", "converter", "packer"])
def test_a_sigterm_the_moment_its_handler_is_in_place_stops_in_one_line(tmp_path, tool):
    """Each tool installed its SIGTERM handler a line above the `try` that handles the stop it
    raises: a SIGTERM in between printed a Terminated traceback, exit status 1."""
    run = ["main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'out'}"]
    argv = {"train": run, "sample": [*run, "--mode=sample", f"--config.sample.checkpoint={tmp_path}"]}.get(tool) or \
        tool_argv(tool, tmp_path)
    if tool == "packer":
        (tmp_path / "0.png").write_bytes(b"")
    script = A_SIGTERM_THE_MOMENT_ITS_HANDLER_IS_IN_PLACE.format(argv=argv)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 143 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.rstrip().splitlines()[-1].startswith("stopped: terminated (SIGTERM)"), result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


A_FAILED_JAX_IMPORT = """
import importlib.abc, runpy, sys


class FailsToImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "jax":
            raise ImportError("jax cannot load here")


sys.meta_path.insert(0, FailsToImport())
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_the_converters_failed_import_without_a_stop_shows_its_traceback(tmp_path):
    """Only a stop received is taken for a Ctrl-C reworded by an import: an import that fails on its
    own is a bug to read, not 'stopped: ...'."""
    argv = ["convert_torch_ckpt.py", f"--torch_checkpoint={os.path.join(REPO, 'tests', 'fixtures', 'c2i_tiny')}",
            f"--output={tmp_path / 'out'}"]
    script = A_FAILED_JAX_IMPORT.format(argv=argv)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "ImportError: jax cannot load here" in result.stderr, result.stderr[-3000:]
    assert "Traceback" in result.stderr and "stopped:" not in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("tool", ["main", "converter"])
def test_a_ctrl_c_a_library_turned_into_another_error_still_stops_in_one_line(tmp_path, tool):
    """A Ctrl-C during tensorstore's import came out as "ImportError: initialization failed" and
    its traceback, exit status 1 (seen once by an audit of the converter)."""
    module, name, argv = (
        ("pixelflow_jax.inspect_model", "run", ["main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path}",
                                                "--mode=inspect"]) if tool == "main" else
        ("pixelflow_jax.checkpoints.convert", "torch_to_params",
         ["convert_torch_ckpt.py", f"--torch_checkpoint={os.path.join(REPO, 'tests', 'fixtures', 'c2i_tiny')}",
          f"--output={tmp_path / 'out'}"]))
    script = A_LIBRARY_REWORDS_A_CTRL_C.format(module=module, name=name, argv=argv)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 130 and "stopped: interrupted (Ctrl-C)" in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ImportError" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_a_job_starts_stops_it_in_one_line(tmp_path):
    """The imports take seconds: a Ctrl-C then printed a KeyboardInterrupt traceback (and, caught
    by a library, sometimes let the job run on)."""
    import signal
    import time

    process = subprocess.Popen([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path}",
                                "--mode=inspect"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)  # importing jax
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == "stopped: interrupted (Ctrl-C)"


@pytest.mark.slow  # ~40 s on 2 cores: three jobs, one process each
def test_a_job_of_one_process_keeps_its_compiled_programs_for_the_next_when_asked_on_a_cpu(tmp_path):
    """A resume or a sampling job compiled everything again (a demo resume: 25 s to its first step,
    10 s with the cache). On CPUs only with --compilation_cache=on (some processors reject XLA:CPU's
    cached programs); jax's own JAX_COMPILATION_CACHE_DIR wins."""
    def inspect(*flags, **env):
        environment = {**{k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}, **env}
        result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", "--mode=inspect",
                                 f"--workdir={tmp_path / 'run'}", "--config.scheduler.num_stages=1", *flags],
                                cwd=REPO, capture_output=True, text=True, timeout=300, env=environment)
        assert result.returncode == 0, result.stderr[-3000:]

    def programs(folder):
        return [name for name in os.listdir(folder) if name.endswith("-cache")] if os.path.isdir(folder) else []

    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    inspect(PIXELFLOW_CACHE_DIR=str(ours))  # auto: not on a CPU
    assert not programs(ours / "xla")
    inspect("--compilation_cache=on", PIXELFLOW_CACHE_DIR=str(ours))
    assert programs(ours / "xla")
    inspect("--compilation_cache=on", PIXELFLOW_CACHE_DIR=str(tmp_path / "unused"),
            JAX_COMPILATION_CACHE_DIR=str(theirs))
    assert programs(theirs) and not programs(tmp_path / "unused" / "xla")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the drop this test makes
def test_a_sigterm_dropped_where_python_ignores_exceptions_still_stops_the_job():
    """The SIGTERM handler raises wherever the interpreter is: inside jax's gc callback the
    exception was printed and dropped, and a sampling job of 100,000 images ran on past the
    SIGTERM. The job's loops raise it again at their next batch."""
    import gc
    import signal

    from pixelflow_jax import command_line

    class RaisesInDel:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)  # its handler runs here, where an exception is dropped
            sum(range(1000))  # bytecodes for the handler to run between

    before = signal.getsignal(signal.SIGTERM)
    try:
        command_line.stop_on_sigterm()
        command_line.stop_if_terminated()  # nothing received yet
        RaisesInDel()
        gc.collect()
        with pytest.raises(command_line.Terminated):
            command_line.stop_if_terminated()
    finally:
        signal.signal(signal.SIGTERM, before)
        command_line._stop_signal[0] = None


A_SIGTERM_DROPPED_THEN_RAISED_BY_THE_JOB = """
import os, signal, time
from pixelflow_jax import command_line

command_line.handle_ctrl_c_from_the_start()
command_line.stop_on_sigterm()
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (a suite run under nohup passes its SIG_IGN on)
command_line.stop_on_hang_up()


class Drops:
    def __del__(self):
        os.kill(os.getpid(), signal.{stop})  # its handler runs here, where Python drops the exception
        sum(range(1000))


Drops()
try:
    command_line.stop_if_terminated()  # the job's loop raises it itself, before the delivery again
except command_line.Terminated as stop:
    print("raised", type(stop).__name__)
try:
    time.sleep(20 * command_line.REDELIVERY_DELAY_S)
    print("once")
except command_line.Terminated:
    print("twice")
"""


@pytest.mark.parametrize("stop, raised", [("SIGTERM", "Terminated"), ("SIGHUP", "HungUp")])
def test_a_sigterm_the_job_raised_itself_after_python_dropped_it_is_not_delivered_again(stop, raised):
    """A second Terminated would hit the job's cleanup of the first (a pack removing its shards). So
    would a second HungUp (a job's raise that forgot only SIGTERM's drop passed: only SIGTERM was
    dropped here); and a SIGTERM is raised as itself, not as a hang-up."""
    script = A_SIGTERM_DROPPED_THEN_RAISED_BY_THE_JOB.replace("{stop}", stop)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["raised", raised, "once"], result.stderr[-3000:]


A_SECOND_CTRL_C_BEFORE_THE_DROPPED_ONE_COMES_ROUND = """
import os, signal, time
from pixelflow_jax import command_line

command_line.handle_ctrl_c_from_the_start()


class Drops:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # dropped here: to be delivered again in a moment
        sum(range(1000))


Drops()
try:
    os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C again, raised where the job is
    sum(range(1000))
except KeyboardInterrupt:
    print("raised")
try:
    time.sleep(20 * command_line.REDELIVERY_DELAY_S)
    print("once")
except KeyboardInterrupt:
    print("twice")
"""


def test_a_dropped_ctrl_c_is_not_delivered_again_once_a_second_ctrl_c_was_raised():
    """The second Ctrl-C stands for the first: delivering the first again would interrupt the
    job's cleanup after the stop."""
    result = subprocess.run([sys.executable, "-c", A_SECOND_CTRL_C_BEFORE_THE_DROPPED_ONE_COMES_ROUND], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["raised", "once"], result.stderr[-3000:]


A_DELIVERY_AGAIN_AFTER_THE_JOB_GAVE_SIGTERM_BACK = """
import signal, time
from pixelflow_jax import command_line

command_line.stop_on_sigterm()
signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the job gives SIGTERM its default back
command_line.deliver_again_later(signal.SIGTERM)  # and then a SIGTERM dropped before comes round again
time.sleep(20 * command_line.REDELIVERY_DELAY_S)
print("ran on")
"""


def test_a_stop_is_delivered_again_only_while_the_jobs_handler_still_holds_it():
    """Delivered to the default handler, the SIGTERM would end the process there and then, silently."""
    result = subprocess.run([sys.executable, "-c", A_DELIVERY_AGAIN_AFTER_THE_JOB_GAVE_SIGTERM_BACK], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stdout.split() == ["ran", "on"], (result.returncode, result.stderr)


def test_a_stop_no_signal_sent_is_printed_not_delivered_as_a_signal(monkeypatch):
    """A KeyboardInterrupt or Terminated that a library raised and Python dropped, with no Ctrl-C or
    SIGTERM received, is shown as any dropped error: delivering a signal for it would stop the job."""
    import signal
    from types import SimpleNamespace

    from pixelflow_jax import command_line

    shown, delivered_again = [], []
    monkeypatch.setattr(command_line, "deliver_again_later", delivered_again.append)
    monkeypatch.setattr(command_line, "_ctrl_c_received", [False])
    monkeypatch.setattr(command_line, "_stop_signal", [None])
    for stop in (KeyboardInterrupt(), command_line.Terminated()):
        command_line.quiet_library_noise(SimpleNamespace(exc_type=type(stop), exc_value=stop, exc_traceback=None),
                                         previous=lambda unraisable: shown.append(unraisable.exc_type))
    assert shown == [KeyboardInterrupt, command_line.Terminated] and delivered_again == []
    command_line._ctrl_c_received[0] = True  # a Ctrl-C was received: its drop is delivered again instead
    command_line.quiet_library_noise(SimpleNamespace(exc_type=KeyboardInterrupt, exc_value=KeyboardInterrupt(),
                                                     exc_traceback=None), previous=shown.append)
    assert delivered_again == [signal.SIGINT] and len(shown) == 2


@pytest.mark.parametrize("received,value,stop", [("_ctrl_c_received", True, KeyboardInterrupt),
                                                 ("_stop_signal", signal.SIGTERM, None)])
def test_a_stop_received_before_a_jobs_work_starts_is_raised_there(monkeypatch, received, value, stop):
    """raise_dropped_stops guards work that must not start once the job was asked to stop (a
    conversion's write, a training loop): a Ctrl-C or a SIGTERM a library swallowed is raised."""
    from pixelflow_jax import command_line

    monkeypatch.setattr(command_line, "_ctrl_c_received", [False])
    monkeypatch.setattr(command_line, "_stop_signal", [None])
    command_line.raise_dropped_stops()  # nothing received: the work goes on
    getattr(command_line, received)[0] = value
    with pytest.raises(stop or command_line.Terminated):
        command_line.raise_dropped_stops()


@pytest.mark.parametrize("stop, status, cause", [
    ("SIGTERM", 143, "terminated (SIGTERM)"),
    ("SIGHUP", 129, "hung up (SIGHUP: the terminal or ssh session it was started from closed)")])
def test_a_sigterm_while_a_training_run_starts_stops_it_in_one_line_and_releases_its_lock(tmp_path, stop, status,
                                                                                            cause):
    """Until the training loop takes SIGTERM over (restoring a checkpoint takes minutes at XL), a
    SIGTERM ended the process silently and left train.lock, which refuses a restart on another host
    for train.lock_stale_after_s. So did a hang-up (an ssh session closed), until the loop's watch."""
    import time

    workdir = tmp_path / "run"
    inherited = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # the job's, not a nohup'd suite's SIG_IGN
    try:
        process = subprocess.Popen([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}",
                                    "--config.train.num_steps=2", "--config.train.batch_size=32"],  # 8 devices here
                                   cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGHUP, inherited)
    deadline = time.time() + 120
    while not (workdir / "train.lock").exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (workdir / "train.lock").exists(), process.communicate(timeout=60)
    process.send_signal(getattr(signal, stop))
    _, err = process.communicate(timeout=120)
    # Head and tail: once (1 of ~30 suite runs, under load) the process aborted (-6) while the stop
    # imported orbax, and the tail held only the end of Python's fatal-error stack dump.
    assert process.returncode == status and "Traceback" not in err, err[:3000] + "\n...\n" + err[-3000:]
    assert err.rstrip().splitlines()[-1] == (f"stopped: {cause}; no step of this run was "
                                             "saved: rerun the same command to start it again")
    assert not (workdir / "train.lock").exists()


def test_each_way_a_collective_fails_for_a_process_gone_is_recognised(monkeypatch):
    import jax

    from pixelflow_jax.cli.job_exit import another_process_gone

    class JaxRuntimeError(RuntimeError):
        pass

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    # XLA:CPU names each gloo collective in its own words: one word, a hyphenated one, or two
    for message in ("INTERNAL: Gloo AllGather failed: pair.cc:589 Connection closed",
                    "UNKNOWN: Gloo all-to-all failed: pair.cc:589 Connection closed",
                    "UNKNOWN: Gloo collective permute failed: pair.cc:589 Connection closed",
                    "UNAVAILABLE: Connection reset by peer", "Task /job:jax_worker/task:1 stopped sending heartbeats",
                    "the job is unhealthy", "UNAVAILABLE: another task died"):
        line = another_process_gone(JaxRuntimeError(message))
        assert line.endswith(f"(that process's log says why; here: {message})"), message


def test_an_error_exits_at_once_a_success_and_a_stop_every_process_made_do_not_and_process_0_waits(monkeypatch):
    """Only a failure skips the teardown: exit status 0 returns normally (atexit, flushes). A
    StoppedTogether of one process exits at once too (orbax's threads may wait out their timeouts);
    in a --distributed job it leaves through jax's shutdown barrier, which every process reaches.
    Process 0, whose exit ends the others, gives them EXIT_GRACE_S to print their own errors."""
    import jax

    from pixelflow_jax.cli import job_exit

    exits, waits = [], []

    def exit_now(status):
        exits.append(status)
        raise SystemExit("os._exit")  # what the test sees in place of the process ending

    monkeypatch.setattr(job_exit.os, "_exit", exit_now)
    monkeypatch.setattr(job_exit.time, "sleep", waits.append)
    monkeypatch.setattr(job_exit.logging, "flush", lambda: None)

    def ended_by(stop):
        with pytest.raises(SystemExit) as raised:
            job_exit.exit_now_after_an_error(stop)
        return "os._exit" if raised.value.code == "os._exit" else "raised"

    assert [ended_by(SystemExit(0)), ended_by(SystemExit(None))] == ["raised", "raised"] and exits == []
    assert ended_by(job_exit.StoppedTogether(130)) == "os._exit" and exits == [130] and waits == []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert ended_by(job_exit.StoppedTogether(143)) == "raised"
    def backend_failed():  # the error being handled may be the backend's own
        raise RuntimeError("Unable to initialize backend")

    for process_index, wait in ((lambda: 1, []), (backend_failed, []), (lambda: 0, [job_exit.EXIT_GRACE_S])):
        monkeypatch.setattr(jax, "process_index", process_index)
        waits.clear()
        assert ended_by(SystemExit("error: disk full")) == "os._exit" and waits == wait
    assert exits == [130, 1, 1, 1]
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as readme:  # the wait the README gives
        assert f"Process 0, which hosts that service, waits {job_exit.EXIT_GRACE_S} s first" in " ".join(
            readme.read().split())


def test_an_error_exit_keeps_the_lines_a_job_printed_to_a_file_before_it():
    """os._exit skips the interpreter's flush: printed to a file or a pipe (a SLURM log), the
    job's last lines before its error would be lost. An exit status alone adds no line."""
    buffered = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
    for stop, status, error_line in (("'error: disk full'", 1, "error: disk full\n"), ("143", 143, "")):
        job = ("from pixelflow_jax.cli.job_exit import exit_now_after_an_error\n"
               "print('step 7 of 10 saved')\n"
               f"exit_now_after_an_error(SystemExit({stop}))")
        result = subprocess.run([sys.executable, "-c", job], cwd=REPO, env=buffered, capture_output=True, text=True,
                                timeout=120)
        assert (result.returncode, result.stdout, result.stderr) == (status, "step 7 of 10 saved\n", error_line)


def test_a_workdir_of_a_scheme_this_project_cannot_write_names_the_flag(tmp_path):
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", "--workdir=s3://b/w",
                             "--mode=sample"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: --workdir: s3://b/w: unsupported URL scheme s3://")


def test_a_collective_failing_for_a_process_gone_is_one_line_naming_the_other_process(monkeypatch):
    """After a kill -9 of one process, the other ended with a JaxRuntimeError traceback of gloo's
    broken connection."""
    import jax

    from pixelflow_jax.cli.job_exit import another_process_gone

    class JaxRuntimeError(RuntimeError):  # jax's, by name (it lives in jaxlib)
        pass

    gone = JaxRuntimeError("INTERNAL: Gloo all-reduce failed: [external/gloo/transport/tcp/pair.cc:534] Read "
                           "error [127.0.0.1]:5432: Connection reset by peer\nmore")
    assert another_process_gone(gone) is None  # one process: every error is its own
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert another_process_gone(gone) == (
        "error: another process of this job is gone, so this one stops too (that process's log says why; here: "
        "INTERNAL: Gloo all-reduce failed: [external/gloo/transport/tcp/pair.cc:534] Read error [127.0.0.1]:5432: "
        "Connection reset by peer)")
    assert another_process_gone(JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory")) is None
    assert another_process_gone(ValueError("Connection reset by peer")) is None


def test_without_a_home_folder_compiled_programs_are_not_kept_and_nothing_is_written_here(monkeypatch, tmp_path):
    """A container's uid without a passwd entry and HOME unset: the cache went to ./~/.cache/pixelflow_jax/xla
    under the job's current folder."""
    import jax

    from pixelflow_jax.cli.compilation_cache import keep_compiled_programs

    monkeypatch.chdir(tmp_path)
    for variable in ("PIXELFLOW_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr("pwd.getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    session_cache = jax.config.jax_compilation_cache_dir  # the test session's own (conftest.py)
    jax.config.update("jax_compilation_cache_dir", None)
    try:
        keep_compiled_programs(on_cpu=True)
        assert jax.config.jax_compilation_cache_dir is None
    finally:
        jax.config.update("jax_compilation_cache_dir", session_cache)
    assert os.listdir(tmp_path) == []


def test_a_platform_jax_cannot_start_is_named_with_jax_platforms_in_one_line(monkeypatch):
    """JAX_PLATFORMS=cuda on a machine without NVIDIA GPUs ended in a traceback of jax's, an
    AssertionError without a message; tpu without libtpu in jax's RuntimeError."""
    import jax

    from pixelflow_jax.cli.platforms import platform_error

    assert platform_error() is None
    before = jax.config.jax_platforms  # read only as a backend starts: this session's stay started
    jax.config.update("jax_platforms", "cuda")
    try:
        for error, cause in ((AssertionError(), "no device of it is visible"),
                             (RuntimeError("Unable to initialize backend 'cuda': no libcuda (set JAX_PLATFORMS='' to "
                                           "automatically choose an available backend)"),
                              "Unable to initialize backend 'cuda': no libcuda")):
            monkeypatch.setattr(jax, "devices", lambda error=error: (_ for _ in ()).throw(error))
            assert platform_error() == (f"JAX_PLATFORMS=cuda asks jax for a platform it cannot start here ({cause}): "
                                        "unset JAX_PLATFORMS to use what this machine has, set it to cpu to run on the "
                                        "CPU, or install jax for that platform (jax[cuda12], jax[tpu])")
    finally:
        jax.config.update("jax_platforms", before)


def test_a_failing_jax_plugin_without_jax_platforms_is_named_with_its_fix_in_one_line(monkeypatch):
    """JAX_PLATFORMS unset and a plugin that fails to start (a jax[cuda12] on a machine whose driver
    is too old): the line asks for JAX_PLATFORMS=cpu or the plugin's removal, and names no setting
    the user never made; jax's own advice is cut from its message, and so is all past its first line."""
    import jax

    from pixelflow_jax.cli.platforms import platform_error

    before = jax.config.jax_platforms
    jax.config.update("jax_platforms", None)
    errors = {  # jax's message -> the cause the line gives: its first line, without jax's advice
        "Unable to initialize backend 'cuda': driver too old (you may need to uninstall the failing plugin package, "
        "or set JAX_PLATFORMS=cpu to skip this backend.)": "Unable to initialize backend 'cuda': driver too old",
        "Unable to initialize backend 'tpu': TPU initialization failed: open(/dev/vfio/0): Device or resource busy\n"
        "The TPU is already in use by process with pid 1234.":
            "Unable to initialize backend 'tpu': TPU initialization failed: open(/dev/vfio/0): Device or resource busy"}
    try:
        for message, cause in errors.items():
            monkeypatch.setattr(jax, "devices", lambda message=message: (_ for _ in ()).throw(RuntimeError(message)))
            assert platform_error() == (f"jax cannot start its backends ({cause}): set JAX_PLATFORMS=cpu to run on the "
                                        "CPU, or uninstall the failing jax plugin")
    finally:
        jax.config.update("jax_platforms", before)


def test_a_job_warns_as_it_starts_of_a_temporary_folder_python_passed_over(monkeypatch, tmp_path, caplog):
    """TMPDIR naming a folder that is missing: Python's fallback to /tmp is silent, so the job says it."""
    import tempfile
    from types import SimpleNamespace

    from pixelflow_jax import host_memory

    sys.path.insert(0, REPO)
    import main

    monkeypatch.setattr(host_memory, "reuse_freed_buffers_on_cpu", lambda: False)  # this session's malloc stays
    monkeypatch.setattr(main, "FLAGS", SimpleNamespace(distributed=False, compilation_cache="off", mode="eval"))
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    monkeypatch.setattr(tempfile, "tempdir", None)
    main.start_job(None)
    assert [r.getMessage() for r in caplog.records if "TMPDIR=" in r.getMessage()] == [
        f"TMPDIR={tmp_path}/missing is not a folder this user can write to (missing, a file, read-only or full): "
        f"temporary files go to {tempfile.gettempdir()} instead; create it, or point TMPDIR at a writable folder"]


@pytest.mark.parametrize("step_tasks, warned", [("4", True), ("1", False), (None, False)])
def test_a_job_started_by_srun_as_several_tasks_without_distributed_is_warned(monkeypatch, caplog, step_tasks,
                                                                              warned):
    """`srun --ntasks=4 python main.py ...` without --distributed ran the whole job 4 times, each task
    alone (jax reads SLURM's variables only when asked to join): a warning says so and names the fix.
    A batch script's own process, with SLURM_NTASKS and SLURM_PROCID of its allocation, is one process
    by choice: nothing is said."""
    from types import SimpleNamespace

    from pixelflow_jax import host_memory

    sys.path.insert(0, REPO)
    import main

    monkeypatch.setattr(host_memory, "reuse_freed_buffers_on_cpu", lambda: False)
    monkeypatch.setattr(main, "FLAGS", SimpleNamespace(distributed=False, compilation_cache="off", mode="eval"))
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "0")
    if step_tasks is None:
        monkeypatch.delenv("SLURM_STEP_NUM_TASKS", raising=False)
    else:
        monkeypatch.setenv("SLURM_STEP_NUM_TASKS", step_tasks)
    main.start_job(None)
    said = [r.getMessage() for r in caplog.records if "SLURM" in r.getMessage()]
    assert said == ([
        "srun started this command as 4 tasks (SLURM_STEP_NUM_TASKS=4), and without --distributed each task runs the "
        "whole job alone (a second training run or sampling job on one workdir is refused, an evaluation is "
        "repeated): add --distributed to share the job out over them, or start one task (srun --ntasks=1)"]
        if warned else [])

def test_a_distributed_job_started_by_srun_as_several_tasks_is_not_warned(monkeypatch, caplog):
    """--distributed is the fix the warning names: its tasks, one process each of one job, hear nothing."""
    from types import SimpleNamespace

    from pixelflow_jax import host_memory, multihost
    from pixelflow_jax.cli import platforms

    sys.path.insert(0, REPO)
    import main

    monkeypatch.setattr(platforms, "platform_error", lambda: None)
    monkeypatch.setattr(multihost, "start_distributed", lambda *args: None)
    monkeypatch.setattr(multihost, "check_same_job", lambda command: None)
    monkeypatch.setattr(host_memory, "reuse_freed_buffers_on_cpu", lambda: False)
    monkeypatch.setattr(main, "FLAGS", SimpleNamespace(distributed=True, coordinator_address="h:1", num_processes=4,
                                                       process_id=1, compilation_cache="off", mode="eval"))
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "4")
    assert multihost.lone_task_of_srun() is not None  # what a job without --distributed is told
    main.start_job(None)
    assert [r.getMessage() for r in caplog.records if "SLURM" in r.getMessage()] == []


A_JOB_THAT_COMPILES_TWO_PROGRAMS = """
import resource, sys
import jax
from pixelflow_jax.cli.compilation_cache import keep_compiled_programs

keep_compiled_programs(on_cpu=True)
if sys.argv[1:]:  # a full disk: no file grows past this (Python ignores SIGXFSZ: a write fails with EFBIG)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
print(jax.jit(lambda x: x * 2 + 1)(1.0), jax.jit(lambda x: x * 3 + 1)(1.0))  # both programs are 'jit__lambda'
"""


def test_a_damaged_compiled_program_in_the_cache_is_replaced_not_read_again_by_every_job(tmp_path):
    """jax writes a cache entry in place and never replaces one: an entry cut short (a job killed while
    writing it, a full home folder) made every later job warn, in jax's own lines, and compile the
    program again, for good. The job that finds it removes it, so the program compiled is kept anew;
    one that fails to write an entry whole removes what it wrote (each one: jax's warnings say the same)."""
    from jax._src import compilation_cache as jax_cache

    environment = {**os.environ, "PIXELFLOW_CACHE_DIR": str(tmp_path),
                   "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}  # the test's program compiles in less
    environment.pop("JAX_COMPILATION_CACHE_DIR", None)

    def job(*file_size_limit):
        result = subprocess.run([sys.executable, "-c", A_JOB_THAT_COMPILES_TWO_PROGRAMS, *file_size_limit], cwd=REPO,
                                capture_output=True, text=True, timeout=300, env=environment)
        assert result.returncode == 0 and result.stdout.strip() == "3.0 4.0", result.stderr[-3000:]
        return result.stderr

    said = job("1000")  # a full disk: both entries fail to be written whole
    assert "Error writing persistent compilation cache entry" not in said
    assert said.count("could not be written whole (a full disk?): removed, so that no job reads it cut short") == 2
    assert list((tmp_path / "xla").glob("jit_*-cache")) == []
    job()
    entries = sorted((tmp_path / "xla").glob("jit_*-cache"))
    assert len(entries) == 2
    whole = entries[0].read_bytes()
    entries[0].write_bytes(whole[:len(whole) // 2])  # cut short
    said = job()
    assert "Error reading persistent compilation cache entry" not in said
    assert f"{entries[0]} was damaged (cut short while written?): removed, and the program compiled again" in said
    assert jax_cache.decompress_executable(entries[0].read_bytes())  # kept anew, whole
    assert "compilation cache" not in job()


def test_a_jax_without_its_private_decompression_leaves_cache_entries_and_jaxs_warning_alone(tmp_path, monkeypatch):
    """remove_damaged_entries reads entries with a private function of jax's: a jax without it
    removes nothing (and the hook shows jax's own warning), not an AttributeError inside warnings.warn."""
    from jax._src import compilation_cache as jax_cache

    from pixelflow_jax.cli import compilation_cache

    entry = tmp_path / "jit_f-0123-cache"
    entry.write_bytes(b"cut short")
    monkeypatch.delattr(jax_cache, "decompress_executable")
    shown = []
    show = compilation_cache.removing_damaged_entries(str(tmp_path), lambda *args: shown.append(args[0]))
    show("Error reading persistent compilation cache entry for 'jit_f': ...", UserWarning, "compiler.py", 1)
    assert entry.exists() and shown == ["Error reading persistent compilation cache entry for 'jit_f': ..."]

def test_only_the_warned_programs_entries_that_read_whole_and_fail_to_decompress_are_removed(tmp_path, monkeypatch):
    """A warning for 'jit_f' removes jit_f's damaged entries alone: not jit_f_g's (another program, which
    another job may be writing right now), and not one that could not be read at all (unreadable, or gone
    meanwhile: not this job's to judge)."""
    from pixelflow_jax.cli import compilation_cache

    own, other = tmp_path / "jit_f-0123-cache", tmp_path / "jit_f_g-4567-cache"
    for entry in (own, other):
        entry.write_bytes(b"cut short")
    assert compilation_cache.remove_damaged_entries(str(tmp_path), "jit_f") == [str(own)]
    assert not own.exists() and other.exists()
    own.write_bytes(b"cut short")

    def unreadable(path, mode="r"):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(compilation_cache, "open", unreadable, raising=False)
    assert compilation_cache.remove_damaged_entries(str(tmp_path), "jit_f") == [] and own.exists()
    monkeypatch.undo()

    def refused(path):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(compilation_cache.os, "remove", refused)  # a cache folder of another user's
    assert compilation_cache.remove_damaged_entries(str(tmp_path), "jit_f") == [] and own.exists()


def test_a_distributed_process_checks_its_platform_once_joined_not_before(monkeypatch):
    """jax starts its backends at the check: before jax.distributed.initialize that is too early (it
    must come first), so main.py leaves a --distributed process's check to multihost's join."""
    from types import SimpleNamespace

    from pixelflow_jax import host_memory, multihost, software_versions
    from pixelflow_jax.cli import platforms

    sys.path.insert(0, REPO)
    import main

    calls = []
    monkeypatch.setattr(platforms, "platform_error", lambda: calls.append("platform check") or None)
    monkeypatch.setattr(multihost, "start_distributed", lambda *args: calls.append("join"))
    monkeypatch.setattr(multihost, "check_same_job", lambda command: calls.append("same command"))
    monkeypatch.setattr(multihost, "check_same_software", lambda versions: calls.append(versions))
    monkeypatch.setattr(multihost, "check_same_matmul_precision", lambda: calls.append("same precision"))
    monkeypatch.setattr(host_memory, "reuse_freed_buffers_on_cpu", lambda: False)
    monkeypatch.setattr(main, "FLAGS", SimpleNamespace(distributed=True, coordinator_address="h:1", num_processes=2,
                                                       process_id=1, compilation_cache="off", mode="eval"))
    main.start_job(None)
    # the stand-in join checks nothing; multihost's own checks once joined, then the command, the software
    # (every package named on every host, so that the processes compare the same names) and the matmul precision
    assert calls == ["join", "same command", software_versions.version_fields(), "same precision"]


def test_a_distributed_process_at_another_matmul_precision_stops_in_one_error_line(monkeypatch):
    """multihost's refusal of a host at another matmul precision is a line 'error: ...' as the
    other checks at the join are, not a traceback."""
    from types import SimpleNamespace

    from pixelflow_jax import multihost

    sys.path.insert(0, REPO)
    import main

    def another_precision():
        raise ValueError("the processes of this job compute at different matmul precisions")

    for check in ("start_distributed", "check_same_job", "check_same_software"):
        monkeypatch.setattr(multihost, check, lambda *args: None)
    monkeypatch.setattr(multihost, "check_same_matmul_precision", another_precision)
    monkeypatch.setattr(main, "FLAGS", SimpleNamespace(distributed=True, coordinator_address="h:1", num_processes=2,
                                                       process_id=1, compilation_cache="off", mode="eval"))
    with pytest.raises(SystemExit, match="^error: the processes of this job compute at different matmul precisions$"):
        main.start_job(None)


def test_main_stops_in_one_line_before_any_file_where_jax_platforms_names_no_platform_here(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--config=configs/c2i.py:tiny",
                             f"--workdir={tmp_path / 'run'}", "--mode=inspect"], capture_output=True, text=True,
                            timeout=300, cwd=REPO, env={**os.environ, "JAX_PLATFORMS": "cuda"})
    assert result.returncode == 1
    assert result.stderr.splitlines()[-1].startswith("error: JAX_PLATFORMS=cuda asks jax for a platform it cannot")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.parametrize("script", ["main.py", "convert_torch_ckpt.py"])
def test_the_tools_stop_in_one_line_where_home_names_no_folder(script, tmp_path):
    """HOME a relative path is no home folder: both tools stop before their imports, which need one."""
    result = subprocess.run([sys.executable, os.path.join(REPO, script), "--helpshort"], capture_output=True,
                            text=True, timeout=120, cwd=tmp_path, env={**os.environ, "HOME": "home"})
    assert result.returncode == 1 and result.stderr.splitlines() == [
        "error: this user's home folder is unknown (HOME='home' is no absolute path): set HOME to a writable folder "
        "(the caches of jax, huggingface_hub and pixelflow_jax default under it)"], result.stderr[-2000:]
    assert os.listdir(tmp_path) == []


def test_main_stops_in_one_line_before_its_imports_where_no_home_folder_is_known(monkeypatch):
    """HOME unset and a container's uid without a passwd entry: flax's import (IPython, jedi, parso)
    raised "Could not determine home directory." in a traceback before main.py read its flags."""
    from pixelflow_jax.command_line import exit_without_a_home_folder

    monkeypatch.setenv("HOME", "/home/u")
    exit_without_a_home_folder()
    monkeypatch.delenv("HOME")
    monkeypatch.setattr("pwd.getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    with pytest.raises(SystemExit, match=rf"^error: this user's home folder is unknown \(HOME is unset and uid "
                                         rf"{os.getuid()} has no passwd entry\): set HOME to a writable folder"):
        exit_without_a_home_folder()


A_SIGHUP_WHILE_IT_SAMPLES_OR_EVALUATES = """
import os, runpy, signal, sys
from pixelflow_jax.evaluation import evaluate
from pixelflow_jax.sampling import sample_run

signal.signal(signal.SIGHUP, signal.SIG_IGN if {nohup} else signal.SIG_DFL)  # a nohup'd suite's SIG_IGN is inherited


def hang_up(*args, **kwargs):  # the ssh session closes while the job runs
    os.kill(os.getpid(), signal.SIGHUP)
    sum(range(1000))  # bytecodes for the handler to run between


sample_run.run = evaluate.run = hang_up
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("mode", ["sample", "eval", "sample under nohup"])
def test_a_sighup_stops_a_sampling_or_evaluation_job_as_sigterm_does(tmp_path, mode):
    """An ssh session closed under a sampling or evaluation job (SIGHUP) ended it at once (exit -1,
    no line, the batch that had just finished lost), where training saves and stops with 129: it now
    stops as SIGTERM does, with the line that says what is kept, and exit 129. Under nohup it runs on."""
    run = ["main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'out'}"]
    argv = {"eval": [*run, "--mode=eval", f"--config.eval.samples={tmp_path / 'samples.npz'}",
                     f"--config.eval.reference={tmp_path / 'reference.npz'}"]}.get(
        mode, [*run, "--mode=sample", f"--config.sample.checkpoint={tmp_path}"])
    script = A_SIGHUP_WHILE_IT_SAMPLES_OR_EVALUATES.format(argv=argv, nohup="nohup" in mode)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    if "nohup" in mode:
        assert result.returncode == 0 and "hung up" not in result.stderr, result.stderr[-3000:]
        return
    kept = "the features of files already through the Inception are cached" if mode == "eval" else \
        "the images written are kept"
    assert result.returncode == 129 and "Traceback" not in result.stderr, (result.returncode, result.stderr[-3000:])
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"stopped: hung up (SIGHUP: the terminal or ssh session it was started from closed); {kept}: rerun the same "
        "command to go on"), result.stderr[-3000:]


A_SCHEDULER_SIGNAL_WHILE_IT_WORKS = """
import os, runpy, signal, sys
from pixelflow_jax.sampling import sample_run
from pixelflow_jax.training import train

for each in (signal.SIGUSR1, signal.SIGUSR2):
    signal.signal(each, signal.SIG_DFL)


def warned(*args, **kwargs):  # SLURM's --signal=USR1@120 while the job restores its checkpoint, or samples
    os.kill(os.getpid(), signal.{signal})
    sum(range(1000))  # bytecodes for the handlers to run between


sample_run.run = train.train = warned
sys.argv = {argv!r}
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("mode, scheduler_signal", [("sample", "SIGUSR1"), ("train", "SIGUSR2")])
def test_slurms_warning_signals_stop_a_job_as_sigterm_does(tmp_path, mode, scheduler_signal):
    """SLURM's --signal=USR1@SECONDS (or USR2) ended a job at once (Python's default: no line, the
    batch that had just finished lost, a training run's lock left): it stops the job as SIGTERM does,
    with exit status 128 + the signal's number."""
    argv = ["main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'out'}", f"--mode={mode}"]
    script = A_SCHEDULER_SIGNAL_WHILE_IT_WORKS.format(argv=argv, signal=scheduler_signal)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    status = 138 if scheduler_signal == "SIGUSR1" else 140
    assert result.returncode == status and "Traceback" not in result.stderr, (result.returncode,
                                                                              result.stderr[-3000:])
    rest = ("the images written are kept: rerun the same command to go on" if mode == "sample"
            else "no step of this run was saved: rerun the same command to start it again")
    assert result.stderr.rstrip().splitlines()[-1] == (
        f"stopped: terminated ({scheduler_signal}, handled as SIGTERM); {rest}"), result.stderr[-3000:]

def test_slurms_warning_signals_leave_an_ignored_one_and_a_programs_own_handler_as_they_are(monkeypatch):
    """Only Python's default (which ends the job at once) is replaced: a SIGUSR1 ignored by the job's
    launcher, or a SIGUSR2 handler of a program that runs the job, stays."""
    from pixelflow_jax import command_line

    def own(*_):
        pass

    before = signal.signal(signal.SIGUSR1, signal.SIG_IGN), signal.signal(signal.SIGUSR2, own)
    try:
        command_line.stop_on_scheduler_signals()
        assert (signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGUSR2)) == (signal.SIG_IGN, own)
        signal.signal(signal.SIGUSR2, signal.SIG_DFL)
        command_line.stop_on_scheduler_signals()
        assert signal.getsignal(signal.SIGUSR2) is command_line._pass_on_as_sigterm
    finally:
        signal.signal(signal.SIGUSR1, before[0])
        signal.signal(signal.SIGUSR2, before[1])


def test_a_sighup_dropped_where_python_ignores_exceptions_is_raised_again_as_a_hang_up(monkeypatch):
    """As a dropped SIGTERM (below): the job's next batch raises it again, as the hang-up it was
    (exit 129, not SIGTERM's 143), and a SIGHUP dropped in a gc callback is delivered again as one."""
    import signal
    from types import SimpleNamespace

    from pixelflow_jax import command_line

    delivered_again = []
    monkeypatch.setattr(command_line, "deliver_again_later", delivered_again.append)
    monkeypatch.setattr(command_line, "_stop_signal", [None])
    with stop_handlers_kept():
        command_line.stop_on_hang_up()
        with pytest.raises(command_line.HungUp) as stop:
            os.kill(os.getpid(), signal.SIGHUP)
            sum(range(1000))  # bytecodes for the handler to run between
        command_line.quiet_library_noise(SimpleNamespace(exc_type=command_line.HungUp, exc_value=stop.value,
                                                         exc_traceback=None), previous=pytest.fail)
        command_line.quiet_library_noise(SimpleNamespace(exc_type=command_line.Terminated,
                                                         exc_value=command_line.Terminated(),
                                                         exc_traceback=None), previous=pytest.fail)
        assert delivered_again == [signal.SIGHUP, signal.SIGTERM]  # a SIGTERM's drop comes round as a SIGTERM
        with pytest.raises(command_line.HungUp):
            command_line.stop_if_terminated()
        assert command_line.stop_cause(command_line.stop_received()) == (
            "hung up (SIGHUP: the terminal or ssh session it was started from closed)", 129)
        monkeypatch.setitem(command_line._redelivering, signal.SIGHUP, True)  # its delivery again, sent already,
        signal.getsignal(signal.SIGHUP)(signal.SIGHUP, None)  # reaches the handler after the job raised it: not twice
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nohup's
        command_line.stop_on_hang_up()
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN

        def own(*_):  # a program's own handler
            pass

        signal.signal(signal.SIGHUP, own)
        command_line.stop_on_hang_up()
        assert signal.getsignal(signal.SIGHUP) is own


@pytest.mark.parametrize("first, then", [("SIGHUP", "SIGTERM"), ("SIGTERM", "SIGHUP")])
def test_a_hang_up_and_a_sigterm_both_received_stop_the_job_as_a_hang_up(monkeypatch, first, then):
    """Which stop arrived is one record: a SIGTERM does not replace a hang-up before it (exit 129
    either way), and a hang-up after a SIGTERM is the stop the job's next check raises."""
    from pixelflow_jax import command_line

    monkeypatch.setattr(command_line, "_stop_signal", [None])
    with stop_handlers_kept():
        command_line.stop_on_sigterm()
        command_line.stop_on_hang_up()
        for signum in (first, then):
            with pytest.raises(command_line.Terminated):
                os.kill(os.getpid(), getattr(signal, signum))
                sum(range(1000))  # bytecodes for the handler to run between
        with pytest.raises(command_line.HungUp):
            command_line.stop_if_terminated()
        assert command_line.stop_cause(command_line.stop_received())[1] == 129


def test_a_sampling_job_hands_its_evaluation_the_count_of_images_it_sampled(tmp_path, monkeypatch):
    """eval.json's images_sampled_by_this_job comes from the sampling job's own count, not null."""
    from types import SimpleNamespace

    sys.path.insert(0, REPO)
    import main
    from configs import c2i
    from pixelflow_jax.evaluation import evaluate
    from pixelflow_jax.sampling import sample_run

    config = c2i.get_config("tiny")
    config.eval.reference = "ref.npz"
    evaluated = []
    monkeypatch.setattr(evaluate, "check_inputs", lambda *args: None)
    monkeypatch.setattr(sample_run, "run", lambda config, workdir: 5)
    monkeypatch.setattr(evaluate, "run", lambda *args: evaluated.append(args))
    for mode in ("sample", "eval"):
        monkeypatch.setattr(main, "FLAGS", SimpleNamespace(mode=mode, config=config, workdir=str(tmp_path),
                                                           distributed=False))
        with stop_handlers_kept():
            main.sample_or_eval_mode()
    assert evaluated == [(config, str(tmp_path), str(tmp_path / "samples.npz"), 5), (config, str(tmp_path))]
