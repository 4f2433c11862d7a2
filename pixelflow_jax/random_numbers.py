"""The random numbers a seed stands for, named here rather than left to jax's settings.

Two of jax's settings decide which numbers a key gives: the generator (`jax_default_prng_impl`,
JAX_DEFAULT_PRNG_IMPL) and threefry's partitionable form (`jax_threefry_partitionable`,
JAX_THREEFRY_PARTITIONABLE; jax's default since 0.5, whose changelog advises turning it off to keep
the numbers of earlier versions). Under another value of either, every seed drew other noise, other
initial weights and other training draws, and nothing recorded with a job said so: a sampling job
rerun there mixed two sets of noise in one samples.npz, and a run resumed there left its
uninterrupted losses. A sampling job's keys are made, and its noise drawn, and a training run runs,
under jax's defaults pinned."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import jax

GENERATOR = "threefry2x32"


def key(seed: int) -> jax.Array:
    """A key of GENERATOR for `seed`, whatever jax's default generator."""
    return jax.random.key(seed, impl=GENERATOR)


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """Runs its body with GENERATOR as jax's default and threefry's partitionable form (both are read
    when a function is traced, and both are part of jax.jit's cache key)."""
    with jax.default_prng_impl(GENERATOR), jax.threefry_partitionable(True):
        yield
