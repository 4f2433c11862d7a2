"""Does a resumed training run compute, bit for bit, what an uninterrupted one computes on this
machine's accelerator? The README promises it on the same devices and settings; the CPU tests check
it on CPUs, where XLA's kernels are deterministic. A GPU may not be: XLA picks its GEMM kernels by
timing them in each process (autotuning), and a kernel that accumulates with atomics sums in
another order each call.

    python bench/resume_exactness.py --attention=cudnn          # on the GPU
    python bench/resume_exactness.py --preset=tiny --batch=4     # a CPU dry run of the script

Two fresh processes run the jitted training step (synthetic batches, a different one each step):
  1. STEPS steps from the initial state (`whole`); then, from the initial state again, the first
     half (`first_half`, which also tells whether the step repeats itself in one process), saved as
     training saves it (orbax, `checkpointing.save`);
  2. that checkpoint restored as a resumed run restores it (`checkpointing.resume_point`), and the
     second half (`second_half`).
One JSON line compares them: the losses bit for bit and a digest of the whole final state (weights,
EMA, optimiser moments, RNG key). Needs only jax, flax, optax, orbax and numpy.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from pixelflow_jax.config import ATTENTION_BACKENDS, COMPUTE_DTYPES, REMAT_POLICIES, ModelConfig  # noqa: E402
from pixelflow_jax.training import checkpointing  # noqa: E402
from harness import positive_int  # noqa: E402
from sample_speed import PRESETS  # noqa: E402
from train_speed import training_program  # noqa: E402

# XL/4's blocks at XL/4's resolution, 4 of its 28: the same kernels (the blocks run as one scan), a
# compile of seconds.
RESUME_PRESETS = {**PRESETS, "xl_depth4": (ModelConfig(depth=4), 256)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(RESUME_PRESETS), default="xl_depth4")
    parser.add_argument("--batch", type=positive_int, default=8, help="global batch (stage-mixed)")
    parser.add_argument("--dtype", default="bfloat16", choices=COMPUTE_DTYPES)
    parser.add_argument("--remat", default="none", choices=REMAT_POLICIES)
    parser.add_argument("--attention", default="auto", choices=ATTENTION_BACKENDS)
    parser.add_argument("--steps", type=positive_int, default=6, help="steps of the whole run (even)")
    parser.add_argument("--part", choices=("first", "second"), help="internal: the process's part")
    parser.add_argument("--checkpoints", help="internal: the folder the first part saves into")
    args = parser.parse_args(argv)
    if args.steps % 2:
        parser.error(f"--steps must be even (the resume is at half), got {args.steps}")
    return args


def training(args):
    """(initial state, its shardings, the jitted step, resolution, number of classes) on one device."""
    base, resolution = RESUME_PRESETS[args.preset]
    cfg = dataclasses.replace(base, dtype=args.dtype, remat=args.remat, attention=args.attention)
    return *training_program(cfg, resolution, fsdp=1), resolution, cfg.num_classes


def batch_of_step(step: int, batch: int, resolution: int, num_classes: int):
    """Step `step`'s synthetic batch: the same in every process, another at every step."""
    rng = np.random.default_rng(step)
    images = rng.integers(0, 256, (batch, resolution, resolution, 3), dtype=np.uint8)
    return images, rng.integers(0, num_classes, batch).astype(np.int32)


def run_steps(state, step_fn, start: int, stop: int, batch: int, resolution: int, num_classes: int):
    """(state after steps start..stop-1, their losses as float.hex: exact, and JSON-safe)."""
    losses = []
    for step in range(start, stop):
        state, metrics = step_fn(state, *batch_of_step(step, batch, resolution, num_classes))
        losses.append(float(metrics["loss"]).hex())
    return state, losses


def digest(state) -> str:
    """SHA-256 of every array of the state, in the tree's order."""
    sha = hashlib.sha256()
    for leaf in jax.tree.leaves(jax.device_get(state)):
        sha.update(np.ascontiguousarray(leaf).tobytes())
    return sha.hexdigest()


def run_part(args) -> dict:
    state, shardings, step_fn, resolution, num_classes = training(args)
    half, sizes = args.steps // 2, (args.batch, resolution, num_classes)
    manager = checkpointing.checkpoint_manager(args.checkpoints, keep=1)
    where = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__)
    if args.part == "first":
        again = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input state
        whole, whole_losses = run_steps(state, step_fn, 0, args.steps, *sizes)
        first, first_losses = run_steps(again, step_fn, 0, half, *sizes)
        checkpointing.save(manager, half, first)
        checkpointing.wait_for_saves(manager)
        return dict(where, whole_losses=whole_losses, whole_digest=digest(whole), first_losses=first_losses)
    resumed_at, state = checkpointing.resume_point(manager, state, shardings)
    assert resumed_at == half, f"resumed at step {resumed_at}, not {half}"
    state, losses = run_steps(state, step_fn, half, args.steps, *sizes)
    return dict(where, second_losses=losses, second_digest=digest(state))


def run_in_fresh_process(argv: list[str], part: str, checkpoints: str) -> dict:
    """The part's JSON (its last stdout line); its output otherwise goes to ours."""
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *argv, f"--part={part}",
                           f"--checkpoints={checkpoints}"], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def compared(args, first: dict, second: dict) -> dict:
    half = args.steps // 2
    whole_second_half = first["whole_losses"][half:]
    differing = [half + i for i, (a, b) in enumerate(zip(whole_second_half, second["second_losses"])) if a != b]
    return dict(
        preset=args.preset, batch=args.batch, dtype=args.dtype, remat=args.remat, attention=args.attention,
        steps=args.steps, device=first["device"], jax=first["jax"],
        step_repeats_in_one_process=first["first_losses"] == first["whole_losses"][:half],
        resumed_losses_equal=not differing, first_differing_step=differing[0] if differing else None,
        resumed_state_equal=first["whole_digest"] == second["second_digest"],
        losses=dict(whole=[float.fromhex(x) for x in first["whole_losses"]],
                    resumed_second_half=[float.fromhex(x) for x in second["second_losses"]]))


def main(argv=None):
    args = parse_args(argv)
    if args.part:
        print(json.dumps(run_part(args)), flush=True)
        return
    argv = sys.argv[1:] if argv is None else argv
    # This process never starts jax's backend: on a GPU it would take the memory the parts need.
    with tempfile.TemporaryDirectory(prefix="resume_exactness_") as folder:
        checkpoints = os.path.join(folder, "run")
        first = run_in_fresh_process(argv, "first", checkpoints)
        second = run_in_fresh_process(argv, "second", checkpoints)
    print(json.dumps(compared(args, first, second)), flush=True)


if __name__ == "__main__":
    main()
