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


@jax.custom_jvp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of x (B, L, H, D) by the per-token angles, (x[2i], x[2i+1]) ->
    (x[2i] cos - x[2i+1] sin, x[2i+1] cos + x[2i] sin); float32 math, x's dtype out. The tables are
    rope_tables', whose two members of a pair hold the same angle."""
    return _rotate(x, cos, sin)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array, *, traced_mask: bool = False,
            platform: str | None = None) -> jax.Array:
    """apply_rope's values. Each channel's partner is read by shifting the heads' channels, all
    H x D side by side as the projection wrote them, one place either way, with the sine zero where
    the shift brings in another pair's (or head's) channel; not by pairing the channels in a
    trailing axis of 2. The shifts move x in its own dtype (half the bytes of float32 for bf16).
    The same products and sums as the paired form, in either view of the tables below.
    traced_mask: the mask of each pair's first channel made by jax, not numpy, as inside a
    jax.checkpoint, where reverse mode would keep a numpy array as a residual of its own.
    platform: the one traced for (default: target_platform())."""
    batch, tokens, heads, head_dim = x.shape
    flat = x.reshape(batch, tokens, heads * head_dim)
    if (platform or target_platform()) == "tpu":
        # A TPU lays an array's last axis out over 128 lanes: a (..., H, 72) view of q and k is a
        # relayout copy each way (bench/RESULTS.md), so the tables are tiled to all H x D channels.
        in_view = flat
        per_channel = lambda table: jnp.tile(table, (1, heads))
    else:
        # Elsewhere the (..., H, D) view is free and the tables stay (L, D), broadcast inside the
        # kernels. Tiled, an H200 training step read them from HBM each layer, and with the flat
        # view's reshapes cancelled XLA dropped the gradient's bf16 rounding as excess precision
        # and passed it on in float32: +20 GB a step (bench/RESULTS.md).
        in_view = x
        per_channel = lambda table: table[:, None, :]
    view = lambda channels: channels.reshape(in_view.shape)
    # numpy otherwise: with the model's concrete tables jax computes the masked ones once, while
    # tracing; computed in the program, stage 3's sampling took 0.3 GB more (an H200's plan)
    even = (jnp if traced_mask else np).arange(head_dim) % 2 == 0
    next_sin = per_channel(jnp.where(even, -sin, 0.0))  # x[2i] takes -x[2i+1] sin
    previous_sin = per_channel(jnp.where(even, 0.0, sin))  # x[2i+1] takes x[2i] sin
    shifted = lambda shift: view(jnp.roll(flat, shift, axis=-1)).astype(jnp.float32)
    rotated = shifted(-1) * next_sin + shifted(1) * previous_sin
    # Each channel's own value from x as viewed, not viewed afresh: reverse mode (the tangent's
    # transpose) then sums the three terms in the view, not reshaped from another. On a GPU, summed
    # in the flat channels, the reshapes each way cancelled and XLA passed q's and k's gradients on
    # unrounded, in float32 (+1.5 GB a step of batch 8, an H200's plan); on a TPU, summed in the
    # (..., H, D) shape, it relaid them out (+14 GB a step of batch 8, a v5p's plan).
    out = in_view.astype(jnp.float32) * per_channel(cos) + rotated
    return out.reshape(x.shape).astype(x.dtype)


@apply_rope.defjvp
def _apply_rope_jvp(primals, tangents):
    """The tangent is x's tangent rotated alike, in float32 from the start and rounded to x's dtype
    once: reverse mode transposes that rotation into the rotation of the cotangent by minus the
    angle, rounded once (shifted in x's dtype, its transpose rounded each of the three terms to
    bf16 before their sum). The tables are constants (rope_tables): no tangent flows to them."""
    x, cos, sin = primals
    return _rotate(x, cos, sin), _rotate_in_float32(tangents[0], cos, sin, target_platform())


# Nothing saveable: reverse mode keeps the tables as they are, not the three per-channel tables
# derived from them (tiled over the heads on a TPU). prevent_cse=False: no optimization barrier.
# The platform is a static argument, not read inside: jax.checkpoint keeps one trace per argument
# types, and a process tracing for a TPU, then a GPU (the tests, bench/gpu_compile.py) reused the
# TPU's channel layout in the GPU's backward pass.
@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False,
                   static_argnums=(3,))
def _rotate_in_float32(tangent: jax.Array, cos: jax.Array, sin: jax.Array, platform: str) -> jax.Array:
    return _rotate(tangent.astype(jnp.float32), cos, sin, traced_mask=True, platform=platform).astype(tangent.dtype)
