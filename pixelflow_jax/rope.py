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


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of x (B, L, H, D) by the per-token angles; float32 math, x's dtype out."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)
