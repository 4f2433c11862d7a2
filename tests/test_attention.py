"""The attention function against a float64 numpy reference, and every kernel against 'xla'."""

import contextlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pixelflow_jax.kernels.attention import dot_product_attention, interpret_kernels, resolve_backend


def reference_attention(q, k, v, key_mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = logits + (1.0 - key_mask[:, None, None, :]) * -10000.0
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v)


@pytest.mark.parametrize("with_mask", [False, True])
def test_xla_matches_float64_reference(with_mask):
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 16, 3, 8)).astype(np.float32)
    k = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    v = rng.standard_normal((2, 5, 3, 8)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], np.float32) if with_mask else None
    out = np.asarray(dot_product_attention(q, k, v, key_mask=mask))
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)


def test_all_padding_row_attends_to_all_keys_like_the_release():
    # A -10000 bias (not -inf) cancels in the softmax when every key is padding: no NaN. In float32
    # the logits near -10000 keep only ~1e-3 of precision, as in the release.
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 4, 2, 8)).astype(np.float32) for _ in range(3))
    out = np.asarray(dot_product_attention(q, k, v, key_mask=np.zeros((1, 4), np.float32)))
    np.testing.assert_allclose(out, reference_attention(q, k, v), atol=1e-2)


def test_xla_takes_bfloat16_with_float32_logits_and_softmax_and_returns_bfloat16():
    """Peaked attention (q scaled by 3): bf16 logits put ~3x the error of the float32 ones into the
    weights. Both matmuls accumulate in float32, the second on bf16 weights (as the kernels do)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.standard_normal((1, 16, 2, 32)) * scale, jnp.bfloat16) for scale in (3, 1, 1))
    out = dot_product_attention(q, k, v)
    assert out.dtype == jnp.bfloat16
    assert relative_error(out, reference_attention(q, k, v)) <= 4e-3  # 2.2e-3; bf16 logits 6.3e-3
    jaxpr = jax.make_jaxpr(lambda q: dot_product_attention(q, k, v))(q).jaxpr
    matmuls = [eqn for eqn in jaxpr.eqns if eqn.primitive.name == "dot_general"]
    assert [str(eqn.params["preferred_element_type"]) for eqn in matmuls] == ["float32"] * 2
    assert all(x.aval.dtype == jnp.bfloat16 for eqn in matmuls for x in eqn.invars)


def test_a_masked_key_gets_no_weight_even_200_above_the_real_keys():
    """The release's bias is large enough to mask a key far above the others (a bias of -100 is not)."""
    q = np.zeros((1, 1, 1, 4), np.float32)
    q[..., 0] = 40.0
    k = np.zeros((1, 3, 1, 4), np.float32)
    k[0, 0, 0, 0] = 10.0  # logit 40 * 10 / sqrt(4) = 200
    v = np.arange(12, dtype=np.float32).reshape(1, 3, 1, 4)
    mask = np.array([[0, 1, 1]], np.float32)
    out = np.asarray(dot_product_attention(q, k, v, key_mask=mask))
    np.testing.assert_allclose(out, reference_attention(q, k, v, mask), atol=1e-6)
    np.testing.assert_allclose(out[0, 0, 0], (v[0, 1, 0] + v[0, 2, 0]) / 2)


def test_bad_arguments():
    q = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        dot_product_attention(q, q, q, backend="flash")
    with pytest.raises(ValueError, match="key_mask must have shape"):
        dot_product_attention(q, q, q, key_mask=np.ones((1, 3)))
    for k, v in ((q, q[:, :3]), (np.zeros((2, 4, 2, 8)),) * 2, (q[:, :, :1],) * 2, (q[..., :4],) * 2):
        with pytest.raises(ValueError, match=r"attention expects q \(B, Lq, H, D\) and k, v \(B, Lk, H, D\)"):
            dot_product_attention(q, k, v)
    with pytest.raises(ValueError, match="attention expects q"):
        dot_product_attention(q[0], q[0], q[0])


# ---------------------------------------------------------------------------- kernels vs xla


def random_qkv(batch, q_len, kv_len, heads=2, head_dim=72, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    shape = lambda length: (batch, length, heads, head_dim)
    q, k, v = (jnp.asarray(rng.standard_normal(shape(n)), dtype) for n in (q_len, kv_len, kv_len))
    mask = jnp.asarray(rng.random((batch, kv_len)) < 0.7, jnp.float32).at[:, 0].set(1.0)
    return q, k, v, mask


def value_and_grads(backend, q, k, v, mask):
    def loss(q, k, v):
        out = dot_product_attention(q, k, v, key_mask=mask, backend=backend).astype(jnp.float32)
        return jnp.sum(out * jnp.cos(out)), out  # a nonlinear loss, so every gradient term matters

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 2e-5), (jnp.bfloat16, 2e-2)])
@pytest.mark.parametrize("lengths,with_mask", [((128, 128), False), ((256, 128), True), ((64, 64), False)])
def test_splash_equals_xla_on_an_eight_device_mesh(dtype, tolerance, lengths, with_mask):
    """Forward and gradients through the splash kernel (interpret mode), batch sharded over a
    (4, 2) mesh by shard_map; 64 tokens take the XLA path as on a TPU."""
    q, k, v, mask = random_qkv(8, *lengths, dtype=dtype)
    mask = mask if with_mask else None
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    expected, expected_grads = value_and_grads("xla", q, k, v, mask)
    with interpret_kernels(), jax.set_mesh(mesh):
        got, grads = value_and_grads("splash", q, k, v, mask)
    assert relative_error(got, expected) <= tolerance
    for g, e in zip(grads, expected_grads):
        assert relative_error(g, e) <= tolerance


FLOAT32, BFLOAT16 = (np.float32, 2e-5), (jnp.bfloat16, 2e-2)
# (batch, (query, key) lengths, key mask): every XL/4 stage and text cross-attention in float32;
# bf16 (casts of p and dS) on the short ones, to keep the suite's time down.
PALLAS_GPU_CASES = [(batch, lengths, mask, dtype, tolerance) for batch, lengths, mask, dtypes in [
    (2, (64, 64), False, (FLOAT32, BFLOAT16)), (2, (256, 256), True, (FLOAT32, BFLOAT16)),
    (1, (1024, 1024), False, (FLOAT32,)), (1, (4096, 4096), True, (FLOAT32,)),
    (2, (256, 512), True, (FLOAT32, BFLOAT16)), (2, (128, 48), True, (FLOAT32,))] for dtype, tolerance in dtypes]


@pytest.mark.parametrize("batch,lengths,with_mask,dtype,tolerance", PALLAS_GPU_CASES)
def test_pallas_gpu_equals_xla(batch, lengths, with_mask, dtype, tolerance):
    """Our Triton flash attention (interpret mode) at head_dim 72 (64 + 16-column chunks)."""
    q, k, v, mask = random_qkv(batch, *lengths, dtype=dtype)
    mask = mask if with_mask else None
    expected, expected_grads = value_and_grads("xla", q, k, v, mask)
    with interpret_kernels():
        got, grads = value_and_grads("pallas_gpu", q, k, v, mask)
    assert relative_error(got, expected) <= tolerance
    for g, e in zip(grads, expected_grads):
        assert relative_error(g, e) <= tolerance


@pytest.mark.parametrize("head_dim", [8, 100])
def test_pallas_gpu_takes_any_head_dim(head_dim):
    """8 columns in one 16-wide chunk; 100 = 64 + 32 + 16 (4 real)."""
    q, k, v, mask = random_qkv(2, 64, 32, head_dim=head_dim)
    expected, expected_grads = value_and_grads("xla", q, k, v, mask)
    with interpret_kernels():
        got, grads = value_and_grads("pallas_gpu", q, k, v, mask)
    assert relative_error(got, expected) <= 2e-5
    for g, e in zip(grads, expected_grads):
        assert relative_error(g, e) <= 2e-5


@pytest.mark.parametrize("batch", [8, 4])
def test_pallas_gpu_runs_on_each_devices_share_of_batch_and_heads(batch):
    """On a (4, 2) mesh the kernel sits inside shard_map (XLA cannot partition a Pallas call): 8
    examples split over both axes, or 4 examples over 'data' and 2 heads over 'fsdp'. head_dim 40
    = 32 + 16 columns with 8 masked."""
    q, k, v, mask = random_qkv(batch, 128, 64, head_dim=40, dtype=jnp.bfloat16)
    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    expected, expected_grads = value_and_grads("xla", q, k, v, mask)
    with interpret_kernels(), jax.set_mesh(mesh):
        got, grads = value_and_grads("pallas_gpu", q, k, v, mask)
        jaxpr = str(jax.make_jaxpr(lambda q: dot_product_attention(q, k, v, backend="pallas_gpu"))(q))
    assert "shard_map" in jaxpr
    assert relative_error(got, expected) <= 2e-2
    for g, e in zip(grads, expected_grads):
        assert relative_error(g, e) <= 2e-2


def test_attention_split_gives_each_mesh_axis_to_batch_heads_or_neither():
    from pixelflow_jax.sharding import attention_split

    mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    assert attention_split(mesh, 8, 16) == (("data", "fsdp"), ())
    assert attention_split(mesh, 4, 16) == (("data",), ("fsdp",))
    assert attention_split(mesh, 2, 16) == (("fsdp",), ("data",))
    assert attention_split(mesh, 3, 3) == ((), ())
    assert attention_split(mesh, 1, 4) == ((), ("data",))  # 4 heads over 'data' leave 1: 'fsdp' splits neither


def abstract_h100_mesh() -> jax.sharding.AbstractMesh:
    """One abstract H100 on a 'data' axis of type Auto, as the meshes of make_mesh and of
    bench/gpu_compile.py (topologies.make_mesh) are: jax 0.12's AbstractMesh defaults to Explicit,
    and shard_map then refuses to split operands whose types say they are not split."""
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100", num_cores=None, platform="gpu")
    return jax.sharding.AbstractMesh((1,), ("data",), (jax.sharding.AxisType.Auto,), abstract_device=h100)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_pallas_gpu_lowers_to_triton_for_cuda(dtype):
    """Cross-platform lowering (no GPU needed) runs Pallas's Triton lowering, which refuses what
    interpret mode accepts (non-power-of-two tiles, a load's `other` without a mask, ...): the
    forward and both backward kernels must come out as Triton calls. The abstract H100 tells the
    lowering which GPU to target (jax 0.11 asks; 0.10 does not need it)."""
    from pixelflow_jax.kernels.pallas_gpu_attention import flash_attention

    def grads(q, k, v, mask):
        loss = lambda q, k, v: flash_attention(q, k, v, mask).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    q = jax.ShapeDtypeStruct((2, 256, 4, 72), dtype)
    k = jax.ShapeDtypeStruct((2, 512, 4, 72), dtype)
    mask = jax.ShapeDtypeStruct((2, 512), jnp.float32)
    with jax.sharding.use_abstract_mesh(abstract_h100_mesh()):
        hlo = jax.jit(grads).trace(q, k, k, mask).lower(lowering_platforms=("cuda",)).as_text()
    for kernel in ("pixelflow_flash_forward", "pixelflow_flash_backward_dkdv", "pixelflow_flash_backward_dq"):
        assert kernel in hlo


def test_splash_lowers_to_mosaic_for_tpu():
    """Cross-platform lowering (no TPU needed) runs Pallas's Mosaic lowering of the splash forward
    and both backward kernels, with a key mask, at the head width 72 (padded to 128)."""
    from pixelflow_jax.kernels.splash_attention import splash_attention

    def grads(q, k, v, mask):
        loss = lambda q, k, v: splash_attention(q, k, v, mask).astype(jnp.float32).sum()
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    q = jax.ShapeDtypeStruct((2, 256, 4, 72), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((2, 512, 4, 72), jnp.bfloat16)
    mask = jax.ShapeDtypeStruct((2, 512), jnp.float32)
    hlo = jax.jit(grads).trace(q, k, k, mask).lower(lowering_platforms=("tpu",)).as_text()
    for kernel in ("splash_mha_fwd", "splash_mha_dq", "splash_mha_dkv"):
        assert kernel in hlo


def test_auto_is_splash_on_tpu_cudnn_for_bf16_on_gpu(monkeypatch):
    for platform, dtype, expected in (("tpu", jnp.bfloat16, "splash"), ("tpu", jnp.float32, "splash"),
                                      ("gpu", jnp.bfloat16, "cudnn"), ("gpu", jnp.float32, "xla"),
                                      ("gpu", jnp.float16, "cudnn"), ("cpu", jnp.bfloat16, "xla"),
                                      ("metal", jnp.bfloat16, "xla")):  # a platform without an entry: XLA
        monkeypatch.setattr(jax, "default_backend", lambda: platform)
        assert resolve_backend("auto", dtype) == expected, (platform, dtype)


def test_compiling_for_a_gpu_on_a_cpu_chooses_the_gpu_backends():
    """bench/gpu_compile.py compiles the model for an H200 on a CPU host: inside compiling_for('gpu')
    'auto' means cuDNN and the GPU kernels pass the platform check, which refuses them outside it;
    a model's attention then lowers for CUDA to our Triton kernel (cuDNN's lowering needs jax's
    CUDA plugin, absent here)."""
    from pixelflow_jax.kernels.attention import check_platform, compiling_for

    q = jax.ShapeDtypeStruct((2, 256, 4, 72), jnp.bfloat16)
    attend = lambda q: dot_product_attention(q, q, q, backend="pallas_gpu")
    with compiling_for("gpu"), jax.sharding.use_abstract_mesh(abstract_h100_mesh()):
        assert resolve_backend("auto", jnp.bfloat16) == "cudnn"
        check_platform("cudnn")
        hlo = jax.jit(attend).trace(q).lower(lowering_platforms=("cuda",)).as_text()
    assert "pixelflow_flash_forward" in hlo
    assert resolve_backend("auto", jnp.bfloat16) == "xla"
    with pytest.raises(ValueError, match="runs on gpu, and this run's platform is cpu"):
        check_platform("pallas_gpu")
    with pytest.raises(ValueError, match="unknown platform 'cuda'; one of"):
        with compiling_for("cuda"):
            pass


def test_cudnn_for_float32_is_refused_when_resolved_not_at_the_first_call(monkeypatch):
    """main.py and load_model resolve the backend before any work: cuDNN takes no float32."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resolve_backend("cudnn", jnp.bfloat16) == resolve_backend("cudnn", jnp.float16) == "cudnn"
    with pytest.raises(ValueError, match=r"'cudnn' takes bfloat16 or float16 inputs, and this model computes in "
                                         r"float32: compute in bfloat16, or use 'auto' \(XLA for float32\)"):
        resolve_backend("cudnn", jnp.float32)


def assert_an_all_padding_row_as_xla(backend: str, length: int) -> None:
    """-10000 on every key of a row cancels in the softmax (the row attends to all keys), as in
    the release and xla: the kernel's output and gradients must agree there too."""
    q, k, v, _ = random_qkv(2, length, length, head_dim=16)
    mask = jnp.ones((2, length)).at[1].set(0.0)  # example 1: every key is padding
    expected, expected_grads = value_and_grads("xla", q, k, v, mask)
    with interpret_kernels():
        got, grads = value_and_grads(backend, q, k, v, mask)
    assert relative_error(got, expected) <= 1e-3  # xla's own float32 error near -10000 is ~3e-4
    for g, e in zip(grads, expected_grads):
        assert relative_error(g, e) <= 1e-3


def test_splash_treats_an_all_padding_row_as_the_release_does():
    """Segment ids left such a row no key: a uniform mean of v, and gradients ~80x off."""
    assert_an_all_padding_row_as_xla("splash", 128)
    from pixelflow_jax.kernels.splash_attention import splash_attention

    q, k, v, _ = random_qkv(2, 128, 128, head_dim=16)
    with pytest.raises(ValueError, match="multiples of 128, got 100 queries and 77 keys"):
        splash_attention(q[:, :100], k[:, :77], v[:, :77], None, interpret=True)


def test_splash_takes_multiples_of_128_in_the_largest_block_dividing_them_and_pads_heads_to_128s():
    """Both lengths must be multiples of 128 (else XLA); blocks of 512, 256 or 128 must divide the
    length; the head is padded to the next multiple of 128, not beyond."""
    from pixelflow_jax.kernels import splash_attention as splash

    assert splash.supports(256, 128) and not splash.supports(128, 64) and not splash.supports(64, 128)
    assert [splash._block(n) for n in (128, 256, 384, 512, 640, 1024, 4096)] == [128, 256, 128, 512, 128, 512, 512]
    for head_dim, padded in ((72, 128), (128, 128), (200, 256)):
        q = jax.ShapeDtypeStruct((1, 128, 1, head_dim), jnp.float32)
        jaxpr = jax.make_jaxpr(lambda q: splash.splash_attention(q, q, q, None))(q).jaxpr
        calls = [eqn for eqn, _ in kernel_equations(jaxpr) if eqn.primitive.name == "pallas_call"]
        assert calls and all(x.aval.shape[-1] == padded for eqn in calls for x in eqn.invars[-3:]), head_dim


def test_cudnn_takes_what_jax_checks_let_through_and_auto_runs_xla_for_the_rest(monkeypatch):
    """jax's own cuDNN checks, run on the CPU with the GPU queries answered: a key mask's bias
    must be (B, 1, Lq, Lk), and `auto` must not hand cuDNN a mask, odd lengths or a head_dim it
    refuses (each was a crash of every text-to-image run on a GPU)."""
    import jax._src.cudnn.fused_attention_stablehlo as fused

    from pixelflow_jax.kernels import attention

    monkeypatch.setattr(fused, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(fused, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(fused, "is_cuda_compute_capability_equal", lambda capability: False)
    shape = lambda *dims: jax.ShapeDtypeStruct(dims, jnp.bfloat16)
    q, k = shape(2, 256, 4, 72), shape(2, 512, 4, 72)
    mask = jax.ShapeDtypeStruct((2, 512), jnp.float32)
    masked = lambda q, k, v, mask: attention._cudnn_attention(q, k, v, mask).astype(jnp.float32).sum()
    assert jax.eval_shape(attention._cudnn_attention, q, k, k, mask).shape == (2, 256, 4, 72)
    jax.eval_shape(jax.grad(masked, argnums=(0, 1, 2)), q, k, k, mask)

    assert attention.cudnn_refuses(q, k) is None
    assert "multiple of 8" in attention.cudnn_refuses(shape(2, 256, 4, 36), shape(2, 256, 4, 36))
    assert "even lengths, got 256 queries and 77 keys" in attention.cudnn_refuses(q, shape(2, 77, 4, 72))
    with pytest.raises(ValueError, match="'cudnn' cannot run this attention: it needs even lengths"):
        attention._cudnn_attention(jnp.zeros((1, 4, 2, 8), jnp.bfloat16), jnp.zeros((1, 77, 2, 8), jnp.bfloat16),
                                   jnp.zeros((1, 77, 2, 8), jnp.bfloat16), None)

    calls = []
    monkeypatch.setattr(attention, "_cudnn_attention", lambda *args: calls.append(args) or args[0])
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v, text_mask = random_qkv(1, 16, 8, head_dim=8, dtype=jnp.bfloat16)
    dot_product_attention(q, q, q, backend="auto")
    assert len(calls) == 1  # unmasked self-attention: cuDNN
    for keys, key_mask in ((k, text_mask), (k[:, :7], None)):  # masked text; an odd length
        got = dot_product_attention(q, keys, keys, key_mask=key_mask, backend="auto")
        expected = dot_product_attention(q, keys, keys, key_mask=key_mask, backend="xla")
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(expected, np.float32))
    assert len(calls) == 1
    monkeypatch.setitem(attention.BACKENDS, "cudnn", lambda *args: calls.append(args) or args[0])
    dot_product_attention(q, k, k, key_mask=text_mask, backend="cudnn")  # asked for by name: cuDNN, with the mask
    assert len(calls) == 2


def test_cudnn_refuses_head_dims_over_its_limit_for_the_gpu_and_odd_query_lengths(monkeypatch):
    from pixelflow_jax.kernels.attention import cudnn_refuses

    shape = lambda length, head_dim: jax.ShapeDtypeStruct((1, length, 2, head_dim), jnp.bfloat16)
    assert cudnn_refuses(shape(16, 128), shape(16, 128)) is None  # no GPU to ask: the pre-Hopper limit
    assert "up to 128, got 136" in cudnn_refuses(shape(16, 136), shape(16, 136))
    assert "even lengths, got 15 queries and 16 keys" in cudnn_refuses(shape(15, 8), shape(16, 8))
    for capability, limit in (("9.0", 256), ("8.9", 128)):  # Hopper; Ada
        monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(compute_capability=capability)])
        assert cudnn_refuses(shape(16, limit), shape(16, limit)) is None
        assert f"up to {limit}, got {limit + 8}" in cudnn_refuses(shape(16, limit + 8), shape(16, limit + 8))


def test_head_dim_chunks_are_powers_of_two_of_at_least_16():
    from pixelflow_jax.kernels.pallas_gpu_attention import _padded_dim, head_chunks

    assert head_chunks(72) == ((0, 64, 64), (64, 16, 8))
    assert head_chunks(64) == ((0, 64, 64),)
    assert head_chunks(8) == ((0, 16, 8),)
    assert head_chunks(100) == ((0, 64, 64), (64, 32, 32), (96, 16, 4))
    # The kernels' block covers every chunk: a 16-wide one for 8 columns too (interpret mode and
    # the Triton lowering both take a chunk wider than its block).
    assert [_padded_dim(d) for d in (8, 16, 72, 100, 128)] == [16, 16, 128, 128, 128]


def relative_error(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_hardware_kernels_are_refused_on_cpu_with_the_alternatives():
    q = jnp.zeros((1, 128, 2, 8), jnp.bfloat16)
    for backend, hardware in (("cudnn", "gpu"), ("pallas_gpu", "gpu"), ("splash", "tpu")):
        with pytest.raises(ValueError, match=f"'{backend}' runs on {hardware}.*platform is cpu: use 'auto' or 'xla'"):
            dot_product_attention(q, q, q, backend=backend)
    with interpret_kernels(), pytest.raises(ValueError, match="'cudnn' runs on gpu"):  # interprets Pallas only
        dot_product_attention(q, q, q, backend="cudnn")
    assert resolve_backend("auto", jnp.bfloat16) == "xla"


def test_interpret_kernels_and_compiling_for_end_with_their_block_even_when_it_raises():
    """A notebook cell that failed inside one kept its mode: a GPU then ran Pallas kernels interpreted
    (orders of magnitude slower), or a CPU host kept choosing and tracing for another platform."""
    from pixelflow_jax.kernels.attention import check_platform, compiling_for, tracing_modes

    for mode in (interpret_kernels, lambda: compiling_for("gpu")):
        with pytest.raises(RuntimeError, match="the cell failed"), mode():
            check_platform("pallas_gpu")  # allowed inside
            raise RuntimeError("the cell failed")
        assert tracing_modes() == (False, None)
    with pytest.raises(ValueError, match="'pallas_gpu' runs on gpu, and this run's platform is cpu"):
        check_platform("pallas_gpu")


def test_each_kernel_is_refused_on_the_other_accelerator(monkeypatch):
    from pixelflow_jax.kernels.attention import check_platform

    for platform, refused in (("gpu", ("splash",)), ("tpu", ("cudnn", "pallas_gpu"))):
        monkeypatch.setattr(jax, "default_backend", lambda: platform)
        for backend in refused:
            with pytest.raises(ValueError, match=f"'{backend}' runs on .*platform is {platform}: use 'auto' or 'xla'"):
                check_platform(backend)


def test_model_config_accepts_exactly_the_backends():
    from pixelflow_jax.config import ATTENTION_BACKENDS, ModelConfig
    from pixelflow_jax.kernels.attention import BACKENDS

    assert set(ATTENTION_BACKENDS) == set(BACKENDS) | {"auto"}
    with pytest.raises(ValueError, match="model.attention must be one of"):
        ModelConfig(attention="flash")


def test_pallas_gpu_treats_an_all_padding_row_as_the_release_does():
    """A running max started anywhere but -inf (e.g. 0) lets every exp underflow in such a row:
    NaN for that example."""
    assert_an_all_padding_row_as_xla("pallas_gpu", 32)


def reference_attention_and_grads(q, k, v, key_mask, d_out):
    """reference_attention with its vjp for the cotangent d_out, in float64."""
    q, k, v, d_out = (np.asarray(a, np.float64) for a in (q, k, v, d_out))
    scale = 1 / np.sqrt(q.shape[-1])
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) * scale + ((1.0 - key_mask) * -10000.0)[:, None, None, :]
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = np.einsum("bqhd,bkhd->bhqk", d_out, v)
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    grads = (np.einsum("bhqk,bkhd->bqhd", ds, k) * scale, np.einsum("bhqk,bqhd->bkhd", ds, q) * scale,
             np.einsum("bhqk,bqhd->bkhd", p, d_out))
    return np.einsum("bhqk,bkhd->bqhd", p, v), grads


@pytest.mark.parametrize("dtype,tolerance", [(np.float32, 2e-6), (jnp.bfloat16, 5e-3)])
def test_pallas_gpu_matches_float64_with_caption_padding_filling_the_last_key_blocks(dtype, tolerance):
    """80 keys in five 16-key blocks, the last three (example 0) or one (example 1) all padding, as
    a padded caption's are; peaked attention (q scaled by 3); head_dim 24 = 16 + 16 (8 real).
    Measured: 4e-7 in float32, 3.4e-3 in bf16 (the inputs' own rounding excluded: the reference
    takes the bf16 values)."""
    from pixelflow_jax.kernels.pallas_gpu_attention import flash_attention

    rng = np.random.default_rng(0)
    shape = lambda length: (2, length, 1, 24)
    q = jnp.asarray(rng.standard_normal(shape(32)) * 3, dtype)
    k, v = (jnp.asarray(rng.standard_normal(shape(80)), dtype) for _ in range(2))
    d_out = jnp.asarray(rng.standard_normal(shape(32)), dtype)
    mask = np.ones((2, 80), np.float32)
    mask[0, 32:], mask[1, 64:] = 0.0, 0.0
    out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, jnp.asarray(mask), interpret=True), q, k, v)
    expected, expected_grads = reference_attention_and_grads(q, k, v, mask, d_out)
    assert relative_error(out, expected) <= tolerance
    for g, e in zip(vjp(d_out), expected_grads):
        assert relative_error(g, e) <= tolerance


def test_pallas_gpu_sends_lengths_off_the_16_grid_to_xla_and_blocks_divide_lengths():
    """Triton takes no tile under 16 (e.g. 6 text keys): such attention must run XLA, not the
    kernel; the blocks are the largest powers of two <= the preferred size that divide a length."""
    from pixelflow_jax.kernels.pallas_gpu_attention import _block, flash_attention, supports

    assert supports(64, 48) and not supports(64, 6) and not supports(40, 64)
    assert [_block(n, 64) for n in (48, 64, 96, 256)] == [16, 64, 32, 64]
    assert [_block(n, 128) for n in (48, 64, 96, 256)] == [16, 64, 32, 128]
    q, k, v, mask = random_qkv(1, 64, 6, head_dim=8)
    with interpret_kernels():
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, key_mask=mask,
                                                                         backend="pallas_gpu"))(q, k, v))
    assert "pallas_call" not in jaxpr
    with pytest.raises(ValueError, match="multiples of 16, got 64 queries and 6 keys"):
        flash_attention(q, k, v, mask, interpret=True)


def kernel_equations(jaxpr, inside=False):
    """(equation, inside a Pallas kernel) for every equation of jaxpr and of the jaxprs in it."""
    from jax.extend import core

    for eqn in jaxpr.eqns:
        yield eqn, inside
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else [param]:
                sub = sub.jaxpr if isinstance(sub, core.ClosedJaxpr) else sub
                if isinstance(sub, core.Jaxpr):
                    yield from kernel_equations(sub, inside or eqn.primitive.name == "pallas_call")


def test_pallas_gpu_kernels_mask_the_columns_past_head_dim_and_run_float32_matmuls_exact():
    """What interpret mode cannot see: on a GPU a head's 72 columns are read and written as 64 +
    16 through a 128-wide block, so a load or store of the 16-wide chunk without a mask touches the
    next head's first 8 columns (a store overwrites them: wrong outputs, racing). And a float32
    matmul without Precision.HIGHEST runs TF32 (~1e-3 errors) on tensor cores."""
    from pixelflow_jax.kernels.pallas_gpu_attention import flash_attention

    def grads(q, k, v, mask):
        return jax.grad(lambda q, k, v: flash_attention(q, k, v, mask).sum(), argnums=(0, 1, 2))(q, k, v)

    q = jax.ShapeDtypeStruct((1, 64, 2, 72), jnp.float32)
    jaxpr = jax.make_jaxpr(grads)(q, q, q, jax.ShapeDtypeStruct((1, 64), jnp.float32)).jaxpr
    kernel = [eqn for eqn, inside in kernel_equations(jaxpr) if inside]
    partial = [eqn for eqn in kernel if eqn.primitive.name in ("masked_load", "masked_swap")
               and eqn.invars[0].aval.shape[-1] == 128 and (eqn.outvars[0].aval.shape[-1] == 16)]
    assert len(partial) == 4 + 6 + 5  # q, k, v, o; q, k, v, dO, dk, dv; q, k, v, dO, dq
    for eqn in partial:
        assert any(v.aval.dtype == jnp.bool_ for v in eqn.invars[1:]), eqn
    matmuls = [eqn for eqn in kernel if eqn.primitive.name == "dot_general"]
    assert matmuls and all(eqn.params["precision"] == (jax.lax.Precision.HIGHEST,) * 2 for eqn in matmuls)


def test_pallas_gpu_runs_bf16_matmuls_into_float32_with_float32_statistics():
    """For bf16 inputs every matmul of the three kernels takes bf16 operands (p and dS cast, as
    flash attention does: float32 ones run slower and more precisely, so the float64 test cannot
    tell) and accumulates in float32; the bias, lse and delta = rowsum(dO * O) are float32 (a bf16
    delta moved the float64 test's error by only 3.4e-3 -> 3.9e-3)."""
    from pixelflow_jax.kernels.pallas_gpu_attention import flash_attention

    def grads(q, k, v, mask):
        return jax.grad(lambda q, k, v: flash_attention(q, k, v, mask).astype(jnp.float32).sum(),
                        argnums=(0, 1, 2))(q, k, v)

    q = jax.ShapeDtypeStruct((1, 64, 2, 72), jnp.bfloat16)
    jaxpr = jax.make_jaxpr(grads)(q, q, q, jax.ShapeDtypeStruct((1, 64), jnp.float32)).jaxpr
    equations = list(kernel_equations(jaxpr))
    calls = {eqn.params["name"]: eqn for eqn, _ in equations if eqn.primitive.name == "pallas_call"}
    dtypes = lambda variables: [jnp.dtype(x.aval.dtype).name for x in variables]
    backward_inputs = ["bfloat16"] * 3 + ["float32", "bfloat16", "float32", "float32"]  # q k v bias dO lse delta
    assert dtypes(calls["pixelflow_flash_forward"].invars) == ["bfloat16"] * 3 + ["float32"]
    assert dtypes(calls["pixelflow_flash_forward"].outvars) == ["bfloat16", "float32"]
    assert dtypes(calls["pixelflow_flash_backward_dkdv"].invars) == backward_inputs
    assert dtypes(calls["pixelflow_flash_backward_dq"].invars) == backward_inputs
    matmuls = [eqn for eqn, inside in equations if inside and eqn.primitive.name == "dot_general"]
    assert len(matmuls) == 2 * 2 + 4 * 2 + 3 * 2  # per chunk: q k^T, p v; q k^T, dO v^T, p^T dO, dS^T q; + dS k
    for eqn in matmuls:
        assert dtypes(eqn.invars) == ["bfloat16"] * 2 and eqn.params["preferred_element_type"] == jnp.float32


def test_pallas_kernels_run_interpreted_only_inside_interpret_kernels(monkeypatch):
    """On a GPU the kernel must be compiled: an interpreted one gives the same numbers, orders of
    magnitude slower."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    q, k, v, mask = random_qkv(1, 64, 32, head_dim=8)
    for interpret in (False, True):
        attend = lambda q: dot_product_attention(q, k, v, key_mask=mask, backend="pallas_gpu")  # traced anew
        with interpret_kernels() if interpret else contextlib.nullcontext():
            jaxpr = jax.make_jaxpr(attend)(q).jaxpr
        calls = [eqn for eqn, _ in kernel_equations(jaxpr) if eqn.primitive.name == "pallas_call"]
        assert [bool(eqn.params["interpret"]) for eqn in calls] == [interpret]


def test_cudnn_gets_the_release_mask_bias(monkeypatch):
    """cuDNN cannot run on the CPU: its call is answered by jax's XLA attention with the same
    arguments, so the bias _cudnn_attention builds from a key mask is checked against the float64
    reference (a flipped or missing bias attends to padding, silently, on every GPU run)."""
    from pixelflow_jax.kernels import attention

    original = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *args, implementation, **kwargs: original(*args, **kwargs, implementation="xla"))
    q, k, v, mask = random_qkv(2, 16, 8, head_dim=8, dtype=jnp.bfloat16)
    got = attention._cudnn_attention(q, k, v, mask)
    assert relative_error(got, reference_attention(q, k, v, np.asarray(mask))) <= 2e-2
