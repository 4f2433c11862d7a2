"""The path layer: URLs are never local paths; files in a bucket (a local GCS emulator) appear
whole; a bucket that cannot be written stops a run before its first step, with the cause."""

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, cpu_devices
from pixelflow_jax import storage


def test_urls_are_never_made_local():
    assert storage.absolute("gs://b/run") == "gs://b/run"
    assert storage.absolute("run") == os.path.join(os.getcwd(), "run")
    assert storage.join("gs://b/run/", "samples", "000001.png") == "gs://b/run/samples/000001.png"
    assert storage.dirname("gs://b/run/checkpoints/4") == "gs://b/run/checkpoints"
    assert storage.basename("gs://b/run/checkpoints/4/") == "4"
    assert storage.resolved("gs://b/run/") == storage.resolved("gs://b/run")  # one folder, compared as one
    with pytest.raises(storage.StorageError, match=r"unsupported URL scheme s3://; paths are local or gs://"):
        storage.exists("s3://b/run")
    with pytest.raises(storage.StorageError, match=r"unsupported URL scheme GS:// \(write gs://b/run: schemes are "
                                                   r"lower case\)"):
        storage.check_supported("GS://b/run")
    with pytest.raises(storage.StorageError, match=r"\(write hf://org/model: schemes are lower case\)"):
        storage.check_supported("HF://org/model")
    with pytest.raises(storage.StorageError, match=r"unsupported URL scheme gcs:// \(write gs://b/run\);"):
        storage.check_supported("gcs://b/run")
    with pytest.raises(storage.StorageError, match=r"hf://me/out: hf:// \(the Hugging Face Hub\) is read here for "
                                                   r"checkpoints and T5 folders only"):
        storage.check_supported("hf://me/out")  # said "write hf://me/out: schemes are lower case"
    # a web address given as an output (--workdir, the packer's --output) was told to download it first
    with pytest.raises(storage.StorageError, match=re.escape(
            "https://host/runs/x: unsupported URL scheme https://: nothing is downloaded or uploaded at run time (an "
            "input: download it first, wget https://host/runs/x, and pass the file's path); paths are local or gs://")):
        storage.check_supported("https://host/runs/x")
    for address in ("http://host/model.pt", "HTTPS://host/model.pt"):  # http too, and a scheme in capitals
        with pytest.raises(storage.StorageError, match=re.escape(f"(an input: download it first, wget {address}, ")):
            storage.check_supported(address)
    assert storage.user_path("gs://b/run/") == "gs://b/run/"  # a trailing slash is fine
    with pytest.raises(storage.StorageError, match=r'gs://b//run/x has an empty folder name \("//"\).*write '
                                                   r'gs://b/run/x'):
        storage.user_path("gs://b//run/x")  # gs://b/$PREFIX/run/x with an empty PREFIX
    with pytest.raises(storage.StorageError, match=r'runs/gs://b/x holds "://" inside a path: a URL starts with its '
                                                   r"scheme \(write gs://b/x\)"):
        storage.user_path("runs/gs://b/x")  # was "unsupported URL scheme runs/gs://"


@pytest.mark.parametrize("address, url", [
    ("https://console.cloud.google.com/storage/browser/b/runs/a;tab=objects?project=p", "gs://b/runs/a"),
    ("https://console.cloud.google.com/storage/browser/_details/b/runs/x.pt;tab=live_object", "gs://b/runs/x.pt"),
    ("https://storage.googleapis.com/b/runs/a/", "gs://b/runs/a"),
    ("https://storage.cloud.google.com/b/runs/my%20run", "gs://b/runs/my run"),
    ("https://console.cloud.google.com/storage/browser/b", "gs://b"),
])
def test_a_buckets_web_address_is_refused_naming_its_gs_url(address, url):
    """Addresses copied from the Cloud console were refused as downloads ("download it first (wget
    ...)", for a workdir), or, with the console's ?project=, for holding '?'."""
    with pytest.raises(storage.StorageError, match=f"^{re.escape(address)} is the web address of {re.escape(url)}; "
                                                   f"buckets are read by their gs:// URLs: write {re.escape(url)}$"):
        storage.user_path(address)


def test_a_buckets_web_address_without_its_scheme_is_no_new_local_folder(tmp_path, monkeypatch):
    """storage.googleapis.com/b/run (the https:// lost in a copy) was taken for a local path: a
    training run made a folder storage.googleapis.com/ and trained there."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(storage.StorageError, match=re.escape("storage.googleapis.com/b/run is the web address of "
                                                             "gs://b/run without its https://; buckets are read by "
                                                             "their gs:// URLs: write gs://b/run (or ./")):
        storage.user_path("storage.googleapis.com/b/run")
    (tmp_path / "storage.googleapis.com").mkdir()  # a folder of that name, made on purpose: used as named
    assert storage.user_path("storage.googleapis.com/b/run") == "storage.googleapis.com/b/run"
    assert storage.user_path("./storage.googleapis.com/b/run") == "./storage.googleapis.com/b/run"


@pytest.mark.parametrize("typed, fixed", [("gs://gs://b/run", "gs://b/run"), ("gs://gs:/b/run", "gs://b/run"),
                                          ("gs://gcs://b/run", "gs://b/run")])
def test_a_url_with_its_scheme_twice_names_the_url_meant(typed, fixed):
    """--workdir=gs://$BUCKET/run with BUCKET=gs://b: the fix offered was gs://gs:/b/run."""
    with pytest.raises(storage.StorageError, match=f"^{re.escape(typed)} starts with two schemes .*: "
                                                   f"write {re.escape(fixed)}$"):
        storage.user_path(typed)


def test_a_url_without_its_bucket_keeps_its_path_in_the_fix():
    """gs://$BUCKET/runs/a with BUCKET empty was told to write gs://BUCKET/..., losing runs/a."""
    with pytest.raises(storage.StorageError, match=r"^gs:///runs/a names no bucket: write gs://BUCKET/runs/a$"):
        storage.user_path("gs:///runs/a")
    with pytest.raises(storage.StorageError, match=r"^gs:// names no bucket: write gs://BUCKET/\.\.\.$"):
        storage.user_path("gs://")


def test_a_bucket_name_gcs_cannot_hold_is_refused_naming_the_rule(monkeypatch):
    """gs://BUCKET/... pasted from the README, or a name with capitals: the emulator answered that
    the bucket does not exist, GCS a 400 'Invalid bucket name' through the bucket client's retries."""
    rule = "which holds only lower case letters, digits, '-', '_' and '.', and starts and ends with a letter or digit"
    with pytest.raises(storage.StorageError, match=re.escape(f"gs://BUCKET/runs/xl: 'BUCKET' cannot be a bucket's "
                                                             f"name, {rule} (BUCKET in the README's commands stands "
                                                             "for your bucket's name)") + "$"):  # no lower-case fix
        storage.user_path("gs://BUCKET/runs/xl")
    with pytest.raises(storage.StorageError, match=re.escape(f"{rule}: write gs://my-bucket/runs/a")):
        storage.user_path("gs://My-Bucket/runs/a")
    with pytest.raises(storage.StorageError, match=re.escape(rule) + "$"):
        storage.user_path("gs://bucket-/run")
    assert storage.user_path("gs://my_bucket.example.com/run") == "gs://my_bucket.example.com/run"
    monkeypatch.setenv("BUCKET_OF_RUNS", "my-bucket")
    monkeypatch.delenv("UNSET_BUCKET", raising=False)
    with pytest.raises(storage.StorageError, match=re.escape(f"{rule} ($BUCKET_OF_RUNS is not expanded here, as a "
                                                             "shell would: write gs://my-bucket/run)")):
        storage.user_path("gs://$BUCKET_OF_RUNS/run")  # a container's exec-form command: no shell
    with pytest.raises(storage.StorageError, match=re.escape(f"{rule} (${{UNSET_BUCKET}} is not expanded here, as a "
                                                             "shell would: write the bucket's name; ${UNSET_BUCKET} "
                                                             "is not set here either)")):
        storage.user_path("gs://${UNSET_BUCKET}/run")


def test_a_new_local_name_ending_in_a_tab_is_said_to_end_with_whitespace(tmp_path):
    with pytest.raises(storage.StorageError, match=r"the name 'out\\t' ends with whitespace and does not exist .*: "
                                                   r"remove the whitespace"):
        storage.user_path(f"{tmp_path}/out\t")  # a tab is no space (the repr shows which)


def test_a_path_is_inside_a_folder_by_whole_names_through_links_and_trailing_slashes(tmp_path):
    """One rule for "is A inside folder B", which four places spelled inline."""
    assert storage.is_inside("gs://b/x/y", "gs://b/x")
    assert not storage.is_inside("gs://b/xy", "gs://b/x")  # a name that starts with the folder's is beside it
    assert storage.is_inside("gs://b/x/y/", "gs://b/x/") and storage.is_inside("gs://b/x/y", "gs://b")
    assert not storage.is_inside("gs://b/x", "gs://b/x/") and not storage.is_inside("gs://b/x/", "gs://b/x")
    assert not storage.is_inside("gs://c/x", "gs://b") and not storage.is_inside(str(tmp_path / "x"), "gs://b")
    (tmp_path / "run" / "t5").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "run")
    assert storage.is_inside(str(tmp_path / "link" / "t5"), str(tmp_path / "run") + "/")  # one folder by two names
    assert storage.is_inside(str(tmp_path / "run" / "new"), str(tmp_path / "link"))  # not there yet
    assert not storage.is_inside(str(tmp_path / "runs"), str(tmp_path / "run"))
    assert not storage.is_inside(str(tmp_path / "link"), str(tmp_path / "run"))  # the folder itself
    assert storage.is_inside(str(tmp_path), "/")


def test_parent_steps_after_a_link_name_the_folder_the_system_does(tmp_path, monkeypatch):
    """--workdir=link/../run trained with its checkpoints in one folder (orbax's, made absolute as
    text: "link/.." dropped) and its run_config.json, metrics and lock in another (the system's, the
    link's target's parent)."""
    (tmp_path / "deep" / "inner").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "deep" / "inner")
    monkeypatch.chdir(tmp_path)
    for written in ("link/../run", f"{tmp_path}/link/../run", "link/../run/"):
        path = storage.user_path(written)
        assert os.path.abspath(path) == str(tmp_path / "deep" / "run"), written
        storage.write_json_atomically(storage.join(path, "record.json"), {})  # where the system puts it
        assert os.path.isfile(os.path.join(os.path.abspath(path), "record.json"))
    (tmp_path / "run_link").symlink_to(tmp_path / "deep" / "inner")
    assert storage.user_path("deep/../run_link") == str(tmp_path / "run_link")  # a link after the ".." stays
    # the system takes every ".." from where the names before it lead: through a link after the first
    assert os.path.abspath(storage.user_path("deep/../link/../run")) == str(tmp_path / "deep" / "run")


def test_an_accented_name_is_found_in_the_unicode_form_it_has_on_disk(tmp_path, monkeypatch):
    """A run copied from macOS keeps "müde" decomposed (u + U+0308): --workdir=runs/müde as typed
    (composed) read as missing ('does not exist (a typo?)' beside a folder ls shows), and training
    started a second folder of the same look."""
    import unicodedata

    typed, on_disk = (unicodedata.normalize(form, "müde") for form in ("NFC", "NFD"))
    (tmp_path / "runs" / on_disk).mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert storage.user_path(f"{tmp_path}/runs/{typed}") == f"{tmp_path}/runs/{on_disk}"
    assert storage.user_path(f"runs/{typed}/samples") == f"runs/{on_disk}/samples"  # a new folder inside it
    assert storage.user_path(f"runs/{typed}x/new") == f"runs/{typed}x/new"  # no such name: as typed
    (tmp_path / on_disk).mkdir()
    assert storage.user_path(typed) == on_disk  # a first name of a relative path, looked up in the current folder
    (tmp_path / "runs" / on_disk / on_disk).mkdir()
    assert storage.user_path(f"runs/{typed}/{typed}") == f"runs/{on_disk}/{on_disk}"  # every name, not the first
    (tmp_path / "runs" / typed).mkdir()  # both forms exist: each names its own folder
    assert storage.user_path(f"runs/{typed}") == f"runs/{typed}"
    assert storage.user_path(f"runs/{on_disk}") == f"runs/{on_disk}"
    mixed = "e\u0301\u00fc"  # "éü" with one accent a character of its own
    for form in ("NFD", "NFC"):
        (tmp_path / "two" / unicodedata.normalize(form, "éü")).mkdir(parents=True)
    assert storage.user_path(f"two/{mixed}") == f"two/{mixed}"  # two names on disk read alike: as typed, no guess


def test_files_in_a_bucket_appear_whole_and_list_by_kind(bucket, tmp_path):
    storage.write_json_atomically(f"{bucket}/run/settings.json", {"seed": 1})
    storage.write_atomically(f"{bucket}/run/samples/000000.png", b"png")
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(3 << 20))
    storage.upload_file_atomically(str(local), f"{bucket}/run/samples.npz")
    assert storage.read_json(f"{bucket}/run/settings.json") == {"seed": 1}
    assert storage.list_files(f"{bucket}/run") == ["samples.npz", "settings.json"]
    assert storage.list_folders(f"{bucket}/run") == ["samples"]
    assert storage.isdir(f"{bucket}/run/samples") and storage.isfile(f"{bucket}/run/samples/000000.png")
    assert storage.size_and_mtime(f"{bucket}/run/samples.npz")[0] == 3 << 20
    with storage.local_file(f"{bucket}/run/samples.npz") as path:
        assert open(path, "rb").read() == local.read_bytes()
    storage.move(f"{bucket}/run/samples", f"{bucket}/aside/samples-1")  # as an unreadable checkpoint is
    assert storage.list_files(f"{bucket}/aside/samples-1") == ["000000.png"]
    assert not storage.exists(f"{bucket}/run/samples/000000.png")
    storage.move(f"{bucket}/run/samples.npz", f"{bucket}/run/renamed.npz")  # a file too (pack_captions' shards)
    assert storage.list_files(f"{bucket}/run") == ["renamed.npz", "settings.json"]
    assert storage.read_bytes(f"{bucket}/run/renamed.npz") == local.read_bytes()
    storage.rmtree(f"{bucket}/run")
    assert not storage.exists(f"{bucket}/run/settings.json") and storage.list_files(f"{bucket}/run") == []
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(f"{bucket}/run/settings.json")


def test_a_result_replaced_by_the_next_stays_in_its_history(tmp_path):
    """inspect.json was overwritten by each run of --mode=inspect, with nothing kept of the last."""
    path = str(tmp_path / "inspect.json")
    storage.write_json_keeping_history(path, {"forward_s": 1.0})
    storage.write_json_keeping_history(path, {"forward_s": 2.0})
    assert storage.read_json(path) == {"forward_s": 2.0}
    history = [json.loads(line) for line in open(tmp_path / "inspect_history.jsonl")]
    assert [line["forward_s"] for line in history] == [1.0, 2.0] and all("time" in line for line in history)


def test_results_written_at_once_by_several_jobs_each_keep_their_history_line(tmp_path):
    """The history was read, then rewritten: two evaluations finishing together in one workdir lost a
    line (8 writers x 20 results kept ~120 of 160). Locally each line is appended in one write."""
    import threading

    path = str(tmp_path / "new_workdir" / "eval.json")  # (its folder made, as a whole-file write makes it)

    def writer(k):
        for i in range(20):
            storage.write_json_keeping_history(path, {"writer": k, "result": i})

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    history = [json.loads(line) for line in open(tmp_path / "new_workdir" / "eval_history.jsonl")]
    assert sorted((line["writer"], line["result"]) for line in history) == [(k, i) for k in range(8) for i in range(20)]


def test_a_log_a_job_appends_to_is_not_written_through_a_link_planted_in_its_place(tmp_path):
    """A link planted as a workdir's sampling_runs.jsonl had each job append its line to the file it
    points at, outside the workdir (a security review's ~/.bashrc), where every whole-file write
    replaces a link with the file. Now the append is refused, naming the link and the fix, and the
    other file is left as it was."""
    other = tmp_path / "bashrc"
    other.write_text("export PATH=$PATH\n")
    log = tmp_path / "workdir" / "sampling_runs.jsonl"
    log.parent.mkdir()
    log.symlink_to(other)
    with pytest.raises(storage.StorageError, match=re.escape(
            f"{log} is a link (to {other}); a log that jobs append to is not written through one (its lines would go "
            "into another file): remove the link, or put the file itself in its place") + r"\Z"):
        storage.append_json_line(str(log), {"job": 1})
    assert other.read_text() == "export PATH=$PATH\n"


def test_a_line_a_full_disk_lets_in_part_of_is_taken_back_and_the_cause_raised(tmp_path):
    """A disk that fills up, a quota or `ulimit -f` lets a write in part, without an error: a job's
    record was left cut short in its log (training_runs.jsonl), silently, and the next job's line
    joined to it, so that neither read as JSON. Here the kernel's own file size limit cuts the line."""
    log = str(tmp_path / "training_runs.jsonl")
    cut_by_a_size_limit = (f"import resource; from pixelflow_jax import storage; "
                           f"storage.append_json_line({log!r}, {{'job': 1, 'pad': 'x' * 1000}}); "
                           "resource.setrlimit(resource.RLIMIT_FSIZE, (1500, 1500)); "
                           f"storage.append_json_line({log!r}, {{'job': 2, 'pad': 'y' * 1000}})")
    result = subprocess.run([sys.executable, "-c", cut_by_a_size_limit], cwd=REPO, capture_output=True, text=True,
                            timeout=60)
    assert result.stderr.strip().endswith("OSError: [Errno 27] File too large"), result.stderr
    storage.append_json_line(log, {"job": 3})
    assert [json.loads(line)["job"] for line in open(log)] == [1, 3]


def run_main(workdir, *overrides):
    command = [sys.executable, "main.py", "--config=configs/c2i.py:tiny", f"--workdir={workdir}", *overrides]
    env = {**os.environ, "XLA_FLAGS": cpu_devices(1, one_process=False)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_unsupported_workdir_scheme_names_the_schemes_that_work(tmp_path):
    result = run_main("s3://bucket/run")
    assert result.returncode != 0 and "unsupported URL scheme s3://; paths are local or gs://" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(os.path.join(REPO, "s3:"))


def test_a_bucket_that_cannot_be_written_stops_training_before_its_first_step(gcs_emulator):
    result = run_main("gs://no-such-bucket/run")
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert ("cannot write to gs://no-such-bucket/run: it is in the bucket gs://no-such-bucket, which does not exist "
            "(a typo?" in result.stderr), result.stderr[-3000:]  # was the upload's URL, a FileNotFoundError
    assert "step 1" not in result.stdout and not os.path.exists(os.path.join(REPO, "gs:"))


def test_a_checkpoint_or_run_in_a_bucket_that_does_not_exist_names_the_bucket(gcs_emulator):
    """A typo in the bucket's name read as the run missing inside it ("does not exist")."""
    from configs import c2i
    from pixelflow_jax import CheckpointError
    from pixelflow_jax.api import resolve_checkpoint, sampling_checkpoint

    missing = "is in the bucket gs://no-such-bucket, which does not exist (a typo?"
    with pytest.raises(CheckpointError, match=re.escape(f"checkpoint gs://no-such-bucket/run {missing}")):
        resolve_checkpoint("gs://no-such-bucket/run")
    with pytest.raises(CheckpointError, match=re.escape(f"gs://no-such-bucket/run {missing}")):
        sampling_checkpoint(c2i.get_config("tiny").sample, "gs://no-such-bucket/run")
    assert storage.missing_path_words("gs://no-such-bucket/").startswith("is a bucket that does not exist (a typo?")
    assert storage.missing_path_words("gs://pixelflow-test/no-such-run") is None  # the bucket is there


def test_a_bucket_these_credentials_may_not_describe_is_not_called_missing(monkeypatch):
    """objectAdmin credentials lack storage.buckets.get: GCS answers the bucket's GET with a 403,
    and fs.info(bucket) then lists it, so an empty bucket was called one that does not exist."""
    import fsspec

    class ForbiddenBucket:
        def call(self, method, path, *args, **kwargs):
            raise OSError("Forbidden: b/empty-bucket")

        def info(self, path):  # what gcsfs's info does after the 403: an empty listing
            raise FileNotFoundError(path)

    monkeypatch.setattr(fsspec.core, "url_to_fs", lambda path, **kwargs: (ForbiddenBucket(), path))
    assert storage.missing_path_words("gs://empty-bucket/run") is None


def test_the_workdir_lock_works_in_a_bucket(bucket):
    """Sequential contention only: the emulator ignores the create-only precondition that closes
    the race on real GCS."""
    from pixelflow_jax.training.workdir_lock import WorkdirBusy, WorkdirLock

    owner = WorkdirLock(f"{bucket}/run", stale_after_s=60)
    owner.acquire()
    with pytest.raises(WorkdirBusy, match=f"{bucket}/run is in use by another training run"):
        WorkdirLock(f"{bucket}/run", stale_after_s=60).acquire()
    owner.heartbeat()
    owner.release()
    assert not storage.exists(f"{bucket}/run/train.lock")


def test_a_step_in_a_bucket_without_its_commit_marker_is_a_save_in_progress(bucket):
    """In a bucket orbax writes a step in place and marks it complete with a commit file last: a
    step folder without one is a save under way or killed midway. Taken for complete, it would be
    sampled (and fail to restore), and never cleared before the run saved again."""
    import orbax.checkpoint as ocp

    from pixelflow_jax.checkpoints.run_checkpoint import complete_steps, latest_step, steps_in_progress
    from pixelflow_jax.training.checkpointing import remove_unfinished_saves

    run = f"{bucket}/run"
    storage.write_atomically(f"{run}/run_config.json", b"{}")
    storage.write_atomically(f"{run}/checkpoints/2/{ocp.path.atomicity.COMMIT_SUCCESS_FILE}", b"")
    storage.write_atomically(f"{run}/checkpoints/2/state/x", b"whole")
    storage.write_atomically(f"{run}/checkpoints/4/state/x", b"partial")
    assert complete_steps(run) == [2] and steps_in_progress(run) == [4]
    assert latest_step(run).step == 2
    assert remove_unfinished_saves(run) == [4]
    assert storage.listdir(f"{run}/checkpoints") == ["2"]


def test_a_step_whose_deletion_was_killed_midway_is_removed_by_the_next_run(bucket):
    """A run killed -9 while its checkpoint rotation deleted step 50 left that folder without its
    commit marker (orbax deletes a bucket folder's objects in name order: the marker and metadata
    first): never listed as a step again, it was never rotated away, and stayed in the bucket for
    good (the run's whole state, gigabytes on XL). Complete older steps stay."""
    import orbax.checkpoint as ocp

    from pixelflow_jax.checkpoints.run_checkpoint import complete_steps
    from pixelflow_jax.training.checkpointing import remove_unfinished_saves

    run = f"{bucket}/run"
    storage.write_atomically(f"{run}/run_config.json", b"{}")
    for step in (100, 150, 200):
        storage.write_atomically(f"{run}/checkpoints/{step}/{ocp.path.atomicity.COMMIT_SUCCESS_FILE}", b"")
        storage.write_atomically(f"{run}/checkpoints/{step}/state/x", b"whole")
    storage.write_atomically(f"{run}/checkpoints/50/state/ocdbt.process_0/manifest.ocdbt", b"left by the deletion")
    assert complete_steps(run) == [100, 150, 200]
    assert remove_unfinished_saves(run) == [50]
    assert storage.listdir(f"{run}/checkpoints") == ["100", "150", "200"]


def test_only_a_step_folder_or_its_temporary_is_removed_as_a_killed_save_not_one_named_like_it(tmp_path):
    """A folder whose name begins as a step's (9_backup, 12.old: a copy kept by hand) is no save: the
    removal of killed saves past the latest step leaves it, and removes the killed save beside it."""
    from pixelflow_jax.training.checkpointing import remove_unfinished_saves

    run = tmp_path / "run"
    for name in ("2", "7.orbax-checkpoint-tmp-1764580000", "9_backup", "12.old", "040"):
        (run / "checkpoints" / name).mkdir(parents=True)
    assert remove_unfinished_saves(str(run)) == [7]
    assert sorted(os.listdir(run / "checkpoints")) == ["040", "12.old", "2", "9_backup"]


def test_a_first_save_killed_before_any_step_completed_is_removed(tmp_path):
    """With no complete step, every step folder left is a killed save: the run's first one."""
    from pixelflow_jax.training.checkpointing import remove_unfinished_saves

    run = tmp_path / "run"
    (run / "checkpoints" / "2.orbax-checkpoint-tmp-1764580000" / "state").mkdir(parents=True)
    assert remove_unfinished_saves(str(run)) == [2]
    assert os.listdir(run / "checkpoints") == []


def test_partial_checkpoints_that_cannot_be_removed_are_a_warning_not_a_failed_start(bucket, monkeypatch, caplog):
    """The removal is best effort, before the run saves anything: a bucket that refuses a deletion
    (a retention policy, a role without delete) leaves the partial step and the run starts."""
    import logging

    from pixelflow_jax.training.checkpointing import remove_unfinished_saves

    run = f"{bucket}/run"
    storage.write_atomically(f"{run}/run_config.json", b"{}")
    storage.write_atomically(f"{run}/checkpoints/4/state/x", b"partial")

    def refused(path):
        raise storage.StorageError(f"cannot delete {path}: 403 Forbidden")

    monkeypatch.setattr(storage, "rmtree", refused)
    with caplog.at_level(logging.WARNING):
        assert remove_unfinished_saves(run) == []
    assert f"could not remove the partial checkpoints of killed saves in {run} (cannot delete {run}/checkpoints/4: " \
           "403 Forbidden); they stay" in caplog.text
    assert storage.listdir(f"{run}/checkpoints") == ["4"]


def test_an_output_folder_in_a_bucket_is_never_replaced_and_a_failed_write_leaves_nothing(bucket):
    """A bucket has no rename: --overwrite of a converted folder there (by the API, which the
    converter's own check does not guard) would write into the old folder and delete it all when
    the write failed. A write that fails removes what it wrote, so no partial folder is read later."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError, atomic_output_dir

    old = f"{bucket}/old"
    storage.write_atomically(f"{old}/model.pt", b"old")
    for overwrite, refusal in ((False, "already exists"), (True, "an object store has no atomic rename")):
        with pytest.raises(CheckpointError, match=refusal):
            with atomic_output_dir(old, overwrite=overwrite) as folder:
                storage.write_atomically(f"{folder}/model.pt", b"new")
        assert storage.read_bytes(f"{old}/model.pt") == b"old"

    new = f"{bucket}/new"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output_dir(new) as folder:
            storage.write_atomically(f"{folder}/params/part", b"partial")
            raise KeyboardInterrupt
    assert not storage.exists(new)


def test_a_refused_listing_is_an_error_not_an_empty_folder(bucket, monkeypatch):
    """fsspec's exists() and isdir() answer False for any error: a 403 on listing checkpoints/
    read as "no checkpoints", and a trained run would have started anew in its workdir."""
    import fsspec

    from pixelflow_jax.checkpoints.run_checkpoint import complete_steps

    storage.write_atomically(f"{bucket}/run/checkpoints/4/x", b"1")
    assert storage.exists(f"{bucket}/run/checkpoints") and storage.isdir(f"{bucket}/run/checkpoints")
    assert storage.isfile(f"{bucket}/run/checkpoints/4/x") and not storage.isfile(f"{bucket}/run/checkpoints")
    assert storage.listdir(f"{bucket}/run/checkpoints") == ["4"] and storage.listdir(f"{bucket}/run/none") == []
    assert not storage.exists(f"{bucket}/run/none") and not storage.isdir(f"{bucket}/run/none")
    fs, _ = fsspec.core.url_to_fs(bucket)  # fsspec's cached instance: the one storage uses
    real_info = fs.info

    def forbidden_under_checkpoints(key, **kwargs):
        if "checkpoints" in key:
            raise OSError("Forbidden: 403 caller does not have storage.objects.list access")
        return real_info(key, **kwargs)

    monkeypatch.setattr(fs, "info", forbidden_under_checkpoints)
    for check in (storage.exists, storage.isdir, storage.isfile, storage.listdir, complete_steps):
        path = f"{bucket}/run" if check is complete_steps else f"{bucket}/run/checkpoints"
        with pytest.raises(storage.StorageError, match="Forbidden"):
            check(path)


def test_gcsfs_giving_up_logs_one_line_not_its_traceback(caplog):
    import logging

    storage.remote.epath_of("gs://some-bucket/run")  # configures gcsfs's logging as any bucket access does
    try:
        raise ConnectionError("Cannot connect to host storage.googleapis.com:443")
    except ConnectionError as error:
        logging.getLogger("gcsfs").exception(f"_request out of retries on exception: {error}")
        logging.getLogger("gcsfs").exception("an error gcsfs does not raise again")
    given_up, other = caplog.records[-2:]
    assert "out of retries" in given_up.getMessage() and given_up.exc_info is None
    assert other.exc_info is not None  # other tracebacks are left alone


def recorded_events(folder) -> list:
    """Every event of the event files directly in `folder` (local or gs://), read from their
    TFRecord framing, file by file in name order."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    events = []
    for name in sorted(storage.list_files(str(folder))):
        data, offset = storage.read_bytes(storage.join(str(folder), name)) if name.startswith("events") else b"", 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            events.append(Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return events


def tensorboard_events(folder) -> list:
    """(tag, step, kind) of every summary value in the event files directly in `folder`."""
    return [(value.tag, event.step, value.WhichOneof("value"))
            for event in recorded_events(folder) for value in event.summary.value]


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_tensorboard_gets_scalars_and_preview_images_in_folders_of_their_own(where, tmp_path, request, monkeypatch):
    """In a bucket each event file is uploaded whole: the preview images, which grow by a grid per
    preview, are kept out of the scalars' file, which goes with metrics.jsonl at most every
    BUCKET_UPLOAD_INTERVAL_S, at each save and at the end (GCS takes about one write per second to
    an object). A killed bucket run's local copies are removed by the next run."""
    import tempfile

    from pixelflow_jax.training.metrics_log import LOCAL_EVENTS_PREFIX, MetricsLog

    workdir = str(tmp_path) if where == "local" else request.getfixturevalue("bucket")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    here, hour_ago = socket.gethostname(), time.time() - 3700
    killed, recent = (tmp_path / "tmp" / f"{LOCAL_EVENTS_PREFIX}-{here}-999999999-{s}" for s in ("x", "y"))
    if where == "bucket":
        for folder in (killed, recent):  # no such pid; only one of them untouched for an hour
            folder.mkdir()
        os.utime(killed, (hour_ago, hour_ago))
    record = {"loss": 0.5, "grad_norm": 1.0, "images_per_s": 10.0, "skipped_steps": 0}
    uploads = []
    real_write = storage.write_atomically
    monkeypatch.setattr(storage, "write_atomically", lambda path, data: (uploads.append(path), real_write(path, data)))
    metrics = storage.join(workdir, "metrics.jsonl")
    log = MetricsLog(workdir, resumed_step=0)
    log.write({"step": 1, **record})
    log.image("preview", np.zeros((8, 8, 3), np.uint8), 2)
    log.write({"step": 2, **record})
    log.write({"step": 3, **record})
    if where == "bucket":  # the first record at once, the next ones within BUCKET_UPLOAD_INTERVAL_S
        assert uploads.count(metrics) == 1 and len(storage.read_text(metrics).splitlines()) == 1
        log.upload()  # at a save
        assert uploads.count(metrics) == 2 and len(storage.read_text(metrics).splitlines()) == 3
    log.write({"step": 4, **record})
    log.close()
    scalars = tensorboard_events(storage.join(workdir, "tensorboard"))
    assert ("loss", 1, "simple_value") in scalars and ("loss", 2, "simple_value") in scalars
    assert not any(kind == "image" for _, _, kind in scalars) and not any(tag == "step" for tag, _, _ in scalars)
    assert tensorboard_events(storage.join(workdir, "tensorboard", "previews")) == [("preview", 2, "image")]
    assert ("loss", 4, "simple_value") in scalars
    assert [r["step"] for r in map(json.loads, storage.read_text(metrics).splitlines())] == [1, 2, 3, 4]
    assert uploads.count(metrics) == (3 if where == "bucket" else 0)
    if where == "bucket":  # a run whose workdir another run took over leaves that run's metrics.jsonl alone
        log = MetricsLog(workdir, resumed_step=4)
        log.write({"step": 5, **record})
        log.write({"step": 6, **record})
        log.close(upload_metrics=False)
        assert [r["step"] for r in map(json.loads, storage.read_text(metrics).splitlines())] == [1, 2, 3, 4, 5]
    # A killed bucket run's copies (an hour old) and this run's own are gone; a recent one may be a
    # live run's in a container that shares /tmp.
    assert os.listdir(tmp_path / "tmp") == ([recent.name] if where == "bucket" else [])


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_each_logged_step_and_preview_is_in_the_event_files_at_once(where, tmp_path, request):
    """A bucket run uploads its event files right after writing to them, and a local run may be
    killed at any moment: tensorboardX's SummaryWriter wrote from a thread its flush() did not wait
    for, so the first upload held no record and each later one lacked the latest."""
    from pixelflow_jax.training.metrics_log import MetricsLog

    workdir = str(tmp_path) if where == "local" else request.getfixturevalue("bucket")
    log = MetricsLog(workdir, resumed_step=0)
    log.write({"step": 1, "loss": 0.5, "grad_norm": 1.0, "images_per_s": 10.0, "skipped_steps": 0})
    log.image("preview", np.zeros((8, 8, 3), np.uint8), 1)
    scalars = tensorboard_events(storage.join(workdir, "tensorboard"))
    previews = tensorboard_events(storage.join(workdir, "tensorboard", "previews"))
    log.close()
    assert ("loss", 1, "simple_value") in scalars and previews == [("preview", 1, "image")], (scalars, previews)


def test_an_event_file_holds_each_value_and_preview_as_given_at_its_time_and_lets_go_of_its_file(tmp_path):
    """TensorBoard draws what the records hold: a scalar's value, a preview's pixels the right way up
    (height, width, channels) and the wall time each was logged at; a closed file is no longer held
    open (a notebook's runs, one after another, each kept one)."""
    import io

    from PIL import Image

    from pixelflow_jax.training.event_file import EventFile

    preview = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10  # 2 high, 3 wide
    open_files = len(os.listdir("/proc/self/fd"))
    before = time.time()
    events = EventFile(str(tmp_path), purge_step=1)
    events.add_scalar("loss", 0.25, 1)
    events.add_image("preview", preview, 1)
    events.close()
    assert len(os.listdir("/proc/self/fd")) == open_files
    scalar, image = [(event, value) for event in recorded_events(tmp_path) for value in event.summary.value]
    assert scalar[1].simple_value == 0.25
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(image[1].image.encoded_image_string))), preview)
    assert before <= scalar[0].wall_time <= image[0].wall_time <= time.time()


def test_tensorboard_is_imported_without_torch_and_leaves_torch_importable():
    """tensorboardX imports torch when it is installed, seconds at every start of a training run
    that needs none; a torch imported already stays the one imported."""
    code = ("import sys\n"
            "from pixelflow_jax.training.event_file import tensorboardx\n"
            "tensorboardx()\n"
            "assert 'torch' not in sys.modules, 'torch imported'\n"
            "import torch\n"
            "for name in [name for name in sys.modules if name.split('.')[0] == 'tensorboardX']:\n"
            "    del sys.modules[name]  # as if torch came first\n"
            "tensorboardx()\n"
            "assert sys.modules.get('torch') is torch, 'torch dropped'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_a_resumed_runs_tensorboard_drops_the_steps_logged_past_its_checkpoint(tmp_path):
    """The resumed run's events open with a restart at the step after its checkpoint, which makes
    TensorBoard drop what the stopped run logged from there on (else both curves overlap)."""
    from pixelflow_jax.training.metrics_log import MetricsLog

    record = {"loss": 0.5, "grad_norm": 1.0, "images_per_s": 10.0, "skipped_steps": 0}
    for resumed_step, steps in ((0, (1, 2, 3, 4)), (2, (3, 4))):  # stopped at 4, resumed from its step-2 save
        log = MetricsLog(str(tmp_path), resumed_step=resumed_step)
        for step in steps:
            log.write({"step": step, **record})
        log.close()
    MetricsLog(str(tmp_path / "stopped"), resumed_step=6).close()  # resumed, and stopped before its first log
    restarts, stopped = restart_steps(tmp_path / "tensorboard"), restart_steps(tmp_path / "stopped" / "tensorboard")
    # Both runs' files are kept, though started within a second (named by the second and host alone,
    # the resumed run's file replaced the stopped run's).
    assert sorted(restarts) == [1, 3] and stopped == [7], (restarts, stopped)


@pytest.mark.parametrize("where", ["local", "bucket"])
def test_a_run_stopped_before_its_first_log_leaves_its_restart_in_the_event_files(where, tmp_path, request):
    """Nothing flushes the restart a resumed run's event file opens with until a step is logged:
    closing the log must (a bucket run uploads right after, with the log still held)."""
    from pixelflow_jax.training.metrics_log import MetricsLog

    workdir = str(tmp_path) if where == "local" else request.getfixturevalue("bucket")
    log = MetricsLog(workdir, resumed_step=6)
    log.close()
    assert restart_steps(storage.join(workdir, "tensorboard")) == [7]


def restart_steps(folder) -> list:
    """The steps of the restarts recorded in the event files of `folder` (local or gs://; TensorBoard
    drops what was logged from there on)."""
    return [event.step for event in recorded_events(folder)
            if event.HasField("session_log") and event.session_log.status == event.session_log.START]


def test_a_local_write_replaces_the_old_file_only_whole(tmp_path):
    """Until the rename the old content stays readable; a writer that fails leaves it, and no temporary."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("old")

    def fails(f):
        f.write(b"new-par")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        storage.write_streamed_atomically(str(path), fails)
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["metrics.jsonl"]

    seen_while_writing = []

    def writes(f):
        f.write(b"new")
        f.flush()
        seen_while_writing.append(path.read_text())

    storage.write_streamed_atomically(str(path), writes)
    assert seen_while_writing == ["old"] and path.read_text() == "new" and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_a_local_upload_replaces_the_old_file_only_whole(tmp_path, monkeypatch):
    """upload_file_atomically to a local path (the caption packer's shards, a local --output) copies
    through a temporary: the old file stays readable until the rename, and a copy that fails midway
    (a full disk) leaves it whole, and no temporary."""
    source, path = tmp_path / "packed.tmp", tmp_path / "out" / "shard.array_record"
    source.write_bytes(b"new" * 1000)
    path.parent.mkdir()
    path.write_bytes(b"old")
    seen_while_copying = []

    def fails_midway(reader, writer, length=0):
        writer.write(reader.read(10))
        writer.flush()
        seen_while_copying.append(path.read_bytes())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", fails_midway)
    with pytest.raises(OSError, match="No space left on device"):
        storage.upload_file_atomically(str(source), str(path))
    assert seen_while_copying == [b"old"] and path.read_bytes() == b"old" and os.listdir(path.parent) == [path.name]
    monkeypatch.undo()
    storage.upload_file_atomically(str(source), str(path))
    assert path.read_bytes() == source.read_bytes() and os.listdir(path.parent) == [path.name]


def test_create_json_never_replaces_a_file_with_or_without_hard_links(tmp_path, monkeypatch):
    path = str(tmp_path / "settings.json")
    assert storage.create_json(path, {"seed": 0}) and not storage.create_json(path, {"seed": 1})
    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
    assert not storage.create_json(path, {"seed": 2})
    assert json.load(open(path)) == {"seed": 0}
    other = str(tmp_path / "other.json")
    assert storage.create_json(other, {"seed": 3}) and json.load(open(other)) == {"seed": 3}
    assert sorted(os.listdir(tmp_path)) == ["other.json", "settings.json"]  # no temporaries left
    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    with pytest.raises(OSError, match="No space left"):  # a full disk is an error, not a file system without links
        storage.create_json(str(tmp_path / "third.json"), {"seed": 4})
    assert sorted(os.listdir(tmp_path)) == ["other.json", "settings.json"]


@pytest.mark.parametrize("where", ["local", "local without hard links", "bucket"])
def test_move_file_once_never_replaces_a_file_it_finds_at_the_target(where, tmp_path, request, monkeypatch):
    """The packer's rename of a smaller set to its count: storage.move replaced a file of the new
    name that another writer had put there."""
    folder = request.getfixturevalue("bucket") if where == "bucket" else str(tmp_path)
    if where == "local without hard links":
        monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(PermissionError(1, "Operation not "
                                                                                              "permitted")))
    ours, theirs, free = (storage.join(folder, name) for name in ("ours", "theirs", "free"))
    storage.write_atomically(ours, "our shard")
    storage.write_atomically(theirs, "another writer's")
    assert not storage.move_file_once(ours, theirs)
    assert storage.read_text(theirs) == "another writer's" and storage.read_text(ours) == "our shard"
    assert storage.move_file_once(ours, free)
    assert storage.read_text(free) == "our shard" and not storage.exists(ours)
    assert sorted(storage.list_files(folder)) == ["free", "theirs"]


def test_move_file_once_raises_a_link_error_that_is_not_a_missing_hard_link(tmp_path, monkeypatch):
    """Only a file system without hard links takes the exclusive create instead: another error of
    the link (a disk error) is raised, nothing created at the target and the file left where it was
    (all tests made os.link fail with EPERM, a missing hard link, so a fallback on any error passed)."""
    import errno

    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    ours = tmp_path / "ours"
    ours.write_text("our shard")
    with pytest.raises(OSError, match="I/O error"):
        storage.move_file_once(str(ours), str(tmp_path / "free"))
    assert os.listdir(tmp_path) == ["ours"] and ours.read_text() == "our shard"


@pytest.mark.parametrize("failure", [FileNotFoundError, KeyboardInterrupt])
def test_move_file_once_without_hard_links_leaves_no_empty_file_when_the_move_fails(failure, tmp_path, monkeypatch):
    """Without hard links the target's name is taken by an empty file first: a move that then fails
    (the source gone, or a Ctrl-C stopping the pack there) must not leave that empty file behind
    under a shard's name."""
    import errno

    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(OSError(errno.EPERM, "not permitted")))
    if failure is KeyboardInterrupt:
        (tmp_path / "gone").write_text("our shard")
        monkeypatch.setattr(os, "replace", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(failure):
        storage.move_file_once(str(tmp_path / "gone"), str(tmp_path / "free"))
    assert os.listdir(tmp_path) == (["gone"] if failure is KeyboardInterrupt else [])  # the shard kept where it was


def test_move_file_once_in_a_bucket_raises_a_refused_check_of_the_target_and_moves_nothing(bucket, monkeypatch):
    """A bucket's target is checked just before the copy: a check the store refused (a 403) is no
    free name, or the move would replace whatever is there."""
    import fsspec

    ours, theirs = f"{bucket}/ours", f"{bucket}/theirs"
    storage.write_atomically(ours, "our shard")
    fs, _ = fsspec.core.url_to_fs(bucket)  # fsspec's cached instance: the one storage uses
    info, async_info = fs.info, fs._info  # (fsspec's exists() goes through the second)

    def forbidden(key, **kwargs):
        if key.endswith("theirs"):
            raise OSError("Forbidden: 403")
        return info(key, **kwargs)

    async def async_forbidden(key, **kwargs):
        return forbidden(key) if key.endswith("theirs") else await async_info(key, **kwargs)

    monkeypatch.setattr(fs, "info", forbidden)
    monkeypatch.setattr(fs, "_info", async_forbidden)
    with pytest.raises(storage.StorageError, match="Forbidden: 403"):
        storage.move_file_once(ours, theirs)
    monkeypatch.undo()
    assert storage.read_text(ours) == "our shard" and not storage.exists(theirs)


def test_a_local_folder_that_cannot_be_written_says_what_to_do(tmp_path, monkeypatch):
    """Each mode's way to read a read-only folder from a workdir of its own: the evaluation of a
    read-only sampling folder was told only how to sample or export a training run."""
    def refused(path, data):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(storage.writes, "write_atomically", refused)  # (tests run as root, whom modes do not stop)
    with pytest.raises(storage.StorageError, match=r"cannot write to .*run: PermissionError: .*: name a folder this "
                                                   r"user can write to \(") as refusal:
        storage.check_writable(str(tmp_path / "run"))
    for route in ("--config.sample.checkpoint=RUN samples, inspects or serves a training run",
                  "--config.eval.samples=FOLDER/samples.npz evaluates a sampling job's images",
                  "convert_torch_ckpt.py --jax_checkpoint=RUN exports a run"):
        assert route in str(refusal.value)


def test_a_local_write_replaces_the_file_a_reader_holds_open_and_others_may_read_it(tmp_path):
    """write_atomically publishes a new file: a reader that opened the old one reads it whole (a
    write into the file itself would truncate it under the reader), and the new file's mode is
    what the umask allows, not mkstemp's 0600."""
    path = tmp_path / "settings.json"
    path.write_text("old content")
    with open(path, "rb") as reader:
        storage.write_atomically(str(path), "new")
        assert reader.read() == b"old content"
    assert path.read_text() == "new" and os.listdir(tmp_path) == ["settings.json"]
    umask = storage.temporaries.umask()
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    folder = storage.make_folder(str(tmp_path), ".out.tmp-")
    assert os.stat(folder).st_mode & 0o777 == 0o777 & ~umask  # a converted output takes this mode


def test_create_json_without_hard_links_leaves_no_half_written_file(tmp_path, monkeypatch):
    """Where a file system has no hard links, create_file writes into an exclusively created file:
    a write that fails must not leave it, or it would read as another job's (damaged) settings."""
    path = tmp_path / "settings.json"
    monkeypatch.setattr(os, "link", lambda *args: (_ for _ in ()).throw(PermissionError(1, "Operation not permitted")))
    real_fdopen, opened = os.fdopen, []

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *args):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(fd, *args, **kwargs):  # the temporary is written; the exclusive create's write fails
        opened.append(fd)
        f = real_fdopen(fd, *args, **kwargs)
        return f if len(opened) == 1 else FullDisk(f)

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(OSError, match="No space left"):
        storage.create_json(str(path), {"seed": 0})
    assert len(opened) == 2 and os.listdir(tmp_path) == []
    monkeypatch.setattr(os, "fdopen", real_fdopen)
    assert storage.create_json(str(path), {"seed": 1}) and json.load(open(path)) == {"seed": 1}


def test_only_a_folder_a_failed_job_made_is_removed_and_the_write_check_leaves_nothing(tmp_path):
    """removed_if_left_empty removes the empty folder a refused job made, never one the user made
    before (even empty) nor one holding files; check_writable's probe file is removed."""
    mine, new, written = tmp_path / "mine", tmp_path / "new", tmp_path / "written"
    mine.mkdir()
    for folder in (mine, new, written):
        with pytest.raises(ValueError):
            with storage.removed_if_left_empty(str(folder)):
                os.makedirs(folder, exist_ok=True)
                if folder == written:
                    (folder / "samples.npz").write_bytes(b"")
                raise ValueError("refused")
    assert sorted(os.listdir(tmp_path)) == ["mine", "written"]
    with pytest.raises(ValueError):  # the folders made above it too: new/deeper/run left new/deeper/
        with storage.removed_if_left_empty(str(mine / "new" / "deeper" / "run")):
            os.makedirs(mine / "new" / "deeper" / "run")
            raise ValueError("refused")
    assert os.listdir(mine) == []
    storage.check_writable(str(tmp_path / "run"))
    assert os.listdir(tmp_path / "run") == []


def test_the_write_checks_probe_left_by_a_killed_job_is_cleared(tmp_path, monkeypatch):
    from pixelflow_jax.storage import writes

    monkeypatch.setattr(writes, "remove", lambda path: None)  # killed between writing and removing it
    storage.check_writable(str(tmp_path))
    [probe] = os.listdir(tmp_path)
    assert storage.remove_temporaries(str(tmp_path)) == 0  # its writer (this process) runs
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    os.rename(tmp_path / probe, tmp_path / probe.replace(f"-{os.getpid()}-", f"-{int(gone.stdout)}-"))
    assert storage.remove_temporaries(str(tmp_path)) == 1 and os.listdir(tmp_path) == []


def test_a_live_process_of_another_user_is_alive(monkeypatch):
    """os.kill(pid, 0) on another user's process raises PermissionError: taken for a dead writer,
    its temporaries (and a lock's holder) would be cleared while it still writes."""
    def kill(pid, signal):
        raise PermissionError(1, "Operation not permitted") if pid == 1 else ProcessLookupError(3, "No such process")

    monkeypatch.setattr(os, "kill", kill)
    assert storage.process_alive(1) and not storage.process_alive(999999999)


def test_a_bucket_root_is_its_own_parent_and_joined_names_make_no_empty_folder():
    assert storage.dirname("gs://b/run") == "gs://b" and storage.dirname("gs://b") == "gs://b"  # not gs:/, a local path
    assert storage.join("gs://b/run", "/samples/", "000001.png") == "gs://b/run/samples/000001.png"  # no "//"
    assert storage.user_path("gs://b/run//") == "gs://b/run//"  # trailing slashes name no empty folder
    with pytest.raises(storage.StorageError, match=r"expected a path \(a string or os.PathLike\), got None"):
        storage.user_path(None)  # (str(None) would be a folder named "None")


def test_the_parents_of_an_object_whose_name_holds_a_scheme_mark_lead_to_its_bucket():
    """An object listed in a bucket may be named a://c (user_path refuses such a name typed); its
    folder is the one before its last "/", as for any object, not the object itself as a root."""
    path, parents = "gs://b/run/a://c", []
    while (parent := storage.dirname(path)) != path:
        parents.append(path := parent)
    assert parents[-2:] == ["gs://b/run", "gs://b"]


def test_a_failed_bucket_request_names_the_path_and_what_to_check_once(bucket, monkeypatch):
    """A listing asks for the folder's kind inside its own request: its refusal is raised as it
    is, not wrapped in a second error that repeats the advice."""
    import fsspec

    assert storage.list_files(f"{bucket}/run") == []  # (configures gcsfs, as storage's first request does)
    fs, _ = fsspec.core.url_to_fs(bucket)  # fsspec's cached instance: the one storage uses

    def forbidden(key, **kwargs):
        raise OSError("Forbidden: 403")

    monkeypatch.setattr(fs, "info", forbidden)
    with pytest.raises(storage.StorageError) as refused:
        storage.list_files(f"{bucket}/run")
    assert str(refused.value) == f"{bucket}/run: OSError: Forbidden: 403 ({storage.CHECK_ACCESS})"


def test_gcsfs_giving_up_on_an_error_it_does_not_retry_logs_one_line(caplog):
    import logging

    storage.remote.epath_of("gs://some-bucket/run")
    try:
        raise PermissionError("403 Forbidden")
    except PermissionError as error:
        logging.getLogger("gcsfs").exception(f"_call non-retriable exception: {error}")
    assert caplog.records[-1].exc_info is None and "403 Forbidden" in caplog.records[-1].getMessage()


def test_listings_of_a_local_folder_and_of_a_bucket_file_say_what_is_there(bucket, tmp_path):
    assert storage.listdir(str(tmp_path / "missing")) == []
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    (tmp_path / "a.txt").write_text("a")
    others = []
    assert storage.list_entries(str(tmp_path), others) == (["a.txt"], []) and others == ["dangling"]
    storage.write_atomically(f"{bucket}/run/a.txt", b"a")
    assert storage.list_entries(f"{bucket}/run/a.txt") == ([], [])  # a file is no folder


def test_a_folders_fingerprint_follows_names_sizes_and_each_part_of_a_large_file_and_survives_a_copy(bucket, tmp_path):
    large = bytearray(os.urandom(4 * storage.reads.FINGERPRINT_SLICE))  # read in three slices
    folder = tmp_path / "ckpt"
    (folder / "params").mkdir(parents=True)
    (folder / "params" / "data.bin").write_bytes(large)
    (folder / "config.json").write_text("{}")
    (folder / "samples.npz").write_bytes(b"npz")
    assert storage.file_sizes(str(folder)) == {"params/data.bin": len(large), "config.json": 2, "samples.npz": 3}
    before, params_only = storage.fingerprint(str(folder)), storage.fingerprint(str(folder), ("params",))
    for name in storage.file_sizes(str(folder)):
        storage.upload_file_atomically(str(folder / name), f"{bucket}/ckpt/{name}")
    assert storage.file_sizes(f"{bucket}/ckpt") == storage.file_sizes(str(folder))
    assert storage.fingerprint(f"{bucket}/ckpt") == before

    (folder / "samples.npz").write_bytes(b"NPZ")  # not one of the entries asked for
    assert storage.fingerprint(str(folder), ("params",)) == params_only != storage.fingerprint(str(folder))
    large[len(large) // 2] ^= 1  # in the middle slice
    (folder / "params" / "data.bin").write_bytes(large)
    assert storage.fingerprint(str(folder), ("params",)) != params_only
    changed = storage.fingerprint(str(folder))
    os.rename(folder / "config.json", folder / "config.yaml")  # the same bytes under another name
    assert storage.fingerprint(str(folder)) != changed


def test_the_hint_for_a_files_name_with_a_slash_after_it_is_given_only_with_that_slash(tmp_path):
    (tmp_path / "model.pt").write_bytes(b"")
    assert storage.slash_after_a_file(f"{tmp_path}/model.pt/") == (f" (the / at its end names a folder, and "
                                                                   f"{tmp_path}/model.pt is a file: drop the /)")
    assert storage.slash_after_a_file(f"{tmp_path}/model.pt") == "" == storage.slash_after_a_file(f"{tmp_path}/x/")


def test_a_link_is_called_broken_only_when_its_target_is_gone(tmp_path):
    (tmp_path / "weights.pt").write_bytes(b"")
    os.symlink(tmp_path / "weights.pt", tmp_path / "link")
    assert storage.broken_link_words(str(tmp_path / "link")) is None
    with pytest.raises(storage.StorageError, match=rf"^{tmp_path}/link is a file, not a folder"):
        storage.check_writable(str(tmp_path / "link"))  # not "a link to ..., which does not exist"


def test_a_local_listing_of_nothing_is_empty_and_its_others_are_neither_files_nor_folders(tmp_path):
    others = []
    assert storage.list_entries(str(tmp_path / "missing"), others) == ([], []) and others == []
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("a")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert storage.list_entries(str(tmp_path), others) == (["a.txt"], ["sub"]) and others == ["dangling"]


def test_a_bucket_listing_sees_what_another_machine_wrote_since_the_last_one(bucket, monkeypatch):
    """With listings kept (gcsfs's default, or turned on again in a user's fsspec config), a run
    polling for checkpoints another host writes would never see them if that cache answered."""
    import fsspec

    storage.remote.configure_gcsfs()
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(fsspec.config.conf, protocol, {**fsspec.config.conf[protocol], "use_listings_cache": True})
    storage.write_atomically(f"{bucket}/run/a/x", b"1")
    assert storage.list_entries(f"{bucket}/run") == ([], ["a"]) and storage.file_sizes(f"{bucket}/run") == {"a/x": 1}
    elsewhere = fsspec.filesystem("gs", skip_instance_cache=True)
    elsewhere.pipe(f"{bucket}/run/b.txt".removeprefix("gs://"), b"22")
    assert storage.list_entries(f"{bucket}/run") == (["b.txt"], ["a"])
    assert storage.file_sizes(f"{bucket}/run") == {"a/x": 1, "b.txt": 2}


def listings_kept(monkeypatch):
    """Turns on fsspec's listings cache for gs:// (gcsfs's default, or a user's fsspec config) for
    the file systems made from here on, epath's included; returns a second file system, another
    host's view of the bucket."""
    from etils import epath
    import fsspec

    storage.remote.configure_gcsfs()
    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(fsspec.config.conf, protocol, {**fsspec.config.conf[protocol], "use_listings_cache": True})
    # epath makes its file system once per process: here one made under that config, as a user's would be
    monkeypatch.setattr(epath.backend.fsspec_backend, "_get_filesystem",
                        lambda name: fsspec.filesystem(name, finalize_on_close=True))
    return fsspec.filesystem("gs", skip_instance_cache=True)


def test_what_a_path_is_in_a_bucket_is_asked_of_the_bucket_not_an_old_listing(bucket, monkeypatch):
    """A run polling for the step another host saves, or a deleted checkpoint, was answered from
    the listing fsspec kept of its folder: the new step not there, the deleted one still there."""
    elsewhere = listings_kept(monkeypatch)
    storage.write_atomically(f"{bucket}/run/old.txt", b"1")
    assert storage.list_entries(f"{bucket}/run") == (["old.txt"], [])  # the folder's listing, kept
    assert storage.isfile(f"{bucket}/run/old.txt") and not storage.exists(f"{bucket}/run/new")
    elsewhere.rm(f"{bucket}/run/old.txt".removeprefix("gs://"))
    elsewhere.pipe(f"{bucket}/run/new/step.txt".removeprefix("gs://"), b"2")
    assert not storage.exists(f"{bucket}/run/old.txt") and not storage.isfile(f"{bucket}/run/old.txt")
    assert storage.isdir(f"{bucket}/run/new") and storage.isfile(f"{bucket}/run/new/step.txt")
    elsewhere.rm(f"{bucket}/run/new/step.txt".removeprefix("gs://"))
    assert not storage.isdir(f"{bucket}/run/new") and not storage.exists(f"{bucket}/run")


def test_a_files_size_time_and_content_in_a_bucket_are_asked_of_the_bucket_not_an_old_listing(bucket, tmp_path,
                                                                                                monkeypatch):
    """A read was sized by the listing kept of its folder (orbax lists checkpoint folders through
    epath's file system): a file another host rewrote longer read cut short, and a local copy
    (cached_copy, by size and time) of a file changed since stayed as it was."""
    from etils import epath

    elsewhere = listings_kept(monkeypatch)
    url, folder = f"{bucket}/t5/spiece.model", str(tmp_path / "cache")
    storage.write_atomically(url, b"vocab-1")
    assert storage.read_bytes(url) == b"vocab-1" and storage.cached_copy(url, folder)
    assert [p.name for p in epath.Path(f"{bucket}/t5").iterdir()] == ["spiece.model"]  # the listings kept
    assert storage.list_files(f"{bucket}/t5") == ["spiece.model"]
    time.sleep(1)  # the emulator's modification times have whole seconds
    elsewhere.pipe(url.removeprefix("gs://"), b"vocab-two")
    assert storage.size_and_mtime(url)[0] == 9 and storage.read_bytes(url) == b"vocab-two"
    assert open(storage.cached_copy(url, folder), "rb").read() == b"vocab-two"


def test_a_file_another_host_deleted_can_be_created_again_and_a_folder_it_wrote_is_removed(bucket, monkeypatch):
    """create_file (the workdir lock) asked a listing kept from before whether its file was there,
    so a lock its holder had released read as held; rmtree asked one whether its folder was, and
    left a folder another host wrote since."""
    from etils import epath

    elsewhere = listings_kept(monkeypatch)
    lock = f"{bucket}/run/lock.json"
    assert storage.create_json(lock, {"holder": 1}) and not storage.create_json(lock, {"holder": 2})
    assert storage.list_files(f"{bucket}/run") == ["lock.json"]
    assert [p.name for p in epath.Path(bucket).iterdir()] == ["run"]  # the listings kept
    elsewhere.rm(lock.removeprefix("gs://"))  # released
    elsewhere.pipe(f"{bucket}/samples/000000.png".removeprefix("gs://"), b"png")
    assert storage.create_json(lock, {"holder": 2}) and storage.read_json(lock) == {"holder": 2}
    storage.rmtree(f"{bucket}/samples")
    assert not storage.exists(f"{bucket}/samples/000000.png")


def test_a_folder_named_for_a_url_in_a_bucket_is_never_made_locally_and_a_local_name_with_a_colon_stays_local(
        bucket, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    storage.makedirs(f"{bucket}/run")  # a store has no folders: os.makedirs would make ./gs:/...
    storage.check_writable(f"{bucket}/run")
    assert os.listdir(tmp_path) == []
    local = str(tmp_path / "run:" / "x")  # a folder named "run:" holds no "://"
    assert not storage.is_url(local) and storage.join(local, "y") == os.path.join(local, "y")


def test_a_bucket_that_refuses_the_probe_names_the_cause_and_what_to_check_for_a_bucket(bucket, monkeypatch):
    """A bucket this account may read but not write to: gcsfs's 403 was the error, with no word of
    the credentials to check; a local folder's advice (make it writable) does not apply there."""
    def forbidden(path, data):
        raise PermissionError(f"Forbidden: {path}: does not have storage.objects.create access")

    monkeypatch.setattr(storage.writes, "write_atomically", forbidden)
    with pytest.raises(storage.StorageError) as refused:
        storage.check_writable(f"{bucket}/run")
    assert str(refused.value) == (
        f"cannot write to {bucket}/run: PermissionError: Forbidden: {bucket}/run/.write_check.tmp-"
        f"{storage.writer_tag()}-probe: does not have storage.objects.create access ({storage.CHECK_ACCESS}, and "
        "that they may write there)")


def storage_file_system(url: str):
    """fsspec's cached file system for a URL, the one storage uses: made after storage configured
    gcsfs, whose settings are part of the instance's key."""
    import fsspec

    storage.remote.configure_gcsfs()
    return fsspec.core.url_to_fs(url)[0]


def test_a_file_another_writer_created_just_after_the_check_is_kept_as_it_is(bucket, tmp_path, monkeypatch):
    """create_file and upload_file_once check that nothing is there, then upload create-only: a
    file that appeared between the two is the other writer's (False), not an error."""
    fs = storage_file_system(bucket)
    real_exists, checks = fs.exists, []

    def missed_at_first(key, **kwargs):  # the other writer's upload lands just after the first check
        checks.append(key)
        return len(checks) > 1 and real_exists(key, **kwargs)

    local = tmp_path / "mine.json"
    local.write_text('{"holder": 2}')
    for create in (lambda path: storage.create_json(path, {"holder": 2}),
                   lambda path: storage.upload_file_once(str(local), path)):
        path = f"{bucket}/run/{len(checks)}.json"
        storage.write_json_atomically(path, {"holder": 1})
        checks.clear()
        monkeypatch.setattr(fs, "exists", missed_at_first)
        assert create(path) is False and len(checks) == 2
        monkeypatch.setattr(fs, "exists", real_exists)
        assert storage.read_json(path) == {"holder": 1}


def test_a_refused_create_only_upload_names_the_path_and_what_to_check(bucket, tmp_path, monkeypatch):
    fs = storage_file_system(bucket)

    def forbidden(*args, **kwargs):
        raise OSError("Forbidden: 403")

    monkeypatch.setattr(fs, "put_file", forbidden)
    local = tmp_path / "samples.npz"
    local.write_bytes(b"npz")
    with pytest.raises(storage.StorageError) as refused:
        storage.upload_file_once(str(local), f"{bucket}/run/samples.npz")
    assert str(refused.value) == f"{bucket}/run/samples.npz: OSError: Forbidden: 403 ({storage.CHECK_ACCESS})"


def test_gcsfs_is_configured_once_to_keep_no_listings(monkeypatch):
    """Configured before each request: one log filter, not one more per request; and file systems
    made after it (epath's, which orbax lists checkpoints with) keep no listings that other hosts'
    writes would make stale."""
    import logging

    import fsspec

    for protocol in ("gs", "gcs"):
        monkeypatch.setitem(fsspec.config.conf, protocol, {})  # no fsspec config of the user's
    monkeypatch.setattr(logging.getLogger("gcsfs"), "filters", [])
    storage.remote.configure_gcsfs()
    storage.remote.configure_gcsfs()
    assert len(logging.getLogger("gcsfs").filters) == 1
    assert not fsspec.filesystem("gs", skip_instance_cache=True).dircache.use_listings_cache


def test_a_fingerprint_reads_both_ends_of_a_large_file_its_size_and_all_of_one_just_small_enough(tmp_path):
    slice_size = storage.reads.FINGERPRINT_SLICE
    path = tmp_path / "data.bin"

    def fingerprints(content: bytes) -> tuple[str, str]:
        path.write_bytes(content)
        return storage.fingerprint(str(tmp_path)), storage.file_fingerprint(str(path))

    large = bytes(4 * slice_size)
    before = fingerprints(large)
    for changed in (b"\1" + large[1:], large[:-1] + b"\1", bytes(5 * slice_size)):  # first, last byte; longer
        after = fingerprints(changed)
        assert after[0] != before[0] and after[1] != before[1]
    whole = bytes(3 * slice_size)  # read whole: a byte between where slices would start is seen
    assert fingerprints(whole) != fingerprints(whole[:slice_size + 1] + b"\1" + whole[slice_size + 2:])


def test_reads_in_order_run_side_by_side():
    import threading

    both_waiting = threading.Barrier(2, timeout=10)  # broken if the second read waits for the first
    assert list(storage.read_in_order(lambda i: both_waiting.wait() * 0 + i, [1, 2])) == [1, 2]


def test_reads_in_threads_come_back_in_order_with_a_bounded_read_ahead():
    drawn = []

    def items():
        for i in range(3 * storage.reads.READ_AHEAD):
            drawn.append(i)
            yield i

    reads = storage.read_in_order(lambda i: i * i, items())
    assert next(reads) == 0 and len(drawn) == storage.reads.READ_AHEAD  # not the whole list at once
    assert list(reads) == [i * i for i in range(1, 3 * storage.reads.READ_AHEAD)]


def test_streamed_writes_histories_and_removals_in_a_bucket(bucket):
    storage.write_streamed_atomically(f"{bucket}/run/samples.npz", lambda f: f.write(b"npz" * 1000))
    assert storage.read_bytes(f"{bucket}/run/samples.npz") == b"npz" * 1000  # not only what the writer had flushed
    storage.write_json_keeping_history(f"{bucket}/run/eval.json", {"fid": 2.0})
    storage.write_json_keeping_history(f"{bucket}/run/eval.json", {"fid": 1.0})
    history = [json.loads(line)["fid"] for line in storage.read_text(f"{bucket}/run/eval_history.jsonl").splitlines()]
    assert history == [2.0, 1.0] and storage.read_json(f"{bucket}/run/eval.json") == {"fid": 1.0}
    for job in (1, 2):  # a bucket has no append: read, and written back whole with the line
        storage.append_json_line(f"{bucket}/run/samples/sampling_runs.jsonl", {"job": job})
    jobs = storage.read_text(f"{bucket}/run/samples/sampling_runs.jsonl").splitlines()
    assert [json.loads(line) for line in jobs] == [{"job": 1}, {"job": 2}]
    storage.remove(f"{bucket}/run/none.json")  # nothing there: nothing to do, as locally
    storage.rmtree(f"{bucket}/none")
    assert storage.list_files(f"{bucket}/run") == ["eval.json", "eval_history.jsonl", "samples.npz"]


def test_a_full_local_disk_under_an_upload_is_named_not_the_bucket(bucket, tmp_path, monkeypatch):
    """samples.npz for a bucket is written in the temporary folder first: a full disk there said
    "No space left on device" of the bucket's path, where no disk fills up, and the failing close
    left the partial copy there. Now the error names the local folder and TMPDIR, nothing is
    uploaded and nothing is left; the bucket's own errors stay as they are."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def disk_full(f):
        f.write(b"npz" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(storage.StorageError, match=(
            rf"^{bucket}/samples.npz is written on this machine first, in {tmp_path}, then uploaded whole, and that "
            rf"local copy failed \(OSError: \[Errno 28\] No space left on device\): free space in {tmp_path}, or "
            "point TMPDIR at a folder with room for the file$")):
        storage.write_streamed_atomically(f"{bucket}/samples.npz", disk_full)
    assert not storage.exists(f"{bucket}/samples.npz") and os.listdir(tmp_path) == []

    def close_fails(f):  # the last buffered bytes written at the close, which fails
        f.write(b"npz")
        os.close(f.fileno())

    with pytest.raises(storage.StorageError, match=rf"in {tmp_path}, .*local copy failed \(OSError: \[Errno 9\] "):
        storage.write_streamed_atomically(f"{bucket}/samples.npz", close_fails)
    assert os.listdir(tmp_path) == []  # was left behind: a full disk kept full by the job's own copy
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # a TMPDIR that does not exist
    with pytest.raises(storage.StorageError, match=rf"in {tmp_path}/gone, .*\(FileNotFoundError: "):
        storage.write_streamed_atomically(f"{bucket}/samples.npz", lambda f: f.write(b"npz"))

    def bucket_fails(f):
        raise storage.StorageError(f"{bucket}/samples/000001.png: 503")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(storage.StorageError, match=r"^gs://.*/samples/000001.png: 503$"):
        storage.write_streamed_atomically(f"{bucket}/samples.npz", bucket_fails)
    assert os.listdir(tmp_path) == []
    storage.write_streamed_atomically(f"{bucket}/samples.npz", lambda f: f.write(b"npz" * 1000))
    with storage.open_file(f"{bucket}/samples.npz", "rb") as f:
        assert f.read() == b"npz" * 1000
    assert os.listdir(tmp_path) == []  # an uploaded copy goes too (each job's samples.npz kept on the disk)


def test_a_full_local_disk_under_a_download_is_named_not_the_file(bucket, tmp_path, monkeypatch):
    """A release model.pt (or Inception .pth) in a bucket is read through a copy in the temporary
    folder: a full disk there said 'cannot read ... as a PyTorch checkpoint (truncated or not a
    checkpoint?): OSError: [Errno 28]', a reason to doubt a sound file. Now the local folder and
    TMPDIR are named (for a disk quota reached too); the file's own errors stay as they are, and a
    copy with room is read."""
    import shutil
    import tempfile

    import torch

    from pixelflow_jax.checkpoints.torch_io import load_torch_file

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    local = tmp_path / "model.pt"
    torch.save({"w": torch.ones(3)}, local)
    storage.write_atomically(f"{bucket}/model.pt", local.read_bytes())
    local.unlink()
    copy = shutil.copyfileobj

    # A quota reached there (EDQUOT, a shared machine's home or scratch) is the same lack of room.
    for code, words in ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded")):
        def no_room(source, target, length=0, code=code, words=words):
            raise OSError(code, words)

        monkeypatch.setattr(shutil, "copyfileobj", no_room)
        with pytest.raises(storage.StorageError, match=(
                rf"^{bucket}/model.pt is read through a copy on this machine, in {tmp_path}, and that copy failed "
                rf"\(OSError: \[Errno {code}\] {words}\): free space there, or point TMPDIR at a folder")):
            load_torch_file(f"{bucket}/model.pt")
        assert os.listdir(tmp_path) == []  # the partial copy goes with its folder

    def connection_lost(source, target, length=0):
        raise OSError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setattr(shutil, "copyfileobj", connection_lost)
    with pytest.raises(Exception, match="Connection reset by peer") as other:
        load_torch_file(f"{bucket}/model.pt")
    assert "TMPDIR" not in str(other.value)
    monkeypatch.setattr(shutil, "copyfileobj", copy)
    assert load_torch_file(f"{bucket}/model.pt")["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_local_copy_that_cannot_be_written_names_the_cache_folder_not_the_bucket(bucket, tmp_path, monkeypatch):
    """A T5 folder in a bucket is copied into the local cache: a full disk there, or a cache path
    that is a file, was an OSError traceback. A file gone from the bucket stays a
    FileNotFoundError (its caller forgets the stale copy)."""
    import errno

    url = f"{bucket}/t5/spiece.model"
    storage.write_atomically(url, b"sentencepiece")
    (tmp_path / "a_file").write_text("")
    with pytest.raises(storage.StorageError, match=(
            rf"^cannot keep a local copy of {url} in {tmp_path}/a_file/t5 \(NotADirectoryError: .*\): free space there "
            r"\(or make it a writable folder\), or set PIXELFLOW_CACHE_DIR to a folder with room for it$")):
        storage.cached_copy(url, str(tmp_path / "a_file" / "t5"))

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    writes = storage.cache.write_local_atomically
    monkeypatch.setattr(storage.cache, "write_local_atomically", disk_full)
    with pytest.raises(storage.StorageError, match=rf"in {tmp_path}/cache \(OSError: \[Errno 28\] No space left"):
        storage.cached_copy(url, str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError):
        storage.cached_copy(f"{bucket}/t5/none.model", str(tmp_path / "cache"))
    # the bucket's own errors while the copy is read stay its own: a file gone between its listing and
    # its read is a FileNotFoundError (the T5 loader then forgets an earlier copy), a refused read names
    # the bucket, neither the cache folder
    monkeypatch.setattr(storage.cache, "write_local_atomically", writes)
    for error in (FileNotFoundError(errno.ENOENT, "gone", url), storage.StorageError(f"cannot read {url}: 403")):
        def failing_read(path, mode="rb", error=error):
            raise error

        monkeypatch.setattr(storage.cache, "open_file", failing_read)
        with pytest.raises(type(error)) as raised:
            storage.cached_copy(url, str(tmp_path / "cache"))
        assert raised.value is error


def test_a_full_disk_under_a_local_copys_record_names_the_cache_folder_too(bucket, tmp_path, monkeypatch):
    """The copy fits, and the disk fills up on its small record (NAME.source.json, which tells a
    later run whether the copy is current): the same error naming the cache folder, not an
    OSError traceback."""
    url = f"{bucket}/t5/spiece.model"
    storage.write_atomically(url, b"sentencepiece")

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(storage.cache, "write_json_atomically", disk_full)
    with pytest.raises(storage.StorageError, match=(
            rf"^cannot keep a local copy of {url} in {tmp_path}/cache \(OSError: \[Errno 28\] No space left on device\)"
            r": free space there")):
        storage.cached_copy(url, str(tmp_path / "cache"))


def test_a_local_copy_of_a_bucket_file_is_fetched_again_when_cut_short_or_changed(bucket, tmp_path, monkeypatch):
    url, folder, downloads = f"{bucket}/t5/spiece.model", str(tmp_path / "cache"), []
    real_open = storage.cache.open_file
    monkeypatch.setattr(storage.cache, "open_file", lambda path, mode: downloads.append(path) or real_open(path, mode))
    storage.write_atomically(url, b"vocab-1")
    local = storage.cached_copy(url, folder)
    assert storage.cached_copy(url, folder) == local and len(downloads) == 1  # the copy is read again
    with open(local, "wb") as f:
        f.write(b"vocab")  # cut short (a copy by hand, a full disk)
    assert open(storage.cached_copy(url, folder), "rb").read() == b"vocab-1" and len(downloads) == 2
    time.sleep(1)  # the emulator's modification times have whole seconds
    storage.write_atomically(url, b"vocab-2")  # the same size, another file
    assert open(storage.cached_copy(url, folder), "rb").read() == b"vocab-2" and len(downloads) == 3


def test_a_bucket_file_rewritten_within_the_second_at_the_same_size_is_fetched_again(bucket, tmp_path, monkeypatch):
    """The record of a local copy held the size and the whole-second time: a rewrite within that
    second at the same size (a tokenizer fixed and uploaded again at once) kept the stale copy."""
    url, folder, downloads = f"{bucket}/t5/spiece.model", str(tmp_path / "cache"), []
    real_open = storage.cache.open_file
    monkeypatch.setattr(storage.cache, "open_file", lambda path, mode: downloads.append(path) or real_open(path, mode))
    time.sleep(1.05 - time.time() % 1)  # just after a second begins: both writes within it
    storage.write_atomically(url, b"vocab-1")
    local = storage.cached_copy(url, folder)
    first = storage.size_and_mtime(url)
    storage.write_atomically(url, b"vocab-2")
    assert storage.size_and_mtime(url) == first  # what the record held before: the same
    assert open(storage.cached_copy(url, folder), "rb").read() == b"vocab-2" and len(downloads) == 2
    # A record written before generations were kept is good for the generation there now, once.
    record = json.load(open(local + ".source.json"))
    generation = record.pop("generation")
    json.dump(record, open(local + ".source.json", "w"))
    assert storage.cached_copy(url, folder) == local and len(downloads) == 2
    assert json.load(open(local + ".source.json"))["generation"] == generation


def test_a_record_made_before_generations_that_cannot_be_rewritten_still_serves_its_copy(bucket, tmp_path,
                                                                                          monkeypatch):
    """Adding the generation to an earlier record is no reason to download: on a full disk (or a cache
    folder made read-only) that rewrite failed, the copy was downloaded again, and its write stopped
    the job, where the copy had served before."""
    import errno

    url, folder, downloads = f"{bucket}/t5/spiece.model", str(tmp_path / "cache"), []
    storage.write_atomically(url, b"vocab")
    local = storage.cached_copy(url, folder)
    record = json.load(open(local + ".source.json"))
    del record["generation"]
    json.dump(record, open(local + ".source.json", "w"))
    real_open = storage.cache.open_file
    monkeypatch.setattr(storage.cache, "open_file", lambda path, mode: downloads.append(path) or real_open(path, mode))

    def disk_full(path, value):
        raise storage.StorageError(f"cannot write {path} (OSError: [Errno {errno.ENOSPC}] No space left on device)")

    monkeypatch.setattr(storage.cache, "write_json_atomically", disk_full)
    assert storage.cached_copy(url, folder) == local and downloads == []
    assert json.load(open(local + ".source.json")) == record  # as it was: the next read adds the generation


def test_a_download_is_written_under_the_name_the_next_download_clears(bucket, tmp_path, monkeypatch):
    """cached_copy clears .NAME.download-HOST-PID-* of dead processes: a download killed -9 (a T5
    model's gigabytes) is left under that name. Under another writer's temporary name it stayed for
    good: no job clears the temporaries of the cache folder, which is no workdir."""
    url, folder, listed = f"{bucket}/t5/spiece.model", tmp_path / "cache", []
    storage.write_atomically(url, b"vocab")
    real_open = storage.cache.open_file
    monkeypatch.setattr(storage.cache, "open_file",
                        lambda path, mode: listed.extend(os.listdir(folder)) or real_open(path, mode))
    storage.cached_copy(url, str(folder))
    [downloading] = listed  # while the download ran
    assert downloading.startswith(f".spiece.model.download-{socket.gethostname()}-{os.getpid()}-")


def test_a_local_copy_clears_only_this_hosts_downloads_whose_process_is_gone(bucket, tmp_path, monkeypatch):
    """The cache folder may be shared by hosts: another host's download, and this host's live
    one, are theirs; a name after the download mark that is no process id is no download's; a
    leftover that another process removes first is no error."""
    url, folder = f"{bucket}/t5/spiece.model", tmp_path / "cache"
    storage.write_atomically(url, b"vocab")
    host = socket.gethostname()
    other_host = host[:-1] + ("x" if host[-1] != "x" else "y")  # as long as this host's name
    gone = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    mark = ".spiece.model.download"
    names = {"dead": f"{mark}-{host}-{gone}-a", "removed_by_another": f"{mark}-{host}-1-b",
             "live": f"{mark}-{host}-{os.getpid()}-c", "other_host": f"{mark}-{other_host}-{gone}-d",
             "no_pid": f"{mark}-{host}-draft", "other_file": "spiece.model.notes"}
    folder.mkdir()
    for name in names.values():
        (folder / name).write_bytes(b"x")
    real_alive = storage.cache.process_alive

    def alive(pid):
        if pid == 1:  # another start clearing the same leftover just before this one
            os.remove(folder / names["removed_by_another"])
            return False
        return real_alive(pid)

    monkeypatch.setattr(storage.cache, "process_alive", alive)
    storage.cached_copy(url, str(folder))
    kept = {"live", "other_host", "no_pid", "other_file"}
    assert sorted(os.listdir(folder)) == sorted([names[k] for k in kept] + ["spiece.model", "spiece.model.source.json"])


def test_a_file_gone_from_the_bucket_during_its_download_is_missing_not_a_cache_error(bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(storage.cache, "file_version", lambda url: {"size": 5, "mtime": 1.0})  # seen just before its deletion
    with pytest.raises(FileNotFoundError):
        storage.cached_copy(f"{bucket}/t5/spiece.model", str(tmp_path / "cache"))


def test_the_cache_folder_is_the_projects_setting_else_the_users_cache(monkeypatch):
    monkeypatch.setenv("PIXELFLOW_CACHE_DIR", "/data/pf_cache")
    monkeypatch.setenv("XDG_CACHE_HOME", "/data/xdg")
    assert storage.cache_dir("t5") == "/data/pf_cache/t5"
    monkeypatch.setenv("PIXELFLOW_CACHE_DIR", "")  # set empty (`PIXELFLOW_CACHE_DIR= cmd`): as unset, not the cwd
    assert storage.cache_dir("t5") == "/data/xdg/pixelflow_jax/t5"
    monkeypatch.delenv("PIXELFLOW_CACHE_DIR")
    assert storage.cache_dir("t5") == "/data/xdg/pixelflow_jax/t5"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert storage.cache_dir() == os.path.join(os.path.expanduser("~"), ".cache", "pixelflow_jax")


def test_without_a_known_home_folder_the_cache_is_refused_not_made_in_the_current_folder(monkeypatch, tmp_path):
    """A container's uid without a passwd entry and HOME unset: expanduser("~") is "~", and the cache
    was ./~/.cache/pixelflow_jax wherever the job started."""
    monkeypatch.chdir(tmp_path)
    for variable in ("PIXELFLOW_CACHE_DIR", "XDG_CACHE_HOME", "HOME"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr("pwd.getpwuid", lambda uid: (_ for _ in ()).throw(KeyError(uid)))
    with pytest.raises(storage.StorageError, match="home folder is unknown .*set PIXELFLOW_CACHE_DIR"):
        storage.cache_dir("xla")
    monkeypatch.setenv("HOME", "home")
    with pytest.raises(storage.StorageError, match="HOME='home' is no absolute path"):
        storage.cache_dir("xla")
    monkeypatch.setenv("HOME", "")  # (a cron job's): expanduser("~") is "/", and the cache was /.cache/pixelflow_jax
    with pytest.raises(storage.StorageError, match="HOME is empty, which Python reads as the root folder /"):
        storage.cache_dir("xla")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # not absolute: ignored, as the XDG rule says
    monkeypatch.setenv("HOME", "/home/u")
    assert storage.cache_dir("xla") == "/home/u/.cache/pixelflow_jax/xla"
    monkeypatch.setenv("PIXELFLOW_CACHE_DIR", "pf_cache")  # the folder it names now, whatever the cwd later
    assert storage.cache_dir("xla") == str(tmp_path / "pf_cache" / "xla")
    monkeypatch.setenv("PIXELFLOW_CACHE_DIR", "gs://bucket/cache")  # was ./gs:/bucket/cache/xla
    with pytest.raises(storage.StorageError, match=r"^PIXELFLOW_CACHE_DIR=gs://bucket/cache is a URL: .*local folder$"):
        storage.cache_dir("xla")


def test_a_temporary_folder_asked_for_and_passed_over_is_named(monkeypatch, tmp_path):
    """TMPDIR=/scratch/tmp on a node where /scratch is not mounted: Python took /tmp in silence (or the
    current folder, where /tmp cannot be written either), and the job's temporaries went there."""
    import tempfile

    from pixelflow_jax.storage.temporaries import temporary_folder_problem

    for variable in ("TMPDIR", "TEMP", "TMP"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", None)  # Python's choice, made again for each setting below
    assert temporary_folder_problem() is None
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert temporary_folder_problem() is None
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "missing"))
    assert temporary_folder_problem() == (
        f"TMPDIR={tmp_path}/missing is not a folder this user can write to (missing, a file, read-only or full): "
        f"temporary files go to {tempfile.gettempdir()} instead; create it, or point TMPDIR at a writable folder")


def test_a_temporary_folder_python_takes_as_asked_is_no_problem(monkeypatch, tmp_path):
    """TMPDIR set empty is unset for Python as well, TMPDIR comes before TEMP and TMP, and TMPDIR=DIR/
    is DIR: none of them is a folder passed over."""
    import tempfile

    from pixelflow_jax.storage.temporaries import temporary_folder_problem

    monkeypatch.setenv("TEMP", str(tmp_path / "missing"))  # looked at only without TMPDIR
    monkeypatch.setenv("TMP", str(tmp_path / "missing"))
    for asked in (f"{tmp_path}/", str(tmp_path)):
        monkeypatch.setenv("TMPDIR", asked)
        monkeypatch.setattr(tempfile, "tempdir", None)
        assert temporary_folder_problem() is None, asked
    monkeypatch.setenv("TMPDIR", "")
    monkeypatch.setenv("TEMP", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert temporary_folder_problem() is None


def test_a_local_write_goes_through_a_temporary_beside_the_file_named_for_its_writer(tmp_path):
    """Named so that remove_temporaries clears it after a kill, and keeps it while its writer runs."""
    seen = []
    storage.write_atomically(str(tmp_path / "grid.png"), b"")  # another file, not a temporary
    storage.write_streamed_atomically(str(tmp_path / "samples.npz"),
                                      lambda f: seen.extend(sorted(os.listdir(tmp_path))))
    assert len(seen) == 2 and seen[0].startswith(f".samples.npz.tmp-{storage.writer_tag()}-") and seen[1] == "grid.png"
    assert storage.remove_temporaries(str(tmp_path)) == 0


# Writes 000001.png into the folder argv[1] once for each line of storage/writes.py that a write
# runs, raising at that line (raised in the library code it calls as well, in tempfile's, a later
# write hung).
STOPPED_WRITES = r"""
import os, sys
from pixelflow_jax import storage

class Stop(BaseException):
    pass

def write_stopped_at(folder, line):
    seen = [0]

    def trace(frame, event, arg):
        if event == "line" and frame.f_code.co_filename == storage.writes.__file__:
            seen[0] += 1
            if seen[0] == line:
                raise Stop
        return trace

    sys.settrace(trace)
    try:
        storage.write_atomically(os.path.join(folder, "000001.png"), b"png")
    except Stop:
        return True
    finally:
        sys.settrace(None)
    return False

folder, line = sys.argv[1], 1
while write_stopped_at(folder, line):
    names = os.listdir(folder)
    assert names in ([], ["000001.png"]), (line, names)
    for name in names:
        os.remove(os.path.join(folder, name))
    line += 1
assert line > 10 and os.listdir(folder) == ["000001.png"], line  # the write ran to its end once
"""


def test_a_stop_raised_at_any_line_of_a_local_write_leaves_no_temporary(tmp_path):
    """A SIGTERM handler raises between any two lines (command_line.stop_on_sigterm): one raised
    after the temporary's creation and before the `try` that removes it left it behind (a sampling
    job stopped by SIGTERM, 1 in 12). Raised here at each line of a write in turn, in a process of
    its own: raised where no signal handler runs (inside a `with`'s exit from a suppressed error),
    the exception left the error it interrupted as the thread's handled one, the context of later
    errors in the tests after it."""
    result = subprocess.run([sys.executable, "-c", STOPPED_WRITES, str(tmp_path)], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_local_removals_moves_and_write_errors(tmp_path, monkeypatch):
    storage.remove(str(tmp_path / "none.json"))  # nothing there: nothing to do
    (tmp_path / "taken.json").write_text("{}")
    with monkeypatch.context() as patch:  # another process removes it first
        patch.setattr(os, "remove", lambda path: (os.unlink(path), os.unlink(path)))
        storage.remove(str(tmp_path / "taken.json"))
    (tmp_path / "a.npz").write_bytes(b"a")
    storage.move(str(tmp_path / "a.npz"), str(tmp_path / "aside" / "1" / "a.npz"))  # its folder made
    assert os.listdir(tmp_path / "aside" / "1") == ["a.npz"]
    monkeypatch.chdir(tmp_path / "aside" / "1")
    storage.move("a.npz", "b.npz")  # in the working folder (was os.makedirs(""): "No such file or directory: ''")
    assert os.listdir(tmp_path / "aside" / "1") == ["b.npz"]
    with storage.removed_if_left_empty(str(tmp_path / "run"), remover=False):  # another process removes it
        os.makedirs(tmp_path / "run")
    assert os.path.isdir(tmp_path / "run")
    with pytest.raises(storage.StorageError, match=rf"^cannot write {tmp_path}/run/metrics.jsonl \(OSError: "
                                                   r"No space left\); free space or make the workdir writable, and "
                                                   "rerun it$"):  # no errno: either cause
        with storage.writing(str(tmp_path / "run" / "metrics.jsonl"), "rerun it"):
            raise OSError("No space left")
    with pytest.raises(storage.StorageError, match=r"^gs://b/x: 403$"):  # already says its path and cause
        with storage.writing(str(tmp_path / "run" / "metrics.jsonl"), "rerun it"):
            raise storage.StorageError("gs://b/x: 403")


def test_a_write_stopped_by_a_limit_of_the_machine_is_told_what_lifts_that_limit(tmp_path):
    """A job's write (metrics.jsonl, a sampling job's images, eval.json) stopped by the shell's file
    size limit, a quota or the open-files limit was told to "free space or make the workdir
    writable", which helps with none of them. Here under the kernel's own file size limit."""
    from conftest import error_under_a_file_size_limit

    path = str(tmp_path / "metrics.jsonl")
    said = error_under_a_file_size_limit(f"from pixelflow_jax import storage\nwith storage.writing({path!r}, 'rerun "
                                         f"it'):\n    storage.write_atomically({path!r}, 'x' * 5000)", 1000)
    assert re.fullmatch(rf"\S*StorageError: cannot write {path} \(OSError: \[Errno 27\] File too large\); raise the "
                        r"file size limit in the job's shell, `ulimit -f unlimited` \(up to what `ulimit -Hf` "
                        r"allows\), or ask the machine's administrators, and rerun it", said), said
    assert not os.path.exists(path)

    def advice_for(code):
        with pytest.raises(storage.StorageError) as stopped:
            with storage.writing(path, "rerun it"):
                raise OSError(code, os.strerror(code))
        return str(stopped.value).split("; ", 1)[1]

    assert advice_for(errno.ENOSPC) == "free space, and rerun it"
    assert advice_for(errno.EDQUOT) == "make room in this user's disk quota, and rerun it"
    assert advice_for(errno.EMFILE).startswith(("raise the open-files limit in the job's shell, `ulimit -n ",
                                                "this process may open "))  # this process's limits
    for refused in (errno.EACCES, errno.EPERM, errno.EROFS):  # more room would not help
        assert advice_for(refused) == "make the workdir writable, and rerun it"


def said_by_a_process_of(uid: int, action) -> str:
    """The message of what action() raises ('' for none) in a forked child that runs as user `uid`:
    root passes the refusals of the sticky bit and of file modes. The child needs no file to read,
    the modules it runs being loaded already."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        said = ""
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            action()
        except BaseException as e:
            said = str(e)
        os.write(write_end, said.encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as said:
        message = said.read()
    os.waitpid(child, 0)
    return message


@pytest.mark.filterwarnings("ignore:.*fork:RuntimeWarning", "ignore:.*fork:DeprecationWarning")  # no JAX in the child
def test_a_write_that_another_users_file_in_a_sticky_folder_refuses_names_that_user():
    """Resuming another user's run in a shared folder with the sticky bit (chmod 1777): the rewrite of
    its metrics.jsonl, which only its owner may replace there, was told to "make the workdir writable
    (or free space)", in a folder this user could write to. Here for real: the file of another uid,
    written to by a process of a third."""
    import tempfile

    if os.geteuid() != 0:
        pytest.skip("making another user's file and writing as another user take root")
    shared = tempfile.mkdtemp(prefix="pixelflow_shared_", dir="/tmp")  # one that user reaches (not tmp_path's)
    try:
        os.chmod(shared, 0o1777)
        path = os.path.join(shared, "metrics.jsonl")
        with open(path, "w") as f:
            f.write('{"step": 1}\n')
        os.chmod(path, 0o666)  # writable to all: the sticky bit alone refuses its replacement
        os.chown(path, 4242, 4242)

        def rewrite():
            with storage.writing(path, "rerun the same command: it resumes from its latest checkpoint"):
                storage.write_atomically(path, '{"step": 1}\n{"step": 2}\n')

        said = said_by_a_process_of(65534, rewrite)
        assert re.fullmatch(
            rf"cannot write {path} \(PermissionError: \[Errno 1\] Operation not permitted: .* -> '{path}'\); it "
            rf"belongs to uid 4242, and {shared} has the sticky bit: only a file's owner \(or the folder's\) may "
            r"delete it\. Ask them to run the command, or copy the workdir into a folder of this user's own \(`cp "
            r"-r`\) and rerun it there", said), said
        assert open(path).read() == '{"step": 1}\n' and os.listdir(shared) == ["metrics.jsonl"]  # no temporary left
    finally:
        shutil.rmtree(shared)


def test_the_refused_file_of_another_user_is_named_first_by_its_error_and_only_for_a_refusal(tmp_path, monkeypatch):
    """A refused rename names its target (filename2) apart from the file written (the temporary) and
    from the path the caller gave: the target is the file another user owns, with its own folder's
    sticky bit. A full disk is no refusal, another user's file or not: it is told to free space. Here
    every existing file is another user's: this process claims a uid that owns none."""
    shared, run = tmp_path / "shared", tmp_path / "run"
    shared.mkdir()
    run.mkdir()
    os.chmod(shared, 0o1777)
    theirs, written = shared / "metrics.jsonl", run / "metrics.jsonl"
    theirs.write_text("{}\n")
    written.write_text("{}\n")
    monkeypatch.setattr(os, "geteuid", lambda: os.stat(tmp_path).st_uid + 1)

    def said(error):
        with pytest.raises(storage.StorageError) as stopped:
            with storage.writing(str(written), "rerun it"):
                raise error
        return str(stopped.value).split("; ", 1)[1]

    # (errno, strerror, filename, winerror, filename2), as os.rename raises it: the temporary, then the target
    refused_rename = PermissionError(errno.EPERM, "Operation not permitted", str(run / "gone.tmp"), None, str(theirs))
    assert said(refused_rename) == (
        f"{theirs} belongs to {storage.file_owner(str(theirs))}, and {shared} has the sticky bit: only a file's "
        "owner (or the folder's) may delete it. Ask them to run the command, or copy the workdir into a folder of "
        "this user's own (`cp -r`) and rerun it there")
    assert said(OSError(errno.ENOSPC, "No space left on device", str(written))) == "free space, and rerun it"


def test_a_file_or_folder_gone_before_its_owner_is_asked_is_named_plainly():
    """The left lock or the refused file that another process removed the moment after: its owner is
    "another user", and nothing is said of its folder's sticky bit: the message is made, not an OSError."""
    gone = "/nonexistent_pixelflow_folder/train.lock"
    assert storage.file_owner(gone) == "another user"
    assert storage.sticky_words(os.path.dirname(gone)) == ""


def test_a_killed_writers_temporary_folder_is_kept_while_anything_in_it_is_recent(tmp_path, monkeypatch):
    """Containers that share /tmp and the hostname see each other's folders, not processes."""
    import re
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    mine = storage.temporary_dir("pixelflow_test")
    match = re.fullmatch("pixelflow_test-" + storage.WRITER, os.path.basename(mine))
    assert match and match["host"] == socket.gethostname() and int(match["pid"]) == os.getpid()
    other = tmp_path / f"pixelflow_test-{socket.gethostname()}-999999999-x"  # no such pid here
    (other / "events").mkdir(parents=True)
    (other / "events" / "tfevents").write_bytes(b"")  # written a moment ago
    hour_ago = time.time() - 3700
    os.utime(other, (hour_ago, hour_ago))
    os.utime(other / "events", (hour_ago, hour_ago))
    storage.remove_abandoned_dirs("pixelflow_test")
    assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(mine), other.name])
    os.utime(other / "events" / "tfevents", (hour_ago, hour_ago))
    storage.remove_abandoned_dirs("pixelflow_test")
    assert os.listdir(tmp_path) == [os.path.basename(mine)]


def test_only_names_a_writer_of_this_project_gives_are_cleared_and_a_younger_one_of_another_host_is_kept(tmp_path,
                                                                                                      caplog):
    import logging
    import re

    dead, folder = 999999999, tmp_path / "samples"  # no such pid here
    assert storage.remove_temporaries(str(folder)) == 0  # no folder yet: nothing to clear
    folder.mkdir()
    kept = [f".notes.tmp-{dead}-x-mine", f"notes.tmp-{dead}-01",  # a user's: a dash too many, not hidden
            ".000010.png.tmp-other-host.example-7-a"]  # another host's two hours old: its writer may still run
    for name in ["grid.png.tmp", *kept]:  # a sampling job's of earlier versions, and the kept
        (folder / name).write_bytes(b"")
    two_hours_ago = time.time() - 2 * 3600
    os.utime(folder / kept[-1], (two_hours_ago, two_hours_ago))
    with caplog.at_level(logging.INFO):
        storage.clear_leftovers_of_killed_writers(str(folder))  # one file is worth the line
    assert sorted(os.listdir(folder)) == sorted(kept)
    assert f"removed the temporary files of an interrupted run from {folder}" in caplog.text
    (folder / "settings.json.tmp").write_bytes(b"")
    assert storage.remove_temporaries(str(folder)) == 1 and sorted(os.listdir(folder)) == sorted(kept)
    for writer in (f"{socket.gethostname()}-{os.getpid()}-x", "other-host.example-7-x"):  # removed meanwhile
        assert not storage.temporaries.writer_gone(re.fullmatch(storage.WRITER, writer), str(folder / "gone"))


def test_a_temporary_under_this_processs_id_from_before_it_started_is_a_predecessors(tmp_path):
    """A restarted container's processes take the ids of the last one's: a temporary under this
    process's name written before it started was left by its predecessor, killed."""
    name = f".notes.tmp-{storage.writer_tag()}-x"
    (tmp_path / name).write_bytes(b"")
    assert storage.remove_temporaries(str(tmp_path)) == 0  # written by this process
    before = storage.temporaries._THIS_PROCESS_STARTED - 60
    os.utime(tmp_path / name, (before, before))
    assert storage.remove_temporaries(str(tmp_path)) == 1 and os.listdir(tmp_path) == []


def test_a_temporary_an_earlier_version_named_by_its_writers_pid_alone_is_cleared_once_that_process_is_gone(tmp_path):
    """Earlier versions named a temporary `.NAME.tmp-PID-*`, without the host: its writer is asked
    for on this host, as for this host's own names, not left for a day as another host's."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / f".notes.tmp-{int(gone.stdout)}-x").write_bytes(b"")
    (tmp_path / f".draft.tmp-{os.getpid()}-y").write_bytes(b"")  # this process's: it may still finish
    assert storage.remove_temporaries(str(tmp_path)) == 1 and os.listdir(tmp_path) == [f".draft.tmp-{os.getpid()}-y"]


def test_a_killed_writers_folder_is_told_by_its_whole_name_and_a_link_named_like_one_is_left_alone(tmp_path,
                                                                                                   monkeypatch):
    import tempfile

    from pixelflow_jax.checkpoints.checkpoint import atomic_output_dir

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    here, dead, hour_ago = socket.gethostname(), 999999999, time.time() - 3700
    names = [f"pixelflow_test-{here}-{dead}-x-mine",  # a user's: a dash too many
             f"pixelflow_test-{here}-{dead}-y",  # a killed writer's, written to ten minutes ago
             f"pixelflow_test-{here}-{dead}-z"]  # a killed writer's, abandoned
    for name in names:
        (tmp_path / name / "events").mkdir(parents=True)
        (tmp_path / name / "events" / "tfevents").write_bytes(b"")
        for path in (tmp_path / name / "events" / "tfevents", tmp_path / name / "events", tmp_path / name):
            written = time.time() - 600 if name.endswith("-y") and path.name == "tfevents" else hour_ago
            os.utime(path, (written, written))
    storage.remove_abandoned_dirs("pixelflow.test")  # a prefix is a name, not a pattern
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    storage.remove_abandoned_dirs("pixelflow_test")
    assert sorted(os.listdir(tmp_path)) == sorted(names[:2])

    (tmp_path / "mine" / "previous").mkdir(parents=True)  # a user's folder, linked under a killed run's name
    (tmp_path / "mine" / "previous" / "model.pt").write_bytes(b"mine")
    os.symlink(tmp_path / "mine", tmp_path / f".out.old-{dead}-def")
    with atomic_output_dir(str(tmp_path / "out")) as output:
        storage.write_atomically(f"{output}/model.pt", b"new")
    assert (tmp_path / "mine" / "previous" / "model.pt").read_bytes() == b"mine"
    assert (tmp_path / "out" / "model.pt").read_bytes() == b"new"


def test_a_temporary_folder_takes_the_mode_the_umask_gives():
    import tempfile

    previous = os.umask(0o002)
    try:
        with tempfile.TemporaryDirectory() as parent:
            assert os.stat(storage.make_folder(parent)).st_mode & 0o777 == 0o775
    finally:
        os.umask(previous)


def test_reading_the_umask_never_changes_it(monkeypatch):
    """umask() set the umask to 0 to read it: for that instant a file another thread created (orbax
    saves from threads) got mode 0666, a folder 0777. On Linux it is read without being set."""
    from pixelflow_jax.storage import temporaries

    previous = os.umask(0o027)
    try:
        changes = []
        real_umask = os.umask
        monkeypatch.setattr(temporaries.os, "umask", lambda mask: changes.append(mask) or real_umask(mask))
        assert temporaries.umask() == 0o027 and changes == []
    finally:
        os.umask(previous)


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"),
                                   FileNotFoundError(2, "No such file or directory")])  # removed since the check
def test_a_folder_that_cannot_be_listed_keeps_its_leftovers_with_a_warning_and_the_job_goes_on(tmp_path, monkeypatch,
                                                                                              caplog, error):
    """A cleanup of leftovers stopped the job with a traceback when its folder could not be listed
    (no read permission, or removed between the check and the listing)."""
    import logging

    (tmp_path / "grid.png.tmp").write_bytes(b"")

    def unlistable(path):
        raise error

    monkeypatch.setattr(storage.temporaries.os, "listdir", unlistable)
    with caplog.at_level(logging.INFO):
        storage.clear_leftovers_of_killed_writers(str(tmp_path))
    assert (f"could not look for the temporary files of an interrupted run in {tmp_path} ({error.strerror}); any "
            "there are left in place") in caplog.text
    assert "removed the temporary files" not in caplog.text  # none were
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["grid.png.tmp"]
