"""TPU splash attention (Pallas Mosaic) for PixelFlow's shapes, behind attention.dot_product_attention.

The kernel works per example on (heads, length, head_dim); this wrapper vmaps it over the batch,
pre-scales q (the kernel does not scale), pads head_dim to a multiple of 128 with zeros (zero
columns add nothing to q k^T, and the padded output columns are dropped), turns a key mask into
segment ids (query id 1, real keys 1, padding 0). It runs on one device's arrays: attention.py
splits the batch and heads over the mesh (sharding.map_attention_over_mesh).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LANES = 128  # TPU vector width: kernel blocks and head_dim are multiples of it
BLOCK_CHOICES = (512, 256, 128)


def supports(q_len: int, kv_len: int) -> bool:
    """Splash needs both lengths to be multiples of 128; shorter stages (64 tokens) go to XLA."""
    return q_len % LANES == 0 and kv_len % LANES == 0


def _block(length: int) -> int:
    return next(b for b in BLOCK_CHOICES if length % b == 0)


def _per_device(q, k, v, key_mask, *, interpret: bool):
    """q: (B, H, Lq, Dp), k/v: (B, H, Lk, Dp) already scaled and padded; key_mask: (B, Lk) or None."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    heads, q_len, kv_len = q.shape[1], q.shape[2], k.shape[2]
    bq, bkv = _block(q_len), _block(kv_len)
    blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                               block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    mask = splash.MultiHeadMask([splash.FullMask((q_len, kv_len))] * heads)
    kernel = splash.make_splash_mha(mask, block_sizes=blocks, head_shards=1, q_seq_shards=1, interpret=interpret)
    if key_mask is None:
        return jax.vmap(kernel)(q, k, v)

    def one_example(q, k, v, keys):
        real = keys > 0
        # All padding: the release's -10000 on every key cancels in the softmax (the row attends to
        # all keys), where segment ids would leave the row no key at all.
        real = jnp.where(real.any(), real, True)
        ids = splash.SegmentIds(q=jnp.ones((q_len,), jnp.int32), kv=real.astype(jnp.int32))
        return kernel(q, k, v, segment_ids=ids)

    return jax.vmap(one_example)(q, k, v, key_mask)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, *,
                     interpret: bool = False) -> jax.Array:
    """(B, Lq, H, D) attention like attention._xla_attention, on the splash kernel."""
    if not supports(q.shape[1], k.shape[1]):
        raise ValueError(f"splash attention needs lengths that are multiples of {LANES}, got {q.shape[1]} queries and "
                         f"{k.shape[1]} keys: use attention.dot_product_attention, which runs XLA for those")
    head_dim = q.shape[-1]
    padded = -(-head_dim // LANES) * LANES
    pad = [(0, 0)] * 3 + [(0, padded - head_dim)]
    to_kernel = lambda t: jnp.pad(t, pad).transpose(0, 2, 1, 3)  # (B, H, L, Dp)
    q = (q * (1.0 / math.sqrt(head_dim))).astype(q.dtype)
    q, k, v = to_kernel(q), to_kernel(k), to_kernel(v)
    return _per_device(q, k, v, key_mask, interpret=interpret).transpose(0, 2, 1, 3)[..., :head_dim]
