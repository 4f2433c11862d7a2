"""What the backward pass keeps of the blocks (the activation memory of training), per model.remat.

A residual is an array that jax.vjp keeps from the forward pass for the backward pass: the leaves
of the function it returns. Sizes here are tiny; the XL plan's numbers are in bench/RESULTS.md."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelflow_jax.config import ModelConfig
from pixelflow_jax.kernels.attention import ATTENTION_FORWARD_PRIMITIVES, interpret_kernels
from pixelflow_jax.model import FeedForward, PixelFlow, RMSNorm, gelu, keep_matmul_and_attention_outputs

BATCH, SIDE, HEADS, HEAD_DIM = 2, 16, 2, 16
TOKENS, WIDTH = (SIDE // 4) ** 2, HEADS * HEAD_DIM  # 16 tokens of 32 channels; the MLP's hidden is 128


def residuals(fn, *args) -> list[jax.ShapeDtypeStruct]:
    """The shapes and dtypes of what jax.vjp(fn, *args) keeps (traced, not run)."""
    return jax.eval_shape(lambda *args: jax.tree.leaves(jax.vjp(fn, *args)[1]), *args)


def count(kept, shape, dtype=None) -> int:
    return sum(r.shape == shape and (dtype is None or r.dtype == dtype) for r in kept)


def tiny_config(**overrides) -> ModelConfig:
    return ModelConfig(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, depth=1, num_classes=10,
                       **overrides)


def model_residuals(cfg: ModelConfig) -> list[jax.ShapeDtypeStruct]:
    graphdef, params = nnx.split(nnx.eval_shape(lambda: PixelFlow(cfg, rngs=nnx.Rngs(0))))  # shapes only
    images = jnp.zeros((BATCH, SIDE, SIDE, 3))
    run = lambda p: nnx.merge(graphdef, p)(images, jnp.array([10.0, 900.0]), class_labels=jnp.array([1, 10]))
    return residuals(run, params)


def test_an_rms_norm_keeps_its_float32_input_once_and_its_gradients_are_jnp_squares_bit_for_bit():
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: RMSNorm(WIDTH, tiny_config())))
    weight = jax.random.normal(jax.random.key(0), (WIDTH,))
    norm = lambda weight, x: nnx.merge(graphdef, {"weight": nnx.Param(weight)})(x)
    x = jax.random.normal(jax.random.key(1), (BATCH, TOKENS, WIDTH), jnp.bfloat16)
    # x in float32 and x / rms(x) (the weight's gradient); jnp.square's derivative kept 2 * x as well
    assert count(residuals(norm, weight, x), x.shape, jnp.float32) == 2

    def with_jnp_square(weight, x):
        xf = x.astype(jnp.float32)
        return (weight * (xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + 1e-6))).astype(x.dtype)

    cotangent = jax.random.normal(jax.random.key(2), x.shape, jnp.bfloat16)
    gradients = jax.jit(lambda fn, weight, x: jax.vjp(fn, weight, x)[1](cotangent), static_argnums=0)
    for ours, reference in zip(gradients(norm, weight, x), gradients(with_jnp_square, weight, x)):
        np.testing.assert_array_equal(ours, reference)


def test_an_rms_norm_computes_its_inverse_rms_apart_and_its_values_are_the_formulas_bit_for_bit():
    """The barrier over 1 / rms(x) (one number per token) keeps XLA from fusing the reduction with
    the scaling, which on a GPU wrote the norm's output in float32 for RoPE to read back."""
    norm = RMSNorm(WIDTH, tiny_config())
    x = jax.random.normal(jax.random.key(1), (BATCH, TOKENS, WIDTH), jnp.bfloat16)
    barriers = [eqn for eqn in jax.make_jaxpr(norm)(x).jaxpr.eqns if eqn.primitive.name == "optimization_barrier"]
    assert [[v.aval.shape for v in eqn.invars] for eqn in barriers] == [[(BATCH, TOKENS, 1)]]
    xf = x.astype(jnp.float32)
    formula = (xf * jax.lax.rsqrt((xf * xf).mean(-1, keepdims=True) + 1e-6)).astype(x.dtype)
    np.testing.assert_array_equal(jax.jit(norm)(x), formula)


def gelu_derivative_float64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x**2)


def test_the_mlp_keeps_its_hidden_layer_twice_and_gelus_gradient_is_the_derivative_rounded_once():
    graphdef, params = nnx.split(nnx.eval_shape(lambda: FeedForward(tiny_config(dtype="bfloat16"), nnx.Rngs(0))))
    mlp = lambda params, x: nnx.merge(graphdef, params)(x)
    x = jnp.zeros((BATCH, TOKENS, WIDTH), jnp.bfloat16)
    # fc1's output (GELU's input) and GELU's output (fc2's input); jax.nn.gelu kept 4 more
    assert count(residuals(mlp, params, x), (BATCH, TOKENS, 4 * WIDTH)) == 2

    gradient = jax.jit(lambda hidden, cotangent: jax.vjp(gelu, hidden)[1](cotangent)[0])
    hidden = 3 * jax.random.normal(jax.random.key(2), (BATCH, TOKENS, 4 * WIDTH))
    cotangent = jax.random.normal(jax.random.key(3), hidden.shape)
    # float32 rounding of the formula's terms: 1 - t^2 cancels for large |x|, 1 + t for negative x,
    # so the error scales with the cotangent, not with the (there tiny) gradient
    float32_error = lambda cotangent: 1e-5 * np.abs(np.asarray(cotangent, np.float64))
    expected = np.asarray(cotangent, np.float64) * gelu_derivative_float64(hidden)
    assert np.all(np.abs(gradient(hidden, cotangent) - expected) <= float32_error(cotangent))
    # bf16: that float32 value rounded once (2^-8 relative at most); jax's derivative, taken in bf16
    # steps, is up to ~600 times further off
    hidden, cotangent = hidden.astype(jnp.bfloat16), cotangent.astype(jnp.bfloat16)
    expected = np.asarray(cotangent, np.float64) * gelu_derivative_float64(np.asarray(hidden, np.float32))
    assert gradient(hidden, cotangent).dtype == jnp.bfloat16  # float32: twice the bytes of the 4C-wide layer
    error = np.abs(np.asarray(gradient(hidden, cotangent), np.float64) - expected)
    assert np.all(error <= 2.0**-8 * np.abs(expected) + float32_error(cotangent))
    np.testing.assert_array_equal(jax.jit(gelu)(hidden), jax.nn.gelu(hidden, approximate=True))


def test_gelus_gradient_is_the_derivative_of_its_own_tanh_approximation():
    """Where no term cancels (|x| <= 3) the float32 derivative is within a few float32 units of the
    float64 one; its cubic coefficient off by 5e-6 (0.04472) put it 3e-6 away, which the MLP test's
    1e-5 per unit of cotangent let pass: backward and forward would be two different functions."""
    x = jnp.linspace(-3, 3, 4001, dtype=jnp.float32)
    gradient = jax.jit(jax.vmap(jax.grad(gelu)))(x)
    np.testing.assert_allclose(gradient, gelu_derivative_float64(x), rtol=0, atol=2e-6)


@pytest.mark.parametrize("remat, attention_kept", [("dots_attention", True), ("dots", False)])
def test_dots_attention_keeps_only_bfloat16_matmul_and_attention_outputs(remat, attention_kept):
    with interpret_kernels():
        kept = model_residuals(tiny_config(dtype="bfloat16", attention="pallas_gpu", remat=remat))
    per_layer = [r for r in kept if r.shape[:3] == (1, BATCH, TOKENS)]  # the scan's, stacked over 1 layer
    assert all(r.dtype == jnp.bfloat16 for r in per_layer)
    # the block's input and the outputs of q, k, v, o and fc2; fc1's; the attention kernel's
    assert count(per_layer, (1, BATCH, TOKENS, WIDTH)) == 6
    assert count(per_layer, (1, BATCH, TOKENS, 4 * WIDTH)) == 1
    assert count(per_layer, (1, BATCH, TOKENS, HEADS, HEAD_DIM)) == attention_kept


def test_dots_keeps_no_attention_scores_with_the_xla_backend():
    """'dots' keeps the linear layers' outputs only: the xla backend's attention is batched matmuls,
    whose (B, H, L, L) scores (L^2 per head: the largest array at stage 3) are recomputed."""
    kept = model_residuals(tiny_config(attention="xla", remat="dots"))
    assert kept and not [r.shape for r in kept if r.ndim >= 4 and r.shape[-2:] == (TOKENS, TOKENS)]


def test_dots_attention_keeps_the_cudnn_forward_by_its_primitives_name():
    from jax._src.cudnn import fused_attention_stablehlo  # private: this test notices a rename

    forward = fused_attention_stablehlo._dot_product_attention_fwd_p_wrapper
    assert forward.name in ATTENTION_FORWARD_PRIMITIVES
    assert keep_matmul_and_attention_outputs(forward)


@pytest.mark.parametrize("remat", ["full", "dots", "dots_attention"])
def test_the_blocks_backward_pass_has_no_optimization_barrier(remat):
    """jax.checkpoint's default (prevent_cse=True) puts an optimization barrier over each block's
    inputs, which kept XLA from fusing every layer's slice of the saved rows into its consumers in
    the backward loop: a copy of each instead (bench/RESULTS.md). The lowered step has none but
    the RMSNorms' own, each over one number per token (1 / rms(x), see RMSNorm)."""
    graphdef, params = nnx.split(nnx.eval_shape(lambda: PixelFlow(tiny_config(remat=remat), rngs=nnx.Rngs(0))))
    images = jnp.zeros((BATCH, SIDE, SIDE, 3))

    def loss(params):
        out = nnx.merge(graphdef, params)(images, jnp.array([10.0, 900.0]), class_labels=jnp.array([1, 10]))
        return jnp.mean(jnp.square(out))

    barriers = [line.split("optimization_barrier", 1)[1] for line in
                jax.jit(jax.grad(loss)).lower(params).as_text().splitlines() if "optimization_barrier" in line]
    assert barriers and all(re.fullmatch(rf" %\w+ : tensor<{BATCH}x{TOKENS}x1xf32>", b) for b in barriers), barriers
