"""What the bench scripts share: the median time of a call, and argument types that refuse a bad
value as a usage error before anything compiles (a --repeats=0 failed after minutes of compiling)."""

from __future__ import annotations

import argparse
import statistics
import time

import jax


def median_seconds(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls of fn (compiled and warmed up by the caller)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def whole_number(minimum: int):
    """An argparse type: a whole number >= minimum."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number >= {minimum}, got {text!r}")
        return value

    return parse


positive_int, non_negative_int = whole_number(1), whole_number(0)
