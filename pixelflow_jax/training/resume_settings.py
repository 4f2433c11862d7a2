"""What a resumed run keeps: the settings that decide its data order and its optimisation.

    WORKDIR/train_settings.json     those settings, as the run started (or was last changed)
    WORKDIR/settings_changes.jsonl  every change accepted (allow_resume_changes, NUMERICS_ONLY), by step, with
                                    the settings it left unread ("dropped")

A resume with another batch size, seed or data (another root of other files, the same root with records added,
removed, renamed or moved to another class: the shuffle is a permutation of the record count, and
a record's position is its place in the sorted listing; or labels of another class count) silently
loses exact resume (the data position counts in steps of the new batch); another learning rate
silently changes the run. So a change is refused, naming each setting, unless
train.allow_resume_changes is set; then it is recorded. Where the steps run (devices, remat, fsdp,
attention backend, jax's matmul precision) may change with a warning and a record: the numbers then
agree with an uninterrupted run to float rounding (NUMERICS_ONLY); the attention backend is recorded as the
kernel that ran ('auto' resolved), so 'auto' and the kernel it picks are no change, and a version
whose 'auto' picks another kernel is one. Another data.root holding the same files (the run's
listing and record count: a copy on a cluster node's local disk) resumes with a warning and a
record too. The class count of a class-conditional run's data (data.num_classes) is recorded too:
sampling the run cycles its default labels over those classes (api.run_trained_classes).
"""

from __future__ import annotations

import json
import time

import jax
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.checkpoints.run_checkpoint import RUN_CONFIG
from pixelflow_jax.kernels.attention import resolve_backend
from pixelflow_jax.software_versions import matmul_precision_named_once
from pixelflow_jax.training.metrics_log import WRITE_RERUN
from pixelflow_jax.training.run_config import write_run_record
from pixelflow_jax.training.train_step import counts_updates

SETTINGS_FILE = "train_settings.json"
CHANGES_FILE = "settings_changes.jsonl"
# The last three: text configs only.
TRAIN_FIELDS = ("batch_size", "lr", "lr_schedule", "warmup_steps", "weight_decay", "grad_clip", "ema_decay",
                "label_dropout", "grad_accum_steps", "caption_dropout", "max_text_tokens", "text_encoder_dtype")
MODEL_FIELDS = ("dtype",)  # the compute dtype changes every step's arithmetic
# Where and how the steps run: a resume may change these (they fit a run to memory or to the machines
# it gets), but each changes the order of float operations, so the run then agrees with an
# uninterrupted one to float rounding, not bit for bit: a warning, and a record, not a refusal.
# run.matmul_precision: jax's (JAX_DEFAULT_MATMUL_PRECISION; None: the platform's, TF32 or one bfloat16 pass on
# GPUs and TPUs), which training's matmuls take.
NUMERICS_ONLY = ("run.devices", "run.platform", "run.matmul_precision", "mesh.fsdp", "model.remat", "model.attention")
# May change at a resume past both warmups of a constant rate (warmup_change_keeps_the_rate).
WARMUP = "train.warmup_steps"
# May change where the data's listing and record count are the same (data_moved): the same files elsewhere.
DATA_ROOT = "data.root"
# What a run recorded before a setting existed meant: its default.
DEFAULTS = {"train.lr_schedule": "constant", "train.warmup_steps": 0, "train.lr_decay_steps": 0,
            "data.random_flip": True}
# Recorded by this version, not by runs before it: their absence is no change.
ADDED_LATER = ("data.num_records", "model.dtype", "train.text_encoder_dtype", "data.demo_num_classes", "data.listing",
               "data.num_classes", *NUMERICS_ONLY)
# The checkpoint a new run started from (train.init_from, resolved; "" from scratch): recorded once,
# never compared (a resume does not read init_from), for a resume to tell a rerun of the same
# command from an init_from given to a run that already trains.
STARTED_FROM = "train.init_from"
# With it, what was read there: the checkpoint (a run's step folder: the run may save more steps; a Hub
# path pinned to its commit) and which weights of it (init_from_weights). Never compared either.
STARTED_FROM_READ = ("train.init_from_checkpoint", "train.init_from_weights")
# Recorded names that are not config fields, as a message names them.
LABELS = {"train.lr_decay_steps": "train.num_steps (where the learning-rate schedule ends)",
          "data.listing": "data.listing (a hash of the data's file names, and classes where it has them: files "
                          "added, removed or renamed, or moved to another class)",
          "data.num_classes": "data.num_classes (the class count of the data's labels: ids 0 to N - 1 train)"}
# The data fields every source reads, then those of each source: a field its source does not read
# is not compared (runs before 2026-11-29 recorded every field, and a resume that changed, say,
# tfds_name for a folder of images was refused). demo_num_classes: the demo's hue count, which
# redraws every image (and caption). expand_ratio is read by the random crop alone, not by center_crop.
DATA_FIELDS = ("source", "center_crop", "random_flip", "expand_ratio")
SOURCE_FIELDS = {"tfds": ("tfds_name", "split"), "folder": ("root", "missing_captions"), "array_record": ("root",),
                 "demo": ("demo_num_images", "demo_seed", "demo_num_classes")}


def resume_settings(config, num_records: int, listing: str | None = None, num_classes: int | None = None) -> dict:
    """num_classes: the data's class count where it knows one (folders, TFDS labels, the demo set),
    recorded for class-conditional models (the captioned demo set's is its colour count)."""
    values = {"seed": config.seed, "data.num_records": num_records, **({"data.listing": listing} if listing else {})}
    if num_classes is not None and not config.model.cross_attention_dim:
        values["data.num_classes"] = num_classes
    values.update({f"train.{name}": config.train[name] for name in TRAIN_FIELDS if name in config.train})
    data_fields = DATA_FIELDS + SOURCE_FIELDS.get(config.data.source, ())
    if config.data.get("center_crop"):  # it resizes to the resolution itself: expand_ratio is never read
        data_fields = tuple(name for name in data_fields if name != "expand_ratio")
    values.update({f"data.{name}": config.data[name] for name in data_fields if name in config.data})
    values.update({f"model.{name}": config.model[name] for name in MODEL_FIELDS if name in config.model})
    values.update({"run.devices": jax.device_count(), "run.platform": jax.default_backend(),
                   "run.matmul_precision": jax.config.jax_default_matmul_precision, "mesh.fsdp": config.mesh.fsdp,
                   "model.remat": config.model.remat,
                   "model.attention": resolve_backend(config.model.attention, config.model.dtype)})
    values = {key: spelled_once(key, value) for key, value in values.items()}
    if config.train.get("lr_schedule", "constant") != "constant":  # its rate depends on where it ends
        values["train.lr_decay_steps"] = config.train.num_steps
    return json.loads(json.dumps(values))  # as JSON gives them back (tuples as lists)


def spelled_once(key: str, value):
    """data.root as an absolute path without a trailing slash and its symbolic links resolved:
    `data/x`, `./data/x/`, `/home/me/data/x` and a link to it name one folder (a relative path as
    seen from where the run starts); run.matmul_precision under one of jax's two names for each
    precision ('float32' is 'highest'). Both sides of a comparison are spelled so, so an earlier
    version's record, as typed, compares too."""
    if key == "data.root" and value:
        return storage.resolved(value).rstrip("/")
    if key == "run.matmul_precision":
        return matmul_precision_named_once(value)
    return value


def recorded_settings(workdir: str) -> dict:
    """The settings a run recorded ({} for a workdir without them), as it recorded them; a file
    that is no JSON object (damaged, or edited by hand) is an error naming it and the fix."""
    path = storage.join(workdir, SETTINGS_FILE)
    if not storage.exists(path):
        return {}
    try:
        settings = storage.read_json(path)
        problem = None if isinstance(settings, dict) else f"a JSON {type(settings).__name__}, not an object"
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        problem = f"{type(e).__name__}: {e}"
    if problem:
        raise ValueError(f"{path} is damaged ({problem}): it records the settings this run trained with, for its "
                         "resumes to be checked against. Put back its earlier content, or delete it to have it "
                         "recorded again from this command (this resume then goes unchecked)")
    return settings


def note_init_from_at_resume(workdir: str, step: int, init_from: str, init_from_weights: str = "ema") -> None:
    """A resume does not read train.init_from. The same command rerun (after a preemption) is told
    so in passing; another init_from, or one given to a run that started without one, or other
    weights of the checkpoint it started from, is a warning: whoever typed it meant a new run from
    them, which needs a new --workdir."""
    recorded = recorded_settings(workdir)
    started_from, (checkpoint, weights) = recorded.get(STARTED_FROM), map(recorded.get, STARTED_FROM_READ)
    resumes = f"{workdir} resumes from its step {step}; train.init_from starts new runs only and is not read"
    if started_from and started_from == storage.resolved(init_from):
        if weights in (None, init_from_weights):  # (None: recorded before the weights were)
            logging.info(resumes)
        else:
            logging.warning("%s: this run started from the %s weights of %s, not from the %s weights of %s. To train "
                            "a new run from those, use a new --workdir", resumes, weights, checkpoint or started_from,
                            init_from_weights, init_from)
        return
    start = ("trained from scratch" if started_from == "" else f"started from {started_from}" if started_from
             else "did not record what it started from")
    logging.warning("%s: this run %s, not from %s. To train a new run from %s, use a new --workdir",
                    resumes, start, init_from, init_from)


def check_optimiser_state(workdir: str, config, step: int) -> None:
    """Before a checkpoint is restored: a run with a learning-rate schedule keeps an update count
    in its optimiser state and one without does not, so neither restores as the other (orbax
    would call every checkpoint unreadable). Not even allow_resume_changes can mend this."""
    path = storage.join(workdir, SETTINGS_FILE)
    if not step or not storage.exists(path):
        return
    previous = {**DEFAULTS, **recorded_settings(workdir)}
    t = config.train
    if counts_updates(previous["train.lr_schedule"], previous["train.warmup_steps"]) != counts_updates(
            t.lr_schedule, t.warmup_steps):
        raise ValueError(f"{workdir} was trained to step {step} with lr_schedule {previous['train.lr_schedule']!r} and "
                         f"warmup_steps {previous['train.warmup_steps']}, this config asks for {t.lr_schedule!r} and "
                         f"{t.warmup_steps}: a run with a learning rate schedule (lr_schedule 'cosine' or "
                         "warmup_steps > 0) keeps a step count in its optimiser state and one without does not, so "
                         "its checkpoints cannot resume the other way; train a new --workdir with "
                         f"--config.train.init_from={workdir} instead")


def who_wrote_a_run_without_settings(workdir: str) -> str:
    """Why a run at a step has no train_settings.json. A run_config.json without num_train_timesteps
    was written on 2026-11-26, before that file; that version drew the demo set (redrawn on 11-27)
    and its batches otherwise (measured: a tiny demo run resumed at step 4 trained other batches)."""
    path = storage.join(workdir, RUN_CONFIG)
    if storage.exists(path) and "num_train_timesteps" not in storage.read_json(path):
        return (": it was written by a version of 2026-11-26, before that file, which drew the demo data and the "
                "training batches otherwise, so the steps from here are not those it would have trained (the "
                "weights, optimiser state and EMA go on; to continue the run as it was, resume it with the version "
                "that wrote it, a checkout of 2026-11-26). And")
    return " (a run of a version before that file, or a copy that missed it):"


def check_resume(workdir: str, config, step: int, num_records: int, record: bool = True,
                 listing: str | None = None, num_classes: int | None = None, init_checkpoint: str = "",
                 init_weights: str | None = None, updates_done: int | None = None) -> None:
    """Records the settings of a new run (and the number of records its data has, the fingerprint
    of its file listing where it has files, and its class count where it has one); refuses or
    records a change when resuming at `step`. `record=False` only refuses (and writes nothing).
    `init_checkpoint`: the checkpoint a new run's weights were read from (CheckpointSource.label);
    `init_weights`: which of its sets (api.weights_chosen: None where the checkpoint holds one).
    `updates_done`: the optimiser updates the restored state applied (the step less its skipped
    steps; None before the restore: the step, the most it can be)."""
    path, current = storage.join(workdir, SETTINGS_FILE), resume_settings(config, num_records, listing, num_classes)
    if step == 0 or not storage.exists(path):  # a new run, or one started before this file existed
        if step and record:  # or a copy of the run without it: nothing to compare with
            logging.warning("%s resumes at step %d without its %s%s this command's settings cannot be checked "
                            "against those the run trained with; they are recorded as the run's from now on",
                            workdir, step, SETTINGS_FILE, who_wrote_a_run_without_settings(workdir))
        if record and jax.process_index() == 0:
            if step == 0:  # (a run that records its settings only at a resume cannot know its start)
                current[STARTED_FROM] = storage.resolved(config.train.init_from) if config.train.init_from else ""
                if config.train.init_from:
                    current.update(zip(STARTED_FROM_READ, (init_checkpoint, init_weights)))
                discard_changes_of_an_earlier_run(workdir)
            write_run_record(path, current)
        return
    trained, changes, untrained = settings_trained_to(workdir, step)
    previous = {key: spelled_once(key, value) for key, value in {**DEFAULTS, **trained}.items()}
    if previous.get("model.attention") == "auto":  # as runs before 2026-12-01 recorded it: the kernel it ran
        previous["model.attention"] = resolve_backend("auto", previous.get("model.dtype", config.model.dtype))
    every_change = {k: {"from": previous.get(k), "to": v} for k, v in current.items()
                    if previous.get(k) != v and (k in previous or k not in ADDED_LATER)}
    updates = step if updates_done is None else updates_done
    warmup_ended = warmup_change_keeps_the_rate(previous, current, updates)
    moved = data_moved(previous, current)
    changed = {k: c for k, c in every_change.items() if k not in NUMERICS_ONLY and not (k == WARMUP and warmup_ended)
               and not (k == DATA_ROOT and moved)}
    if untrained and record and jax.process_index() == 0:
        if not changed or config.train.allow_resume_changes:  # the resume goes on (a refusal writes nothing)
            for index in untrained:
                changes[index]["discarded"] = f"no step trained with it was kept: the run resumed at step {step}"
            write_changes(workdir, changes)
            write_run_record(path, trained)
            logging.warning("%s: the settings changes recorded at step %d and later trained no step that was saved; "
                            "they are marked discarded in %s", workdir, step, CHANGES_FILE)
    if not every_change:
        return
    listed = named_changes(changed, step)
    if changed and not config.train.allow_resume_changes:
        # The data's files are no setting a rerun can give back: only restoring them can.
        files = (" (and the data's files as they were)" if set(changed) & {"data.num_records", "data.listing"}
                 else "")
        raise ValueError(f"{workdir} was trained to step {step} with other settings ({listed}); resuming with them "
                         "would change the run (a batch size, seed or data change also loses exact resume). Rerun "
                         f"with the values in {path}{files}, or pass --config.train.allow_resume_changes=True to "
                         f"accept the change (recorded in {CHANGES_FILE})")
    if not record:
        return
    if changed:
        logging.warning("resuming %s at step %d with changed settings (allowed): %s", workdir, step, listed)
    if numerics := {k: c for k, c in every_change.items() if k in NUMERICS_ONLY}:
        logging.warning("resuming %s at step %d on other devices or with another memory or precision setting (%s): "
                        "the steps compute in another order or precision, so the run agrees with an uninterrupted "
                        "one to float rounding, not bit for bit (recorded in %s)", workdir, step,
                        named_changes(numerics), CHANGES_FILE)
    if moved and DATA_ROOT in every_change:
        root = every_change[DATA_ROOT]
        logging.warning("resuming %s at step %d with its data at another path (%s: %r -> %r): the same file names, in "
                        "the same classes, so the same data order and labels; the files' contents are not compared (a "
                        "resized copy lists the same names) (recorded in %s)", workdir, step, DATA_ROOT, root["from"],
                        root["to"], CHANGES_FILE)
    if warmup_ended and WARMUP in every_change:
        warmup = every_change[WARMUP]
        logging.warning("resuming %s at step %d with %s: %r -> %r: both warmups end by update %d, where this resume "
                        "goes on, so no remaining step's learning rate changes (recorded in %s)", workdir, step,
                        WARMUP, warmup["from"], warmup["to"], updates, CHANGES_FILE)
    if jax.process_index() == 0:
        kept = {key: trained[key] for key in (STARTED_FROM, *STARTED_FROM_READ) if key in trained}
        # Settings this command no longer reads (a demo's, once the data is a folder) leave the record:
        # kept with the change, for settings_trained_to to give them back where it undoes the change.
        dropped = {key: value for key, value in trained.items() if key not in current and key not in kept}
        change = {"step": step, "changes": every_change, **({"dropped": dropped} if dropped else {})}
        write_changes(workdir, [*changes, change])
        write_run_record(path, {**current, **kept})


def warmup_change_keeps_the_rate(previous: dict, current: dict, updates_done: int) -> bool:
    """Whether a resume that goes on from update `updates_done` with another warmup_steps gives every
    remaining update the rate it had: a constant rate's warmup (optax.linear_schedule) reaches
    train.lr at update warmup_steps and stays there, so yes once both warmups ended. A cosine rate
    decays over the updates after its warmup, so every rate moves; and a warmup of 0 has no update
    count in its optimiser state (check_optimiser_state)."""
    old, new = previous.get(WARMUP), current.get(WARMUP)
    constant = previous.get("train.lr_schedule") == current.get("train.lr_schedule") == "constant"
    counted = all(isinstance(w, int) and w > 0 for w in (old, new))
    return constant and counted and updates_done >= max(old, new)


def data_moved(previous: dict, current: dict) -> bool:
    """Whether the data is the same files as the run recorded, wherever they now are: its listing (file
    names relative to the root, and classes) and record count decide the data order and the labels,
    and both are unchanged (a copy on a cluster node's local disk, a moved folder)."""
    return (previous.get("data.listing") is not None and previous.get("data.listing") == current.get("data.listing")
            and previous.get("data.num_records") == current.get("data.num_records"))


def discard_changes_of_an_earlier_run(workdir: str) -> None:
    """A new run in a workdir whose checkpoints were deleted (`rm -r checkpoints/` to start a
    fine-tune again): the changes recorded by the run before trained no step that is kept. Marked
    discarded, as at a resume before them, they stay as its history and are never undone on the
    new run's own settings (which its first resume then refused as a change)."""
    try:
        changes = read_changes(workdir)
    except ValueError as e:  # damaged: kept aside, as no step it describes is kept
        aside = storage.join(workdir, f"{CHANGES_FILE}.earlier-run-{int(time.time())}")
        storage.move(storage.join(workdir, CHANGES_FILE), aside)
        logging.warning("%s (moved to %s: a new run starts in this workdir)", e, aside)
        return
    if any(not c.get("discarded") for c in changes):
        for change in changes:
            change.setdefault("discarded", "no step trained with it was kept: a new run started in this workdir")
        write_changes(workdir, changes)
        logging.warning("%s: the settings changes %s recorded for an earlier run whose checkpoints are gone are "
                        "marked discarded", workdir, CHANGES_FILE)


SEED_EFFECT = (" (the data order, crops and flips follow the new seed; the noise, timestep and dropout draws go on "
               "from the key restored with the checkpoint, made from the seed the run started with)")


def named_changes(changes: dict, step: int = 0) -> str:
    """'SETTING: FROM -> TO, ...', as messages name changes (at a resume at `step`)."""
    return ", ".join(f"{LABELS.get(k, k)}: {c['from']!r} -> {c['to']!r}{effect(k, c, step)}"
                     for k, c in changes.items())


WARMUP_EFFECT = (" (the learning rate of the remaining steps would change: a constant rate's warmup may change once "
                 "the old and the new one have both ended, a cosine rate's never, as its decay starts where the warmup "
                 "ends)")


def grad_accum_effect(change: dict) -> str:
    return (" (each step averages the same images, in the same data order, but draws its noise, timesteps, stages and "
            "dropout per micro-batch, each from its own key: every remaining step trains on other draws than the run "
            f"would; for exact resume keep --config.train.grad_accum_steps={change['from']}, and save memory with "
            "model.remat or mesh.fsdp, which change float rounding only)")


def effect(key: str, change: dict, step: int) -> str:
    """What a change does where its name does not say: a seed's, a warmup's, grad_accum_steps', and
    a batch size's on the data position (the step, counted in batches of the command's size)."""
    if key == "seed":
        return SEED_EFFECT
    if key == WARMUP:
        return WARMUP_EFFECT
    if key == "train.grad_accum_steps":
        return grad_accum_effect(change)
    if key != "train.batch_size" or not all(isinstance(change[side], int) for side in ("from", "to")):
        return ""
    was, now = step * change["from"], step * change["to"]
    gap = f"{abs(now - was)} images {'skipped' if now > was else 'read again'}"
    return f" (the data goes on from image {now} of its order, where the run was at image {was}: {gap})"


def read_changes(workdir: str) -> list[dict]:
    path = storage.join(workdir, CHANGES_FILE)
    if not storage.exists(path):
        return []
    try:
        changes = storage.read_json_lines(path)
        if not all(isinstance(c, dict) and isinstance(c.get("step"), int) and isinstance(c.get("changes"), dict)
                   for c in changes):
            raise ValueError("a line is not a change record ({'step': N, 'changes': {...}})")
    except ValueError as e:
        raise ValueError(f"{path} is damaged ({type(e).__name__}: {e}): it records the settings changes of this "
                         "run. Put back its earlier content") from None
    return changes


def write_changes(workdir: str, changes: list[dict]) -> None:
    path = storage.join(workdir, CHANGES_FILE)
    with storage.writing(path, WRITE_RERUN):
        storage.write_atomically(path, "".join(json.dumps(c) + "\n" for c in changes))


def settings_trained_to(workdir: str, step: int) -> tuple[dict, list[dict], list[int]]:
    """(the recorded settings that trained the steps up to `step`, the recorded changes, the
    indexes of those that trained none of them). A change recorded when a run resumed at step S
    trains steps S+1 on: resumed at S or earlier again (the run was stopped before it saved a step,
    or a later checkpoint was set aside), none of its steps is kept, and the settings before it
    are those to compare with (a resume with them was refused as a change)."""
    settings, changes = dict(recorded_settings(workdir)), read_changes(workdir)
    untrained = [i for i, c in enumerate(changes) if c["step"] >= step and not c.get("discarded")]
    for index in reversed(untrained):
        for key, change in changes[index]["changes"].items():
            if change.get("from") is None:
                settings.pop(key, None)
            else:
                settings[key] = change["from"]
        settings.update(changes[index].get("dropped", {}))
    return settings, changes, untrained
