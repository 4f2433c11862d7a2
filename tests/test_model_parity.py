"""Eval-mode forward of converted release weights against the release's own outputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import fixture_dir
from pixelflow_jax import load_model
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.model import AdaLayerNorm, layer_norm
from pixelflow_jax.rope import rope_tables

PARITY_RTOL = 1e-4  # relative L2 error allowed in float32 (measured: ~3e-7)


def relative_error(actual, expected):
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def forward(model, g, stage, jitted=True):
    """The fixture's stage-`stage` batch through `model`, under jax.jit or eagerly, returned NCHW like
    the release."""
    images = g[f"fwd_{stage}_x"].transpose(0, 2, 3, 1)
    if model.config.num_classes:
        kwargs = dict(class_labels=g[f"fwd_{stage}_y"])
    else:
        kwargs = dict(encoder_hidden_states=g["encoder_hidden_states"],
                      encoder_attention_mask=g["encoder_attention_mask"])
    velocity = lambda x, t: model(x, t, **kwargs)
    out = (jax.jit(velocity) if jitted else velocity)(images, g[f"fwd_{stage}_t"])
    return np.asarray(out).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def models(converted):
    return {name: load_model(path)[0] for name, path in converted.items()}


@pytest.mark.parametrize("name", ["c2i_tiny", "t2i_tiny"])
@pytest.mark.parametrize("stage", range(4))
def test_forward_matches_release(models, golden, name, stage):
    g = golden[name]
    out = forward(models[name], g, stage)
    error = relative_error(out, g[f"fwd_{stage}_out"])
    print(f"{name} stage {stage}: relative error {error:.2e}")
    assert error <= PARITY_RTOL


@pytest.mark.parametrize("name", ["c2i_tiny", "t2i_tiny"])
def test_an_eager_call_gives_the_jitted_numbers_and_compiles_nothing_when_called_again(models, golden, name):
    """Outside jit, as a user trying a loaded model calls it: the blocks' scan was traced and
    compiled again at every call (the tiny model 0.8 s a call, the full-size one 5.8 s at 32 x 32).
    Eager and jitted differ only where XLA fuses the layers around the blocks (float32 rounding)."""
    from test_sampling import counting_lowerings

    g = golden[name]
    eager = forward(models[name], g, 1, jitted=False)
    with counting_lowerings() as compiled:
        again = forward(models[name], g, 1, jitted=False)
    assert compiled == []
    np.testing.assert_array_equal(again, eager)
    assert relative_error(eager, g["fwd_1_out"]) <= PARITY_RTOL
    np.testing.assert_allclose(eager, forward(models[name], g, 1), rtol=0, atol=1e-5)


def test_an_eager_call_in_another_kernel_mode_or_mesh_is_traced_for_it(models, golden, converted, monkeypatch):
    """The blocks' program kept for eager calls is not one traced in other settings: compiling_for
    (the TPU's 'auto' backend, splash, and RoPE layout), interpret_kernels (outside it a CPU refuses
    the GPU kernel) and the mesh (which splits the batch) each get their own trace."""
    from pixelflow_jax.kernels import attention
    from pixelflow_jax.kernels.attention import compiling_for, interpret_kernels
    from test_sampling import counting_lowerings

    g = golden["c2i_tiny"]
    here = forward(models["c2i_tiny"], g, 0, jitted=False)
    splash_traced = []
    splash = attention.BACKENDS["splash"]
    monkeypatch.setitem(attention.BACKENDS, "splash", lambda *args: splash_traced.append(True) or splash(*args))
    with compiling_for("tpu"):  # 4 tokens: splash leaves them to xla, which runs on this CPU
        for_a_tpu = forward(models["c2i_tiny"], g, 0, jitted=False)
    assert splash_traced
    np.testing.assert_allclose(for_a_tpu, here, rtol=0, atol=1e-5)
    with counting_lowerings() as compiled:
        np.testing.assert_array_equal(forward(models["c2i_tiny"], g, 0, jitted=False), here)
    assert compiled == []  # the program traced here first, not the TPU's

    with interpret_kernels():
        pallas, _ = load_model(converted["c2i_tiny"], attention="pallas_gpu")
        forward(pallas, g, 0, jitted=False)
    with pytest.raises(ValueError, match="attention backend 'pallas_gpu' runs on gpu, and this run's platform is cpu"):
        forward(pallas, g, 0, jitted=False)

    # The same arrays (whole on both devices) outside, then inside, a mesh that splits the batch
    mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2], axis_types=(jax.sharding.AxisType.Auto,))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    graphdef, state = nnx.split(models["c2i_tiny"])
    on_both = nnx.merge(graphdef, jax.device_put(state, whole))
    inputs = jax.device_put((g["fwd_0_x"].transpose(0, 2, 3, 1), g["fwd_0_t"], g["fwd_0_y"]), whole)
    velocity = lambda: on_both(*inputs[:2], class_labels=inputs[2])
    assert velocity().sharding.is_fully_replicated
    with jax.set_mesh(mesh):
        assert not velocity().sharding.is_fully_replicated


@pytest.mark.parametrize("stage", range(4))
def test_rope_tables_match_release(golden, stage):
    reference = golden["c2i_tiny"][f"fwd_{stage}_rope"]
    grid = int(np.sqrt(reference.shape[0]))
    cos, sin = rope_tables(grid, reference.shape[1])
    np.testing.assert_allclose(cos, reference[..., 0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, reference[..., 1], rtol=0, atol=1e-6)


def test_layer_norm_is_the_releases_in_float32_with_eps_1e_6():
    """Of unit-variance activations eps moves the output by ~1e-6 relative, far inside the forward
    parity's 1e-4; of a token whose variance is near eps (a faint patch) it is half the value."""
    x = 3.0 + 1e-3 * np.random.default_rng(0).standard_normal((2, 5, 64))  # variance ~1e-6, mean 3
    expected = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(layer_norm(x.astype(np.float32)), expected, rtol=1e-3, atol=1e-3)
    # a bf16 residual stream is normalised in float32 (in bf16 the mean and the rsqrt round to 2^-8)
    x = jnp.asarray(0.5 + 2 * np.random.default_rng(1).standard_normal((2, 5, 64)), jnp.bfloat16)
    x64 = np.asarray(x, np.float64)
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-6)
    assert layer_norm(x).dtype == jnp.float32
    np.testing.assert_allclose(layer_norm(x), expected, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_models_modulation_is_float32():
    """adaLN's six vectors come out of a bf16 Linear, then are float32, so 1 + scale is not rounded
    to bf16 (a unit in the last place of 1 is 2^-7 there) before it scales the float32 norm."""
    cfg = ModelConfig(num_attention_heads=2, attention_head_dim=8, depth=1, dtype="bfloat16")
    vectors = AdaLayerNorm(cfg, nnx.Rngs(0))(jnp.ones((3, cfg.hidden_size)))
    assert [(v.shape, v.dtype) for v in vectors] == [((3, 1, cfg.hidden_size), jnp.float32)] * 6


def test_text_mask_matters(models, golden):
    # Padding must change nothing but the masked keys: unmasking the padded rows changes those rows only.
    g = golden["t2i_tiny"]
    model = models["t2i_tiny"]
    images = g["fwd_1_x"].transpose(0, 2, 3, 1)
    masked = model(images, g["fwd_1_t"], encoder_hidden_states=g["encoder_hidden_states"],
                   encoder_attention_mask=g["encoder_attention_mask"])
    unmasked = model(images, g["fwd_1_t"], encoder_hidden_states=g["encoder_hidden_states"],
                     encoder_attention_mask=np.ones_like(g["encoder_attention_mask"]))
    padded_rows = np.nonzero(g["encoder_attention_mask"].min(axis=1) == 0)[0]
    full_rows = np.nonzero(g["encoder_attention_mask"].min(axis=1) == 1)[0]
    assert len(padded_rows) and len(full_rows)
    assert relative_error(np.asarray(masked).transpose(0, 3, 1, 2), g["fwd_1_out"]) <= PARITY_RTOL  # eager
    assert np.abs(np.asarray(masked - unmasked)[padded_rows]).max() > 1e-3
    np.testing.assert_array_equal(np.asarray(masked)[full_rows], np.asarray(unmasked)[full_rows])


def test_release_folder_loads_directly(golden):
    model, config = load_model(fixture_dir("c2i_tiny"))
    assert config.resolution == 64 and config.num_stages == 4
    assert relative_error(forward(model, golden["c2i_tiny"], 2), golden["c2i_tiny"]["fwd_2_out"]) <= PARITY_RTOL


def test_bfloat16_compute_stays_close(converted, golden):
    model, config = load_model(converted["c2i_tiny"], dtype="bfloat16")
    assert config.model.dtype == "bfloat16"
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(jax.tree.map(np.asarray, model.proj_out_2)))
    g = golden["c2i_tiny"]
    for stage in range(4):
        out = forward(model, g, stage)
        assert out.dtype == np.float32
        error = relative_error(out, g[f"fwd_{stage}_out"])
        assert 1e-6 < error < 3e-2, error  # bf16 really ran, and stayed close


def test_wrong_inputs_get_clear_errors(models, golden):
    g = golden["c2i_tiny"]
    images = g["fwd_0_x"].transpose(0, 2, 3, 1)
    with pytest.raises(ValueError, match="class_labels"):
        models["c2i_tiny"](images, g["fwd_0_t"])
    with pytest.raises(ValueError, match="multiple of patch size"):
        models["c2i_tiny"](images[:, :6, :6], g["fwd_0_t"], class_labels=g["fwd_0_y"])
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        models["t2i_tiny"](images, g["fwd_0_t"])


@pytest.mark.parametrize("name", ["c2i_tiny", "t2i_tiny"])
def test_splash_backend_forward_matches_release(converted, golden, name):
    """The last stage (256 tokens) through the splash kernel (interpret mode, batch split over a
    2 x 2 mesh); t2i's 6 text keys take the XLA path, as on a TPU."""
    from pixelflow_jax.kernels.attention import interpret_kernels

    g = golden[name]
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"), devices=jax.devices()[:4], axis_types=(auto, auto))
    with interpret_kernels():  # else a CPU refuses the TPU kernel at load
        model, _ = load_model(converted[name], attention="splash")
        with jax.set_mesh(mesh):
            out = forward(model, g, 3)
    assert relative_error(out, g["fwd_3_out"]) <= PARITY_RTOL


@pytest.mark.parametrize("name", ["c2i_tiny", "t2i_tiny"])
def test_pallas_gpu_backend_forward_matches_release(converted, golden, name):
    """Every stage through our Triton flash attention (interpret mode, batch split over a 2 x 2
    mesh): 16, 64 and 256 tokens run the kernel at head_dim 16; the 4-token stage and t2i's 6
    text keys take the XLA path, as on a GPU."""
    from pixelflow_jax.kernels.attention import interpret_kernels

    g = golden[name]
    with interpret_kernels():  # else a CPU refuses the GPU kernel at load
        model, _ = load_model(converted[name], attention="pallas_gpu")
    auto = jax.sharding.AxisType.Auto
    mesh = jax.make_mesh((2, 2), ("data", "fsdp"), devices=jax.devices()[:4], axis_types=(auto, auto))
    for stage in range(4):
        with interpret_kernels(), jax.set_mesh(mesh):
            out = forward(model, g, stage)
        assert relative_error(out, g[f"fwd_{stage}_out"]) <= PARITY_RTOL, f"stage {stage}"


def test_t2i_config_path_builds_the_fixture_model(converted, golden):
    """configs/t2i.py:tiny describes the t2i fixture's architecture; a model built from that config
    and the converted weights gives the release's outputs."""
    import dataclasses

    from flax import nnx

    from configs import t2i
    from pixelflow_jax.checkpoints.checkpoint import build_model
    from pixelflow_jax.config import ModelConfig

    model_cfg = ModelConfig.from_mapping(t2i.get_config("tiny").model)
    loaded, ckpt = load_model(converted["t2i_tiny"])
    assert model_cfg.architecture() == ckpt.model.architecture()
    params = nnx.to_pure_dict(nnx.state(loaded, nnx.Param))
    model = build_model(dataclasses.replace(ckpt, model=model_cfg), params)
    g = golden["t2i_tiny"]
    for stage in (0, 3):
        assert relative_error(forward(model, g, stage), g[f"fwd_{stage}_out"]) <= PARITY_RTOL
