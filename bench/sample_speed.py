"""Sampling speed of the cascade sampler: seconds per image, and per-stage forward time of the
CFG batch, for PixelFlow-XL/4 with random (non-zero) weights.

    python bench/sample_speed.py                       # XL/4, batch 16, 4 x 30 Euler steps, bf16
    python bench/sample_speed.py --preset=tiny         # a CPU dry run of the script itself
    python bench/sample_speed.py --profile_only        # only the top device ops of the last stage's forward

Compare (the release on an H200, 2026-11-26): 6.35 s/image end to end, 2.32 s of it on the GPU;
per-stage forward of the CFG batch (32) 35 / 64 / 204 / 936 ms. Needs only jax, flax, numpy (no
ml_collections, grain or TFDS), so it runs on the bare GPU machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from harness import median_seconds, positive_int  # noqa: E402
from pixelflow_jax import CheckpointConfig, ModelConfig, PixelFlow  # noqa: E402
from pixelflow_jax.config import ATTENTION_BACKENDS, COMPUTE_DTYPES  # noqa: E402
from pixelflow_jax.sampling.cascade import CascadeSampler, sampling_compiler_options  # noqa: E402
from pixelflow_jax.scheduler import stage_resolutions  # noqa: E402
from profile_ops import print_profiles  # noqa: E402

PRESETS = {
    "xl": (ModelConfig(), 256),  # PixelFlow-XL/4 as released
    "tiny": (ModelConfig(num_attention_heads=2, attention_head_dim=16, depth=2), 64),
}
# The settings timed by default (bench/gpu_compile.py's `sample` compiles them for a GPU).
BATCH, STEPS, CFG = 16, 30, 2.4


def random_model(cfg: ModelConfig, seed: int = 0) -> PixelFlow:
    """The release's init perturbed everywhere: its zero adaLN/output layers would make the
    network's output (and so the timing) trivial."""
    model = PixelFlow(cfg, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [leaf + 0.02 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


def forward_program(graphdef):
    """The model's forward of a class-conditional batch, jitted with the sampler's compiler options (on a
    GPU its matmuls on cuBLAS, as in the stages' programs): what each stage's time is of."""
    return jax.jit(lambda state, x, t, y: nnx.merge(graphdef, state)(x, t, class_labels=y),
                   compiler_options=dict(sampling_compiler_options()))


def stage_inputs(rng, cfg: ModelConfig, cfg_batch: int, size: int):
    """A stage's forward arguments: a CFG batch of noisy images of size x size pixels, t, labels."""
    x = jnp.asarray(rng.standard_normal((cfg_batch, size, size, 3)), jnp.float32)
    t = jnp.full((cfg_batch,), 500.0)
    y = jnp.asarray(rng.integers(0, cfg.num_classes, cfg_batch))
    return x, t, y


def profile_last_stage(forward, state, ckpt: CheckpointConfig, args) -> None:
    """Compiles the last stage's forward and prints its top device ops, nothing timed before it: a
    process of its own (run with XLA's command buffers off, the profile names the kernels that a
    command buffer's one entry hides), short enough for a GPU session."""
    size = stage_resolutions(ckpt.resolution, ckpt.num_stages)[-1]
    x, t, y = stage_inputs(np.random.default_rng(0), ckpt.model, 2 * args.batch, size)
    jax.block_until_ready(forward(state, x, t, y))
    print(json.dumps(dict(preset=args.preset, dtype=args.dtype, attention=args.attention, cfg_batch=2 * args.batch,
                          pixels=size, compiler_options=dict(sampling_compiler_options()),
                          device=str(jax.devices()[0].device_kind), jax=jax.__version__)), flush=True)
    print_profiles(last_stage_forward=(lambda: forward(state, x, t, y), 2))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="xl")
    parser.add_argument("--batch", type=positive_int, default=BATCH,
                        help="images per batch (the CFG batch is twice this)")
    parser.add_argument("--steps", type=positive_int, default=STEPS, help="Euler steps per stage")
    parser.add_argument("--cfg", type=float, default=CFG)
    parser.add_argument("--dtype", default="bfloat16", choices=COMPUTE_DTYPES)
    parser.add_argument("--attention", default="xla", choices=ATTENTION_BACKENDS)
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--profile", action="store_true",
                        help="add the top device ops of the last stage's forward and of one whole generate")
    parser.add_argument("--profile_only", action="store_true",
                        help="only the top device ops of the last stage's forward: no timings, no generate")
    args = parser.parse_args()
    if not args.cfg >= 1:
        parser.error(f"argument --cfg: must be >= 1 (1: no guidance), got {args.cfg}")

    base, resolution = PRESETS[args.preset]
    cfg = dataclasses.replace(base, dtype=args.dtype, attention=args.attention)
    ckpt = CheckpointConfig(model=cfg, resolution=resolution)
    model = random_model(cfg)
    graphdef, state = nnx.split(model)
    forward = forward_program(graphdef)
    if args.profile_only:
        profile_last_stage(forward, state, ckpt, args)
        return

    # Sanity before timing: the compute dtype's forward agrees with float32 on the smallest stage.
    # (xla attention: cudnn takes only bf16/fp16 inputs)
    reference = nnx.merge(*nnx.split(random_model(dataclasses.replace(cfg, dtype="float32", attention="xla"))))
    rng = np.random.default_rng(0)
    small = stage_resolutions(resolution, ckpt.num_stages)[0]
    x0 = jnp.asarray(rng.standard_normal((2, small, small, 3)), jnp.float32)
    t0, y0 = jnp.array([100.0, 700.0]), jnp.array([1, 2])
    want, got = reference(x0, t0, class_labels=y0), forward(state, x0, t0, y0)
    check = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
    assert check < 5e-2, f"{args.dtype} forward is {check:.2e} from float32: not timing a broken model"

    stages = []
    cfg_batch = 2 * args.batch
    for stage, size in enumerate(stage_resolutions(resolution, ckpt.num_stages)):
        x, t, y = stage_inputs(rng, cfg, cfg_batch, size)
        jax.block_until_ready(forward(state, x, t, y))
        seconds = median_seconds(lambda: forward(state, x, t, y), args.repeats)
        tokens = (size // cfg.patch_size) ** 2
        stages.append(dict(stage=stage, pixels=size, tokens=tokens, cfg_batch=cfg_batch, forward_ms=seconds * 1e3))

    sampler = CascadeSampler(model, ckpt)
    labels = np.arange(args.batch) % cfg.num_classes
    run = lambda: sampler.generate(labels, steps_per_stage=args.steps, cfg_scale=args.cfg, seed=1)
    start = time.perf_counter()
    images = run()
    first_call = time.perf_counter() - start
    assert images.shape == (args.batch, resolution, resolution, 3) and images.std() > 0
    seconds = median_seconds(run, args.repeats)

    print(json.dumps(dict(
        preset=args.preset, dtype=args.dtype, attention=args.attention, batch=args.batch, steps_per_stage=args.steps,
        cfg=args.cfg, compiler_options=dict(sampling_compiler_options()), bf16_vs_f32_check=check, stages=stages,
        first_call_s=first_call, seconds_per_batch=seconds, seconds_per_image=seconds / args.batch,
        device=str(jax.devices()[0].device_kind), jax=jax.__version__, flax=flax.__version__,
    )), flush=True)
    if args.profile:  # in generate, idle_share is the sampler's host overhead between device ops
        print_profiles(last_stage_forward=(lambda: forward(state, x, t, y), 2), generate=(run, 1))


if __name__ == "__main__":
    main()
