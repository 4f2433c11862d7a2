"""`main.py --mode=train`: the training loop around train_step.py.

    WORKDIR/run_config.json        the model this workdir trains (a mismatch is refused: run_config.py)
    WORKDIR/checkpoints/<step>/    orbax: the train state (model, EMA, optimiser, step, RNG); the data
                                   position is the step (one global batch per step) (checkpointing.py)
    WORKDIR/metrics.jsonl          one JSON object per logged step ({"step", "loss", ...}) (metrics_log.py)
    WORKDIR/previews/step_*.png    EMA samples every preview_every steps
    WORKDIR/class_index.json       class names -> ids (image-folder data)
    WORKDIR/train.lock             the run that owns the workdir (workdir_lock.py)
    WORKDIR/train_settings.json    what a resume may not change silently (resume_settings.py)
    WORKDIR/settings_changes.jsonl the changes a resume was allowed to make, by step
    WORKDIR/training_runs.jsonl    a line per job started: its start step, command, config, mesh, software
                                   and devices (job_records.py)
    WORKDIR/tensorboard/           the metrics as TensorBoard events
    WORKDIR/unreadable_checkpoints/ steps that did not restore, set aside at a resume
    WORKDIR/text_encoder/          the captioned demo's own small T5 (demo_text_encoder.py)

A restart resumes from the latest checkpoint that restores (model, EMA, optimiser, step, RNG, data
position), with any number of processes, so the resumed run computes exactly the losses an
uninterrupted one would. A SIGTERM (preemption) on any process makes every process save the same
step and stop (preemption.py; main.py exits with command_line.EXIT_TERMINATED). After train.max_bad_steps
non-finite steps in a row the run stops without saving: the last good checkpoint stays the latest.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time

import jax
import numpy as np
from jax.experimental import multihost_utils
from absl import logging
from flax import nnx

from pixelflow_jax import random_numbers, storage, validation
from pixelflow_jax.checkpoints.run_checkpoint import CHECKPOINTS, complete_steps, is_run
from pixelflow_jax.command_line import EXIT_HUNG_UP, EXIT_INTERRUPTED, raise_dropped_stops, termination_signal
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.job_records import append_job_record, config_record
from pixelflow_jax.kernels.attention import resolve_backend, tracing_modes
from pixelflow_jax.model import PixelFlow
from pixelflow_jax.multihost import check_same_checkpoints, check_same_data, check_shared_workdir, from_process_0
from pixelflow_jax.progress import Progress, say
from pixelflow_jax.sampling.cascade import CascadeSampler
from pixelflow_jax.scheduler import PixelFlowScheduler
from pixelflow_jax.sharding import batch_sharding, global_arrays, make_mesh
from pixelflow_jax.training import flow
from pixelflow_jax.training.checkpointing import (check_saves, checkpoint_manager, orbax_errors_in_one_line,
                                                  remove_unfinished_saves, resume_point, save, wait_for_saves)
from pixelflow_jax.training.metrics_log import WRITE_RERUN, MetricsLog, peak_flops
from pixelflow_jax.training.preemption import PreemptionWatch
from pixelflow_jax.training.resume_settings import check_optimiser_state, check_resume, note_init_from_at_resume
from pixelflow_jax.training.run_config import check_run_config, differences
from pixelflow_jax.training.train_step import (StepConfig, counts_updates, init_state, learning_rate, make_optimizer,
                                               make_train_step, state_from_params, state_shardings,
                                               train_flops_per_image)
from pixelflow_jax.training.workdir_lock import WorkdirLock
from pixelflow_jax.workdir_files import TRAINING_RUNS

PREVIEWS = "previews"


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (non-finite losses); the message says what is intact."""


class TrainingPreempted(RuntimeError):
    """SIGTERM, Ctrl-C or SIGHUP: every process saved the same step and stopped; rerunning the
    command resumes. `exit_status` is what main.py exits with (command_line.EXIT_INTERRUPTED,
    EXIT_TERMINATED or EXIT_HUNG_UP)."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status



def validate(config, model_cfg: ModelConfig, mesh) -> StepConfig:
    validation.check_train(config)
    t = config.train
    stages, devices, accum = config.scheduler.num_stages, mesh.size, t.grad_accum_steps
    unit = stages * devices * accum
    if t.batch_size % unit:
        nearest = sorted({max(unit, t.batch_size // unit * unit), -(-t.batch_size // unit) * unit})
        per_device = t.batch_size // (stages * accum) if t.batch_size % (stages * accum) == 0 else 0
        keep = (f"; to keep this batch size (a resumed run needs it for exact resume), run on a number of devices "
                f"that divides {per_device}" if per_device else "")
        raise ValueError(f"--config.train.batch_size ({t.batch_size}) must be divisible by num_stages x devices x "
                         f"grad_accum_steps = {stages} x {devices} x {accum}: try "
                         f"{' or '.join(map(str, nearest))}{keep}")
    if model_cfg.cross_attention_dim:
        if "caption_dropout" not in t:
            raise ValueError("a text-conditional model (model.cross_attention_dim > 0) trains with "
                             "--config=configs/t2i.py (captions, a T5 encoder, caption dropout)")
        if model_cfg.num_classes:
            raise ValueError("a text-conditional model (model.cross_attention_dim > 0) trains with model.num_classes=0")
        validation.check_text_training(config)
    elif model_cfg.num_classes < 1:
        raise ValueError("--mode=train trains class-conditional (model.num_classes >= 1) or text-conditional "
                         "(model.cross_attention_dim > 0, configs/t2i.py) models")
    elif "label_dropout" not in t:
        raise ValueError("a class-conditional model (model.cross_attention_dim=0) trains with --config=configs/c2i.py "
                         "(class labels, label dropout)")
    elif config.data.source == "demo" and config.data.demo_num_classes != model_cfg.num_classes:
        raise ValueError(f"model.num_classes ({model_cfg.num_classes}) must equal data.demo_num_classes "
                         f"({config.data.demo_num_classes}) on the demo data, whose classes the model learns (and "
                         "previews sample): set both, e.g. --config.model.num_classes="
                         f"{model_cfg.num_classes} --config.data.demo_num_classes={model_cfg.num_classes}")
    # (cosine refuses this in learning_rate; a constant rate may be meant to end its warmup in a resume
    # that raises num_steps.) Step s applies the rate of update s - 1, so warmup_steps = num_steps never
    # reaches train.lr either.
    if t.lr_schedule == "constant" and t.warmup_steps >= t.num_steps:
        logging.warning("train.warmup_steps (%d) is not below train.num_steps (%d): this run ends before its learning "
                        "rate reaches train.lr (%g)", t.warmup_steps, t.num_steps, t.lr)
    return StepConfig(lr=t.lr, lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps, decay_steps=t.num_steps,
                      weight_decay=t.weight_decay, grad_clip=t.grad_clip, ema_decay=t.ema_decay,
                      label_dropout=t.get("label_dropout", 0.0), caption_dropout=t.get("caption_dropout", 0.0),
                      grad_accum_steps=accum)


def check_init_from(config, model_cfg: ModelConfig):
    """The CheckpointSource train.init_from names, checked to be this config's kind and
    architecture from its config alone (the weights of an XL run take minutes to restore): for a
    new run only (a resumed run starts from its own checkpoint)."""
    from pixelflow_jax.api import (check_same_weights_everywhere, check_weights_of, checkpoint_config,
                                   resolve_checkpoint)

    t = config.train
    source = resolve_checkpoint(t.init_from)
    check_same_weights_everywhere(source, t.init_from, "--config.train.init_from")
    check_weights_of(source, t.init_from_weights)
    ckpt = checkpoint_config(source)
    kind = lambda model: "text-to-image" if model.cross_attention_dim else "class-conditional"
    if kind(ckpt.model) != kind(model_cfg):
        raise ValueError(f"--config.train.init_from {t.init_from} is a {kind(ckpt.model)} checkpoint and this config "
                         f"trains a {kind(model_cfg)} model: start from a {kind(model_cfg)} checkpoint, or train "
                         f"with --config=configs/{'t2i' if ckpt.model.cross_attention_dim else 'c2i'}.py")
    if ckpt.model.architecture() != model_cfg.architecture():
        classes = ""
        held = ckpt.model.num_classes
        if held != model_cfg.num_classes and not ckpt.model.cross_attention_dim:
            way = (f"a model of more classes cannot start from it, train it from scratch; keep "
                   f"--config.model.num_classes={held} only for data of at most {held} classes"
                   if model_cfg.num_classes > held else  # (no rows are added to the table)
                   f"for data of fewer classes keep --config.model.num_classes={held}; the classes the data lacks "
                   "never train")
            classes = f" (its class table holds {held} classes and loads only whole: {way})"
        raise ValueError(f"--config.train.init_from {t.init_from} is another model: "
                         f"{'; '.join(differences(ckpt.model.architecture(), model_cfg.architecture()))}; set "
                         f"--config.model.* to the checkpoint's values{classes}")
    if ckpt.resolution != config.data.resolution:  # (another stage count is the warning below)
        logging.info("train.init_from %s was trained at %d px; this run trains at %d px", source.label, ckpt.resolution,
                     config.data.resolution)
    if ckpt.num_stages != config.scheduler.num_stages:
        # Each stage owns a share of the timesteps: the same value is another stage and noise level.
        logging.warning("train.init_from %s was trained with scheduler.num_stages %d and this run trains with %d: the "
                        "scheduler splits the timesteps among the stages, so its timestep embedding learned other "
                        "stages and noise levels for the same values and the fine-tune starts far from what it read; "
                        "set --config.scheduler.num_stages=%d to keep them", source.label, ckpt.num_stages,
                        config.scheduler.num_stages, ckpt.num_stages)
    if ckpt.num_train_timesteps != config.scheduler.num_train_timesteps:
        # The model takes timesteps in the scheduler's units: the same value is another noise level.
        logging.warning("train.init_from %s was trained with scheduler.num_train_timesteps %d and this run trains with "
                        "%d: its timestep embedding learned other noise levels for the same values, so the fine-tune "
                        "starts far from what it read; set --config.scheduler.num_train_timesteps=%d to keep them",
                        source.label, ckpt.num_train_timesteps, config.scheduler.num_train_timesteps,
                        ckpt.num_train_timesteps)
    if model_cfg.cross_attention_dim:
        warn_of_another_caption_length(source, int(t.max_text_tokens))
    return source


def warn_of_another_caption_length(source, tokens: int) -> None:
    """A fine-tune at another train.max_text_tokens than its checkpoint recorded runs (no weight is
    shaped by it: cross-attention reads any number of T5 states, which T5 places relative to each
    other), but reads captions longer, or cut shorter, than those the model learned from: warned."""
    from pixelflow_jax.api import trained_text_encoding

    trained = trained_text_encoding(source).get("max_text_tokens")
    if not trained or trained == tokens:  # (a release checkpoint records none)
        return
    read = (f"captions up to {tokens} tokens, longer than the {trained} it learned from" if tokens > trained else
            f"captions cut to {tokens} tokens, shorter than the {trained} it learned from")
    logging.warning("train.init_from %s trained with train.max_text_tokens %d and this run trains with %d: no weight "
                    "of the model is shaped by the caption length (cross-attention reads any number of T5 states), so "
                    "it fine-tunes on %s; set --config.train.max_text_tokens=%d to keep its length", source.label,
                    trained, tokens, read, trained)


def load_init_from(config, model_cfg: ModelConfig, source=None):
    """(the model train.init_from names, the CheckpointSource read): check_init_from's source (made
    here if not given), its weights read; the source read is the run's newer step where init_from
    names a run whose training rotated the step chosen away (api.read_through_rotation)."""
    from pixelflow_jax.api import read_checkpoint, read_through_rotation
    from pixelflow_jax.checkpoints.checkpoint import build_model

    t = config.train
    runtime = dict(dtype=model_cfg.dtype, attention=model_cfg.attention)
    ckpt, params, source = read_through_rotation(
        source or check_init_from(config, model_cfg),
        lambda source: (*read_checkpoint(source, t.init_from_weights, runtime), source))
    logging.info("a new run initialised from the %s weights of %s", t.init_from_weights, source.label)
    return build_model(ckpt, params), source


def initial_state(config, model_cfg: ModelConfig, step_cfg: StepConfig, mesh, init_model=None,
                  shapes_only: bool = False):
    """(graphdef, train state placed in its shardings, the shardings): from `init_model` (train.init_from)
    or new, with step_cfg's optimiser state. A new model is initialised by one compiled program straight
    into its shardings: no full copy on one device, and no hundreds of small eager ops (slow with several
    processes). `shapes_only` (a resume): the state's shapes and dtypes, all a restore reads; a state built
    only to be replaced would double the device memory at the restore."""
    tx = make_optimizer(step_cfg)
    # What the programs are traced from (the seed is a constant in them); a fine-tune's weights are an argument.
    settings = (model_cfg, optimizer_init_key(step_cfg), config.seed, mesh)
    if init_model is not None:
        # The parameters from a host copy: every process holds them whole on one of its devices, and
        # jax places such arrays on this process's devices only, not on a mesh spanning processes.
        # EMA and optimiser state are then built in their shardings (no host copy of those).
        host_params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(init_model, nnx.Param)))
        create_from = functools.partial(state_from_params, tx=tx, seed=config.seed)
        shardings = state_shardings(jax.eval_shape(create_from, host_params), mesh)
        params = global_arrays(host_params, shardings["params"])
        program = reused(_last_state_program, (state_from_params, *settings, tree_key(shardings)),
                         lambda: jax.jit(create_from, out_shardings=shardings))
        return nnx.graphdef(init_model), program(params), shardings

    def create():
        return init_state(PixelFlow(model_cfg, rngs=nnx.Rngs(config.seed)), tx, config.seed)

    shapes = jax.eval_shape(create)
    shardings = state_shardings(shapes, mesh)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: PixelFlow(model_cfg, rngs=nnx.Rngs(config.seed))))
    if shapes_only:
        return graphdef, shapes, shardings
    program = reused(_last_state_program, (init_state, *settings, tree_key(shardings)),
                     lambda: jax.jit(create, out_shardings=shardings))
    return graphdef, program(), shardings


# The program that built the last run's state, and what it was traced from: a notebook's second new
# run of the same settings compiled it again. One program only, and it holds no weights.
_last_state_program: list = []


def reused(last: list, key, build):
    """build(), or the value `last` holds if it was built for an equal key; `last` then holds [key, the value]."""
    if not last or last[0] != key:
        last[:] = [key, build()]
    return last[1]


def preview_path(workdir: str, step: int) -> str:
    return storage.join(workdir, PREVIEWS, f"step_{step:07d}.png")


def preview_owed(workdir: str, step: int, preview_every: int) -> bool:
    """Whether saved step `step` is a preview step without its preview: a stop during a preview
    step saves it and skips the preview (a preemption's grace period may be short), and the run
    that resumes there draws it. As process 0 sees the workdir, so every process draws it or none."""
    owed = bool(preview_every) and step > 0 and step % preview_every == 0 and not storage.exists(
        preview_path(workdir, step))
    return bool(from_process_0(np.int32(owed)))


def own_preview_prompts(config) -> list[str]:
    """The prompts of a text run's previews on its own data, read once when the run starts (a
    prompts file edited or removed while it trains changes no preview, and stops no run at one):
    train.preview_num_images of them, image i of prompt i mod their count, as classes cycle."""
    from pixelflow_jax.sampling.sample_conditioning import read_prompts

    prompts = read_prompts(config.sample)
    return [prompts[i % len(prompts)] for i in range(config.train.preview_num_images)]


def write_preview(config, model_cfg, graphdef, ema, workdir: str, step: int, log: MetricsLog,
                  text_encoder=None, trained_classes: int | None = None, prompts: list[str] | None = None) -> dict:
    """A grid of EMA samples (class i mod trained_classes, the data's class count, or a text run's
    `prompts`: own_preview_prompts, or the demo's own); on the demo sets also how many samples show
    the asked hue and shape."""
    from pixelflow_jax.checkpoints.checkpoint import CheckpointConfig
    from pixelflow_jax.data.demo_data import SHAPES, agreement, demo_preview_prompts
    from pixelflow_jax.sampling.sample_run import image_grid, save_png_atomically

    ckpt = CheckpointConfig(model=model_cfg, num_train_timesteps=config.scheduler.num_train_timesteps,
                            num_stages=config.scheduler.num_stages, resolution=config.data.resolution)
    sampler = CascadeSampler(nnx.merge(graphdef, ema), ckpt)
    t, s, demo = config.train, config.sample, config.data.source == "demo"
    options = dict(steps_per_stage=t.preview_steps_per_stage, cfg_scale=s.cfg_scale, shift=s.shift, seed=config.seed)
    if text_encoder is None:  # class c is drawn in colour c and shape c mod 5 on the demo set
        colours = np.arange(t.preview_num_images) % (trained_classes or model_cfg.num_classes)
        shapes = colours % len(SHAPES)
        images = sampler.generate(colours, **options)
    else:
        if demo:
            prompts, colours, shapes = demo_preview_prompts(t.preview_num_images, config.data.demo_num_classes,
                                                            config.seed)
        images = sampler.generate_from_prompts(text_encoder, prompts, negative_prompt=s.negative_prompt, **options)
    if jax.process_index() == 0:
        grid = image_grid(images)
        path = preview_path(workdir, step)
        with storage.writing(path, WRITE_RERUN):
            save_png_atomically(path, grid)
        log.image("preview", grid, step)
    if not demo:
        return {}
    return {f"preview_{k}": v for k, v in agreement(images, colours, shapes, config.data.demo_num_classes).items()}


def check_outside_the_image_folder(config, workdir: str) -> None:
    """An image folder is read whole (hidden folders aside): a workdir in it would become training
    data (its checkpoints/ and previews/ read as classes, or as images without captions), and the
    resume would then find the dataset changed and refuse it for good."""
    from pixelflow_jax.data.sources import read_with_folder

    root = config.data.root if config.data.source == "folder" else ""
    if root and read_with_folder(workdir, root):
        raise ValueError(f"--workdir {workdir} is inside the training images (--config.data.root={config.data.root}): "
                         "the run's own files would be read as images; choose a workdir outside that folder (or "
                         "in a hidden folder of it, such as .runs/, which is not read)")


def check_checkpoints_are_its_own(workdir: str) -> None:
    """Refuses a workdir whose checkpoints/ is a link to another training run's. The lock guards
    one workdir, so both runs would train at once into one folder: each removed the other's save in
    progress as a killed one, rotated away its steps, and resumed from its latest as its own. (A
    link to a folder that is no run's, on a bigger disk say, is this run's own.)"""
    if storage.is_url(workdir):  # a bucket has no links
        return
    target = os.path.realpath(os.path.join(workdir, CHECKPOINTS))
    owner = os.path.dirname(target)
    if os.path.basename(target) == CHECKPOINTS and owner != os.path.realpath(workdir) and is_run(owner):
        raise ValueError(f"{os.path.join(workdir, CHECKPOINTS)} is a link to {target}, the checkpoints of the "
                         f"training run {owner}: two runs saving into one folder delete each other's steps. Train "
                         f"that run with --workdir={owner}, or replace the link with a copy of the folder (cp -r) "
                         "to train on from its steps here")


def check_own_data_inputs(config, model_cfg: ModelConfig, workdir: str) -> list[str] | None:
    """What a run on the user's own data must be told, named together (a text run needs three
    settings the demo does not): the data folder, a text run's T5 encoder (unless its workdir or
    train.init_from records one) and the prompts its previews draw. Returns those prompts
    (own_preview_prompts, read here once for the whole run), or None where no previews draw any."""
    from pixelflow_jax.checkpoints.run_checkpoint import has_trained

    d, t, text = config.data, config.train, bool(model_cfg.cross_attention_dim)
    missing, prompts = [], None
    if d.source in ("folder", "array_record") and not d.get("root"):
        kind = ("ArrayRecord shards, as pixelflow_jax.data.pack_captions writes them" if d.source == "array_record"
                else "captioned images, NAME.jpg + NAME.txt" if text else "class subfolders, root/<class>/<image>")
        missing.append(f"--config.data.root, the folder of {kind}")
    if text and d.source != "demo":
        if not t.text_encoder and not t.init_from and not has_trained(workdir):
            missing.append("--config.train.text_encoder, a Hugging Face T5 folder (local or gs://) or "
                           "hf://google/flan-t5-xl")
        if t.preview_every:  # previews of a text run draw sample.prompts: known now, not at the first preview
            if not len(config.sample.prompts) and not config.sample.prompts_file:
                missing.append("--config.sample.prompts or --config.sample.prompts_file, the prompts of the previews "
                               "(or --config.train.preview_every=0 for none)")
            else:
                try:
                    prompts = own_preview_prompts(config)
                except ValueError as e:
                    raise ValueError(f"previews: {e}; or set --config.train.preview_every=0") from None
    if missing:
        raise ValueError(f"this run needs {len(missing)} more setting{'s' if len(missing) > 1 else ''}: "
                         f"{'; '.join(missing)}")
    return prompts


def train(config, workdir: str) -> dict:
    """Trains to config.train.num_steps (resuming if the workdir has checkpoints); returns the last metrics."""
    config, workdir = validation.job_config(config, "train"), validation.job_workdir(workdir)
    model_cfg = ModelConfig.from_mapping(config.model)
    mesh = make_mesh(config.mesh.fsdp)
    step_cfg = validate(config, model_cfg, mesh)
    preview_prompts = check_own_data_inputs(config, model_cfg, workdir)
    check_outside_the_image_folder(config, workdir)
    check_checkpoints_are_its_own(workdir)
    init_from = config.train.init_from
    if init_from and storage.resolved(init_from) == storage.resolved(workdir) and not complete_steps(workdir):
        raise ValueError(f"--config.train.init_from {init_from} is this run's own workdir, which has no checkpoint "
                         "yet: init_from names the checkpoint a new run starts from (another run or one of its steps, "
                         "a converted or release folder); leave it empty to train from scratch")
    with storage.removed_if_left_empty(workdir, remover=jax.process_index() == 0):
        check_shared_workdir(workdir)  # a bucket without access fails here, not at the first save
        lock = WorkdirLock(workdir, config.train.lock_stale_after_s)
        try:  # acquired inside: a SIGTERM the moment after the lock is written still releases it
            lock.acquire()  # a second run on this workdir stops here, naming the first
            with orbax_errors_in_one_line(), random_numbers.pinned():  # a seed's draws whatever jax's settings
                return train_in_owned_workdir(config, workdir, model_cfg, mesh, step_cfg, lock, preview_prompts)
        finally:
            lock.release()  # only a lock of its own


def remove_leftovers_of_killed_runs(workdir: str) -> None:
    """Partial files and checkpoints that killed writers left in the workdir, removed by process 0."""
    if jax.process_index() == 0:  # the workdir is ours now: what killed writers of a run left goes
        storage.clear_leftovers_of_killed_writers(workdir, storage.join(workdir, PREVIEWS))
        if unfinished := remove_unfinished_saves(workdir):
            logging.info("removed the partial checkpoints of saves or deletions killed midway: steps %s", unfinished)
    multihost_utils.sync_global_devices("leftovers of killed runs removed")  # before anyone lists checkpoints


def latest_saved_step(workdir: str) -> int:
    """The last complete checkpoint's step (0 for none), the same on every process."""
    steps = complete_steps(workdir)
    check_same_checkpoints(steps, storage.join(workdir, CHECKPOINTS))
    return max(steps, default=0)


def init_from_source(config, model_cfg: ModelConfig, workdir: str, done: int):
    """The checked CheckpointSource train.init_from names for a new run; None without one, or for a
    run resumed at step `done`."""
    if not config.train.init_from:
        return None
    if done:  # the same command reruns after a preemption: its init_from is no longer read
        note_init_from_at_resume(workdir, done, config.train.init_from, config.train.init_from_weights)
        return None
    return check_init_from(config, model_cfg)


def open_checked_data(config, model_cfg: ModelConfig, workdir: str, done: int):
    """(the data source, its file listing or None, the class count it trains or None): checked to be
    the same data on every process and, on a resume at step `done`, data the resume may read; then
    its class index recorded in the workdir. A resume's optimiser state is checked here too: after
    the data opens, before anything is recorded."""
    from pixelflow_jax.data.sources import CLASS_INDEX_FILE, open_source, record_class_index

    # A missing dataset stops the run before it records anything in the workdir.
    source = open_source(config, workdir, captioned=bool(model_cfg.cross_attention_dim), ids_learned=bool(done))
    check_optimiser_state(workdir, config, done)
    listing = getattr(source, "listing", None)  # of file-based data (folders, shards)
    # Previews cycle over the classes the data holds, and the run records their count for its sampling
    # jobs: a fine-tune of 1000 classes on 10 folders trains ids 0-9 (folders, TFDS and the demo set know
    # their class count; a text run records none, see resume_settings).
    trained_classes = getattr(source, "num_classes", None)
    d = config.data
    check_same_data(len(source), listing, f"{d.tfds_name}:{d.split}" if d.source == "tfds" else d.root or d.source)
    check_resume(workdir, config, done, len(source), record=False, listing=listing,  # refused now, not after a restore
                 num_classes=trained_classes)
    # Only now: a resume refused for its data (a run of the demo set pointed at image folders) left
    # its workdir a class_index.json naming folders it never trained on.
    with storage.writing(storage.join(workdir, CLASS_INDEX_FILE), WRITE_RERUN):
        record_class_index(config.data, source, workdir, ids_learned=bool(done))
    return source, listing, trained_classes


def text_encoder_of_run(config, model_cfg: ModelConfig, workdir: str, mesh, init_source, done: int):
    """(a text run's encoder, the frozen parameters the train step takes): (None, ()) for a
    class-conditional run."""
    text_encoder, frozen = None, ()
    if model_cfg.cross_attention_dim:
        from pixelflow_jax.text import train_text

        train_text.fill_encoder_of_runs(config, workdir, init_source)  # its checks, before the init weights load
        text_encoder = train_text.load(config, workdir, model_cfg, mesh, no_step_saved=not done)
        frozen = (text_encoder.params,)
    return text_encoder, frozen


# The step train() built last in this process and what it was built from. A notebook's second
# train() of the same settings (a resume after a Ctrl-C, say) reuses its compiled program: a new jit
# compiled it again (minutes at XL). One step only, and it holds no weights: graphs, settings and
# shardings (the frozen text encoder's parameters are an argument of the step), and the attention
# kernels' modes, which a trace reads (interpret_kernels).
_last_train_step: list = []


def train_step_of_run(model_cfg: ModelConfig, graphdef, tables: flow.StageTables, step_cfg: StepConfig, config,
                      mesh, shardings, text_encoder):
    """make_train_step's jitted step for this run, the last run's if built from equal inputs."""
    text = text_encoder and text_encoder.conditioning
    encoder_sharding = text_encoder and text_encoder.sharding
    table_values = [getattr(tables, field.name) for field in dataclasses.fields(tables)]
    key = (make_train_step, model_cfg, graphdef, arrays_key(table_values), optimizer_key(step_cfg),
           config.data.resolution, config.scheduler.num_train_timesteps, mesh, tree_key(shardings),
           text and (text.encoder_graphdef, arrays_key((text.empty_tokens, text.empty_mask))),
           tree_key(encoder_sharding), tracing_modes())
    return reused(_last_train_step, key, lambda: make_train_step(
        model_cfg, graphdef, tables, make_optimizer(step_cfg), step_cfg, config.data.resolution,
        config.scheduler.num_train_timesteps, mesh, shardings, text=text, encoder_sharding=encoder_sharding))


def optimizer_key(step_cfg: StepConfig) -> StepConfig:
    """step_cfg as a compiled program's key: decay_steps (num_steps) shapes only a cosine rate, so a
    constant-rate run trained on further keeps its programs."""
    return step_cfg if step_cfg.lr_schedule == "cosine" else dataclasses.replace(step_cfg, decay_steps=0)


def optimizer_init_key(step_cfg: StepConfig) -> bool:
    """What the optimiser's init reads of step_cfg, as the state initialisation's key: AdamW's moments
    and count and the clip's empty state read no hyper-parameter; a scheduled rate adds its update
    count. So a new run at another rate, decay or clip builds its state with the last run's program."""
    return counts_updates(step_cfg.lr_schedule, step_cfg.warmup_steps)


def tree_key(tree) -> tuple:
    """A pytree of hashable leaves (shardings) as a value that compares by content."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(leaves)


def arrays_key(values) -> tuple:
    """Arrays (small tables) as their dtypes, shapes and bytes; other values as they are."""
    return tuple((str(v.dtype), v.shape, np.asarray(v).tobytes()) if hasattr(v, "dtype") else v for v in values)


def stop_if_too_many_bad_steps(manager, max_bad_steps: int, step: int, bad_steps_in_a_row) -> None:
    """TrainingStopped once `step` ends train.max_bad_steps non-finite steps in a row."""
    if int(bad_steps_in_a_row) >= max_bad_steps:  # waits for that step
        wait_for_saves(manager)
        latest = manager.latest_step()
        kept = f"the last good checkpoint is step {latest}" if latest else "no checkpoint of this run was saved"
        raise TrainingStopped(f"{max_bad_steps} non-finite steps in a row (train.max_bad_steps); stopped "
                              f"at step {step} without saving: {kept}")


def logged_record(step: int, metrics, state, lr, batch_size: int, last_time: float, last_step: int, flops, peak):
    """(the metrics record of logged step `step`, the time it was taken): its throughput counts the
    images trained since `last_step`, logged at `last_time`."""
    metrics = jax.device_get(metrics)
    now = time.perf_counter()
    images_per_s = (step - last_step) * batch_size / (now - last_time)
    skipped = int(state["skipped_steps"])
    # The rate of this step's update (a schedule counts applied updates, not skipped steps).
    lr_now = float(lr(step - 1 - skipped)) if callable(lr) else lr
    record = {"step": step, **{k: float(v) for k, v in metrics.items() if k != "bad_steps_in_a_row"},
              "lr": lr_now, "images_per_s": images_per_s, "step_time_s": batch_size / images_per_s,
              "skipped_steps": skipped}
    if peak:
        record["mfu"] = images_per_s * flops / (peak * jax.device_count())
    return record, now


def already_trained(workdir: str, done: int, t) -> str:
    """What a run trained to train.num_steps (or past them) says, and how to train further."""
    further = "raise --config.train.num_steps to train further"
    if t.lr_schedule != "constant":  # its rate ends at num_steps: more is a change of schedule (resume_settings)
        further += (f": its {t.lr_schedule} learning rate ends at num_steps, so a resume with more needs "
                    "--config.train.allow_resume_changes=True (the rate then rises again, to what the longer schedule "
                    f"gives at step {done}), or fine-tune it in a new --workdir with "
                    f"--config.train.init_from={workdir}")
    return f"{workdir} is already trained to step {done} (train.num_steps = {t.num_steps}): nothing to do; {further}"


def preempted_at(preemption: PreemptionWatch, step: int, num_steps: int, preview_due: bool) -> TrainingPreempted:
    """The exception that ends a run preempted after saving `step`, saying how to go on."""
    if step < num_steps:
        rest = "rerun the same command to resume"
    elif preview_due:  # skipped for the stop
        rest = "the run's last step; rerun the same command to draw its preview"
    else:
        rest = "the run's last step: the run is complete"
    status = (EXIT_HUNG_UP if preemption.hung_up else EXIT_INTERRUPTED if preemption.interrupted
              else termination_signal()[1])  # EXIT_TERMINATED, or a SIGUSR1's or SIGUSR2's own
    return TrainingPreempted(f"{preemption.cause}: saved step {step} on every process; {rest}", status)


def training_record(config, start: int, mesh) -> dict:
    """What this job's line of training_runs.jsonl says besides job_records' own: the step it
    started from (0: a new run), its config, its mesh and the attention kernel ('auto' resolved)."""
    return dict(start_step=start, num_steps=config.train.num_steps, mesh=dict(mesh.shape),
                attention_backend=resolve_backend(config.model.attention, config.model.dtype), **config_record(config))


def train_in_owned_workdir(config, workdir: str, model_cfg: ModelConfig, mesh, step_cfg: StepConfig,
                           lock: WorkdirLock, prompts: list[str] | None) -> dict:
    """train() once `lock` is held: the run's data, text encoder and state (resumed or new), then its
    steps; `prompts`: a text run's preview prompts on its own data (check_own_data_inputs)."""
    from pixelflow_jax.api import weights_chosen
    from pixelflow_jax.data.loader import make_loader, to_global_batch

    check_run_config(workdir, model_cfg, config, record=False)  # before the text encoder is built there
    remove_leftovers_of_killed_runs(workdir)
    t = config.train
    done = latest_saved_step(workdir)
    if done >= t.num_steps and not preview_owed(workdir, done, t.preview_every):
        say(already_trained(workdir, done, t))
        return {}
    init_source = init_from_source(config, model_cfg, workdir, done)
    source, listing, trained_classes = open_checked_data(config, model_cfg, workdir, done)
    text_encoder, frozen = text_encoder_of_run(config, model_cfg, workdir, mesh, init_source, done)
    # The run records the step it read: a run named as init_from may have rotated the one chosen away.
    init_model, init_source = load_init_from(config, model_cfg, init_source) if init_source else (None, None)
    check_run_config(workdir, model_cfg, config, text_encoder and text_encoder.record())
    scheduler = PixelFlowScheduler(config.scheduler.num_train_timesteps, config.scheduler.num_stages)
    tables = flow.StageTables.from_scheduler(scheduler)

    lr = learning_rate(step_cfg)
    graphdef, state, shardings = initial_state(config, model_cfg, step_cfg, mesh, init_model, shapes_only=bool(done))
    del init_model  # its whole copy on this process's first device, otherwise held for the whole run
    train_step = train_step_of_run(model_cfg, graphdef, tables, step_cfg, config, mesh, shardings, text_encoder)

    manager = checkpoint_manager(workdir, t.keep_checkpoints)
    start, state = resume_point(manager, state, shardings)
    check_resume(workdir, config, start, len(source), listing=listing,  # compared above: records a new run or a change
                 num_classes=trained_classes, init_checkpoint=init_source.label if init_source else "",
                 init_weights=weights_chosen(init_source, t.init_from_weights),
                 updates_done=start - int(state["skipped_steps"]))  # a schedule counts applied updates
    append_job_record(storage.join(workdir, TRAINING_RUNS), training_record(config, start, mesh), WRITE_RERUN)
    raise_dropped_stops()  # a SIGTERM or Ctrl-C while starting that Python dropped (inside a gc callback)
    # One global batch per step: the data position is the step, whatever the number of processes.
    data_sharding = batch_sharding(mesh)
    loader = make_loader(config, t.batch_size, data_sharding, start_batch=start,
                         tokenizer=text_encoder and text_encoder.tokenizer, source=source)
    log = MetricsLog(workdir, start)
    if preview_owed(workdir, start, t.preview_every):  # the EMA just restored is that step's own
        with jax.set_mesh(mesh):
            log.add_to_step(start, write_preview(config, model_cfg, graphdef, state["ema"], workdir, start, log,
                                                 text_encoder, trained_classes, prompts))
        logging.info("drew the preview of step %d, which a stop during that step had skipped", start)

    preemption = PreemptionWatch()
    flops = train_flops_per_image(model_cfg, config.data.resolution, config.scheduler.num_stages)
    peak = peak_flops(jax.devices()[0])
    record, last_time, last_step = {}, time.perf_counter(), start
    progress = Progress(t.num_steps, "training", "step", initial=start)
    unchecked = None  # (step, its bad_steps_in_a_row), read once the next step is queued
    try:
        for step in range(start + 1, t.num_steps + 1):
            images, conditioning = to_global_batch(*next(loader), data_sharding)
            state, metrics = train_step(state, images, conditioning, *frozen)
            # Reading a step's counter waits for it; reading the previous step's, with this one queued
            # behind it, keeps the device busy while the host fetches and places the next batch.
            if unchecked:
                stop_if_too_many_bad_steps(manager, t.max_bad_steps, *unchecked)
            preempted = preemption.reached()
            preview_due = bool(t.preview_every) and step % t.preview_every == 0
            log_due = step % t.log_every == 0 or step == t.num_steps or preempted or preview_due
            save_due = step % t.checkpoint_every == 0 or step == t.num_steps or preempted
            unchecked = (step, metrics["bad_steps_in_a_row"])
            if step == start + 1 and not log_due:  # it compiled the step: its time is not throughput
                jax.block_until_ready(metrics)
                last_time, last_step = time.perf_counter(), step
            if log_due or save_due:  # nothing is logged, previewed or saved of a step past max_bad_steps
                stop_if_too_many_bad_steps(manager, t.max_bad_steps, *unchecked)
                unchecked = None
            # Preview steps are logged too, so their class agreement has a record to go in.
            if log_due:
                record, last_time = logged_record(step, metrics, state, lr, t.batch_size, last_time, last_step,
                                                  flops, peak)
                last_step = step
                check_saves(manager)  # a background save that failed stops the run now, not a save later
            if preview_due and not preempted and preemption.requested_alone():  # signalled while the step ran
                preempted = save_due = True
            if save_due:  # before the preview: a preview can outlast a preemption's grace period
                lock.check_held(read_now=True)  # on every process: a run whose lock was taken over saves nothing
                jax.block_until_ready(state)  # the step itself is training time; the save's wait is not
                save_start = time.perf_counter()
                save(manager, step, state)
                last_time += time.perf_counter() - save_start  # img/s counts training time only
            if preview_due and not preempted:
                preview_start = time.perf_counter()
                # Under the mesh, as sampling jobs run: the Pallas attention kernels split the batch and
                # heads over it (XLA cannot partition a Mosaic kernel: without it splash does not lower
                # for a program over several TPU chips).
                with jax.set_mesh(mesh):
                    record.update(write_preview(config, model_cfg, graphdef, state["ema"], workdir, step, log,
                                                text_encoder, trained_classes, prompts))
                last_time += time.perf_counter() - preview_start  # img/s counts training time only
            if record.get("step") == step:
                progress.write(log.write(record))
                lock.check_held()
            if save_due:  # in a bucket, the metrics logged up to a checkpoint are stored with it
                log.upload()
            progress.update()
            if preempted:
                wait_for_saves(manager)  # done before a line says so: a grace period may end the job at any line
                logging.warning("%s: saved step %d on every process, exiting", preemption.cause, step)
                break
        else:
            preempted = False
    finally:
        progress.close()
        wait_for_saves(manager)
        loader.close()
        log.close(upload_metrics=lock.lost_to is None)
        preemption.close()
    if preempted:
        raise preempted_at(preemption, step, t.num_steps, preview_due)
    return record
