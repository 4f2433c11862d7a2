"""apply_rope against a float64 rotation of interleaved pairs, forward and backward.

The release's tables are checked in test_model_parity.py; here the rotation itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelflow_jax.rope import apply_rope, rope_tables

GRID, HEADS, HEAD_DIM = 8, 3, 72  # XL's head size: 72 channels, not a multiple of a TPU's 128 lanes


def rotated_pairs(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """The rotation in float64, pairs made explicit: (a, b) -> (a cos - b sin, b cos + a sin)."""
    x = x.astype(np.float64)
    a, b = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, 0::2], sin[None, :, None, 0::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, b * c + a * s
    return out


@pytest.fixture(scope="module")
def tables():
    return rope_tables(GRID, HEAD_DIM)


def test_rope_rotates_each_interleaved_pair_by_its_tokens_angle(tables):
    cos, sin = tables
    x = np.random.default_rng(0).standard_normal((2, GRID * GRID, HEADS, HEAD_DIM)).astype(np.float32)
    out = jax.jit(apply_rope)(x, cos, sin)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, rotated_pairs(x, cos, sin), rtol=0, atol=2e-6)


def test_ropes_gradient_is_the_rotation_back_rounded_to_bfloat16_once(tables):
    """The cotangent of a bf16 input is the float32 rotation by minus the angle, rounded once.
    Differentiated through, the shifts of bf16 channels rounded each of its terms to bf16 before
    their sum: 16% of these values were a bf16 unit or two off."""
    cos, sin = tables
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, GRID * GRID, HEADS, HEAD_DIM)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
    (gradient,) = jax.jit(lambda x, g: jax.vjp(lambda x: apply_rope(x, cos, sin), x)[1](g))(x, cotangent)
    assert gradient.dtype == jnp.bfloat16
    expected = rotated_pairs(np.asarray(cotangent, np.float32), cos, -sin).astype(np.float32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(gradient, expected)


def test_rope_makes_no_axis_of_pairs_for_a_tpu_to_lay_out_over_its_lanes(tables):
    """A trailing axis of 2 (the pairs) is padded to 128 lanes on a TPU, and XLA relaid out q and k
    for it several times a layer (bench/RESULTS.md): the rotation shifts the channels instead."""
    cos, sin = tables
    x = jnp.zeros((2, GRID * GRID, HEADS, HEAD_DIM), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(jax.grad(lambda x: apply_rope(x, cos, sin).astype(jnp.float32).sum()))(x)
    shapes = [var.aval.shape for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars]
    assert shapes and not [shape for shape in shapes if shape and shape[-1] == 2]
