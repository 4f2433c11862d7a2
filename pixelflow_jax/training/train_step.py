"""The training state and the jit-compiled flow-matching step (the release's train.py, on a mesh).

One step: uint8 images -> [-1, 1]; label dropout (class-conditional), or, for text-conditional
models, caption dropout to the empty prompt; stage-mixed flow-matching inputs (flow.py), then for
text the frozen T5 encoder on the stages' tokens; the model once per stage on dense arrays;
per-sample-mean loss; gradients (optionally accumulated over micro-batches); global-norm
clipping; AdamW; EMA. A step whose loss, gradient norm, new weights or new EMA are not all finite
changes nothing but the counters: the parameters, optimiser state and EMA stay as they were.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from pixelflow_jax.config import ModelConfig
from pixelflow_jax.model import PixelFlow
from pixelflow_jax.scheduler import stage_resolutions
from pixelflow_jax.sharding import batch_sharding, keep_batch_split, param_shardings, replicated
from pixelflow_jax.training import flow


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Hyper-parameters of the step (defaults: the release's train.py)."""

    lr: float = 1e-4
    # 'constant' (the release) or 'cosine': down to 0 at decay_steps. Both ramp up linearly over
    # warmup_steps first (0: none).
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    decay_steps: int = 0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    label_dropout: float = 0.1  # class-conditional: the null class
    caption_dropout: float = 0.1  # text-conditional: the empty prompt "", the release's negative prompt
    grad_accum_steps: int = 1


@dataclasses.dataclass(frozen=True)
class TextConditioning:
    """What a text-conditional step needs besides its batch: the frozen encoder's graph (its
    parameters are an argument of the step, sharded like the model's and never updated or saved)
    and the tokens of the empty prompt that caption dropout substitutes."""

    encoder_graphdef: Any
    empty_tokens: np.ndarray  # (L,) int32: </s> then padding
    empty_mask: np.ndarray  # (L,) int32

    def encode(self, encoder_params, tokens: jax.Array, mask: jax.Array) -> dict:
        """The model's keyword arguments for a batch of tokens (no gradient reaches the encoder)."""
        encoder = nnx.merge(self.encoder_graphdef, jax.lax.stop_gradient(encoder_params))
        return {"encoder_hidden_states": encoder(tokens, mask),
                "encoder_attention_mask": jnp.asarray(mask, jnp.float32)}

    def encode_stages(self, encoder_params, stages: list[flow.StageBatch]) -> list[flow.StageBatch]:
        """The stage batches with their caption tokens ({'tokens', 'mask'}, (B/S, L) each) replaced
        by the model's keyword arguments, from one encoder call on every stage's rows.

        The rows are interleaved (row j*S + s is stage s's j-th), so that on a mesh each device
        encodes the rows of every stage that it trains and no embedding moves between devices:
        grouping the embeddings by stage instead, a gather by random indices, moved (B, L, d_model)
        float32 values each step (~1 GB at flan-t5-xl, 512 tokens, batch 256), where the tokens are
        int32 (B, L). The encoder computes each row on its own: the same numbers in any row order."""
        count = len(stages)
        interleaved = lambda key: keep_batch_split(
            jnp.stack([keep_batch_split(sb.conditioning[key]) for sb in stages], axis=1).reshape(
                -1, *stages[0].conditioning[key].shape[1:]))
        encoded = self.encode(encoder_params, interleaved("tokens"), interleaved("mask"))
        of_stage = lambda s: jax.tree.map(lambda a: a.reshape(a.shape[0] // count, count, *a.shape[1:])[:, s], encoded)
        return [dataclasses.replace(sb, conditioning=of_stage(s)) for s, sb in enumerate(stages)]


LR_SCHEDULES = ("constant", "cosine")


def counts_updates(lr_schedule: str, warmup_steps: int) -> bool:
    """Whether the rate is a schedule, whose optimiser state holds an update count: only the
    release's constant rate without warmup is a plain float (its state as before schedules existed)."""
    return lr_schedule != "constant" or warmup_steps > 0


def learning_rate(cfg: StepConfig) -> optax.ScalarOrSchedule:
    """The learning rate: a float for the release's constant rate, else a schedule of the update count."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {LR_SCHEDULES}, got {cfg.lr_schedule!r}")
    if not counts_updates(cfg.lr_schedule, cfg.warmup_steps):
        return cfg.lr
    if cfg.lr_schedule == "constant":
        return optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps)
    if cfg.decay_steps <= cfg.warmup_steps:
        raise ValueError(f"a cosine learning rate needs decay_steps ({cfg.decay_steps}, the run's num_steps) > "
                         f"warmup_steps ({cfg.warmup_steps})")
    return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.decay_steps, end_value=0.0)


def clip_by_global_norm_as_torch(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_'s scaling, min(1, max_norm / (norm + 1e-6)); optax's
    clip_by_global_norm divides by the norm alone. The state is optax's (empty), so checkpoints
    of either restore as the other."""

    def update(updates, state, params=None):
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.ClipByGlobalNormState(), update)


def make_optimizer(cfg: StepConfig) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW, with torch's arithmetic (clip_grad_norm_'s 1e-6, AdamW's eps
    outside the sqrt)."""
    return optax.chain(clip_by_global_norm_as_torch(cfg.grad_clip),
                       optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                                   weight_decay=cfg.weight_decay))


def init_state(model: PixelFlow, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    """The whole training state as one pytree of arrays (what checkpoints hold)."""
    return state_from_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), tx, seed)


def state_from_params(params, tx: optax.GradientTransformation, seed: int) -> dict[str, Any]:
    """init_state from a parameter dict (jit-able, so that the state is built in its shardings)."""
    # Copies: the step donates its state, which must not free the model's own arrays.
    params = jax.tree.map(jnp.copy, params)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "ema": jax.tree.map(jnp.copy, params),  # the release starts the EMA as a copy of the model
        "opt_state": tx.init(params),
        "rng": jax.random.key_data(training_root_key(seed)),
        "bad_steps_in_a_row": jnp.zeros((), jnp.int32),
        "skipped_steps": jnp.zeros((), jnp.int32),
    }


def training_root_key(seed: int) -> jax.Array:
    """The key that step k folds k into for its noise. nnx.Rngs(seed) initialised the parameters
    with fold_in(key(seed), i), so step i folding into key(seed) itself would reuse the key of the
    i-th initialiser; a split of key(seed) is a separate stream."""
    return jax.random.split(jax.random.key(seed))[1]


def state_shardings(state, mesh):
    """Parameters, EMA and the optimiser's moments split by the FSDP rule (by shape, so the moments
    follow their parameters); scalars and the RNG key replicated."""
    shardings = param_shardings(state, mesh)
    shardings["rng"] = replicated(mesh)
    return shardings


def _loss_and_stage_losses(graphdef, params, stages: list[flow.StageBatch]):
    model = nnx.merge(graphdef, params)
    per_sample = [flow.per_sample_losses(model(sb.x_t, sb.timesteps, **sb.conditioning), sb.target)
                  for sb in stages]
    return jnp.concatenate(per_sample).mean(), jnp.stack([l.mean() for l in per_sample])


def dropped_conditioning(key, conditioning, model_cfg: ModelConfig, step_cfg: StepConfig,
                         text: TextConditioning | None) -> dict:
    """The conditioning after dropout: labels (B,) -> {'class_labels'} (the model's keyword
    argument) with the null class at rate label_dropout; (tokens, mask) (B, L) -> {'tokens',
    'mask'} with the empty prompt at rate caption_dropout (as the release's negative prompt, so
    guidance has its unconditional), for TextConditioning.encode_stages."""
    if text is None:
        # float32 rates: a Python float drew float64 uniforms under JAX_ENABLE_X64, other labels dropped
        dropped = jax.random.bernoulli(key, np.float32(step_cfg.label_dropout), conditioning.shape)
        return {"class_labels": jnp.where(dropped, model_cfg.num_classes, conditioning)}
    tokens, mask = conditioning
    dropped = jax.random.bernoulli(key, np.float32(step_cfg.caption_dropout), tokens.shape[:1])[:, None]
    return {"tokens": jnp.where(dropped, jnp.asarray(text.empty_tokens), tokens),
            "mask": jnp.where(dropped, jnp.asarray(text.empty_mask), mask)}


def apply_gradients(params, opt_state, ema, grads, tx: optax.GradientTransformation, ema_decay: float):
    """(params, opt_state, ema) after one update: clipping and AdamW (tx), then the EMA of the new
    weights, in the release's order."""
    updates, opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    new_ema = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, new_params)
    return new_params, opt_state, new_ema


def make_train_step(model_cfg: ModelConfig, graphdef, tables: flow.StageTables, tx, step_cfg: StepConfig,
                    resolution: int, num_train_timesteps: int, mesh, state_sharding,
                    text: TextConditioning | None = None, encoder_sharding=None):
    """The jitted step: (state, images uint8 (B, R, R, C), conditioning) -> (state, metrics), with
    conditioning = labels (B,) for class-conditional models; text-conditional models (`text` given)
    take (state, images, (tokens, mask) int32 (B, L), encoder_params) and need encoder_sharding."""
    num_stages = tables.num_stages
    accum = step_cfg.grad_accum_steps
    data = batch_sharding(mesh)
    # Grouping the images by stage is a gather by random indices, which XLA's partitioner serves by
    # copying each whole stage batch to every device; without this constraint every device then
    # ran the model on the whole batch (the same numbers as one device, no faster).
    split_over_devices = lambda stage: jax.tree.map(keep_batch_split, stage)

    def micro_batch_grads(params, images, conditioning, key, encoder_params):
        draws_key, drop_key = jax.random.split(key)
        batch = images.shape[0]
        draws = flow.draw(draws_key, batch, resolution, model_cfg.in_channels, num_stages, num_train_timesteps)
        stages = flow.stage_batches(images, dropped_conditioning(drop_key, conditioning, model_cfg, step_cfg, text),
                                    draws, tables)
        if text is not None:
            stages = text.encode_stages(encoder_params, stages)
        stages = [split_over_devices(stage) for stage in stages]
        grad_fn = jax.value_and_grad(lambda p: _loss_and_stage_losses(graphdef, p, stages), has_aux=True)
        return grad_fn(params)

    def step(state, images, conditioning, encoder_params=None):
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        params = state["params"]
        if accum == 1:
            (loss, stage_losses), grads = micro_batch_grads(params, images, conditioning, key, encoder_params)
        else:
            shape = lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:])

            def accumulate(carry, micro):
                (loss, stage_losses), grads = micro_batch_grads(params, *micro, encoder_params)
                return jax.tree.map(jnp.add, carry, (loss, stage_losses, grads)), None

            zero = (jnp.zeros(()), jnp.zeros((num_stages,)), jax.tree.map(jnp.zeros_like, params))
            micro = (shape(images), jax.tree.map(shape, conditioning), jax.random.split(key, accum))
            (loss, stage_losses, grads), _ = jax.lax.scan(accumulate, zero, micro)
            loss, stage_losses, grads = jax.tree.map(lambda x: x / accum, (loss, stage_losses, grads))

        grad_norm = optax.tree.norm(grads)
        new_params, opt_state, new_ema = apply_gradients(params, state["opt_state"], state["ema"], grads, tx,
                                                         step_cfg.ema_decay)
        # A huge or NaN learning rate can turn finite gradients into non-finite weights: such a step is
        # skipped too, so no checkpoint ever holds a non-finite parameter or EMA. One global norm per
        # tree (as for the gradients) tells: it is finite iff every value is (and none is beyond ~1e18).
        finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(new_params))
                  & jnp.isfinite(optax.tree.norm(new_ema)))
        keep_if_bad = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        bad_steps_in_a_row = jnp.where(finite, 0, state["bad_steps_in_a_row"] + 1)
        new_state = {
            "step": state["step"] + 1,
            "params": keep_if_bad(new_params, params),
            "ema": keep_if_bad(new_ema, state["ema"]),
            "opt_state": keep_if_bad(opt_state, state["opt_state"]),
            "rng": state["rng"],
            "bad_steps_in_a_row": bad_steps_in_a_row,
            "skipped_steps": state["skipped_steps"] + (~finite).astype(jnp.int32),
        }
        # The counter is also a metric: the state is donated to the next step before the loop reads it.
        metrics = {"loss": loss, "grad_norm": grad_norm, "bad_steps_in_a_row": bad_steps_in_a_row,
                   **{f"loss_stage{s}": stage_losses[s] for s in range(num_stages)}}
        return new_state, metrics

    def step_on_mesh(state, images, conditioning, *encoder_params):
        # Pallas attention kernels split batch and heads over the mesh in context (attention.py).
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return step(state, images, conditioning, *encoder_params)

    in_shardings = (state_sharding, data, data) + ((encoder_sharding,) if text else ())
    return jax.jit(step_on_mesh, in_shardings=in_shardings, out_shardings=(state_sharding, replicated(mesh)),
                   donate_argnums=(0,))


def train_flops_per_image(model_cfg: ModelConfig, resolution: int, num_stages: int) -> float:
    """Model FLOPs of one training image (3x forward), averaged over the equally mixed stages."""
    c, depth = model_cfg.hidden_size, model_cfg.depth
    total = 0.0
    for size in stage_resolutions(resolution, num_stages):
        tokens = (size // model_cfg.patch_size) ** 2
        per_layer = 2 * tokens * (4 * c * c + 8 * c * c) + 4 * tokens * tokens * c  # matmuls + attention
        total += depth * per_layer + 2 * tokens * c * (model_cfg.patch_size**2 * (model_cfg.in_channels
                                                                                  + model_cfg.out_channels))
    return 3.0 * total / num_stages
