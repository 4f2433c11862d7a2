"""`main.py --mode=inspect`: build the configured model, count its parameters, and time one
jit-compiled forward per cascade stage. A quick check that a config (or a checkpoint) runs."""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from pixelflow_jax import storage
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.model import PixelFlow
from pixelflow_jax.scheduler import stage_resolutions


def parameter_counts(model: PixelFlow) -> dict[str, int]:
    """Parameters per top-level module, and the total."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    counts = {name: int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(sub))) for name, sub in state.items()}
    counts["total"] = sum(counts.values())
    return counts


def run(config, workdir: str) -> dict:
    model_cfg = ModelConfig.from_mapping(config.model)
    model = PixelFlow(model_cfg, rngs=nnx.Rngs(config.seed))
    counts = parameter_counts(model)
    logging.info("parameters: %s", counts)

    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, images, timesteps, labels):
        return nnx.merge(graphdef, params)(images, timesteps, class_labels=labels)

    num_stages, resolution = config.scheduler.num_stages, config.data.resolution
    rng = np.random.default_rng(config.seed)
    stages = []
    for stage, size in enumerate(stage_resolutions(resolution, num_stages)):
        images = jnp.asarray(rng.standard_normal((2, size, size, model_cfg.in_channels)), jnp.float32)
        timesteps = jnp.asarray(rng.uniform(0, config.scheduler.num_train_timesteps, 2), jnp.float32)
        labels = jnp.zeros((2,), jnp.int32) if model_cfg.num_classes else None
        start = time.perf_counter()
        out = jax.block_until_ready(forward(params, images, timesteps, labels))
        compile_and_run = time.perf_counter() - start
        start = time.perf_counter()
        out = jax.block_until_ready(forward(params, images, timesteps, labels))
        run_time = time.perf_counter() - start
        if not bool(jnp.isfinite(out).all()):
            raise FloatingPointError(f"stage {stage}: the forward pass produced non-finite values")
        stages.append(dict(stage=stage, resolution=size, tokens=(size // model_cfg.patch_size) ** 2,
                           first_call_s=round(compile_and_run, 3), forward_s=round(run_time, 4)))
        logging.info("stage %d: %dpx, %d tokens, first call %.2fs, forward %.4fs", stage, size,
                     stages[-1]["tokens"], compile_and_run, run_time)

    report = dict(model=model_cfg.to_dict(), parameters=counts, batch=2, stages=stages, device=str(jax.devices()[0]))
    storage.write_json_atomically(storage.join(workdir, "inspect.json"), report)
    print(json.dumps(report, indent=2))
    return report
