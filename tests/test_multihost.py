"""The checks the processes of a multi-host job make together (multihost.py), with the other
process played by fakes of jax's collectives. The two-process runs in test_train run them for real."""

import errno
import logging
import os
import re
import signal

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils

from pixelflow_jax import multihost, storage


def as_process(monkeypatch, index, count=2):
    monkeypatch.setattr(multihost.jax, "process_index", lambda: index)
    monkeypatch.setattr(multihost.jax, "process_count", lambda: count)


def other_process_answers(monkeypatch, gathered_from_other, broadcast=None):
    """process_allgather stacks this process's value with what the other process gave (its index:
    1 - this one's); broadcast_one_to_all gives `broadcast` (process 0's value) if set."""
    def allgather(value):
        mine, other = np.asarray(value), np.asarray(gathered_from_other(value), np.asarray(value).dtype)
        return np.stack([mine, other] if multihost.jax.process_index() == 0 else [other, mine])

    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all",
                        lambda value: value if broadcast is None else np.asarray(broadcast, np.int32))


def shared_checks_left(folder):
    return [name for name in storage.listdir(str(folder)) if name.startswith(".shared_check")]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_workdir_shared_by_the_processes_passes_and_is_left_as_it_was(tmp_path, monkeypatch, request, where):
    workdir = str(tmp_path / "run") if where == "local" else request.getfixturevalue("bucket") + "/run"
    as_process(monkeypatch, 1)  # it sees the file "process 0" wrote
    token = np.arange(4, dtype=np.int32)
    storage.write_atomically(multihost.shared_check_file(workdir, token), b"")
    other_process_answers(monkeypatch, lambda flag: 0, broadcast=token)
    multihost.check_shared_workdir(workdir)
    storage.remove(multihost.shared_check_file(workdir, token))

    as_process(monkeypatch, 0)
    other_process_answers(monkeypatch, lambda flag: 0)  # writable, and sees process 0's file
    multihost.check_shared_workdir(workdir)
    assert storage.listdir(workdir) == []


def test_a_folder_per_host_stops_every_process_naming_the_ones_that_do_not_see_it(tmp_path, monkeypatch):
    """--workdir=/tmp/run on several hosts: process 1 does not see the file process 0 wrote."""
    monkeypatch.setattr(multihost, "SHARED_CHECK_WAIT_S", 0.2)
    message = (r"is not one folder shared by the processes of this job: process 1 of 2 does not see the file "
               r"process 0 wrote there \(a local path is a folder per host\).*use a bucket \(gs://BUCKET/PATH\)")
    as_process(monkeypatch, 0)
    answers = iter([0, 1])  # process 1 can write, and does not see the probe
    other_process_answers(monkeypatch, lambda flag: next(answers))
    with pytest.raises(storage.StorageError, match=message):
        multihost.check_shared_workdir(str(tmp_path / "run"))
    assert shared_checks_left(tmp_path / "run") == []  # process 0 removes its file all the same

    # Process 1, on its own disk: process 0's token names a file that is not there.
    as_process(monkeypatch, 1)
    other_process_answers(monkeypatch, lambda flag: 0, broadcast=np.arange(4))
    with pytest.raises(storage.StorageError, match=message):
        multihost.check_shared_workdir(str(tmp_path / "host1"))


def test_a_process_without_write_access_is_named_on_every_process(tmp_path, monkeypatch):
    as_process(monkeypatch, 0)
    other_process_answers(monkeypatch, lambda flag: 1)  # process 1 could not write
    with pytest.raises(storage.StorageError, match=r"process 1 of 2 cannot write to .*run \(its log says why\)"):
        multihost.check_shared_workdir(str(tmp_path / "run"))


def test_processes_that_see_other_data_stop_with_each_ones_record_count(monkeypatch):
    as_process(monkeypatch, 1)
    other_process_answers(monkeypatch, lambda row: row)  # the same count and listing
    multihost.check_same_data(1000, "ab12", "/data/imagenet")
    for count in (999, 1000):  # a partial copy; as many files, but others
        other_process_answers(monkeypatch, lambda row: [123, 456, count])  # another digest
        with pytest.raises(ValueError, match=r"the processes of this job see different data in /data/imagenet: "
                                             r"process 1 of 2 sees other records than process 0 \(records counted: "
                                             rf"process 0: {count}, process 1: 1000\)"):
            multihost.check_same_data(1000, "ab12", "/data/imagenet")


def test_every_process_samples_the_images_process_0_counts_as_missing(tmp_path, monkeypatch):
    """Each process listed samples/ itself: one whose listing lagged counted another number of
    batches, and the processes waited for each other for ever."""
    from pixelflow_jax.sampling import sample_run

    for i in (0, 2, 3):
        (tmp_path / sample_run.image_name(i)).write_bytes(b"png")
    assert sample_run.images_to_sample(str(tmp_path), 5).tolist() == [1, 4]

    listings = []
    monkeypatch.setattr(sample_run, "images_on_disk", lambda folder: listings.append(folder) or set())
    monkeypatch.setattr(sample_run.jax, "process_index", lambda: 1)
    monkeypatch.setattr(sample_run, "from_process_0", lambda absent: np.array([0, 1, 0, 0, 1], np.int32))
    assert sample_run.images_to_sample(str(tmp_path), 5).tolist() == [1, 4]
    assert listings == []  # process 1 does not list: what it would find depends on when it looks


def test_processes_that_list_other_checkpoints_stop_before_restoring(monkeypatch):
    """A host whose file system listing lags: it would resume from another step than the others."""
    as_process(monkeypatch, 0)
    other_process_answers(monkeypatch, lambda row: row)
    multihost.check_same_checkpoints([10, 20], "/runs/xl/checkpoints")
    other_process_answers(monkeypatch, lambda row: [123, 456, 10])  # another listing, latest 10
    with pytest.raises(storage.StorageError, match=r"the processes of this job list different checkpoints in "
                                                   r"/runs/xl/checkpoints: process 1 of 2 sees other steps than "
                                                   r"process 0 \(latest step seen: process 0: 20, process 1: 10\)"):
        multihost.check_same_checkpoints([10, 20], "/runs/xl/checkpoints")


def test_processes_started_with_other_overrides_stop_naming_the_fields(monkeypatch):
    """A command edited on one host trained on without a word (process 0's lr recorded, another
    lr used by process 1), and sampling jobs of different image counts crashed in gloo."""
    from configs import c2i

    config = c2i.get_config("tiny")
    as_process(monkeypatch, 0)
    fields = list(multihost.job_fields("train", "gs://b/run", config))
    lr = fields.index("--config.train.lr")

    def other_process(value):  # the same fields; its train.lr another
        value = np.array(value)
        if value.shape == (len(fields),):
            value[lr] += 1
        return value

    other_process_answers(monkeypatch, other_process)
    with pytest.raises(ValueError, match=r"the processes of this job were started with different commands: process 1 "
                                         r"of 2 differs from process 0 in --config.train.lr \(this process, 0: "
                                         r"--config.train.lr=0.0001\)\. Run the same command on every host"):
        multihost.check_same_job(multihost.job_fields("train", "gs://b/run", config))
    other_process_answers(monkeypatch, lambda value: value)  # the same command
    multihost.check_same_job(multihost.job_fields("train", "gs://b/run", config))
    other_process_answers(monkeypatch, lambda value: np.array(value) + 1)  # other fields altogether
    with pytest.raises(ValueError, match="process 1 of 2 of this job has other config fields than process 0"):
        multihost.check_same_job(multihost.job_fields("train", "gs://b/run", config))


def test_processes_running_other_library_versions_stop_naming_the_package_and_this_hosts_version(monkeypatch):
    """Hosts installed at other times ran other jax or flax releases side by side without a word:
    other programs, other numbers than process 0 recorded, or collectives the others never joined."""
    from pixelflow_jax import software_versions

    versions = software_versions.version_fields()
    assert {"python", "jax", "jaxlib", "flax", "jax-cuda12-plugin", "libtpu"} <= set(versions)
    # A package absent here is named so (no machine has both the CUDA plug-ins and the TPU runtime).
    absent = [name for name in software_versions.ACCELERATOR_PACKAGES if not software_versions.package_version(name)]
    assert absent and all(versions[name] == "not installed" for name in absent)
    calls_of_the_other_process(monkeypatch, multihost.check_same_software, versions)
    multihost.check_same_software(versions)  # the same software everywhere
    other = {**versions, "jaxlib": "0.0.1", "libtpu": "0.0.2"}
    calls_of_the_other_process(monkeypatch, multihost.check_same_software, other)
    fix = ("Install the same versions on every host (the same pip install command, from one checkout's "
           "requirements.txt, on each)")
    with pytest.raises(ValueError, match=re.escape(
            "the processes of this job run different software: process 1 of 2 differs from process 0 in jaxlib, libtpu "
            f"(this process, 0: jaxlib {versions['jaxlib']}, libtpu {versions['libtpu']}). {fix}")):
        multihost.check_same_software(versions)
    # Process 1 names its own versions.
    calls_of_the_other_process(monkeypatch, multihost.check_same_software, versions, other=0)
    with pytest.raises(ValueError, match=re.escape("differs from process 0 in jaxlib, libtpu (this process, 1: jaxlib "
                                                   "0.0.1, libtpu 0.0.2)")):
        multihost.check_same_software(other)
    # Processes 1 and 2 of three, both with the other versions.
    given = []
    as_process(monkeypatch, 1, count=3)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda value: given.append(value) or np.stack([value] * 3))
    multihost.check_same_software(other)
    as_process(monkeypatch, 0, count=3)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda value: np.stack([value, given[0], given[0]]))
    with pytest.raises(ValueError, match=re.escape("processes 1, 2 of 3 differ from process 0 in jaxlib, libtpu")):
        multihost.check_same_software(versions)


@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_rows_shared_out_in_blocks_gather_back_to_every_row_in_order(monkeypatch, count):
    """Each process's block, padded, gathered and cut: the whole array again, for totals that
    count divides and that it does not (the evaluation's Inception features)."""
    for total in range(0, 10):
        rows = np.arange(total * 3, dtype=np.float32).reshape(total, 3)
        share = -(-total // count)
        blocks = []
        for index in range(count):
            as_process(monkeypatch, index, count)
            first, stop = multihost.rows_of_this_process(total)
            assert stop - first == len(range(total)[index * share:(index + 1) * share]), (total, index)
            blocks.append(rows[first:stop])
        assert np.array_equal(np.concatenate(blocks), rows), total  # every row once, in process order
        padded = []  # what each process gives the gather, then what the gather returns to all
        monkeypatch.setattr(multihost_utils, "process_allgather",
                            lambda value: padded.append(value) or np.stack([value] * count))
        for index in range(count):
            as_process(monkeypatch, index, count)
            multihost.gather_rows(blocks[index], total)
        if count > 1:
            monkeypatch.setattr(multihost_utils, "process_allgather", lambda value: np.stack(padded))
        np.testing.assert_array_equal(multihost.gather_rows(blocks[-1], total), rows)


def test_processes_computing_at_another_matmul_precision_stop_naming_the_setting(monkeypatch):
    """JAX_DEFAULT_MATMUL_PRECISION set in one host's environment made its share of every step
    compute at another precision than the other processes', and process 0's records said nothing."""
    calls_of_the_other_process(monkeypatch, multihost.check_same_matmul_precision)
    multihost.check_same_matmul_precision()  # the same (unset) everywhere
    with jax.default_matmul_precision("highest"):
        calls_of_the_other_process(monkeypatch, multihost.check_same_matmul_precision)
    with pytest.raises(ValueError, match=re.escape(
            "the processes of this job compute at different matmul precisions: process 1 of 2 differs from process 0 "
            "in jax_default_matmul_precision (this process, 0: None). Set JAX_DEFAULT_MATMUL_PRECISION alike on every "
            "host, or on none")):
        multihost.check_same_matmul_precision()
    # Process 1 names its own precision.
    calls_of_the_other_process(monkeypatch, multihost.check_same_matmul_precision, other=0)
    with jax.default_matmul_precision("highest"), pytest.raises(ValueError, match=re.escape(
            "process 1 of 2 differs from process 0 in jax_default_matmul_precision (this process, 1: highest)")):
        multihost.check_same_matmul_precision()
    # Processes 1 and 2 of three, both at another precision: each named.
    given = []
    as_process(monkeypatch, 1, count=3)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda value: given.append(value) or np.stack([value] * 3))
    with jax.default_matmul_precision("highest"):
        multihost.check_same_matmul_precision()
    as_process(monkeypatch, 0, count=3)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda value: np.stack([value, given[0], given[0]]))
    with pytest.raises(ValueError, match=re.escape(
            "processes 1, 2 of 3 differ from process 0 in jax_default_matmul_precision (this process, 0: None)")):
        multihost.check_same_matmul_precision()


def test_processes_at_one_matmul_precision_under_its_two_names_go_on(monkeypatch):
    """JAX_DEFAULT_MATMUL_PRECISION=float32 on one host and =highest on another is one precision
    (jax's two names for it): the job was refused as computing at different precisions."""
    with jax.default_matmul_precision("float32"):
        calls_of_the_other_process(monkeypatch, multihost.check_same_matmul_precision)
    with jax.default_matmul_precision("highest"):
        multihost.check_same_matmul_precision()


def test_a_host_that_set_the_default_matmul_precision_goes_on_with_hosts_that_set_none(monkeypatch):
    """JAX_DEFAULT_MATMUL_PRECISION=bfloat16 (or =default) names the precision a host without it
    compiles (XLA's DEFAULT): the job was refused as computing at different precisions."""
    for name in ("bfloat16", "default"):
        with jax.default_matmul_precision(name):
            calls_of_the_other_process(monkeypatch, multihost.check_same_matmul_precision)
        multihost.check_same_matmul_precision()


def calls_of_the_other_process(monkeypatch, check, *args, other=1):
    """What process `other` (1, or 0) gives each process_allgather while it runs check(*args) with its
    own values (the fake answers that everyone agrees): replayed to the other process, it plays that process."""
    given = []
    as_process(monkeypatch, other)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda value: given.append(np.asarray(value)) or np.stack([value, value]))
    check(*args)
    as_process(monkeypatch, 1 - other)
    answers = iter(given)
    other_process_answers(monkeypatch, lambda value: next(answers))


def test_a_process_with_another_value_of_any_field_is_found_from_what_it_hashes(monkeypatch):
    """The other process computes its own hashes (not a digest the test makes up): another lr,
    workdir or mode on process 1 is named; the same command passes."""
    from configs import c2i

    config = c2i.get_config("tiny")
    other = c2i.get_config("tiny")
    other.train.lr = 2e-4
    for mode, workdir, config_1, field in (("train", "gs://b/run", config, None),
                                           ("train", "gs://b/run", other, "--config.train.lr"),
                                           ("train", "gs://b/run2", config, "--workdir"),
                                           ("sample", "gs://b/run", config, "--mode")):
        calls_of_the_other_process(monkeypatch, multihost.check_same_job, multihost.job_fields(mode, workdir, config_1))
        if field is None:
            multihost.check_same_job(multihost.job_fields("train", "gs://b/run", config))
            continue
        with pytest.raises(ValueError, match=rf"process 1 of 2 differs from process 0 in {field} "):
            multihost.check_same_job(multihost.job_fields("train", "gs://b/run", config))


def test_a_process_with_as_many_records_but_other_files_is_found(monkeypatch):
    """A copy of the data with other files under the same count: the listing decides."""
    calls_of_the_other_process(monkeypatch, multihost.check_same_data, 1000, "listing of host 1", "/data")
    with pytest.raises(ValueError, match=r"process 1 of 2 sees other records than process 0 \(records counted: "
                                         r"process 0: 1000, process 1: 1000\)"):
        multihost.check_same_data(1000, "listing of host 0", "/data")
    calls_of_the_other_process(monkeypatch, multihost.check_same_data, 1000, "listing", "/data")
    multihost.check_same_data(1000, "listing", "/data")


def test_processes_that_find_another_latest_step_of_a_run_stop_before_reading_weights(tmp_path, monkeypatch):
    """A run still training saves a step between two processes' listings: each process resolved
    the run's latest step itself, so process 0 sampled its rows (or started a fine-tune's shards)
    from step 500 and process 1 from step 400, without a word."""
    from configs import c2i
    from pixelflow_jax import api
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.config import ModelConfig
    from pixelflow_jax.training import train
    from pixelflow_jax.training.run_config import check_run_config

    config = c2i.get_config("tiny")
    run = str(tmp_path / "run")
    model_cfg = ModelConfig.from_mapping(config.model)
    check_run_config(run, model_cfg, config)
    for step in (400, 500):
        (tmp_path / "run" / "checkpoints" / str(step)).mkdir(parents=True)
    as_process(monkeypatch, 0)
    other_process_answers(monkeypatch, lambda row: row)  # process 1 found step 500 too
    assert api.sampling_source(config, run)[0].run_step.step == 500
    other_process_answers(monkeypatch, lambda row: [*multihost.hashed("400", 2), 400])
    for flag, resolve in (("--config.sample.checkpoint", lambda: api.sampling_source(config, run)),
                          ("--config.train.init_from", lambda: train.check_init_from(config, model_cfg))):
        config.train.init_from = run
        with pytest.raises(CheckpointError, match=(
                rf"^the processes of this job found different latest steps of the training run {run} \(process 0: "
                r"500, process 1: 400\): it saved a step while they looked \(or a host's listing lags\). Name one "
                rf"step for all of them, {flag}={run}/checkpoints/500, or rerun the same command$")):
            resolve()


def test_processes_that_resolve_a_hub_checkpoint_to_other_commits_stop_while_local_copies_do_not(monkeypatch):
    """A Hub checkpoint is compared by the commit each process pinned (a push between two downloads
    gives other weights); a local folder is not compared by its path, which each host may hold a
    copy of at its own place. Process 1 hashes its own view here (calls_of_the_other_process)."""
    from pixelflow_jax import api
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    def checked(label, other_label):
        calls_of_the_other_process(monkeypatch, api.check_same_weights_everywhere,
                                   api.CheckpointSource("/cache/other", other_label), "hf://org/model", "--flag")
        api.check_same_weights_everywhere(api.CheckpointSource("/cache/mine", label), "hf://org/model", "--flag")

    checked("hf://org/model@" + "a" * 40, "hf://org/model@" + "a" * 40)
    with pytest.raises(CheckpointError, match=re.escape(
            "the processes of this job resolved --flag=hf://org/model to different checkpoints: process 1 of 2 read "
            "other weights than process 0 (this process, 0: hf://org/model@" + "a" * 40 + "); rerun the same "
            "command")):
        checked("hf://org/model@" + "a" * 40, "hf://org/model@" + "b" * 40)
    checked("/host0/copy/model", "/host1/elsewhere/model")  # a converted folder copied to each host


def jax_not_asked_to_start(monkeypatch):
    """jax.distributed.initialize, which must not be reached: a URL waited 5 minutes in it, a
    missing port was an IndexError traceback, a port that is no number a gRPC traceback."""
    def initialize(*args, **kwargs):
        raise AssertionError(f"jax.distributed.initialize{args} was called")

    monkeypatch.setattr(multihost.jax.distributed, "initialize", initialize)


@pytest.mark.parametrize("address,message", [
    ("http://10.0.0.2:8476", r"--coordinator_address=http://10.0.0.2:8476 is a URL: write HOST:PORT without the "
                             r"scheme, --coordinator_address=10.0.0.2:8476"),
    ("10.0.0.2", r"--coordinator_address=10.0.0.2 is not HOST:PORT \(process 0's host name or IP address, a colon "
                 r"and a port from 1 to 65535, e.g. 10.0.0.2:8476\)"),
    ("node-0:http", r"--coordinator_address=node-0:http is not HOST:PORT"),
    ("node-0:99999", r"--coordinator_address=node-0:99999 is not HOST:PORT"),
    (":8476", r"--coordinator_address=:8476 is not HOST:PORT"),
])
def test_a_coordinator_address_that_is_not_host_and_port_is_refused_before_jax_starts(monkeypatch, address, message):
    jax_not_asked_to_start(monkeypatch)
    with pytest.raises(ValueError, match=message):
        multihost.start_distributed(address, 2, 1)


def test_ipv6_and_host_names_with_a_port_are_coordinator_addresses():
    for address, port in (("[::1]:8476", 8476), ("node-0.cluster.local:1", 1), ("10.0.0.2:65535", 65535)):
        assert multihost.coordinator_port(address) == port


def test_process_0_refuses_a_coordinator_port_in_use_on_its_host_where_grpc_crashed(monkeypatch):
    """Process 0 serves the job on its port: a port already taken was a segmentation fault in gRPC
    (and the other processes waited 5 minutes for it). Only process 0 binds the port."""
    import socket

    started = []
    monkeypatch.setattr(multihost.jax.distributed, "initialize", lambda *args, **kwargs: started.append(args))
    monkeypatch.setattr(multihost.jax, "process_index", lambda: 1)
    with socket.socket(socket.AF_INET) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"--coordinator_address=localhost:{port}: port {port} is in use on "
                                             r"this host, where process 0 serves the job \(.*\): pick a free port, "
                                             "the same on every process"):
            multihost.start_distributed(f"localhost:{port}", 2, 0)
        assert started == []
        multihost.start_distributed(f"localhost:{port}", 2, 1)  # another process connects to it
        assert started == [(f"localhost:{port}", 2, 1)]


def test_a_process_whose_peers_never_join_stops_with_one_line_when_its_wait_ends(tmp_path):
    """--num_processes=2 with one process started: after jax's 5 minutes the process aborted in C++
    ("another task died", a stack dump), silent until then. Each process of a job short of one
    (process 0 alone, waiting for process 1; process 1 alone, with no process 0 to reach) now says
    what it waits for, and stops with one line naming the flags (the wait shortened here)."""
    import subprocess
    import sys

    from conftest import REPO, free_port

    addresses = [f"localhost:{free_port()}" for _ in range(2)]  # one job each
    code = ("import sys; from absl import logging; from pixelflow_jax import multihost; "
            "logging.set_verbosity(logging.INFO); multihost.CONNECT_WAIT_S = 4; "
            "multihost.start_distributed(sys.argv[1], 2, int(sys.argv[2]))")
    alone = [subprocess.Popen([sys.executable, "-c", code, addresses[i], str(i)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    try:
        errors = [process.communicate(timeout=90)[1] for process in alone]
    finally:
        for process in alone:
            process.kill()
    for i, (address, process, err) in enumerate(zip(addresses, alone, errors)):
        assert f"process {i} of 2: joining the job's processes at {address} (waiting up to 4 s for all of them)" in err
        assert process.returncode == 1 and err.rstrip().splitlines()[-1] == (
            f"error: --distributed: process {i} waited 4 s for the 2 processes of this job to join at {address}, "
            "and not all did: start one process for each --process_id from 0 to 1, each with the same "
            "--coordinator_address and --num_processes (process 0's host and a port every host can reach); "
            "a --process_id given twice, or a process that stopped (its log says why), leaves the job short"), err


@pytest.mark.parametrize("num_processes,process_id,message", [
    (2, 2, r"--process_id=2 is not one of this job's process ids, 0 to 1 \(--num_processes=2\): give each process "
           r"its own, process 0 on the --coordinator_address host"),
    (2, -1, r"--process_id=-1 is not one of this job's process ids, 0 to 1"),
    (0, 0, r"--num_processes=0: a job has at least 1 process"),
])
def test_process_ids_out_of_range_are_named_by_their_flags_not_told_to_pass_them(monkeypatch, num_processes, process_id,
                                                                                 message):
    """jax's error named its own arguments and ended with our advice for a cluster jax cannot
    detect: 'pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I', which the user had."""
    jax_not_asked_to_start(monkeypatch)
    with pytest.raises(ValueError, match=message):
        multihost.start_distributed("localhost:8476", num_processes, process_id)


def test_one_process_that_cannot_write_says_so_in_storages_words_and_one_of_several_names_itself(tmp_path, monkeypatch):
    def refused(folder):
        raise storage.StorageError(f"cannot write to {folder}: PermissionError")

    monkeypatch.setattr(multihost.storage, "check_writable", refused)
    as_process(monkeypatch, 0, count=1)
    with pytest.raises(storage.StorageError, match=r"^cannot write to /runs/a: PermissionError$"):
        multihost.check_shared_workdir("/runs/a")
    as_process(monkeypatch, 1)
    other_process_answers(monkeypatch, lambda flag: 0)  # process 0 could write
    with pytest.raises(storage.StorageError, match=r"^process 1: cannot write to /runs/a: PermissionError$"):
        multihost.check_shared_workdir("/runs/a")


def test_a_process_waits_for_process_0s_file_to_appear_on_its_mount(tmp_path, monkeypatch):
    """NFS shows another host's new file a moment later: one look only called a shared folder a
    folder per host."""
    looks = []
    monkeypatch.setattr(multihost.storage, "exists", lambda path: looks.append(path) or len(looks) > 1)
    as_process(monkeypatch, 1)
    other_process_answers(monkeypatch, lambda flag: 0, broadcast=np.arange(4))
    multihost.check_shared_workdir(str(tmp_path / "run"))
    assert len(looks) == 2


def test_processes_counting_other_numbers_of_records_without_a_listing_are_found(monkeypatch):
    """A source that lists no files (tfds): the count alone tells the processes' data apart."""
    calls_of_the_other_process(monkeypatch, multihost.check_same_data, 999, None, "imagenet2012")
    with pytest.raises(ValueError, match=r"records counted: process 0: 1000, process 1: 999\)"):
        multihost.check_same_data(1000, None, "imagenet2012")


def test_a_record_count_past_int32_is_compared_without_overflowing(monkeypatch):
    """A web-scale caption set counts more than 2**31 - 1 records: the count shown is capped."""
    calls_of_the_other_process(monkeypatch, multihost.check_same_data, 3_000_000_000, "listing", "/data")
    multihost.check_same_data(3_000_000_000, "listing", "/data")
    calls_of_the_other_process(monkeypatch, multihost.check_same_data, 3_000_000_000, "other listing", "/data")
    with pytest.raises(ValueError, match=r"records counted: process 0: 2147483647, process 1: 2147483647\)"):
        multihost.check_same_data(3_000_000_000, "listing", "/data")


def test_the_fields_that_differ_are_shown_with_this_processes_values_strings_quoted(monkeypatch):
    from configs import c2i

    config, other = c2i.get_config("tiny"), c2i.get_config("tiny")
    config.data.root = "/data/imagenet"
    other_fields = multihost.job_fields("train", "gs://b/run2", other)
    calls_of_the_other_process(monkeypatch, multihost.check_same_job, other_fields)
    with pytest.raises(ValueError, match=re.escape(
            "differs from process 0 in --workdir, --config.data.root (this process, 0: --workdir='gs://b/run', "
            '--config.data.root="/data/imagenet"). Run the same command on every host')):
        multihost.check_same_job(multihost.job_fields("train", "gs://b/run", config))


def test_a_sampling_loop_of_one_process_raises_a_sigterm_a_library_caught(monkeypatch):
    """Without --distributed stop_if_preempted is the loop's stop_if_terminated: a SIGTERM that jax's
    gc callback swallowed would otherwise sample to the end."""
    from pixelflow_jax import command_line

    monkeypatch.setattr(command_line, "_stop_signal", [None])
    multihost.stop_if_preempted(1)
    command_line._stop_signal[0] = signal.SIGTERM
    with pytest.raises(command_line.Terminated):
        multihost.stop_if_preempted(2)


def test_a_distributed_jobs_hang_up_stops_every_process_at_one_batch_and_this_one_as_hung_up(monkeypatch):
    """A SIGHUP (an ssh session to one host closed) ended that process at once, with no message, and
    the others waited at their next collective for it. Passed to jax's preemption service as a
    SIGTERM, it stops every process at the same batch: this one with 129, the others with 143."""
    from pixelflow_jax import command_line

    monkeypatch.setattr(command_line, "_passed_on", [None])
    monkeypatch.setattr(command_line, "_stop_signal", [None])
    monkeypatch.setattr(multihost.jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda passes: passes == 2)
    caught = []  # jax's preemption service, which holds SIGTERM
    before = signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum)), \
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(command_line.Terminated) as elsewhere:  # a process that was not hung up
            multihost.stop_if_preempted(2)
        assert type(elsewhere.value) is command_line.Terminated
        command_line.stop_on_hang_up(distributed=True)
        os.kill(os.getpid(), signal.SIGHUP)
        assert caught == [signal.SIGTERM]
        multihost.stop_if_preempted(1)  # not this process's stop alone: the sync point decides
        with pytest.raises(command_line.HungUp) as stop:
            multihost.stop_if_preempted(2)
        assert command_line.stop_cause(stop.value)[1] == 129 and command_line.stop_received() is None
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # under nohup
        command_line.stop_on_hang_up(distributed=True)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before[0])
        signal.signal(signal.SIGHUP, before[1])

def test_a_distributed_jobs_sigusr1_passed_on_stops_it_as_terminated_with_its_own_status(monkeypatch):
    """Only a hang-up passed on makes the sync point's stop a HungUp: SLURM's SIGUSR1 (or USR2) passed on
    to jax's service stops every process as SIGTERM does, this one with 128 + its number, not as hung up."""
    from pixelflow_jax import command_line

    monkeypatch.setattr(command_line, "_passed_on", [signal.SIGUSR1])
    stop = command_line.preemption_stop()
    assert type(stop) is command_line.Terminated
    assert command_line.stop_cause(stop) == ("terminated (SIGUSR1, handled as SIGTERM)", 138)


A_HANG_UP_IN_A_DISTRIBUTED_JOB = """
import os, signal, sys, time
import jax
from pixelflow_jax import command_line, multihost

jax.distributed.initialize(sys.argv[1], num_processes=1, process_id=0)  # with jax's preemption service
signal.signal(signal.SIGHUP, signal.SIG_DFL)  # (a suite run under nohup passes its SIG_IGN on)
command_line.stop_on_hang_up(distributed=True)
multihost.stop_if_preempted(1)
os.kill(os.getpid(), signal.SIGHUP)
time.sleep(0.5)
try:
    for passes in range(2, 20):
        multihost.stop_if_preempted(passes)
        time.sleep(0.1)
    print("ran on")
except command_line.Terminated as stop:
    print("stopped", *command_line.stop_cause(stop))
"""


def test_jaxs_preemption_service_takes_a_hang_up_passed_on_and_the_sync_point_stops_the_job_as_hung_up():
    """The hang-up reaches jax's service as a SIGTERM this process sends itself (a job of one
    process here: the service is the same), and the sync point stops the job with the hang-up's
    status. About 3 s."""
    import subprocess
    import sys

    from conftest import REPO, free_port

    result = subprocess.run([sys.executable, "-c", A_HANG_UP_IN_A_DISTRIBUTED_JOB, f"localhost:{free_port()}"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.stdout.splitlines()[-1:] == [
        "stopped hung up (SIGHUP: the terminal or ssh session it was started from closed) 129"], result.stderr[-3000:]


@pytest.mark.parametrize("address,message", [
    ("http://node-0", r"^--coordinator_address=http://node-0 is a URL: write HOST:PORT without the scheme$"),
    ("node-0", r"^--coordinator_address=node-0 is not HOST:PORT \(.*, e\.g\. node-0:8476\)$"),
    ("node-0:http", r"^--coordinator_address=node-0:http is not HOST:PORT \(.*, e\.g\. node-0:8476\)$"),
    ("node-0:0", r"^--coordinator_address=node-0:0 is not HOST:PORT"),
    ("node-0:65536", r"^--coordinator_address=node-0:65536 is not HOST:PORT"),
    ("::1:8476", r"^--coordinator_address=::1:8476 is not HOST:PORT \(.*, e\.g\. 10\.0\.0\.2:8476\)$"),
    ("root@node-0:8476", r"^--coordinator_address=root@node-0:8476 is not HOST:PORT \(.*, e\.g\. 10\.0\.0\.2:8476\)$"),
])
def test_a_coordinator_address_is_refused_with_an_example_made_from_its_own_host(address, message):
    """Ports 0 and 65536 are past the ends; an IPv6 address takes brackets (as gRPC reads it); an ssh
    login's user@ is no part of a host name (gRPC would look up 'root@node-0', and wait)."""
    with pytest.raises(ValueError, match=message):
        multihost.coordinator_port(address)


class RefusedProbe:
    """A socket whose bind fails with `errno` (set on the class by the test)."""
    errno = None

    def __init__(self, *args):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *args):
        pass

    def setsockopt(self, *args):
        pass

    def bind(self, address):
        raise OSError(self.errno, os.strerror(self.errno))


def test_a_port_this_process_may_not_bind_is_named_and_a_probes_own_limit_passes(monkeypatch):
    """Ports below 1024 need root (EACCES): process 0 could not serve the job there. A probe that
    fails for its own reasons (no such address) leaves the port to jax."""
    monkeypatch.setattr(multihost.socket, "socket", RefusedProbe)
    monkeypatch.setattr(RefusedProbe, "errno", errno.EACCES)
    with pytest.raises(ValueError, match=r"^--coordinator_address=node-0:80: port 80 is not open to this process "
                                         r"\(Permission denied\), where process 0 serves the job"):
        multihost.check_port_free("node-0:80", 80)
    monkeypatch.setattr(RefusedProbe, "errno", errno.EADDRNOTAVAIL)
    multihost.check_port_free("node-0:8476", 8476)


def test_a_coordinator_bound_elsewhere_by_jax_coordinator_bind_address_is_not_probed(monkeypatch):
    """jax binds JAX_COORDINATOR_BIND_ADDRESS instead of [::]:PORT where it is set: the port of
    --coordinator_address may be taken on this host (a proxy's) and the job still start."""
    probes = []
    monkeypatch.setattr(multihost, "check_port_free", lambda *args: probes.append(args))
    monkeypatch.setenv("JAX_COORDINATOR_BIND_ADDRESS", "[::]:9000")
    multihost.check_cluster_flags("node-0:8476", 2, 0)
    monkeypatch.delenv("JAX_COORDINATOR_BIND_ADDRESS")
    multihost.check_cluster_flags("node-0:8476", 2, 0)
    assert probes == [("node-0:8476", 8476)]


def test_processes_that_joined_are_not_ended_by_the_wait_and_jaxs_own_wait_ends_after_it(monkeypatch):
    """The wait's timer is cancelled once jax has joined the processes (left running, it ended a
    job at work CONNECT_WAIT_S after its start); jax's own timeout, a C++ abort, comes after ours."""
    import time

    timeouts, ended = [], []
    monkeypatch.setattr(multihost.jax.config, "update", lambda *args: None)
    monkeypatch.setattr(multihost.jax.distributed, "initialize",
                        lambda *args, initialization_timeout: timeouts.append(initialization_timeout))
    monkeypatch.setattr(multihost, "stop_waiting", lambda *args: ended.append(args))
    monkeypatch.setattr(multihost, "CONNECT_WAIT_S", 0.1)
    multihost.start_distributed("node-0:8476", 2, 1)
    time.sleep(0.5)
    assert ended == [] and timeouts[0] > multihost.CONNECT_WAIT_S


def test_processes_of_a_fresh_run_list_no_checkpoints_alike(monkeypatch):
    calls_of_the_other_process(monkeypatch, multihost.check_same_checkpoints, [], "/runs/new/checkpoints")
    multihost.check_same_checkpoints([], "/runs/new/checkpoints")


def test_a_platform_jax_cannot_start_stops_a_process_as_it_joins_in_one_line(monkeypatch):
    """Its backends start once the processes have joined (jax.distributed.initialize comes first):
    JAX_PLATFORMS=cuda on a host without NVIDIA GPUs was a traceback at the log line after."""
    import jax

    monkeypatch.setattr(jax.config, "update", lambda *args: None)  # this session's collectives stay
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: None)
    monkeypatch.setattr(jax, "devices", lambda: (_ for _ in ()).throw(AssertionError()))
    with pytest.raises(ValueError, match=r"^JAX_PLATFORMS=.* asks jax for a platform it cannot start here|"
                                         r"^jax cannot start its backends"):
        multihost.start_distributed("localhost:1234", 2, 1)


def test_processes_that_list_the_same_latest_step_but_other_earlier_ones_are_found(monkeypatch):
    """A lagging listing may miss an older step alone: compared by the latest step only, it passed."""
    calls_of_the_other_process(monkeypatch, multihost.check_same_checkpoints, [20], "/runs/xl/checkpoints")
    with pytest.raises(storage.StorageError, match=r"process 1 of 2 sees other steps than process 0 \(latest step "
                                                   r"seen: process 0: 20, process 1: 20\)"):
        multihost.check_same_checkpoints([10, 20], "/runs/xl/checkpoints")


def test_only_the_inputs_that_differ_are_named_and_a_count_only_where_the_input_has_one(monkeypatch):
    inputs = lambda prompts: [multihost.InputRead("--labels=a.npz", "same"),
                              multihost.InputRead("--prompts_file=p.txt", prompts),
                              multihost.InputRead("--weights=w", "same", 7, "")]
    calls_of_the_other_process(monkeypatch, multihost.check_same_inputs, inputs("old"))
    monkeypatch.setattr(multihost, "host_names", lambda: ["h0", "h1"])
    with pytest.raises(ValueError, match=r"process 1 of 2 \(on h1\) reads other content than process 0 \(on h0\) in "
                                         r"--prompts_file=p\.txt\. Each host"):
        multihost.check_same_inputs(inputs("new"))


def test_a_process_that_failed_in_failing_together_raises_its_own_error():
    """The others name it; its own error says why."""
    with pytest.raises(KeyError, match="the cause"):
        with multihost.failing_together((KeyError,), "checking the inputs"):
            raise KeyError("the cause")


def test_srun_of_one_task_is_no_lone_task(monkeypatch):
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert multihost.lone_task_of_srun() is None
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert "as 2 tasks" in multihost.lone_task_of_srun()
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "two")  # set by hand: no srun's count, and no crash in int()
    assert multihost.lone_task_of_srun() is None


def test_a_loop_after_another_asks_the_sync_point_from_the_pass_after_the_last_one_asked(monkeypatch):
    asked = []
    monkeypatch.setattr(multihost, "_last_pass_asked", [0])  # this process's own count left as it was
    monkeypatch.setattr(multihost.jax.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(multihost_utils, "reached_preemption_sync_point", lambda passes: asked.append(passes) or False)
    for passes in (1, 2, 3):
        multihost.stop_if_preempted(passes)
    multihost.stop_if_preempted_at_the_next_pass()
    assert asked == [1, 2, 3, 4]


def test_a_cluster_jax_detects_is_joined_without_the_flags_and_one_it_cannot_detect_names_them(monkeypatch, caplog):
    """On Cloud TPU or under SLURM the three flags are left out (None): nothing of theirs is checked,
    and jax detects the cluster. Where it detects none, its ValueError names its own arguments: the
    error names the flags that replace detection. The line logged before the wait does not say a
    cluster was detected (it came before jax's error on a machine with none)."""
    caplog.set_level(logging.INFO)
    joined = []
    monkeypatch.setattr(multihost.jax.config, "update", lambda *args: None)  # this session's collectives stay
    monkeypatch.setattr(multihost.jax.distributed, "initialize", lambda *args, **kwargs: joined.append(args))
    multihost.start_distributed(None, None, None)
    assert joined == [(None, None, None)]

    def no_cluster_detected(*args, **kwargs):
        raise ValueError("coordinator_address should be defined.")  # jax 0.10's words

    monkeypatch.setattr(multihost.jax.distributed, "initialize", no_cluster_detected)
    with pytest.raises(ValueError, match=re.escape(
            "--distributed: coordinator_address should be defined. Where jax cannot detect the cluster (Cloud TPU, "
            "SLURM, Open MPI), pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every "
            "process")):
        multihost.start_distributed(None, None, None)
    assert "this process (the cluster left to jax to detect: Cloud TPU, SLURM, Open MPI): joining the job's " \
           "processes (waiting up to" in caplog.text


def test_a_process_of_a_detected_cluster_whose_peers_never_join_ends_with_one_line(monkeypatch):
    """Without the flags there is no process id or count to name: the timer's end of the wait
    (stop_waiting) says what to start, and ends the process with status 1 (a TypeError in the timer's
    thread left it waiting for jax's C++ abort)."""
    from pixelflow_jax import command_line

    def exit_without_teardown(message, status):
        raise SystemExit(message, status)

    monkeypatch.setattr(command_line, "exit_without_teardown", exit_without_teardown)
    with pytest.raises(SystemExit) as ended:
        multihost.stop_waiting("", None, None)
    assert ended.value.args == (
        f"error: --distributed: not every process of this job joined within {multihost.CONNECT_WAIT_S} s: start the "
        "same command on every host of the cluster (a process that stopped says why in its log)", 1)


def test_a_coordinator_port_a_stopped_job_served_just_now_is_free_for_the_next_job(monkeypatch):
    """A job stopped and started again at once: its closed connections linger in TIME_WAIT on the
    coordinator's port, which gRPC binds through (SO_REUSEADDR); the probe must too, or the
    restart is refused as 'in use' for a minute."""
    import socket

    with socket.socket() as coordinator:
        coordinator.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        coordinator.bind(("127.0.0.1", 0))
        coordinator.listen()
        port = coordinator.getsockname()[1]
        process_1 = socket.create_connection(("127.0.0.1", port))
        served, _ = coordinator.accept()
        served.close()  # the coordinator closes first: TIME_WAIT on its side, on the port
        process_1.close()
    multihost.check_port_free(f"localhost:{port}", port)


def test_a_host_without_ipv6_probes_the_coordinator_port_over_ipv4(monkeypatch):
    """Where the kernel has no IPv6, the dual-stack probe cannot be made: an IPv4 one finds a port
    taken all the same (the probe's own OSError was a traceback)."""
    import socket

    real_socket = socket.socket

    def without_ipv6(family=socket.AF_INET, *args):
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        return real_socket(family, *args)

    monkeypatch.setattr(multihost.socket, "socket", without_ipv6)
    with real_socket(socket.AF_INET) as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ValueError, match=rf"^--coordinator_address=localhost:{port}: port {port} is in use on "
                                             "this host"):
            multihost.check_port_free(f"localhost:{port}", port)


def test_rows_gathered_from_several_processes_keep_their_dtype(monkeypatch):
    """The padding took numpy's float64: the evaluation's float32 features came back float64 from a
    job of several processes, and as they were from one."""
    as_process(monkeypatch, 0)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda value: np.stack([value, value]))
    for rows in (np.ones((2, 3), np.float32), np.ones((2,), np.int32)):
        assert multihost.gather_rows(rows, 3).dtype == rows.dtype


def test_what_processes_compare_is_hashed_as_its_bytes_a_name_that_is_not_utf8_as_its_own():
    """The first words of the SHA-256 of the text's UTF-8 bytes. A file name that is not UTF-8 (read
    with os.fsdecode's surrogate escapes: a workdir, a features file's path) hashes as its bytes on
    disk: two such names stay apart, and neither stops the job."""
    import hashlib

    for raw in ("café".encode(), b"caf\xe9", b"caf\xe8"):
        assert multihost.hashed(os.fsdecode(raw), 2).tobytes() == hashlib.sha256(raw).digest()[:8]
    assert multihost.hashed("café", 1).tobytes() == hashlib.sha256("café".encode()).digest()[:4]


def test_inputs_two_of_three_processes_read_otherwise_are_named_with_each_processes_host(monkeypatch):
    """Each host's name is gathered as its first 64 bytes (a longer one cut, in a character if need
    be); the processes at fault are listed, each with its host, and every input any of them read
    otherwise (the checkpoint: process 2 alone), with each one's prompt count."""
    def host_row(name: bytes):
        return np.frombuffer(name.ljust(multihost.HOST_NAME_BYTES, b"\0"), np.int32)

    def read_rows(weights: str, prompts: str, count: int):
        return np.array([[*multihost.hashed(weights, 2), 0], [*multihost.hashed(prompts, 2), count]], np.int32)

    others = {(multihost.HOST_NAME_BYTES // 4,): [host_row(b"gpu-1"), host_row(b"gpu-2")],
              (2, 3): [read_rows("weights", '["a fox", "a cat"]', 2),
                       read_rows("other weights", '["a fox", "a dog", "a cow"]', 3)]}
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda value: np.stack([value, *others[np.shape(value)]]))
    monkeypatch.setattr(multihost.socket, "gethostname", lambda: "node-" + "é" * 40)  # 85 bytes
    as_process(monkeypatch, 0, count=3)
    cut = "node-" + "é" * 29 + "\ufffd"  # 63 bytes, then the first of the next é's two
    with pytest.raises(ValueError, match=re.escape(
            f"processes 1, 2 of 3 (on gpu-1, gpu-2) read other content than process 0 (on {cut}) in "
            "--config.sample.checkpoint /run; --config.sample.prompts_file p.txt (prompts: process 0: 1, process 1: "
            "2, process 2: 3). Each host")):
        multihost.check_same_inputs([multihost.InputRead("--config.sample.checkpoint /run", "weights"),
                                     multihost.InputRead("--config.sample.prompts_file p.txt", '["a fox"]', 1,
                                                         "prompts")])
