"""--mode=inspect on text models, on a checkpoint, and into a workdir it cannot write."""

import json
import shutil
import subprocess
import sys

import pytest

import jax
import numpy as np

from conftest import REPO, fixture_dir


def tiny_config(variant):
    from configs import c2i, t2i

    return (t2i if variant == "t2i" else c2i).get_config("tiny")


def test_a_text_model_gets_text_states_of_its_width_and_the_configured_length(tmp_path):
    from pixelflow_jax import inspect_model

    config = tiny_config("t2i")
    config.scheduler.num_stages, config.data.resolution = 2, 16  # two quick compiles
    assert config.sample.max_text_tokens == 0 and config.train.max_text_tokens == 16
    report = inspect_model.run(config, str(tmp_path))  # the config's own model: the length it trains with
    assert report["model"]["cross_attention_dim"] == 20 and report["text_tokens"] == 16
    assert [s["tokens"] for s in report["stages"]] == [4, 16]
    config.sample.max_text_tokens = 8
    assert inspect_model.run(config, str(tmp_path))["text_tokens"] == 8
    # inspect.json is the latest report; the first stays in the history (it was overwritten).
    history = [json.loads(line) for line in open(tmp_path / "inspect_history.jsonl")]
    assert [line["text_tokens"] for line in history] == [16, 8]
    assert json.load(open(tmp_path / "inspect.json"))["text_tokens"] == 8


def test_sample_checkpoint_is_inspected_with_its_architecture_and_weights(tmp_path):
    """A class-conditional config pointed at the text release: the report is the release's."""
    from flax import nnx

    from pixelflow_jax import inspect_model
    from pixelflow_jax.api import read_checkpoint, resolve_checkpoint

    config = tiny_config("c2i")
    config.sample.checkpoint = fixture_dir("t2i_tiny")
    model, ckpt, source = inspect_model.model_to_inspect(config)
    _, params = read_checkpoint(resolve_checkpoint(fixture_dir("t2i_tiny")))
    inspected = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), inspected, params))

    report = inspect_model.run(config, str(tmp_path))
    assert report["checkpoint"] == source.label == fixture_dir("t2i_tiny")
    assert report["exported_weights"] is None  # the release's own folder
    assert (report["model"]["num_classes"], report["model"]["cross_attention_dim"]) == (0, 20)  # config: 10, 0
    assert report["parameters"]["total"] == sum(np.size(leaf) for leaf in jax.tree.leaves(params))
    assert report["text_tokens"] == 512  # a class config has no sample.max_text_tokens: the release's length


def test_an_exports_note_of_the_weights_it_holds_is_reported_for_a_model_card(tmp_path):
    """An export's config.yaml says which weights of which run it holds; the report said null."""
    from pixelflow_jax import inspect_model
    from pixelflow_jax.checkpoints.torch_io import EXPORT_MARK, export_note

    export = tmp_path / "export"
    shutil.copytree(fixture_dir("c2i_tiny"), export)
    note = "weights: the raw weights, not their EMA (--weights=model), of step 7 of the training run in the folder a"
    (export / "config.yaml").write_text(f"{EXPORT_MARK}\n# {note}\n" + (export / "config.yaml").read_text())
    config = tiny_config("c2i")
    config.sample.checkpoint = str(export / "model.pt")  # the file of the folder: the folder is read
    assert inspect_model.run(config, str(tmp_path / "inspect"))["exported_weights"] == note
    (export / "config.yaml").write_text((export / "config.yaml").read_text().replace(f"# {note}\n", ""))
    assert export_note(str(export)) is None  # an export of a converted folder: nothing to say


def test_a_text_run_inspected_under_a_class_config_gets_the_length_it_trained_with(tmp_path):
    """A class config has no sample.max_text_tokens for the sampling checkpoint to fill: a text run
    inspected with one was timed at the release's 512 tokens, not at its own recorded length."""
    from types import SimpleNamespace

    from pixelflow_jax import inspect_model
    from pixelflow_jax.api import CheckpointSource

    (tmp_path / "run_config.json").write_text(json.dumps({"text_encoder": {"path": "t5", "max_text_tokens": 24}}))
    run = SimpleNamespace(label=str(tmp_path), run_step=SimpleNamespace(run=str(tmp_path)))
    release = CheckpointSource(str(tmp_path / "release"), "release")  # no config.yaml records a length
    assert inspect_model.text_length(tiny_config("c2i"), run) == 24
    assert inspect_model.text_length(tiny_config("c2i"), release) == 512
    text = tiny_config("t2i")
    assert inspect_model.text_length(text, None) == text.train.max_text_tokens  # the config's own model
    text.sample.max_text_tokens = 8  # set, or filled from the run by the sampling checkpoint's reader
    assert inspect_model.text_length(text, run) == 8


def test_a_workdir_that_is_a_file_fails_at_once_in_one_line(tmp_path):
    workdir = tmp_path / "file"
    workdir.write_text("")
    result = subprocess.run([sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}",
                             "--mode=inspect"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: {workdir} is a file, not a folder: name a folder (new " \
        "or existing) for the outputs"
    assert "parameters:" not in result.stderr  # nothing built, nothing timed


def test_a_report_path_taken_by_a_folder_fails_before_the_work(tmp_path):
    """inspect.json as a folder: a traceback (IsADirectoryError) once every stage had been timed."""
    from pixelflow_jax import inspect_model

    for name in ("inspect.json", "inspect_history.jsonl"):
        workdir = tmp_path / name.split(".")[0]
        (workdir / name).mkdir(parents=True)
        with pytest.raises(ValueError, match=f"{workdir / name} is a folder, where --mode=inspect writes its report"):
            inspect_model.run(tiny_config("c2i"), str(workdir))


def test_an_inspection_refused_at_its_start_leaves_no_empty_workdir(tmp_path):
    """A checkpoint not found: the workdir the inspection made to check it could write there was
    left behind, empty (sampling, evaluation and training remove theirs)."""
    from pixelflow_jax import inspect_model
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    config, workdir = tiny_config("c2i"), tmp_path / "new"
    config.sample.checkpoint = str(tmp_path / "no_such_run")
    with pytest.raises(CheckpointError, match="no_such_run"):
        inspect_model.run(config, str(workdir))
    assert not workdir.exists()


def test_a_full_disk_prints_the_report_and_says_what_to_do_in_one_error(tmp_path, monkeypatch, capsys):
    """inspect.json on a full disk: an OSError traceback, and the report, timed stage by stage, was
    lost (it was printed only after the write)."""
    import errno

    from pixelflow_jax import inspect_model, storage
    from pixelflow_jax.storage import writes

    config = tiny_config("c2i")
    config.scheduler.num_stages, config.data.resolution = 2, 16  # two quick compiles
    write_local = writes.write_local_atomically

    def disk_full(path, *args, **kwargs):  # room for the workdir's probe (an empty file), none for the report
        if path.endswith(".json"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_local(path, *args, **kwargs)

    monkeypatch.setattr(writes, "write_local_atomically", disk_full)
    with pytest.raises(storage.StorageError, match=(
            rf"^cannot write {tmp_path}/inspect.json \(OSError: \[Errno 28\] No space left on device\); free space, "
            r"and rerun the same command to record it \(the report is printed above\)$")):
        inspect_model.run(config, str(tmp_path))
    assert [s["resolution"] for s in json.loads(capsys.readouterr().out)["stages"]] == [8, 16]


def a_training_run(workdir, steps=()):
    """A workdir that reads as a training run (run_config.json) with these saved steps."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "run_config.json").write_text("{}")
    for step in steps:
        (workdir / "checkpoints" / str(step)).mkdir(parents=True)
        (workdir / "checkpoints" / str(step) / "_CHECKPOINT_METADATA").write_text("{}")
    return str(workdir)


def test_a_checkpoint_is_inspected_when_named_or_when_the_workdir_is_a_run_with_a_saved_step(tmp_path):
    """As --mode=sample reads it: a run that saved no step yet has no checkpoint, so the config's own
    model is inspected, and a named checkpoint is never replaced by the workdir's."""
    from pixelflow_jax import inspect_model

    config = tiny_config("c2i")
    plain, unsaved, saved = str(tmp_path), a_training_run(tmp_path / "new"), a_training_run(tmp_path / "run", [4])
    assert [inspect_model.inspects_checkpoint(config, w) for w in (plain, unsaved, saved)] == [False, False, True]
    inspect_model.fill_checkpoint_of_run(config, unsaved)
    assert config.sample.checkpoint == ""
    inspect_model.fill_checkpoint_of_run(config, saved)
    assert config.sample.checkpoint == saved
    config.sample.checkpoint = "elsewhere"
    assert inspect_model.inspects_checkpoint(config, plain)
    inspect_model.fill_checkpoint_of_run(config, saved)
    assert config.sample.checkpoint == "elsewhere"


def test_a_run_without_a_complete_step_is_said_to_be_inspected_with_random_weights(tmp_path, caplog):
    """A run killed during its first save: inspect in its workdir timed the config's own model,
    with random weights, and said nothing, where sampling it is an error naming the step (the
    latest of those left unfinished)."""
    from pixelflow_jax import inspect_model

    config = tiny_config("c2i")
    run = a_training_run(tmp_path / "run")
    for partial in ("4.orbax-checkpoint-tmp-1795755085", "8.orbax-checkpoint-tmp-1795755999"):  # 4 killed, 8 saving
        (tmp_path / "run" / "checkpoints" / partial).mkdir(parents=True)
    with caplog.at_level("WARNING"):
        inspect_model.fill_checkpoint_of_run(config, str(tmp_path))  # no run: nothing to say
        assert caplog.text == ""
        inspect_model.fill_checkpoint_of_run(config, run)
    assert config.sample.checkpoint == ""
    assert f"{run} is a training run with no complete step yet (step 8 is still being written, or was killed " \
           "mid-save): inspecting the config's own model with random weights, not the run's" in caplog.text


def test_a_sampling_jobs_workdir_is_said_to_be_inspected_with_random_weights(tmp_path, caplog):
    """inspect in a sampling job's workdir timed the config's random model and wrote its
    inspect.json beside the samples without a word, as if it were the sampled checkpoint's."""
    from pixelflow_jax import inspect_model

    config = tiny_config("c2i")
    (tmp_path / "samples").mkdir()
    with caplog.at_level("WARNING"):
        inspect_model.fill_checkpoint_of_run(config, str(tmp_path))  # samples/ without a record: nothing to say
        (tmp_path / "samples" / "settings.json").write_text("[]")  # not a job's record either
        inspect_model.fill_checkpoint_of_run(config, str(tmp_path))
        assert caplog.text == ""
        (tmp_path / "samples" / "settings.json").write_text(json.dumps({"checkpoint": "/runs/demo", "seed": 0}))
        inspect_model.fill_checkpoint_of_run(config, str(tmp_path))
    assert config.sample.checkpoint == ""
    assert f"{tmp_path} is a sampling job's workdir (of /runs/demo, {tmp_path}/samples/settings.json): inspecting " \
           "the config's own model with random weights, not the sampled one; set " \
           "--config.sample.checkpoint=/runs/demo to inspect that" in caplog.text


def test_parameters_are_counted_per_top_level_module_and_a_non_finite_forward_is_refused(tmp_path, monkeypatch):
    """Each module's count against its own parameters' sizes; weights of NaN must fail the
    inspection (FloatingPointError, one line from main.py), not report timings of garbage."""
    from flax import nnx

    from pixelflow_jax import inspect_model

    config = tiny_config("c2i")
    config.scheduler.num_stages, config.data.resolution = 1, 8  # one quick compile
    model, _, _ = inspect_model.model_to_inspect(config)
    counts = inspect_model.parameter_counts(model)
    expected = {name: sum(np.size(p) for p in jax.tree.leaves(nnx.state(module, nnx.Param)))
                for name, module in nnx.iter_children(model)}
    expected = {name: count for name, count in expected.items() if count}  # modules without parameters
    assert counts == {**expected, "total": sum(np.size(p) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))}
    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p: np.full(np.shape(p), np.nan, np.float32), state))
    real = inspect_model.model_to_inspect
    monkeypatch.setattr(inspect_model, "model_to_inspect", lambda config: (model, *real(config)[1:]))
    with pytest.raises(FloatingPointError, match="^stage 0: the forward pass of the config's model produced NaN or "
                                                 r"inf: check its weights \(a diverged run\?\)$"):
        inspect_model.run(config, str(tmp_path))
    assert not (tmp_path / "inspect.json").exists()
    for dtype in ("bfloat16", "float16"):  # either 16-bit compute may overflow
        config.model.dtype = dtype
        with pytest.raises(FloatingPointError, match=rf", or {dtype} overflowed \(try --config.model.dtype=float32\)$"):
            inspect_model.run(config, str(tmp_path))
    # a checkpoint's: which of its two sets (the EMA or the raw weights) diverged
    from pixelflow_jax.api import CheckpointSource

    source = CheckpointSource("/runs/r/checkpoints/4", "/runs/r/checkpoints/4")
    monkeypatch.setattr(inspect_model, "model_to_inspect", lambda config: (model, real(config)[1], source))
    config.sample.weights = "model"
    with pytest.raises(FloatingPointError, match="^stage 0: the forward pass of the model weights of "
                                                 "/runs/r/checkpoints/4 produced NaN or inf"):
        inspect_model.run(config, str(tmp_path))


def test_each_stage_reports_its_first_call_and_a_compiled_forward_each_timed_until_its_result_is_ready(tmp_path,
                                                                                                        monkeypatch):
    """first_call_s: the stage's first forward, its compilation included (to 1 ms); forward_s: one more
    forward of the compiled program (to 0.1 ms). jax returns before the device has computed: each is
    timed until its result is ready, here by a clock that moves only while a result is awaited."""
    import types

    from pixelflow_jax import inspect_model

    clock, waits, ready = [100.0], iter([2.5, 0.00012, 1.25, 0.25]), jax.block_until_ready

    def awaited(value):
        clock[0] += next(waits)
        return ready(value)

    monkeypatch.setattr(inspect_model, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(inspect_model.jax, "block_until_ready", awaited)
    config = tiny_config("c2i")
    config.scheduler.num_stages, config.data.resolution = 2, 16  # two quick compiles
    stages = inspect_model.run(config, str(tmp_path))["stages"]
    assert [(stage["first_call_s"], stage["forward_s"]) for stage in stages] == [(2.5, 0.0001), (1.25, 0.25)]


def test_the_workdirs_run_is_the_checkpoint_inspected(tmp_path, monkeypatch):
    """inspect_model.run itself reads an empty sample.checkpoint in a run's workdir as that run."""
    from pixelflow_jax import inspect_model

    class Inspected(Exception):
        pass

    def model_to_inspect(config):
        raise Inspected(config.sample.checkpoint)

    monkeypatch.setattr(inspect_model, "model_to_inspect", model_to_inspect)
    run = a_training_run(tmp_path / "run", [4])
    with pytest.raises(Inspected, match=f"^{run}$"):
        inspect_model.run(tiny_config("c2i"), run)


NON_FINITE_INSPECTION = """
import runpy, sys
from pixelflow_jax import inspect_model


def non_finite(config, workdir):
    raise FloatingPointError("stage 0: the forward pass of the config's model produced NaN or inf")


inspect_model.run = non_finite
sys.argv = ["main.py", "--config=configs/c2i.py:tiny", "--workdir=" + sys.argv[1], "--mode=inspect"]
runpy.run_path("main.py", run_name="__main__")
"""


def test_main_reports_a_non_finite_inspection_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-c", NON_FINITE_INSPECTION, str(tmp_path)], capture_output=True,
                            text=True, cwd=REPO, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.rstrip().splitlines()[-1] == ("error: stage 0: the forward pass of the config's model "
                                                        "produced NaN or inf")


def test_a_stdout_that_cannot_be_written_leaves_the_report_in_the_workdir(tmp_path, monkeypatch):
    """`main.py --mode=inspect > log` on a full disk: the report was printed first, its print raised,
    and inspect.json was never written."""
    from pixelflow_jax import inspect_model

    config = tiny_config("c2i")
    config.scheduler.num_stages, config.data.resolution = 2, 16  # two quick compiles
    monkeypatch.setattr("sys.stdout", open("/dev/full", "w", buffering=1))  # as PYTHONUNBUFFERED=1 in containers
    inspect_model.run(config, str(tmp_path))
    with open(tmp_path / "inspect.json") as f:
        assert [s["resolution"] for s in json.load(f)["stages"]] == [8, 16]


@pytest.mark.parametrize("index", [0, 1])
def test_process_0_of_a_job_alone_writes_the_report_and_a_failure_there_stops_the_others(tmp_path, monkeypatch, index):
    """Every process of a pod's inspection wrote inspect.json and added its line to the history."""
    from jax.experimental import multihost_utils

    from pixelflow_jax import inspect_model

    failed_on_process_0 = [index == 1]  # seen by process 1: process 0 could not write the report
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: index)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda flag: np.array([failed_on_process_0[0], 0] if index else [flag, 0], np.int32))
    config = tiny_config("c2i")
    config.scheduler.num_stages, config.data.resolution = 2, 16  # two quick compiles
    workdir = tmp_path / "inspect"
    if index == 0:
        report = inspect_model.run(config, str(workdir))
        assert json.load(open(workdir / "inspect.json"))["stages"] == report["stages"]
        assert len(open(workdir / "inspect_history.jsonl").readlines()) == 1
    else:
        with pytest.raises(ValueError, match=r"process 0 of 2 stopped writing .*inspect.json \(its error says why\)"):
            inspect_model.run(config, str(workdir))
        assert not (workdir / "inspect.json").exists() and not (workdir / "inspect_history.jsonl").exists()
        assert workdir.is_dir()  # process 0's to remove if left empty: process 1 removed it under process 0's writes


def training_job(start_step, num_steps, batch_size, source="demo", init_from=""):
    """A line of training_runs.jsonl, with the fields inspect reads."""
    config = {"train": {"batch_size": batch_size, "init_from": init_from}, "data": {"source": source}}
    return json.dumps({"time": f"t{start_step}", "start_step": start_step, "num_steps": num_steps,
                       "config_fingerprint": f"f{batch_size}", "config": config})


def test_a_runs_step_is_reported_with_the_training_jobs_that_led_to_it_and_the_images_they_showed(tmp_path, caplog):
    """A teacher's inspect.json of a student's run said nothing of what was trained (step, batch, data,
    images seen); a step copied in from another run, or a run without records, passed without a word."""
    from pixelflow_jax import inspect_model
    from pixelflow_jax.api import CheckpointSource
    from pixelflow_jax.checkpoints.run_checkpoint import RunStep

    run = tmp_path / "student"
    run.mkdir()
    of_step = lambda step: inspect_model.training_of(CheckpointSource("label", "folder", RunStep(str(run), step)))
    assert inspect_model.training_of(CheckpointSource("converted", "converted")) is None
    with caplog.at_level("WARNING"):
        assert of_step(4)["jobs"] is None and of_step(4)["images_seen"] is None  # no records (an older run)
    assert "no readable record of the jobs that trained step 4" in caplog.text

    # Killed after step 3 and resumed from its step 2 with a larger batch up to 6; then fine-tuned on.
    (run / "training_runs.jsonl").write_text("\n".join([training_job(0, 4, 8), training_job(2, 6, 16)]) + "\n")
    six = of_step(6)
    assert [(j["start_step"], j["end_step"], j["batch_size"], j["images"]) for j in six["jobs"]] == [(0, 2, 8, 16),
                                                                                                      (2, 6, 16, 64)]
    assert (six["checkpoint_step"], six["images_seen"], six["jobs"][0]["data"]) == (6, 80, "demo")
    assert six["training_runs"] == str(run / "training_runs.jsonl")
    assert [(j["start_step"], j["end_step"]) for j in of_step(2)["jobs"]] == [(0, 2)]
    caplog.clear()
    with caplog.at_level("WARNING"):
        copied = of_step(10)  # past every job: another run's step
    assert (copied["jobs"], copied["images_seen"]) == (None, None)
    assert "no chain of the training jobs" in caplog.text and "copied in from another run" in caplog.text
    # A job resumed at step 6 after one that could train only to step 4: steps 4-6 came from elsewhere.
    (run / "training_runs.jsonl").write_text("\n".join([training_job(0, 4, 8), training_job(6, 10, 8)]) + "\n")
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert of_step(10)["jobs"] is None
    assert "no chain of the training jobs" in caplog.text


def test_the_report_holds_what_trained_the_checkpoint(tmp_path, monkeypatch):
    from pixelflow_jax import inspect_model

    monkeypatch.setattr(inspect_model, "training_of", lambda source: {"of": source})
    assert inspect_model.run(tiny_config("c2i"), str(tmp_path))["training"] == {"of": None}
    assert json.loads((tmp_path / "inspect.json").read_text())["training"] == {"of": None}
