"""The release's cascade sampler (PixelFlowPipeline): Euler or dopri5 per stage, guidance, renoising.

Stage 0 starts from N(0, I) at resolution R / 2^(S-1). Every later stage first nearest-upsamples
x2 and renoises, x <- alpha * x + beta * block_noise, then integrates the flow from its start to its
end time. Each stage (transition and whole solve) is one jit-compiled program with static shapes.

Guidance: class-conditional models use the release's stage-wise scale
g_s = 1 + (cfg - 1) * [0, 1/6, 2/3, 1][s] (other stage counts: `stage_guidance`); text-conditional
ones use g_s = cfg. Where g_s is exactly 1 the unconditional half is skipped: v_u + 1 (v_c - v_u)
= v_c, so only float rounding (~1e-7) separates this from the release, which always runs both halves.

Randomness: every image draws its noise from fold_in(key, image_id), so with Euler an image depends
only on the seed, its id and its conditioning, not on the batch it was sampled in, the batch size or
the number of devices. dopri5 solves a batch as one ODE with one step size, as the release does, so
its images move with their batch by a few uint8 levels (5 at most on the tiny fixture). Callers may
pass their own noise instead (to replay the release's draws).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import re
import reprlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from pixelflow_jax import random_numbers, validation
from pixelflow_jax.config import matmul_precision
from pixelflow_jax.kernels.attention import target_platform, tracing_modes
from pixelflow_jax.model import PixelFlow, checked_text_mask, readable_here
from pixelflow_jax.pyramid import upsample_2x
from pixelflow_jax.scheduler import PixelFlowScheduler, renoise_coefficients, stage_resolutions

SOLVERS = ("euler", "dopri5")
# The release's stage-wise guidance weights, defined for its 4 stages (at s / 3 = 0, 1/3, 2/3, 1).
CLASS_GUIDANCE_STAGE_WEIGHTS = (0.0, 1.0 / 6.0, 2.0 / 3.0, 1.0)
BLOCK_NOISE_EPS = 1e-6
DOPRI5_RTOL, DOPRI5_ATOL = 1e-3, 1e-6  # the release's torchdiffeq settings
DOPRI5_MAX_STEPS = 4096
# XLA's options for the sampler's programs compiled for a GPU: matmuls on cuBLAS rather than XLA's autotuned
# Triton GEMM fusions, 5.5% less time per image and every stage faster on an H200 (bench/RESULTS.md,
# 2026-12-04). Not for other platforms: libtpu may refuse an option it does not know, and CPU programs stay.
GPU_SAMPLING_XLA_OPTIONS = {"xla_gpu_enable_triton_gemm": False}

Conditioning = dict[str, Any]  # model keyword arguments, e.g. {"class_labels": (B,) int}


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    steps_per_stage: tuple[int, ...]  # Euler steps per stage (dopri5 ignores them)
    cfg_scale: float = 2.4
    shift: float = 1.0
    solver: str = "euler"
    rtol: float = DOPRI5_RTOL
    atol: float = DOPRI5_ATOL

    def __post_init__(self):
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")
        if not isinstance(self.steps_per_stage, tuple) or not all(
                isinstance(n, numbers.Integral) for n in self.steps_per_stage):
            raise ValueError(f"steps_per_stage must be a tuple of ints, one per stage, got {self.steps_per_stage!r}; "
                             "SamplingOptions.create(num_stages, steps_per_stage, ...) also takes one int for all")
        if any(int(n) < 1 for n in self.steps_per_stage):
            raise ValueError(f"steps_per_stage must be positive, got {self.steps_per_stage}")
        if not (math.isfinite(self.cfg_scale) and 1.0 <= self.cfg_scale <= validation.MAX_CFG_SCALE):
            raise ValueError(f"cfg_scale must be a finite number in [1, {validation.MAX_CFG_SCALE:g}] (1 = no "
                             f"guidance), got {self.cfg_scale}")
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ValueError(f"shift must be a finite positive number, got {self.shift}")
        for name in ("rtol", "atol"):  # dopri5's step control: <= 0 or NaN never meets (or always meets) it
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a finite positive number, got {getattr(self, name)}")

    @classmethod
    def create(cls, num_stages: int, steps_per_stage: int | Sequence[int] = 30, **kwargs) -> "SamplingOptions":
        """Options with `steps_per_stage` given as one int for all stages or one per stage; numbers
        may be numpy or jax scalars."""
        validation.steps_per_stage("steps_per_stage", steps_per_stage, where="")  # 2.5 is not 2 steps
        for name in ("cfg_scale", "shift"):
            if name in kwargs:
                if np.ndim(kwargs[name]) != 0:
                    raise ValueError(f"{name} must be one number, got shape {np.shape(kwargs[name])}")
                kwargs[name] = validation.number(name, np.asarray(kwargs[name]).item(), where="")
        steps = [steps_per_stage] * num_stages if np.ndim(steps_per_stage) == 0 else list(steps_per_stage)
        if len(steps) != num_stages:
            raise ValueError(f"steps_per_stage needs one value per stage ({num_stages}), got {steps_per_stage}")
        return cls(steps_per_stage=tuple(int(n) for n in steps), **kwargs)


def stage_guidance(cfg_scale: float, num_stages: int, class_conditional: bool) -> list[float]:
    """Guidance scale of each stage. Class-conditional: g_s = 1 + (cfg - 1) w(s / (S - 1)), with w the
    release's four weights joined by straight lines, so 4 stages get exactly the release's scales and
    other counts the same curve; one stage gets cfg. (The release indexes its four weights by stage
    number: fewer stages get only the first ones there, e.g. 0 and 1/6 for two; ours on purpose.)"""
    if not class_conditional or cfg_scale == 1.0 or num_stages == 1:
        return [float(cfg_scale)] * num_stages
    if num_stages == len(CLASS_GUIDANCE_STAGE_WEIGHTS):
        weights = CLASS_GUIDANCE_STAGE_WEIGHTS  # the release's values themselves, not their interpolation
    else:
        knots = np.linspace(0.0, 1.0, len(CLASS_GUIDANCE_STAGE_WEIGHTS))
        weights = np.interp(np.arange(num_stages) / (num_stages - 1), knots, CLASS_GUIDANCE_STAGE_WEIGHTS)
    return [1.0 + (cfg_scale - 1.0) * float(w) for w in weights]


def block_noise_factor(gamma: float) -> np.ndarray:
    """Cholesky factor L of Sigma = (1 - gamma) I + gamma 11^T + 1e-6 I (4 x 4), so L z ~ N(0, Sigma)."""
    sigma = (1.0 - gamma) * np.eye(4) + gamma * np.ones((4, 4)) + BLOCK_NOISE_EPS * np.eye(4)
    return np.linalg.cholesky(sigma).astype(np.float32)


def block_noise(key: jax.Array, shape: tuple[int, int, int], gamma: float) -> jax.Array:
    """Correlated noise (H, W, C): one N(0, Sigma) 4-vector per channel and 2x2 pixel block, entry
    (p, q) of the block at pixel (2h + p, 2w + q), all blocks drawn in one op."""
    h, w, c = shape
    z = jax.random.normal(key, (h // 2, w // 2, c, 4), jnp.float32)
    # L z written out as products and sums, the same ops in the same order for every value. A matmul
    # (YNNPACK's under jax 0.12's XLA:CPU) or a sum over the last axis orders its arithmetic by the
    # size of the whole batch of blocks (draw_noise vmaps this), and an image's noise then moved by
    # an ulp with the other images in its batch.
    factor = block_noise_factor(gamma)
    entries = []
    for row in factor:
        entry = z[..., 0] * row[0]
        for j in range(1, 4):
            entry = entry + z[..., j] * row[j]
        entries.append(entry)
    blocks = jnp.stack(entries, axis=-1)
    return blocks.reshape(h // 2, w // 2, c, 2, 2).transpose(0, 3, 1, 4, 2).reshape(h, w, c)


def draw_noise(key: jax.Array, image_ids: jax.Array, resolution: int, num_stages: int, channels: int,
               gamma: float) -> tuple[jax.Array, list[jax.Array]]:
    """Per-image noise from fold_in(key, id): (initial noise (B, r0, r0, C), [block noise of stage s, s >= 1])."""
    sizes = stage_resolutions(resolution, num_stages)

    def for_one_image(image_id):
        keys = jax.random.split(jax.random.fold_in(key, image_id), num_stages)
        initial = jax.random.normal(keys[0], (sizes[0], sizes[0], channels), jnp.float32)
        return initial, [block_noise(keys[s], (sizes[s], sizes[s], channels), gamma) for s in range(1, num_stages)]

    return jax.vmap(for_one_image)(image_ids)


_draw_noise_compiled = jax.jit(draw_noise, static_argnums=(2, 3, 4, 5))


def draw_noise_jit(key: jax.Array, image_ids: jax.Array, resolution: int, num_stages: int, channels: int,
                   gamma: float) -> tuple[jax.Array, list[jax.Array]]:
    """draw_noise compiled, under jax's random-number settings pinned (random_numbers.py): a seed's
    images are not another's for a JAX_THREEFRY_PARTITIONABLE=0 in the environment."""
    with random_numbers.pinned():
        return _draw_noise_compiled(key, image_ids, resolution, num_stages, channels, gamma)


def to_uint8(latents: jax.Array) -> jax.Array:
    """The release's output mapping: round(255 * clip(x / 2 + 0.5, 0, 1))."""
    return jnp.round(255.0 * jnp.clip(latents / 2.0 + 0.5, 0.0, 1.0)).astype(jnp.uint8)


def finite_images(latents: jax.Array) -> jax.Array:
    """(B,) bool: which images came out finite (NaN would become a black image without a word)."""
    return jnp.isfinite(latents).all(axis=tuple(range(1, latents.ndim)))


def finished_images(latents: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(to_uint8, finite_images) of the final latents: one program, for jax.jit (eagerly, each of
    their ops is a dispatch that writes a whole batch of intermediates)."""
    return to_uint8(latents), finite_images(latents)


finished_images_jit = jax.jit(finished_images)
# Under a mesh in context (a training preview of a run of several processes): replicated, so that
# every process can read the images it returns.
finished_images_everywhere_jit = jax.jit(finished_images, out_shardings=jax.sharding.PartitionSpec())


def check_finite(finite: np.ndarray, image_ids) -> None:
    bad = [int(i) for i, ok in zip(image_ids, np.asarray(finite)) if not ok]
    if bad:
        raise ValueError(f"sampling gave NaN or inf for image ids {bad[:10]}{' ...' if len(bad) > 10 else ''}: the "
                         "model's velocity is not finite there (damaged weights?), or dopri5 did not reach the end "
                         f"of a stage within {DOPRI5_MAX_STEPS} steps; nothing was written for them")


def check_pairable(cond: Conditioning, uncond: Conditioning) -> None:
    """guided_velocity runs each image's cond and uncond rows as one batch: they must hold the same
    arguments of one shape. Else jax.tree.map failed on the structure (a mask in one only) or
    jnp.stack on the shapes (captions padded to other lengths), naming neither dict."""
    if set(cond) != set(uncond):
        raise ValueError(f"cond and uncond must hold the same arguments (a guided step runs them as one batch), got "
                         f"{sorted(cond)} and {sorted(uncond)}")
    for key in cond:
        if np.shape(cond[key]) != np.shape(uncond[key]):
            raise ValueError(f"uncond[{key!r}] must have cond's shape {np.shape(cond[key])} (a guided step runs them "
                             f"as one batch), got {np.shape(uncond[key])}: pad both to one length, the mask marking "
                             "the padding")


def guided_velocity(model: PixelFlow, x: jax.Array, timestep: jax.Array, cond: Conditioning,
                    uncond: Conditioning, guidance) -> jax.Array:
    """v_u + g (v_c - v_u), with the two halves in one batch; only v_c when guidance is None (no
    guidance: half the batch). guidance may be traced, so one program serves every scale."""
    timesteps = jnp.full((x.shape[0],), timestep, jnp.float32)
    if guidance is None:
        return model(x, timesteps, **cond)
    # Each image's two rows side by side (u0, c0, u1, c1, ...), not the halves one after the other:
    # on a mesh an image's pair then stays on the device that holds the image (the halves moved
    # every latent between devices at every step).
    pair = lambda u, c: jnp.stack([u, c], axis=1).reshape(-1, *u.shape[1:])
    both = jax.tree.map(pair, uncond, cond)
    v = model(pair(x, x), pair(timesteps, timesteps), **both).reshape(x.shape[0], 2, *x.shape[1:])
    v_uncond, v_cond = v[:, 0], v[:, 1]
    return v_uncond + guidance * (v_cond - v_uncond)


class CascadeSampler:
    """Runs the cascade for one model. Each stage compiles once per batch shape, step count, solver
    and whether it is guided (a CFG scale of 1 is not); other scales and shifts reuse the program."""

    def __init__(self, model: PixelFlow, config):
        """config: the CheckpointConfig that load_model returns (resolution, stages, timesteps)."""
        if not isinstance(model, PixelFlow):  # a path, say, failed on a missing .config
            raise ValueError(f"model must be the PixelFlow load_model returns (model, config = load_model(path)), got "
                             f"a {type(model).__name__}")
        if not all(hasattr(config, name) for name in ("model", "resolution", "num_stages", "num_train_timesteps")):
            # A model built with PixelFlow(ModelConfig(...)) has no load_model config: the fix names how to make one.
            raise ValueError(f"config must be the checkpoint config load_model returns with the model (model, config "
                             f"= load_model(path)), got a {type(config).__name__}; for a model of your own, "
                             "pixelflow_jax.CheckpointConfig(model=model.config, resolution=..., num_stages=..., "
                             "num_train_timesteps=...) as it was trained")
        if config.model.architecture() != model.config.architecture():
            raise ValueError("config is another model's: pass the config load_model returned with this model")
        check_conditional(model.config)
        self.graphdef, self.state = nnx.split(model)
        self.model_config = model.config
        self.resolution = config.resolution
        self.scheduler = PixelFlowScheduler(config.num_train_timesteps, config.num_stages)
        self.class_conditional = model.config.num_classes > 0
        # The length a text run cut its captions to, where its config records it (None: the release's 512).
        self.trained_text_tokens = getattr(config, "max_text_tokens", None)
        self._warned_longer: set[str] = set()  # prompts named as longer than that, once each

    def generate(self, labels, *, steps_per_stage: int | Sequence[int] = 30, cfg_scale: float = 2.4,
                 solver: str = "euler", shift: float = 1.0, seed: int = 0, image_ids=None) -> np.ndarray:
        """uint8 images (N, R, R, 3) of a class-conditional model for the given labels, as one batch.

        labels: N class ids in [0, num_classes) (a list or a 1-D numpy or jax array), one per image.
        steps_per_stage: Euler steps, one int for every stage or one per stage (dopri5 ignores them).
        cfg_scale: the guidance scale in [1, 1000] (1: none) of the last stage; as the release does,
          the stages ramp up to it from no guidance at stage 0 (stage_guidance).
        solver: 'euler' or 'dopri5' (adaptive, at the release's tolerances).
        shift: the time shift (> 0; 1: none) of Euler's grid in each stage (dopri5 ignores it).
        seed: an int in [0, 2**32).
        image_ids (default 0..N-1) select each image's noise: the same (seed, id, label) always
          gives the same image, whatever else is in the batch (with dopri5: up to its tolerance,
          since the batch shares its step sizes).
        """
        cond, uncond = class_conditioning(labels, self.model_config.num_classes)
        return self._generate(cond, uncond, len(labels), steps_per_stage, cfg_scale, solver, shift, seed, image_ids)

    def generate_from_prompts(self, prompt_encoder, prompts: Sequence[str], *, negative_prompt: str = "",
                              steps_per_stage: int | Sequence[int] = 10, cfg_scale: float = 4.0,
                              solver: str = "euler", shift: float = 1.0, seed: int = 0, image_ids=None) -> np.ndarray:
        """uint8 images (N, R, R, 3) of a text-conditional model, one per prompt, as one batch.
        Defaults are the release's demo settings (constant CFG 4, 10 steps).

        prompt_encoder: a text.prompts.PromptEncoder of the T5 the model was trained with.
        prompts: N strings (a list; one string alone is refused).
        negative_prompt: the unconditional prompt guidance steers away from ("": the release's).
        cfg_scale: the guidance scale in [1, 1000] (1: none), the same at every stage.
        steps_per_stage, solver, shift, seed, image_ids: as generate's.
        """
        from pixelflow_jax.text.prompts import prompt_list

        if not self.model_config.cross_attention_dim:
            raise ValueError("this model is class-conditional: use generate(labels)")
        if isinstance(prompt_encoder, (str, os.PathLike)) or not callable(getattr(prompt_encoder, "encode", None)):
            raise ValueError(f"prompt_encoder must be a PromptEncoder, got {prompt_encoder!r}: build one from the T5 "
                             "folder with pixelflow_jax.text.prompts.PromptEncoder(folder)")
        prompts = prompt_list(prompts)
        if not isinstance(negative_prompt, str):
            raise ValueError(f"negative_prompt must be a string, got {negative_prompt!r}")
        # The negative prompt is encoded once and repeated for every image.
        encoded, negative = prompt_encoder.encode(list(prompts)), prompt_encoder.encode([negative_prompt])
        width = self.model_config.cross_attention_dim
        if np.ndim(encoded[0]) != 3 or np.shape(encoded[0])[-1] != width:  # else an error from inside the stage's jit
            raise ValueError(f"prompt_encoder gives embeddings of shape {np.shape(encoded[0])} for {len(prompts)} "
                             f"prompts; this model's cross-attention takes (prompts, tokens, {width}): use the text "
                             "encoder the model was trained with (google/flan-t5-xl for the release's)")
        self.warn_of_prompts_past_the_trained_length(prompts, encoded[1])
        cond, uncond = text_conditioning(*encoded, negative)
        return self._generate(cond, uncond, len(prompts), steps_per_stage, cfg_scale, solver, shift, seed, image_ids)

    def warn_of_prompts_past_the_trained_length(self, prompts: list[str], mask) -> None:
        """Names each prompt (once) that its encoder gave more tokens than the model's captions had in
        training: an encoder longer than that (PromptEncoder's default 512 for a run of 128) reads the
        cross-attention text it never learned from. A prompt within it encodes alike at any length."""
        from pixelflow_jax.text.prompts import shortened

        trained = self.trained_text_tokens
        if not trained:
            return
        for prompt, tokens in zip(prompts, np.asarray(mask).sum(axis=1).astype(int)):
            if tokens > trained and prompt not in self._warned_longer:
                self._warned_longer.add(prompt)
                logging.warning("prompt %s is encoded as %d tokens, past the %d this model trained with (its captions "
                                "were cut there), so it reads text it never learned from: encode prompts with "
                                "PromptEncoder(folder, max_length=%d), as training did", shortened(prompt), tokens,
                                trained, trained)

    def _generate(self, cond, uncond, count, steps_per_stage, cfg_scale, solver, shift, seed, image_ids):
        if count == 0:
            raise ValueError("nothing to generate: pass at least one label or prompt")
        num_stages = self.scheduler.num_stages
        options = SamplingOptions.create(num_stages, steps_per_stage, cfg_scale=cfg_scale, shift=shift, solver=solver)
        ids = jnp.arange(count) if image_ids is None else jnp.asarray(validation.image_ids(image_ids, count))
        if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) or np.size(seed) != 1:
            raise ValueError(f"seed must be an int in [0, {validation.MAX_SEED}] (each image's noise is drawn from "
                             f"it and the image's id), got {seed!r}")
        key = random_numbers.key(validation.seed("seed", np.asarray(seed).item(), where=""))
        initial, blocks = draw_noise_jit(key, ids, self.resolution, num_stages,
                                         self.model_config.in_channels, self.scheduler.gamma)
        finish = finished_images_jit if jax.sharding.get_abstract_mesh().empty else finished_images_everywhere_jit
        images, finite = finish(self.sample(initial, blocks, cond, uncond, options))
        check_finite(finite, np.asarray(ids))
        return np.asarray(images)

    def sample(self, initial_noise: jax.Array, block_noises: Sequence[jax.Array], cond: Conditioning,
               uncond: Conditioning, options: SamplingOptions) -> jax.Array:
        """Final latents (B, R, R, C) float32 from the stage-0 noise and each later stage's block noise."""
        num_stages = self.scheduler.num_stages
        if not isinstance(options, SamplingOptions):
            raise ValueError(f"options must be a SamplingOptions (SamplingOptions.create(num_stages, steps_per_stage, "
                             f"...)), got a {type(options).__name__}")
        if len(block_noises) != num_stages - 1 or len(options.steps_per_stage) != num_stages:
            raise ValueError(f"need block noise for stages 1..{num_stages - 1} and steps for {num_stages} stages")
        self._check_noise_shapes(initial_noise, block_noises)
        for name, conditioning in (("cond", cond), ("uncond", uncond)):  # the stages run under jit: check here
            if not isinstance(conditioning, dict):
                raise ValueError(f"{name} must be a dict of the model's keyword arguments ({{'class_labels': ...}}, "
                                 f"or the encoder_hidden_states and encoder_attention_mask of text models), got a "
                                 f"{type(conditioning).__name__}")
            for key, value in conditioning.items():  # (a mismatch failed in jnp.stack, naming neither)
                if np.ndim(value) == 0 or np.shape(value)[0] != np.shape(initial_noise)[0]:
                    raise ValueError(f"{name}[{key!r}] must hold one row per image of initial_noise "
                                     f"({np.shape(initial_noise)[0]}), got shape {np.shape(value)}")
            labels, mask = conditioning.get("class_labels"), conditioning.get("encoder_attention_mask")
            if readable_here(labels):
                validation.class_ids(f"{name}['class_labels']", conditioning["class_labels"],
                                     self.model_config.num_classes, allow_null=True)
            if readable_here(mask) and "encoder_hidden_states" in conditioning:  # an additive mask ran unseen
                checked_text_mask(mask, tuple(np.shape(conditioning["encoder_hidden_states"])[:2]))
        guidance = stage_guidance(options.cfg_scale, num_stages, self.class_conditional)
        if any(scale != 1.0 for scale in guidance):
            check_pairable(cond, uncond)
        x = jnp.asarray(initial_noise, jnp.float32)
        for stage in range(num_stages):
            noise = None if stage == 0 else jnp.asarray(block_noises[stage - 1], jnp.float32)
            x = self._run_stage(stage, x, noise, cond, uncond, guidance[stage], options)
        return x

    def _check_noise_shapes(self, initial_noise, block_noises) -> None:
        """Each stage's noise is (B, r, r, C) at its resolution: one of another size failed in a jax
        broadcast, and a block noise of batch 1 was broadcast, giving every image the same noise."""
        sizes = stage_resolutions(self.resolution, self.scheduler.num_stages)
        batch = np.shape(initial_noise)[0] if np.ndim(initial_noise) else None
        for stage, noise in enumerate([initial_noise, *block_noises]):
            expected = (batch, sizes[stage], sizes[stage], self.model_config.in_channels)
            if tuple(np.shape(noise)) != expected:
                name = "initial_noise" if stage == 0 else f"block_noises[{stage - 1}] (stage {stage})"
                raise ValueError(f"{name} must have shape (batch, {sizes[stage]}, {sizes[stage]}, "
                                 f"{self.model_config.in_channels}) = {expected}, got {tuple(np.shape(noise))} "
                                 "(draw_noise gives every stage's noise)")

    def _run_stage(self, stage, x, noise, cond, uncond, guidance, options):
        program, args = self.stage_call(stage, x, noise, cond, uncond, guidance, options)
        with matmul_precision(self.model_config.dtype):  # part of the compiled program's key
            return program(*args)

    def stage_call(self, stage, x, noise, cond, uncond, guidance, options):
        """Stage `stage`'s jitted program and its arguments. To lower it ahead of time (as
        bench/gpu_compile.py does), do so under matmul_precision(the model's dtype), as it runs."""
        alpha, beta = renoise_coefficients(self.scheduler.original_start_t[stage], self.scheduler.gamma)
        if options.solver == "euler":
            timesteps, t = self.scheduler.set_timesteps(options.steps_per_stage[stage], stage, shift=options.shift)
            # The release steps with the float64 grid cast to float32 before the difference.
            t32 = t.astype(np.float32)
            schedule = (timesteps.astype(np.float32), t32[1:] - t32[:-1])
        else:
            first, last = self.scheduler.stage_timestep_range(stage)
            schedule = (np.float32(first), np.float32(last), np.float32(options.rtol), np.float32(options.atol))
        program = _stage_program(self.graphdef, stage > 0, alpha, beta, options.solver)
        # None (scale 1: no guidance) traces the half-batch program; any other scale shares one.
        guidance = None if guidance == 1.0 else np.float32(guidance)
        return program, (self.state, x, noise, cond, uncond, schedule, guidance)


def sampling_compiler_options() -> tuple[tuple[str, Any], ...]:
    """jax.jit's compiler_options for a sampling program made now, as (name, value) pairs (hashable: part
    of the stage programs' key): GPU_SAMPLING_XLA_OPTIONS when compiling for a GPU (this host's, or
    compiling_for('gpu')), less any option the user's XLA_FLAGS name, since jit's options would override
    XLA_FLAGS (--xla_gpu_enable_triton_gemm=true keeps XLA's Triton GEMMs); none for other platforms."""
    if target_platform() != "gpu":
        return ()
    named = xla_flag_names(os.environ.get("XLA_FLAGS", ""))
    return tuple((name, value) for name, value in GPU_SAMPLING_XLA_OPTIONS.items() if name not in named)


def xla_flag_names(xla_flags: str) -> set[str]:
    """The flags an XLA_FLAGS value sets: '--name=value' or '--name' (XLA's parser takes one dash too)."""
    return set(re.findall(r"(?:^|\s)--?(\w+)", xla_flags))


def _stage_program(graphdef, renoise: bool, alpha: float, beta: float, solver: str):
    """One stage (renoise + whole solve) as a jitted function. Cached on the model's graph, so
    every sampler of the same architecture shares the compiled programs; the guidance scale is an
    argument, so a new CFG value does not compile again."""
    return _stage_program_in_modes(tracing_modes(), sampling_compiler_options(), graphdef, renoise, alpha, beta,
                                   solver)


# Keyed on the attention kernels' modes too: a trace reads them (interpret_kernels, compiling_for), so a
# program traced inside interpret_kernels would otherwise run interpreted kernels outside it, and the other way.
# And on the compiler options, which jit takes when the program is made: one made for a GPU keeps its options.
@functools.lru_cache(maxsize=64)
def _stage_program_in_modes(modes, compiler_options, graphdef, renoise: bool, alpha: float, beta: float,
                            solver: str):

    def program(state, x, noise, cond, uncond, schedule, guidance):
        model = nnx.merge(graphdef, state)
        if renoise:
            x = alpha * upsample_2x(x) + beta * noise
        velocity = lambda x, timestep: guided_velocity(model, x, timestep, cond, uncond, guidance)
        if solver == "euler":
            return _euler(velocity, x, *schedule)
        return _dopri5(velocity, x, *schedule)

    return jax.jit(program, compiler_options=dict(compiler_options))


def _euler(velocity, x, timesteps, dts):
    def step(i, x):
        return x + dts[i] * velocity(x, timesteps[i])

    return jax.lax.fori_loop(0, timesteps.shape[0], step, x)


def _dopri5(velocity, x, first_timestep, last_timestep, rtol, atol):
    """dx/dt = v(x, T(t)) for t in [0, 1], T(t) = T_first + t (T_last - T_first), adaptive Dopri5."""
    import diffrax

    term = diffrax.ODETerm(lambda t, x, args: velocity(x, first_timestep + t * (last_timestep - first_timestep)))

    def solve(x):
        # float32 times, as the latents: Python floats became float64 under jax_enable_x64, and so
        # did the solve (its output then failed lax.cond's check against the float32 branch).
        solution = diffrax.diffeqsolve(term, diffrax.Dopri5(), t0=np.float32(0.0), t1=np.float32(1.0), dt0=None, y0=x,
                                       stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
                                       saveat=diffrax.SaveAt(t1=True), max_steps=DOPRI5_MAX_STEPS, throw=False)
        # A solve that did not reach t = 1 (a NaN or inf velocity rejects every step) comes out NaN,
        # which check_finite names, rather than as diffrax's "increase max_steps" from a callback.
        return jnp.where(solution.result == diffrax.RESULTS.successful, solution.ys[0], jnp.nan)

    # A stage that starts from NaN (an earlier stage failed) would reject its steps up to the limit.
    return jax.lax.cond(jnp.isfinite(x).all(), solve, lambda x: jnp.full_like(x, jnp.nan), x)


def check_conditional(model_config) -> None:
    """The cascade samples models conditioned on a class or a text; an unconditional one (no class
    table, no cross-attention: the release has none, and training here refuses it) would get class
    ids it has no table for, or be told it is text-conditional."""
    if not model_config.num_classes and not model_config.cross_attention_dim:
        raise ValueError("this model is unconditional (model.num_classes = 0 and no text cross-attention): the "
                         "sampler, like training, takes class-conditional (num_classes >= 1) or text-conditional "
                         "models only")


def prompts_among(labels) -> list[str]:
    """The entries of `labels` that are text other than a number's digits: prompts."""
    if isinstance(labels, str):
        entries = [labels]
    elif isinstance(labels, np.ndarray):
        entries = labels.ravel().tolist()
    elif isinstance(labels, (list, tuple)):
        entries = labels
    else:
        return []
    return [entry for entry in entries if isinstance(entry, str) and not entry.strip().isdecimal()]


def class_conditioning(labels, num_classes: int) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) model kwargs for class labels; the unconditional id is num_classes."""
    if not num_classes:
        raise ValueError("this model is text-conditional: use generate_from_prompts(prompt_encoder, prompts)")
    if prompts := prompts_among(labels):  # a class name or a prompt: 'must be whole class ids' named neither
        raise ValueError(f"this model is class-conditional: generate takes class ids in [0, {num_classes}), not text "
                         f"such as {reprlib.repr(prompts[0])} (prompts are for a text-conditional model's "
                         "generate_from_prompts(prompt_encoder, prompts))")
    # Host arrays: an eager jnp op here would queue behind the batch sampling before it, and reading
    # it back would stall the sampling job's loop until that batch finished.
    labels = np.asarray(validation.class_ids("labels", labels, num_classes), np.int32)
    return {"class_labels": labels}, {"class_labels": np.full_like(labels, num_classes)}


def text_conditioning(embeddings, mask, negative) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond) model kwargs for encoded prompts, (B, L, D) states and their (B, L) mask,
    and the encoded negative prompt, a (1, L, D), (1, L) pair repeated for every image. As host
    arrays (PromptEncoder.encode's already are; another encoder's may lie on its own devices),
    which the sampler places on its mesh."""
    tile = lambda a: np.repeat(np.asarray(a), len(embeddings), axis=0)
    return ({"encoder_hidden_states": np.asarray(embeddings), "encoder_attention_mask": np.asarray(mask)},
            {"encoder_hidden_states": tile(negative[0]), "encoder_attention_mask": tile(negative[1])})
