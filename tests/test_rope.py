"""apply_rope against a float64 rotation of interleaved pairs, forward and backward.

The release's tables are checked in test_model_parity.py; here the rotation itself."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from pixelflow_jax.kernels.attention import compiling_for
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


# The rotation is traced in one of two views by platform (rope._rotate): for a TPU the tables are
# tiled over the heads' channels side by side; elsewhere (a GPU here) they multiply a
# (..., heads, head_dim) view.
PLATFORMS = ("gpu", "tpu")


@pytest.fixture(scope="module")
def tables():
    return rope_tables(GRID, HEAD_DIM)


def traced_for(platform: str, fn):
    """fn jitted afresh (jit keeps traces per function, not per compiling_for) and traced for platform."""
    def run(*args):
        with compiling_for(platform):
            return jax.jit(lambda *a: fn(*a))(*args)
    return run


@pytest.mark.parametrize("platform", PLATFORMS)
def test_rope_rotates_each_interleaved_pair_by_its_tokens_angle(tables, platform):
    cos, sin = tables
    x = np.random.default_rng(0).standard_normal((2, GRID * GRID, HEADS, HEAD_DIM)).astype(np.float32)
    out = traced_for(platform, apply_rope)(x, cos, sin)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, rotated_pairs(x, cos, sin), rtol=0, atol=2e-6)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_ropes_gradient_is_the_rotation_back_rounded_to_bfloat16_once(tables, platform):
    """The cotangent of a bf16 input is the float32 rotation by minus the angle, rounded once.
    Differentiated through, the shifts of bf16 channels rounded each of its terms to bf16 before
    their sum: 16% of these values were a bf16 unit or two off."""
    cos, sin = tables
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, GRID * GRID, HEADS, HEAD_DIM)), jnp.bfloat16)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
    (gradient,) = traced_for(platform, lambda x, g: jax.vjp(lambda x: apply_rope(x, cos, sin), x)[1](g))(x, cotangent)
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


def multiplied_shapes(platform: str, tables) -> set[tuple[int, ...]]:
    """The shapes of every product in the rotation's forward and backward, traced for platform."""
    cos, sin = tables
    x = jnp.zeros((2, GRID * GRID, HEADS, HEAD_DIM), jnp.bfloat16)
    with compiling_for(platform):
        jaxpr = jax.make_jaxpr(jax.grad(lambda x: apply_rope(x, cos, sin).astype(jnp.float32).sum()))(x)
    return {var.aval.shape for eqn in jaxpr.jaxpr.eqns if eqn.primitive.name == "mul" for var in eqn.outvars}


def test_rope_multiplies_a_tpus_channels_side_by_side_and_elsewhere_each_heads():
    """On a TPU a (..., heads, 72) view of q and k is a relayout copy each way (72 channels on 128
    lanes); on a GPU the tables tiled to all heads' channels were read from HBM each layer and the
    gradient's rounding to bf16 was dropped (bench/RESULTS.md): each platform multiplies its view."""
    tables = rope_tables(GRID, HEAD_DIM)
    channels, per_head = (2, GRID * GRID, HEADS * HEAD_DIM), (2, GRID * GRID, HEADS, HEAD_DIM)
    assert multiplied_shapes("tpu", tables) == {channels}
    assert multiplied_shapes("gpu", tables) == {per_head}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_ropes_two_views_agree_bit_for_bit(tables, dtype):
    """The view changes the layout of the work, not its numbers: outputs and gradients equal."""
    cos, sin = tables
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((2, GRID * GRID, HEADS, HEAD_DIM)), dtype)
    cotangent = jnp.asarray(rng.standard_normal(x.shape), dtype)

    def forward_and_back(x, g):
        out, pull = jax.vjp(lambda x: apply_rope(x, cos, sin), x)
        return out, pull(g)[0]

    tpu, gpu = (traced_for(platform, forward_and_back)(x, cotangent) for platform in ("tpu", "gpu"))
    for tpu_part, gpu_part in zip(tpu, gpu):
        np.testing.assert_array_equal(tpu_part, gpu_part)


@pytest.mark.parametrize("head_dim", [6, 10])
def test_rope_tables_refuse_a_head_dim_not_divisible_by_4(head_dim):
    """Each head's channels split into a column half and a row half of pairs: with head_dim 6 the
    tables would be 8 channels wide for 6."""
    with pytest.raises(ValueError, match=f"2D RoPE needs head_dim divisible by 4, got {head_dim}"):
        rope_tables(GRID, head_dim)


def test_rope_tables_are_the_releases_float32_math_on_a_large_grid():
    """The release computes its 2D RoPE in torch float32. The goldens' grids (16 at most) cannot tell
    float64 math from it; on a 128 x 128 grid float64 angles move cos and sin by up to 8e-6, where
    float32's differ by 4e-6 at most (numpy's and torch's pow round 4 of the 18 frequencies apart)."""
    import torch

    grid = 128
    axis_dim = HEAD_DIM // 2
    freqs = 1.0 / (10000.0 ** (torch.arange(0, axis_dim, 2, dtype=torch.float32) / axis_dim))
    positions = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(positions, positions, indexing="ij")
    angle = torch.cat([torch.outer(c.reshape(-1), freqs).repeat_interleave(2, dim=1) for c in (cols, rows)], dim=1)
    cos, sin = rope_tables(grid, HEAD_DIM)
    np.testing.assert_allclose(cos, angle.cos().numpy(), rtol=0, atol=5e-6)
    np.testing.assert_allclose(sin, angle.sin().numpy(), rtol=0, atol=5e-6)


def rounded_to_bfloat16_from(jaxpr) -> set[str]:
    """The primitives whose outputs a jaxpr (and every jaxpr inside it) converts to bf16."""
    producers, found = {}, set()
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            producers[var] = eqn.primitive.name
        if eqn.primitive.name == "convert_element_type" and eqn.params["new_dtype"] == jnp.bfloat16:
            found.add(producers.get(eqn.invars[0], "input"))
        for inner in jax.extend.core.jaxprs_in_params(eqn.params):
            found |= rounded_to_bfloat16_from(inner)
    return found


def test_ropes_gradient_is_rounded_to_bfloat16_from_a_sum_in_xs_shape():
    """The backward pass (the tangent's transpose) sums the rotated cotangent in x's (..., H, D)
    shape before its rounding to bf16. Summed in the flat channels and reshaped to x's shape, the
    next layer's reshape back to the flat channels cancelled it, and XLA dropped the rounding as
    excess precision: on an H200, q's and k's gradients passed on in float32, +1.5 GB a training
    step of batch 8 (bench/gpu_compile.py)."""
    cos, sin = rope_tables(GRID, HEAD_DIM)
    x = jnp.zeros((2, GRID * GRID, HEADS, HEAD_DIM), jnp.bfloat16)
    with compiling_for("gpu"):
        jaxpr = jax.make_jaxpr(lambda x, g: jax.vjp(lambda x: apply_rope(x, cos, sin), x)[1](g))(x, x)
    assert rounded_to_bfloat16_from(jaxpr.jaxpr) == {"add", "add_any"}


def test_a_backward_pass_traced_for_one_platform_is_not_reused_for_another():
    """jax.checkpoint keeps a trace per argument types: with the platform read inside the
    checkpointed tangent, a process tracing for a TPU and then a GPU (this suite, bench/gpu_compile.py)
    got the TPU's flat channel layout in the GPU's backward pass, and the other way round. Shapes of
    this test's own, so that no other test's trace is in jax's cache first."""
    cos, sin = rope_tables(4, 8)
    x = jnp.zeros((1, 16, 5, 8), jnp.bfloat16)
    backward = {}
    for platform in ("tpu", "gpu", "tpu"):
        with compiling_for(platform):
            jaxpr = jax.make_jaxpr(lambda x, g: jax.vjp(lambda x: apply_rope(x, cos, sin), x)[1](g))(x, x)
        backward.setdefault(platform, []).append(rounded_to_bfloat16_from(jaxpr.jaxpr))
    assert backward["gpu"] == [{"add", "add_any"}]  # as traced for a GPU alone (the test above)
    assert backward["tpu"][0] == backward["tpu"][1] != backward["gpu"][0]
