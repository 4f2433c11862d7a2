"""Moving between the cascade's resolutions, shared by training (each stage's start and end
images) and sampling (a stage's result upsampled to start the next)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def downsample_2x(x: jax.Array) -> jax.Array:
    """Mean of each 2x2 block of (B, H, W, C) (torch's bilinear halving, align_corners=False)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def upsample_2x(x: jax.Array) -> jax.Array:
    """Nearest-neighbour x2 of (B, H, W, C): each pixel becomes a 2x2 block."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
