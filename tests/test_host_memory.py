"""The CPU host-memory setting main.py applies (pixelflow_jax/host_memory.py)."""

import ctypes
import ctypes.util

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

    monkeypatch.setattr(host_memory, "_glibc_mallopt", mallopt_must_not_be_looked_up)
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(host_memory.jax, "default_backend", lambda: backend)
        assert host_memory.reuse_freed_buffers_on_cpu() is False


def test_a_c_library_without_mallopt_is_a_no_op(monkeypatch):
    monkeypatch.setattr(host_memory, "_glibc_mallopt", lambda: None)
    assert host_memory.reuse_freed_buffers_on_cpu() is False


def test_a_c_library_that_cannot_be_found_or_lacks_mallopt_is_a_no_op(monkeypatch):
    """musl without ldconfig finds no "c"; macOS's libc has no mallopt: the setting is left off, and
    main.py runs on (an AttributeError or a lookup in the program itself would not)."""
    monkeypatch.setattr(host_memory.ctypes.util, "find_library", lambda name: None)
    assert host_memory.reuse_freed_buffers_on_cpu() is False
    monkeypatch.setattr(host_memory.ctypes.util, "find_library", lambda name: "libc.dylib")
    monkeypatch.setattr(host_memory.ctypes, "CDLL", lambda name: object())  # a library without mallopt
    assert host_memory.reuse_freed_buffers_on_cpu() is False


class _MallInfo2(ctypes.Structure):
    """glibc's struct mallinfo2 (malloc.h, glibc 2.33+): what malloc holds, in bytes."""
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def test_buffers_below_the_mmap_threshold_come_from_the_heap_and_stay_after_free():
    """What the setting is for, read from glibc itself: mallopt accepts any parameter number, so a
    swapped or wrong constant still returned True while the buffers kept being mmap'd and trimmed."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.mallinfo2.restype = _MallInfo2
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = (ctypes.c_void_p, [ctypes.c_size_t],
                                                                     [ctypes.c_void_p])
    assert host_memory.reuse_freed_buffers_on_cpu()

    def mmapped_and_kept(size):  # (whether malloc mmap'd it, whether the heap kept it after free); not touched
        before = libc.mallinfo2()
        buffer = libc.malloc(size)
        assert buffer, f"malloc({size}) failed"
        during = libc.mallinfo2()
        libc.free(buffer)
        return during.hblkhd - before.hblkhd >= size, libc.mallinfo2().arena >= during.arena

    assert mmapped_and_kept(64 << 20) == (False, True)  # a step's buffers: reused, not zero-filled again
    assert mmapped_and_kept(host_memory.MMAP_THRESHOLD * 3 // 2)[0]  # above the threshold: mmap'd as before
