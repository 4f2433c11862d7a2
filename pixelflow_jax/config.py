"""The model's architecture and numerics settings, as one frozen (hashable) dataclass.

Field names follow the release's `config.yaml` (`model.params`) so a release config maps over
one to one; `dtype`, `param_dtype`, `attention` and `remat` are this implementation's runtime
choices, and `pooled_text` an architecture option the release does not have.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pixelflow_jax.validation import is_whole

# Fields of the release's `model.params` that describe the architecture.
ARCHITECTURE_FIELDS = (
    "num_attention_heads",
    "attention_head_dim",
    "depth",
    "patch_size",
    "in_channels",
    "out_channels",
    "num_classes",
    "attention_bias",
    "cross_attention_dim",
)



def fields_missing_from_architecture(values: Mapping[str, Any]) -> list[str]:
    """The ARCHITECTURE_FIELDS a recorded architecture lacks. Every file this project writes records
    them all: one gone (an edit) would be read as XL's default, and the weights then refused as not
    that architecture's."""
    return [name for name in ARCHITECTURE_FIELDS if name not in values]


REMAT_POLICIES = ("none", "full", "dots", "dots_attention")
# pixelflow_jax.kernels.attention's backends (test_attention checks they agree)
ATTENTION_BACKENDS = ("xla", "cudnn", "pallas_gpu", "splash", "auto")
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def matmul_precision(dtype) -> contextlib.AbstractContextManager:
    """The context for the matmuls of a model computing in `dtype`: float32 compute means float32
    matmuls, as in the release's float32 runs (by default GPUs take TF32 and TPUs bfloat16 passes
    for float32 dots); the 16-bit dtypes keep whatever precision is set (a user's own, or the
    platform's default)."""
    return jax.default_matmul_precision("highest") if dtype_name(dtype) == "float32" else contextlib.nullcontext()


def numpy_broadcasting(forward):
    """A model's `forward` under numpy's rank promotion, whatever a notebook set: the models
    broadcast (C,) scales against (B, L, C) activations, which jax_numpy_rank_promotion='raise'
    refused at their first multiply."""

    @functools.wraps(forward)
    def with_numpy_broadcasting(*args, **kwargs):
        with jax.numpy_rank_promotion("allow"):
            return forward(*args, **kwargs)

    return with_numpy_broadcasting


def dtype_name(dtype):
    """'bfloat16' for jnp.bfloat16, np.dtype('bfloat16') or 'bfloat16'; what is no dtype (None
    too, which numpy would read as float64), as given, for the caller's error to name."""
    if dtype is None:
        return None
    try:
        return jnp.dtype(dtype).name
    except TypeError:
        return dtype


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    depth: int = 28
    patch_size: int = 4
    in_channels: int = 3
    out_channels: int = 3
    num_classes: int = 1000  # 0: no class embedding (text-conditional); id num_classes is the null class
    attention_bias: bool = True
    cross_attention_dim: int = 0  # 0: no cross-attention; else the text encoder's width (t2i)
    dtype: str = "float32"  # compute dtype of matmuls and activations
    param_dtype: str = "float32"
    attention: str = "auto"  # backend of pixelflow_jax.kernels.attention: auto | xla | cudnn | pallas_gpu | splash
    # rematerialise blocks in the backward pass: 'none' | 'full' | 'dots' (keep matmul outputs) |
    # 'dots_attention' (keep matmul and attention-kernel outputs: recompute only elementwise work)
    remat: str = "none"
    # Text models only, not the release's architecture: also add Linear(mean of the caption's token
    # states) to the adaLN conditioning. The release cannot load such weights (export refuses them).
    pooled_text: bool = False

    def __post_init__(self):
        # numpy ints made nnx fail deep inside (as did floats such as 1.5), and attention_bias="False"
        # (a truthy string) built the biases without a word: whole numbers become ints, flags must be bools.
        for name in ("num_attention_heads", "attention_head_dim", "depth", "patch_size", "in_channels", "out_channels",
                     "num_classes", "cross_attention_dim"):
            value = getattr(self, name)
            if not is_whole(value):
                raise TypeError(f"model.{name} must be a whole number, got {value!r}")
            object.__setattr__(self, name, int(value))
        for name in ("attention_bias", "pooled_text"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"model.{name} must be True or False, got {value!r}")
            object.__setattr__(self, name, bool(value))
        for name in ("num_attention_heads", "attention_head_dim", "depth", "patch_size", "in_channels", "out_channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.num_classes < 0 or self.cross_attention_dim < 0:
            raise ValueError("model.num_classes and model.cross_attention_dim must be >= 0 (0 = unused)")
        if self.attention_head_dim % 4:
            raise ValueError(f"model.attention_head_dim must be a multiple of 4 for 2D RoPE, "
                             f"got {self.attention_head_dim}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ValueError(f"model.attention must be one of {ATTENTION_BACKENDS}, got {self.attention!r}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"model.remat must be one of {REMAT_POLICIES}, got {self.remat!r}")
        if self.pooled_text and not self.cross_attention_dim:
            raise ValueError("model.pooled_text pools the caption's text states: it needs a text model "
                             "(model.cross_attention_dim > 0); set model.pooled_text=False for a class model")
        for name in ("dtype", "param_dtype"):
            object.__setattr__(self, name, dtype_name(getattr(self, name)))  # jnp.bfloat16 too, as load_model takes
            if getattr(self, name) not in COMPUTE_DTYPES:
                raise ValueError(f"model.{name} must be float32, bfloat16 or float16, got {getattr(self, name)!r}")

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def parameter_dtype(self):
        return jnp.dtype(self.param_dtype)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """Builds a config from a dict (or ConfigDict); unknown keys are an error, not ignored."""
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        if values.get("cross_attention_dim") is None:
            values["cross_attention_dim"] = 0
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def architecture(self) -> dict[str, Any]:
        return without_options_off({name: getattr(self, name) for name in (*ARCHITECTURE_FIELDS,
                                                                            *ARCHITECTURE_OPTIONS_OFF)})


# The options a record names only when on (a record without one has it off): the release's architectures
# read as before, and versions of 2026-11-26, which refuse a key they do not know, read a model without them.
ARCHITECTURE_OPTIONS_OFF = {"pooled_text": False}


def without_options_off(values: dict[str, Any]) -> dict[str, Any]:
    """`values` less the ARCHITECTURE_OPTIONS_OFF at their off value."""
    return {name: value for name, value in values.items()
            if not (name in ARCHITECTURE_OPTIONS_OFF and value == ARCHITECTURE_OPTIONS_OFF[name])}
