"""The run's orbax checkpoints: asynchronous saves whose failures become one clear error, and
the resume point, the latest step that restores (damaged ones set aside).

    WORKDIR/checkpoints/<step>/state     the train state (model, EMA, optimiser, step, RNG)
    WORKDIR/unreadable_checkpoints/      steps that did not restore, moved aside at a resume
"""

from __future__ import annotations

import contextlib
import errno
import logging as python_logging
import os
import re
import time

import jax
import jax.numpy as jnp
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.checkpoints.checkpoint import CheckpointError
from pixelflow_jax.checkpoints.run_checkpoint import (CHECKPOINTS, STATE_ITEM, STEP_NAME, UNREADABLE_CHECKPOINTS,
                                                      complete_steps, restore_error)
from pixelflow_jax.command_line import INSTALLED_ORBAX, late_restore_callbacks_dropped
from pixelflow_jax.error_text import MACHINE_LIMITS, first_line
from pixelflow_jax.multihost import processes_where


def remove_unfinished_saves(workdir: str) -> list[int]:
    """Deletes the partial step folders that killed saves and killed deletions left (gigabytes
    each on XL), for the run that owns the workdir, before it saves anything: orbax removes a
    killed save's folder only when that same step is saved again, and never lists a step whose
    deletion (its checkpoint rotation) was killed midway, so in a bucket that folder, its commit
    marker gone first, stayed for good. Removed: a step after the latest complete one (orbax saves
    steps in order, so a killed save is the newest), and an older one whose own listing holds no
    commit marker (a complete step that merely looked partial, a bucket request that failed, is
    never touched). Best effort: a failure is a warning. Returns the steps removed."""
    try:
        complete = complete_steps(workdir)
        latest = max(complete, default=0)
        folder, steps = storage.join(workdir, CHECKPOINTS), set()
        for name in storage.listdir(folder):  # a step folder or its temporary
            match = re.fullmatch(rf"({STEP_NAME})(\.orbax-checkpoint-tmp.*)?", name)
            if not match:
                continue
            step, path = int(match[1]), storage.join(folder, name)
            if step > latest or (step not in complete and not match[2] and deletion_killed_midway(path)):
                storage.rmtree(path)
                steps.add(step)
        return sorted(steps)
    except OSError as e:
        logging.warning("could not remove the partial checkpoints of killed saves in %s (%s); they stay", workdir, e)
        return []


def deletion_killed_midway(step_folder: str) -> bool:
    """Whether an older step folder that does not count as complete lacks its commit marker in its
    own listing (a bucket's: locally a step is complete once renamed, whatever is left in it)."""
    import orbax.checkpoint as ocp

    return storage.is_url(step_folder) and ocp.path.atomicity.COMMIT_SUCCESS_FILE not in storage.list_files(step_folder)


class OrbaxTracebacksInOneLine(python_logging.Filter):
    """orbax's records of an error, while a run holds its checkpoints, keep their message
    with the error's first line in place of the traceback. A failed save's came twice, dozens of
    lines of orbax's internals above the one line that save_errors reports (the cause, the step a
    rerun resumes from, the fix): from its background thread when the write failed, and from the
    wait that raises the error again. (orbax logs through absl's logger, which the job's own lines
    share: there is no level of orbax's alone to lower while the error is handled.)"""

    def filter(self, record: python_logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, Exception) and INSTALLED_ORBAX.search(record.pathname):  # a stop: LoggedStopsDropped
            record.msg, record.args = f"{record.getMessage()} ({type(error).__name__}: {first_line(error)})", None
            record.exc_info = record.exc_text = None
        return True


ORBAX_TRACEBACKS_IN_ONE_LINE = OrbaxTracebacksInOneLine()  # one instance: a second addFilter adds nothing


@contextlib.contextmanager
def orbax_errors_in_one_line():
    """OrbaxTracebacksInOneLine on absl's logger for a run's life: its saves fail in orbax's
    background threads, between the calls that start and await them, so no narrower scope holds
    their records. Once the run returns, orbax's errors (a notebook's own restore) keep their
    tracebacks; it stayed on for the rest of the process."""
    logger = python_logging.getLogger("absl")
    added = ORBAX_TRACEBACKS_IN_ONE_LINE not in logger.filters  # an enclosing scope's stays on
    logger.addFilter(ORBAX_TRACEBACKS_IN_ONE_LINE)
    try:
        yield
    finally:
        if added:
            logger.removeFilter(ORBAX_TRACEBACKS_IN_ONE_LINE)


def checkpoint_manager(workdir: str, keep: int):
    import orbax.checkpoint as ocp

    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=True)
    return ocp.CheckpointManager(storage.join(storage.absolute(workdir), CHECKPOINTS), options=options,
                                 item_handlers={STATE_ITEM: ocp.StandardCheckpointHandler()})


def save(manager, step: int, state) -> None:
    """Starts saving `step` in the background (after the previous save has finished)."""
    import orbax.checkpoint as ocp

    with save_errors(manager):
        started = manager.save(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardSave(state)}))
    if not started:  # orbax saves only steps after its latest one, and says so by returning False
        raise CheckpointError(f"orbax did not save step {step} in {manager.directory}: it already holds step "
                              f"{manager.latest_step()}")


def wait_for_saves(manager) -> None:
    with save_errors(manager):
        manager.wait_until_finished()


def check_saves(manager) -> None:
    """Raises, on every process, the error of a background save that has failed. orbax keeps it
    for manager.wait_until_finished() alone (its check_for_errors() finds it already taken by
    orbax's own finalize thread), which returns at once when no save is in progress."""
    problem = None
    try:
        if not manager.is_saving_in_progress():
            wait_for_saves(manager)
    except CheckpointError as e:
        problem = e
    # Every process learns of a failure: one raising alone would leave the others in a collective.
    failed = processes_where(problem is not None)
    if failed and problem is None:
        problem = CheckpointError(f"a checkpoint save failed on process {failed[0]} (see its error); rerun the "
                                  "same command once the cause is fixed")
    if problem is not None:
        raise problem


@contextlib.contextmanager
def save_errors(manager):
    """A failed save (orbax reports a background save's failure at the next save or wait) as one
    CheckpointError: the cause, the step a rerun resumes from, and the fix."""
    try:
        yield
    except Exception as e:  # orbax and tensorstore raise many types for the same few causes
        cause = first_line(e)
        limit = machine_limit(cause)  # named before the cut: tensorstore's message names it after 300 characters
        complete = complete_steps(storage.dirname(str(manager.directory)))  # finalised on disk
        resume = f"resumes from step {max(complete)}" if complete else "starts from the beginning"
        raise CheckpointError(f"saving a checkpoint in {manager.directory} failed: "
                              f"{MACHINE_LIMITS[limit][0] if limit else cause[:300]}. Fix the cause "
                              f"({save_fix(manager, cause, limit)}) and rerun the same command: it {resume}") from None


def machine_limit(cause: str) -> int | None:
    """The errno of MACHINE_LIMITS that a save's error names (Python's `[Errno N]`, tensorstore's
    `[os_error_code='N']`, or the C library's English words), or None."""
    for code in MACHINE_LIMITS:
        if re.search(rf"\[Errno {code}\]|os_error_code='{code}'", cause) or os.strerror(code) in cause:
            return code
    return None


def save_fix(manager, cause: str, limit: int | None) -> str:
    """What to do about a failed save whose error says `cause` (`limit`: the machine's limit it names, or
    None): access for a refusal; in a bucket, which does not fill up, its reachability; else what lifts
    the limit, room by default (the usual cause on a disk)."""
    in_bucket = storage.is_url(str(manager.directory))
    if any(word in cause for word in ("Forbidden", "Permission denied", "PERMISSION_DENIED", "Unauthorized",
                                      "Read-only file system")):  # words, not codes: 403 may be a step
        return f"write access: {storage.CHECK_ACCESS}" if in_bucket else "write access to the folder"
    if in_bucket:
        return ("the bucket's reachability: a network or storage-service error, or a quota; a bucket does "
                "not fill up")
    lift = MACHINE_LIMITS[limit][1]() if limit else "free space"
    if limit == errno.EFBIG:  # more room would not help
        return f"{lift}: the limit must allow a checkpoint's largest array"
    if limit == errno.EMFILE:
        return lift
    keep = getattr(getattr(manager, "_options", None), "max_to_keep", None)  # orbax's, for the advice only
    room = ("a save needs room for one checkpoint beside the one kept" if keep == 1 else
            f"a save needs room for one checkpoint beside the {keep or 'ones'} kept; "
            "--config.train.keep_checkpoints lowers how many")
    return f"{lift}: {room}"


def restore(manager, step: int, state, shardings):
    """The state saved at `step`, placed in `shardings` (whatever the process count that saved it)."""
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)
    with late_restore_callbacks_dropped():
        return manager.restore(step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)})
                               )[STATE_ITEM]


@jax.jit
def every_value_finite(arrays: list[jax.Array]) -> jax.Array:
    """One program per list of shapes, kept for the process (a jit made per call compiled again at
    each resume of a notebook's second train())."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in arrays]))


def all_finite(tree) -> bool:
    """Whether every float in a (possibly multi-process) pytree of jax arrays is finite; every
    process gets the same answer."""
    floats = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return bool(every_value_finite(floats).addressable_data(0))  # replicated: this process's copy


def resume_point(manager, state, shardings):
    """(step, state) of the latest checkpoint that restores; (0, state) without any. `state` may be
    its shapes alone (jax.ShapeDtypeStruct) where the manager holds steps: one restores, or this raises.

    A corrupt one (damaged files, a disk that filled up) is skipped with a warning for the one
    before it, and set aside. With several processes there is no fallback: orbax ends a restore
    with a barrier of every process, which a process whose restore failed never reaches, so the
    processes could not agree on another step; the error says which folder to move away."""
    unreadable = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored = restore(manager, step, state, shardings)
            if not all_finite(restored):  # no step saves a non-finite weight: the files changed after
                raise ValueError("it holds non-finite values: its files were damaged in a way that still reads")
        except Exception as e:  # orbax and tensorstore raise many types for unreadable files
            cause = restore_error(e)
            folder = storage.join(str(manager.directory), str(step))
            if jax.process_count() > 1:
                raise CheckpointError(f"{folder} cannot be restored on process {jax.process_index()} "
                                      f"({type(e).__name__}: {cause}); move it out of {manager.directory} and rerun "
                                      "the same command to resume from the step before it") from None
            logging.warning("checkpoint %s cannot be restored (%s: %s); trying the one before it",
                            folder, type(e).__name__, cause)
            unreadable.append(step)
            continue
        set_aside(manager, unreadable)
        check_counted_step(manager, step, restored)
        logging.info("resumed from %s at step %d", manager.directory, step)
        return step, restored
    if manager.all_steps():
        raise CheckpointError(f"no checkpoint in {manager.directory} can be restored (steps {manager.all_steps()}); "
                              "see the warnings above, or start a new --workdir")
    if any(isinstance(leaf, jax.ShapeDtypeStruct) for leaf in jax.tree.leaves(state)):
        raise CheckpointError(f"{manager.directory} lists no step now, though the run found one as it started "
                              "(was it moved away meanwhile?); rerun the same command")
    return 0, state


def check_counted_step(manager, step: int, restored) -> None:
    """Refuses a step folder whose train state counts another step: renamed by hand, or copied in
    from another run's checkpoints. Resumed, the run read its data from the folder's step on while
    its noise keys followed the state's count, and logged steps that never trained."""
    if not isinstance(restored, dict) or "step" not in restored:  # (a state of the tests' own)
        return
    counted = int(restored["step"].addressable_data(0))  # replicated: this process's copy
    if counted != step:
        folder = storage.join(str(manager.directory), str(step))
        raise CheckpointError(f"{folder} holds the train state of step {counted}, not {step} (its folder renamed by "
                              f"hand, or copied in from another run?): name it {counted} again, or move it out of "
                              f"{manager.directory}, and rerun")


def set_aside(manager, steps: list[int]) -> None:
    """Moves checkpoints that do not restore (one process) to WORKDIR/unreadable_checkpoints/
    STEP-TIME (STEP-TIME-2, ... for more in one second): orbax saves only steps after its latest
    one, so left in place they would stop every save until the run passed them (and a read error
    that was only passing leaves the files)."""
    run = storage.dirname(str(manager.directory))
    for step in steps:
        folder = storage.join(str(manager.directory), str(step))
        name = f"{step}-{int(time.time())}"
        target = storage.join(run, UNREADABLE_CHECKPOINTS, name)
        copy = 1
        while storage.exists(target):  # set aside in the same second before: side by side, never inside it
            copy += 1
            target = storage.join(run, UNREADABLE_CHECKPOINTS, f"{name}-{copy}")
        try:
            storage.move(folder, target)
        except OSError as e:
            raise CheckpointError(f"cannot move {folder}, which does not restore, to {target} ({e}): move or delete "
                                  "it yourself and rerun the same command") from None
        logging.warning("moved checkpoint %d, which does not restore, to %s", step, target)
    if steps:
        manager.reload()
