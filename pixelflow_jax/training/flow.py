"""Flow-matching training inputs for a stage-mixed batch, on the device (the release's collate_fn).

Each image of a batch of B gets a stage (exactly B/S per stage, in shuffled order) and an index k
into the scheduler's 1000-entry tables. For an image at stage s (resolution r_s):
  x_end   = the image box-averaged down to r_s (the full-resolution stage uses the image itself)
  x_start = the image box-averaged down to r_s / 2, then nearest-upsampled back to r_s
  x_end'  = end_t[s] x_end + (1 - end_t[s]) n,   x_start' = start_t[s] x_start + (1 - start_t[s]) n
  x_t     = t x_end' + (1 - t) x_start',          target v = x_end' - x_start'
with one Gaussian n per image at r_s, t = t_window[s][k] and model timestep Timesteps[s][k].
(torch's bilinear halving with align_corners=False is exactly the 2x2 mean.)

Stage groups have static shapes, so every stage runs as a dense (B/S, r_s, r_s, C) batch.
"""

from __future__ import annotations

import dataclasses
import jax
import jax.numpy as jnp
import numpy as np

from pixelflow_jax.pyramid import downsample_2x, upsample_2x
from pixelflow_jax.scheduler import PixelFlowScheduler, stage_resolutions


@dataclasses.dataclass(frozen=True)
class StageTables:
    """The scheduler's per-stage tables as float32 device constants."""

    timesteps: jax.Array  # (S, T) model timestep per stage and index
    t_window: jax.Array  # (S, T) interpolation time per stage and index
    start_t: tuple[float, ...]
    end_t: tuple[float, ...]

    @classmethod
    def from_scheduler(cls, scheduler: PixelFlowScheduler) -> "StageTables":
        return cls(timesteps=jnp.asarray(np.stack(scheduler.timesteps_per_stage), jnp.float32),
                   t_window=jnp.asarray(np.stack(scheduler.t_window_per_stage), jnp.float32),
                   start_t=tuple(scheduler.start_t), end_t=tuple(scheduler.end_t))

    @property
    def num_stages(self) -> int:
        return len(self.start_t)


@dataclasses.dataclass(frozen=True)
class StageBatch:
    """One stage's share of a training batch."""

    x_t: jax.Array  # (B/S, r, r, C) noisy input
    target: jax.Array  # (B/S, r, r, C) velocity target
    timesteps: jax.Array  # (B/S,) model timesteps
    conditioning: dict  # each (B/S, ...): the model's keyword arguments (class_labels, or text embeddings + mask)


jax.tree_util.register_dataclass(StageBatch, data_fields=["x_t", "target", "timesteps", "conditioning"],
                                 meta_fields=[])


@dataclasses.dataclass(frozen=True)
class Draws:
    """The random choices behind one batch (the release draws the same things)."""

    stage_of_image: jax.Array  # (B,) int, stage of each image, exactly B/S of each
    timestep_index: jax.Array  # (B,) int in [0, num_train_timesteps)
    noise: tuple[jax.Array, ...]  # per stage s: (B/S, r_s, r_s, C)


jax.tree_util.register_dataclass(Draws, data_fields=["stage_of_image", "timestep_index", "noise"], meta_fields=[])


def draw(key: jax.Array, batch: int, resolution: int, channels: int, num_stages: int,
         num_train_timesteps: int) -> Draws:
    # Dtypes given: under JAX_ENABLE_X64 the defaults are 64-bit, which drew other timesteps and noise
    # (a run resumed with it set trained on other draws) and made the batch float64.
    stage_key, index_key, noise_key = jax.random.split(key, 3)
    stage_of_image = jax.random.permutation(stage_key, jnp.arange(batch, dtype=jnp.int32) % num_stages)
    timestep_index = jax.random.randint(index_key, (batch,), 0, num_train_timesteps, dtype=jnp.int32)
    per_stage = batch // num_stages
    sizes = stage_resolutions(resolution, num_stages)
    noise = tuple(jax.random.normal(k, (per_stage, size, size, channels), jnp.float32)
                  for size, k in zip(sizes, jax.random.split(noise_key, num_stages)))
    return Draws(stage_of_image, timestep_index, noise)


def stage_batches(images: jax.Array, conditioning: dict, draws: Draws, tables: StageTables) -> list[StageBatch]:
    """Splits a batch of full-resolution images (B, R, R, C), uint8 or floats in [-1, 1], and their
    conditioning (a dict of batch-leading arrays: the model's keyword arguments, or caption tokens
    that train_step encodes per stage) into its S stage batches, stage 0 (smallest) first; within
    a stage, images keep their batch order."""
    num_stages = tables.num_stages
    batch = images.shape[0]
    if batch % num_stages:
        raise ValueError(f"the batch ({batch}) must be divisible by the number of stages ({num_stages})")
    per_stage = batch // num_stages
    order = jnp.argsort(draws.stage_of_image, stable=True)  # images grouped by stage, batch order kept
    out = []
    for s in range(num_stages):
        members = order[s * per_stage:(s + 1) * per_stage]
        # Scaled after the gather: on a mesh the gather moves the images between devices, uint8 a
        # quarter of float32's bytes (the scaling is a per-value table: the same numbers).
        x_end = images_to_unit_range(images[members])
        for _ in range(num_stages - 1 - s):
            x_end = downsample_2x(x_end)
        x_start = upsample_2x(downsample_2x(x_end))
        noise = draws.noise[s]
        x_end = tables.end_t[s] * x_end + (1.0 - tables.end_t[s]) * noise
        x_start = tables.start_t[s] * x_start + (1.0 - tables.start_t[s]) * noise
        k = draws.timestep_index[members]
        t = tables.t_window[s, k][:, None, None, None]
        out.append(StageBatch(x_t=t * x_end + (1.0 - t) * x_start, target=x_end - x_start,
                              timesteps=tables.timesteps[s, k],
                              conditioning=jax.tree.map(lambda a: a[members], conditioning)))
    return out


def per_sample_losses(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Squared error averaged over each sample's pixels and channels (= its tokens x patch values)."""
    return jnp.square(prediction.astype(jnp.float32) - target.astype(jnp.float32)).mean(axis=(1, 2, 3))


# The release's ToTensor + Normalize(0.5, 0.5) of each uint8 value, in its float32 steps. A table:
# under jit XLA turns x / 127.5 into x * (1 / 127.5), one float32 step off for 205 of the 256 values.
UNIT_RANGE = ((np.arange(256, dtype=np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5))


def images_to_unit_range(images: jax.Array) -> jax.Array:
    """uint8 [0, 255] -> float32 [-1, 1], as the release's ToTensor + Normalize(0.5, 0.5); float
    images are taken to be in [-1, 1] already."""
    if jnp.issubdtype(images.dtype, jnp.floating):
        return images.astype(jnp.float32)
    return jnp.asarray(UNIT_RANGE)[images.astype(jnp.int32)]

