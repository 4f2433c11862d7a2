"""How the processes of a multi-host job (--distributed) start together, what they check together
before they work together, and how they share out the rows of a job that is not a jitted step (the
evaluation's Inception).

Every process of such a job runs the same program and meets the others in each collective. A
process that raises alone leaves the others waiting in the next collective (gloo on CPU still
waited after 7 minutes, measured), and processes that see different files silently compute
different things: each would take other images for "the same" batch, or sample another number of
batches. So what each process sees for itself (its access to the workdir, the workdir being one
folder for all, the data, the checkpoints, its copies of a job's input files) is compared here, and
every process stops with the same error, naming the processes at fault.

One process: every check is local and costs nothing more.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from urllib.parse import urlsplit

import jax
import numpy as np
from absl import logging

from pixelflow_jax import storage
from pixelflow_jax.software_versions import matmul_precision_named_once

SHARED_CHECK_WAIT_S = 3  # a file one host wrote may take a moment to appear on another's NFS mount
CONNECT_WAIT_S = 300  # for every process to join (jax's own wait): a pod's hosts may start minutes apart


def start_distributed(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """jax.distributed.initialize(), with main.py's --coordinator_address, --num_processes and
    --process_id (None: jax detects the cluster). ValueError where it cannot, naming those flags."""
    check_cluster_flags(coordinator_address, num_processes, process_id)
    # Processes without accelerators (CPU hosts, tests) need a collectives backend; GPUs and TPUs
    # ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    at = f" at {coordinator_address}" if coordinator_address else ""
    who = f"process {process_id} of {num_processes}" if None not in (num_processes, process_id) else \
        "this process (the cluster left to jax to detect: Cloud TPU, SLURM, Open MPI)"
    logging.info("%s: joining the job's processes%s (waiting up to %d s for all of them)", who, at, CONNECT_WAIT_S)
    # jax's own end of the wait is a C++ abort that blames "another task died", with a stack dump:
    # this process stops first, in one line.
    waiting = threading.Timer(CONNECT_WAIT_S, stop_waiting, (at, num_processes, process_id))
    waiting.daemon = True
    waiting.start()
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=CONNECT_WAIT_S + 60)
    except ValueError as e:  # no cluster detected, and the flags that replace detection missing
        raise ValueError(f"--distributed: {str(e).rstrip('.')}. Where jax cannot detect the cluster (Cloud TPU, SLURM, "
                         "Open MPI), pass --coordinator_address=HOST:PORT --num_processes=N --process_id=I on every "
                         "process") from None
    finally:
        waiting.cancel()
    from pixelflow_jax.cli.platforms import platform_error

    if message := platform_error():
        raise ValueError(message)
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


def lone_task_of_srun() -> str | None:
    """For a job without --distributed: a warning where srun started this command as one of several
    tasks (SLURM_STEP_NUM_TASKS), each of which then runs the whole job alone; None otherwise. Slurm
    sets SLURM_STEP_NUM_TASKS only for the tasks of a step srun launches (its env_array_for_step; the
    batch script's own environment, env_array_for_batch_job, has none). The other SLURM variables
    (SLURM_NTASKS, SLURM_PROCID) are also set in a batch script's own process, where one process is
    a choice, and nothing here reads them."""
    tasks = os.environ.get("SLURM_STEP_NUM_TASKS", "")
    if not tasks.isdigit() or int(tasks) < 2:
        return None
    return (f"srun started this command as {tasks} tasks (SLURM_STEP_NUM_TASKS={tasks}), and without --distributed "
            "each task runs the whole job alone (a second training run or sampling job on one workdir is refused, an "
            "evaluation is repeated): add --distributed to share the job out over them, or start one task "
            "(srun --ntasks=1)")


def check_cluster_flags(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """What jax takes unchecked or names by its own arguments, in the flags' words (see coordinator_port)."""
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"--num_processes={num_processes}: a job has at least 1 process")
    if None not in (num_processes, process_id) and not 0 <= process_id < num_processes:
        raise ValueError(f"--process_id={process_id} is not one of this job's process ids, 0 to {num_processes - 1} "
                         f"(--num_processes={num_processes}): give each process its own, process 0 on the "
                         "--coordinator_address host")
    if coordinator_address is not None:
        port = coordinator_port(coordinator_address)
        if process_id == 0 and "JAX_COORDINATOR_BIND_ADDRESS" not in os.environ:
            check_port_free(coordinator_address, port)


def stop_waiting(at: str, num_processes: int | None, process_id: int | None) -> None:
    """Ends this process (from the timer thread: the main thread waits inside jax) when the job's
    processes did not all join within CONNECT_WAIT_S."""
    from pixelflow_jax.command_line import exit_without_teardown

    if None in (num_processes, process_id):  # jax detected the cluster
        exit_without_teardown(f"error: --distributed: not every process of this job joined within {CONNECT_WAIT_S} s: "
                              "start the same command on every host of the cluster (a process that stopped says why "
                              "in its log)", 1)
    exit_without_teardown(
        f"error: --distributed: process {process_id} waited {CONNECT_WAIT_S} s for the {num_processes} processes of "
        f"this job to join{at}, and not all did: start one process for each --process_id from 0 to "
        f"{num_processes - 1}, each with the same --coordinator_address and --num_processes (process 0's host and a "
        "port every host can reach); a --process_id given twice, or a process that stopped (its log says why), "
        "leaves the job short", 1)


# A host name, an IPv4 address or a bracketed IPv6 address, then a port.
HOST_AND_PORT = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]@]+):(?P<port>[0-9]{1,5})")
EXAMPLE_PORT = 8476  # jax's own coordinator port on Cloud TPU


def coordinator_port(address: str) -> int:
    """The port of --coordinator_address; ValueError where it is not HOST:PORT. jax takes it
    unchecked: a URL (http://host:port) waited its 5 minutes to connect, an address without a port
    was an IndexError traceback, and a port that is no number a gRPC traceback."""
    if "://" in address:
        netloc = urlsplit(address).netloc
        instead = f", --coordinator_address={netloc}" if HOST_AND_PORT.fullmatch(netloc) else ""
        raise ValueError(f"--coordinator_address={address} is a URL: write HOST:PORT without the scheme{instead}")
    match = HOST_AND_PORT.fullmatch(address)
    if match is None or not 0 < int(match["port"]) < 65536:
        host = address.rsplit(":", 1)[0] if HOST_AND_PORT.fullmatch(f"{address.rsplit(':', 1)[0]}:1") else "10.0.0.2"
        raise ValueError(f"--coordinator_address={address} is not HOST:PORT (process 0's host name or IP address, a "
                         f"colon and a port from 1 to 65535, e.g. {host}:{EXAMPLE_PORT})")
    return int(match["port"])


def check_port_free(address: str, port: int) -> None:
    """Process 0 serves the job's coordination on `port` of every address of its host, as jax binds
    it ([::]:PORT): a port another program holds was a segmentation fault inside gRPC, and the other
    processes waited 5 minutes for a service that never came."""
    try:
        probe = socket.socket(socket.AF_INET6)  # dual-stack: an IPv4 holder of the port is found too
        host = "::"
    except OSError:  # a host without IPv6
        probe, host = socket.socket(socket.AF_INET), "0.0.0.0"
    with probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC: a closed job's lingering connections
        try:
            probe.bind((host, port))
        except OSError as e:
            if e.errno not in (errno.EADDRINUSE, errno.EACCES):  # a probe's own limit (IPv6 off): jax may still bind
                return
            cause = "in use on this host" if e.errno == errno.EADDRINUSE else f"not open to this process ({e.strerror})"
            raise ValueError(f"--coordinator_address={address}: port {port} is {cause}, where process 0 serves the "
                             f"job (it listens on that port of every address of its host): pick a free port, the same "
                             "on every process") from None


def processes_where(flag: bool) -> list[int]:
    """The indexes of the processes on which `flag` is true; every process learns them (one int
    gathered from each)."""
    if jax.process_count() == 1:
        return [0] if flag else []
    from jax.experimental import multihost_utils

    return [int(i) for i in np.flatnonzero(multihost_utils.process_allgather(np.int32(bool(flag))))]


def from_process_0(values: np.ndarray) -> np.ndarray:
    """Process 0's `values` (int32, the same shape on every process) on every process."""
    if jax.process_count() == 1:
        return values
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(values, np.int32)))


# The latest pass this process asked jax's sync point about (stop_if_preempted): where a job's next loop
# numbers its passes on from (stop_if_preempted_at_the_next_pass).
_last_pass_asked = [0]


def stop_if_preempted(passes: int) -> None:
    """For a loop that is no training run (a sampling job's batches; training has its PreemptionWatch):
    Terminated once a SIGTERM came. In a --distributed job jax's preemption service holds SIGTERM
    (main.py installs no handler of its own there), so a SIGTERM to any process was caught and
    ignored, and the job sampled on to its end; its sync point answers every process alike at the
    same pass, so they all stop together. `passes`: this loop's passes so far, from 1 on every
    process (jax counts from 0: see PreemptionWatch.reached)."""
    from pixelflow_jax.command_line import preemption_stop, stop_if_terminated

    _last_pass_asked[0] = passes
    if not jax.distributed.is_initialized():
        stop_if_terminated()
        return
    from jax.experimental import multihost_utils

    if multihost_utils.reached_preemption_sync_point(passes):
        raise preemption_stop()


def stop_if_preempted_at_the_next_pass() -> None:
    """stop_if_preempted for a loop that may follow another of the same job (an evaluation's second
    file, the evaluation after its sampling job): its passes are numbered on from the last one
    asked. jax sets the sync point one past the furthest process's latest pass, so a SIGTERM that
    came after one loop's last pass would stop a loop counting from 1 again only at that number,
    or never."""
    stop_if_preempted(_last_pass_asked[0] + 1)


def block_size(total: int) -> int:
    """The rows of the largest rows_of_this_process block, the same number on every process."""
    return -(-total // jax.process_count())


def rows_of_this_process(total: int) -> tuple[int, int]:
    """[start, stop) of the `total` rows of a job that the processes share out in blocks of
    ceil(total / processes), in process order (the last processes may get fewer, or none)."""
    share = block_size(total)
    index = jax.process_index()
    return min(total, index * share), min(total, (index + 1) * share)


def gather_rows(rows: np.ndarray, total: int) -> np.ndarray:
    """The whole (total, ...) array on every process, from each process's rows_of_this_process
    block: blocks padded to one size for the gather, the padding (all after the last row) cut."""
    count = jax.process_count()
    if count == 1:
        return rows
    from jax.experimental import multihost_utils

    share = block_size(total)
    padded = np.zeros((share, *rows.shape[1:]), rows.dtype)
    padded[:len(rows)] = rows
    everyone = np.asarray(multihost_utils.process_allgather(padded))  # (count, share, ...)
    return everyone.reshape(count * share, *rows.shape[1:])[:total]


@contextlib.contextmanager
def failing_together(errors: tuple[type[Exception], ...], failed_at: str):
    """Every process stops when the block raises one of `errors` on any of them: that process with
    its error, the others naming it (`failed_at`: what the block checks, e.g. "checking the
    inputs"). One raising alone left the others in their next collective."""
    problem = None
    try:
        yield
    except errors as e:
        problem = e
    failed = processes_where(problem is not None)
    if problem is not None:
        raise problem
    if failed:
        raise ValueError(f"{named(failed)} stopped {failed_at} (its error says why)")


def write_on_process_0(path: str, rerun: str, write, doing: str = "writing") -> None:
    """write(path) on process 0, where storage.writing names `path`, the fix and `rerun` for a failure;
    that failure stops every other process with it (as failing_together: "DOING PATH")."""
    with failing_together((storage.StorageError,), f"{doing} {path}"):
        if jax.process_index() == 0:
            with storage.writing(path, rerun):
                write(path)


def named(processes: list[int]) -> str:
    return f"process{'es' if len(processes) > 1 else ''} {', '.join(map(str, processes))} of {jax.process_count()}"


def check_shared_workdir(folder: str) -> None:
    """Each process can write to `folder`, and it is the same folder for all of them.

    A host without access (its credentials, its mount) stops every process with its name. A local
    path on a job of several hosts (--workdir=/tmp/run on a TPU pod) is a folder per host: each
    host would hold only its own checkpoint shards and images, a restore would find parts missing,
    and a sampling job's hosts would count different images still to sample and wait for each
    other for ever. Process 0 writes a file of a random name there; every other process must see it.
    """
    try:
        storage.check_writable(folder)
        problem = None
    except storage.StorageError as e:
        problem = e
    failed = processes_where(problem is not None)
    if problem:
        raise storage.StorageError(f"process {jax.process_index()}: {problem}" if jax.process_count() > 1 else
                                   str(problem))
    if failed:
        raise storage.StorageError(f"{named(failed)} cannot write to {folder} (its log says why); every process of "
                                   "the job needs access")
    if jax.process_count() == 1:
        return
    token = np.frombuffer(secrets.token_bytes(16), np.int32)
    if jax.process_index() == 0:
        storage.write_atomically(shared_check_file(folder, token), b"")
    probe = shared_check_file(folder, from_process_0(token))  # the broadcast comes after process 0's write
    unseen = processes_where(not seen_within_the_wait(probe))
    if jax.process_index() == 0:
        storage.remove(probe)
    if unseen:
        raise storage.StorageError(
            f"{folder} is not one folder shared by the processes of this job: {named(unseen)} "
            f"{'do' if len(unseen) > 1 else 'does'} not see the file "
            f"process 0 wrote there (a local path is a folder per host). Every process reads and writes the same "
            "workdir: use a bucket (gs://BUCKET/PATH) or a file system mounted on every host (NFS, Filestore)")


def seen_within_the_wait(path: str) -> bool:
    """Whether this process sees the file `path` (one process 0 wrote or found) within
    SHARED_CHECK_WAIT_S: another host's view of a shared folder may lag."""
    deadline = time.monotonic() + SHARED_CHECK_WAIT_S
    while not (seen := storage.exists(path)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return seen


def shared_check_file(folder: str, token: np.ndarray) -> str:
    return storage.join(folder, f".shared_check-{np.asarray(token, np.int32).tobytes().hex()}")


def hashed(text: str, words: int) -> np.ndarray:
    """The first `words` int32s of text's SHA-256: small enough to gather from every process."""
    return np.frombuffer(hashlib.sha256(text.encode("utf-8", "surrogateescape")).digest()[:4 * words], np.int32)


def compare_views(view: str, count: int) -> tuple[list[int], list[int]]:
    """(the processes whose `view` differs from process 0's, each process's `count`): a hash of what
    each process sees for itself, gathered with a number to name in the error."""
    from jax.experimental import multihost_utils

    row = np.array([*hashed(view, 2), min(count, 2**31 - 1)], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(row))
    return ([i for i, other in enumerate(everyone) if not np.array_equal(other[:2], everyone[0][:2])],
            [int(other[2]) for other in everyone])


def per_process(values: list[int]) -> str:
    return ", ".join(f"process {i}: {value}" for i, value in enumerate(values))


def job_fields(mode: str, workdir: str, config) -> dict[str, str]:
    """--mode, --workdir and every --config.FIELD of this process's command, as text: taken as
    given, before `~` is expanded (the same command on hosts with other home folders is the same
    command; the folders it names are compared where they are used)."""
    fields = {"--mode": mode, "--workdir": workdir}

    def add(prefix: str, values: dict) -> None:
        for name, value in sorted(values.items()):
            if isinstance(value, dict):
                add(f"{prefix}{name}.", value)
            else:
                fields[f"--config.{prefix}{name}"] = json.dumps(value, sort_keys=True, default=str)

    add("", config.to_dict())
    return fields


def check_same_job(fields: dict[str, str]) -> None:
    """Every process runs the same command. Processes started with other overrides (a command
    edited on one host, another checkout) each used their own values: a training run recorded
    process 0's learning rate while another process trained with its own, and sampling jobs of
    different image counts crashed in a collective. `fields`: job_fields of the command."""
    if jax.process_count() == 1:
        return
    differing, _ = compare_views("\n".join(fields), len(fields))
    if differing:
        raise ValueError(f"{named(differing)} of this job {'have' if len(differing) > 1 else 'has'} other config "
                         "fields than process 0 (another config file, or another version of this project): run the "
                         "same checkout and the same command on every host")
    others, changed = values_differing(fields)
    if others:
        here = ", ".join(f"{name}={fields[name] if name.startswith('--config.') else repr(fields[name])}"
                         for name in changed)
        raise ValueError(f"the processes of this job were started with different commands: {named(others)} "
                         f"{'differ' if len(others) > 1 else 'differs'} from process 0 in {', '.join(changed)} "
                         f"(this process, {jax.process_index()}: {here}). Run the same command on every host")


def values_differing(values: dict[str, str]) -> tuple[list[int], list[str]]:
    """(the processes whose `values` differ from process 0's, the names of the values that differ
    somewhere), from one hash per value gathered from every process; every process has the same names."""
    from jax.experimental import multihost_utils

    hashes = np.concatenate([hashed(value, 1) for value in values.values()])
    everyone = np.asarray(multihost_utils.process_allgather(hashes))
    others = [i for i, row in enumerate(everyone) if not np.array_equal(row, everyone[0])]
    return others, [name for j, name in enumerate(values) if len(set(everyone[:, j].tolist())) > 1]


def check_same_software(versions: dict[str, str]) -> None:
    """Every process runs the same Python and library versions (software_versions.version_fields).
    Hosts installed at other times got other jax, jaxlib or flax releases: their processes compiled
    other programs, computed other numbers than process 0 recorded, or waited in collectives the
    others never joined."""
    if jax.process_count() == 1:
        return
    others, changed = values_differing(versions)
    if others:
        here = ", ".join(f"{name} {versions[name]}" for name in changed)
        raise ValueError(f"the processes of this job run different software: {named(others)} "
                         f"{'differ' if len(others) > 1 else 'differs'} from process 0 in {', '.join(changed)} "
                         f"(this process, {jax.process_index()}: {here}). Install the same versions on every host "
                         "(the same pip install command, from one checkout's requirements.txt, on each)")


def check_same_matmul_precision() -> None:
    """Every process computes its matmuls at the same precision (jax_default_matmul_precision, which
    JAX_DEFAULT_MATMUL_PRECISION sets): a host whose environment set it computed its share of every
    step at another precision than the others, unrecorded (process 0 writes the job's records).
    XLA_FLAGS are not compared: a host may set its own (a dump folder of its own, say)."""
    if jax.process_count() == 1:
        return
    precision = jax.config.jax_default_matmul_precision  # None: the platform's default
    others, _ = values_differing({"jax_default_matmul_precision": str(matmul_precision_named_once(precision))})
    if others:
        raise ValueError(f"the processes of this job compute at different matmul precisions: {named(others)} "
                         f"{'differ' if len(others) > 1 else 'differs'} from process 0 in jax_default_matmul_precision "
                         f"(this process, {jax.process_index()}: {precision}). Set JAX_DEFAULT_MATMUL_PRECISION alike "
                         "on every host, or on none")


def check_same_data(num_records: int, listing: str | None, where: str) -> None:
    """Every process reads the same data: the same number of records, and the same file listing
    where the data is files. Each process lists the data itself, and the data order is drawn from
    the count: a host with a partial copy would train on another order than the others, each
    taking its rows of "the same" batch from its own."""
    if jax.process_count() == 1:
        return
    differing, counts = compare_views(f"{num_records}\n{listing}", num_records)
    if differing:
        raise ValueError(f"the processes of this job see different data in {where}: {named(differing)} "
                         f"{'see' if len(differing) > 1 else 'sees'} other records than process 0 (records counted: "
                         f"{per_process(counts)}). Every process must read the same files: "
                         "a copy on each host's own disk must be complete and identical, or read it from one "
                         "shared place (a bucket, NFS)")


def check_same_checkpoints(steps: list[int], folder: str) -> None:
    """Every process lists the same checkpoints: a process that resumed from another step than the
    others would wait in another restore than theirs. A shared file system whose listings lag on
    one host (NFS caches them) is the cause."""
    if jax.process_count() == 1:
        return
    differing, latest = compare_views(",".join(map(str, steps)), max(steps, default=0))
    if differing:
        raise storage.StorageError(
            f"the processes of this job list different checkpoints in {folder}: {named(differing)} "
            f"{'see' if len(differing) > 1 else 'sees'} other steps than process 0 (latest step seen: "
            f"{per_process(latest)}). The file system shows the hosts different folders: wait until it shows every "
            "host the same (NFS caches listings for up to a minute; mount it with actimeo=0 to stop that), then "
            "rerun the same command")


@dataclasses.dataclass(frozen=True)
class InputRead:
    """An input file each process of a job reads for itself, and what it read there."""

    where: str  # the flag and path, as an error names it
    content: str  # what this process read, or a fingerprint of it; never its path (a host's copy may lie elsewhere)
    count: int = 0  # a number an error shows for each process (its prompts, its images)
    counted: str = ""  # what `count` counts; "" shows no count


HOST_NAME_BYTES = 64


def host_names() -> list[str]:
    """Each process's host name (its first HOST_NAME_BYTES bytes), on every process."""
    from jax.experimental import multihost_utils

    name = socket.gethostname().encode()[:HOST_NAME_BYTES].ljust(HOST_NAME_BYTES, b"\0")
    everyone = np.asarray(multihost_utils.process_allgather(np.frombuffer(name, np.int32)), np.int32)
    return [row.tobytes().rstrip(b"\0").decode(errors="replace") for row in everyone]


SAME_COPIES_FIX = ("Each host reads its own copy there: copy process 0's to the other hosts, or read it from one "
                   "shared place (a bucket, NFS), and rerun the same command")


def check_same_inputs(inputs: list[InputRead], fix: str = SAME_COPIES_FIX) -> None:
    """Every process read the same content from the `inputs` each reads for itself. Each host may
    hold its own copy of an input (a prompts file, an .npz, weights), and a stale copy on one host
    mixed its content into the job without a word: other prompts sampled into its rows, or other
    images' features gathered with the others. Compared before any work; on a difference every
    process stops with the same error, naming the inputs, the processes and their hosts, and `fix`."""
    if jax.process_count() == 1 or not inputs:
        return
    from jax.experimental import multihost_utils

    mine = np.array([[*hashed(read.content, 2), min(read.count, 2**31 - 1)] for read in inputs], np.int32)
    everyone = np.asarray(multihost_utils.process_allgather(mine)).reshape(jax.process_count(), len(inputs), 3)
    others = [i for i, rows in enumerate(everyone) if not np.array_equal(rows[:, :2], everyone[0, :, :2])]
    if not others:
        return
    hosts = host_names()
    differing = [j for j in range(len(inputs)) if len({tuple(rows[j, :2]) for rows in everyone}) > 1]
    what = "; ".join(inputs[j].where + (f" ({inputs[j].counted}: {per_process(everyone[:, j, 2].tolist())})"
                                         if inputs[j].counted else "") for j in differing)
    reads = "read" if len(others) > 1 else "reads"
    raise ValueError(f"the processes of this job read different copies of their inputs: {named(others)} "
                     f"(on {', '.join(hosts[i] for i in others)}) {reads} other content than process 0 (on {hosts[0]}) "
                     f"in {what}. {fix}")
