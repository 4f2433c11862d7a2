"""The CPU host-memory setting main.py applies (pixelflow_jax/host_memory.py)."""

import ctypes

from pixelflow_jax import host_memory


def test_the_setting_takes_on_a_cpu_backend():
    # This suite runs on Linux with glibc (CI too), where mallopt accepts both thresholds.
    assert host_memory.reuse_freed_buffers_on_cpu() is True


def test_thresholds_fit_mallopts_int():
    # ctypes passes a Python int as a C int without a range check: 2 GiB would arrive negative.
    for value in (host_memory.MMAP_THRESHOLD, host_memory.TRIM_THRESHOLD):
        assert ctypes.c_int(value).value == value


def test_accelerator_backends_are_left_alone(monkeypatch):
    def mallopt_must_not_be_looked_up():
        raise AssertionError("mallopt was reached on an accelerator backend")

    monkeypatch.setattr(host_memory.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(host_memory, "_glibc_mallopt", mallopt_must_not_be_looked_up)
    assert host_memory.reuse_freed_buffers_on_cpu() is False


def test_a_c_library_without_mallopt_is_a_no_op(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: None)
    assert host_memory.reuse_freed_buffers_on_cpu() is False
