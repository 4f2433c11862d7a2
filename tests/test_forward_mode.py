"""Forward-mode differentiation (jax.jvp) of the model, and reverse mode as it was.

GELU and RoPE have jvp rules (jax.custom_jvp); reverse mode transposes them. Until 2026-12-02 they
were jax.custom_vjp functions, which jax.jvp refuses: their backward passes are kept below
(CUSTOM_VJP) as the reference reverse mode must still equal bit for bit, and keep no more for."""

import contextlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixelflow_jax import model as model_module
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.kernels import attention as attention_module
from pixelflow_jax.kernels.attention import compiling_for, interpret_kernels
from pixelflow_jax.model import PixelFlow, gelu
from pixelflow_jax.rope import _rotate, apply_rope, rope_tables
from test_rope import rotated_pairs

BATCH, SIDE, TEXT_TOKENS, TEXT_WIDTH = 2, 16, 5, 8


@jax.custom_vjp
def gelu_with_custom_vjp(x):
    return jax.nn.gelu(x, approximate=True)


def _gelu_backward(x, cotangent):
    xf = x.astype(jnp.float32)
    slope_of_inner = math.sqrt(2 / math.pi) * (1 + 3 * 0.044715 * xf * xf)
    t = jnp.tanh(math.sqrt(2 / math.pi) * (xf + 0.044715 * xf * xf * xf))
    derivative = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * slope_of_inner
    return ((cotangent.astype(jnp.float32) * derivative).astype(x.dtype),)


gelu_with_custom_vjp.defvjp(lambda x: (gelu_with_custom_vjp(x), x), _gelu_backward)


@jax.custom_vjp
def apply_rope_with_custom_vjp(x, cos, sin):
    return _rotate(x, cos, sin)


apply_rope_with_custom_vjp.defvjp(lambda x, cos, sin: (_rotate(x, cos, sin), (cos, sin)),
                                  lambda tables, cotangent: (_rotate(cotangent, tables[0], -tables[1]), None, None))

CUSTOM_VJP = {"gelu": gelu_with_custom_vjp, "apply_rope": apply_rope_with_custom_vjp}


def tiny_model(text: bool, **overrides):
    """(graphdef, params, inputs) of a 2-layer model with every parameter random (the release's zero
    initialisations of adaLN and the output layer would hide the blocks from the gradients)."""
    cfg = ModelConfig(num_attention_heads=2, attention_head_dim=8, depth=2, num_classes=0 if text else 10,
                      cross_attention_dim=TEXT_WIDTH if text else 0, **{"attention": "xla", **overrides})
    graphdef, params = nnx.split(PixelFlow(cfg, rngs=nnx.Rngs(0)))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [0.3 * jax.random.normal(key, leaf.shape, leaf.dtype)
                                       for key, leaf in zip(keys, leaves)])
    rng = np.random.default_rng(2)
    inputs = {"images": jnp.asarray(rng.standard_normal((BATCH, SIDE, SIDE, 3)), jnp.float32)}
    if text:
        inputs["encoder_hidden_states"] = jnp.asarray(rng.standard_normal((BATCH, TEXT_TOKENS, TEXT_WIDTH)),
                                                      jnp.float32)
    return graphdef, params, inputs


def velocity_of(graphdef, text: bool):
    """(params, inputs) -> the model's velocity at fixed timesteps (and class labels)."""
    conditions = {} if text else {"class_labels": jnp.array([3, 10])}
    return lambda params, inputs: nnx.merge(graphdef, params)(timesteps=jnp.array([10.0, 900.0]),
                                                               **inputs, **conditions)


def gradients(graphdef, params, inputs, text: bool):
    velocity = velocity_of(graphdef, text)
    loss = lambda params, inputs: jnp.mean(jnp.square(velocity(params, inputs)))
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, inputs)


def residuals(graphdef, params, inputs, text: bool) -> list[tuple]:
    """The shapes and dtypes of what jax.vjp of the velocity keeps for the backward pass (traced only)."""
    velocity = velocity_of(graphdef, text)
    kept = jax.eval_shape(lambda *args: jax.tree.leaves(jax.vjp(velocity, *args)[1]), params, inputs)
    return sorted((r.shape, str(r.dtype)) for r in kept)


# Each pair of (model, compute dtype, remat) values in one case or another
@pytest.mark.parametrize("text, dtype, remat", [(False, "float32", "none"), (False, "bfloat16", "dots"),
                                                (True, "float32", "dots_attention"), (True, "bfloat16", "none")])
def test_reverse_mode_is_the_custom_vjps_bit_for_bit_and_keeps_the_same_residuals(text, dtype, remat):
    """Parameter and input gradients equal (==) those of the custom_vjp GELU and RoPE, and the
    backward pass keeps arrays of the same shapes and dtypes (no float32 derivative of the MLP's
    hidden layer, no per-term bf16 rounding of RoPE's)."""
    graphdef, params, inputs = tiny_model(text, dtype=dtype, remat=remat)
    ours = gradients(graphdef, params, inputs, text)
    kept = residuals(graphdef, params, inputs, text)
    with pytest.MonkeyPatch.context() as patch:
        for name, reference in CUSTOM_VJP.items():
            patch.setattr(model_module, name, reference)
        reference = gradients(graphdef, params, inputs, text)
        assert residuals(graphdef, params, inputs, text) == kept
    for path, our_gradient, reference_gradient in zip(jax.tree_util.tree_leaves_with_path(ours),
                                                      jax.tree.leaves(ours), jax.tree.leaves(reference)):
        assert np.asarray(our_gradient).dtype == np.asarray(reference_gradient).dtype
        assert np.array_equal(our_gradient, reference_gradient), jax.tree_util.keystr(path[0])
        assert np.any(our_gradient != 0), jax.tree_util.keystr(path[0])  # every part reaches the loss


def gelu_derivative_float64(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64)
    t = np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))
    return 0.5 * (1 + t) + 0.5 * x * (1 - t**2) * np.sqrt(2 / np.pi) * (1 + 3 * 0.044715 * x**2)


def test_gelus_tangent_is_the_float64_derivative_times_the_tangent_rounded_once():
    """float32: within 1e-5 per unit of tangent of the float64 product (the formula's 1 - t^2 and
    1 + t cancel for large |x|, so the error scales with the tangent, as the gradient's does in
    test_remat). bf16: that float32 product rounded once (2^-8 relative at most)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(3 * rng.standard_normal(4096), jnp.float32)
    tangent = jnp.asarray(rng.standard_normal(4096), jnp.float32)
    values, tangents = jax.jit(lambda x, t: jax.jvp(gelu, (x,), (t,)))(x, tangent)
    np.testing.assert_array_equal(values, jax.jit(gelu)(x))
    expected = np.asarray(tangent, np.float64) * gelu_derivative_float64(x)
    assert np.all(np.abs(tangents - expected) <= 1e-5 * np.abs(np.asarray(tangent, np.float64)))
    x, tangent = x.astype(jnp.bfloat16), tangent.astype(jnp.bfloat16)
    _, tangents = jax.jit(lambda x, t: jax.jvp(gelu, (x,), (t,)))(x, tangent)
    assert tangents.dtype == jnp.bfloat16
    expected = np.asarray(tangent, np.float64) * gelu_derivative_float64(np.asarray(x, np.float32))
    error = np.abs(np.asarray(tangents, np.float64) - expected)
    assert np.all(error <= 2.0**-8 * np.abs(expected) + 1e-5 * np.abs(np.asarray(tangent, np.float64)))


@pytest.mark.parametrize("platform", ["gpu", "tpu"])  # rope._rotate's two views of the channels
def test_ropes_tangent_is_the_float64_rotation_rounded_once(platform):
    """The tangent of a bf16 input is rotated in float32 and rounded once: the float64 rotation
    rounded to float32, then to bf16, bit for bit (shifted in bf16 and then summed in float32 it
    would be too, a rotation being exact per term; it is its transpose, the backward pass, that
    the float32 shifts keep rounded once, tested above)."""
    cos, sin = rope_tables(4, 8)
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((2, 16, 3, 8)), jnp.bfloat16)
    tangent = jnp.asarray(rng.standard_normal(x.shape), jnp.bfloat16)
    with compiling_for(platform):
        values, tangents = jax.jit(lambda x, t: jax.jvp(lambda x: apply_rope(x, cos, sin), (x,), (t,)))(x, tangent)
    np.testing.assert_array_equal(values, _rotate(x, cos, sin))
    assert tangents.dtype == jnp.bfloat16
    expected = rotated_pairs(np.asarray(tangent, np.float32), cos, sin).astype(np.float32).astype(jnp.bfloat16)
    np.testing.assert_array_equal(tangents, expected)


def test_forward_mode_runs_through_the_model_and_agrees_with_reverse_mode_and_differences():
    """jax.jvp of the velocity in the images and timesteps (as MeanFlow or sCM training takes it)
    against reverse mode's Jacobian (float32 sums in another order: within 1e-5 of the largest
    entry, 1e-6 seen) and a central difference of step 0.01 (within 5e-3 of the largest entry, 4.5:
    the float32 difference's rounding and its step-squared error put it 1e-3 away, where a RoPE
    tangent rotating the wrong way is 0.11 off and a GELU one with a wrong sign 3.3); jax.jacfwd;
    a Hessian-vector product forward over reverse against reverse over reverse."""
    graphdef, params, inputs = tiny_model(text=False)
    model, labels = nnx.merge(graphdef, params), jnp.array([3, 10])
    images, timesteps = inputs["images"][:, :8, :8], jnp.array([10.0, 900.0])
    direction = jnp.asarray(np.random.default_rng(5).standard_normal(images.shape), jnp.float32)
    velocity = jax.jit(lambda images, timesteps: model(images, timesteps, class_labels=labels))
    _, tangent = jax.jit(jax.jvp, static_argnums=0)(velocity, (images, timesteps), (direction, jnp.ones(2)))
    by_images, by_timesteps = jax.jit(jax.jacrev(velocity, argnums=(0, 1)))(images, timesteps)
    largest = np.abs(tangent).max()
    by_reverse_mode = jnp.tensordot(by_images, direction, axes=4) + by_timesteps.sum(-1)
    np.testing.assert_allclose(tangent, by_reverse_mode, rtol=0, atol=1e-5 * largest)
    step = 0.01
    difference = (velocity(images + step * direction, timesteps + step)
                  - velocity(images - step * direction, timesteps - step)) / (2 * step)
    np.testing.assert_allclose(tangent, difference, rtol=0, atol=5e-3 * largest)

    forward_jacobian = jax.jit(jax.jacfwd(velocity))(images, timesteps)
    np.testing.assert_allclose(forward_jacobian, by_images, rtol=0, atol=1e-5 * np.abs(by_images).max())
    loss = lambda images: jnp.mean(jnp.square(velocity(images, timesteps)))
    forward_over_reverse = jax.jit(lambda v: jax.jvp(jax.grad(loss), (images,), (v,))[1])(direction)
    reverse_over_reverse = jax.jit(jax.grad(lambda images: jnp.vdot(jax.grad(loss)(images), direction)))(images)
    np.testing.assert_allclose(forward_over_reverse, reverse_over_reverse, rtol=0,
                               atol=1e-5 * np.abs(reverse_over_reverse).max())


def jvp_in_the_images(velocity, params, inputs):
    images = inputs["images"]
    return jax.jvp(lambda images: velocity(params, {**inputs, "images": images}), (images,), (images,))[1]


# How a researcher reaches forward mode. Under jit, jax stages the kernel's tangent and refuses it
# only when XLA lowers the program, outside the model; linearize's tangent is refused when
# evaluated; and a loss holding the jvp, differentiated (MeanFlow's training step), failed in
# reverse mode's words ("Linearization failed to produce known values", "Differentiation rule
# for 'custom_lin' not implemented").
FORWARD_MODE_USES = {
    "jax.jvp": jvp_in_the_images,
    "jax.jvp under jax.jit": lambda velocity, params, inputs: jax.jit(jvp_in_the_images, static_argnums=0)(
        velocity, params, inputs),
    "jax.vmap of jax.jvp": lambda velocity, params, inputs: jax.vmap(jvp_in_the_images, in_axes=(None, None, 0))(
        velocity, params, jax.tree.map(lambda leaf: leaf[None], inputs)),
    "jax.grad of a loss holding jax.jvp, jitted": lambda velocity, params, inputs: jax.jit(jax.grad(
        lambda params: jnp.sum(jvp_in_the_images(velocity, params, inputs))))(params),
    "jax.jvp of jax.grad (forward over reverse)": lambda velocity, params, inputs: jax.jvp(jax.grad(
        lambda images: jnp.sum(velocity(params, {**inputs, "images": images}))), (inputs["images"],),
        (inputs["images"],)),
    "jax.linearize": lambda velocity, params, inputs: jax.linearize(lambda images: velocity(
        params, {**inputs, "images": images}), inputs["images"])[1](inputs["images"]),
}


@pytest.mark.parametrize("use", FORWARD_MODE_USES)
@pytest.mark.parametrize("attention, named", [("pallas_gpu", "'pallas_gpu'"), ("auto", "'auto' (pallas_gpu here)"),
                                              ("cudnn", "'cudnn'")])
def test_forward_mode_with_a_fused_attention_kernel_is_refused_naming_xla(attention, named, use, monkeypatch):
    """The fused attention kernels (cuDNN's, pallas_gpu, splash) are jax.custom_vjp functions, which
    jax.jvp refuses in jax's words ("can't apply forward-mode autodiff (jvp) to a custom_vjp
    function"), naming neither the model nor the fix."""
    if attention == "auto":  # as 'auto' picks cuDNN on a GPU
        monkeypatch.setitem(attention_module.AUTO, "cpu", "pallas_gpu")
    cudnn = attention == "cudnn"  # traced for a GPU, refused before it would run; it takes no float32
    graphdef, params, inputs = tiny_model(text=False, attention=attention, **({"dtype": "bfloat16"} if cudnn else {}))
    velocity = velocity_of(graphdef, text=False)
    # 16 tokens: the Pallas kernel runs (interpreted on the CPU)
    with interpret_kernels(), compiling_for("gpu") if cudnn else contextlib.nullcontext():
        with pytest.raises(ValueError, match=re.escape(
                f"attention backend {named} has a custom backward pass (jax.custom_vjp), which jax cannot "
                "differentiate in forward mode (jax.jvp, jax.jacfwd, jax.hessian): load the model with "
                "attention='xla' (load_model(path, attention='xla'), or ModelConfig(..., attention='xla')), or use "
                "reverse mode (jax.grad, jax.vjp, jax.jacrev)")):
            FORWARD_MODE_USES[use](velocity, params, inputs)


def test_a_fused_kernel_refuses_neither_reverse_mode_nor_a_jvp_at_lengths_it_leaves_to_xla():
    """jax.grad and jax.vjp run through the Pallas kernel (16 tokens: their tracers, jax.linearize's
    kind, are marked reverse mode), and a jvp of 8 x 8 images (4 tokens, off the kernel's grid of
    16) runs the xla attention the kernel falls back to: the xla model's numbers."""
    graphdef, params, inputs = tiny_model(text=False, attention="pallas_gpu")
    velocity = velocity_of(graphdef, text=False)
    with interpret_kernels():
        gradient = jax.jit(jax.grad(lambda params: jnp.sum(velocity(params, inputs))))(params)
        jax.vjp(lambda images: velocity(params, {"images": images}), inputs["images"])
        small = {"images": inputs["images"][:, :8, :8]}
        tangent = jvp_in_the_images(velocity, params, small)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(gradient))
    xla_graphdef, _, _ = tiny_model(text=False)
    np.testing.assert_array_equal(tangent, jvp_in_the_images(velocity_of(xla_graphdef, text=False), params, small))


def test_a_loss_holding_a_jvp_has_the_gradient_of_the_same_loss_in_reverse_mode_only():
    """MeanFlow's and sCM's losses hold the velocity's jvp along (dx/dt, 1) and train through it:
    reverse over forward. Its parameter gradient against the same loss with the jvp computed in
    reverse mode only (the transpose of a vjp) through the custom_vjp GELU and RoPE, which share
    no jvp rule with ours, within 1e-4 of the largest entry (float32 sums in another order)."""
    graphdef, params, inputs = tiny_model(text=False)
    labels, timesteps = jnp.array([3, 10]), jnp.array([10.0, 900.0])
    images = inputs["images"][:, :8, :8]
    direction = jnp.asarray(np.random.default_rng(6).standard_normal(images.shape), jnp.float32)

    def loss(params, derivative_along):
        velocity = lambda images, timesteps: nnx.merge(graphdef, params)(images, timesteps, class_labels=labels)
        value, along = derivative_along(velocity, (images, timesteps), (direction, jnp.ones(2)))
        return jnp.mean(jnp.square(value + 0.1 * along))

    def along_by_reverse_mode(f, primals, tangents):
        value, pullback = jax.vjp(f, *primals)  # pullback is linear: its transpose is f's jvp
        return value, jax.vjp(pullback, jnp.zeros_like(value))[1](tangents)[0]

    ours = jax.jit(jax.grad(lambda params: loss(params, jax.jvp)))(params)
    with pytest.MonkeyPatch.context() as patch:
        for name, reference in CUSTOM_VJP.items():
            patch.setattr(model_module, name, reference)
        reference = jax.jit(jax.grad(lambda params: loss(params, along_by_reverse_mode)))(params)
    for path, our_gradient, reference_gradient in zip(jax.tree_util.tree_leaves_with_path(ours),
                                                      jax.tree.leaves(ours), jax.tree.leaves(reference)):
        largest = np.abs(reference_gradient).max()
        assert largest > 0, jax.tree_util.keystr(path[0])
        np.testing.assert_allclose(our_gradient, reference_gradient, rtol=0, atol=1e-4 * largest,
                                   err_msg=jax.tree_util.keystr(path[0]))


def test_a_model_traced_for_forward_mode_in_one_thread_refuses_no_other_threads_kernels():
    """The refusal is set while one model traces its layers for jax.jvp; another thread tracing a
    training step meanwhile (reverse mode through cuDNN) must not be refused, nor may it lift the
    first thread's refusal when its own trace ends."""
    import threading

    inside, done = threading.Event(), threading.Event()
    seen = {}

    def forward_mode_trace():
        with attention_module.fused_kernels_refused("refused"):
            inside.set()
            done.wait(10)
            with pytest.raises(ValueError, match="refused"):
                attention_module.check_not_forward_mode()
            seen["still refused"] = True

    def reverse_mode_trace():
        inside.wait(10)
        with attention_module.fused_kernels_refused(None):
            attention_module.check_not_forward_mode()
        attention_module.check_not_forward_mode()
        seen["not refused"] = True
        done.set()

    threads = [threading.Thread(target=forward_mode_trace), threading.Thread(target=reverse_mode_trace)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert seen == {"still refused": True, "not refused": True}
    attention_module.check_not_forward_mode()  # nothing left set in this thread
