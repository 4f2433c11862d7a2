"""A training workdir is a checkpoint: its latest complete step or a named one, EMA or raw weights,
never a step killed mid-save; exported to a release folder with the release's exact keys."""

import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from conftest import REPO, c2i_config, cpu_devices, fixture_dir, json_edited, run_converter
from pixelflow_jax import CheckpointError, load_model
from pixelflow_jax.checkpoints.convert import params_to_torch
from pixelflow_jax.checkpoints.run_checkpoint import find_run_step
from pixelflow_jax.software_versions import job_environment
from pixelflow_jax.training.run_config import check_run_config

STAGE_RESOLUTIONS = (8, 16, 32, 64)  # the c2i_tiny fixture: 64 px, 4 stages


def pure_params(model):
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def perturbed(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (a + 0.01 * rng.standard_normal(a.shape)).astype(a.dtype), params)


@pytest.fixture(scope="module")
def run(converted, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run") / "run")
    return workdir, write_run(converted["c2i_tiny"], workdir)


def write_run(converted_folder: str, workdir: str) -> dict:
    """A training workdir as train.py writes it, with known weights: step 4's EMA is the release
    fixture's weights and its raw weights a perturbation of them; step 2 holds two other sets.
    Returns {step: {"params": raw weights, "ema": EMA weights}}."""
    from configs import c2i
    from pixelflow_jax.training import checkpointing
    from pixelflow_jax.training.train_step import StepConfig, init_state, make_optimizer

    model, ckpt = load_model(converted_folder)
    config = c2i.get_config("tiny")
    check_run_config(workdir, ckpt.model, config)
    release = pure_params(model)
    weights = {2: {"params": perturbed(release, 2), "ema": perturbed(release, 3)},
               4: {"params": perturbed(release, 4), "ema": release}}
    manager = checkpointing.checkpoint_manager(workdir, keep=5)
    for step, chosen in weights.items():
        state = init_state(model, make_optimizer(StepConfig()), seed=0)
        state.update(jax.tree.map(jax.numpy.asarray, chosen))
        checkpointing.save(manager, step, state)
    manager.wait_until_finished()
    manager.close()
    return weights


def assert_params_equal(model, expected):
    for got, want in zip(jax.tree.leaves(pure_params(model)), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(got, want)


def test_run_loads_its_latest_step_ema_by_default_raw_weights_on_request(run):
    workdir, weights = run
    model, config = load_model(workdir)
    assert config.resolution == 64 and config.num_stages == 4 and config.model.num_classes == 1000
    assert_params_equal(model, weights[4]["ema"])
    assert_params_equal(load_model(workdir, weights="model")[0], weights[4]["params"])
    assert_params_equal(load_model(os.path.join(workdir, "checkpoints", "2"))[0], weights[2]["ema"])
    assert_params_equal(load_model(os.path.join(workdir, "checkpoints", "2"), weights="model")[0],
                        weights[2]["params"])
    with pytest.raises(CheckpointError, match="weights must be one of"):
        load_model(workdir, weights="opt_state")
    model, _ = load_model(workdir, dtype=jax.numpy.bfloat16)  # a dtype object, as JAX users pass it
    assert model.config.dtype == "bfloat16"
    for argument, message in (({"dtype": "int8"}, "dtype must be one of"), ({"attention": "flash"},
                                                                            "attention must be one of")):
        with pytest.raises(CheckpointError, match=message):  # before the path is even looked at
            load_model("hf://nobody/nothing", **argument)
    here = os.getcwd()
    try:  # a step named relative to its run: the run's name is its absolute path, not ""
        os.chdir(workdir)
        with pytest.raises(CheckpointError, match=f"training run {workdir}: step '9' does not exist"):
            load_model("checkpoints/9")
    finally:
        os.chdir(here)


def test_a_link_to_a_step_loads_that_step_not_the_runs_latest(run, tmp_path):
    """`ln -s RUN/checkpoints/2 best` was refused as a folder inside the run, with the advice to pass
    the run: that loads the run's latest step (4), other weights than the link names."""
    workdir, weights = run
    best = tmp_path / "best"
    best.symlink_to(os.path.join(workdir, "checkpoints", "2"))
    assert find_run_step(str(best)).step == 2
    assert_params_equal(load_model(str(best))[0], weights[2]["ema"])
    assert_params_equal(load_model(str(best), weights="model")[0], weights[2]["params"])
    gone = tmp_path / "gone"
    gone.symlink_to(os.path.join(workdir, "checkpoints", "3"))  # a step rotated away since the link was made
    with pytest.raises(CheckpointError, match=r"step '3' does not exist; its complete steps are \[2, 4\]"):
        load_model(str(gone))


# The late reads' 'Event loop is closed' errors were unraisable warnings here (quiet now: command_line.py).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_damaged_step_is_named_briefly_with_the_steps_that_load(run, tmp_path):
    """The message held 2 KB of tensorstore's JSON spec and named no other step."""
    damaged = tmp_path / "run"
    shutil.copytree(run[0], damaged)
    for root, _, files in os.walk(damaged / "checkpoints" / "4"):
        for name in files:
            if "d" == os.path.basename(root):  # the array data files
                with open(os.path.join(root, name), "r+b") as f:
                    f.truncate(10)
    with pytest.raises(CheckpointError) as error:
        load_model(str(damaged))
    message = str(error.value)
    assert "(damaged, or not this run's architecture" in message and "tensorstore_spec" not in message
    assert message.endswith(f"the run's other complete steps: [2] (load {damaged}/checkpoints/2)")
    assert len(message) < 1500


def test_a_run_config_that_does_not_describe_the_runs_weights_is_named_not_its_steps(run, tmp_path):
    """A run_config.json edited by hand (or copied from another run) was 'cannot restore ... (damaged,
    or not this run's architecture ...)' with advice to load the run's other step, which failed alike."""
    edited = tmp_path / "run"
    shutil.copytree(run[0], edited)
    with json_edited(edited / "run_config.json") as values:
        values["architecture"]["attention_head_dim"] *= 2
    with pytest.raises(CheckpointError) as error:
        load_model(str(edited))
    message = str(error.value)
    assert message.startswith(f"{edited}/checkpoints/4 holds weights of another architecture than "
                              f"{edited}/run_config.json describes (class_embedder/embedding_table/embedding "
                              "(1001, 32) stored, (1001, 64) described, ")
    assert message.endswith("was run_config.json edited, or copied from another run? Put the run's own back")
    assert "other complete steps" not in message


def test_a_run_config_missing_architecture_fields_names_them_not_xls_defaults(run, tmp_path):
    """A run_config.json whose architecture lost fields (an edit) was read with XL's defaults in their
    place: 'holds weights of another architecture than run_config.json describes' (depth 28)."""
    edited = tmp_path / "run"
    shutil.copytree(run[0], edited)
    with json_edited(edited / "run_config.json") as values:
        del values["architecture"]["depth"], values["architecture"]["num_classes"]
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(edited))}/run_config.json does not describe a model: "
                                              r"its architecture lacks depth, num_classes\. Put back its content"):
        load_model(str(edited))


@pytest.mark.parametrize("architecture", ["left out", None])
def test_a_run_config_without_an_architecture_mapping_is_refused_in_one_line(run, tmp_path, architecture):
    """No architecture at all (or one that is no mapping) has no fields to name as missing: it is
    refused as not describing a model, not in a TypeError's traceback."""
    edited = tmp_path / "run"
    shutil.copytree(run[0], edited)
    with json_edited(edited / "run_config.json") as values:
        if architecture == "left out":
            del values["architecture"]
        else:
            values["architecture"] = architecture
    with pytest.raises(CheckpointError, match=rf"^{re.escape(str(edited))}/run_config.json does not describe a model"):
        load_model(str(edited))


@pytest.mark.parametrize("content,problem", [("{\"architecture\": {\"num_att", "JSONDecodeError: Unterminated string"),
                                             ("[]", "a JSON list, not an object")])
def test_a_run_config_cut_short_by_a_copy_is_named_damaged_with_the_fix(run, tmp_path, content, problem):
    """A copy (rsync) stopped midway left run_config.json cut short: 'cannot read run_config.json: Unterminated
    string starting at ...', no fix named; a JSON list was "'list' object has no attribute 'setdefault'"."""
    copy = tmp_path / "run"
    shutil.copytree(run[0], copy)
    (copy / "run_config.json").write_text(content)
    with pytest.raises(CheckpointError) as error:
        load_model(str(copy))
    assert str(error.value).startswith(f"{copy}/run_config.json is damaged ({problem}")
    assert str(error.value).endswith("it describes the model of the run's checkpoints. Put back its content (a copy "
                                     "of the run that stopped midway? copy the file again)")


def test_sampling_a_run_reads_the_weights_sample_weights_names(run):
    """sample, demo and inspect read a run's EMA by default and its raw weights with
    --config.sample.weights=model."""
    from configs import c2i
    from pixelflow_jax.api import load_for_sampling

    workdir, weights = run
    config = c2i.get_config("tiny")
    for chosen, stored in (("ema", "ema"), ("model", "params")):
        config.sample.weights = chosen
        assert_params_equal(load_for_sampling(config, workdir)[0], weights[4][stored])


def test_weights_that_restore_as_nan_are_refused_with_their_names_not_sampled_or_exported(converted, tmp_path):
    """Files damaged after they were written can restore as NaN: load_model accepted them and the
    export wrote them into model.pt (which the converter's other direction then refused)."""
    from configs import c2i
    from pixelflow_jax.checkpoints.checkpoint import read_config, save_checkpoint
    from pixelflow_jax.training import checkpointing
    from pixelflow_jax.training.train_step import StepConfig, init_state, make_optimizer

    model, ckpt = load_model(converted["c2i_tiny"])
    params = jax.tree.map(np.array, pure_params(model))  # writable copies
    params["transformer_blocks"]["mlp"]["fc2"]["kernel"][1, 0, 0] = np.nan
    folder = str(tmp_path / "converted")
    save_checkpoint(folder, params, read_config(converted["c2i_tiny"]))
    with pytest.raises(CheckpointError, match=r"converted/params: transformer_blocks/mlp/fc2/kernel hold NaN or inf "
                                              r"values \(files damaged .*: convert again"):
        load_model(folder)

    workdir = str(tmp_path / "run")
    check_run_config(workdir, ckpt.model, c2i.get_config("tiny"))
    manager = checkpointing.checkpoint_manager(workdir, keep=5)
    for step in (2, 4):
        state = init_state(model, make_optimizer(StepConfig()), seed=0)
        if step == 4:
            state["ema"] = jax.tree.map(jax.numpy.asarray, params)
        checkpointing.save(manager, step, state)
    manager.wait_until_finished()
    manager.close()
    with pytest.raises(CheckpointError, match=r"the ema weights of .*checkpoints/4: transformer_blocks/mlp/fc2/kernel "
                                              r"hold NaN.*: load another step; the run's other complete steps: \[2\]"):
        load_model(workdir)
    load_model(workdir, weights="model")  # the raw weights of the same step are whole
    result = run_converter("--to_torch", f"--jax_checkpoint={workdir}", f"--output={tmp_path / 'export'}")
    assert result.returncode == 1 and "transformer_blocks/mlp/fc2/kernel hold NaN" in result.stderr, result.stderr
    assert not (tmp_path / "export").exists()


def test_ema_restore_reads_only_the_ema(run, monkeypatch):
    """Partial restore: the optimiser moments and raw weights are never part of the request."""
    import orbax.checkpoint as ocp

    requested = []
    original = ocp.PyTreeCheckpointer.restore

    def spy(self, path, *args, **kwargs):
        requested.append(set(kwargs["args"].item))
        return original(self, path, *args, **kwargs)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", spy)
    load_model(run[0])
    assert requested == [{"ema"}]


def test_a_step_killed_mid_save_is_never_loaded(run, tmp_path, caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(run[0], workdir)
    checkpoints = os.path.join(workdir, "checkpoints")
    # What orbax leaves behind when killed mid-save: the step's temporary folder, half written.
    partial = os.path.join(checkpoints, "6.orbax-checkpoint-tmp-1795755085")
    shutil.copytree(os.path.join(checkpoints, "4"), partial)
    shutil.rmtree(os.path.join(partial, "state", "d"), ignore_errors=True)
    with caplog.at_level(logging.WARNING):
        model, _ = load_model(workdir)
    assert_params_equal(model, run[1][4]["ema"])
    assert "step 6 is incomplete" in caplog.text and "using step 4" in caplog.text
    with pytest.raises(CheckpointError, match=r"step 6 is incomplete .*complete steps are \[2, 4\]"):
        find_run_step(os.path.join(checkpoints, "6"))
    # The folder itself, as `ls checkpoints/` shows it, was "step '6.orbax-checkpoint-tmp-...' does not exist".
    with pytest.raises(CheckpointError, match=r"6.orbax-checkpoint-tmp-1795755085 is the temporary folder of step 6, "
                                              r"incomplete .*; its complete steps are \[2, 4\]$"):
        find_run_step(partial)

    for step in ("2", "4"):
        shutil.rmtree(os.path.join(checkpoints, step))
    with pytest.raises(CheckpointError, match="no complete checkpoint yet; step 6 is still being written"):
        load_model(workdir)


def test_a_run_that_swaps_its_only_step_while_it_is_listed_is_read_at_its_new_step(run, tmp_path, monkeypatch):
    """A run keeping one step (train.keep_checkpoints=1) finalises step N+1, then deletes step N.
    Sampling it while it trained listed both folders, found N gone (not finalised) and N+1 still
    temporary in its listing: 'no complete checkpoint yet; step 6 is still being written. Wait for
    the first checkpoint', of a run at its 200th (2 of 4 sampling jobs beside a run saving every
    step), and inspect timed the config's random model. The run is listed again, its new step read."""
    import orbax.checkpoint as ocp

    from pixelflow_jax import inspect_model

    workdir, weights = run
    real = ocp.step.is_path_finalized

    def run_about_to_swap(name):
        copy = tmp_path / name
        shutil.copytree(workdir, copy)
        checkpoints = copy / "checkpoints"
        shutil.rmtree(checkpoints / "2")
        temporary = checkpoints / "6.orbax-checkpoint-tmp-1795755085"
        shutil.copytree(checkpoints / "4", temporary)

        def run_saves_step_6_meanwhile(path, *args, **kwargs):
            if os.path.basename(str(path)) == "4" and temporary.exists():  # listed: 4 and 6's temporary folder
                os.rename(temporary, checkpoints / "6")
                shutil.rmtree(checkpoints / "4")
            return real(path, *args, **kwargs)

        monkeypatch.setattr(ocp.step, "is_path_finalized", run_saves_step_6_meanwhile)
        return copy

    copy = run_about_to_swap("sampled")
    assert_params_equal(load_model(str(copy))[0], weights[4]["ema"])  # step 6's folder holds step 4's weights here
    assert sorted(os.listdir(copy / "checkpoints")) == ["6"]
    config = c2i_config()
    inspect_model.fill_checkpoint_of_run(config, str(run_about_to_swap("inspected")))
    assert config.sample.checkpoint == str(tmp_path / "inspected")


def test_a_step_a_training_run_rotates_away_while_it_is_read_is_not_called_damaged(run, tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    workdir = str(tmp_path / "run")
    shutil.copytree(run[0], workdir)
    real_restore = ocp.PyTreeCheckpointer.restore

    def rotated_away_midway(self, path, *args, **kwargs):  # the training run's keep_checkpoints, mid-read
        shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
        return real_restore(self, path, *args, **kwargs)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", rotated_away_midway)
    with pytest.raises(CheckpointError, match=r"checkpoints/4 was deleted while it was read: its run is still "
                                              r"training, and its checkpoint rotation .* rerun to read .*, to keep a "
                                              r"step while the run trains on, copy the run's folder without its "
                                              r"checkpoints/, then the step into the copy's checkpoints/"):
        load_model(workdir)


def test_a_step_rotated_away_while_a_sampling_job_fingerprints_it_is_named_so(run, tmp_path, monkeypatch):
    """A job sampling a run that trains on (keep_checkpoints=1, a save every few steps, in a bucket)
    lists the step's files to record its fingerprint; the rotation removed one before it was read,
    and the job ended in gcsfs's FileNotFoundError traceback, naming an object's download URL."""
    from pixelflow_jax import storage
    from pixelflow_jax.api import resolve_checkpoint

    workdir = str(tmp_path / "run")
    shutil.copytree(run[0], workdir)
    source = resolve_checkpoint(workdir)
    real_file_sizes = storage.reads.file_sizes

    def listed_then_rotated_away(folder):
        sizes = real_file_sizes(folder)
        shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
        return sizes

    monkeypatch.setattr(storage.reads, "file_sizes", listed_then_rotated_away)
    with pytest.raises(CheckpointError, match=r"checkpoints/4 was deleted while it was read: its run is still "
                                              r"training, and its checkpoint rotation"):
        source.fingerprint()


class RunRotating:
    """A run training on as it is read: at each of its next `left` restores, it saves a newer step
    (two past its newest, holding step 2's weights) and its rotation deletes the step being read.
    `rotated`: the steps rotated away, as they go."""

    def __init__(self, workdir, monkeypatch, left: int):
        import orbax.checkpoint as ocp

        self.checkpoints, self.left, self.rotated = os.path.join(str(workdir), "checkpoints"), left, []
        real_restore = ocp.PyTreeCheckpointer.restore

        def restore_as_the_run_rotates(checkpointer, path, *args, **kwargs):
            if self.left:
                self.rotate(os.path.dirname(str(path)))  # STEP/state
            return real_restore(checkpointer, path, *args, **kwargs)

        monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", restore_as_the_run_rotates)

    def rotate(self, step_folder: str) -> None:
        newest = max(int(name) for name in os.listdir(self.checkpoints) if name.isdigit())
        shutil.copytree(os.path.join(self.checkpoints, "2"), os.path.join(self.checkpoints, str(newest + 2)))
        shutil.rmtree(step_folder)
        self.rotated.append(int(os.path.basename(step_folder)))
        self.left -= 1


def test_a_run_named_is_read_at_its_new_latest_step_when_its_rotation_deletes_the_one_chosen(run, tmp_path,
                                                                                           monkeypatch, caplog):
    """Sampling, inspecting, exporting or fine-tuning from a run while it trains (keep_checkpoints,
    a save every few minutes): the step chosen as its latest was rotated away during the read (at
    XL, minutes), and the job stopped, asking for a rerun. A run named is read again at its new latest
    step, and what each job records or shows names that step, not the one first chosen."""
    from configs import c2i
    from pixelflow_jax.api import load_for_sampling, resolve_checkpoint
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.demo_app import DemoSampler
    from pixelflow_jax.training.train import load_init_from

    workdir, weights = shutil.copytree(run[0], tmp_path / "run"), run[1]
    rotation = RunRotating(workdir, monkeypatch, left=1)
    with caplog.at_level("WARNING"):
        assert_params_equal(load_model(str(workdir))[0], weights[2]["ema"])  # step 6: a copy of step 2
    assert rotation.rotated == [4] and sorted(os.listdir(workdir / "checkpoints")) == ["2", "6"]
    assert (f"{workdir}/checkpoints/4 was rotated away by its run's training while it was read; reading the run's "
            "latest step, 6") in caplog.text
    config = c2i.get_config("tiny")
    rotation.left = 1
    source = load_for_sampling(config, str(workdir))[2]  # inspect's read
    assert (source.run_step.step, source.label) == (8, str(workdir / "checkpoints" / "8"))
    rotation.left = 1
    assert DemoSampler(config, str(workdir)).source.run_step.step == 10
    rotation.left = 1
    source = load_init_from(config, ModelConfig.from_mapping(config.model), resolve_checkpoint(str(workdir)))[1]
    assert source.label == str(workdir / "checkpoints" / "12")
    assert rotation.rotated == [4, 6, 8, 10] and not rotation.left


def test_a_sampling_job_and_an_export_of_a_run_record_the_step_they_read_through_its_rotation(run, tmp_path,
                                                                                               monkeypatch):
    """The job's settings.json (checkpoint and fingerprint) and the export's note name the step read."""
    from pixelflow_jax import storage
    from test_sample_cli import sample_in_process

    workdir = shutil.copytree(run[0], tmp_path / "run")
    RunRotating(workdir, monkeypatch, left=1)
    sample_in_process(tmp_path / "sampled", str(workdir), monkeypatch, num_images=2)
    settings = json.loads((tmp_path / "sampled" / "samples" / "settings.json").read_text())
    assert settings["checkpoint"] == str(workdir / "checkpoints" / "6")
    assert settings["checkpoint_fingerprint"] == storage.fingerprint(str(workdir / "checkpoints" / "6"))
    job, = [json.loads(line) for line in open(tmp_path / "sampled" / "samples" / "sampling_runs.jsonl")]
    assert (job["checkpoint"], job["checkpoint_step"]) == (settings["checkpoint"], 6)  # the step read, not 4
    # The converter as a user runs it, its restore rotated away once in its own process.
    export = subprocess.run([sys.executable, "-c", ROTATING_EXPORT, str(workdir), str(tmp_path / "export")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert export.returncode == 0, export.stderr
    assert "checkpoints/6 was rotated away" in export.stderr
    assert "of step 10 of the training run in the folder run" in (tmp_path / "export" / "config.yaml").read_text()


ROTATING_EXPORT = """
import os, shutil, runpy, sys
import orbax.checkpoint as ocp
run, output = sys.argv[1:]
checkpoints, real_restore = os.path.join(run, "checkpoints"), ocp.PyTreeCheckpointer.restore
def restore_as_the_run_rotates(self, path, *args, **kwargs):
    if not os.path.exists(os.path.join(checkpoints, "10")):
        shutil.copytree(os.path.join(checkpoints, "2"), os.path.join(checkpoints, "10"))
        shutil.rmtree(os.path.dirname(str(path)))
    return real_restore(self, path, *args, **kwargs)
ocp.PyTreeCheckpointer.restore = restore_as_the_run_rotates
sys.argv = ["convert_torch_ckpt.py", "--to_torch", f"--jax_checkpoint={run}", f"--output={output}"]
runpy.run_path("convert_torch_ckpt.py", run_name="__main__")
"""


def test_only_a_run_named_whose_latest_step_is_newer_than_the_one_rotated_away_is_read_again(run, tmp_path):
    """A read is taken again from a newer step only: where the step that failed is still the run's
    newest (its rotation still removing it, as listed), reading it again would fail as before, and
    where no complete step is left the error is the rotation's, not 'no checkpoint yet'."""
    from pixelflow_jax.api import newer_latest_step
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep

    workdir = str(shutil.copytree(run[0], tmp_path / "run"))  # steps 2 and 4
    assert newer_latest_step(RunStep(workdir, 2, latest=True)) == RunStep(workdir, 4, latest=True)
    assert newer_latest_step(RunStep(workdir, 4, latest=True)) is None  # still listed as the newest
    assert newer_latest_step(RunStep(workdir, 2)) is None  # a step the user named
    assert newer_latest_step(None) is None  # not a training run
    for step in ("2", "4"):
        shutil.rmtree(os.path.join(workdir, "checkpoints", step))
    assert newer_latest_step(RunStep(workdir, 4, latest=True)) is None


def test_a_step_named_that_its_run_rotates_away_is_not_read_at_another_and_the_error_says_to_name_the_run(
        run, tmp_path, monkeypatch):
    from pixelflow_jax.checkpoints.run_checkpoint import StepRotatedAway

    workdir = shutil.copytree(run[0], tmp_path / "run")
    RunRotating(workdir, monkeypatch, left=1)
    with pytest.raises(StepRotatedAway, match=rf"checkpoints/4 was deleted while it was read: its run is still "
                                              rf"training, .* removed the step; pass the run \({re.escape(str(workdir))}"
                                              r"\) instead of one of its steps, to read whichever step is its latest, "
                                              r"or, to keep a step .*\(a run started with a larger "
                                              r"train.keep_checkpoints keeps more steps\)$"):
        load_model(str(workdir / "checkpoints" / "4"))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "6"]  # not read: another step than the one named


def test_reads_through_a_runs_rotation_stop_after_five_and_a_job_of_several_processes_does_not_retry(
        run, tmp_path, monkeypatch):
    """Each process choosing its own step would sample with other weights than the others."""
    from pixelflow_jax.checkpoints.run_checkpoint import StepRotatedAway

    workdir = shutil.copytree(run[0], tmp_path / "run")
    rotation = RunRotating(workdir, monkeypatch, left=100)
    with pytest.raises(StepRotatedAway, match=r"checkpoints/12 was deleted while it was read: .*; each of the 5 steps "
                                              r"read in turn was rotated away while it was read \(the run saves "
                                              r"faster than a step is read\): rerun, or, to keep a step"):
        load_model(str(workdir))
    assert rotation.rotated == [4, 6, 8, 10, 12]
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(StepRotatedAway, match=r"checkpoints/14 was deleted while it was read: .*; the processes of a "
                                              r"job must read one step, so they do not each choose another: rerun to "
                                              r"read the run's latest step, or"):
        load_model(str(workdir))
    assert rotation.rotated[5:] == [14]


def test_a_step_whose_rotation_is_still_removing_it_when_the_read_fails_is_not_called_damaged(run, tmp_path,
                                                                                                monkeypatch):
    """Sampling a tiny run that saved every step with keep_checkpoints=1: the rotation (a file at a
    time) had removed the files the read needed, and the step's folder was still there when the
    read failed, so the error called it damaged or another architecture."""
    import threading
    import time

    import orbax.checkpoint as ocp

    workdir = str(tmp_path / "run")
    shutil.copytree(run[0], workdir)
    step_4 = os.path.join(workdir, "checkpoints", "4")
    real_restore = ocp.PyTreeCheckpointer.restore

    def remove_a_file_at_a_time():
        for parent, _, names in sorted(os.walk(step_4), reverse=True):  # deepest first, as a removal goes
            for name in names:
                time.sleep(0.2)
                os.remove(os.path.join(parent, name))
        shutil.rmtree(step_4)

    remover = threading.Thread(target=remove_a_file_at_a_time)

    def rotation_midway(self, path, *args, **kwargs):
        os.remove(os.path.join(step_4, "state", "manifest.ocdbt"))  # what the read needs is gone first
        remover.start()
        return real_restore(self, path, *args, **kwargs)

    monkeypatch.setattr(ocp.PyTreeCheckpointer, "restore", rotation_midway)
    try:
        with pytest.raises(CheckpointError, match=r"checkpoints/4 was deleted while it was read: its run is still "
                                                  r"training, and its checkpoint rotation"):
            load_model(workdir)
    finally:
        remover.join()


def test_a_step_copied_out_of_its_run_is_named_so_and_the_copy_the_message_asks_for_loads_it(run, tmp_path):
    """The refusal above advised 'copy a step out of checkpoints/ to read that', and a step copied
    alone was refused as no checkpoint, with nothing saying why (its run's run_config.json holds the
    architecture). Both now ask for the run copied without its steps, the step added: that loads."""
    workdir, weights = run
    step = os.path.join(workdir, "checkpoints", "2")
    alone = tmp_path / "step_2"
    shutil.copytree(step, alone)
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: .*; it is a training run's step copied out of its "
                                              r"run, .* copy the run's folder without its checkpoints/, then the step "
                                              r"into the copy's checkpoints/, and read the copy$"):
        load_model(str(alone))
    os.remove(alone / "_CHECKPOINT_METADATA")  # a folder that merely holds a state/ is not called a step
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: ") as refused:
        load_model(str(alone))
    assert "copied out of its run" not in str(refused.value)
    other = tmp_path / "other_orbax_step"  # another program's orbax step: its items are not our state/
    (other / "default").mkdir(parents=True)
    shutil.copy(step + "/_CHECKPOINT_METADATA", other)
    with pytest.raises(CheckpointError, match=r"is not a checkpoint: ") as refused:
        load_model(str(other))
    assert "copied out of its run" not in str(refused.value)
    kept = tmp_path / "kept"
    shutil.copytree(workdir, kept, ignore=lambda folder, names: ["checkpoints"] if folder == workdir else [])
    shutil.copytree(step, kept / "checkpoints" / "2")
    assert_params_equal(load_model(str(kept))[0], weights[2]["ema"])
    assert_params_equal(load_model(str(kept), weights="model")[0], weights[2]["params"])


def test_a_step_the_run_set_aside_is_named_so_and_the_copy_the_message_asks_for_loads_it(run, tmp_path):
    """A step a resume moved to RUN/unreadable_checkpoints/STEP-TIME (it did not restore then) was
    called 'copied out of its run', and the fix it gave (the step into a copy's checkpoints/) kept
    the name 4-TIME, which is no step: the copy had none. The refusal names the step and its name."""
    workdir, weights = run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    aside = copy / "unreadable_checkpoints" / "4-1764600000-2"
    aside.parent.mkdir()
    os.rename(copy / "checkpoints" / "4", aside)
    for path in (aside, f"{aside}/"):
        with pytest.raises(CheckpointError, match=rf"is not a checkpoint: .*; it is step 4 of the run {copy}, set "
                                                  r"aside at a resume because it did not restore then \(damaged, or a "
                                                  r"read error that has passed\): to try it, copy the run's folder "
                                                  r"without its checkpoints/, then this folder into the copy's "
                                                  r"checkpoints/ named 4, and read the copy$"):
            load_model(str(path))
    kept = tmp_path / "kept"
    shutil.copytree(copy, kept, ignore=lambda folder, names: ["checkpoints"] if folder == str(copy) else [])
    shutil.copytree(aside, kept / "checkpoints" / "4")
    assert_params_equal(load_model(str(kept))[0], weights[4]["ema"])


def test_a_folder_named_like_a_step_is_neither_read_nor_removed(run, tmp_path):
    """'040' was taken for step 40: the run could not be sampled, and a resume deleted the folder
    as a killed save's leftover."""
    from pixelflow_jax.training.checkpointing import remove_unfinished_saves

    workdir = str(tmp_path / "run")
    shutil.copytree(run[0], workdir)
    mine = os.path.join(workdir, "checkpoints", "040")
    shutil.copytree(os.path.join(workdir, "checkpoints", "4"), mine)  # a copy someone kept
    model, _ = load_model(workdir)
    assert_params_equal(model, run[1][4]["ema"])
    assert remove_unfinished_saves(workdir) == [] and os.path.isdir(mine)


def test_a_missing_step_lists_the_steps_that_exist(run):
    with pytest.raises(CheckpointError, match=r"step '3' does not exist; its complete steps are \[2, 4\]"):
        load_model(os.path.join(run[0], "checkpoints", "3"))


def test_an_unreadable_step_points_to_the_newest_other_step(tmp_path):
    """The error about a step that does not restore names the run's other complete steps and the
    one to load: the newest of them, not an early one that would lose most of the training."""
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep, other_steps

    for step in (2, 4, 6, 8):
        (tmp_path / "checkpoints" / str(step)).mkdir(parents=True)
    assert other_steps(RunStep(str(tmp_path), 6)) == \
        f"; the run's other complete steps: [2, 4, 8] (load {tmp_path / 'checkpoints'}/8)"
    assert other_steps(RunStep(str(tmp_path / "checkpoints" / "none"), 6)) == ""


def test_fine_tuning_starts_from_the_runs_ema_or_raw_weights(run):
    """The second fine-tune builds its state with the first one's program (the weights are its
    argument) and gets its own weights."""
    from configs import c2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.sharding import make_mesh
    from pixelflow_jax.training import train
    from pixelflow_jax.training.train_step import StepConfig
    from test_sampling import counting_lowerings

    config = c2i.get_config("tiny")
    config.model.num_classes = 1000
    config.train.init_from = run[0]
    model_cfg = ModelConfig.from_mapping(config.model)
    for weights, key in (("ema", "ema"), ("model", "params")):
        config.train.init_from_weights = weights
        init_model, source = train.load_init_from(config, model_cfg)
        assert source.run_step.run == run[0]
        with counting_lowerings() as compiled:
            _, state, _ = train.initial_state(config, model_cfg, StepConfig(), make_mesh(1), init_model)
        for got, ema, want in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state["ema"]),
                                  jax.tree.leaves(run[1][4][key])):
            np.testing.assert_array_equal(np.asarray(got), want)
            np.testing.assert_array_equal(np.asarray(ema), want)  # the EMA starts as the weights
        assert not any(np.asarray(m).any() for m in jax.tree.leaves(state["opt_state"]))  # fresh moments
    assert compiled == []  # the second's
    config.model.num_classes = 10
    with pytest.raises(ValueError, match=r"init_from .* is another model: num_classes 1000 there, 10 in this config; "
                                         r"set --config.model.\* to the checkpoint's values \(its class table holds "
                                         r"1000 classes and loads only whole: for data of fewer classes keep "
                                         r"--config.model.num_classes=1000; the classes the data lacks never train\)"):
        train.load_init_from(config, ModelConfig.from_mapping(config.model))


def test_a_fine_tune_to_more_classes_than_the_checkpoint_has_is_told_it_cannot_start_from_it(run):
    """A fine-tune of the 1000-class run on 1000 + 5 classes was told to keep num_classes=1000 'for
    data of fewer classes', which its data of more classes then refused: it had no way on."""
    from configs import c2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.training import train

    config = c2i.get_config("tiny")
    config.model.num_classes = 1005
    config.train.init_from = run[0]
    with pytest.raises(ValueError) as error:
        train.check_init_from(config, ModelConfig.from_mapping(config.model))
    assert str(error.value).endswith(
        "num_classes 1000 there, 1005 in this config; set --config.model.* to the checkpoint's values (its class "
        "table holds 1000 classes and loads only whole: a model of more classes cannot start from it, train it from "
        "scratch; keep --config.model.num_classes=1000 only for data of at most 1000 classes)"), str(error.value)


def test_a_fine_tune_with_another_timestep_count_is_warned(run, caplog):
    """init_from with scheduler.num_train_timesteps 500 against the checkpoint's 1000 went on without a
    word: the model takes timesteps in the scheduler's units, so every value meant another noise level."""
    import logging

    from configs import c2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.training import train

    config = c2i.get_config("tiny")
    config.model.num_classes = 1000  # the run's
    config.train.init_from = run[0]
    with caplog.at_level(logging.WARNING):
        train.check_init_from(config, ModelConfig.from_mapping(config.model))
    assert not caplog.text
    config.scheduler.num_train_timesteps = 500
    with caplog.at_level(logging.WARNING):
        train.check_init_from(config, ModelConfig.from_mapping(config.model))
    assert "trained with scheduler.num_train_timesteps 1000 and this run trains with 500" in caplog.text
    assert "set --config.scheduler.num_train_timesteps=1000 to keep them" in caplog.text


def test_a_fine_tune_with_another_stage_count_is_warned(run, caplog):
    """init_from into 2 stages from a 4-stage run was only an info line ("trained at 64 px with 4
    stages"): the scheduler gives each stage its own share of the timesteps, so the same timestep
    value meant another stage and noise level, as with another num_train_timesteps. Another
    resolution alone keeps every stage's timesteps and stays a note."""
    import logging

    from configs import c2i
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.training import train

    config = c2i.get_config("tiny")
    config.model.num_classes = 1000  # the run's
    config.train.init_from = run[0]
    def notes_of_the_fine_tune():  # (level, message) of each line that compares the run with the checkpoint
        caplog.clear()
        with caplog.at_level(logging.INFO):
            train.check_init_from(config, ModelConfig.from_mapping(config.model))
        return [(r.levelno, r.getMessage()) for r in caplog.records if " was trained " in r.getMessage()]

    config.data.resolution = 128
    [(level, note)] = notes_of_the_fine_tune()
    assert level == logging.INFO and note.endswith(" was trained at 64 px; this run trains at 128 px"), note
    config.data.resolution, config.scheduler.num_stages = 64, 2
    [(level, note)] = notes_of_the_fine_tune()  # the warning alone: no info line on the stages besides
    assert level == logging.WARNING
    assert "trained with scheduler.num_stages 4 and this run trains with 2" in note
    assert "set --config.scheduler.num_stages=4 to keep them" in note


def test_a_refused_fine_tune_on_an_image_folder_leaves_no_workdir(run, tmp_path):
    """The folder's class_index.json was written before init_from was checked."""
    from configs import c2i
    from pixelflow_jax.training import train

    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data" / name / "a.png")
    config = c2i.get_config("tiny")  # 10 classes; the run has 1000
    config.data.update(source="folder", root=str(tmp_path / "data"))
    config.train.update(init_from=run[0], batch_size=32)  # (the tests' 8 devices)
    with pytest.raises(ValueError, match="is another model: num_classes 1000 there, 10 in this config"):
        train.train(config, str(tmp_path / "fine_tune"))
    assert sorted(os.listdir(tmp_path)) == ["data"]


def forward_at_every_stage(model):
    rng = np.random.default_rng(0)
    outputs = []
    for r in STAGE_RESOLUTIONS:
        x = rng.standard_normal((2, r, r, 3)).astype(np.float32)
        outputs.append(np.asarray(model(x, np.array([500.0, 250.0], np.float32),
                                        class_labels=np.array([3, 1000]))))
    return outputs


def test_export_is_a_release_folder_with_the_release_keys_that_reads_back(run, tmp_path):
    import torch

    workdir, weights = run
    export = str(tmp_path / "export")
    result = run_converter("--to_torch", f"--jax_checkpoint={workdir}", f"--output={export}")
    assert result.returncode == 0, result.stderr
    assert "the ema weights of" in result.stdout and "checkpoints/4" in result.stdout
    assert sorted(os.listdir(export)) == ["config.yaml", "model.pt"]
    exported = torch.load(os.path.join(export, "model.pt"), weights_only=True)
    release = torch.load(os.path.join(fixture_dir("c2i_tiny"), "model.pt"), weights_only=True)
    assert list(exported) == list(release)
    for key, tensor in release.items():
        assert exported[key].shape == tensor.shape and exported[key].dtype == tensor.dtype, key
        torch.testing.assert_close(exported[key], tensor, rtol=0, atol=0)  # step 4's EMA is the release's

    ours = forward_at_every_stage(load_model(workdir)[0])
    read_back = forward_at_every_stage(load_model(export)[0])  # the converter's reader, in memory
    for a, b in zip(read_back, ours):
        assert np.abs(a - b).max() <= 1e-5 * max(1.0, np.abs(b).max())

    raw = str(tmp_path / "raw")
    result = run_converter("--to_torch", f"--jax_checkpoint={workdir}/checkpoints/2", "--weights=model",
                           f"--output={raw}")
    assert result.returncode == 0, result.stderr
    exported = torch.load(os.path.join(raw, "model.pt"), weights_only=True)
    for key, value in params_to_torch(weights[2]["params"], load_model(workdir)[1].model).items():
        np.testing.assert_array_equal(exported[key].numpy(), value)

    # The other direction named on a run: the error says which direction a run takes.
    result = run_converter(f"--torch_checkpoint={workdir}", f"--output={tmp_path / 'wrong_way'}")
    assert result.returncode == 1 and f"export it with --to_torch --jax_checkpoint={workdir}" in result.stderr


def test_sample_mode_in_a_training_workdir_samples_its_run(run, tmp_path):
    """The README's loop: train with a command, then run it again with --mode=sample."""
    import subprocess
    import sys

    from conftest import REPO

    workdir = str(tmp_path / "run")
    shutil.copytree(run[0], workdir)
    with open(os.path.join(workdir, "train_settings.json"), "w") as f:  # as a run on the demo data records it
        json.dump({"data.source": "demo", "data.demo_num_classes": 10}, f)
    command = [sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}", "--mode=sample",
               "--config.sample.num_images=8", "--config.sample.batch_size=8", "--config.sample.steps_per_stage=2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(os.path.join(workdir, "samples", "settings.json")) as f:
        settings = json.load(f)
    assert settings["checkpoint"] == os.path.join(workdir, "checkpoints", "4") and settings["weights"] == "ema"
    assert np.load(os.path.join(workdir, "samples.npz"))["arr_0"].shape == (8, 64, 64, 3)
    assert "sampling: 8/8 img (100%)" in result.stderr and "ETA" in result.stderr
    # A run on the demo data: the job prints the demo's measure of its images, as classify reads them.
    from pixelflow_jax.data.demo_data import classify

    readings = [classify(image) for image in np.load(os.path.join(workdir, "samples.npz"))["arr_0"]]
    hue, outline = (sum(getattr(r, what) == asked(i) for i, r in enumerate(readings))
                    for what, asked in (("hue", lambda i: i), ("shape", lambda i: i % 5)))
    assert f"demo check (8 images, read by demo_data.classify): hue {hue}/8 ({hue / 8:.0%}), outline {outline}/8 " \
           in result.stdout, result.stdout

    from configs import c2i
    from pixelflow_jax.api import sampling_checkpoint

    with pytest.raises(CheckpointError, match="not_a_run does not exist \\(a typo\\?\\): .*--config.sample.checkpoint"):
        sampling_checkpoint(c2i.get_config("tiny").sample, str(tmp_path / "not_a_run"))
    (tmp_path / "not_a_run").mkdir()
    with pytest.raises(CheckpointError, match="not_a_run is not a training run: for a training run, give its "
                                              "workdir; for another checkpoint, set --config.sample.checkpoint"):
        sampling_checkpoint(c2i.get_config("tiny").sample, str(tmp_path / "not_a_run"))


def test_a_sample_checkpoint_set_is_sampled_though_the_workdir_is_a_run(tmp_path):
    """The workdir's run is the checkpoint only when --config.sample.checkpoint is unset."""
    from configs import c2i
    from pixelflow_jax import storage
    from pixelflow_jax.api import sampling_checkpoint

    (tmp_path / "run_config.json").write_text("{}")
    sample = c2i.get_config("tiny").sample
    assert sampling_checkpoint(sample, str(tmp_path)) == str(tmp_path)
    sample.checkpoint = "hf://owner/name"
    assert sampling_checkpoint(sample, str(tmp_path)) == "hf://owner/name"
    sample.checkpoint = ""
    with pytest.raises(storage.StorageError, match=r"^hf://owner/name: hf:// \(the Hugging Face Hub\) is read here"):
        sampling_checkpoint(sample, "hf://owner/name")  # a workdir there: named as given, not its run_config.json


def test_a_sampling_jobs_workdir_where_a_checkpoint_belongs_names_the_checkpoint_it_sampled(tmp_path):
    """A sampling job rerun without its --config.sample.checkpoint, or its workdir passed as the
    checkpoint (to the demo page, the export), was told only that the folder is no training run or
    checkpoint: the job's settings.json names the checkpoint to pass."""
    from configs import c2i
    from pixelflow_jax.api import sampling_checkpoint

    job = tmp_path / "samples_of_demo"
    (job / "samples").mkdir(parents=True)
    (job / "samples" / "settings.json").write_text(json.dumps({"checkpoint": "/runs/demo/checkpoints/7000"}))
    with pytest.raises(CheckpointError, match=f"{job} is not a training run but the workdir of a sampling job of "
                                              "/runs/demo/checkpoints/7000: set --config.sample.checkpoint to that "
                                              "checkpoint"):
        sampling_checkpoint(c2i.get_config("tiny").sample, str(job))
    with pytest.raises(CheckpointError, match=f"{job} is not a checkpoint but the workdir of a sampling job of "
                                              "/runs/demo/checkpoints/7000: pass that checkpoint instead"):
        load_model(str(job))
    # damaged, or a record without a checkpoint's path: no job to name, the usual refusal (not a traceback)
    for record in ("{", "{}", "[]", '{"checkpoint": null}', '{"checkpoint": 7000}'):
        (job / "samples" / "settings.json").write_text(record)
        with pytest.raises(CheckpointError, match=r"is not a checkpoint: expected a training run"):
            load_model(str(job))
        with pytest.raises(CheckpointError, match=f"{job} is not a training run: for a training run, give its "
                                                  "workdir"):
            sampling_checkpoint(c2i.get_config("tiny").sample, str(job))


def test_demo_page_in_a_training_workdir_serves_its_run(run):
    from configs import c2i
    from pixelflow_jax.demo_app import DemoSampler

    config = c2i.get_config("tiny")
    demo = DemoSampler(config, run[0])
    assert demo.source.run_step.step == 4 and demo.ckpt.model.num_classes == 1000
    assert_params_equal(nnx.merge(demo.sampler.graphdef, demo.sampler.state), run[1][4]["ema"])


def test_the_demo_page_names_the_weights_it_serves_only_where_the_checkpoint_holds_two_sets(run, tmp_path):
    """The page called an export of a run's raw weights 'ema weights': a converted or exported
    folder holds one set, whichever it was written from; a run holds both, and says which it serves;
    an export of a run quotes what its config.yaml says of its set."""
    from configs import c2i
    from pixelflow_jax.demo_app import DemoSampler, page_heading

    step = os.path.join(run[0], "checkpoints", "4")
    for weights in ("ema", "model"):
        config = c2i.get_config("tiny")
        config.sample.weights = weights
        demo = DemoSampler(config, run[0])
        assert page_heading(demo, weights) == ("# PixelFlow in JAX\n64 px, 4 stages, class-conditional checkpoint "
                                               f"`{step}` ({weights} weights)")
    exported = tmp_path / "raw_export"
    result = run_converter("--to_torch", f"--jax_checkpoint={run[0]}", "--weights=model", f"--output={exported}")
    assert result.returncode == 0, result.stderr
    config = c2i.get_config("tiny")
    config.sample.checkpoint = str(exported)
    demo = DemoSampler(config, str(tmp_path / "page"))
    assert_params_equal(nnx.merge(demo.sampler.graphdef, demo.sampler.state), run[1][4]["params"])
    # The export's config.yaml says which of the run's sets it holds: the page quotes it (it said nothing).
    assert page_heading(demo, "ema") == ("# PixelFlow in JAX\n64 px, 4 stages, class-conditional checkpoint "
                                         f"`{exported}`; weights: the raw weights, not their EMA (--weights=model), "
                                         "of step 4 of the training run in the folder run")


def test_the_demo_page_names_a_folder_runs_classes_by_its_class_folders(run, tmp_path):
    """A fine-tune of the 1000-class release on image folders trains id 1 as its second folder:
    the picker must say so, not offer id 1 as ImageNet's goldfish."""
    from configs import c2i
    from pixelflow_jax.demo_app import IMAGENET_NAMES, DemoSampler, class_choices
    from pixelflow_jax.sampling.sample_conditioning import TrainedClasses

    workdir = shutil.copytree(run[0], tmp_path / "run")
    (workdir / "class_index.json").write_text(json.dumps({"root": "/data", "classes": ["cats", "dogs"]}))
    demo = DemoSampler(c2i.get_config("tiny"), str(workdir))
    choices = class_choices(demo.num_classes, demo.trained_classes)
    assert len(choices) == 1000 and choices[:2] == [("0: cats", 0), ("1: dogs", 1)]
    assert choices[2] == (f"2: {json.load(open(IMAGENET_NAMES))[2]}", 2)  # ids no folder trained keep their names
    assert class_choices(4, TrainedClasses.of_folders(["cats"])) == [("0: cats", 0), ("class 1", 1), ("class 2", 2),
                                                                     ("class 3", 3)]


def test_the_demo_page_gives_bare_ids_to_the_classes_of_a_runs_data_that_names_none(run, tmp_path):
    """A fine-tune of the 1000-class release on a 3-class TFDS dataset trains ids 0-2 as that
    dataset's classes: the picker named them as ImageNet's first three. Ids it never trained keep
    their names, and a run of as many classes as its model keeps ImageNet's names for all."""
    from configs import c2i
    from pixelflow_jax.demo_app import IMAGENET_NAMES, DemoSampler, class_choices
    from pixelflow_jax.sampling.sample_conditioning import TrainedClasses

    workdir = shutil.copytree(run[0], tmp_path / "run")
    (workdir / "train_settings.json").write_text(json.dumps({"data.num_classes": 3}))
    demo = DemoSampler(c2i.get_config("tiny"), str(workdir))
    choices = class_choices(demo.num_classes, demo.trained_classes)
    names = json.load(open(IMAGENET_NAMES))
    assert len(choices) == 1000
    assert choices[:4] == [("class 0", 0), ("class 1", 1), ("class 2", 2), (f"3: {names[3]}", 3)]
    assert class_choices(1000, TrainedClasses(1000)) == class_choices(1000) == [(f"{i}: {name}", i)
                                                                               for i, name in enumerate(names)]


def test_sampling_a_folder_run_cycles_over_its_class_folders_and_takes_their_names(run, tmp_path, monkeypatch):
    """A fine-tune of a 1000-class model on three class folders: by default image i gets folder
    i mod 3 (not class i, which no folder trained), and sample.labels may name the folders."""
    from test_sample_cli import sample_in_process

    workdir = shutil.copytree(run[0], tmp_path / "run")
    (workdir / "class_index.json").write_text(json.dumps({"root": "/data", "classes": ["cats", "dogs", "owls"]}))
    job = lambda folder, **sample: sample_in_process(tmp_path / folder, str(workdir), monkeypatch, **sample)[1]
    assert job("default", num_images=5) == [[0, 1, 2, 0, 1, 1, 1, 1]]  # padded to 8 devices
    assert job("named", num_images=3, labels=("owls", "cats", 1)) == [[2, 0, 1] + [1] * 5]


def test_sampling_a_run_on_data_of_fewer_classes_cycles_over_the_class_count_it_recorded(run, tmp_path, monkeypatch,
                                                                                         caplog):
    """A fine-tune of a 1000-class model on a 3-class TFDS dataset (no class folders): its default
    labels cycled over ids 0-999, most never trained. Jobs of a run that records no count (an earlier
    version's) or as many classes as its model are as before, and a rerun of such a job with its
    default labels is accepted while the run records 1000 classes, refused once it records 3."""
    from test_sample_cli import sample_in_process

    workdir = shutil.copytree(run[0], tmp_path / "run")
    job = lambda folder, **sample: sample_in_process(tmp_path / folder, str(workdir), monkeypatch, **sample)[1]
    record = lambda count: (workdir / "train_settings.json").write_text(json.dumps({"data.num_classes": count}))
    assert job("earlier", num_images=5) == [[0, 1, 2, 3, 4, 4, 4, 4]]  # no record: every class
    settings = (tmp_path / "earlier" / "samples" / "settings.json").read_text()
    record(1000)
    assert job("earlier", num_images=5) == []  # the same job: every image on disk
    assert (tmp_path / "earlier" / "samples" / "settings.json").read_text() == settings
    record(3)
    assert job("cycled", num_images=5) == [[0, 1, 2, 0, 1, 1, 1, 1]]
    with caplog.at_level("WARNING"):
        assert job("given", num_images=3, labels=(4, 1, 4)) == [[4, 1, 4] + [4] * 5]
    assert caplog.text.count("never trained") == 1
    assert "asks for ids (4) that this run never trained: it trained the 3 classes its data held, ids 0 to 2 (its " \
           "train_settings.json records the count)" in caplog.text
    with pytest.raises(ValueError, match=r"holds images labelled i mod 1000 .* this job labels them i mod 3"):
        job("earlier", num_images=5)


def test_a_runs_class_count_is_the_one_that_trained_the_step_sampled_and_one_it_could_not_have_recorded_is_refused(
        run, tmp_path, monkeypatch):
    """A resume allowed to change the data's class count (3 to 5 at step 2) trained step 4 on 5
    classes, step 2 on 3. Class folders name the classes where the run has them. A count past the
    model's classes stops a job before it writes anything."""
    from pixelflow_jax.api import resolve_checkpoint, run_trained_classes
    from pixelflow_jax.sampling.sample_conditioning import TrainedClasses
    from test_sample_cli import sample_in_process

    workdir = shutil.copytree(run[0], tmp_path / "run")
    trained = lambda path: run_trained_classes(resolve_checkpoint(str(path)), 1000)
    assert trained(workdir) == TrainedClasses(1000)  # a run of an earlier version: every class
    (workdir / "train_settings.json").write_text(json.dumps({"data.num_classes": 5}))
    (workdir / "settings_changes.jsonl").write_text(
        json.dumps({"step": 2, "changes": {"data.num_classes": {"from": 3, "to": 5}}}) + "\n")
    assert trained(workdir) == TrainedClasses(5) and trained(workdir / "checkpoints" / "2") == TrainedClasses(3)
    (workdir / "class_index.json").write_text(json.dumps({"root": "/data", "classes": ["cats", "dogs"]}))
    assert trained(workdir) == TrainedClasses(2, ("cats", "dogs"))
    os.remove(workdir / "class_index.json")
    for count in (1001, 0, "5", True):
        (workdir / "train_settings.json").write_text(json.dumps({"data.num_classes": count}))
        with pytest.raises(CheckpointError, match=rf"train_settings.json records data.num_classes {count!r}, not a "
                                                  r"class count from 1 to the 1000 classes of the run's model, .*: put "
                                                  r"back its earlier content"):
            sample_in_process(tmp_path / "samples", str(workdir), monkeypatch, num_images=4)
        assert not (tmp_path / "samples").exists()


def test_a_runs_class_folders_and_class_count_may_fill_its_models_classes_and_no_more(tmp_path):
    """The bounds of what a run could have recorded, read without training one: every class of the
    model is a count it could train, one more is not."""
    from pixelflow_jax.api import CheckpointSource, run_trained_classes
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep
    from pixelflow_jax.sampling.sample_conditioning import TrainedClasses

    source = CheckpointSource(str(tmp_path / "checkpoints" / "4"), "the run", RunStep(str(tmp_path), 4))
    assert run_trained_classes(source, 3) == TrainedClasses(3)  # nothing recorded: every class
    for count in (1, 3):
        (tmp_path / "train_settings.json").write_text(json.dumps({"data.num_classes": count}))
        assert run_trained_classes(source, 3) == TrainedClasses(count)
    with pytest.raises(CheckpointError, match=r"records data.num_classes 3, not a class count from 1 to the 2 classes"):
        run_trained_classes(source, 2)
    (tmp_path / "class_index.json").write_text('{"classes": [')
    with pytest.raises(CheckpointError, match=r"class_index.json is damaged \(JSONDecodeError"):
        run_trained_classes(source, 3)
    (tmp_path / "class_index.json").write_text(json.dumps({"root": "/data", "classes": ["ant", "bee", "cat"]}))
    assert run_trained_classes(source, 3) == TrainedClasses(3, ("ant", "bee", "cat"))
    with pytest.raises(CheckpointError, match=r"class_index.json names 3 class folders, but the run's model has 2 "):
        run_trained_classes(source, 2)


def test_a_folder_runs_class_index_that_it_could_not_have_written_stops_sampling_before_anything_is_written(
        run, tmp_path, monkeypatch):
    """A damaged class_index.json ended the job in a traceback (a DataError), and one naming more
    folders than the model's classes recorded settings.json, then failed at the first batch."""
    from test_sample_cli import sample_in_process

    workdir = shutil.copytree(run[0], tmp_path / "run")
    names = lambda classes: json.dumps({"root": "/data", "classes": classes})
    for content, message in (('{"classes": [', r"class_index.json is damaged \(JSONDecodeError"),
                             (names(["cats", "dogs", "cats"]),
                              r"damaged \(ValueError: its classes name 'cats' more than once"),
                             (names([f"c{i}" for i in range(1001)]),
                              r"class_index.json names 1001 class folders, but the "
                              r"run's model has 1000 classes, .*: put back its")):
        (workdir / "class_index.json").write_text(content)
        with pytest.raises(CheckpointError, match=message):
            sample_in_process(tmp_path / "samples", str(workdir), monkeypatch, num_images=1001)
        assert not (tmp_path / "samples").exists()


def test_inspect_in_a_training_workdir_inspects_its_latest_checkpoint(run, tmp_path):
    from configs import c2i
    from pixelflow_jax.inspect_model import fill_checkpoint_of_run, model_to_inspect

    config = c2i.get_config("tiny")
    fill_checkpoint_of_run(config, run[0])
    model, _, source = model_to_inspect(config)
    assert source.label.endswith("checkpoints/4")
    assert_params_equal(model, run[1][4]["ema"])
    elsewhere = c2i.get_config("tiny")
    fill_checkpoint_of_run(elsewhere, str(tmp_path))  # not a run: the config's own model
    assert elsewhere.sample.checkpoint == ""


def test_the_inspect_report_names_the_weights_of_the_run_it_timed(run, converted, tmp_path):
    """inspect.json and inspect_history.jsonl named the checkpoint but not which of its two sets,
    so the EMA's report and the raw weights' of one step read alike."""
    from configs import c2i
    from pixelflow_jax import inspect_model

    from pixelflow_jax.api import resolve_checkpoint

    for weights in ("ema", "model"):
        config = c2i.get_config("tiny")
        config.sample.update(checkpoint=run[0], weights=weights)
        report = inspect_model.run(config, str(tmp_path))
        assert (report["checkpoint"], report["weights"]) == (os.path.join(run[0], "checkpoints", "4"), weights)
        # the step's fingerprint, as a sampling job of it records: a run's step written again is another checkpoint
        assert report["checkpoint_fingerprint"] == resolve_checkpoint(run[0]).fingerprint()
    history = [json.loads(line) for line in open(tmp_path / "inspect_history.jsonl")]
    assert [line["weights"] for line in history] == ["ema", "model"]
    own = inspect_model.run(c2i.get_config("tiny"), str(tmp_path / "own"))
    assert (own["weights"], own["checkpoint_fingerprint"]) == (None, None)  # random weights
    assert own["environment"]["packages"]["flax"] and own["environment"]["devices"]["backend"] == "cpu"
    assert own["environment"]["settings"] == job_environment()["settings"]
    config = c2i.get_config("tiny")
    config.sample.checkpoint = converted["c2i_tiny"]  # one set of weights: no choice to name ('ema' before)
    report = inspect_model.run(config, str(tmp_path / "converted"))
    assert report["weights"] is None
    assert report["checkpoint_fingerprint"] == resolve_checkpoint(converted["c2i_tiny"]).fingerprint()


def test_a_restore_error_keeps_tensorstores_first_line_without_the_spec_it_appends():
    from pixelflow_jax.checkpoints.run_checkpoint import restore_error

    read = "Encountered error while reading array index: (slice(0, 2, 1),)."
    assert restore_error(ValueError(f"{read} See full TensorStore details: <bound method spec of TensorStore({{")) \
        == read
    assert restore_error(ValueError('FAILED_PRECONDITION: bad [tensorstore_spec=\'{"driver": "zarr"}\']\nmore')) \
        == "FAILED_PRECONDITION: bad"
    assert restore_error(ValueError("")) == "ValueError"


def test_sampling_a_damaged_step_prints_one_line_not_the_late_callbacks_of_its_reads(run, tmp_path):
    """tensorstore reads still in flight when the restore failed called back into orbax's closed
    event loop: 6-130 'Event loop is closed' tracebacks above the error line. (How many reads are
    late is timing: without the hook (command_line.py) this tiny checkpoint showed them in one run of
    two.) The converter's export reads the same way."""
    import subprocess
    import sys

    from conftest import REPO

    damaged = tmp_path / "run"
    shutil.copytree(run[0], damaged)
    shutil.rmtree(damaged / "checkpoints" / "2")
    for folder in (damaged / "checkpoints" / "4" / "state").glob("ocdbt.process_*"):
        shutil.rmtree(folder)  # the array data of every process
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'out'}",
                             "--mode=sample", f"--config.sample.checkpoint={damaged}", "--config.sample.num_images=2"],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "XLA_FLAGS": cpu_devices(1, one_process=False)})
    assert result.returncode == 1
    assert result.stderr.rstrip().splitlines()[-1].startswith(f"error: cannot restore the ema weights of {damaged}")
    assert "Event loop is closed" not in result.stderr and "Traceback" not in result.stderr
    result = run_converter("--to_torch", f"--jax_checkpoint={damaged}", f"--output={tmp_path / 'export'}")
    assert result.returncode == 1 and f"error: cannot restore the ema weights of {damaged}" in result.stderr
    assert "Event loop is closed" not in result.stderr and "Traceback" not in result.stderr


def test_the_steps_of_a_run_with_none_are_listed_without_importing_orbax(tmp_path):
    """main.py lists them as a stop (SIGTERM, Ctrl-C) ends a run that saved nothing yet: importing
    orbax and tensorstore then, with XLA's threads still running, is time and risk for no answer."""
    import subprocess
    import sys

    (tmp_path / "checkpoints" / "tmp_notes").mkdir(parents=True)  # no step's folder
    code = ("import sys; from pixelflow_jax.checkpoints.run_checkpoint import complete_steps; "
            f"print(complete_steps({str(tmp_path)!r}), 'orbax.checkpoint' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["[]", "False"], result.stderr[-2000:]


def rotated_each_read(run_dir: str, newest: list[int]):
    """A stand-in for api's latest_step, of a run whose latest step is newest[0], and a `read` that
    finds the step it reads rotated away, saving a newer one (newest[0] + 2) as it goes: no restore,
    no compile. Returns (latest_step, read, the steps read)."""
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep, rotated_away

    steps_read = []

    def latest_step(run):
        assert run == run_dir
        return RunStep(run, newest[0], latest=True)

    def read(source):
        steps_read.append(source.run_step.step)
        newest[0] += 2
        raise rotated_away(source.run_step)

    return latest_step, read, steps_read


def test_read_through_rotation_reads_each_new_latest_step_as_the_source_of_its_folder(tmp_path, monkeypatch):
    """The source read after a rotation is the new step's absolute folder, with its RunStep (what
    the jobs record), and five reads in all; a read that succeeds ends the retries with its value."""
    from pixelflow_jax import api
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep, StepRotatedAway

    run_dir = str(tmp_path / "run")
    latest_step, read, steps_read = rotated_each_read(run_dir, [4])
    monkeypatch.setattr(api, "latest_step", latest_step)
    first = api.run_step_source(RunStep(run_dir, 4, latest=True))
    with pytest.raises(StepRotatedAway, match=r"checkpoints/12 was deleted while it was read: .*each of the 5 steps"):
        api.read_through_rotation(first, read)
    assert steps_read == [4, 6, 8, 10, 12]

    sources = []

    def read_on_the_second_try(source):
        sources.append(source)
        if len(sources) == 1:
            raise api.rotated_away(source.run_step)
        return "weights"

    assert api.read_through_rotation(first, read_on_the_second_try) == "weights"
    folder = os.path.join(run_dir, "checkpoints", "14")  # the latest after the five reads above
    assert sources[1] == api.CheckpointSource(folder, folder, RunStep(run_dir, 14, latest=True))


def test_a_step_named_is_not_read_again_and_its_error_says_to_name_the_run_in_a_job_of_any_size(tmp_path,
                                                                                               monkeypatch):
    """A step the user named is the one they asked for: its rotation is the read's error as raised,
    whether the job has one process or several (whose own advice is for a run named)."""
    from pixelflow_jax import api
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep, StepRotatedAway

    run_dir = str(tmp_path / "run")
    latest_step, read, steps_read = rotated_each_read(run_dir, [4])
    monkeypatch.setattr(api, "latest_step", latest_step)
    named = api.run_step_source(RunStep(run_dir, 2))
    for processes in (1, 2):
        monkeypatch.setattr(jax, "process_count", lambda: processes)
        with pytest.raises(StepRotatedAway, match=rf"; pass the run \({re.escape(run_dir)}\) instead of one of its "
                                                  "steps"):
            api.read_through_rotation(named, read)
    assert steps_read == [2, 2]

