"""Where the time goes: run a function under `jax.profiler` and total the device's ops by name.

    from profile_ops import profile_top_ops
    report = profile_top_ops(lambda: step(state, batch), top=30)

The report is small JSON (it travels back from the GPU machine, the raw trace does not): the wall
time of the traced calls, the device's busy time (the union of its op intervals; wall minus busy is
host overhead and launch gaps), and the ops with the most total time. On a GPU the ops are the
device plane's "XLA Ops" line (fusions, cuBLAS/cuDNN custom calls, Triton kernels); on a CPU (dry
runs) they are the XLA thunks of the host's worker threads, which is enough to check the script.
"""

from __future__ import annotations

import collections
import glob
import json
import os
import tempfile
import time

import jax
from jax.profiler import ProfileData


def profile_top_ops(fn, calls: int = 2, top: int = 30) -> dict:
    """Calls `fn` (already compiled and warm) `calls` times under a trace; per call averages."""
    with tempfile.TemporaryDirectory(prefix="pixelflow_profile_") as trace_dir:
        jax.profiler.start_trace(trace_dir)
        start = time.perf_counter()
        try:
            for _ in range(calls):
                jax.block_until_ready(fn())
        finally:
            wall = time.perf_counter() - start
            jax.profiler.stop_trace()
        traces = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        if not traces:
            raise RuntimeError(f"jax.profiler wrote no .xplane.pb under {trace_dir}")
        data = ProfileData.from_file(max(traces, key=os.path.getmtime))
    return summarise(data, wall, calls, top)


def print_profiles(**programs) -> None:
    """Prints one JSON line per `name=(fn, calls)`: call it after the timings are printed, so that
    a profiler that fails (no CUPTI, say) or runs out of time costs only the profile. Each line
    names the XLA_FLAGS it ran under: with XLA's command buffers on (a GPU's default) most of the
    time is in ops named command_buffer_N, the kernels they ran hidden."""
    for name, (fn, calls) in programs.items():
        try:
            report = profile_top_ops(fn, calls=calls)
        except Exception as error:  # the timings are already out: report and go on
            report = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''}"}
        print(json.dumps({"profile": name, "xla_flags": os.environ.get("XLA_FLAGS", ""), **report}), flush=True)


def _op_events(data: ProfileData):
    """(where, [(op, detail, start_ns, duration_ns)]): the device planes' ops, else the host's.

    An op is named by its `hlo_op` stat where the event has one (a cuDNN or Triton call may launch
    several kernels), else by the event's name; the detail is the JAX source op (`tf_op`) or the
    kernel's name, so that a fusion's number can be traced back to the model."""
    device = [plane for plane in data.planes if plane.name.startswith("/device:")]
    lines = []
    for plane in device:
        # "XLA Ops", where the profiler derived it, holds every kernel once; a raw trace has the
        # stream lines (several may share a name) with the kernels' hlo_op stats.
        derived = [line for line in plane.lines if line.name == "XLA Ops"]
        lines += derived or [line for line in plane.lines if line.name not in ("XLA Modules", "Steps", "Source")]
    if not device:  # CPU: XLA's thunks on the host's threads carry an hlo_op stat
        lines = [line for plane in data.planes if plane.name == "/host:CPU" for line in plane.lines]
    events = []
    for line in lines:
        for event in line.events:
            stats = dict(event.stats)
            if not device and "hlo_op" not in stats:
                continue  # Python, thread-pool bookkeeping
            op = str(stats.get("hlo_op", event.name))
            detail = str(stats.get("tf_op", stats.get("long_name", event.name)))
            events.append((op, detail, event.start_ns, event.duration_ns))
    return ("device" if device else "host"), events


def _busy_ns(events) -> float:
    """Length of the union of the op intervals: time with at least one op running."""
    busy, end = 0.0, float("-inf")
    for _, _, start, duration in sorted(events, key=lambda e: e[2]):
        stop = start + duration
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    return busy


def summarise(data: ProfileData, wall_s: float, calls: int, top: int) -> dict:
    kind, events = _op_events(data)
    totals, counts, details = collections.Counter(), collections.Counter(), {}
    for op, detail, _, duration in events:
        totals[op] += duration
        counts[op] += 1
        details.setdefault(op, detail)
    op_total = sum(totals.values())
    busy = _busy_ns(events)
    return dict(
        ops_from=kind, calls=calls, wall_ms_per_call=wall_s * 1e3 / calls,
        busy_ms_per_call=busy / 1e6 / calls, idle_share=max(0.0, 1 - busy / 1e9 / wall_s) if wall_s else None,
        distinct_ops=len(totals),
        top_ops=[dict(name=name, detail=details[name][:300], ms_per_call=ns / 1e6 / calls,
                      launches_per_call=counts[name] / calls, share_of_op_time=ns / op_total)
                 for name, ns in totals.most_common(top)],
    )
