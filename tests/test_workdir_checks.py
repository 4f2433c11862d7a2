"""Workdirs and output paths a user mistyped or that would be lost or misread are refused or
expanded before any work, and nothing is written where it would clobber something else."""

import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, c2i_config, free_port
from pixelflow_jax import CheckpointError, load_model, storage
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.training.run_config import check_run_config
from pixelflow_jax.validation import ConfigError, check


def test_a_path_a_user_mistyped_is_refused_or_expanded(tmp_path):
    for broken, fixed in (("gs:/bucket/run", "gs://bucket/run"), ("gs:bucket", "gs://bucket"),
                          ("hf:/owner/name", "hf://owner/name"), ("gs//bucket/run", "gs://bucket/run"),
                          ("gs;//bucket/run", "gs://bucket/run"), ("Gs:/bucket", "gs://bucket"),  # was a local folder
                          ("gcs//bucket", "gs://bucket"), ("GCS:/bucket", "gs://bucket")):  # the one scheme that works
        with pytest.raises(storage.StorageError, match=f'looks like a URL without its "://": write {fixed} '):
            storage.user_path(broken)
    for globbed in ("gs://b/x?y", "gs://b/run#1", "gs://b/x*", "gs://b/[x]"):  # query, fragment, wildcards
        with pytest.raises(storage.StorageError, match="cannot be part of an object path here"):
            storage.user_path(globbed)
    assert storage.user_path("gsdata//x") == "gsdata//x" and storage.user_path("runs/x?y") == "runs/x?y"
    for no_bucket in ("gs://", "gs:///run"):
        with pytest.raises(storage.StorageError, match="names no bucket: write gs://BUCKET/"):
            storage.user_path(no_bucket)
    # A file URL's path is absolute: the advice was a relative path for file:/data/run and file://data/run
    for file_url in ("file:///data/run", "file:/data/run", "file://data/run", "file://localhost/data/run",
                     "FILE:/data/run"):
        with pytest.raises(storage.StorageError, match=r"write the local path itself \(/data/run\), not a file"):
            storage.user_path(file_url)
    for unsupported in ("https:/host/x", "s3:/b/x"):  # was told to write https://host/x, refused next
        with pytest.raises(storage.StorageError, match=r"without its \"://\", and \w+:// is not read here: paths are "
                                                       r"local or gs://"):
            storage.user_path(unsupported)
    with pytest.raises(storage.StorageError, match=r"unsupported URL scheme hdfs://"):  # was "write hdfs://BUCKET/"
        storage.check_supported(storage.user_path("hdfs:///x"))
    with pytest.raises(CheckpointError, match="^no checkpoint given: name a training run"):
        load_model("")  # was "checkpoint  does not exist"
    with pytest.raises(CheckpointError, match="^no checkpoint given: name a training run"):
        load_model("  ")  # not "the name '  ' starts and ends with a space ...: remove the space"
    for spaced, name in ((" runs/xl", " runs"), ("runs/xl ", "xl "), ("runs/ xl", " xl")):  # a quoting slip
        with pytest.raises(CheckpointError, match=rf"^'{spaced}': the name '{name}' (starts|ends) with a space and "
                                                  r"does not exist \(a quoting slip\?\): remove the space"):
            load_model(spaced)
    with pytest.raises(storage.StorageError, match="ends with a space, which an object name keeps: write 'gs://b/x'"):
        storage.user_path("gs://b/x ")
    for spaced, name, fixed in (("gs://b/a /x", "a ", "gs://b/a/x"), ("gs://b/ a/x", " a", "gs://b/a/x"),
                                ("gs:// b/x", " b", "gs://b/x"), ("hf://o/n\t/sub", "n\t", "hf://o/n/sub")):
        with pytest.raises(storage.StorageError, match=re.escape(f"{spaced!r}: the folder name {name!r} starts or ends "
                                                                 f"with whitespace, which an object name keeps (a "
                                                                 f"quoting slip?): write {fixed!r}")):
            storage.user_path(spaced)  # were taken as they are: a bucket folder named "a "
    assert storage.user_path("gs://b/my run/x") == "gs://b/my run/x"  # a space inside a name is a name's
    for dotted in ("gs://b/x/../y", "gs://b/./x"):
        with pytest.raises(storage.StorageError, match="do not resolve '.' and '..'"):
            storage.user_path(dotted)
    assert storage.user_path("~/runs/x") == os.path.join(os.path.expanduser("~"), "runs", "x")
    assert storage.user_path("./gs:/x") == "./gs:/x" and storage.user_path("gs://b/x") == "gs://b/x"

    config = c2i_config(**{"sample.checkpoint": "~/ckpt"})
    check(config, "sample")
    assert config.sample.checkpoint == os.path.join(os.path.expanduser("~"), "ckpt")
    with pytest.raises(ConfigError, match="--config.eval.reference: gs:/b/ref.npz looks like a URL"):
        check(c2i_config(**{"eval.reference": "gs:/b/ref.npz"}), "eval")
    with pytest.raises(CheckpointError, match="looks like a URL"):
        load_model("gs:/bucket/ckpt")
    with pytest.raises(CheckpointError, match=r"^s3://bucket/ckpt: unsupported URL scheme s3://"):
        load_model("s3://bucket/ckpt")  # not a StorageError naming s3://bucket/ckpt/run_config.json


def test_a_new_local_name_with_a_space_at_its_edge_is_refused_and_an_existing_one_is_used(tmp_path, monkeypatch):
    """--workdir='runs/a ' made a folder named "a " (which ls shows as runs/a). A name that exists
    with its space (made on purpose, or by such a slip before this check) is used as it is."""
    from pixelflow_jax import validation

    monkeypatch.chdir(tmp_path)
    for spaced, name, fixed in (("runs/a ", "a ", "runs/a"), (" runs/a", " runs", "runs/a"),
                                ("runs/ a /b", " a ", "runs/a/b"), (f"{tmp_path}/out\t", "out\t", f"{tmp_path}/out")):
        with pytest.raises(storage.StorageError, match=re.escape(f"{spaced!r}: the name {name!r} ") + ".* and does "
                                                       r"not exist \(a quoting slip\?\): remove the (space|whitespace)"
                                                       + re.escape(f", as in {fixed!r}")):
            storage.user_path(spaced)
    with pytest.raises(storage.StorageError, match=r"^--workdir: 'runs/a ': the name 'a ' ends with a space"):
        validation.user_path("--workdir", "runs/a ")  # and so the converter's flags
    assert os.listdir(tmp_path) == []
    (tmp_path / "old run ").mkdir()
    assert storage.user_path("old run ") == "old run " and storage.user_path("old run /step_5") == "old run /step_5"
    # The fix offered keeps the names that exist as they are: 'old run/new' would be another folder.
    with pytest.raises(storage.StorageError, match=re.escape("remove the space, as in 'old run /new'")):
        storage.user_path("old run /new ")


def test_a_new_local_name_holding_an_unexpanded_variable_is_refused_and_an_existing_one_is_used(tmp_path,
                                                                                                monkeypatch):
    """A container's exec-form command (["python", "main.py", "--workdir=$HOME/runs/a"]) runs no
    shell: the workdir made a folder named "$HOME" in the current one, and load_model("$HOME/run")
    in a service said only that the checkpoint does not exist."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("R35C_RUNS", "/data/runs")
    monkeypatch.delenv("R35C_UNSET", raising=False)
    for given, variable, fix in (("$R35C_RUNS/a", "$R35C_RUNS", "write the path it stands for, as in '/data/runs/a'"),
                                 ("runs/${R35C_RUNS}", "${R35C_RUNS}", "as in 'runs//data/runs'"),
                                 ("x_$R35C_UNSET/a", "$R35C_UNSET", "$R35C_UNSET is not set here either: write the "
                                                                    "path itself")):
        with pytest.raises(storage.StorageError, match=re.escape(f"{given!r}: {variable} is not expanded here (a shell "
                                                                 "expands it; a container's exec-form command, a "
                                                                 "config file and Python do not)") + ".*"
                                                       + re.escape(fix)):
            storage.user_path(given)
    with pytest.raises(CheckpointError, match=re.escape("'$R35C_RUNS/demo': $R35C_RUNS is not expanded here")):
        load_model("$R35C_RUNS/demo")
    assert os.listdir(tmp_path) == []
    (tmp_path / "price$5").mkdir()  # a name that exists is kept as it is, made on purpose or by an earlier slip
    assert storage.user_path("price$5/out") == "price$5/out"
    assert storage.user_path("costs_in_$") == "costs_in_$"  # a "$" before no name


def test_a_workdir_that_would_be_lost_or_misread_is_refused_before_any_work(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints" / "4").mkdir(parents=True)
    (run / "run_config.json").write_text("{}")
    for workdir, message in ((run / "checkpoints" / "4", "inside the checkpoints of the training run"),
                             ("gs:/bucket/samples", "looks like a URL without its"),
                             ("", "--workdir is empty")):
        command = [sys.executable, os.path.join(REPO, "main.py"), f"--config={REPO}/configs/c2i.py:tiny",
                   f"--workdir={workdir}", "--mode=sample", f"--config.sample.checkpoint={run}"]
        result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["run"] and os.listdir(run / "checkpoints" / "4") == []
    from pixelflow_jax.checkpoints.run_checkpoint import check_outside_checkpoints

    os.symlink(run / "checkpoints", tmp_path / "link")  # the same folder by another name
    with pytest.raises(CheckpointError, match="inside the checkpoints of the training run"):
        check_outside_checkpoints(str(tmp_path / "link" / "6"))


def test_no_output_goes_inside_a_converted_checkpoint_folder_at_any_depth(tmp_path, converted):
    """A workdir in params/out was taken: the samples changed the checkpoint's fingerprint (a rerun
    of the same command was refused as "other weights"), and converting the folder again with
    --overwrite deleted them without a word."""
    from pixelflow_jax.checkpoints.run_checkpoint import check_outside_checkpoints

    folder = converted["c2i_tiny"]
    for inside in ("params/out", "params/a/b", "a/b", "params"):
        for flag in ("--workdir", "--output"):
            with pytest.raises(CheckpointError, match=rf"{flag} .*/{inside} is inside a converted checkpoint folder "
                                                      rf"\({re.escape(folder)}\)"):
                check_outside_checkpoints(os.path.join(folder, inside), flag)
    (tmp_path / "downloads" / "deep").mkdir(parents=True)
    (tmp_path / "downloads" / "model.pt").write_bytes(b"")  # a release file downloaded here
    check_outside_checkpoints(str(tmp_path / "downloads" / "jax"), "--output")  # converted beside it
    check_outside_checkpoints(str(tmp_path / "downloads" / "deep" / "run"))  # anybody's model.pt, further up
    with pytest.raises(CheckpointError, match=r"--workdir .*/downloads/run is inside a release checkpoint folder"):
        check_outside_checkpoints(str(tmp_path / "downloads" / "run"))


def test_a_foreign_or_other_model_workdir_is_refused_before_anything_is_written_there(tmp_path):
    from configs import t2i

    foreign = tmp_path / "foreign"
    (foreign / "checkpoints" / "5").mkdir(parents=True)
    (foreign / "checkpoints" / "5" / "model.pt").write_bytes(b"")
    config = c2i_config()
    with pytest.raises(ValueError, match=r"holds checkpoints/ but no run_config.json: not a training run of "
                                         r"pixelflow-jax, or a copy of one that missed that file \(copy "
                                         r"run_config.json from the run, then rerun to resume it\); "
                                         r"otherwise use a new --workdir"):
        check_run_config(str(foreign), ModelConfig.from_mapping(config.model), config)  # (it said only the last)
    assert sorted(os.listdir(foreign)) == ["checkpoints"]

    class_run = str(tmp_path / "class_run")
    check_run_config(class_run, ModelConfig.from_mapping(config.model), config)
    os.makedirs(os.path.join(class_run, "checkpoints", "10"))  # a saved step
    text = t2i.get_config("tiny")  # checked before its text encoder would be built in the workdir
    with pytest.raises(ValueError, match="architecture.cross_attention_dim 0 there, 20 in this config"):
        check_run_config(class_run, ModelConfig.from_mapping(text.model), text, record=False)
    assert sorted(os.listdir(class_run)) == ["checkpoints", "run_config.json"]


def test_a_file_where_a_folder_goes_a_positional_mode_and_a_mistyped_demo_workdir_are_named(tmp_path):
    from pixelflow_jax.data.sources import DataError, make_source
    from pixelflow_jax.demo_app import run as run_demo

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(storage.StorageError, match="a_file is a file, not a folder: name a folder"):
        storage.check_writable(str(a_file))
    # A folder under it: "cannot write to a_file/run: NotADirectoryError ... name a folder this user can write to
    # (a training run in a read-only folder ...)", as if access were the problem.
    with pytest.raises(storage.StorageError, match=rf"^{a_file} \(above {a_file}/runs/x\) is a file, not a folder: "):
        storage.check_writable(str(a_file / "runs" / "x"))
    (tmp_path / "link").symlink_to(tmp_path / "moved_away")  # was 'cannot write to link: FileExistsError'
    for folder in (tmp_path / "link", tmp_path / "link" / "run"):
        with pytest.raises(storage.StorageError, match=rf"link.* is a link to {tmp_path}/moved_away, which does not "
                                                       r"exist \(moved or deleted\?\): point the link at the folder"):
            storage.check_writable(str(folder))
    from pixelflow_jax.api import sampling_checkpoint

    moved = rf"link is a link to {tmp_path}/moved_away, which does not exist \(moved or deleted\?\)"
    with pytest.raises(CheckpointError, match=f"^checkpoint {tmp_path}/{moved}$"):  # was '... does not exist'
        load_model(str(tmp_path / "link"))
    with pytest.raises(CheckpointError, match=f"^{tmp_path}/{moved}: for a training run, give its workdir"):
        sampling_checkpoint(c2i_config().sample, str(tmp_path / "link"))  # was 'does not exist (a typo?)'
    data = c2i_config(**{"data.source": "folder", "data.root": str(a_file)}).data
    with pytest.raises(DataError, match="a_file is a file, not a folder: set --config.data.root to a folder"):
        make_source(data)
    config = c2i_config(**{"demo.port": free_port()})
    with pytest.raises(CheckpointError, match="typo_run does not exist \\(a typo\\?\\)"):
        run_demo(config, str(tmp_path / "typo_run"))
    assert not (tmp_path / "typo_run").exists()  # not made by the write check
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={tmp_path / 'run'}",
                             "sample"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "(a mode is a flag: --mode=sample)" in result.stderr
    assert len(result.stderr.splitlines()) == 2, result.stderr  # the error and where help is, not the whole help


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_appears_while_a_job_writes_is_left_as_it_is(tmp_path, overwrite):
    """The swap replaced whatever stood at the output by then: a folder a person made during a long
    export (files lost without --overwrite), or a second conversion's output."""
    from pixelflow_jax.checkpoints.checkpoint import atomic_output_dir

    output = tmp_path / "out"
    with pytest.raises(CheckpointError, match="appeared while this job was writing"):
        with atomic_output_dir(str(output), overwrite=overwrite) as tmp:
            with open(os.path.join(tmp, "model.pt"), "wb") as f:
                f.write(b"new")
            output.mkdir()
            (output / "notes.txt").write_text("precious")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(output) == ["notes.txt"]
