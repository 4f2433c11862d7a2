r"""pixelflow-jax entry point (flax/examples style).

    python main.py --config=configs/c2i.py:demo --workdir=runs/demo          # train (the default mode)
    python main.py --config=configs/c2i.py:demo --workdir=runs/demo --mode=sample   # sample that run
    python main.py --config=configs/c2i.py --workdir=runs/fid --mode=sample \
        --config.sample.checkpoint=checkpoints/pixelflow_xl_c2i
    python main.py --config=configs/c2i.py:tiny --workdir=runs/tiny --mode=inspect
    python main.py --config=configs/c2i.py --workdir=runs/fid --mode=eval \
        --config.eval.samples=runs/fid/samples.npz --config.eval.reference=VIRTUAL_imagenet256_labeled.npz \
        --config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth

A checkpoint (config.sample.checkpoint, config.train.init_from) is a training run or one of its
steps, a converted or release folder, or hf://OWNER/NAME[@REVISION][/SUBFOLDER]; in sample, demo and
inspect modes an empty config.sample.checkpoint means the workdir's own training run.

Settings live in the config file and can be overridden with --config.<field>=<value>:
    python main.py --config=configs/c2i.py:demo --workdir=runs/demo --config.train.num_steps=10000
    python main.py --config=configs/c2i.py --workdir=runs/demo_page --mode=demo \
        --config.sample.checkpoint=checkpoints/pixelflow_xl_c2i            # http://127.0.0.1:7860

Modes: train, sample, inspect, eval, demo.
"""

import errno
import os
import sys
import traceback

from pixelflow_jax.command_line import (exit_without_a_home_folder, hold_ctrl_c_while_starting,
                                        stop_on_scheduler_signals)

if __name__ == "__main__":  # a Ctrl-C during the imports below is raised once this tool handles it
    hold_ctrl_c_while_starting()
    stop_on_scheduler_signals()  # SLURM's --signal=USR1@120: a SIGTERM, not Python's silent exit
    exit_without_a_home_folder()  # before the imports below, some of which need it

from absl import app, flags, logging
from ml_collections import config_flags

from pixelflow_jax.command_line import (Terminated, handle_ctrl_c_from_the_start, keep_library_info_out_of_the_log,
                                        raise_dropped_ctrl_c, stop_behind, stop_cause, stop_on_hang_up,
                                        stop_on_sigterm, stop_received, usage_error)
from pixelflow_jax.cli.compilation_cache import keep_compiled_programs
from pixelflow_jax.cli.config_file import (WHAT_A_CONFIG_FILE_IS, check_config_fields, check_config_file,
                                       check_flag_files, config_code_error, config_file_given, config_loading_error,
                                       flag_error_message, frozen_config_error, hide_none_config_warning,
                                       import_beside_config_files,
                                       unknown_field_message, unloaded_config_error)
from pixelflow_jax.cli.config_overrides import joined_strings_error, warn_of_overrides_without_effect
from pixelflow_jax.cli.job_exit import StoppedTogether, another_process_gone, exit_now_after_an_error


if __name__ == "__main__":
    check_flag_files(sys.argv)

config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/c2i.py or configs/c2i.py:tiny.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Folder for this run's outputs.")
flags.DEFINE_enum("mode", "train", ["train", "sample", "inspect", "eval", "demo"], "What to run.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first: for runs on several hosts "
                  "(auto-detected on Cloud TPU pods and SLURM/Open MPI clusters).")
flags.DEFINE_string("coordinator_address", None, "With --distributed where jax cannot detect the cluster: "
                    "host:port of process 0 (and --num_processes, --process_id).")
flags.DEFINE_integer("num_processes", None, "With --distributed: how many processes take part.")
flags.DEFINE_integer("process_id", None, "With --distributed: this process's index, 0..num_processes-1.")
flags.DEFINE_enum("compilation_cache", "auto", ["auto", "on", "off"],
                  "Keep the XLA programs a job of one process compiles for the next (a resume, a sampling job: "
                  "minutes on XL) in $PIXELFLOW_CACHE_DIR/xla (else $XDG_CACHE_HOME or ~/.cache, "
                  "pixelflow_jax/xla). auto: on GPUs and TPUs; on: on CPUs too. jax's JAX_COMPILATION_CACHE_DIR "
                  "wins, and --distributed jobs use only that.")
flags.mark_flags_as_required(["config", "workdir"])

FLAGS = flags.FLAGS


def parse_flags(argv: list[str]) -> list[str]:
    check_config_file(argv)
    import_beside_config_files(argv)
    hide_none_config_warning()
    try:
        parsed = FLAGS(argv)
    except flags.Error as e:
        if message := config_loading_error(argv, e):
            sys.exit(f"error: {message}")
        usage_error(flag_error_message(e))
    except (KeyError, AttributeError, TypeError) as e:  # ml_collections' errors for an override of a missing field
        sys.exit(f"error: {frozen_config_error(argv, e) or unknown_field_message(argv, e)}")
    except SyntaxError as e:  # raised while ml_collections imports the config file
        sys.exit(f"error: {config_file_given(argv)} is not a Python file of settings (line {e.lineno}: {e.msg}); "
                 f"{WHAT_A_CONFIG_FILE_IS}")
    except ImportError as e:
        sys.exit(f"error: {config_file_given(argv)} could not be read: {e}")
    except Exception as e:  # raised by the config file's code: one line, with its line; anything else is a bug
        if (message := config_code_error(argv, e)) is None:
            raise
        sys.exit(f"error: {message}")
    if message := unloaded_config_error(argv, FLAGS["config"].value):
        sys.exit(f"error: {message}")
    return parsed


def main(argv):
    try:
        run_mode(argv)
    except Exception as e:  # jax's error type for it has moved between versions: matched by its status
        from pixelflow_jax.error_text import first_line, open_files_fix

        if (open_files := too_many_open_files(e)) is not None:
            sys.exit(f"error: --mode={FLAGS.mode} reached this process's limit of open files ({open_files}): "
                     f"{open_files_fix()}")
        cause = first_line(e)
        memory = isinstance(e, MemoryError) or "RESOURCE_EXHAUSTED" in cause or "Out of memory" in cause
        if not memory or "No space left" in cause or "quota" in cause.lower():  # disks say it too
            raise
        sys.exit(f"error: --mode={FLAGS.mode} ran out of memory ({cause[:200]}): "
                 f"{out_of_memory_fix(FLAGS.mode, FLAGS.config)}")


def run_mode(argv):
    check_arguments(argv)
    logging.set_verbosity(logging.INFO)
    keep_library_info_out_of_the_log()
    command, checkpoint_inspected = check_job()
    warn_of_overrides_without_effect(sys.argv, FLAGS.mode, checkpoint_inspected, FLAGS.config.sample.solver,
                                     evaluates=bool(FLAGS.config.eval.reference))
    start_job(command)
    MODES[FLAGS.mode]()


def check_arguments(argv):
    """What absl leaves to us: stray words (a mode written without --mode=) and the cluster flags
    given without --distributed."""
    if len(argv) > 1:
        modes = [a for a in argv[1:] if a in flags.FLAGS["mode"].parser.enum_values]
        usage_error(f"unexpected arguments {argv[1:]}" + (f" (a mode is a flag: --mode={modes[0]})" if modes else ""))
    if not FLAGS.distributed and any(v is not None for v in (FLAGS.coordinator_address, FLAGS.num_processes,
                                                              FLAGS.process_id)):
        sys.exit("error: --coordinator_address, --num_processes and --process_id apply with --distributed: add it "
                 "(without it every process would run the whole job alone)")


def check_job() -> tuple[dict | None, bool]:
    """Every setting and path, before any work: the command as given (for --distributed's
    check_same_job, else None) and whether --mode=inspect reads a checkpoint."""
    from pixelflow_jax import multihost, storage, validation
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    raise_dropped_ctrl_c()  # received while importing, inside jax's gc callback, which dropped it
    try:
        command = None
        if FLAGS.distributed:  # the command as given (before `~` is expanded), for check_same_job
            command = multihost.job_fields(FLAGS.mode, FLAGS.workdir, FLAGS.config)
        FLAGS.workdir = validation.job_workdir(FLAGS.workdir, "--workdir")
        check_config_fields(FLAGS.config, config_file_given(sys.argv))
        if joined := joined_strings_error(sys.argv, FLAGS.config):
            raise validation.ConfigError(joined)
        validation.check(FLAGS.config, FLAGS.mode)  # every value, before any work
        checkpoint_inspected = False
        if FLAGS.mode == "inspect":
            from pixelflow_jax.inspect_model import inspects_checkpoint

            checkpoint_inspected = inspects_checkpoint(FLAGS.config, FLAGS.workdir)
    except (storage.StorageError, validation.ConfigError, CheckpointError) as e:
        sys.exit(f"error: {e}")
    return command, checkpoint_inspected


def start_job(command: dict | None):
    """Joins the other processes (--distributed) or keeps compiled programs, and checks the attention
    kernel, all before any file is written."""
    from pixelflow_jax import host_memory, multihost, software_versions, storage
    from pixelflow_jax.cli.platforms import platform_error

    if not FLAGS.distributed and (message := platform_error()):  # a --distributed job's are checked as it joins
        sys.exit(f"error: {message}")
    if not FLAGS.distributed and (lone_task := multihost.lone_task_of_srun()):
        logging.warning("%s", lone_task)
    if FLAGS.distributed:
        try:
            multihost.start_distributed(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
            multihost.check_same_job(command)
            multihost.check_same_software(software_versions.version_fields())
            multihost.check_same_matmul_precision()
        except ValueError as e:
            sys.exit(f"error: {e}")
    elif FLAGS.compilation_cache != "off":
        keep_compiled_programs(on_cpu=FLAGS.compilation_cache == "on")
    if problem := storage.temporaries.temporary_folder_problem():  # Python's own fallback is silent
        logging.warning("%s", problem)
    host_memory.reuse_freed_buffers_on_cpu()  # 20-30% faster CPU steps (host_memory.py)
    if FLAGS.mode != "eval":  # an attention kernel this platform cannot run: known before any file is written
        from pixelflow_jax.kernels.attention import resolve_backend

        try:
            resolve_backend(FLAGS.config.model.attention, FLAGS.config.model.dtype)
        except ValueError as e:
            sys.exit(f"error: --config.model.attention: {e}")


def train_mode():
    from pixelflow_jax import storage
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.data.sources import DataError
    from pixelflow_jax.training import train
    from pixelflow_jax.training.workdir_lock import WorkdirBusy

    try:  # from the handler on: a SIGTERM the moment after it is in place is handled below too
        if not FLAGS.distributed:  # until the training loop takes SIGTERM over (PreemptionWatch): while the
            stop_on_sigterm()      # run restores its checkpoint and builds its data, a SIGTERM stops it
                                   # cleanly, its lock released
        stop_on_hang_up(FLAGS.distributed)  # a SIGHUP too (129); with several processes, as a preemption
        train.train(FLAGS.config, FLAGS.workdir)
    except train.TrainingPreempted as e:
        print(f"stopped: {e}", file=sys.stderr)
        raise StoppedTogether(e.exit_status) from None
    except (CheckpointError, DataError, ValueError, storage.StorageError, train.TrainingStopped,
            WorkdirBusy) as e:
        fail(e)
    except (KeyboardInterrupt, Terminated, Exception) as error:  # while starting (restore, compile), a second Ctrl-C
        # A library may reword the stop (a SIGTERM during the compile); an error that is no stop is a bug.
        if (stop := stop_behind(error)) is None:
            raise
        cause, status = stop_cause(stop)
        # No "without saving": a second Ctrl-C during a save may come after orbax finished it.
        print(f"stopped: {cause}; {what_a_rerun_resumes(FLAGS.workdir)}", file=sys.stderr)
        sys.exit(status)


def inspect_mode():
    from pixelflow_jax import inspect_model, storage
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    try:
        inspect_model.run(FLAGS.config, FLAGS.workdir)
    except (CheckpointError, ValueError, FloatingPointError, storage.StorageError) as e:
        fail(e)


def demo_mode():
    from pixelflow_jax import demo_app, storage
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError

    try:
        demo_app.run(FLAGS.config, FLAGS.workdir)
    except (CheckpointError, ValueError, storage.StorageError) as e:
        fail(e)
    except (KeyboardInterrupt, Terminated) as stop:  # how a page stops: a scheduler sees a stopped job
        cause, status = stop_cause(stop)
        print(f"stopped: {cause}", file=sys.stderr)
        sys.exit(status)


def sample_or_eval_mode():
    """--mode=sample (then the evaluation, when config.eval.reference is set) or --mode=eval."""
    from pixelflow_jax import storage
    from pixelflow_jax.checkpoints.checkpoint import CheckpointError
    from pixelflow_jax.evaluation import evaluate
    from pixelflow_jax.sampling import job_files, sample_run

    try:  # from the handler on: a SIGTERM the moment after it is in place is handled below too
        if not FLAGS.distributed:
            stop_on_sigterm()
        # An ssh session closed: the same stop, exit 129 (nohup's SIG_IGN stays); with several processes
        # every process stops at one batch, as for a SIGTERM.
        stop_on_hang_up(FLAGS.distributed)
        if FLAGS.mode == "sample":
            e = FLAGS.config.eval
            if e.reference:  # a typo found now, not after hours of sampling
                evaluate.check_inputs(None, e.reference, e.inception_weights, FLAGS.workdir)
                evaluate.check_sample_count(FLAGS.config.sample)
            sampled = sample_run.run(FLAGS.config, FLAGS.workdir)
        if FLAGS.mode == "eval" or FLAGS.config.eval.reference:
            if FLAGS.mode == "sample":
                evaluate.run(FLAGS.config, FLAGS.workdir, storage.join(FLAGS.workdir, job_files.SAMPLES_NPZ), sampled)
            else:
                evaluate.run(FLAGS.config, FLAGS.workdir)
    except (CheckpointError, ValueError, storage.StorageError) as e:
        fail(e)
    except (KeyboardInterrupt, Terminated) as stop:  # finished batches are on disk (sample_run writes each whole)
        kept = ("the features of files already through the Inception are cached" if FLAGS.mode == "eval"
                else "the images written are kept")
        cause, status = stop_cause(stop)
        print(f"stopped: {cause}; {kept}: rerun the same command to go on", file=sys.stderr)
        sys.exit(status)


MODES = {"train": train_mode, "inspect": inspect_mode, "demo": demo_mode, "sample": sample_or_eval_mode,
         "eval": sample_or_eval_mode}


def too_many_open_files(error: BaseException) -> str | None:
    """The OSError for a process's open-files limit (`ulimit -n`) that `error` was raised from or while
    handling, its words, or None. A library's cleanup after it may raise another error in its place (a
    grain worker that could not start failed to be joined: an AssertionError)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE):
            return str(error)
        error = error.__cause__ or error.__context__
    return None


def out_of_memory_fix(mode: str, config) -> str:
    """What a job that ran out of device or host memory (XLA's RESOURCE_EXHAUSTED) can lower."""
    if mode == "train":
        return ("set --config.model.remat=dots_attention, dots or full (least memory), or raise --config.mesh.fsdp (a "
                "resumed run takes these); or "
                "raise --config.train.grad_accum_steps (the same global batch in smaller pieces) or lower "
                "--config.train.batch_size (a resumed run takes these two only with "
                "--config.train.allow_resume_changes=True: they change its draws); in a preview: "
                "--config.train.preview_num_images")
    if mode in ("sample", "eval"):
        batches = ["--config.sample.batch_size"] if mode == "sample" else []
        batches += ["--config.eval.batch_size"] if mode == "eval" or config.eval.reference else []
        return f"lower {' or '.join(batches)}"
    text = (" (a text model: --config.sample.text_encoder_param_dtype=bfloat16 halves its T5)"
            if "text_encoder_param_dtype" in config.sample else "")
    if mode == "inspect":
        return f"lower --config.data.resolution (for the config's own model){text}"
    return f"the model does not fit this machine's memory{text}"


def fail(error: Exception):
    """Exits with one line for an error this project raised (its message names the problem and the
    fix). An error raised inside a library (jax, orbax, gcsfs) is unexpected, so its traceback is
    printed first: its message alone often lacks the context to act on."""
    import pixelflow_jax
    from pixelflow_jax import storage

    package = os.path.dirname(os.path.abspath(pixelflow_jax.__file__))
    frames = traceback.extract_tb(error.__traceback__)
    raised_in = os.path.abspath(frames[-1].filename) if frames else __file__
    # jax removes its own frames from tracebacks (and says so in a note): its errors can seem ours.
    jax_frames_removed = any("JAX has removed its internal frames" in note for note in getattr(error, "__notes__", ()))
    if jax_frames_removed or (raised_in != os.path.abspath(__file__) and not storage.is_inside(raised_in, package)):
        traceback.print_exception(error)
    sys.exit(f"error: {error}")


def what_a_rerun_resumes(workdir: str) -> str:
    """For a training run stopped at once (not at a step it saved): the step the same command resumes
    from, the latest on disk."""
    from pixelflow_jax.checkpoints.run_checkpoint import complete_steps

    try:
        steps = complete_steps(workdir)
    except Exception:  # the store failing too: say what is sure
        return "the checkpoints saved before are kept: rerun the same command to resume from the latest"
    if not steps:  # a second Ctrl-C during the first save: nothing was kept
        return "no step of this run was saved: rerun the same command to start it again"
    return f"the checkpoints saved before are kept: rerun the same command to resume from step {max(steps)}"


if __name__ == "__main__":
    try:
        handle_ctrl_c_from_the_start("jax")  # and a Ctrl-C pressed while the imports above ran
        app.run(main, flags_parser=parse_flags)
    except SystemExit as stop:
        exit_now_after_an_error(stop)
    except (KeyboardInterrupt, Terminated) as stop:  # where no mode handles it: while starting (the imports
        # take seconds), or a SIGTERM in a job's last instants, after its mode's own handling
        cause, status = stop_cause(stop)
        print(f"stopped: {cause}", file=sys.stderr)
        exit_now_after_an_error(SystemExit(status))
    except Exception as error:  # a bug: its traceback, then the same exit (in a job of several processes, not a hang)
        if (stop := stop_received()) is not None:  # a library's rewording of a Ctrl-C or SIGTERM
            cause, status = stop_cause(stop)
            print(f"stopped: {cause}", file=sys.stderr)
            exit_now_after_an_error(SystemExit(status))
        if message := another_process_gone(error):
            print(message, file=sys.stderr)
            exit_now_after_an_error(SystemExit(1))
        traceback.print_exc()
        exit_now_after_an_error(SystemExit(1))
