"""2D rotary position embedding with the release's conventions (diffusers get_2d_rotary_pos_embed).

Tokens are the stage's own patch grid in row-major order with integer coordinates. The first
head_dim/2 channels rotate with the token's column index, the last head_dim/2 with its row index;
within each half, frequency j (j < head_dim/4) is 1 / 10000^(4j / head_dim), repeated for the two
members of each interleaved pair (x[2i], x[2i+1]).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pixelflow_jax.kernels.attention import target_platform

ROPE_THETA = 10000.0


@functools.lru_cache(maxsize=None)
def rope_tables(grid_size: int, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin), each (grid_size**2, head_dim) float32, for a square grid of patch tokens.

    Computed in float32 like the release, so the tables match its to the last bit or two.
    Static per stage: under jit they become constants.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    axis_dim = head_dim // 2
    freqs = 1.0 / (np.float32(ROPE_THETA) ** (np.arange(0, axis_dim, 2, dtype=np.float32) / np.float32(axis_dim)))
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    angles = []
    for coordinate in (cols.reshape(-1), rows.reshape(-1)):  # column half first, then row half
        angle = np.outer(coordinate.astype(np.float32), freqs.astype(np.float32))
        angles.append(np.repeat(angle, 2, axis=1))
    angle = np.concatenate(angles, axis=1)
    return np.cos(angle).astype(np.float32), np.sin(angle).astype(np.float32)


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of x (B, L, H, D) by the per-token angles, (x[2i], x[2i+1]) ->
    (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin); float32 math, x's dtype out. The tables are
    rope_tables', whose two members of a pair hold the same angle."""
    return _rotate(x, cos, sin)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """apply_rope's values. Each channel's partner is read by shifting the heads' channels, all
    H x D side by side as the projection wrote them, one place either way, with the sine zero where
    the shift brings in another pair's (or head's) channel; not by pairing the channels in a
    trailing axis of 2. The shifts move x in its own dtype (half the bytes of float32 for bf16).
    The same products and sums as the paired form, in either view of the tables below."""
    batch, tokens, heads, head_dim = x.shape
    flat = x.reshape(batch, tokens, heads * head_dim)
    if target_platform() == "tpu":
        # A TPU lays an array's last axis out over 128 lanes: a (..., H, 72) view of q and k is a
        # relayout copy each way (bench/RESULTS.md), so the tables are tiled to all H x D channels.
        view = lambda channels: channels
        per_channel = lambda table: jnp.tile(table, (1, heads))
    else:
        # Elsewhere the (..., H, D) view is free and the tables stay (L, D), broadcast inside the
        # kernels. Tiled, an H200 training step read them from HBM each layer, and with the flat
        # view's reshapes cancelled XLA dropped the gradient's bf16 rounding as excess precision
        # and passed it on in float32: +20 GB a step (bench/RESULTS.md).
        view = lambda channels: channels.reshape(x.shape)
        per_channel = lambda table: table[:, None, :]
    even = np.arange(head_dim) % 2 == 0
    next_sin = per_channel(jnp.where(even, -sin, 0.0))  # x[2i] takes -x[2i+1] sin
    previous_sin = per_channel(jnp.where(even, 0.0, sin))  # x[2i+1] takes x[2i] sin
    shifted = lambda shift: view(jnp.roll(flat, shift, axis=-1)).astype(jnp.float32)
    rotated = shifted(-1) * next_sin + shifted(1) * previous_sin
    out = view(flat).astype(jnp.float32) * per_channel(cos) + rotated
    return out.reshape(x.shape).astype(x.dtype)


def _apply_rope_forward(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _apply_rope_backward(tables, cotangent):
    """The transpose of a rotation is the rotation by minus its angle: one float32 pass over the
    cotangent, rounded to x's dtype once (differentiated through, the shifts of x's dtype rounded
    each of the three terms to bf16 before their sum)."""
    cos, sin = tables
    return _rotate(cotangent, cos, -sin), None, None


apply_rope.defvjp(_apply_rope_forward, _apply_rope_backward)
