"""Training throughput of the jitted step: images/s, peak device memory and MFU, on synthetic
uint8 batches (no data loader), for PixelFlow-XL/4 with random (non-zero) weights.

    python bench/train_speed.py --batch=32 --remat=dots     # XL/4, bf16, all devices
    python bench/train_speed.py --preset=tiny --batch=8      # a CPU dry run of the script itself

Compare (an H200, 2026-11-26): the release trains at 31.0 img/s (batch 24, 128 GB); a plain JAX
block stack reached ~55 img/s. Target: >= 70 img/s on one H200 within 80 GB. Needs only jax,
flax, optax, numpy (no grain, TFDS or ml_collections).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from pixelflow_jax import PixelFlowScheduler  # noqa: E402
from pixelflow_jax.config import ATTENTION_BACKENDS, COMPUTE_DTYPES, REMAT_POLICIES, ModelConfig  # noqa: E402
from pixelflow_jax.sharding import make_mesh  # noqa: E402
from pixelflow_jax.training.flow import StageTables  # noqa: E402
from pixelflow_jax.training.metrics_log import peak_flops  # noqa: E402
from pixelflow_jax.training.train_step import (StepConfig, init_state, make_optimizer, make_train_step,  # noqa: E402
                                               state_shardings, train_flops_per_image)
from harness import positive_int  # noqa: E402
from profile_ops import print_profiles  # noqa: E402
from sample_speed import PRESETS, random_model  # noqa: E402


def training_program(cfg: ModelConfig, resolution: int, fsdp: int):
    """(initial train state of a random model, placed; its shardings; the jitted step) on all devices."""
    scheduler = PixelFlowScheduler()
    model = random_model(cfg)
    step_cfg = StepConfig()
    tx = make_optimizer(step_cfg)
    mesh = make_mesh(fsdp)
    state = init_state(model, tx, seed=0)
    shardings = state_shardings(state, mesh)
    step = make_train_step(cfg, nnx.graphdef(model), StageTables.from_scheduler(scheduler), tx, step_cfg, resolution,
                           scheduler.num_train_timesteps, mesh, shardings)
    return jax.device_put(state, shardings), shardings, step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="xl")
    parser.add_argument("--batch", type=positive_int, default=32, help="global batch")
    parser.add_argument("--dtype", default="bfloat16", choices=COMPUTE_DTYPES)
    parser.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    parser.add_argument("--attention", default="xla", choices=ATTENTION_BACKENDS)
    parser.add_argument("--fsdp", type=positive_int, default=1)
    parser.add_argument("--steps", type=positive_int, default=10)
    parser.add_argument("--profile", action="store_true", help="add the top device ops of one training step")
    args = parser.parse_args()

    base, resolution = PRESETS[args.preset]
    cfg = dataclasses.replace(base, dtype=args.dtype, remat=args.remat, attention=args.attention)
    scheduler = PixelFlowScheduler()
    state, _, step = training_program(cfg, resolution, args.fsdp)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, resolution, resolution, 3), dtype=np.uint8)
    labels = rng.integers(0, cfg.num_classes, args.batch).astype(np.int32)
    start = time.perf_counter()
    state, metrics = step(state, images, labels)
    jax.block_until_ready(state)
    first_call = time.perf_counter() - start
    assert int(metrics["bad_steps_in_a_row"]) == 0, "the first step is not finite: not timing a broken step"

    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        state, metrics = step(state, images, labels)
        jax.block_until_ready(state)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    images_per_s = args.batch / seconds
    flops = train_flops_per_image(cfg, resolution, scheduler.num_stages)
    peak = peak_flops(jax.devices()[0])
    stats = getattr(jax.devices()[0], "memory_stats", lambda: None)() or {}

    print(json.dumps(dict(
        preset=args.preset, batch=args.batch, dtype=args.dtype, remat=args.remat, attention=args.attention,
        fsdp=args.fsdp, devices=jax.device_count(), first_call_s=first_call, step_s=seconds,
        images_per_s=images_per_s, tflops_per_s=images_per_s * flops / 1e12,
        mfu=images_per_s * flops / (peak * jax.device_count()) if peak else None,
        peak_memory_gb=stats.get("peak_bytes_in_use", 0) / 1e9 or None, last_loss=float(metrics["loss"]),
        device=str(jax.devices()[0].device_kind), jax=jax.__version__, flax=flax.__version__,
        # What the step was compiled with: --xla_gpu_enable_triton_gemm=false puts XLA's matmuls on cuBLAS.
        xla_flags=os.environ.get("XLA_FLAGS", ""),
    )), flush=True)
    if args.profile:
        def one_step():
            nonlocal state
            state, _ = step(state, images, labels)
            return state

        print_profiles(train_step=(one_step, 1))


if __name__ == "__main__":
    main()
