"""Attention kernels at PixelFlow's shapes: forward and forward+backward TFLOP/s per backend.

    python bench/attention_speed.py                      # GPU: xla, cudnn, pallas_gpu, padded cudnn
    python bench/attention_speed.py --sweep              # + pallas_gpu tile/launch settings
    python bench/attention_speed.py --interpret --shapes=2x256 --heads=2 --iters=2   # CPU dry run

Shapes are BxL self-attention with 16 heads x 72 (XL/4's stages: B8x4096, B32x1024, B128x256).
FLOPs are counted on the real 72 columns: forward 4*B*H*L^2*D, forward+backward 3.5x that (the
backward does 5 of the 7 matmuls). `cudnn_padN` runs cuDNN on q, k, v zero-padded to head_dim N
(bench only: is cuDNN faster at another width than 72?). `mha` is the bundled
jax.experimental.pallas.ops.gpu.attention.mha, no longer timed by default. Every backend is first
checked against xla (relative error of the output and of dq, dk, dv) and only timed if it agrees.
Needs only jax and numpy, so it runs on the bare GPU machine.

Other kernels timed on an H200 (forward / forward+backward TFLOP/s at B8x4096, B32x1024, B128x256):
2026-11-26 cuDNN 312/300, 141/223, 122/110; bundled mha 183/75, 133/62, 85/48; XLA 83/93, 63/80, 45/56.
2026-12-04 (jax 0.11.2) bundled mha 185/75, 135/67, 83/50.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from harness import median_seconds, non_negative_int, positive_int  # noqa: E402
from pixelflow_jax.kernels import pallas_gpu_attention  # noqa: E402
from pixelflow_jax.kernels.attention import dot_product_attention, interpret_kernels  # noqa: E402

AGREEMENT = {"bfloat16": 2e-2, "float16": 2e-2, "float32": 2e-4}  # relative error vs xla to be timed


@dataclasses.dataclass(frozen=True)
class PallasSettings:
    """pallas_gpu_attention's tile sizes and launch parameters (module constants read at trace time)."""
    forward_blocks: tuple[int, int] = pallas_gpu_attention.FORWARD_BLOCKS
    forward_warps: int = pallas_gpu_attention.FORWARD_PARAMS["num_warps"]
    forward_stages: int = pallas_gpu_attention.FORWARD_PARAMS["num_stages"]
    backward_blocks: tuple[int, int] = pallas_gpu_attention.BACKWARD_BLOCKS
    backward_warps: int = pallas_gpu_attention.BACKWARD_PARAMS["num_warps"]
    backward_stages: int = pallas_gpu_attention.BACKWARD_PARAMS["num_stages"]

    @contextlib.contextmanager
    def applied(self):
        m = pallas_gpu_attention
        saved = (m.FORWARD_BLOCKS, m.FORWARD_PARAMS, m.BACKWARD_BLOCKS, m.BACKWARD_PARAMS)
        m.FORWARD_BLOCKS, m.BACKWARD_BLOCKS = self.forward_blocks, self.backward_blocks
        m.FORWARD_PARAMS = dict(num_warps=self.forward_warps, num_stages=self.forward_stages)
        m.BACKWARD_PARAMS = dict(num_warps=self.backward_warps, num_stages=self.backward_stages)
        try:
            yield
        finally:
            m.FORWARD_BLOCKS, m.FORWARD_PARAMS, m.BACKWARD_BLOCKS, m.BACKWARD_PARAMS = saved


DEFAULTS = PallasSettings()
# Around the defaults, the backward first, each setting changing the forward or the backward, not
# both: on an H200 (2026-12-04) the defaults beat a sweep that changed both (8 backward warps:
# fwd+bwd 122-167 TFLOP/s at B8x4096, the defaults 224, cuDNN 298). Left out as measured there:
# backward (32, 64) on 4 warps (twice the defaults' backward time), forward (64, 64) on 4 warps (234-244
# TFLOP/s against 278). Left out as spilling registers compiled for an H200 (bench/gpu_compile.py,
# jax 0.10.2): backward (128, 64) or (64, 128) on 4 warps, (64, 128) or (128, 128) on 8, (64, 64) on
# 2 warps; forward (128, 128) on 4 warps.
SWEEP = [DEFAULTS] + [dataclasses.replace(DEFAULTS, **change) for change in (
    dict(backward_blocks=(128, 32)), dict(backward_stages=3), dict(backward_blocks=(64, 32)),
    dict(backward_stages=1), dict(backward_blocks=(128, 32), backward_warps=8), dict(backward_blocks=(32, 32)),
    dict(forward_blocks=(128, 32)), dict(forward_stages=4), dict(forward_stages=2),
    dict(forward_blocks=(256, 64), forward_warps=8), dict(forward_blocks=(64, 128)))]

PADDED_CUDNN = re.compile(r"cudnn_pad(\d+)")  # e.g. cudnn_pad96: cuDNN at head_dim 96


def changed_settings(settings: PallasSettings) -> dict:
    """What a sweep setting changes from the defaults (its row is read by that)."""
    defaults = dataclasses.asdict(DEFAULTS)
    return {name: value for name, value in dataclasses.asdict(settings).items() if value != defaults[name]}


def padded_attention(width: int, implementation: str):
    """jax.nn.dot_product_attention on q, k, v zero-padded from head_dim D to `width` columns, cut
    back to D after: zero columns change neither q.k nor the first D output columns. The softmax
    scale is passed as 1/sqrt(D), or it would follow the padded width."""
    def attend(q, k, v):
        head_dim = q.shape[-1]
        if width < head_dim:
            raise ValueError(f"cannot pad head_dim {head_dim} to {width}")
        pad = [(0, 0)] * (q.ndim - 1) + [(0, width - head_dim)]
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        out = jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(head_dim), implementation=implementation)
        return out[..., :head_dim]

    return attend


def attention_fn(backend: str, interpret: bool, key_mask=None):
    if backend == "mha":
        if key_mask is not None:
            raise ValueError("the bundled mha takes segment ids, not a key mask")
        from jax.experimental.pallas.ops.gpu.attention import mha

        return lambda q, k, v: mha(q, k, v, None, sm_scale=1.0 / math.sqrt(q.shape[-1]), interpret=interpret)
    padded = PADDED_CUDNN.fullmatch(backend)
    if padded:
        if key_mask is not None:
            raise ValueError(f"{backend} times unmasked attention only")
        return padded_attention(int(padded.group(1)), "cudnn")
    return lambda q, k, v: dot_product_attention(q, k, v, key_mask=key_mask, backend=backend)


def programs(fn):
    """(forward, forward+backward) jitted; the backward takes a fixed random cotangent."""
    forward = jax.jit(fn)

    def forward_backward(q, k, v, cotangent):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(cotangent)

    return forward, jax.jit(forward_backward)


_REFERENCES = {}


def xla_reference(q, k, v, cotangent, key_mask):
    """xla's output and gradients, computed once per shape (the sweep reuses them)."""
    key = (q.shape, str(q.dtype), key_mask is not None)
    if key not in _REFERENCES:
        _REFERENCES[key] = programs(attention_fn("xla", False, key_mask))[1](q, k, v, cotangent)
    return _REFERENCES[key]


def warm_median_seconds(fn, args, iters: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    return median_seconds(lambda: fn(*args), iters)


def relative_error(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def measure(backend, batch, length, args, settings: PallasSettings | None = None) -> dict:
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 4)
    shape = (batch, length, args.heads, args.head_dim)
    q, k, v, cotangent = (jax.random.normal(key, shape, dtype) for key in keys)
    # A text-like key mask: about 30% padding, the first key always real.
    key_mask = (jax.random.uniform(keys[0], (batch, length)) < 0.7).at[:, 0].set(True).astype(jnp.float32)
    key_mask = key_mask if args.key_mask else None
    row = dict(backend=backend, batch=batch, length=length, heads=args.heads, head_dim=args.head_dim,
               dtype=args.dtype, key_mask=args.key_mask)
    if settings is not None:
        row["settings"] = dataclasses.asdict(settings)
        row["changed"] = changed_settings(settings)
    with (settings.applied() if settings else contextlib.nullcontext()):
        try:
            forward, forward_backward = programs(attention_fn(backend, args.interpret, key_mask))
            got = forward_backward(q, k, v, cotangent)
        except Exception as error:  # a backend this machine cannot run is reported, not fatal
            return {**row, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
        expected = xla_reference(q, k, v, cotangent, key_mask)
        errors = [relative_error(g, e) for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected))]
        row["max_relative_error_vs_xla"] = max(errors)
        if max(errors) > AGREEMENT[args.dtype]:
            return {**row, "error": f"disagrees with xla (relative errors out, dq, dk, dv: {errors}); not timed"}
        flops = 4 * batch * args.heads * length * length * args.head_dim
        seconds = warm_median_seconds(forward, (q, k, v), args.iters)
        both = warm_median_seconds(forward_backward, (q, k, v, cotangent), args.iters)
    return {**row, "forward_ms": seconds * 1e3, "forward_tflops": flops / seconds / 1e12,
            "forward_backward_ms": both * 1e3, "forward_backward_tflops": 3.5 * flops / both / 1e12}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", default="xla,cudnn,pallas_gpu,cudnn_pad80,cudnn_pad96,cudnn_pad128",
                        help="comma-separated; also mha (the bundled Pallas kernel); cudnn_padN: cuDNN at head_dim N")
    parser.add_argument("--shapes", default="8x4096,32x1024,128x256", help="comma-separated BxL")
    parser.add_argument("--heads", type=positive_int, default=16)
    parser.add_argument("--head_dim", type=positive_int, default=72)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(AGREEMENT))
    parser.add_argument("--iters", type=positive_int, default=20)
    parser.add_argument("--key_mask", action="store_true", help="with a random key mask (text cross-attention)")
    parser.add_argument("--sweep", action="store_true", help="also time pallas_gpu over bench SWEEP settings")
    parser.add_argument("--sweep_count", type=non_negative_int, default=len(SWEEP) - 1,
                        help="how many of SWEEP's other settings to time (a CPU dry run checks two)")
    parser.add_argument("--interpret", action="store_true", help="Pallas kernels in interpret mode (CPU dry run)")
    args = parser.parse_args()

    shapes = [tuple(int(n) for n in s.split("x")) for s in args.shapes.split(",")]
    runs = [(backend, None) for backend in args.backends.split(",") if backend]  # --backends= with --sweep: only it
    if args.sweep:
        runs += [("pallas_gpu", settings) for settings in SWEEP[1:1 + args.sweep_count]]
    context = interpret_kernels() if args.interpret else contextlib.nullcontext()
    print(json.dumps(dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__)))
    with context:
        for (backend, settings), (batch, length) in itertools.product(runs, shapes):
            print(json.dumps(measure(backend, batch, length, args, settings)), flush=True)


if __name__ == "__main__":
    main()
