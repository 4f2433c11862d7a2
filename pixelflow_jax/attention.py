"""One attention function for the whole model, with interchangeable backends.

Layout is (batch, length, heads, head_dim) in and out; the softmax scale is 1/sqrt(head_dim);
attention is never causal. Only the 'xla' reference backend exists so far; faster kernels
(cuDNN, Pallas, TPU splash) register here behind the same signature.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

# The release turns a 0/1 text mask into an additive bias of -10000 on the padded keys (not -inf),
# so a row whose keys are all padding still attends uniformly instead of producing NaNs.
MASKED_KEY_BIAS = -10000.0


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        bias = (1.0 - key_mask.astype(jnp.float32)) * MASKED_KEY_BIAS
        logits = logits + bias[:, None, None, :]
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32).astype(q.dtype)


BACKENDS: dict[str, Callable[..., jax.Array]] = {"xla": _xla_attention}


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    key_mask: jax.Array | None = None,
    backend: str = "xla",
) -> jax.Array:
    """softmax(q k^T / sqrt(d) + mask_bias) v.

    q: (B, Lq, H, D); k, v: (B, Lk, H, D); key_mask: optional (B, Lk), 1 = real key, 0 = padding.
    Returns (B, Lq, H, D) in q's dtype. Logits and softmax run in float32 whatever the input dtype.
    """
    if q.ndim != 4 or k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(f"attention expects q (B, Lq, H, D) and k, v (B, Lk, H, D); got {q.shape}, {k.shape}, {v.shape}")
    if key_mask is not None and key_mask.shape != k.shape[:2]:
        raise ValueError(f"key_mask must have shape (B, Lk) = {k.shape[:2]}, got {key_mask.shape}")
    try:
        kernel = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; available: {sorted(BACKENDS)}") from None
    return kernel(q, k, v, key_mask)
