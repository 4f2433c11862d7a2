"""The records that say what produced a workdir's numbers: software versions, devices, and the line
each started job appends to its workdir's log of jobs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pixelflow_jax import storage
from pixelflow_jax.job_records import append_job_record, config_record
from pixelflow_jax.software_versions import job_environment


def test_the_environment_names_the_installed_versions_and_the_devices():
    environment = job_environment()
    assert environment["packages"]["jax"] == jax.__version__ and environment["packages"]["optax"] == optax.__version__
    assert environment["packages"]["numpy"] == np.__version__ and environment["python"].count(".") == 2
    devices = environment["devices"]
    assert (devices["backend"], devices["device_count"], devices["process_count"]) == (
        jax.default_backend(), jax.device_count(), 1)
    assert devices["local_device_count"] == jax.local_device_count() and devices["device_kind"]


def test_the_environment_names_the_settings_outside_the_config_that_change_a_jobs_numbers(monkeypatch):
    """jax's matmul precision (JAX_DEFAULT_MATMUL_PRECISION: a bfloat16 model's and training's matmuls
    on GPUs and TPUs) and XLA_FLAGS (fast math, GPU determinism) change a job's numbers, and no record
    named them: two workdirs of the same versions and devices could not say why their numbers differed."""
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=true")
    with jax.default_matmul_precision("bfloat16"):
        assert job_environment()["settings"] == {"jax_default_matmul_precision": "bfloat16",
                                                 "XLA_FLAGS": "--xla_cpu_enable_fast_math=true"}
    monkeypatch.delenv("XLA_FLAGS")
    assert job_environment()["settings"] == {"jax_default_matmul_precision": None, "XLA_FLAGS": None}


def test_each_job_appends_its_line_and_keeps_the_earlier_ones(tmp_path):
    path = str(tmp_path / "new_workdir" / "jobs.jsonl")  # its folder made
    append_job_record(path, {"start_step": 0}, "rerun the job")
    append_job_record(path, {"start_step": 5}, "rerun the job")
    jobs = [json.loads(line) for line in open(path)]
    assert [job["start_step"] for job in jobs] == [0, 5]
    assert all({"time", "command", "cwd", "environment"} <= set(job) for job in jobs)
    assert jobs[-1]["environment"]["settings"] == job_environment()["settings"]  # each training and sampling job's


def test_a_record_that_cannot_be_written_is_an_error_naming_it_and_the_fix(tmp_path):
    (tmp_path / "jobs.jsonl").mkdir()  # a folder in its place
    with pytest.raises(storage.StorageError, match=rf"^cannot write {tmp_path}/jobs.jsonl \(IsADirectoryError: .*\); "
                                                   "free space or make the workdir writable, and rerun the job$"):
        append_job_record(str(tmp_path / "jobs.jsonl"), {}, "rerun the job")


def test_the_other_processes_stop_with_process_0_when_its_record_fails_and_write_nothing(tmp_path, monkeypatch):
    """Process 0 alone writes the record: its failure left the others waiting in their next collective."""
    from jax.experimental import multihost_utils

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    # process 0 failed, this process (1) did not
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda flag: np.array([1, flag], np.int32))
    path = str(tmp_path / "jobs.jsonl")
    with pytest.raises(ValueError, match=rf"^process 0 of 2 stopped recording the job in {path} \(its error says "
                                         r"why\)$"):
        append_job_record(path, {"start_step": 0}, "rerun the job")
    assert not (tmp_path / "jobs.jsonl").exists()


def test_two_configs_of_the_same_fields_have_one_fingerprint_and_any_change_another():
    from configs import c2i

    config = c2i.get_config("tiny")
    record = config_record(config)
    assert record == config_record(c2i.get_config("tiny")) and record["config"]["train"]["lr"] == config.train.lr
    config.train.lr *= 2
    assert config_record(config)["config_fingerprint"] != record["config_fingerprint"]


def test_the_command_names_the_program_and_quotes_each_argument_so_a_shell_splits_it_back(monkeypatch):
    """A recorded command is run again by pasting it: an argument holding a space or a quote must
    come back as one argument, and the interpreter that ran it is named first."""
    import os
    import shlex
    import sys

    from pixelflow_jax.job_records import command_line

    argv = ["main.py", "--workdir=/runs/my run", "--config.sample.prompts_file=it's.txt", "--config.x=(1,2)"]
    monkeypatch.setattr(sys, "argv", argv)
    assert shlex.split(command_line()) == [os.path.basename(sys.executable), *argv]


def test_the_time_of_a_record_is_utc_to_the_second():
    import datetime
    import re

    stamp = storage.utc_now()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", stamp), stamp
    assert abs(datetime.datetime.fromisoformat(stamp) - datetime.datetime.now(datetime.timezone.utc)).total_seconds() < 5


def test_every_package_a_result_depends_on_is_named_and_a_plug_in_only_where_installed(monkeypatch):
    """A CPU host lists no CUDA or TPU plug-in (not even as None); a host with one names its version."""
    import importlib.metadata

    from pixelflow_jax import software_versions

    packages = software_versions.software_versions()["packages"]
    assert packages == {name: importlib.metadata.version(name) for name in software_versions.PACKAGES}
    assert {"jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"} == set(software_versions.PACKAGES)
    real_version = software_versions.package_version
    monkeypatch.setattr(software_versions, "package_version",
                        lambda name: "0.1.2" if name == "libtpu" else real_version(name))
    assert software_versions.software_versions()["packages"]["libtpu"] == "0.1.2"
    assert "jax-cuda12-plugin" not in software_versions.software_versions()["packages"]
    assert software_versions.package_version("no-such-distribution-here") is None


def test_the_devices_record_each_count_in_its_own_field(monkeypatch):
    """On one CPU process the counts coincide; a pod's process has 4 local of 16 devices, 4 processes."""
    from pixelflow_jax.software_versions import devices_used

    monkeypatch.setattr(jax, "device_count", lambda: 16)
    monkeypatch.setattr(jax, "local_device_count", lambda: 4)
    monkeypatch.setattr(jax, "process_count", lambda: 4)
    devices = devices_used()
    assert (devices["device_count"], devices["local_device_count"], devices["process_count"]) == (16, 4, 4)
    assert (devices["backend"], devices["device_kind"]) == (jax.default_backend(), jax.devices()[0].device_kind)
    assert devices["platform_version"] == jax.devices()[0].client.platform_version


def test_a_config_fingerprint_is_16_hex_digits_of_the_fields_whatever_their_order():
    import re

    import ml_collections

    first = config_record(ml_collections.ConfigDict({"a": 1, "b": {"c": (2, 3)}}))
    second = config_record(ml_collections.ConfigDict({"b": {"c": (2, 3)}, "a": 1}))
    assert first == second and re.fullmatch(r"[0-9a-f]{16}", first["config_fingerprint"])
    assert first["config"] == {"a": 1, "b": {"c": [2, 3]}}


def test_a_jobs_log_is_made_as_open_makes_a_file_readable_by_whom_the_umask_allows(tmp_path):
    """Another user of the machine (a colleague evaluating the run) reads the log as any other file there."""
    umask = os.umask(0o022)
    try:
        append_job_record(str(tmp_path / "jobs.jsonl"), {}, "rerun the job")
        with open(tmp_path / "plain.txt", "w"):
            pass
    finally:
        os.umask(umask)
    mode = lambda name: os.stat(tmp_path / name).st_mode & 0o777
    assert mode("jobs.jsonl") == mode("plain.txt") == 0o644


def test_jaxs_names_of_one_matmul_precision_are_named_once():
    """Checked against lax.Precision, which reads each name jax takes for a precision: two names of
    one precision named apart made a resume warn of another precision, and hosts refused."""
    from jax import lax

    from pixelflow_jax.software_versions import matmul_precision_named_once

    names = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32")
    for a in names:
        for b in names:
            same = lax.Precision(a) == lax.Precision(b)
            assert (matmul_precision_named_once(a) == matmul_precision_named_once(b)) == same, (a, b)
    assert matmul_precision_named_once(None) is None and matmul_precision_named_once("F32_F32_F32") == "F32_F32_F32"


def test_a_matmul_precision_named_as_unset_compiles_as_unset():
    """Names taken for no setting compile jax's matmuls as no setting does (XLA's DEFAULT precision),
    and the others do not: compared as unset, they are no change at a resume or between hosts."""
    from pixelflow_jax.software_versions import matmul_precision_named_once

    def lowered(precision):
        with jax.default_matmul_precision(precision):
            return jax.jit(jnp.matmul).lower(jnp.ones((2, 2)), jnp.ones((2, 2))).as_text()

    for name in ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32"):
        assert (lowered(name) == lowered(None)) == (matmul_precision_named_once(name) is None), name
