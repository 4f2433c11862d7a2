"""The T5 v1.1 encoder (google/flan-t5-xl for the text-to-image release) in Flax NNX.

What T5 v1.1 computes, per Hugging Face transformers' T5EncoderModel (the module the release calls):
  - token embedding (no scaling), then `num_layers` pre-norm blocks and a final RMS norm;
  - RMS norm without mean subtraction or bias: x * rsqrt(mean(x^2) + eps) * weight, in float32;
  - self-attention without the 1/sqrt(d) scale, plus a learned relative-position bias (bucketed
    signed distances, computed once by the first layer and shared by all) and the padding mask;
    softmax in float32;
  - gated feed-forward: wo(act(wi_0 x) * wi_1 x), act = gelu (tanh form) for 'gated-gelu';
  - no biases anywhere; dropout is off (inference).

Parameter names mirror the Hugging Face state dict (`encoder.block.{i}.layer.0.SelfAttention.q`
...) through t5_convert.py; the blocks are stacked and run with lax.scan like the PixelFlow blocks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from pixelflow_jax.config import numpy_broadcasting
from pixelflow_jax.sharding import keep_batch_split

ACTIVATIONS = {"gelu_new": lambda x: jax.nn.gelu(x, approximate=True), "gelu_pytorch_tanh":
               lambda x: jax.nn.gelu(x, approximate=True), "relu": jax.nn.relu}


@dataclasses.dataclass(frozen=True)
class T5Config:
    """The encoder's architecture: the fields of a Hugging Face T5 config.json that it uses."""
    vocab_size: int = 32128
    d_model: int = 2048
    d_kv: int = 64
    d_ff: int = 5120
    num_layers: int = 24
    num_heads: int = 32
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    dtype: str = "float32"  # compute dtype (this implementation's runtime choice)
    param_dtype: str = "float32"

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (type(value) is not int or value < 1):
                raise ValueError(f"{field.name} must be a positive integer, got {value!r}")
        if type(self.layer_norm_epsilon) not in (int, float) or not self.layer_norm_epsilon > 0:
            raise ValueError(f"layer_norm_epsilon must be a positive number, got {self.layer_norm_epsilon!r}")
        if not isinstance(self.feed_forward_proj, str):
            raise ValueError(f"feed_forward_proj must be a string, got {self.feed_forward_proj!r}")
        if self.activation not in ACTIVATIONS or not self.feed_forward_proj.startswith("gated-"):
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported: the T5 v1.1 encoder "
                             f"has a gated feed-forward ('gated-gelu'); supported: "
                             f"{['gated-' + a for a in ('gelu', 'relu')]}")

    @property
    def activation(self) -> str:
        name = self.feed_forward_proj.removeprefix("gated-")
        return "gelu_new" if name == "gelu" else name  # transformers maps gated-gelu to gelu_new

    @classmethod
    def from_hf(cls, hf: dict, **runtime) -> T5Config:
        """From a Hugging Face config.json dict; unknown keys are ignored, missing ones default."""
        names = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
        return cls(**{k: hf[k] for k in names if k in hf}, **runtime)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * normed).astype(x.dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> jax.Array:
    """(length, length) int32 bucket of key position minus query position, bidirectional: half
    the buckets per sign; within a half, exact distances below num_buckets/4, then logarithmic
    up to max_distance."""
    position = jnp.arange(length)
    relative = position[None, :] - position[:, None]
    half = num_buckets // 2
    bucket = (relative > 0).astype(jnp.int32) * half
    distance = jnp.abs(relative)
    max_exact = half // 2
    # Same float32 ops and truncation as the reference (log, divide, multiply, cast toward zero).
    log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (log_ratio * (half - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, half - 1)
    return bucket + jnp.where(distance < max_exact, distance, large)


class T5Block(nnx.Module):
    """One encoder layer; attribute names follow the Hugging Face layout (t5_convert maps them)."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        inner = cfg.num_heads * cfg.d_kv
        dense = lambda n_in, n_out: nnx.Linear(n_in, n_out, use_bias=False, dtype=cfg.dtype,
                                               param_dtype=cfg.param_dtype, rngs=rngs)
        ones = lambda: nnx.Param(jnp.ones((cfg.d_model,), cfg.param_dtype))
        self.cfg = cfg
        self.attention_norm = ones()
        self.q, self.k, self.v = dense(cfg.d_model, inner), dense(cfg.d_model, inner), dense(cfg.d_model, inner)
        self.o = dense(inner, cfg.d_model)
        self.ff_norm = ones()
        self.wi_0, self.wi_1 = dense(cfg.d_model, cfg.d_ff), dense(cfg.d_model, cfg.d_ff)
        self.wo = dense(cfg.d_ff, cfg.d_model)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x (B, L, d_model); bias (B, heads, L, L) float32 = position bias + padding mask."""
        cfg = self.cfg
        # Each caption's projections on its own device: with FSDP the weights are gathered, not
        # every caption's activations (keep_batch_split).
        project = lambda layer, t: keep_batch_split(layer(t))
        h = rms_norm(x, self.attention_norm[...], cfg.layer_norm_epsilon)
        heads = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.d_kv)
        q, k, v = heads(project(self.q, h)), heads(project(self.k, h)), heads(project(self.v, h))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias  # no 1/sqrt(d)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:2], -1)
        x = x + project(self.o, attended)
        h = rms_norm(x, self.ff_norm[...], cfg.layer_norm_epsilon)
        gated = ACTIVATIONS[cfg.activation](project(self.wi_0, h)) * project(self.wi_1, h)
        return x + project(self.wo, gated)


class T5Encoder(nnx.Module):
    """hidden = encoder(input_ids (B, L) int, attention_mask (B, L) 1 = token / 0 = padding):
    (B, L, d_model) in the compute dtype, the last hidden state of Hugging Face's T5EncoderModel."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed_tokens = nnx.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                      rngs=rngs)
        self.relative_attention_bias = nnx.Embed(cfg.relative_attention_num_buckets, cfg.num_heads,
                                                 param_dtype=cfg.param_dtype, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(layer_rngs: nnx.Rngs) -> T5Block:
            return T5Block(cfg, layer_rngs)

        self.blocks = stacked_blocks(rngs)
        self.final_norm = nnx.Param(jnp.ones((cfg.d_model,), cfg.param_dtype))

    @numpy_broadcasting
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        batch, length = input_ids.shape
        x = self.embed_tokens(jnp.asarray(input_ids, jnp.int32))
        buckets = relative_position_buckets(length, cfg.relative_attention_num_buckets,
                                            cfg.relative_attention_max_distance)
        bias = self.relative_attention_bias(buckets).astype(jnp.float32).transpose(2, 0, 1)[None]  # (1, H, L, L)
        if attention_mask is not None:
            padding = (1.0 - jnp.asarray(attention_mask, jnp.float32)) * jnp.finfo(jnp.float32).min
            bias = bias + padding[:, None, None, :]
        bias = jnp.broadcast_to(bias, (batch, cfg.num_heads, length, length))

        block_graph, block_params = nnx.split(self.blocks)

        def one_block(h, layer_params):
            return keep_batch_split(nnx.merge(block_graph, layer_params)(keep_batch_split(h), bias)), None

        x, _ = jax.lax.scan(one_block, x, block_params)
        return rms_norm(x, self.final_norm[...], cfg.layer_norm_epsilon)
