"""Attention kernels at PixelFlow's shapes: forward and forward+backward TFLOP/s per backend.

    python bench/attention_speed.py                      # GPU: xla, cudnn, pallas_gpu, bundled mha
    python bench/attention_speed.py --sweep              # + pallas_gpu tile/launch settings
    python bench/attention_speed.py --interpret --shapes=2x256 --heads=2 --iters=2   # CPU dry run

Shapes are BxL self-attention with 16 heads x 72 (XL/4's stages: B8x4096, B32x1024, B128x256).
FLOPs are counted on the real 72 columns: forward 4*B*H*L^2*D, forward+backward 3.5x that (the
backward does 5 of the 7 matmuls). `mha` is the bundled jax.experimental.pallas.ops.gpu.attention.mha,
the baseline the pallas_gpu kernel must beat. Every backend is first checked against xla (relative
error of the output and of dq, dk, dv) and only timed if it agrees. Needs only jax and numpy, so it
runs on the bare GPU machine.

Other kernels timed on an H200 on 2026-11-26 (forward / forward+backward TFLOP/s at B8x4096, B32x1024, B128x256):
cuDNN 312/300, 141/223, 122/110; bundled mha 183/75, 133/62, 85/48; XLA 83/93, 63/80, 45/56.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
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


# A small sweep around the defaults: forward and backward settings vary together.
SWEEP = [PallasSettings()] + [
    PallasSettings(forward_blocks=fb, forward_warps=fw, backward_blocks=bb, backward_warps=bw)
    for (fb, fw), (bb, bw) in itertools.product([((128, 64), 8), ((64, 64), 4), ((128, 128), 8)],
                                               [((64, 64), 8), ((128, 64), 8), ((32, 64), 4)])]


def attention_fn(backend: str, interpret: bool, key_mask=None):
    if backend == "mha":
        if key_mask is not None:
            raise ValueError("the bundled mha takes segment ids, not a key mask")
        from jax.experimental.pallas.ops.gpu.attention import mha

        return lambda q, k, v: mha(q, k, v, None, sm_scale=1.0 / math.sqrt(q.shape[-1]), interpret=interpret)
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
    parser.add_argument("--backends", default="xla,cudnn,pallas_gpu,mha")
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
