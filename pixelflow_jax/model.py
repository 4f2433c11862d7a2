"""PixelFlow's transformer in Flax NNX (eval-mode forward on dense NHWC batches, one stage at a time).

Module and attribute names mirror the release's state-dict keys (`transformer_blocks.attn1.q_proj`
...), so the converter is a mechanical renaming. The blocks are created stacked (a leading depth
axis on every block parameter) and run with `lax.scan`: one compiled block instead of `depth`.

Numerics follow the release under bf16 autocast: matmuls and the residual stream in the compute
dtype; adaLN modulation, LayerNorm, RMSNorm, RoPE and softmax in float32. The conditioning vector
is float32 too, where the release's in-place add rounds it to bf16 (README, Numerics).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.interpreters import ad

from pixelflow_jax.config import ModelConfig, numpy_broadcasting
from pixelflow_jax.kernels.attention import (ATTENTION_FORWARD_PRIMITIVES, dot_product_attention,
                                              fused_kernels_refused, resolve_backend, tracing_modes)
from pixelflow_jax.rope import apply_rope, rope_tables
from pixelflow_jax.sharding import check_auto_axes_only, keep_batch_split
from pixelflow_jax.validation import class_ids

NORM_EPS = 1e-6
SINUSOID_DIM = 256

xavier_uniform = jax.nn.initializers.xavier_uniform()
zeros = jax.nn.initializers.zeros
normal_002 = jax.nn.initializers.normal(stddev=0.02)


def sinusoidal_embedding(values: jax.Array, dim: int = SINUSOID_DIM) -> jax.Array:
    """diffusers Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=1): [cos, sin] of
    values * exp(-ln(10000) i / (dim/2 - 1)), in float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - 1))
    args = values.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def layer_norm(x: jax.Array) -> jax.Array:
    """LayerNorm without affine parameters (eps 1e-6), in float32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + NORM_EPS)


def modulate(normed: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return normed * (1.0 + scale) + shift


@jax.custom_jvp
def square(x: jax.Array) -> jax.Array:
    """jnp.square, whose derivative keeps x for the backward pass rather than a new array 2 * x.

    RMSNorm squares its float32 input, which the backward pass keeps anyway; jnp.square's
    derivative would keep a second float32 copy (2 * x) per norm in every block. Same values and
    gradients bit for bit: x * (2 * ct) and 2 * (x * ct) round alike (doubling is exact)."""
    return jnp.square(x)


@square.defjvp
def _square_jvp(primals, tangents):
    (x,), (tangent,) = primals, tangents
    return square(x), 2.0 * (x * tangent)


GELU_CUBIC = 0.044715  # the tanh approximation: gelu(x) = x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))


@jax.custom_jvp
def gelu(x: jax.Array) -> jax.Array:
    """GELU (tanh approximation), jax.nn.gelu's values, whose backward pass keeps only x.

    Differentiated as is, jax.nn.gelu keeps four arrays of the MLP's 4C-wide hidden layer besides
    its input and output (x**2, tanh(...), ...). Recomputed under jax.checkpoint instead, on a GPU
    XLA wrote the tanh out in a kernel of its own for the gradient's kernel to read back (two
    hidden-sized passes a layer, bench/RESULTS.md); the derivative written as one expression of x
    is one kernel. A jvp rule (not a custom_vjp) so that jax.jvp runs too: reverse mode transposes
    it into that kernel."""
    return jax.nn.gelu(x, approximate=True)


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (tangent,) = primals, tangents
    return gelu(x), _times_gelu_derivative(x, tangent)


# Nothing saveable: reverse mode keeps x and recomputes the derivative in the backward pass, rather
# than keep it, a float32 array of the hidden layer's size. prevent_cse=False: no optimization
# barrier (the backward pass has nothing of the forward's to merge with it).
@functools.partial(jax.checkpoint, policy=jax.checkpoint_policies.nothing_saveable, prevent_cse=False)
def _times_gelu_derivative(x: jax.Array, tangent: jax.Array) -> jax.Array:
    """tangent x gelu'(x) in one float32 pass, rounded to x's dtype once; linear in the tangent,
    so its transpose, the backward pass, is cotangent x gelu'(x), rounded once too:
    gelu'(x) = (1 + t)/2 + x/2 (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2), t = tanh(sqrt(2/pi) (x + 0.044715 x^3))."""
    xf = x.astype(jnp.float32)
    slope_of_inner = math.sqrt(2 / math.pi) * (1 + 3 * GELU_CUBIC * xf * xf)
    t = jnp.tanh(math.sqrt(2 / math.pi) * (xf + GELU_CUBIC * xf * xf * xf))
    derivative = 0.5 * (1 + t) + 0.5 * xf * (1 - t * t) * slope_of_inner
    return (tangent.astype(jnp.float32) * derivative).astype(x.dtype)


def _linear(cfg: ModelConfig, in_features: int, out_features: int, rngs: nnx.Rngs, *,
            use_bias: bool = True, kernel_init=xavier_uniform) -> nnx.Linear:
    return nnx.Linear(in_features, out_features, use_bias=use_bias, dtype=cfg.compute_dtype,
                      param_dtype=cfg.parameter_dtype, kernel_init=kernel_init, bias_init=zeros, rngs=rngs)


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, computed in float32, returned in x's dtype (eps 1e-6)."""

    def __init__(self, dim: int, cfg: ModelConfig):
        self.weight = nnx.Param(jnp.ones((dim,), cfg.parameter_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        # The barrier keeps the reduction a kernel of its own, writing one number per token, so XLA
        # fuses the scaling into the consumer (q's and k's RoPE). Fused with the reduction, the norm
        # wrote its output in float32 for RoPE to read back: on a GPU 1.8 of a stage-3 layer's 9.5 GB
        # of elementwise traffic (bench/RESULTS.md). The same values, bit for bit.
        inv_rms = jax.lax.optimization_barrier(jax.lax.rsqrt(square(xf).mean(-1, keepdims=True) + NORM_EPS))
        normed = xf * inv_rms
        return (self.weight[...].astype(jnp.float32) * normed).astype(x.dtype)


def _is_norm_scale(path, value) -> bool:
    """An RMSNorm's scale among a block's parameters (the only ones named weight)."""
    return path[-1] == "weight"


class TimestepEmbedding(nnx.Module):
    """Linear(256, C) -> SiLU -> Linear(C, C) on a sinusoidal embedding."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.linear_1 = _linear(cfg, SINUSOID_DIM, cfg.hidden_size, rngs, kernel_init=normal_002)
        self.linear_2 = _linear(cfg, cfg.hidden_size, cfg.hidden_size, rngs, kernel_init=normal_002)

    def __call__(self, values: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(sinusoidal_embedding(values))))


class LabelEmbedding(nnx.Module):
    """Class table with one extra row: id num_classes is the null (unconditional) class."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.embedding_table = nnx.Embed(cfg.num_classes + 1, cfg.hidden_size, param_dtype=cfg.parameter_dtype,
                                         embedding_init=normal_002, rngs=rngs)

    def __call__(self, labels: jax.Array) -> jax.Array:
        return self.embedding_table(labels)


class PatchEmbed(nnx.Module):
    """The release's Conv2d(in, C, p, stride p) as a matmul on (ph, pw, c)-ordered patch vectors."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.patch_size = cfg.patch_size
        self.proj = _linear(cfg, cfg.patch_size**2 * cfg.in_channels, cfg.hidden_size, rngs)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.proj(patchify(images, self.patch_size))


def patchify(images: jax.Array, p: int) -> jax.Array:
    """(B, H, W, c) -> (B, (H/p)(W/p), p*p*c), tokens row-major, each patch in (ph, pw, c) order."""
    b, h, w, c = images.shape
    x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, grid: int, p: int) -> jax.Array:
    """(B, grid*grid, p*p*c) with (ph, pw, c) patches -> (B, grid*p, grid*p, c)."""
    b, _, d = tokens.shape
    c = d // (p * p)
    x = tokens.reshape(b, grid, grid, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, grid * p, grid * p, c)


class AdaLayerNorm(nnx.Module):
    """adaLN-Zero modulation of a block: Linear(SiLU(c)) -> 6 x (B, 1, C) float32 vectors, in the
    release's order shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.linear = _linear(cfg, cfg.hidden_size, 6 * cfg.hidden_size, rngs, kernel_init=zeros)

    def __call__(self, conditioning: jax.Array) -> tuple[jax.Array, ...]:
        emb = self.linear(jax.nn.silu(conditioning)).astype(jnp.float32)[:, None, :]
        return tuple(jnp.split(emb, 6, axis=-1))


class Attention(nnx.Module):
    """Multi-head attention with RMSNorm over the full q and k projections, then 2D RoPE.

    Self-attention rotates q and k; cross-attention (`context` given) rotates q only, since its
    keys are text tokens, and takes an optional 0/1 key mask for padded text.
    """

    def __init__(self, cfg: ModelConfig, kv_dim: int, rngs: nnx.Rngs):
        inner = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.attention_head_dim
        self.backend = cfg.attention
        self.q_proj = _linear(cfg, cfg.hidden_size, inner, rngs, use_bias=cfg.attention_bias)
        self.k_proj = _linear(cfg, kv_dim, inner, rngs, use_bias=cfg.attention_bias)
        self.v_proj = _linear(cfg, kv_dim, inner, rngs, use_bias=cfg.attention_bias)
        self.o_proj = _linear(cfg, inner, cfg.hidden_size, rngs, use_bias=cfg.attention_bias)
        self.q_norm = RMSNorm(inner, cfg)
        self.k_norm = RMSNorm(inner, cfg)

    def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array], context: jax.Array | None = None,
                 key_mask: jax.Array | None = None) -> jax.Array:
        kv_input = x if context is None else context
        # Each image's projections on its own device (keep_batch_split: FSDP gathers the weights).
        q = self.q_norm(keep_batch_split(self.q_proj(x)))
        k = self.k_norm(keep_batch_split(self.k_proj(kv_input)))
        v = keep_batch_split(self.v_proj(kv_input))
        split_heads = lambda t: t.reshape(*t.shape[:2], self.num_heads, self.head_dim)
        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        q = apply_rope(q, *rope)
        if context is None:
            k = apply_rope(k, *rope)
        out = keep_batch_split(dot_product_attention(q, k, v, key_mask=key_mask, backend=self.backend))
        return keep_batch_split(self.o_proj(out.reshape(*x.shape[:2], -1)))


class FeedForward(nnx.Module):
    """Linear(C, 4C) -> GELU (tanh approximation) -> Linear(4C, C)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.fc1 = _linear(cfg, cfg.hidden_size, 4 * cfg.hidden_size, rngs)
        self.fc2 = _linear(cfg, 4 * cfg.hidden_size, cfg.hidden_size, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return keep_batch_split(self.fc2(keep_batch_split(gelu(self.fc1(x)))))


class TransformerBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.norm1 = AdaLayerNorm(cfg, rngs)
        self.attn1 = Attention(cfg, cfg.hidden_size, rngs)
        if cfg.cross_attention_dim:
            self.norm2 = RMSNorm(cfg.hidden_size, cfg)
            self.attn2 = Attention(cfg, cfg.cross_attention_dim, rngs)
        self.norm3 = RMSNorm(cfg.hidden_size, cfg)
        self.mlp = FeedForward(cfg, rngs)

    def __call__(self, x: jax.Array, conditioning: jax.Array, rope: tuple[jax.Array, jax.Array],
                 text: jax.Array | None = None, text_mask: jax.Array | None = None) -> jax.Array:
        dtype = x.dtype
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(conditioning)

        h = modulate(layer_norm(x), shift_msa, scale_msa).astype(dtype)
        x = x + (gate_msa * self.attn1(h, rope).astype(jnp.float32)).astype(dtype)

        if text is not None:  # cross-attention: no gate, no modulation
            x = x + self.attn2(self.norm2(x), rope, context=text, key_mask=text_mask)

        h = modulate(self.norm3(x).astype(jnp.float32), shift_mlp, scale_mlp).astype(dtype)
        return x + (gate_mlp * self.mlp(h).astype(jnp.float32)).astype(dtype)


def keep_matmul_and_attention_outputs(prim, *args, **params) -> bool:
    """Remat policy 'dots_attention': the backward pass keeps the outputs of the linear layers
    (as 'dots' does) and of the fused attention kernels' forward, and recomputes the rest, all
    elementwise (norms, modulation, RoPE, GELU, residual adds): no matmul or attention runs twice.
    With the xla attention backend, whose attention is batched matmuls, it is 'dots'."""
    return (prim.name in ATTENTION_FORWARD_PRIMITIVES
            or jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params))


def forward_mode_refusal(cfg: ModelConfig) -> str:
    """Why forward mode (jax.jvp) is refused, for a model whose attention kernel has a custom backward pass."""
    backend = repr(cfg.attention)
    if cfg.attention == "auto":  # cuDNN on a GPU, splash on a TPU
        backend += f" ({resolve_backend('auto', cfg.compute_dtype)} here)"
    return (f"attention backend {backend} has a custom backward pass (jax.custom_vjp), which jax cannot differentiate "
            "in forward mode (jax.jvp, jax.jacfwd, jax.hessian): load the model with attention='xla' "
            "(load_model(path, attention='xla'), or ModelConfig(..., attention='xla')), or use reverse mode "
            "(jax.grad, jax.vjp, jax.jacrev)")


def in_forward_mode(value) -> bool:
    """Whether jax differentiates value in forward mode: it is jax.jvp's tracer (jacfwd's, hessian's),
    jax.linearize's, or wraps one (inside jax.grad of a loss holding a jvp, or jax.vmap). jax.grad's
    and jax.vjp's own tracers, linearize's too but marked is_vjp, are reverse mode."""
    while isinstance(value, jax.core.Tracer):
        if isinstance(value, ad.JVPTracer) or getattr(value._trace, "is_vjp", True) is False:
            return True
        value = getattr(value, "primal", getattr(value, "val", None))  # what a linearize or vmap tracer wraps
    return False


# What jax.checkpoint keeps of a block for the backward pass, per model.remat other than 'none'
# ('full': only the block's input).
REMAT_POLICY = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
                "dots_attention": keep_matmul_and_attention_outputs}


def traced_list_as_array(value):
    """A list or tuple holding tracers (a list argument under jit is a pytree of traced scalars,
    which numpy cannot read: a TracerArrayConversionError) as one traced array; anything else as
    given, so that a concrete list keeps its own checks (a bool among class ids)."""
    if isinstance(value, (list, tuple)) and any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(value)):
        return jnp.asarray(value)
    return value


def readable_here(value) -> bool:
    """Whether an input's entries can be checked on this host: not traced, nor spread over several
    processes (a sampling job checks those), nor absent."""
    return value is not None and not isinstance(value, jax.core.Tracer) and getattr(value, "is_fully_addressable",
                                                                                    True)


def checked_text_mask(mask, text_shape: tuple[int, int]) -> jax.Array | np.ndarray:
    """encoder_attention_mask as an array of text_shape; outside jit, of 1s (tokens) and 0s
    (padding) only. A list failed inside the attention kernel, and an additive mask (0 and -10000
    or -inf, which some pipelines pass on) or a NaN gave other velocities without a word."""
    mask = mask if isinstance(mask, (jax.Array, np.ndarray)) else np.asarray(mask)
    if mask.shape != text_shape:
        raise ValueError(f"encoder_attention_mask must be (B, L_text) = {text_shape}, like encoder_hidden_states, got "
                         f"shape {mask.shape}")
    if not readable_here(mask):  # under jit the values are not known
        return mask
    values = np.asarray(mask)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(f"encoder_attention_mask must hold 1 for a caption's tokens and 0 for its padding (the "
                         f"tokenizer's attention_mask), got {np.unique(values[~np.isin(values, (0, 1))])[:5].tolist()}: "
                         "the model makes the additive bias itself")
    return mask


def run_blocks(x: jax.Array, layer_xs, context, *, block_graph, scale_tree, scale_splits: tuple[int, ...],
               remat: str, refusal: str | None) -> jax.Array:
    """x through the stacked blocks: one lax.scan over the layers. layer_xs: (each layer's parameters
    but its RMSNorm scales, the scales concatenated along their last axis, split at scale_splits into
    the leaves of scale_tree); context: (conditioning, rope, text, text mask), what every block reads;
    refusal: fused_kernels_refused's while the layers are traced."""
    conditioning, rope, text, text_mask = context

    def one_block(h, layer):
        layer_params, layer_scales = layer
        layer_scales = jax.tree.unflatten(scale_tree, jnp.split(layer_scales, scale_splits, axis=-1))
        block = nnx.merge(block_graph, layer_scales, layer_params)
        h = block(keep_batch_split(h), conditioning, rope, text, text_mask)
        return keep_batch_split(h), None

    if remat != "none":
        # prevent_cse=False (jax's advice for scans: forward and recomputation are separate loops,
        # nothing to merge): the default's optimization barrier over the block's inputs kept XLA
        # from fusing each layer's slice of the saved residuals and weights into its consumers in
        # the backward loop, a copy of every row instead (bench/RESULTS.md). Same values and
        # gradients bit for bit (3-layer models, CPU).
        one_block = jax.checkpoint(one_block, policy=REMAT_POLICY[remat], prevent_cse=False)
    with fused_kernels_refused(refusal):
        return jax.lax.scan(one_block, x, layer_xs)[0]


# A call outside any jax transformation runs the blocks through this jit, which keeps their program:
# lax.scan keeps a trace per body function, and run_blocks' body is a new closure each call, so the
# scan was traced and compiled again at every eager call (the full-size model 5.8 s a call at 32 x 32,
# 4.6 s of it compiling). jit's key holds the arguments' shapes, dtypes and placement, the mesh in
# context and jax's settings; the static arguments hold the rest that the trace reads: the blocks'
# structure, the forward-mode refusal, and the kernels' modes (tracing_modes(): interpret_kernels, and
# compiling_for, which chooses 'auto's backend and RoPE's layout), which the trace reads from module
# state, so they are given for the key alone.
@functools.partial(jax.jit, static_argnames=("block_graph", "scale_tree", "scale_splits", "remat", "refusal",
                                             "kernel_modes"))
def run_blocks_eagerly(x: jax.Array, layer_xs, context, *, block_graph, scale_tree, scale_splits: tuple[int, ...],
                       remat: str, refusal: str | None, kernel_modes: tuple[bool, str | None]) -> jax.Array:
    del kernel_modes  # in the key only
    return run_blocks(x, layer_xs, context, block_graph=block_graph, scale_tree=scale_tree,
                      scale_splits=scale_splits, remat=remat, refusal=refusal)


class PixelFlow(nnx.Module):
    """The cascade transformer. One call predicts the velocity for a batch at one stage:

        v = model(images, timesteps, class_labels=...)             # class-conditional
        v = model(images, timesteps, encoder_hidden_states=..., encoder_attention_mask=...)  # text

    images (B, H, W, in_channels) with H == W a multiple of patch_size; the stage's latent size
    (H / patch_size) and its RoPE grid follow from the shape. timesteps (B,) in the release's
    [0, num_train_timesteps) units. encoder_attention_mask (B, L_text): 1 for a caption's tokens,
    0 for padding. Returns float32 (B, H, W, out_channels). On several devices, a mesh of Auto axes
    splits the batch. Differentiable in reverse mode (jax.grad, jax.vjp) and, with attention 'xla',
    forward mode (jax.jvp, jax.jacfwd): the fused attention kernels have custom backward passes.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        # A dict (a config file's config.model) or rngs=0 failed inside the first layer, naming neither.
        if not isinstance(cfg, ModelConfig):
            hint = ("ModelConfig.from_mapping(values) builds one from a dict or a config's config.model"
                    if hasattr(cfg, "keys") else "ModelConfig(num_attention_heads=..., ...)")
            raise TypeError(f"cfg must be a ModelConfig, got a {type(cfg).__name__}: {hint}")
        if not isinstance(rngs, nnx.Rngs):
            raise TypeError(f"rngs must be a flax.nnx.Rngs (the initialisation's seed), got {rngs!r}: pass "
                            "rngs=nnx.Rngs(0)")
        self.config = cfg
        self.patch_embed = PatchEmbed(cfg, rngs)
        self.timestep_embedder = TimestepEmbedding(cfg, rngs)
        self.latent_size_embedder = TimestepEmbedding(cfg, rngs)
        if cfg.num_classes > 0:
            self.class_embedder = LabelEmbedding(cfg, rngs)
        if cfg.pooled_text:  # this project's addition (not the release's): see _pooled_text
            self.text_pool_proj = _linear(cfg, cfg.cross_attention_dim, cfg.hidden_size, rngs)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(layer_rngs: nnx.Rngs) -> TransformerBlock:
            return TransformerBlock(cfg, layer_rngs)

        self.transformer_blocks = stacked_blocks(rngs)
        self.proj_out_1 = _linear(cfg, cfg.hidden_size, 2 * cfg.hidden_size, rngs, kernel_init=zeros)
        self.proj_out_2 = _linear(cfg, cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels, rngs, kernel_init=zeros)

    @numpy_broadcasting
    def __call__(self, images: jax.Array, timesteps: jax.Array, *, class_labels: jax.Array | None = None,
                 encoder_hidden_states: jax.Array | None = None,
                 encoder_attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        images, timesteps, class_labels, encoder_hidden_states, encoder_attention_mask = map(
            traced_list_as_array, (images, timesteps, class_labels, encoder_hidden_states, encoder_attention_mask))
        images = images if isinstance(images, (jax.Array, np.ndarray)) else np.asarray(images)
        inputs_and_parameters = {"images": images, "timesteps": timesteps, "class_labels": class_labels,
                                 "encoder_hidden_states": encoder_hidden_states,
                                 "encoder_attention_mask": encoder_attention_mask, **self._named_parameters()}
        check_auto_axes_only(inputs_and_parameters)
        if not jnp.issubdtype(images.dtype, jnp.floating):  # uint8 pixels would pass as values 0-255
            raise ValueError(f"images must be floats in [-1, 1] (the model's pixel scale), got dtype {images.dtype}; "
                             "scale 0-255 pixels with x / 127.5 - 1")
        timestep_dtype = timesteps.dtype if isinstance(timesteps, jax.Array) else np.asarray(timesteps).dtype
        if not (jnp.issubdtype(timestep_dtype, jnp.floating) or jnp.issubdtype(timestep_dtype, jnp.integer)):
            raise ValueError(f"timesteps must be real numbers (the flow time x num_train_timesteps), got dtype "
                             f"{timestep_dtype}")
        if images.ndim != 4:
            raise ValueError(f"images must be a batch (B, H, H, {cfg.in_channels}) in NHWC, got shape {images.shape}; "
                             "add a batch axis for one image (images[None])")
        batch, height, width, channels = images.shape
        p = cfg.patch_size
        if height != width or height % p or channels != cfg.in_channels:
            # PyTorch's NCHW: a channel count where the height belongs
            channels_first = (" (channels last: images.transpose(0, 2, 3, 1) for an NCHW batch)"
                              if height == cfg.in_channels and width == channels else "")
            raise ValueError(f"images must be (B, H, H, {cfg.in_channels}) with H a multiple of patch size {p}, "
                             f"got {images.shape}{channels_first}")
        grid = height // p
        if batch == 0:
            raise ValueError("images is an empty batch (B = 0): pass at least one image")
        if np.ndim(timesteps) > 1 or np.size(timesteps) not in (1, batch):
            raise ValueError(f"timesteps must be one value or one per image ({batch}), got shape "
                             f"{np.shape(timesteps)}")
        if readable_here(timesteps) and not np.all(np.isfinite(np.asarray(timesteps))):
            raise ValueError(f"timesteps must be finite, got {np.asarray(timesteps).tolist()}")  # NaN: NaN images
        if class_labels is not None and np.shape(class_labels) != (batch,):
            raise ValueError(f"class_labels must be one per image, shape ({batch},), got shape "
                             f"{np.shape(class_labels)}")
        if class_labels is not None and not cfg.num_classes:
            raise ValueError("this model has no class table (model.num_classes = 0): do not pass class_labels")
        if encoder_attention_mask is not None and not cfg.cross_attention_dim:
            raise ValueError("this model has no cross-attention: do not pass encoder_attention_mask")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), (batch,))

        if cfg.cross_attention_dim:
            if encoder_hidden_states is None:
                raise ValueError("this model has cross-attention: pass encoder_hidden_states (B, L_text, "
                                 f"{cfg.cross_attention_dim})")
            if not isinstance(encoder_hidden_states, (jax.Array, np.ndarray)):  # a list, as images may be
                encoder_hidden_states = np.asarray(encoder_hidden_states, np.float32)
            if encoder_hidden_states.ndim != 3:  # one caption's (L_text, D) is no wrong encoder
                raise ValueError(f"encoder_hidden_states must be a batch (B, L_text, {cfg.cross_attention_dim}), got "
                                 f"shape {encoder_hidden_states.shape}: add a batch axis for one caption "
                                 "(states[None], and its mask's)")
            if encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
                raise ValueError(f"encoder_hidden_states must be (B, L_text, {cfg.cross_attention_dim}) for this "
                                 f"model, got shape {encoder_hidden_states.shape}: use the text encoder the model "
                                 "was trained with")
            text_shape = encoder_hidden_states.shape[:2]
            if text_shape[0] != batch:
                raise ValueError(f"encoder_hidden_states holds {text_shape[0]} captions for {batch} images: pass one "
                                 "per image")
            if encoder_attention_mask is not None:
                encoder_attention_mask = checked_text_mask(encoder_attention_mask, text_shape)
            encoder_hidden_states = encoder_hidden_states.astype(cfg.compute_dtype)
        elif encoder_hidden_states is not None:
            raise ValueError("this model has no cross-attention (model.cross_attention_dim = 0); "
                             "do not pass encoder_hidden_states")

        x = self.patch_embed(images.astype(jnp.float32))
        conditioning = self._conditioning(timesteps, grid, class_labels)
        if cfg.pooled_text:
            conditioning = conditioning + self._pooled_text(encoder_hidden_states, encoder_attention_mask)
        cos, sin = rope_tables(grid, cfg.attention_head_dim)
        rope = (jnp.asarray(cos), jnp.asarray(sin))

        # The RMSNorm scales are the only per-layer parameters read in float32 as stored, so no
        # convert fusion absorbs their per-layer slice: each would be a copy of its own, a host
        # dispatch outside XLA's command buffers (bench/RESULTS.md). Concatenated here, once per call,
        # they are one slice per layer; concatenating and splitting are exact.
        block_graph, norm_scales, block_params = nnx.split(self.transformer_blocks, _is_norm_scale, ...)
        scale_leaves, scale_tree = jax.tree.flatten(norm_scales)
        scale_splits = tuple(np.cumsum([leaf.shape[-1] for leaf in scale_leaves])[:-1].tolist())
        layer_xs = (block_params, jnp.concatenate(scale_leaves, axis=-1))
        context = (conditioning, rope, encoder_hidden_states, encoder_attention_mask)
        # jax refuses a custom_vjp kernel's tangent only where it is computed, or under jit when XLA
        # lowers the program, outside this call, in words naming neither the model nor the fix
        forward_mode = any(map(in_forward_mode, jax.tree.leaves(inputs_and_parameters)))
        blocks = dict(block_graph=block_graph, scale_tree=scale_tree, scale_splits=scale_splits, remat=cfg.remat,
                      refusal=forward_mode_refusal(cfg) if forward_mode else None)
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves((x, layer_xs, context))):
            x = run_blocks(x, layer_xs, context, **blocks)  # part of the program jax is tracing
        else:
            x = run_blocks_eagerly(x, layer_xs, context, kernel_modes=tracing_modes(), **blocks)

        shift, scale = jnp.split(self.proj_out_1(jax.nn.silu(conditioning)).astype(jnp.float32)[:, None, :], 2, axis=-1)
        x = modulate(layer_norm(x), shift, scale).astype(x.dtype)
        out = self.proj_out_2(x).astype(jnp.float32)
        return unpatchify(out, grid, p)

    def _named_parameters(self) -> dict[str, jax.Array]:
        """{'parameter transformer_blocks.attn1.q_proj.kernel': its array, ...}, for errors to name."""
        return {"parameter " + ".".join(map(str, path)): variable[...]
                for path, variable in nnx.to_flat_state(nnx.state(self))}

    def _conditioning(self, timesteps: jax.Array, grid: int, class_labels: jax.Array | None) -> jax.Array:
        """c = timestep embedding + class embedding + latent-size embedding, (B, C) float32."""
        cfg = self.config
        c = self.timestep_embedder(timesteps).astype(jnp.float32)
        if cfg.num_classes > 0:
            if class_labels is None:
                raise ValueError(f"this model is class-conditional: pass class_labels (B,) in [0, {cfg.num_classes}] "
                                 f"({cfg.num_classes} = unconditional)")
            if readable_here(class_labels):  # values at hand (outside jit, on this process): check them
                class_ids("class_labels", class_labels, cfg.num_classes, allow_null=True)
            elif not jnp.issubdtype(class_labels.dtype, jnp.integer):  # traced or spread: only the dtype is known
                raise ValueError(f"class_labels must be integer ids, got dtype {class_labels.dtype} under jit, where "
                                 "a fraction would be cut to an integer unseen: pass int32 ids")
            c = c + self.class_embedder(jnp.asarray(class_labels, jnp.int32)).astype(jnp.float32)
        size = self.latent_size_embedder(jnp.full((1,), grid, jnp.float32)).astype(jnp.float32)
        return c + size

    def _pooled_text(self, encoder_hidden_states: jax.Array, encoder_attention_mask: jax.Array | None) -> jax.Array:
        """Linear(mean of the caption's unmasked token states), (B, C) float32, added to c.

        The release's text model sees the caption only through cross-attention. Adding a pooled text
        vector to the adaLN conditioning too (as SD3-style DiTs do) lets every block's modulation
        depend on the whole caption; on the demo set it doubled how often samples take the asked
        shape at equal steps (README, "Text-to-image training")."""
        states = encoder_hidden_states.astype(jnp.float32)
        if encoder_attention_mask is None:
            pooled = states.mean(axis=1)
        else:
            keep = jnp.asarray(encoder_attention_mask, jnp.float32)[..., None]
            pooled = (states * keep).sum(axis=1) / jnp.maximum(keep.sum(axis=1), 1.0)
        return self.text_pool_proj(pooled).astype(jnp.float32)
