"""One attention function for the whole model, with interchangeable backends.

Layout is (batch, length, heads, head_dim) in and out; the softmax scale is 1/sqrt(head_dim);
attention is never causal; an optional key mask (B, Lk) marks real keys with 1.

    xla      the reference: einsums and a float32 softmax; every platform
    cudnn    jax.nn.dot_product_attention(implementation='cudnn'); NVIDIA GPUs, bf16/fp16 inputs,
             head_dim a multiple of 8 (<= 128 before Hopper, 256 from it), even lengths
    pallas_gpu  our Pallas (Triton) flash attention (pallas_gpu_attention.py); NVIDIA GPUs;
             lengths that are multiples of 16 (others fall back to xla)
    splash   Pallas splash attention (splash_attention.py); TPUs; lengths that are multiples of
             128 (shorter stages fall back to xla)
    auto     the fastest measured choice for the platform and dtype (AUTO below); the default

Kernels that cannot run on the current platform raise an error naming the platform and the
alternatives. `interpret_kernels()` runs the Pallas kernels in interpret mode on any platform
(the CPU tests use it). The Pallas kernels run per device on its share of the batch and heads
when a mesh is in context (`jax.set_mesh`, as training and sampling do).
"""

from __future__ import annotations

import contextlib
import math
import threading
from typing import Callable

import jax
import jax.numpy as jnp

# The release turns a 0/1 text mask into an additive bias of -10000 on the padded keys (not -inf):
# a row whose keys are all padding gets -10000 on every key, which cancels in the softmax, so it
# attends to all keys as if unmasked (no NaNs).
MASKED_KEY_BIAS = -10000.0

# The primitives that compute a fused attention kernel's forward pass (cuDNN's; the pallas_call
# of our Pallas kernels, the only Pallas calls in the model). Their outputs, the attention output
# and its softmax statistics, are what the kernel's backward pass reads: remat 'dots_attention'
# keeps them rather than run the forward kernel again.
ATTENTION_FORWARD_PRIMITIVES = ("dot_product_attention_fwd_wrapper", "pallas_call")


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if key_mask is not None:
        bias = (1.0 - key_mask.astype(jnp.float32)) * MASKED_KEY_BIAS
        logits = logits + bias[:, None, None, :]
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v, preferred_element_type=jnp.float32).astype(q.dtype)


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN's fused attention takes no float32


def cudnn_refuses(q, k) -> str | None:
    """Why jax's cuDNN attention would refuse these shapes (its check_is_flash_attention), or None:
    head_dim a multiple of 8 up to 128 (256 from Hopper on), and even lengths (jax passes a bias
    even without a mask, and cuDNN's backward with a bias needs them). Its dtypes, CUDNN_DTYPES,
    are checked where the backend is resolved."""
    head_dim, limit = q.shape[-1], 128
    with contextlib.suppress(Exception):  # CPU (tests, tracing for a GPU): assume the older limit
        limit = 256 if float(jax.devices()[0].compute_capability) >= 9.0 else 128
    if head_dim % 8 or head_dim > limit:
        return f"it needs a head_dim that is a multiple of 8 up to {limit}, got {head_dim}"
    if q.shape[1] % 2 or k.shape[1] % 2:
        return f"it needs even lengths, got {q.shape[1]} queries and {k.shape[1]} keys"
    return None


def _cudnn_attention(q, k, v, key_mask):
    problem = cudnn_refuses(q, k)
    if problem:
        raise ValueError(f"attention backend 'cudnn' cannot run this attention: {problem}; use attention 'auto' "
                         "(which runs XLA there) or 'xla'")
    check_not_forward_mode()
    # The release's -10000 bias, not a boolean mask (which cuDNN turns into a far larger negative
    # bias): the two differ only when every key of a row is padding. cuDNN takes a bias of shape
    # (B, 1, Lq, Lk) only, so the mask's is spelled out per query.
    bias = None
    if key_mask is not None:
        bias = ((1.0 - key_mask) * MASKED_KEY_BIAS).astype(q.dtype)[:, None, None, :]
        bias = jnp.broadcast_to(bias, (q.shape[0], 1, q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, bias=bias, implementation="cudnn")


def _auto_gpu_attention(q, k, v, key_mask):
    """cuDNN where it runs and wins (unmasked self-attention); XLA for what it refuses, and for
    masked text attention, whose (B, 1, Lq, Lk) bias cuDNN would need spelled out in memory."""
    if key_mask is None and cudnn_refuses(q, k) is None:
        return _cudnn_attention(q, k, v, key_mask)
    return _xla_attention(q, k, v, key_mask)


def _pallas_kernel(supports, kernel, q, k, v, key_mask):
    """kernel on each device's share of the mesh, or xla for lengths `supports` refuses."""
    from pixelflow_jax.sharding import map_attention_over_mesh

    if not supports(q.shape[1], k.shape[1]):
        return _xla_attention(q, k, v, key_mask)
    check_not_forward_mode()
    local = lambda q, k, v, key_mask: kernel(q, k, v, key_mask, interpret=_interpret[0])
    return map_attention_over_mesh(local, q, k, v, key_mask)


def _pallas_gpu_attention(q, k, v, key_mask):
    from pixelflow_jax.kernels.pallas_gpu_attention import flash_attention, supports

    return _pallas_kernel(supports, flash_attention, q, k, v, key_mask)  # xla for e.g. 6 text keys


def _splash_attention(q, k, v, key_mask):
    from pixelflow_jax.kernels.splash_attention import splash_attention, supports

    return _pallas_kernel(supports, splash_attention, q, k, v, key_mask)  # xla for e.g. the 64-token stage


BACKENDS: dict[str, Callable[..., jax.Array]] = {"xla": _xla_attention, "cudnn": _cudnn_attention,
                                                 "pallas_gpu": _pallas_gpu_attention, "splash": _splash_attention}
PLATFORMS = {"cudnn": ("gpu",), "pallas_gpu": ("gpu",), "splash": ("tpu",)}  # need hardware (Pallas: or interpret)
PALLAS_BACKENDS = ("pallas_gpu", "splash")

# 'auto': per platform, the fastest backend measured there (16 heads x 72, bf16, forward / forward+backward
# TFLOP/s at B8x4096, B32x1024, B128x256 tokens):
#   gpu (one H200, jax 0.11.2, 2026-12-04, bench/RESULTS.md): cuDNN 278/298, 246/241, 119/119; our pallas_gpu
#       278/224, 207/189, 105/104; XLA 82/72, 62/63, 45/52 -> cudnn for bf16/fp16 inputs at every length
#       (64 tokens not measured: the same choice), XLA for float32 (cuDNN takes no float32). Key-masked text
#       attention at B4x256 runs a fraction of a millisecond on any backend (XLA the fastest forward): XLA.
#   tpu: splash at lengths that are multiples of 128 (XLA below, e.g. the 64-token stage), as
#       MaxText defaults to: XLA's einsum keeps the L^2 float32 logits of every head (1 GiB per
#       image at 4096 tokens, 275 GB at the 65536 tokens of 1024 px text-to-image). Not yet timed on
#       a TPU: checked in interpret mode and by lowering for TPU on the CPU (tests/test_attention.py), and
#       compiled for v5p/v6e/v5e chips by libtpu on a CPU host (bench/gpu_compile.py --card=v5p).
#   cpu: XLA.
#   On a GPU, attention that cuDNN refuses (head_dim, odd lengths) and masked text attention run
#   XLA (_auto_gpu_attention).
AUTO = {"gpu": "cudnn", "tpu": "splash", "cpu": "xla"}
_interpret = [False]
_compiling_for: list[str | None] = [None]
# Per thread: a model traced for jax.jvp in one thread does not refuse another thread's reverse-mode trace.
_forward_mode = threading.local()


@contextlib.contextmanager
def fused_kernels_refused(refusal: str | None):
    """While a model traces its layers for forward mode (jax.jvp): a fused kernel, a jax.custom_vjp
    function, which jax cannot differentiate forward, raises ValueError(refusal) where it would run
    (lengths it leaves to xla differentiate as xla's)."""
    before, _forward_mode.refusal = getattr(_forward_mode, "refusal", None), refusal
    try:
        yield
    finally:
        _forward_mode.refusal = before


def check_not_forward_mode() -> None:
    if refusal := getattr(_forward_mode, "refusal", None):
        raise ValueError(refusal)


@contextlib.contextmanager
def interpret_kernels():
    """Runs Pallas kernels in interpret mode (any platform, slow): for tests and debugging. The
    mode is read when a function is traced, so the programs this package keeps (the sampler's
    stages, the training step) are keyed on tracing_modes(); a function you jit yourself keeps the
    mode it was first traced in (jax.clear_caches() between the two if one function serves both)."""
    _interpret[0] = True
    try:
        yield
    finally:
        _interpret[0] = False


@contextlib.contextmanager
def compiling_for(platform: str):
    """Chooses and checks backends for `platform` ('gpu', 'tpu') instead of this host's devices:
    for compiling ahead of time, on a CPU, for a machine this host is not (jax's deviceless
    compilation, bench/gpu_compile.py). Read when a function is traced, like interpret_kernels."""
    if platform not in AUTO:
        raise ValueError(f"unknown platform {platform!r}; one of {sorted(AUTO)}")
    _compiling_for[0] = platform
    try:
        yield
    finally:
        _compiling_for[0] = None


def tracing_modes() -> tuple[bool, str | None]:
    """What interpret_kernels and compiling_for set: read when a function is traced, so part of the
    key of a jitted function kept for reuse."""
    return _interpret[0], _compiling_for[0]


def target_platform() -> str:
    """The platform the attention is traced for: this host's, unless inside compiling_for."""
    return _compiling_for[0] or jax.default_backend()


def check_platform(backend: str) -> None:
    """A clear error for an unknown backend, or one that this platform cannot run."""
    if backend == "auto":
        return
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; available: {sorted(BACKENDS) + ['auto']}")
    needs, platform = PLATFORMS.get(backend), target_platform()
    if needs and platform not in needs and not (backend in PALLAS_BACKENDS and _interpret[0]):
        raise ValueError(f"attention backend {backend!r} runs on {'/'.join(needs)}, and this run's platform is "
                         f"{platform}: use 'auto' or 'xla'")


def resolve_backend(backend: str, dtype) -> str:
    """The backend that `backend` means on this platform for a model computing in `dtype` ('auto'
    resolved), or a clear error."""
    check_platform(backend)
    if backend == "auto":
        choice = AUTO.get(target_platform(), "xla")
        if choice == "cudnn" and jnp.dtype(dtype) not in CUDNN_DTYPES:
            choice = "xla"
        return choice
    if backend == "cudnn" and jnp.dtype(dtype) not in CUDNN_DTYPES:  # else refused at the first call
        name = jnp.dtype(dtype).name
        raise ValueError(f"attention backend 'cudnn' takes bfloat16 or float16 inputs, and this model computes in "
                         f"{name}: compute in bfloat16, or use 'auto' (XLA for {name}) or 'xla'")
    return backend


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
        raise ValueError(f"attention expects q (B, Lq, H, D) and k, v (B, Lk, H, D); "
                         f"got {q.shape}, {k.shape}, {v.shape}")
    if key_mask is not None and key_mask.shape != k.shape[:2]:
        raise ValueError(f"key_mask must have shape (B, Lk) = {k.shape[:2]}, got {key_mask.shape}")
    choice = resolve_backend(backend, q.dtype)
    if backend == "auto" and choice == "cudnn":  # per call: the shapes and mask decide
        return _auto_gpu_attention(q, k, v, key_mask)
    return BACKENDS[choice](q, k, v, key_mask)
