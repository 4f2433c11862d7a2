"""A training workdir read as a checkpoint.

    RUN                      its latest complete step
    RUN/checkpoints/STEP     that step

The architecture, number of stages, resolution and scheduler come from RUN/run_config.json. Only
the weights asked for are read from the step's train state (orbax partial restore): 'ema' (the
default, as for the release's train.py checkpoints) or 'model' (the raw weights), never the
optimiser moments, which are twice the size of the weights.

A step is complete once orbax has finalised it (renamed its temporary folder, or written its commit
marker on object stores); a step killed mid-save is never read.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time

from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.checkpoints.checkpoint import (CONFIG_FILE, WEIGHT_CHOICES, CheckpointConfig, CheckpointError,
                                                 abstract_params, check_weights_choice, check_weights_finite,
                                                 listed, named_leaves)
from pixelflow_jax.checkpoints.convert import Params
from pixelflow_jax.command_line import late_restore_callbacks_dropped
from pixelflow_jax.config import ModelConfig, fields_missing_from_architecture
from pixelflow_jax.error_text import first_line

RUN_CONFIG = "run_config.json"
CHECKPOINTS = "checkpoints"
STATE_ITEM = "state"  # the item name train.py saves the whole state under
STEP_METADATA = "_CHECKPOINT_METADATA"  # what orbax writes beside a step's items
UNREADABLE_CHECKPOINTS = "unreadable_checkpoints"  # steps a resume set aside, as STEP-TIME (training/checkpointing.py)
WEIGHT_KEYS = dict(zip(WEIGHT_CHOICES, ("ema", "params")))  # the user's name -> the train state's key
# Runs written before run_config.json recorded the scheduler trained with the release's 1000 steps.
DEFAULT_NUM_TRAIN_TIMESTEPS = 1000
# A step folder is named by orbax as str(step): a "040" of someone else's is not step 40.
STEP_NAME = r"0|[1-9]\d*"
_IN_PROGRESS = re.compile(rf"({STEP_NAME})\.orbax-checkpoint-tmp.*")


def is_step_name(name: str) -> bool:
    return re.fullmatch(STEP_NAME, name) is not None


def is_run(path: str) -> bool:
    return storage.isfile(storage.join(path, RUN_CONFIG))


def has_trained(path: str) -> bool:
    """A run with a saved step: what its run_config.json records was trained (a first start that
    failed before its first save records a model and encoder that a corrected command replaces)."""
    return is_run(path) and bool(complete_steps(path))


def converted_folder_kind(folder: str) -> str | None:
    return "converted" if storage.isfile(storage.join(folder, CONFIG_FILE)) else None


def checkpoint_folder_kind(folder: str) -> str | None:
    """'converted' or 'release' for a checkpoint folder of that kind (a release folder may lack its
    config.yaml, as the released text-to-image one does), else None."""
    if converted_folder_kind(folder):
        return "converted"
    if storage.isfile(storage.join(folder, "model.pt")):
        return "release"
    return None


# A step alone holds no architecture (its run's run_config.json does), nor the run's class names,
# data settings or text encoder: a step is kept readable inside a copy of its run.
KEEP_A_STEP = (f"copy the run's folder without its {CHECKPOINTS}/, then the step into the copy's {CHECKPOINTS}/, "
               "and read the copy")


def checkpoint_around(folder: str) -> str:
    """For a folder that is no checkpoint: the checkpoint it lies in (a run, one of its steps, a
    converted or release folder, up to three levels up), the run it is missing the run_config.json
    of, or the run a step copied out of it lacks, as words to add to the refusal; '' if none."""
    if storage.isdir(storage.join(folder, CHECKPOINTS)) and not is_run(folder):
        return (f"; it holds {CHECKPOINTS}/ but no {RUN_CONFIG}, the file that describes a training run's model: a "
                "copy of the run that missed it? Copy it from the run")
    if storage.isdir(storage.join(folder, STATE_ITEM)) and storage.isfile(storage.join(folder, STEP_METADATA)):
        return set_aside_step(folder) or (
            f"; it is a training run's step copied out of its run, and a step is read only inside its run "
            f"(RUN/{CHECKPOINTS}/STEP), whose {RUN_CONFIG} describes the model: {KEEP_A_STEP}")
    for above in folders_above(folder)[:3]:
        parent = storage.dirname(above)
        if is_step_name(storage.basename(above)) and storage.basename(parent) == CHECKPOINTS and \
                is_run(storage.dirname(parent)):
            return f"; it lies inside the step {above} of a training run: pass that"
        if is_run(above) or checkpoint_folder_kind(above):
            return f"; it lies inside the checkpoint {above}: pass that"
    return ""


def set_aside_step(folder: str) -> str:
    """For a step a resume moved to RUN/unreadable_checkpoints/STEP-TIME[-N]: words naming it so,
    and the name it needs inside a copy of its run (its own is no step's); '' for another folder."""
    folder = folder.rstrip("/")
    above = storage.dirname(folder)
    named = re.fullmatch(rf"({STEP_NAME})-\d+(-\d+)?", storage.basename(folder))
    if not (named and storage.basename(above) == UNREADABLE_CHECKPOINTS and is_run(storage.dirname(above))):
        return ""
    return (f"; it is step {named[1]} of the run {storage.dirname(above)}, set aside at a resume because it did not "
            f"restore then (damaged, or a read error that has passed): to try it, copy the run's folder without its "
            f"{CHECKPOINTS}/, then this folder into the copy's {CHECKPOINTS}/ named {named[1]}, and read the copy")


def folders_above(path: str) -> list[str]:
    """The folders that hold `path`, nearest first, up to the root (of a bucket: gs://BUCKET)."""
    folders, folder = [], storage.resolved(path)
    while (parent := storage.dirname(folder.rstrip("/")) or "/") != folder:
        folders.append(folder := parent)
    return folders


def check_outside_checkpoints(path: str, flag: str = "--workdir") -> None:
    """Refuses an output inside a training run's checkpoints/ folder (a sample job's workdir and
    its checkpoint swapped, say): the run would take it for a step, and its checkpoint rotation
    would delete it. An output inside a converted checkpoint folder (at any depth: its params/ too)
    is refused as well, and a --workdir that is a converted or release folder or directly inside
    one: inspect took it for a workdir and timed the config's own random model, eval wrote its
    files among orbax's, and samples inside params/ changed the checkpoint's fingerprint, and went
    with it when the folder was converted again (--overwrite)."""
    absolute = storage.resolved(path)
    above = folders_above(path)
    for folder in ([path] if flag == "--workdir" else []) + above:
        # A release folder is known by a model.pt alone: further up, or beside a conversion's output
        # (model.pt downloaded into a folder, converted into a subfolder), one is anybody's file.
        near = flag == "--workdir" and folder in (path, *above[:1])
        kind = checkpoint_folder_kind(folder) if near else converted_folder_kind(folder)
        if kind:
            inside = "" if folder == path else "inside "
            fix = (f"to use it, pass --config.sample.checkpoint={folder} and choose another --workdir"
                   if flag == "--workdir" else "choose an output outside it")
            outputs = "outputs" if flag == "--workdir" else "conversion"
            raise CheckpointError(f"{flag} {path} is {inside}a {kind} checkpoint folder ({folder}), where the "
                                  f"{outputs} would mix with its files: {fix}")
    for match in re.finditer(f"/{CHECKPOINTS}(?=/|$)", absolute):
        run = absolute[:match.start()]
        if run and not run.endswith(":/") and is_run(run):
            hint = (" (to use a step as the checkpoint, pass it as --config.sample.checkpoint)"
                    if flag == "--workdir" else "")
            raise CheckpointError(f"{flag} {path} is inside the checkpoints of the training run {run}, which would "
                                  "take it for a step of its own and delete it in its checkpoint rotation: choose a "
                                  f"folder outside {storage.join(run, CHECKPOINTS)}{hint}")


def read_run_config(run: str) -> dict:
    path = storage.join(run, RUN_CONFIG)
    try:
        values = storage.read_json(path)
        problem = None if isinstance(values, dict) else f"a JSON {type(values).__name__}, not an object"
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError: a copy cut short, or an edit
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise CheckpointError(f"{path} is damaged ({problem}): it describes the model of the run's checkpoints. Put "
                              "back its content (a copy of the run that stopped midway? copy the file again)")
    values.setdefault("num_train_timesteps", DEFAULT_NUM_TRAIN_TIMESTEPS)
    return values


def encoder_folder_of(run: str, recorded_path: str) -> str:
    """The text encoder folder run_config.json records (recorded_path: its text_encoder.path; a
    relative one lives inside the run)."""
    from pixelflow_jax.checkpoints import hub

    if hub.is_hub_path(recorded_path) or storage.is_url(recorded_path) or recorded_path.startswith("/"):
        return recorded_path
    return storage.join(storage.absolute(run), recorded_path)


def recorded_encoder_gone(path: str, recorded: str, flag: str) -> str:
    """The error for a local T5 folder that a run's record names (`recorded`, in words) and that is
    not there, naming `flag` to give where it is now; '' where it is there, or in a bucket or on the
    Hub (looked for there by the load). The load's own refusal named a folder the user never typed."""
    if storage.is_url(path) or os.path.isdir(path):
        return ""
    return f"{recorded}, {path}, which does not exist (moved?): set {flag} to where that T5 folder is now"


def run_checkpoint_config(run: str) -> CheckpointConfig:
    values, text = read_run_config(run), run_text_encoding(run)
    architecture = values.get("architecture")
    missing = fields_missing_from_architecture(architecture) if isinstance(architecture, dict) else []
    if missing:  # (a file with no architecture at all is refused below)
        raise CheckpointError(f"{storage.join(run, RUN_CONFIG)} does not describe a model: its architecture lacks "
                              f"{', '.join(missing)}. Put back its content (copy the file again from the run)")
    try:
        return CheckpointConfig(model=ModelConfig.from_mapping(values["architecture"]),
                                num_train_timesteps=int(values["num_train_timesteps"]),
                                num_stages=int(values["num_stages"]), resolution=int(values["resolution"]), **text)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{storage.join(run, RUN_CONFIG)} does not describe a model: {e}") from None


def run_text_encoding(run: str) -> dict:
    """{max_text_tokens, text_encoder_dtype} a text run encoded its captions with (its
    run_config.json and train_settings.json); {} for a class run."""
    from pixelflow_jax.training.resume_settings import recorded_settings

    recorded = read_run_config(run).get("text_encoder")
    if not recorded:
        return {}
    dtype = recorded_settings(run).get("train.text_encoder_dtype")  # runs before it was a setting: float32
    return {"max_text_tokens": int(recorded["max_text_tokens"]), **({"text_encoder_dtype": dtype} if dtype else {})}


def complete_steps(run: str) -> list[int]:
    folder = storage.join(run, CHECKPOINTS)
    names = [n for n in storage.listdir(folder) if is_step_name(n)]
    if not names:  # orbax is not imported for nothing: a run stopped as it starts reports this (main.py)
        return []
    from etils import epath
    import orbax.checkpoint as ocp

    return sorted(int(n) for n in names if ocp.step.is_path_finalized(epath.Path(storage.join(folder, n))))


def steps_in_progress(run: str) -> list[int]:
    """Steps being saved now, or killed mid-save: their folders exist but are not finalised."""
    names = storage.listdir(storage.join(run, CHECKPOINTS))
    complete = set(complete_steps(run))
    partial = {int(m[1]) for m in map(_IN_PROGRESS.fullmatch, names) if m}
    partial |= {int(n) for n in names if is_step_name(n)} - complete
    return sorted(partial - complete)


@dataclasses.dataclass(frozen=True)
class RunStep:
    run: str
    step: int
    latest: bool = False  # chosen as the run's latest (the run was named), not a step the user named


    @property
    def folder(self) -> str:
        return storage.join(self.run, CHECKPOINTS, str(self.step))


def listed_steps(run: str, listings: int = 3) -> tuple[list[int], list[int]]:
    """(complete steps, steps in progress) of a run. A run keeping one step (keep_checkpoints=1)
    finalises step N+1, then deletes step N: a listing across that swap finds N gone and N+1 still
    temporary, none complete, so a listing without a complete step but with folders is taken again."""
    steps, partial = complete_steps(run), steps_in_progress(run)
    for _ in range(listings - 1):
        if steps or not (partial or storage.listdir(storage.join(run, CHECKPOINTS))):
            break
        time.sleep(0.1)  # a swap is a rename and a deletion: far shorter
        steps, partial = complete_steps(run), steps_in_progress(run)
    return steps, partial


def latest_step(run: str) -> RunStep:
    steps, partial = listed_steps(run)
    if not steps:
        being_written = f"; step {partial[-1]} is still being written (or was killed mid-save)" if partial else ""
        raise CheckpointError(f"training run {run} has no complete checkpoint yet{being_written}. Wait for the "
                              "first checkpoint (train.checkpoint_every) or pass a run that has one")
    newer = [s for s in partial if s > steps[-1]]
    if newer:
        logging.warning("%s: step %d is incomplete (still being written, or killed mid-save); using step %d, "
                        "the latest complete one", run, newer[-1], steps[-1])
    return RunStep(run, steps[-1], latest=True)


def find_run_step(path: str) -> RunStep | None:
    """The step that `path` names if it is a training run or one of its step folders, else None."""
    path = str(path).rstrip("/") if storage.is_url(path) else os.path.abspath(path)  # "checkpoints/9": its run
    if is_run(path):
        return latest_step(path)
    parent = storage.dirname(path)
    if storage.basename(parent) != CHECKPOINTS or not is_run(storage.dirname(parent)):
        # A link to a step (`ln -s RUN/checkpoints/5000 best`) is that step, not a folder inside the run.
        linked = storage.resolved(path)
        return find_run_step(linked) if linked != path else None
    run, name = storage.dirname(parent), storage.basename(path)
    steps = complete_steps(run)
    if is_step_name(name) and int(name) in steps:
        return RunStep(run, int(name))
    if is_step_name(name) and int(name) in steps_in_progress(run):
        problem = f"step {name} is incomplete (still being written, or killed mid-save)"
    elif in_progress := _IN_PROGRESS.fullmatch(name):  # the folder a listing shows: no step of that name
        problem = (f"{name} is the temporary folder of step {in_progress[1]}, incomplete (still being written, or "
                   "killed mid-save; orbax renames it to the step's number once the step is whole)")
    else:
        problem = f"step {name!r} does not exist"
    raise CheckpointError(f"training run {run}: {problem}; its complete steps are {steps or 'none yet'}")


def restore_error(error: Exception) -> str:
    """The first line of an orbax / tensorstore error, without the spec tensorstore appends (as
    JSON, or as a pointer to it)."""
    first = first_line(error)
    for appended in (" [tensorstore_spec", " See full TensorStore details"):
        first = first.split(appended, 1)[0]
    return first[:500]


def restore_run_weights(run_step: RunStep, config: CheckpointConfig, weights: str = "ema") -> Params:
    """The EMA or raw weights of one step, on this process's first device; nothing else is read."""
    import jax
    import orbax.checkpoint as ocp

    check_weights_choice(weights)
    key = WEIGHT_KEYS[weights]
    target = {key: abstract_params(config.model, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))}
    path = storage.join(storage.absolute(run_step.folder), STATE_ITEM)
    try:
        with late_restore_callbacks_dropped(), ocp.PyTreeCheckpointer() as checkpointer:
            restored = checkpointer.restore(path, args=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True))
    except Exception as e:  # orbax raises many types; all mean the same thing to the user
        if deleted_while_read(run_step.folder):  # not damage: a run still training rotated it away
            raise rotated_away(run_step) from None
        if unlike := shapes_unlike_run_config(path, key, target[key]):  # every step would fail alike
            raise CheckpointError(f"{run_step.folder} holds weights of another architecture than "
                                  f"{storage.join(run_step.run, RUN_CONFIG)} describes ({listed(unlike, 3)}): was "
                                  f"{RUN_CONFIG} edited, or copied from another run? Put the run's own back") from None
        raise CheckpointError(f"cannot restore the {weights} weights of {run_step.folder} (damaged, or not this "
                              f"run's architecture {config.model.architecture()}): {restore_error(e)}"
                              f"{other_steps(run_step)}") from None
    check_weights_finite(restored[key], f"the {weights} weights of {run_step.folder}",
                         lambda: f"load another step{other_steps(run_step) or ' (the run has no other complete step)'}")
    logging.info("restored the %s weights of %s", weights, run_step.folder)
    return restored[key]


class StepRotatedAway(CheckpointError):
    """A training run's step that the run, still training, deleted while it was read (its
    checkpoint rotation, train.keep_checkpoints): not damage, and where the run was named, its
    newer step can be read instead (api.read_through_rotation)."""


def rotated_away(run_step: RunStep, advice: str | None = None) -> StepRotatedAway:
    """The error for a step that its run, still training, deleted while it was read; `advice` says
    what to do instead of the default (rerun for a run named, the run rather than its step otherwise)."""
    if advice is None:
        advice = ("rerun to read the run's latest step" if run_step.latest else
                  f"pass the run ({run_step.run}) instead of one of its steps, to read whichever step is its latest")
    return StepRotatedAway(f"{run_step.folder} was deleted while it was read: its run is still training, and its "
                           f"checkpoint rotation (train.keep_checkpoints) removed the step; {advice}, or, to keep a "
                           f"step while the run trains on, {KEEP_A_STEP} (a run started with a larger "
                           "train.keep_checkpoints keeps more steps)")


def deleted_while_read(folder: str, watch_s: float = 1.0) -> bool:
    """Whether a step folder whose read failed is gone, or going: a training run's checkpoint
    rotation removes a step a file at a time, so a read can fail on the files removed first while
    the folder is still there, looking damaged. Files that go within watch_s tell (damage stays)."""
    if not storage.exists(folder):
        return True
    try:
        before = set(storage.file_sizes(folder))
        time.sleep(watch_s)
        return not storage.exists(folder) or not before <= set(storage.file_sizes(folder))
    except FileNotFoundError:  # listed, then gone before its size was read
        return True


def shapes_unlike_run_config(state_path: str, key: str, target: dict) -> list[str]:
    """The weights whose shape in a step's own description of its arrays is not the shape
    run_config.json's architecture gives ('name (11, 32) stored, (11, 64) described'), or that the
    step lacks; [] where they agree, or the description does not read (damage, named otherwise)."""
    import orbax.checkpoint as ocp

    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            stored = checkpointer.metadata(state_path).item_metadata[key]
    except Exception:  # orbax raises many types for unreadable files
        return []
    stored_shapes = {name: tuple(leaf.shape) for name, leaf in named_leaves(stored)}
    unlike = []
    for name, wanted in named_leaves(target):
        if name not in stored_shapes:
            unlike.append(f"{name} not stored")
        elif stored_shapes[name] != tuple(wanted.shape):
            unlike.append(f"{name} {stored_shapes[name]} stored, {tuple(wanted.shape)} described")
    return unlike


def other_steps(run_step: RunStep) -> str:
    """Where else the run's weights can be read from, for an error about one step ('' if nowhere)."""
    others = [s for s in complete_steps(run_step.run) if s != run_step.step]
    return (f"; the run's other complete steps: {others} (load {storage.join(run_step.run, CHECKPOINTS)}/"
            f"{others[-1]})" if others else "")
