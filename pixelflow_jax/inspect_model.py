"""`main.py --mode=inspect`: build the model, count its parameters, and time one jit-compiled
forward per cascade stage (batch 2; a text model gets random text states of its
cross_attention_dim, sample.max_text_tokens long; when that is 0 or unset, the length a training
run (or its export) recorded, or the config's train.max_text_tokens for the config's own model, else the release's
512). A quick check
that a config or a checkpoint runs.

The model is the config's (config.model, scheduler, data.resolution) with random weights; or,
when config.sample.checkpoint is set (or empty in the workdir of a training run with a saved step,
as sampling reads it), that checkpoint's architecture, stages and resolution with its own weights
(sample.weights of a training run, named in the report; null for a folder of one set), run in
the config's model.dtype, param_dtype and attention as --mode=sample runs it. Writes
WORKDIR/inspect.json (the latest) and adds it to WORKDIR/inspect_history.jsonl, with the
checkpoint's fingerprint (the one sampling jobs record: api.CheckpointSource.fingerprint), what a
training run's records say trained its step (training_of), and the software and devices that timed it.
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from pixelflow_jax import storage, validation
from pixelflow_jax.api import (CheckpointSource, load_for_sampling, trained_text_encoding, weights_chosen, weights_note,
                               weights_of)
from pixelflow_jax.checkpoints.checkpoint import CheckpointConfig
from pixelflow_jax.checkpoints.run_checkpoint import is_run, listed_steps
from pixelflow_jax.config import ModelConfig
from pixelflow_jax.model import PixelFlow
from pixelflow_jax.multihost import write_on_process_0
from pixelflow_jax.progress import say
from pixelflow_jax.sampling.job_files import sampled_checkpoint, settings_path
from pixelflow_jax.scheduler import stage_resolutions
from pixelflow_jax.software_versions import job_environment
from pixelflow_jax.text.prompts import MAX_LENGTH
from pixelflow_jax.workdir_files import TRAINING_RUNS


def parameter_counts(model: PixelFlow) -> dict[str, int]:
    """Parameters per top-level module, and the total."""
    state = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    counts = {name: int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(sub))) for name, sub in state.items()}
    counts["total"] = sum(counts.values())
    return counts


def inspects_checkpoint(config, workdir: str) -> bool:
    """Whether the model inspected is a checkpoint's (see the module docstring), not the config's."""
    return bool(config.sample.checkpoint) or (is_run(workdir) and bool(listed_steps(workdir)[0]))


def fill_checkpoint_of_run(config, workdir: str) -> None:
    """An empty sample.checkpoint in the workdir of a run with a saved step means that run, as
    --mode=sample and --mode=demo read it. A run without one (its first save still being written,
    or killed) has no weights to inspect: the config's own model is, and a warning says so."""
    if config.sample.checkpoint:
        return
    if not is_run(workdir):
        warn_of_a_sampling_job(workdir)
        return
    complete, partial = listed_steps(workdir)
    if complete:
        logging.info("%s is a training run: inspecting its latest checkpoint (set --config.sample.checkpoint to "
                     "inspect another, or use another --workdir for the config's own model)", workdir)
        config.sample.checkpoint = workdir
    else:
        being_written = f" (step {partial[-1]} is still being written, or was killed mid-save)" if partial else ""
        logging.warning("%s is a training run with no complete step yet%s: inspecting the config's own model with "
                        "random weights, not the run's", workdir, being_written)


def warn_of_a_sampling_job(workdir: str) -> None:
    """A sampling job's workdir holds no weights, only the name of the checkpoint it sampled: the
    config's random model is inspected there, which a user reading inspect.json beside the samples
    could take for the sampled model's."""
    sampled = sampled_checkpoint(workdir)
    if sampled is None:  # no sampling job's record here
        return
    settings = settings_path(workdir)
    logging.warning("%s is a sampling job's workdir (of %s, %s): inspecting the config's own model with random "
                    "weights, not the sampled one; set --config.sample.checkpoint=%s to inspect that", workdir,
                    sampled, settings, sampled)


def training_of(source: CheckpointSource | None) -> dict | None:
    """What the records of a training run say trained the inspected step, for a grader's summary:
    the step, and the chain of training jobs (training_runs.jsonl) that led to it, each with its
    steps, batch, data and config fingerprint, and the images they showed the model on the way.
    None for other checkpoints. A step no chain of recorded jobs reached (a checkpoint copied in from
    another run, or records missing) is named in a warning and has no jobs."""
    if source is None or source.run_step is None:
        return None
    run, step = source.run_step.run, source.run_step.step
    path = storage.join(run, TRAINING_RUNS)
    try:
        jobs = storage.read_json_lines(path)
        chain = jobs_behind(jobs, step)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:  # none (an older run), damaged
        logging.warning("%s: no readable record of the jobs that trained step %d (%s: %s): inspect.json's training "
                        "names no jobs", path, step, type(e).__name__, e)
        return dict(checkpoint_step=step, training_runs=storage.absolute(path), jobs=None, images_seen=None)
    if not chain:
        logging.warning("no chain of the training jobs that %s records leads from step 0 to step %d of %s (each job "
                        "from its start_step up to its num_steps): was the step copied in from another run, or "
                        "the records cut?", path, step, run)
    return dict(checkpoint_step=step, training_runs=storage.absolute(path), jobs=chain or None,
                images_seen=sum(job["images"] for job in chain) if chain else None)


def jobs_behind(jobs: list[dict], step: int) -> list[dict]:
    """The training jobs, earliest first, whose steps led to `step`: walking back from the last job that
    started before it and could reach it, each earlier one that could reach where the next resumed (its
    num_steps). [] where no such chain goes back to step 0."""
    chain, end = [], step
    for job in reversed(jobs):
        start, num_steps = int(job["start_step"]), int(job["num_steps"])
        if start < end <= num_steps:  # a job that stopped short of where the next resumed is no link
            config = job["config"]
            batch = int(config["train"]["batch_size"])
            chain.append(dict(time=job["time"], start_step=start, end_step=end, batch_size=batch,
                              data=config["data"]["source"], init_from=config["train"]["init_from"] or None,
                              config_fingerprint=job["config_fingerprint"],
                              images=(end - start) * batch))
            end = start
        if end == 0:
            break
    return chain[::-1] if end == 0 else []


def model_to_inspect(config) -> tuple[PixelFlow, CheckpointConfig, CheckpointSource | None]:
    """(model, its stages and resolution, the checkpoint's CheckpointSource or None): see the module docstring."""
    if config.sample.checkpoint:
        return load_for_sampling(config, "")
    ckpt = CheckpointConfig(ModelConfig.from_mapping(config.model), config.scheduler.num_train_timesteps,
                            config.scheduler.num_stages, config.data.resolution)
    return PixelFlow(ckpt.model, rngs=nnx.Rngs(config.seed)), ckpt, None


def text_length(config, source) -> int:
    """The text states' length (see the module docstring). A text config's sampling checkpoint has
    filled sample.max_text_tokens from its run (api.fill_text_encoder); a class config has no such
    field, so a text run or its export inspected with one reads its record here (it timed the release's 512)."""
    if config.sample.get("max_text_tokens"):
        return int(config.sample.max_text_tokens)
    if source is None:  # the config's own model: the length it trains with
        return int(config.train.get("max_text_tokens") or MAX_LENGTH)
    return trained_text_encoding(source).get("max_text_tokens") or MAX_LENGTH


def run(config, workdir: str) -> dict:
    config, workdir = validation.job_config(config, "inspect"), validation.job_workdir(workdir)
    # An inspection refused at its start leaves no empty folder; process 0, which writes the report, removes it.
    with storage.removed_if_left_empty(workdir, remover=jax.process_index() == 0):
        return inspect_in(config, workdir)


def inspect_in(config, workdir: str) -> dict:
    """run's work once the config and workdir are checked: the report, printed and written to WORKDIR/inspect.json."""
    storage.check_writable(workdir)  # fail now, not after the timing work
    report_path = storage.join(workdir, "inspect.json")
    for path in (report_path, storage.history_path(report_path)):
        if storage.isdir(path):
            raise ValueError(f"{path} is a folder, where --mode=inspect writes its report: move it away, or use "
                             "another --workdir")
    fill_checkpoint_of_run(config, workdir)
    model, ckpt, source = model_to_inspect(config)
    checkpoint = source.label if source else None
    # Which of a run's (or a train.py checkpoint's) two sets is timed: the EMA and the raw weights
    # of one checkpoint were two reports alike in inspect_history.jsonl.
    weights = weights_chosen(source, config.sample.weights)
    # An export records which weights of which run it holds, for a model card: read from there
    # (or from the record of its conversion here).
    exported = weights_note(source) if source else None
    model_cfg = model.config
    counts = parameter_counts(model)
    logging.info("parameters: %s", counts)

    graphdef, params = nnx.split(model)

    @jax.jit
    def forward(params, images, timesteps, conditioning):
        return nnx.merge(graphdef, params)(images, timesteps, **conditioning)

    rng = np.random.default_rng(config.seed)
    conditioning = {}
    if model_cfg.num_classes:
        conditioning["class_labels"] = jnp.zeros((2,), jnp.int32)
    text_tokens = text_length(config, source) if model_cfg.cross_attention_dim else 0
    if text_tokens:
        conditioning["encoder_hidden_states"] = jnp.asarray(
            rng.standard_normal((2, text_tokens, model_cfg.cross_attention_dim)), jnp.float32)
        conditioning["encoder_attention_mask"] = jnp.ones((2, text_tokens), jnp.int32)
    stages = []
    for stage, size in enumerate(stage_resolutions(ckpt.resolution, ckpt.num_stages)):
        images = jnp.asarray(rng.standard_normal((2, size, size, model_cfg.in_channels)), jnp.float32)
        timesteps = jnp.asarray(rng.uniform(0, ckpt.num_train_timesteps, 2), jnp.float32)
        start = time.perf_counter()
        out = jax.block_until_ready(forward(params, images, timesteps, conditioning))
        compile_and_run = time.perf_counter() - start
        start = time.perf_counter()
        out = jax.block_until_ready(forward(params, images, timesteps, conditioning))
        run_time = time.perf_counter() - start
        if not bool(jnp.isfinite(out).all()):
            inspected = weights_of(source, config.sample.weights) if source else "the config's model"
            overflow = "" if config.model.dtype == "float32" else (
                f", or {config.model.dtype} overflowed (try --config.model.dtype=float32)")
            raise FloatingPointError(f"stage {stage}: the forward pass of {inspected} produced NaN or inf: check its "
                                     f"weights (a diverged run?){overflow}")
        stages.append(dict(stage=stage, resolution=size, tokens=(size // model_cfg.patch_size) ** 2,
                           first_call_s=round(compile_and_run, 3), forward_s=round(run_time, 4)))
        logging.info("stage %d: %dpx, %d tokens, first call %.2fs, forward %.4fs", stage, size,
                     stages[-1]["tokens"], compile_and_run, run_time)

    report = dict(model=model_cfg.to_dict(), checkpoint=checkpoint, weights=weights, exported_weights=exported,
                  checkpoint_fingerprint=source.fingerprint() if source else None, training=training_of(source),
                  parameters=counts, batch=2,
                  text_tokens=text_tokens, stages=stages, device=str(jax.devices()[0]), environment=job_environment())
    say(json.dumps(report, indent=2))  # first: a report that cannot be written is not lost
    # Written by process 0 (every process of a pod's job wrote it, and added its line to the history).
    write_on_process_0(report_path, "rerun the same command to record it (the report is printed above)",
                       lambda path: storage.write_json_keeping_history(path, report))
    return report
