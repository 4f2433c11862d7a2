"""The records that say what produced a workdir's numbers: software versions, devices, and the line
each started job appends to its workdir's log of jobs."""

import json

import jax
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


def test_each_job_appends_its_line_and_keeps_the_earlier_ones(tmp_path):
    path = str(tmp_path / "new_workdir" / "jobs.jsonl")  # its folder made
    append_job_record(path, {"start_step": 0}, "free space")
    append_job_record(path, {"start_step": 5}, "free space")
    jobs = [json.loads(line) for line in open(path)]
    assert [job["start_step"] for job in jobs] == [0, 5]
    assert all({"time", "command", "cwd", "environment"} <= set(job) for job in jobs)


def test_a_record_that_cannot_be_written_is_an_error_naming_it_and_the_fix(tmp_path):
    (tmp_path / "jobs.jsonl").mkdir()  # a folder in its place
    with pytest.raises(storage.StorageError, match=rf"^cannot write {tmp_path}/jobs.jsonl \(IsADirectoryError: .*\); "
                                                   "free space or make the workdir writable$"):
        append_job_record(str(tmp_path / "jobs.jsonl"), {}, "free space or make the workdir writable")


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
        append_job_record(path, {"start_step": 0}, "free space")
    assert not (tmp_path / "jobs.jsonl").exists()


def test_two_configs_of_the_same_fields_have_one_fingerprint_and_any_change_another():
    from configs import c2i

    config = c2i.get_config("tiny")
    record = config_record(config)
    assert record == config_record(c2i.get_config("tiny")) and record["config"]["train"]["lr"] == config.train.lr
    config.train.lr *= 2
    assert config_record(config)["config_fingerprint"] != record["config_fingerprint"]
