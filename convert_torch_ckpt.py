r"""Converts PixelFlow checkpoints between the PyTorch release and pixelflow-jax.

PyTorch -> JAX (a release folder, a bare state dict, or a train.py checkpoint):
  python convert_torch_ckpt.py --torch_checkpoint=PixelFlow-XL-c2i/ --output=checkpoints/pixelflow_xl_c2i
  python convert_torch_ckpt.py --torch_checkpoint=hf://ShoufaChen/PixelFlow-Class2Image --output=checkpoints/xl_c2i
  python convert_torch_ckpt.py --torch_checkpoint=model.pt --torch_config=config.yaml --output=DIR
  python convert_torch_ckpt.py --torch_checkpoint=model_100000.pt --weights=ema --attention_head_dim=72 \
      --output=DIR

JAX -> PyTorch (config.yaml + model.pt that the release loads with strict=True):
  python convert_torch_ckpt.py --to_torch --jax_checkpoint=DIR --output=torch_folder
  python convert_torch_ckpt.py --to_torch --jax_checkpoint=runs/demo --output=demo_torch   # a run's EMA
  python convert_torch_ckpt.py --to_torch --jax_checkpoint=runs/demo/checkpoints/5000 --weights=model \
      --output=demo_5000_raw

The output is written to a temporary folder and renamed when complete; an existing output (other
than an empty folder) is refused unless --overwrite, which replaces only an earlier output of this tool, and never the
input (an output that overlaps the input is refused). Any mismatch between weights and architecture stops the conversion
and names every missing, unexpected and mis-shaped key.
"""

from __future__ import annotations

import errno
import os
import sys

from pixelflow_jax.command_line import (exit_without_a_home_folder, hold_ctrl_c_while_starting,
                                        stop_on_scheduler_signals)

if __name__ == "__main__":  # a Ctrl-C during the imports below is raised once this tool handles it
    hold_ctrl_c_while_starting()
    stop_on_scheduler_signals()  # SLURM's --signal=USR1@120: a SIGTERM, not Python's silent exit
    exit_without_a_home_folder()  # before the imports below, some of which need it

from absl import app, flags, logging

from pixelflow_jax.command_line import (Terminated, exit_without_teardown, handle_ctrl_c_from_the_start,
                                        raise_dropped_ctrl_c, raise_dropped_stops, stop_behind, stop_cause,
                                        stop_on_sigterm, usage_error)

flags.DEFINE_string("torch_checkpoint", None, "Release folder (config.yaml + model.pt; also hf://OWNER/NAME"
                    "[@REVISION][/SUBFOLDER]), state-dict .pt, or train.py checkpoint to convert to JAX.")
flags.DEFINE_string("output", None, "Folder to create.")
flags.DEFINE_string("torch_config", None, "Release config.yaml describing a bare state dict "
                    "(default: the config.yaml of the release folder, or beside a model.pt or a train.py checkpoint "
                    "named alone; else inferred from tensor shapes).")
flags.DEFINE_enum("weights", "ema", ["ema", "model"], "Which weights of a training run (--jax_checkpoint) or "
                  "of the release's train.py checkpoint to convert: the EMA or the raw model.")
flags.DEFINE_integer("attention_head_dim", None, "Head width, needed when the architecture is inferred from "
                     "shapes (72 in the released models).")
flags.DEFINE_integer("resolution", None, "Final image resolution, where no config.yaml gives it (default: the "
                     "release's 256, or 1024 for a text model).")
flags.DEFINE_integer("num_stages", None, "Number of cascade stages, where no config.yaml gives it (default 4).")
flags.DEFINE_integer("num_train_timesteps", None, "Scheduler timesteps, where no config.yaml gives it "
                     "(default 1000).")
flags.DEFINE_bool("to_torch", False, "Convert a JAX checkpoint (--jax_checkpoint) back to a release folder.")
flags.DEFINE_string("jax_checkpoint", None, "What to export with --to_torch: a training run (its latest complete "
                    "step) or RUN/checkpoints/STEP, a converted folder, a release folder, or an hf:// Hub path. "
                    "A text model's T5 encoder is not part of the export (the release loads its own; a run's "
                    "own encoder is named when the export is written).")
flags.DEFINE_bool("overwrite", False, "Replace an earlier conversion or export at --output (only once the new one "
                  "is complete); any other folder, and the input, are never replaced.")

FLAGS = flags.FLAGS
# What only the PyTorch -> JAX direction reads (an export takes its architecture from the checkpoint).
TORCH_TO_JAX_FLAGS = ("torch_config", "attention_head_dim", "resolution", "num_stages", "num_train_timesteps")


def tensor_progress(label: str):
    """A converter progress callback (tensors done, total) shown on stderr."""
    from pixelflow_jax.progress import Progress

    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = Progress(total, label, "tensors", log_every_s=5,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
        bar.update(done - bar.done)
        if done >= total:
            bar.close()

    return report


# Endings of files, never of folders: an --output so named (the release's model.pt, say) was taken
# as the folder to create, and the release's code loading OUT/model.pt met a folder.
FILE_ENDINGS = (".pt", ".pth", ".bin", ".safetensors", ".yaml", ".yml", ".json")


def check_output_names_a_folder(output: str, to_torch: bool) -> None:
    """--output is the folder to create: one named like a file is refused, naming the folder to give."""
    from pixelflow_jax import storage
    from pixelflow_jax.checkpoints.checkpoint import CONFIG_FILE, PARAMS_DIR, CheckpointError

    name = storage.basename(output.rstrip("/"))
    ending = next((ending for ending in FILE_ENDINGS if name.lower().endswith(ending)), None)
    if ending is None or name.lower() == ending:
        return
    holds = "config.yaml + model.pt, as the release's code loads them" if to_torch else f"{CONFIG_FILE} + {PARAMS_DIR}/"
    parent = storage.dirname(output.rstrip("/"))
    if name in ("model.pt", "config.yaml") and to_torch and parent:  # the file itself named: its folder was meant
        instead = f"--output={parent} (which then holds {storage.join(parent, 'model.pt')})"
    else:
        instead = f"--output={output.rstrip('/')[:-len(ending)]}"
    raise CheckpointError(f"--output {output} is named like a file ({ending}), but the output is a folder holding "
                          f"{holds}: name the folder to create, e.g. {instead}")


def check_output(output: str, source: str, to_torch: bool, overwrite: bool) -> None:
    """The output never touches the input, and --overwrite replaces only an earlier output of
    this tool holding nothing else: a converted folder (pixelflow_config.json + params/) or an
    export (config.yaml marked as ours + model.pt)."""
    from pixelflow_jax import storage
    from pixelflow_jax.checkpoints.checkpoint import CONFIG_FILE, PARAMS_DIR, CheckpointError, no_overwrite_in_a_bucket
    from pixelflow_jax.checkpoints.run_checkpoint import check_outside_checkpoints
    from pixelflow_jax.checkpoints.torch_io import is_export

    check_output_names_a_folder(output, to_torch)
    out, src = storage.resolved(output), storage.resolved(source)
    if not source.startswith("hf://"):
        if storage.basename(src) == "model.pt" and storage.isfile(storage.join(storage.dirname(src), "config.yaml")):
            src = storage.dirname(src)  # a release folder's model.pt named alone: the folder is the input
        if out == src or storage.is_inside(out, src) or storage.is_inside(src, out):
            where = ("is the input" if out == src else "holds the input" if storage.is_inside(src, out) else
                     "is inside the input")  # a folder added to a release folder or a run changes what it holds
            raise CheckpointError(f"--output {output} overlaps the input {source} (it {where}): the input is left as "
                                  "it is; choose a folder that neither holds nor is inside it")
    if not storage.is_url(output):
        # The new folder is renamed over it: the shell is left in a deleted one.
        if out == os.path.realpath(os.getcwd()):
            raise CheckpointError(f"--output {output} is the folder this command runs in, which the new folder would "
                                  "replace (this shell would be left in a deleted folder, showing nothing): name a "
                                  "folder inside it (--output=./converted) or one elsewhere")
        try:
            os.path.realpath(output, strict=True)
        except OSError as e:  # not there yet, or under a file: the checks below name those
            if e.errno == errno.ELOOP:  # found only at the last rename, after the conversion
                raise CheckpointError(f"--output {output} cannot be followed ({e.strerror}: symbolic links that lead "
                                      "to each other); remove them or choose another path") from None
    check_outside_checkpoints(out, "--output")
    if not storage.exists(output) or (storage.isdir(output) and not storage.listdir(output)):  # an empty folder
        # before the conversion, not after it; the input is only read, so only --output need change
        storage.check_writable(storage.dirname(out), fix="choose an --output in a folder this user can write to")
        return
    if not overwrite:
        raise CheckpointError(f"output {output} already exists; choose another path or pass --overwrite")
    if storage.is_url(output):  # (atomic_output_dir refuses it too, but only after the conversion)
        raise no_overwrite_in_a_bucket(output)
    names = set(storage.listdir(output)) if storage.isdir(output) else set()
    if to_torch:
        earlier = names == {"config.yaml", "model.pt"} and is_export(output)
        kind = "an earlier export (config.yaml + model.pt, the config.yaml written by this tool)"
    else:
        earlier = names == {CONFIG_FILE, PARAMS_DIR}
        kind = f"an earlier conversion ({CONFIG_FILE} + {PARAMS_DIR}/)"
    if not earlier:
        raise CheckpointError(f"--overwrite replaces only {kind} holding nothing else, and {output} is not one: "
                              "choose another path")


def torch_to_jax() -> str:
    from pixelflow_jax.checkpoints.checkpoint import save_checkpoint
    from pixelflow_jax.checkpoints.convert import torch_to_params
    from pixelflow_jax import storage
    from pixelflow_jax.checkpoints.torch_io import export_note, read_release_weights

    overrides = {"resolution": FLAGS.resolution, "num_stages": FLAGS.num_stages,
                 "num_train_timesteps": FLAGS.num_train_timesteps}
    from pixelflow_jax.checkpoints import hub

    path = FLAGS.torch_checkpoint
    if hub.is_hub_path(path):
        path, pinned = hub.checkpoint_folder(path)
        hub.download_weights(pinned)
    release = read_release_weights(path, torch_config=FLAGS.torch_config, weights=FLAGS.weights,
                                   attention_head_dim=FLAGS.attention_head_dim, overrides=overrides)
    config, state_dict = release.config, release.state_dict
    params = torch_to_params(state_dict, config.model, progress=tensor_progress("converting"))
    raise_dropped_stops()  # asked to stop meanwhile: nothing is written
    # An export of a training run says which of its weights it holds: kept through the round trip;
    # of a train.py checkpoint's two sets, the one converted is recorded and said.
    note = export_note(path if storage.isdir(path) else storage.dirname(path)) or release.note
    save_checkpoint(FLAGS.output, params, config, overwrite=FLAGS.overwrite, weights_note=note)
    count = sum(v.size for v in state_dict.values())
    return (f"wrote {FLAGS.output}: {len(state_dict)} tensors, {count / 1e6:.1f}M parameters, "
            f"architecture {config.model.architecture()}, resolution {config.resolution}, {config.num_stages} stages"
            + (f"; {release.note}" if release.note else ""))


def jax_to_torch() -> str:
    from pixelflow_jax.api import (checkpoint_config, read_checkpoint, read_through_rotation, resolve_checkpoint,
                                   weights_note, weights_of)
    from pixelflow_jax.checkpoints.convert import check_exportable, params_to_torch
    from pixelflow_jax.checkpoints.torch_io import write_release_checkpoint

    source = resolve_checkpoint(FLAGS.jax_checkpoint)
    check_exportable(checkpoint_config(source).model)  # refused before gigabytes of weights are read
    # The export names the step read: a run named here may have rotated the step chosen away.
    config, params, source = read_through_rotation(source, lambda source: (*read_checkpoint(source, FLAGS.weights),
                                                                           source))
    state_dict = params_to_torch(params, config.model)
    raise_dropped_stops()  # asked to stop meanwhile: nothing is written
    write_release_checkpoint(FLAGS.output, state_dict, config, overwrite=FLAGS.overwrite,
                             weights_from=run_weights_exported(source, FLAGS.weights) or weights_note(source))
    return (f"wrote {FLAGS.output}: config.yaml + model.pt with {len(state_dict)} tensors from "
            f"{weights_of(source, FLAGS.weights)}"
            f"{text_encoder_note(source, config.model)}{text_training_note(config)}")


def run_weights_exported(source, weights: str) -> str | None:
    """Which of a training run's two sets of weights, and of which step, the export holds, for its
    config.yaml: the folder handed on said neither (raw weights exported for the EMA went unseen).
    The run by its folder's name alone: the file is shipped, the path is this machine's."""
    from pixelflow_jax import storage

    if not source.run_step:
        return None  # a converted or release folder holds one set of weights, and no step
    which = "the EMA (--weights=ema)" if weights == "ema" else "the raw weights, not their EMA (--weights=model),"
    return (f"weights: {which} of step {source.run_step.step} of the training run in the folder "
            f"{storage.basename(storage.resolved(source.run_step.run).rstrip('/'))}")


def text_training_note(config) -> str:
    """How the run encoded its captions, as the export's config.yaml records it and sampling it
    here reads it (the release's own code reads neither), as words to add; else ''."""
    if not config.text_training():
        return ""
    tokens, dtype = config.max_text_tokens or 512, config.text_encoder_dtype or "float32"  # the release's
    return (f"; its config.yaml records train.max_text_tokens {tokens} and text_encoder_dtype {dtype}, so sampling "
            f"it here has prompts cut at {tokens} tokens and encoded with {dtype} T5 weights, as in training")


def text_encoder_note(source, model) -> str:
    """For a text model, the T5 that the export leaves out and its prompts need: a run's own (the
    captioned demo builds one with random weights inside the run, which no other encoder can
    replace, so the export alone is useless once the run is deleted), as words to add; else ''."""
    from pixelflow_jax import storage
    from pixelflow_jax.checkpoints.run_checkpoint import encoder_folder_of, read_run_config

    if not model.cross_attention_dim:
        return ""
    recorded = read_run_config(source.run_step.run).get("text_encoder") if source.run_step else None
    if not recorded:
        return ("; the export holds no T5 text encoder: sample it with the one it was trained with "
                "(--config.sample.text_encoder)")
    folder = encoder_folder_of(source.run_step.run, recorded["path"])
    keep = (" (inside the run: keep that folder, or copy it beside the export)"
            if storage.is_inside(folder, source.run_step.run) else "")
    return (f"; the export holds no T5 text encoder: sample it with --config.sample.text_encoder={folder}, the one "
            f"the run trained with{keep}")


def main(argv):
    if len(argv) > 1:
        usage_error(f"unexpected arguments {argv[1:]}")
    if not FLAGS.output:
        usage_error("--output is required")
    if FLAGS.jax_checkpoint and not FLAGS.to_torch and not FLAGS.torch_checkpoint:
        usage_error("--jax_checkpoint is read by an export to PyTorch: add --to_torch")
    if FLAGS.to_torch == bool(FLAGS.torch_checkpoint) or (FLAGS.to_torch and not FLAGS.jax_checkpoint):
        usage_error("give either --torch_checkpoint (PyTorch -> JAX) or --to_torch --jax_checkpoint "
                    "(JAX -> PyTorch)")
    # A flag of the other direction would be silently ignored: the output would not be what was asked.
    other_direction = TORCH_TO_JAX_FLAGS if FLAGS.to_torch else ("jax_checkpoint",)
    ignored = [f"--{name}" for name in other_direction if FLAGS[name].present]
    if ignored:
        direction = "--to_torch exports a JAX checkpoint as it is" if FLAGS.to_torch else \
            "--torch_checkpoint converts PyTorch to JAX"
        usage_error(f"{', '.join(ignored)} has no effect here: {direction}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every step of a save at INFO
    from pixelflow_jax.cli.platforms import platform_error

    if platform_message := platform_error():  # before any file is read or written
        sys.exit(f"error: {platform_message}")
    from pixelflow_jax import storage
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.checkpoints.convert import ConversionError
    from pixelflow_jax.progress import say
    from pixelflow_jax.validation import user_path

    try:  # from the handler on: a SIGTERM the moment after it is in place is handled below too
        stop_on_sigterm()  # the output's temporary folder is removed, as on Ctrl-C
        raise_dropped_ctrl_c()  # received while importing, inside jax's gc callback, which dropped it
        for flag in ("output", "torch_checkpoint", "torch_config", "jax_checkpoint"):
            if FLAGS[flag].value:  # hf:// inputs are read (hub.py); nothing is written there
                FLAGS[flag].value = user_path(f"--{flag}", FLAGS[flag].value, hub_allowed=flag != "output")
        source = FLAGS.torch_checkpoint or FLAGS.jax_checkpoint
        # check_output makes the folders above --output (its write check): a failed conversion removes them
        with storage.removed_if_left_empty(storage.dirname(storage.resolved(FLAGS.output))):
            check_output(FLAGS.output, source, FLAGS.to_torch, FLAGS.overwrite)
            message = jax_to_torch() if FLAGS.to_torch else torch_to_jax()
    except (CheckpointError, ConversionError, storage.StorageError) as e:
        exit_without_teardown(f"error: {e}", 1)
    except (KeyboardInterrupt, Terminated, Exception) as error:
        if (stop := stop_behind(error)) is None:
            raise  # a bug: its traceback
        cause, status = stop_cause(stop)
        exit_without_teardown(f"stopped: {cause}; nothing was written to {FLAGS.output} (its partial copy is "
                              "removed)", status)
    say(message)


if __name__ == "__main__":
    try:
        handle_ctrl_c_from_the_start("jax")  # and a Ctrl-C pressed while the imports above ran
        app.run(main)
    # Before main's own handling (the imports take seconds): a Ctrl-C or SIGTERM, or a Ctrl-C an import
    # reworded (jaxlib's: an ImportError); any other error is a bug, with its traceback.
    except (KeyboardInterrupt, Terminated, Exception) as error:
        if (stop := stop_behind(error)) is None:
            raise
        cause, status = stop_cause(stop)
        exit_without_teardown(f"stopped: {cause}; nothing was written", status)
