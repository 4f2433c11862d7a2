"""The GPU benchmarks' own plumbing, checked on the CPU: a GPU session is rare and short (15
minutes, one call), so a script that breaks there costs the whole measurement."""

import argparse
import json
import os
import re
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

from profile_ops import profile_top_ops  # noqa: E402


def test_profile_top_ops_totals_the_traced_ops():
    matmul_then_tanh = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
    a = jnp.ones((256, 256))
    matmul_then_tanh(a).block_until_ready()
    report = profile_top_ops(lambda: matmul_then_tanh(a), calls=3, top=5)
    assert report["ops_from"] == ("host" if jax.default_backend() == "cpu" else "device") and report["calls"] == 3
    ops = report["top_ops"]
    assert 1 <= len(ops) <= 5 and report["distinct_ops"] >= len(ops)
    assert all(op["launches_per_call"] >= 1 and op["ms_per_call"] > 0 for op in ops)
    assert ops == sorted(ops, key=lambda op: -op["ms_per_call"])
    assert 0 < sum(op["share_of_op_time"] for op in ops) <= 1 + 1e-9
    assert 0 < report["busy_ms_per_call"] <= report["wall_ms_per_call"]
    json.dumps(report)  # it travels back from the GPU machine as JSON


def test_gpu_compile_reads_the_compilers_reports():
    """bench/gpu_compile.py compiles for an H200 on a CPU (with jax's CUDA plugin, not installed in
    the test environment): what it reads from XLA's thunk list and ptxas -v is checked on lines in
    their formats, and the per-SM occupancy on hand-computed cases (65536 registers, allocated per
    warp in units of 256; 233472 bytes of shared memory, 1 KiB reserved per block)."""
    from gpu_compile import blocks_per_sm, parse_ptxas_report, parse_thunk_sequence

    thunks = ("001: kCustomKernel [source       | next=002 (1)] pixelflow_flash_forward grid: [32, 8, 16] "
              "threads: [128, 1, 1]  shared_memory: 81920 bytes\n"
              "002: kCustomKernel [prev=001 (1) | sink        ] input_reduce_fusion grid: [65536, 1, 1] "
              "threads: [256, 1, 1]  shared_memory: 0 bytes\n")
    assert parse_thunk_sequence(thunks) == [
        dict(kernel="pixelflow_flash_forward", grid=[32, 8, 16], threads=[128, 1, 1], shared_memory=81920),
        dict(kernel="input_reduce_fusion", grid=[65536, 1, 1], threads=[256, 1, 1], shared_memory=0)]
    report = ("ptxas info    : 0 bytes gmem\n"
              "ptxas info    : Compiling entry function 'pixelflow_flash_backward_dq' for 'sm_90a'\n"
              "ptxas info    : Function properties for pixelflow_flash_backward_dq\n"
              "    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads\n"
              "ptxas info    : Used 134 registers, used 1 barriers\n"
              "ptxas info    : Compiling entry function 'fusion_1' for 'sm_90a'\n"
              "ptxas info    : Function properties for fusion_1\n"
              "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
              "ptxas info    : Used 10 registers, used 0 barriers\n")
    assert parse_ptxas_report(report) == {
        "pixelflow_flash_backward_dq": dict(registers=134, spill_stores=8, spill_loads=12),
        "fusion_1": dict(registers=10, spill_stores=0, spill_loads=0)}
    assert blocks_per_sm(threads=128, registers=236, shared_memory=81920) == 2  # 4 warps x 7680 registers
    assert blocks_per_sm(threads=256, registers=126, shared_memory=143360) == 1  # shared memory bounds it
    assert blocks_per_sm(threads=128, registers=128, shared_memory=30720) == 4  # registers bound it (7 by memory)
    assert blocks_per_sm(threads=32, registers=10, shared_memory=0) == 32  # the SM's block limit


def test_gpu_compile_refuses_a_bad_list_before_compiling():
    """Its lists (--batch=32,48 --remat=dots,full) are checked item by item as usage errors: a typo
    in the last item surfaced after minutes of compiling the first ones."""
    from gpu_compile import comma_separated, one_of
    from harness import positive_int

    assert comma_separated(positive_int)("32,48") == [32, 48]
    assert comma_separated(one_of(("dots", "full")))("dots") == ["dots"]
    with pytest.raises(argparse.ArgumentTypeError, match="must be one of dots, full, got 'dotz'"):
        comma_separated(one_of(("dots", "full")))("full,dotz")
    result = subprocess.run([sys.executable, "bench/gpu_compile.py", "train", "--batch=32,0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "argument --batch: must be a whole number >= 1, got '0'" in result.stderr


def test_a_bad_argument_is_a_usage_error_before_anything_compiles():
    """--repeats=0 failed with a StatisticsError after compiling the model; --dtype=fp16 and
    --batch=0 with tracebacks."""
    from harness import non_negative_int, positive_int

    assert positive_int("3") == 3 and non_negative_int("0") == 0
    for parse, text in ((positive_int, "0"), (positive_int, "-1"), (positive_int, "2.5"), (non_negative_int, "-1")):
        with pytest.raises(argparse.ArgumentTypeError, match=f"must be a whole number >= \\d, got '{re.escape(text)}'"):
            parse(text)
    for script, argument, message in (("train_speed.py", "--dtype=fp16", "argument --dtype: invalid choice: 'fp16'"),
                                      ("sample_speed.py", "--cfg=0.5", "argument --cfg: must be >= 1")):
        result = subprocess.run([sys.executable, f"bench/{script}", "--preset=tiny", argument], cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_the_gpu_machine_site_hides_its_packages_as_if_absent():
    """find_spec raised for a hidden package where a machine without it answers None (etils asks it
    about tensorflow, and every read of a persistent compilation cache warned and missed), and
    importlib.metadata still found the hidden distributions."""
    probe = ("import importlib.util\n"
             "assert importlib.util.find_spec('tensorflow') is None\n"
             "assert importlib.util.find_spec('numpy') is not None\n"
             "for name in ('grain', 'gcsfs.core', 'tensorboardX'):\n"
             "    try:\n"
             "        __import__(name)\n"
             "    except ModuleNotFoundError:\n"
             "        continue\n"
             "    raise AssertionError(name)\n"
             "import importlib.metadata\n"
             "for name in ('array-record', 'tensorflow_datasets', 'gcsfs'):\n"
             "    try:\n"
             "        importlib.metadata.version(name)\n"
             "    except importlib.metadata.PackageNotFoundError:\n"
             "        continue\n"
             "    raise AssertionError(name)\n"
             "assert importlib.metadata.version('jax')\n"
             "import jax, flax\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tests", "gpu_machine_site"), JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
@pytest.mark.timed
def test_gpu_session_script_runs_every_step_in_a_cpu_dry_run(tmp_path):
    out = tmp_path / "out"
    # As on the GPU machine: one device, and no grain, ml_collections, TFDS, tensorboardX, gradio,
    # diffusers or gcsfs (tests/gpu_machine_site). The test session's compilation cache is kept.
    # PYTHON: the steps run on this interpreter, not on whichever python3 is first on PATH (a
    # venv of the GPU machine's versions, not activated, checked the script on another jax).
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), JAX_PLATFORMS="cpu", PYTHON=sys.executable,
               XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=os.path.join(ROOT, "tests", "gpu_machine_site"))
    subprocess.run(["bash", "bench/gpu_session.sh"], cwd=ROOT, env=env, check=True, timeout=600,
                   capture_output=True)
    summary = (out / "summary.txt").read_text().splitlines()
    steps = {line.split()[0]: line for line in summary}
    assert set(steps) == {"env", "attention", "train_fast", "sample", "release", "train_pallas",
                          "attention_masked", "sweep"}, summary
    assert steps["train_pallas"].startswith("train_pallas skipped: the same backend as train_fast")  # on a CPU
    failed = [line for name, line in steps.items()
              if name not in ("release", "train_pallas") and " rc=0 " not in line]
    assert not failed, (out / "log.txt").read_text()[-5000:]
    assert sorted(os.listdir(out)) == ["log.txt", "summary.txt"]  # the tool returns at most 8 files
    log = (out / "log.txt").read_text()
    assert f"\n{jax.__version__} {flax.__version__} [CpuDevice(id=0)]\n" in log, log[:2000]  # the env step
    for result in ('"images_per_s"', '"seconds_per_image"', '"forward_backward_tflops"', '"top_ops"',
                   '"last_stage_forward"', '"settings"', '"key_mask": true'):
        assert result in log, result
