"""Flash attention for NVIDIA GPUs in Pallas (Triton), forward and backward, for PixelFlow's shapes.

Layout (B, L, H, D) in and out, as attention.dot_product_attention; non-causal; an optional key
mask becomes the release's additive -10000 bias. Logits, softmax statistics and accumulators are
float32 whatever the input dtype; probabilities are cast to the input dtype before the p @ v and
gradient matmuls, as in every flash-attention kernel.

Head dimension without padding to 128: Triton tiles must have power-of-two sizes and matmuls a
contraction of at least 16, and PixelFlow's heads are 72 wide. Instead of one 128-wide tile (44%
of every matmul wasted on zeros, the bundled jax.experimental.pallas mha's approach), each head
is read as power-of-two column chunks, 72 = 64 + 16 (of which 8 are real, the rest loaded as
zeros), so matmuls run 80 columns wide.

Softmax runs in base 2 (exp2 is one instruction): logits are scaled by log2(e)/sqrt(D) and the
saved log-sum-exp is in base 2 too; the probabilities are the same.

Backward is split into two kernels so neither needs atomics: one program per key block computes
dK and dV looping over query blocks, one program per query block computes dQ looping over key
blocks. delta = rowsum(dO * O) is one XLA fusion before them.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pixelflow_jax.kernels.attention import MASKED_KEY_BIAS

LOG2_E = math.log2(math.e)
MIN_TILE = 16  # the smallest matmul dimension Triton's tensor-core dot takes

# Tile sizes and launch parameters: the fastest of the ten settings timed on an H200 (2026-12-04,
# bench/RESULTS.md; fwd+bwd 224 TFLOP/s at B8x4096, 189 at B32x1024). Every alternative was slower, the
# backward with 8 warps by 25-47%. They compile without spilling: forward 236 registers/thread, 80 KiB
# shared memory, 2 blocks per SM (bench/gpu_compile.py).
FORWARD_BLOCKS = (128, 64)  # (queries, keys) per program
BACKWARD_BLOCKS = (64, 64)
FORWARD_PARAMS = dict(num_warps=4, num_stages=3)
BACKWARD_PARAMS = dict(num_warps=4, num_stages=2)


def supports(q_len: int, kv_len: int) -> bool:
    """Both lengths must be multiples of 16 (every PixelFlow stage is); others go to XLA."""
    return q_len % MIN_TILE == 0 and kv_len % MIN_TILE == 0


def _block(length: int, preferred: int) -> int:
    """The largest power of two <= preferred that divides length (>= 16, see supports)."""
    block = preferred
    while length % block:
        block //= 2
    return block


def head_chunks(head_dim: int) -> tuple[tuple[int, int, int], ...]:
    """(start, width, real columns) chunks covering head_dim with power-of-two widths >= 16."""
    chunks, start = [], 0
    while start < head_dim:
        left = head_dim - start
        width = max(MIN_TILE, 1 << (left.bit_length() - 1))
        chunks.append((start, width, min(width, left)))
        start += width
    return tuple(chunks)


def _load_chunks(ref, rows, chunks):
    """The head columns of `rows` as a list of (rows, width) chunks; missing columns read as 0."""
    out = []
    for start, width, real in chunks:
        chunk = ref.at[rows, pl.ds(start, width)]
        if real == width:
            out.append(plgpu.load(chunk))
        else:
            out.append(plgpu.load(chunk, mask=(jnp.arange(width) < real)[None, :], other=0.0))
    return out


def _store_chunks(ref, values, chunks):
    for (start, width, real), value in zip(chunks, values):
        mask = None if real == width else (jnp.arange(width) < real)[None, :]
        plgpu.store(ref.at[:, pl.ds(start, width)], value.astype(ref.dtype), mask=mask)


def _matmul(a, b, *, transpose_a=False, transpose_b=False):
    """a @ b with float32 accumulation (full float32 precision for float32 inputs)."""
    dims = (((0,) if transpose_a else (1,)), ((1,) if transpose_b else (0,)))
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32)


def _logits_base2(q_chunks, k_chunks, bias_ref, key_rows, logit_scale):
    """(q k^T / sqrt(D) + bias) * log2(e) for one (query block, key block) tile, float32."""
    s = sum(_matmul(qc, kc, transpose_b=True) for qc, kc in zip(q_chunks, k_chunks)) * logit_scale
    if bias_ref is not None:
        s = s + plgpu.load(bias_ref.at[key_rows])[None, :]
    return s


# ---------------------------------------------------------------------------------------- forward


def _forward_kernel(*refs, chunks, block_k, logit_scale, has_bias):
    if has_bias:
        q_ref, k_ref, v_ref, bias_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), bias_ref = refs, None
    block_q = o_ref.shape[0]
    q_chunks = _load_chunks(q_ref, slice(None), chunks)

    def visit_key_block(index, carry):
        row_max, row_sum, acc = carry
        keys = pl.ds(index * block_k, block_k)
        s = _logits_base2(q_chunks, _load_chunks(k_ref, keys, chunks), bias_ref, keys, logit_scale)
        new_max = jnp.maximum(row_max, s.max(axis=1))
        rescale = jnp.exp2(row_max - new_max)
        p = jnp.exp2(s - new_max[:, None])
        row_sum = row_sum * rescale + p.sum(axis=1)
        v_chunks = _load_chunks(v_ref, keys, chunks)
        p = p.astype(v_chunks[0].dtype)
        acc = [a * rescale[:, None] + _matmul(p, vc) for a, vc in zip(acc, v_chunks)]
        return new_max, row_sum, acc

    start = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
             [jnp.zeros((block_q, width), jnp.float32) for _, width, _ in chunks])
    row_max, row_sum, acc = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, visit_key_block, start)
    _store_chunks(o_ref, [a / row_sum[:, None] for a in acc], chunks)
    plgpu.store(lse_ref, row_max + jnp.log2(row_sum))


def _padded_dim(head_dim: int) -> int:
    """The BlockSpec width of a head: a power of two covering every chunk (16 for heads under 16)."""
    return max(pl.next_power_of_2(head_dim), MIN_TILE)


def _forward(q, k, v, bias, interpret):
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block_q, block_k = _block(q_len, FORWARD_BLOCKS[0]), _block(kv_len, FORWARD_BLOCKS[1])
    width = _padded_dim(head_dim)
    q_block = pl.BlockSpec((None, block_q, None, width), lambda i, b, h: (b, i, h, 0))
    all_keys = pl.BlockSpec((None, kv_len, None, width), lambda i, b, h: (b, 0, h, 0))
    in_specs = [q_block, all_keys, all_keys]
    args = [q, k, v]
    if bias is not None:
        in_specs.append(pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)))
        args.append(bias)
    kernel = functools.partial(_forward_kernel, chunks=head_chunks(head_dim), block_k=block_k,
                               logit_scale=LOG2_E / math.sqrt(head_dim), has_bias=bias is not None)
    out, lse = pl.pallas_call(
        kernel,
        grid=(q_len // block_q, batch, heads),
        in_specs=in_specs,
        out_specs=[q_block, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)],
        compiler_params=plgpu.CompilerParams(**FORWARD_PARAMS),
        interpret=interpret,
        name="pixelflow_flash_forward",
    )(*args)
    return out, lse


# --------------------------------------------------------------------------------------- backward


def _probabilities_and_dlogits(q_chunks, k_chunks, v_chunks, do_chunks, bias_ref, key_rows, lse, delta,
                               logit_scale):
    """For one tile: p = softmax probabilities, ds = d loss / d logits = p * (dO v^T - delta)."""
    p = jnp.exp2(_logits_base2(q_chunks, k_chunks, bias_ref, key_rows, logit_scale) - lse[:, None])
    dp = sum(_matmul(dc, vc, transpose_b=True) for dc, vc in zip(do_chunks, v_chunks))
    return p, p * (dp - delta[:, None])


def _dkdv_kernel(*refs, chunks, block_q, logit_scale, softmax_scale, has_bias):
    if has_bias:
        q_ref, k_ref, v_ref, bias_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref), bias_ref = refs, None
    block_k = k_ref.shape[0]
    k_chunks, v_chunks = _load_chunks(k_ref, slice(None), chunks), _load_chunks(v_ref, slice(None), chunks)
    key_rows = pl.ds(0, block_k)

    def visit_query_block(index, carry):
        dk, dv = carry
        queries = pl.ds(index * block_q, block_q)
        q_chunks, do_chunks = _load_chunks(q_ref, queries, chunks), _load_chunks(do_ref, queries, chunks)
        p, ds = _probabilities_and_dlogits(q_chunks, k_chunks, v_chunks, do_chunks, bias_ref, key_rows,
                                           plgpu.load(lse_ref.at[queries]), plgpu.load(delta_ref.at[queries]),
                                           logit_scale)
        p, ds = p.astype(do_chunks[0].dtype), ds.astype(q_chunks[0].dtype)
        dv = [acc + _matmul(p, dc, transpose_a=True) for acc, dc in zip(dv, do_chunks)]
        dk = [acc + _matmul(ds, qc, transpose_a=True) for acc, qc in zip(dk, q_chunks)]
        return dk, dv

    zeros = [jnp.zeros((block_k, width), jnp.float32) for _, width, _ in chunks]
    dk, dv = jax.lax.fori_loop(0, q_ref.shape[0] // block_q, visit_query_block, (zeros, zeros))
    _store_chunks(dk_ref, [d * softmax_scale for d in dk], chunks)
    _store_chunks(dv_ref, dv, chunks)


def _dq_kernel(*refs, chunks, block_k, logit_scale, softmax_scale, has_bias):
    if has_bias:
        q_ref, k_ref, v_ref, bias_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref), bias_ref = refs, None
    q_chunks, do_chunks = _load_chunks(q_ref, slice(None), chunks), _load_chunks(do_ref, slice(None), chunks)
    lse, delta = plgpu.load(lse_ref), plgpu.load(delta_ref)

    def visit_key_block(index, dq):
        keys = pl.ds(index * block_k, block_k)
        k_chunks = _load_chunks(k_ref, keys, chunks)
        _, ds = _probabilities_and_dlogits(q_chunks, k_chunks, _load_chunks(v_ref, keys, chunks), do_chunks,
                                           bias_ref, keys, lse, delta, logit_scale)
        ds = ds.astype(k_chunks[0].dtype)
        return [acc + _matmul(ds, kc) for acc, kc in zip(dq, k_chunks)]

    zeros = [jnp.zeros((q_ref.shape[0], width), jnp.float32) for _, width, _ in chunks]
    dq = jax.lax.fori_loop(0, k_ref.shape[0] // block_k, visit_key_block, zeros)
    _store_chunks(dq_ref, [d * softmax_scale for d in dq], chunks)


def _backward(q, k, v, bias, out, lse, d_out, interpret):
    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    block_q, block_k = _block(q_len, BACKWARD_BLOCKS[0]), _block(kv_len, BACKWARD_BLOCKS[1])
    width = _padded_dim(head_dim)
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), d_out.astype(jnp.float32))
    common = dict(chunks=head_chunks(head_dim), logit_scale=LOG2_E / math.sqrt(head_dim),
                  softmax_scale=1.0 / math.sqrt(head_dim), has_bias=bias is not None)
    params = plgpu.CompilerParams(**BACKWARD_PARAMS)
    bias_args = [] if bias is None else [bias]

    # dK, dV: program (key block j, b, h) sees all queries.
    all_queries = pl.BlockSpec((None, q_len, None, width), lambda j, b, h: (b, 0, h, 0))
    key_block = pl.BlockSpec((None, block_k, None, width), lambda j, b, h: (b, j, h, 0))
    query_stats = pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0))
    bias_specs = [] if bias is None else [pl.BlockSpec((None, block_k), lambda j, b, h: (b, j))]
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, block_q=block_q, **common),
        grid=(kv_len // block_k, batch, heads),
        in_specs=[all_queries, key_block, key_block, *bias_specs, all_queries, query_stats, query_stats],
        out_specs=[key_block, key_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="pixelflow_flash_backward_dkdv",
    )(q, k, v, *bias_args, d_out, lse, delta)

    # dQ: program (query block i, b, h) sees all keys.
    query_block = pl.BlockSpec((None, block_q, None, width), lambda i, b, h: (b, i, h, 0))
    all_keys = pl.BlockSpec((None, kv_len, None, width), lambda i, b, h: (b, 0, h, 0))
    stats_block = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    bias_specs = [] if bias is None else [pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0))]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=block_k, **common),
        grid=(q_len // block_q, batch, heads),
        in_specs=[query_block, all_keys, all_keys, *bias_specs, query_block, stats_block, stats_block],
        out_specs=query_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="pixelflow_flash_backward_dq",
    )(q, k, v, *bias_args, d_out, lse, delta)
    return dq, dk, dv


# ------------------------------------------------------------------------------------ entry point


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _flash(q, k, v, bias, interpret):
    return _forward(q, k, v, bias, interpret)[0]


def _flash_forward(q, k, v, bias, interpret):
    out, lse = _forward(q, k, v, bias, interpret)
    return out, (q, k, v, bias, out, lse)


def _flash_backward(interpret, residuals, d_out):
    q, k, v, bias, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, bias, out, lse, d_out, interpret)
    return dq, dk, dv, None if bias is None else jnp.zeros_like(bias)  # the mask is not trained


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, *,
                    interpret: bool = False) -> jax.Array:
    """(B, Lq, H, D) attention like attention._xla_attention on this module's kernels (one device's
    arrays: attention.py splits batch and heads over a mesh)."""
    if not supports(q.shape[1], k.shape[1]):
        raise ValueError(f"pallas_gpu attention needs lengths that are multiples of {MIN_TILE}, "
                         f"got {q.shape[1]} queries and {k.shape[1]} keys")
    # Bias in the kernel's base-2 logit units: -10000 * log2(e) on padded keys.
    bias = None if key_mask is None else (1.0 - key_mask.astype(jnp.float32)) * (MASKED_KEY_BIAS * LOG2_E)
    return _flash(q, k, v, bias, interpret)
