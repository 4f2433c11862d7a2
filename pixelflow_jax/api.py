"""The public entry point: any checkpoint path -> NNX model + config.

A checkpoint path is any of:
  - a training workdir (RUN: its latest complete step) or one of its steps (RUN/checkpoints/STEP);
  - a folder written by convert_torch_ckpt.py;
  - a release folder (config.yaml + model.pt; needs torch), converted in memory;
  - `hf://OWNER/NAME[@REVISION][/SUBFOLDER]`: a release or converted folder on the Hugging Face Hub.
Any of the first three may be in a bucket (gs://).
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Callable, TypeVar

import numpy as np
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.checkpoints import hub
from pixelflow_jax.checkpoints.checkpoint import (CONFIG_FILE, PARAMS_DIR, CheckpointConfig, CheckpointError,
                                                 build_model, check_weights_choice, listed, read_config, read_record,
                                                 restore_params, weights_fingerprint)
from pixelflow_jax.checkpoints.convert import Params
from pixelflow_jax.checkpoints.run_checkpoint import (CHECKPOINTS, RunStep, StepRotatedAway, checkpoint_around,
                                                     checkpoint_folder_kind, deleted_while_read, find_run_step,
                                                     latest_step, restore_run_weights, rotated_away,
                                                     run_checkpoint_config)
from pixelflow_jax.kernels.attention import check_platform, resolve_backend
from pixelflow_jax.model import PixelFlow

T = TypeVar("T")

if TYPE_CHECKING:
    from pixelflow_jax.sampling.sample_conditioning import TrainedClasses


@dataclasses.dataclass(frozen=True)
class CheckpointSource:
    """A checkpoint path resolved to the one local folder it names."""

    folder: str  # a run's step folder, a converted folder or a release folder, on this machine
    label: str  # what a run records as its source: an absolute path, or a Hub path pinned to a commit
    run_step: RunStep | None = None  # set for a training run's step

    @property
    def kind(self) -> str:
        if self.run_step:
            return "training run"
        return "converted" if storage.isfile(storage.join(self.folder, CONFIG_FILE)) else "release"

    def fingerprint(self) -> str:
        """What identifies the weights: a path written again with other weights (a re-conversion
        of other weights, a retrained run) is not the checkpoint it was. For a converted folder, its
        config and the digest of its weights its conversion recorded (the same weights converted
        again are the same checkpoint); for others, and folders converted before the digest was
        recorded, storage.fingerprint of the files the weights are read from."""
        if self.run_step:
            try:
                return storage.fingerprint(self.folder)
            except FileNotFoundError:  # listed, then gone: a run still training rotated the step away
                if deleted_while_read(self.run_step.folder):
                    raise rotated_away(self.run_step) from None
                raise
        if self.kind == "release":
            return storage.fingerprint(self.folder, ("config.yaml", "model.pt"))
        config, digest, _ = read_record(self.folder)
        if digest:
            return weights_fingerprint(config, digest)
        return storage.fingerprint(self.folder, (CONFIG_FILE, PARAMS_DIR))


def resolve_checkpoint(path: str) -> CheckpointSource:
    """Downloads a Hub checkpoint (into the Hub cache), picks a run's latest complete step, and
    checks that the path exists (local or gs://); URLs are never taken for local folders."""
    try:
        # Before user_path, which takes a blank name for a quoting slip ("remove the space").
        if isinstance(path, (str, os.PathLike)) and not str(path).strip():
            raise storage.StorageError("no checkpoint given: name a training run, one of its steps, a converted or "
                                       "release folder, or hf://OWNER/NAME")
        path = storage.user_path(path)
        if refusal := hub.web_address_refusal(path):
            raise storage.StorageError(refusal)
        if hub.is_hub_path(path):
            folder, label = hub.checkpoint_folder(path)
            return CheckpointSource(folder, label)
        storage.check_supported(path)
    except storage.StorageError as e:
        raise CheckpointError(str(e)) from None
    run_step = find_run_step(path)  # before the existence check: a missing step lists those that exist
    if run_step:
        return run_step_source(run_step)
    if not storage.exists(path):  # (a new name with a space at its edge: user_path refused it as a slip)
        missing = storage.missing_path_words(path)
        hint = storage.slash_after_a_file(path) or hub.missing_path_hint(path)  # (a shell's completion: model.pt/)
        raise CheckpointError(f"checkpoint {path} {missing or 'does not exist' + hint}")
    if storage.isfile(path):
        from pixelflow_jax.checkpoints.torch_io import folder_config_yaml

        folder = storage.dirname(path)
        if storage.basename(path) == "model.pt" and folder_config_yaml(folder):
            path = folder  # the file of a release folder: read the folder, with its config.yaml
        else:
            # Only a file of a checkpoint has a folder to pass: a train.py model_STEP.pt's is no checkpoint.
            fix = checkpoint_around(path) or (f": convert it with convert_torch_ckpt.py --torch_checkpoint={path} "
                                              "--output=DIR and pass DIR")
            raise CheckpointError(f"{path} is a file; checkpoints are folders{fix}")
    if not checkpoint_folder_kind(path):  # a folder, or neither file nor folder (/dev/null, a pipe)
        if sampled := sampling_job_of(path):
            raise CheckpointError(f"{path} is not a checkpoint but {sampled}: pass that checkpoint instead")
        raise CheckpointError(f"{path} is not a checkpoint: expected a training run (run_config.json) or one of "
                              f"its steps (RUN/checkpoints/STEP), a converted folder ({CONFIG_FILE}) or a release "
                              f"folder (config.yaml + model.pt){checkpoint_around(path) or weight_files_hint(path)}")
    return CheckpointSource(path, storage.absolute(path))


def run_step_source(run_step: RunStep) -> CheckpointSource:
    folder = storage.absolute(run_step.folder)
    return CheckpointSource(folder, folder, run_step)


ROTATION_READS = 5  # a run saving every few seconds can rotate a slow read's step away more than once


def read_through_rotation(source: CheckpointSource, read: Callable[[CheckpointSource], T]) -> T:
    """read(source); where the user named a training run (not one of its steps) and the run, still
    training, rotated the step chosen as its latest away while it was read, read(...) again from the
    run's new latest step, at most ROTATION_READS reads in all. `read` gets the source it reads, so
    that what it records names the step read. A job of several processes does not read again: its
    processes must read one step, and each would choose its own; they stop, saying to rerun."""
    import jax

    for reads in range(1, ROTATION_READS + 1):
        try:
            return read(source)
        except StepRotatedAway:
            newer = newer_latest_step(source.run_step)
            if newer is None:
                raise
            if jax.process_count() > 1:
                raise rotated_away(source.run_step, "the processes of a job must read one step, so they do not "
                                   "each choose another: rerun to read the run's latest step") from None
            if reads == ROTATION_READS:
                raise rotated_away(source.run_step, f"each of the {reads} steps read in turn was rotated away while "
                                   "it was read (the run saves faster than a step is read): rerun") from None
            logging.warning("%s was rotated away by its run's training while it was read; reading the run's latest "
                            "step, %d", source.run_step.folder, newer.step)
            source = run_step_source(newer)
    raise AssertionError("unreachable: the last read returns or raises")


def newer_latest_step(run_step: RunStep | None) -> RunStep | None:
    """The latest complete step of a run that was named (not one of its steps) if it is newer than
    `run_step`, which the run rotated away; None otherwise: a step the user named is the one they
    asked for, and a run whose newest step went without a newer one was not rotated but pruned."""
    if not (run_step and run_step.latest):
        return None
    try:
        latest = latest_step(run_step.run)
    except CheckpointError:  # no complete step left
        return None
    return latest if latest.step > run_step.step else None


def weight_files_hint(folder: str) -> str:
    """For a folder of PyTorch weight files (the release's train.py output: config.yaml and
    model_STEP.pt), the conversion they need, of the newest step; for shards, how to join them; '' for any
    other folder."""
    from pixelflow_jax.checkpoints.torch_io import shards_hint, weight_files

    if shards := shards_hint(folder):
        return shards
    names = weight_files(folder)
    if not names:
        return ""
    return (f"; it holds {listed(names)}: convert one with convert_torch_ckpt.py --torch_checkpoint="
            f"{storage.join(folder, names[-1])} --output=DIR and pass DIR")


def check_same_weights_everywhere(source: CheckpointSource, given: str, flag: str) -> None:
    """Every process of a job resolves the checkpoint `given` (the value of `flag`) itself, and a
    training run's latest step is the newest its own listing shows: a run still training may save
    a step between two processes' listings, and each process then sampled its rows (or placed its
    shards of a fine-tune's start) from other weights, without a word. The step each process
    found, or the Hub commit, is compared (a local folder's path is not: each host may hold its
    own copy of it)."""
    import jax

    from pixelflow_jax import multihost

    if jax.process_count() == 1:
        return
    step = source.run_step.step if source.run_step else 0
    differing, steps = multihost.compare_views(source.label if hub.is_hub_path(source.label) else str(step), step)
    if not differing:
        return
    if source.run_step:
        pinned = storage.join(source.run_step.run, CHECKPOINTS, str(steps[0]))
        raise CheckpointError(f"the processes of this job found different latest steps of the training run {given} "
                              f"({multihost.per_process(steps)}): it saved a step while they looked (or a host's "
                              f"listing lags). Name one step for all of them, {flag}={pinned}, or rerun the same "
                              "command")
    raise CheckpointError(f"the processes of this job resolved {flag}={given} to different checkpoints: "
                          f"{multihost.named(differing)} read other weights than process 0 (this process, "
                          f"{jax.process_index()}: {source.label}); rerun the same command")


def checkpoint_config(source: CheckpointSource) -> CheckpointConfig:
    """The architecture and settings of a resolved checkpoint, read without its weights (which
    for an XL model take minutes to restore): a job checks its inputs against them first."""
    if source.run_step:
        return run_checkpoint_config(source.run_step.run)
    if source.kind == "converted":
        return read_config(source.folder)
    from pixelflow_jax.checkpoints.torch_io import folder_config_yaml, release_folder_config

    if not folder_config_yaml(source.folder):
        raise CheckpointError(f"{source.label} holds model.pt without the config.yaml that gives its architecture "
                              "(as the release's text-to-image folder): convert it once with convert_torch_ckpt.py "
                              f"--torch_checkpoint={source.label} --attention_head_dim=72 --output=DIR (72: the "
                              "released models' head width) and load DIR")
    return release_folder_config(source.folder)


def check_weights_of(source: CheckpointSource, weights: str) -> None:
    check_weights_choice(weights)
    if source.kind == "converted" and weights == "model":  # a conversion kept one set of weights
        from pixelflow_jax.checkpoints.torch_io import ONE_SET_OF_WEIGHTS

        raise CheckpointError(f"{source.folder} is a converted folder with one set of weights: {ONE_SET_OF_WEIGHTS}")


def weights_chosen(source: CheckpointSource | None, weights: str) -> str | None:
    """Which of a checkpoint's two sets of weights `weights` reads, for a record or a page to name:
    a training run's, or a train.py checkpoint's read for 'model' (no other file has that set).
    None where no choice was made: a converted or exported folder holds the one set it was
    written from (which the default 'ema' was recorded as), and a release model.pt is not known
    to hold two sets before it is read."""
    return weights if source and (source.run_step or weights == "model") else None


def weights_of(source: CheckpointSource, weights: str) -> str:
    """'the ema weights of RUN/checkpoints/STEP', or the checkpoint's label where no choice was made."""
    chosen = weights_chosen(source, weights)
    return f"the {chosen} weights of {source.label}" if chosen else source.label


def weights_note(source: CheckpointSource) -> str | None:
    """What a checkpoint written from a training run's export says of the run and step its weights
    come from ("weights: the EMA (--weights=ema) of step N of ..."): the export's config.yaml
    comment, or a conversion of the export's record of it (a train.py checkpoint's conversion records
    which of its sets it holds, in the same words); None for others (a run's step says so itself)."""
    if source.run_step:
        return None
    if source.kind == "converted":
        return read_record(source.folder).weights_note
    from pixelflow_jax.checkpoints.torch_io import export_note

    return export_note(source.folder)


def fetch_weights(source: CheckpointSource) -> None:
    """A Hub checkpoint's weights into the Hub cache (resolve_checkpoint fetched its config only);
    other checkpoints are read where they are."""
    if hub.is_hub_path(source.label):
        hub.download_weights(source.label)


def read_checkpoint(source: CheckpointSource, weights: str = "ema",
                    runtime: dict | None = None) -> tuple[CheckpointConfig, Params]:
    """(config, parameters) of a resolved checkpoint; `runtime` overrides model settings that are
    not architecture (dtype, param_dtype, attention)."""
    check_weights_of(source, weights)
    fetch_weights(source)
    record = read_record(source.folder) if source.kind == "converted" else None  # its config and weights' digest
    config, params = (record.config if record else checkpoint_config(source)), None  # a release's config.yaml: before model.pt
    if source.kind == "release":
        from pixelflow_jax.checkpoints.convert import torch_to_params
        from pixelflow_jax.checkpoints.torch_io import read_release_checkpoint

        config, state_dict = read_release_checkpoint(source.folder, weights=weights)
        params = torch_to_params(state_dict, config.model)
    if runtime:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, **runtime))
    if source.run_step:
        params = restore_run_weights(source.run_step, config, weights)
    elif params is None:
        params = restore_params(source.folder, config, record)
    return config, params


def load_arguments(dtype, attention, weights: str, param_dtype=None) -> dict:
    """load_model's runtime overrides {dtype, param_dtype, attention} (those given), checked and
    named as a caller wrote them; a dtype object (jnp.bfloat16) becomes its name."""
    from pixelflow_jax.config import ATTENTION_BACKENDS, COMPUTE_DTYPES, dtype_name

    runtime = {}
    for name, value in (("dtype", dtype), ("param_dtype", param_dtype)):
        if value is not None:
            value = dtype_name(value)
            if value not in COMPUTE_DTYPES:
                raise CheckpointError(f"{name} must be one of {COMPUTE_DTYPES} (or the jnp dtype), got {value!r}")
            runtime[name] = value
    if attention is not None:
        if attention not in ATTENTION_BACKENDS:
            raise CheckpointError(f"attention must be one of {ATTENTION_BACKENDS}, got {attention!r}")
        refused_here(lambda: check_platform(attention))  # the dtype may come from the checkpoint: load_model
        runtime["attention"] = attention
    check_weights_choice(weights)
    return runtime


def refused_here(check) -> None:
    """An attention backend this platform or model cannot run ('cudnn' on a CPU, or for float32) is
    named at load, not at the model's first call (the Pallas kernels load anywhere inside
    `interpret_kernels()`): `check` raises the kernels' ValueError, reported as a CheckpointError."""
    try:
        check()
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_model(path: str, *, dtype: str | None = None, attention: str | None = None,
               weights: str = "ema", param_dtype: str | None = None) -> tuple[PixelFlow, CheckpointConfig]:
    """Loads a model ready to call.

    path: a checkpoint path (module docstring): a training run or one of its steps, a converted or
      release folder, or an hf:// Hub path.
    dtype: compute dtype ('float32', 'bfloat16', 'float16' or the jnp dtype); default: the one a
      converted folder stores, float32 for release folders and training runs (a run records its
      architecture, not the dtype it trained in).
    attention: attention backend (see pixelflow_jax.kernels.attention); default: as dtype, 'auto'.
    weights: 'ema' (default) or 'model', for training runs and the release's train.py checkpoints.
    param_dtype: the weights' dtype ('bfloat16' halves their memory, for sampling); default float32.
    """
    runtime = load_arguments(dtype, attention, weights, param_dtype)  # checked before a download or a conversion
    try:
        source = resolve_checkpoint(path)
        if attention is not None:  # with the dtype it will compute in, before the weights are read
            compute_dtype = runtime.get("dtype") or checkpoint_config(source).model.dtype
            refused_here(lambda: resolve_backend(attention, compute_dtype))
        config, params = read_through_rotation(source, lambda source: read_checkpoint(source, weights, runtime))
    except storage.StorageError as e:  # a bucket out of reach is a checkpoint that cannot be read, as documented
        raise CheckpointError(str(e)) from e
    return build_model(config, params), config


def sampling_checkpoint(sample_config, workdir: str) -> str:
    """config.sample.checkpoint, or the workdir itself when it is a training run (so a run is
    sampled with its training command plus --mode=sample)."""
    from pixelflow_jax.checkpoints.run_checkpoint import is_run

    if sample_config.checkpoint:
        return sample_config.checkpoint
    if workdir and not hub.is_hub_path(workdir) and is_run(workdir):
        return workdir
    what = ("is not a training run" if workdir and storage.exists(workdir) else
            workdir and storage.missing_path_words(workdir) or "does not exist (a typo?)")
    if sampled := sampling_job_of(workdir):
        raise CheckpointError(f"{workdir} {what} but {sampled}: set --config.sample.checkpoint to that checkpoint "
                              "to sample, serve or inspect it")
    # Worded for every mode that reads a checkpoint this way: sample, demo, inspect.
    raise CheckpointError(f"{workdir} {what}: for a training run, give its workdir; for another checkpoint, set "
                          "--config.sample.checkpoint to a training run, a converted or release folder, or an hf:// "
                          "Hub path")


def sampling_job_of(folder: str) -> str:
    """For a folder that is no checkpoint: the words naming the checkpoint a sampling job there
    sampled (a rerun of a sampling job without its --config.sample.checkpoint, or its workdir
    named as the checkpoint), else ''."""
    from pixelflow_jax.sampling.job_files import sampled_checkpoint

    sampled = folder and not hub.is_hub_path(folder) and sampled_checkpoint(folder)
    return f"the workdir of a sampling job of {sampled}" if sampled else ""


def fill_text_encoder(sample_config, source: CheckpointSource) -> None:
    """For text configs: a training run's recorded text encoder fills an empty
    sample.text_encoder, its token length sample.max_text_tokens = 0 and its encoder weights' dtype
    an empty sample.text_encoder_param_dtype, so a text run samples with the encoder it trained
    with and no flag; the token length and dtype its export records fill them too; otherwise 0
    means the release's 512, and '' float32."""
    from pixelflow_jax.checkpoints.run_checkpoint import encoder_folder_of, read_run_config, recorded_encoder_gone
    from pixelflow_jax.text.prompts import MAX_LENGTH

    s = sample_config
    if "max_text_tokens" not in s:
        return
    recorded = read_run_config(source.run_step.run).get("text_encoder") if source.run_step else None
    if recorded and not s.text_encoder:
        s.text_encoder = encoder_folder_of(source.run_step.run, recorded["path"])
        if gone := recorded_encoder_gone(s.text_encoder, f"{storage.join(source.run_step.run, 'run_config.json')} "
                                         "names the text encoder the run trained with", "--config.sample.text_encoder"):
            raise CheckpointError(gone)
    trained = trained_text_encoding(source)
    trained_tokens = trained.get("max_text_tokens")
    if not s.max_text_tokens:
        s.max_text_tokens = trained_tokens or MAX_LENGTH
    if not s.text_encoder_param_dtype:  # bfloat16 weights give other embeddings than float32 ones
        s.text_encoder_param_dtype = trained.get("text_encoder_dtype") or "float32"
    # Allowed (an encoder moved, a longer prompt), but the embeddings may not be the trained ones.
    if recorded:
        warn_of_another_text_encoder(s, source, recorded)
    if trained_tokens and int(s.max_text_tokens) != trained_tokens:
        logging.warning("sampling %s with %d text tokens; it trained with %d tokens", source.label, s.max_text_tokens,
                        trained_tokens)


def trained_text_encoding(source: CheckpointSource) -> dict:
    """{max_text_tokens, text_encoder_dtype}, those recorded of how a text checkpoint encoded its
    captions in training (a training run, its export or their conversion: CheckpointConfig's). A
    release folder's config.yaml is read for them alone: its other values warn where a job reads them."""
    from pixelflow_jax.checkpoints.run_checkpoint import run_text_encoding
    from pixelflow_jax.checkpoints.torch_io import folder_config_yaml, text_training_of

    if source.run_step:  # its records alone (run_checkpoint_config reads them too, with the architecture)
        return run_text_encoding(source.run_step.run)
    if source.kind == "converted":
        return checkpoint_config(source).text_training()
    exported = folder_config_yaml(source.folder)
    return text_training_of(exported) if exported else {}


def warn_of_another_text_encoder(sample_config, source: CheckpointSource, recorded: dict) -> None:
    """A text run sampled with an encoder folder other than the one run_config.json records: a
    copy of that encoder elsewhere is the same encoder (its files' fingerprint, where the run
    recorded one, says so); another encoder of the same width loads without complaint and gives
    embeddings the model never learned."""
    from pixelflow_jax.checkpoints.run_checkpoint import encoder_folder_of
    from pixelflow_jax.text.train_text import fingerprint_of

    s = sample_config
    trained_folder, fingerprint = encoder_folder_of(source.run_step.run, recorded["path"]), recorded.get("fingerprint")
    if storage.absolute(s.text_encoder) != trained_folder:  # URLs, hf:// too, stay as given
        try:
            given = fingerprint_of(s.text_encoder) if fingerprint else None
        except (OSError, CheckpointError):  # not a T5 folder: loading it names what it lacks
            given = None
        if given and given != fingerprint:
            logging.warning("sampling %s with the text encoder %s, whose files are not those of the encoder it trained "
                            "with, %s: another model or fine-tune gives embeddings the model never learned (the same "
                            "weights saved in other files also differ); set --config.sample.text_encoder to the run's "
                            "encoder, or leave it empty", source.label, s.text_encoder, trained_folder)
        elif not given:  # no fingerprint to tell a moved copy from another encoder
            logging.warning("sampling %s with the text encoder %s; it trained with %s", source.label, s.text_encoder,
                            trained_folder)


def sampling_source(config, workdir: str) -> tuple[CheckpointSource, CheckpointConfig]:
    """The checkpoint a sampling job (sample, demo, inspect) reads, and its config (weights
    unread; for an hf:// checkpoint not yet downloaded): sample.checkpoint or the training run in
    `workdir`, its text encoder filled in, sample.weights checked to be there."""
    checkpoint = sampling_checkpoint(config.sample, workdir)
    source = resolve_checkpoint(checkpoint)
    check_same_weights_everywhere(source, checkpoint, "--config.sample.checkpoint")
    check_weights_of(source, config.sample.weights)
    fill_text_encoder(config.sample, source)
    return source, checkpoint_config(source)


def check_steps_for_stages(sample_config, source: CheckpointSource, num_stages: int) -> None:
    """--config.sample.steps_per_stage is one number for all stages or one per stage of `source`."""
    steps = sample_config.steps_per_stage
    if np.ndim(steps) and len(steps) != num_stages:
        raise ValueError(f"--config.sample.steps_per_stage gives {len(steps)} values; {source.label} has "
                         f"{num_stages} stages (or give one number for all)")


def run_folder_classes(source: CheckpointSource, num_classes: int) -> list[str]:
    """The class folder names a training run learned as ids 0, 1, ... (its class_index.json), or
    [] for a checkpoint that is not a run of image-folder data. A file the run could not have
    written (damaged, or naming more folders than the model's `num_classes`) is a CheckpointError,
    before a sampling job records or samples anything."""
    from pixelflow_jax.data.sources import CLASS_INDEX_FILE, DataError, read_class_index

    if not source.run_step:
        return []
    path = storage.join(source.run_step.run, CLASS_INDEX_FILE)
    if not storage.isfile(path):
        return []
    try:
        classes = read_class_index(path)
    except DataError as e:  # the sampling modes report CheckpointErrors without a traceback
        raise CheckpointError(str(e)) from None
    if len(classes) > num_classes:  # training refuses such folders: ids past the model's classes have no embedding
        raise CheckpointError(f"{path} names {len(classes)} class folders, but the run's model has {num_classes} "
                              "classes, so it is not the file the run trained with (edited by hand?): put back its "
                              "earlier content")
    return classes


def run_trained_classes(source: CheckpointSource, num_classes: int) -> TrainedClasses:
    """The class ids a checkpoint learned, for its sampling
    jobs' default labels and the demo page: a run's class folders (class_index.json), else the
    class count of its data where its train_settings.json records one (data.num_classes, as trained
    up to this step), else every class of the model: a checkpoint that is not a run, or a run
    written before runs recorded that count."""
    from pixelflow_jax.sampling.sample_conditioning import TrainedClasses

    if folders := run_folder_classes(source, num_classes):
        return TrainedClasses.of_folders(folders)
    return TrainedClasses(recorded_class_count(source, num_classes) or num_classes)


def recorded_class_count(source: CheckpointSource, num_classes: int) -> int | None:
    """The class count of the data that trained a run's step (None: not a run, or none recorded).
    A count the run could not have recorded (training refuses data of more classes than the
    model's) is a CheckpointError, before a sampling job records or samples anything."""
    from pixelflow_jax.training.resume_settings import SETTINGS_FILE, settings_trained_to

    if not source.run_step:
        return None
    count = settings_trained_to(source.run_step.run, source.run_step.step)[0].get("data.num_classes")
    if count is None:
        return None
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= num_classes:
        raise CheckpointError(f"{storage.join(source.run_step.run, SETTINGS_FILE)} records data.num_classes "
                              f"{count!r}, not a class count from 1 to the {num_classes} classes of the run's model, "
                              "so not the count the run trained with (edited by hand?): put back its earlier content")
    return count


def sampling_runtime(config) -> dict:
    """What config.model sets of a checkpoint's model: its dtype, param_dtype (bfloat16 halves the
    weights' memory) and attention backend."""
    return dict(dtype=config.model.dtype, param_dtype=config.model.get("param_dtype", "float32"),
                attention=config.model.attention)


def load_sampling_model(config, source: CheckpointSource) -> tuple[PixelFlow, CheckpointConfig, CheckpointSource]:
    """(model, config, the source read) of `source` with sampling_runtime(config) and sample.weights
    (ema or model); the source read is another step of the run where its training rotated the step
    of `source` away (read_through_rotation)."""
    return read_through_rotation(source, lambda source: (*read_sampling_model(config, source), source))


def read_sampling_model(config, source: CheckpointSource) -> tuple[PixelFlow, CheckpointConfig]:
    """load_sampling_model's read of `source` itself, for a job that records its source first."""
    ckpt, params = read_checkpoint(source, config.sample.weights, sampling_runtime(config))
    return build_model(ckpt, params), ckpt


def load_for_sampling(config, workdir: str):
    """(model, config, the source read): sampling_source, then load_sampling_model."""
    source, _ = sampling_source(config, workdir)
    return load_sampling_model(config, source)
