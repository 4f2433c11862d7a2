"""Shared fixtures: the release's golden outputs and their checkpoints, converted once per session."""

import os

# Eight fake CPU devices for the sharding tests; must be set before jax is first imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import subprocess
import sys
import tempfile

# One persistent compilation cache for this test session and the training/sampling runs it starts
# as subprocesses: a restarted run reuses its first run's executables (halves the CLI tests' time).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", tempfile.mkdtemp(prefix="pixelflow_jax_cache_"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")
FIXTURE_NAMES = ("c2i_tiny", "t2i_tiny")


def fixture_dir(name: str) -> str:
    return os.path.join(FIXTURES, name)


def run_converter(*args: str) -> subprocess.CompletedProcess:
    """Runs convert_torch_ckpt.py as a user would, returning its exit code and output."""
    return subprocess.run([sys.executable, os.path.join(REPO, "convert_torch_ckpt.py"), *args],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


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
