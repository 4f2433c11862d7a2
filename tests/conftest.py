"""Shared fixtures: the release's golden outputs and their checkpoints, converted once per session."""

import gc
import os


def cpu_devices(count: int, one_process: bool = True) -> str:
    """XLA_FLAGS for `count` fake CPU devices. In one process, XLA:CPU's concurrency-optimised
    schedule now and then let two devices of one program enter different collectives first (an
    all-to-all on one, an all-gather on the other), and both waited until XLA aborted the process
    (seen in 4 of 17 runs of a 2-device fsdp training step, 2026-11-29, jax 0.10.2); its sequential
    schedule ran 8 of 8. Not for a job of several processes: there the sequential schedule put
    the processes' gloo collectives out of step (a size mismatch, seen once)."""
    serial = " --xla_cpu_enable_concurrency_optimized_scheduler=false" if one_process else ""
    return f"--xla_force_host_platform_device_count={count}{serial} {UNOPTIMISED_MACHINE_CODE}"


# The suite's programs are tiny and spend far longer in LLVM's optimiser than they run: compiled at -O0,
# 72 model-parity, attention and Inception tests took 26% less CPU (202 -> 148 s, 2026-12-02) and still
# matched the release's golden outputs at their tolerances. XLA's own passes, which decide what is
# computed, still run; only the machine code is left unoptimised.
UNOPTIMISED_MACHINE_CODE = "--xla_backend_optimization_level=0"


# Eight fake CPU devices for the sharding tests; must be set before jax is first imported.
os.environ.setdefault("XLA_FLAGS", cpu_devices(8))

# BLAS and OpenMP pools of one thread. The suite's two workers and the runs they start share two cores,
# and OpenBLAS's (numpy's) and OpenMP's (torch's) threads spin while they wait for each other there:
# on a busy 2-core machine a second thread made numpy's 2048 x 2048 eigh and eigvalsh (the FID) take
# 42 s instead of 7 s, and the two evaluations of test_inception.py 90 s instead of 27 s; torch's
# float64 Inception reference took 39 s instead of 7 s (2026-12-04; JAX's own programs run as fast).
# The process that reads this file imported numpy already (a pytest plugin does) and keeps its pools:
# pytest-xdist's workers and the subprocesses start with these, as XLA_FLAGS above.
for variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(variable, "1")

import atexit
import contextlib
import shutil
import subprocess
import sys
import tempfile


def session_folder(variable: str, prefix: str) -> None:
    """A fresh temporary folder in `variable` unless it is set, removed when this process exits.
    pytest-xdist's workers inherit the variable from the process that started them, so they
    share its folder, and that process removes it after they are done."""
    if variable not in os.environ:
        os.environ[variable] = folder = tempfile.mkdtemp(prefix=prefix)
        atexit.register(shutil.rmtree, folder, ignore_errors=True)


# One persistent compilation cache for this test session and the training/sampling runs it starts
# as subprocesses: a restarted run reuses its first run's executables (halves the CLI tests' time).
session_folder("JAX_COMPILATION_CACHE_DIR", "pixelflow_jax_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Local copies of remote files (T5 folders in a bucket) go to a fresh folder, not the user's ~/.cache.
session_folder("PIXELFLOW_CACHE_DIR", "pixelflow_jax_files_")

# gcsfs probes a TLS control service at every call unless told not to; against the plain-HTTP
# storage emulator that stalls each call for 60 s. Must be set before gcsfs is imported.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
os.environ.setdefault("EPATH_USE_TF", "false")

import socket
import uuid

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
FIXTURE_NAMES = ("c2i_tiny", "t2i_tiny")


def fixture_dir(name: str) -> str:
    return os.path.join(FIXTURES, name)


def c2i_config(**changes):
    """configs/c2i.py:tiny with {"section.field" or "field": value} changes, of any type (the checks
    under test must refuse what the Python API may pass)."""
    from configs import c2i

    config = c2i.get_config("tiny")
    with config.ignore_type():
        for dotted, value in changes.items():
            section, field = dotted.split(".") if "." in dotted else (None, dotted)
            (config[section] if section else config)[field] = value
    return config


def t2i_config(**changes):
    """configs/t2i.py:tiny with {"section.field" or "field": value} changes."""
    from configs import t2i

    config = t2i.get_config("tiny")
    for dotted, value in changes.items():
        section, field = dotted.split(".") if "." in dotted else (None, dotted)
        (config[section] if section else config)[field] = value
    return config


def as_process_0_of_2_after_process_1(monkeypatch, job, stop=None) -> None:
    """Runs `job` as process 1 of 2 (up to the exception `stop`, if given), recording what it gives
    each process_allgather (the fakes answer that everyone agrees), then makes this process 0, whose
    gathers get what process 1 gave (their own value past the last recorded)."""
    import jax
    from jax.experimental import multihost_utils

    given = []
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda value: value)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda value: given.append(np.asarray(value)) or np.stack([value, value]))
    with pytest.raises(stop) if stop else contextlib.nullcontext():
        job()
    answers = iter(given)
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    monkeypatch.setattr(multihost_utils, "process_allgather",
                        lambda value: np.stack([value, np.asarray(next(answers, value), np.asarray(value).dtype)]))


def run_converter(*args: str, stdout=subprocess.PIPE) -> subprocess.CompletedProcess:
    """Runs convert_torch_ckpt.py as a user would, returning its exit code and output (stdout: a file
    to send it to instead, as a redirected log).
    CONVERTER_PYTHON: another interpreter for it, one with torch, for a suite run in an environment
    without torch (a venv of the GPU machine's Python 3.12 versions, whose torch is a CUDA build):
    the tests that need only converted checkpoints then run too."""
    python = os.environ.get("CONVERTER_PYTHON", sys.executable)
    return subprocess.run([python, os.path.join(REPO, "convert_torch_ckpt.py"), *args],
                          stdout=stdout, stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=300)


def error_under_a_file_size_limit(code: str, limit_bytes: int) -> str:
    """The last line of the error of a fresh Python process that runs `code` under a file size limit
    (`ulimit -f`, whose SIGXFSZ Python ignores: a write past it fails with EFBIG). A process of its
    own: the limit would cut this one's writes too."""
    program = ("import resource\n"
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, resource.RLIM_INFINITY))\n{code}")
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stdout
    return result.stderr.strip().splitlines()[-1]


@contextlib.contextmanager
def json_edited(path):
    """Yields the JSON object in `path` to change in place, and writes it back: a user's edit of a
    checkpoint's or run's record."""
    import json

    values = json.loads(path.read_text())
    yield values
    path.write_text(json.dumps(values))


@contextlib.contextmanager
def stop_handlers_kept():
    """SIGHUP at its default disposition within the block, as a job started outside nohup has it (a
    suite run under nohup passes its SIG_IGN on), and SIGHUP's, SIGINT's and SIGTERM's handlers put
    back after it, whatever the block installed."""
    import signal

    before = {signum: signal.getsignal(signum) for signum in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@pytest.fixture(scope="session", autouse=True)
def host_memory_as_main_sets_it():
    """In-process steps run as main.py runs them: freed host buffers kept for reuse (host_memory.py)."""
    from pixelflow_jax import host_memory

    host_memory.reuse_freed_buffers_on_cpu()


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items):
    """With `-n 2 --dist loadgroup` (the README's command) the tests that check time windows (a
    SIGTERM after step 6, a kill -9 after a checkpoint, the GPU dry run's step limits) run one after
    another in one worker: two of them at once on 2 cores could stretch those windows. The other
    slow tests go to whichever worker is free, which keeps both cores busy to the end; one of them
    beside a timed test stretches its windows less than a second timed test would (each timed test
    has margins for a busy machine: the dry run's limits are 4x the GPU's)."""
    for item in items:
        if item.get_closest_marker("timed"):
            item.add_marker(pytest.mark.xdist_group("timed"))


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's worker reports its results
def pytest_sessionfinish():
    """A worker of pytest-xdist has 5 s from reporting its results to its end, or execnet sends it a
    SIGINT (printed as a KeyboardInterrupt "ignored in _xla_gc_callback" after the last test). By the
    end, a worker holds ~10^6 objects (jax, torch, TensorFlow), and pytest's five closing garbage
    collections took 1.4-1.8 s each on 2 busy cores. Frozen, they skip what the session built."""
    gc.freeze()


@pytest.fixture(scope="session")
def golden():
    return {name: dict(np.load(os.path.join(fixture_dir(name), "golden.npz"))) for name in FIXTURE_NAMES}


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """{fixture name: folder converted by the command-line tool}."""
    out = {}
    for name in FIXTURE_NAMES:
        path = str(tmp_path_factory.mktemp("converted") / name)
        result = run_converter(f"--torch_checkpoint={fixture_dir(name)}", f"--output={path}")
        assert result.returncode == 0, result.stderr
        out[name] = path
    return out


@pytest.fixture(scope="session")
def encoder_folder(tmp_path_factory):
    """A demo-built T5 (random weights, tokenizer trained on demo captions) as wide as the t2i
    fixture's cross-attention (20). Shared by the text tests and the README's text-to-image
    snippet; tests only read it (copy it to change it)."""
    from pixelflow_jax.data.demo_data import CaptionedDemoSource
    from pixelflow_jax.text import demo_text_encoder

    folder = str(tmp_path_factory.mktemp("demo_t5"))
    demo_text_encoder.build(folder, CaptionedDemoSource(500).captions(500), d_model=20)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GCS_TEST_BUCKET = "pixelflow-test"


def make_emulator_behave_like_gcs():
    """Two differences from real GCS that break orbax's array writes (tensorstore) at random,
    about 4 runs in 10: media downloads carry no x-goog-generation header ('Malformed
    StorageGeneration'), and requests are served concurrently over an unsynchronised store. Fixed
    here: the headers are added, and requests are served one at a time. A third: the emulator
    ignores ifGenerationMatch=0 (create only), which the workdir lock relies on; such an upload of
    an object that exists now gets GCS's 412. A fourth: GCS's objects.move, with which gcsfs moves
    an object; the emulator answered 501, and gcsfs retried for ~33 s before copying instead."""
    import re
    import threading
    from http import HTTPStatus

    from gcp_storage_emulator import server, settings
    from gcp_storage_emulator.handlers import objects

    if getattr(server, "_pixelflow_patched", False):
        return
    lock, handle = threading.Lock(), server.Router.handle

    def handle_one_at_a_time(self, method):
        with lock:
            try:
                return handle(self, method)
            except (BrokenPipeError, ConnectionResetError):  # the client hung up (a reader closing early)
                return None

    def with_generation(handler):
        def respond(request, response, storage, *args, **kwargs):
            handler(request, response, storage, *args, **kwargs)
            if response.status in (HTTPStatus.OK, HTTPStatus.PARTIAL_CONTENT) and "object_id" in request.params:
                try:
                    obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
                except Exception:  # not an object (a listing, a bucket): no generation to give
                    return
                response["x-goog-generation"] = str(obj["generation"])
                response["x-goog-metageneration"] = str(obj["metageneration"])
        return respond

    def create_only_if_asked(handler):
        def respond(request, response, storage, *args, **kwargs):
            name = (request.query.get("name") or [None])[0]
            if name is None and isinstance(request.data, dict):  # a multipart upload names it in its metadata
                name = (request.data.get("meta") or {}).get("name")
            if request.query.get("ifGenerationMatch") == ["0"] and name is not None:
                try:
                    storage.get_file_obj(request.params["bucket_name"], name)
                except Exception:  # no such object: the upload may create it
                    pass
                else:
                    response.status = HTTPStatus.PRECONDITION_FAILED
                    response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you "
                                                                     "specified did not hold."}})
                    return
            handler(request, response, storage, *args, **kwargs)
        return respond

    def move(request, response, storage, *args, **kwargs):
        bucket, source = request.params["bucket_name"], request.params["object_id"]
        try:
            moved = objects._copy(request.base_url, storage, bucket, source, bucket, request.params["dest_object_id"])
        except objects.NotFound:
            response.status = HTTPStatus.NOT_FOUND
            return
        storage.delete_file(bucket, source)
        response.json(moved)

    move_route = (rf"^{re.escape(settings.API_ENDPOINT)}/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
                  r"(?P<dest_object_id>.*[^/]+)$", {server.POST: move})
    server.Router.handle = handle_one_at_a_time
    server.HANDLERS = (move_route, *server.HANDLERS)  # before the object route, which would take its path
    for _, methods in server.HANDLERS:
        for method, handler in list(methods.items()):
            if handler in (objects.download, objects.get):
                methods[method] = with_generation(handler)
            elif handler is objects.insert:
                methods[method] = create_only_if_asked(handler)
    server._pixelflow_patched = True


@pytest.fixture(scope="session")
def gcs_emulator():
    """A Google Cloud Storage emulator on 127.0.0.1, in this process, for the whole session; the
    variables that point gcsfs, tensorstore (orbax) and google-auth at it are set for this process
    and the runs it starts."""
    from gcp_storage_emulator.server import create_server

    make_emulator_behave_like_gcs()
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_TEST_BUCKET)
    server.start()
    url = f"http://127.0.0.1:{port}"
    settings = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake", "FSSPEC_GCS_TOKEN": "anon"}
    previous = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    yield url
    server.stop()
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def bucket(gcs_emulator):
    """A fresh gs:// prefix in the emulator's bucket."""
    return f"gs://{GCS_TEST_BUCKET}/{uuid.uuid4().hex[:12]}"
