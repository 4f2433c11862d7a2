"""Converted checkpoints on disk: an orbax parameter tree plus a JSON config, written atomically.

Layout of a converted folder:
    DIR/pixelflow_config.json   architecture, scheduler, resolution, a text run's prompt encoding (CheckpointConfig),
                                and weights_sha256, the digest of the parameters (weights_digest); weights_note,
                                what an export converted here said of its weights (which run and step), or which
                                set of a train.py checkpoint was converted
    DIR/params/                 orbax checkpoint of the nested NNX parameter dict
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from concurrent import futures
from typing import Any, Callable, Iterator, NamedTuple

import jax
import numpy as np
from flax import nnx

from pixelflow_jax import storage
from pixelflow_jax.checkpoints.convert import Params, param_shapes
from pixelflow_jax.command_line import late_restore_callbacks_dropped
from pixelflow_jax.config import ModelConfig, fields_missing_from_architecture, without_options_off
from pixelflow_jax.model import PixelFlow
from pixelflow_jax.validation import (LARGEST_IMAGE_SIDE, MAX_TEXT_TOKENS, MIN_TEXT_TOKENS, TEXT_ENCODER_DTYPES,
                                      too_many_stages)

CONFIG_FILE = "pixelflow_config.json"
PARAMS_DIR = "params"
WEIGHTS_DIGEST = "weights_sha256"  # in CONFIG_FILE; absent from folders converted before 2026-12-03
WEIGHTS_NOTE = "weights_note"  # in CONFIG_FILE, of an export's or a train.py checkpoint's conversion: "weights: ..."
FORMAT_VERSION = 1
WEIGHT_CHOICES = ("ema", "model")  # of a training run or a release train.py checkpoint: the EMA or the raw weights


class CheckpointError(RuntimeError):
    """A checkpoint cannot be read or written; the message says which file and what to do."""


def check_weights_choice(weights: str, name: str = "weights") -> None:
    """`name` (as the caller's user spells the setting) is one of WEIGHT_CHOICES."""
    if weights not in WEIGHT_CHOICES:
        raise CheckpointError(f"{name} must be one of {WEIGHT_CHOICES}, got {weights!r}")


def is_text_token_count(tokens) -> bool:
    """Whether `tokens` is a prompt length training takes (train.max_text_tokens)."""
    return isinstance(tokens, int) and not isinstance(tokens, bool) and MIN_TEXT_TOKENS <= tokens <= MAX_TEXT_TOKENS


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Everything needed to rebuild and sample a model besides its weights."""

    model: ModelConfig
    num_train_timesteps: int = 1000
    num_stages: int = 4
    resolution: int = 256
    # A text model's prompt length in training and its frozen T5's weight dtype, where recorded (a
    # run's run_config.json, its export's config.yaml, their conversion): prompts are encoded so when
    # sampled. None: the release's 512 tokens, float32. Not the model: configs differing in them are equal.
    max_text_tokens: int | None = dataclasses.field(default=None, compare=False)
    text_encoder_dtype: str | None = dataclasses.field(default=None, compare=False)

    def __post_init__(self):
        for name in ("num_train_timesteps", "num_stages", "resolution"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        tokens = self.max_text_tokens
        if tokens is not None and not is_text_token_count(tokens):
            raise ValueError(f"max_text_tokens must be a whole number from {MIN_TEXT_TOKENS} to {MAX_TEXT_TOKENS} "
                             f"(training's bounds), got {tokens!r}")
        if self.text_encoder_dtype not in (None, *TEXT_ENCODER_DTYPES):
            raise ValueError(f"text_encoder_dtype must be one of {TEXT_ENCODER_DTYPES}, got "
                             f"{self.text_encoder_dtype!r}")
        if self.num_train_timesteps < self.num_stages:  # a stage without a timestep of its own: degenerate
            raise ValueError(f"num_train_timesteps {self.num_train_timesteps} must be at least num_stages "
                             f"{self.num_stages}, as in training (the release's: 1000)")
        least_resolution = lambda stages: self.model.patch_size * 2 ** (stages - 1)
        if least_resolution(self.num_stages) > LARGEST_IMAGE_SIDE:
            raise ValueError(too_many_stages(self.num_stages, self.resolution, self.model.patch_size, least_resolution))
        factor = least_resolution(self.num_stages)
        if self.resolution % factor:
            raise ValueError(f"resolution {self.resolution} must be a multiple of patch_size x 2^(num_stages-1) "
                             f"= {factor} so that every stage has a whole patch grid")

    def to_json(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "model": without_options_off(self.model.to_dict()),
                "scheduler": {"num_train_timesteps": self.num_train_timesteps, "num_stages": self.num_stages},
                "resolution": self.resolution, **self.text_training()}

    def text_training(self) -> dict[str, Any]:
        """max_text_tokens and text_encoder_dtype, those recorded."""
        return {name: getattr(self, name) for name in ("max_text_tokens", "text_encoder_dtype") if getattr(self, name)}

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> "CheckpointConfig":
        if not isinstance(values, dict):
            raise ValueError(f"it holds {held_in_words(values)}, not the mapping of settings that "
                             "convert_torch_ckpt.py writes")
        version = whole_number("format_version", values.get("format_version", FORMAT_VERSION))
        if version > FORMAT_VERSION:
            raise ValueError(f"format_version {version!r} is from a newer pixelflow-jax (this one reads "
                             f"{FORMAT_VERSION}): upgrade pixelflow-jax to load it")
        model, scheduler = (mapping(name, values[name]) for name in ("model", "scheduler"))
        missing = fields_missing_from_architecture(model)
        if missing:
            raise KeyError(*(f"model.{name}" for name in missing))
        return cls(model=ModelConfig.from_mapping(model),
                   num_train_timesteps=whole_number("scheduler.num_train_timesteps", scheduler["num_train_timesteps"]),
                   num_stages=whole_number("scheduler.num_stages", scheduler["num_stages"]),
                   resolution=whole_number("resolution", values["resolution"]),
                   max_text_tokens=values.get("max_text_tokens"), text_encoder_dtype=values.get("text_encoder_dtype"))


def held_in_words(value: Any) -> str:
    """What a JSON or YAML document that is no mapping holds, in words: 'a list', "the text 'model'"."""
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    return f"the text {value!r}" if isinstance(value, str) else f"the value {value!r}"


def whole_number(name: str, value: Any) -> int:
    """A number of a converted folder's config, which it writes whole: 64.5 px or "4" stages were
    rounded or read as if written so."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return value


def mapping(name: str, value: Any) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a mapping, got {value!r}")
    return value


@contextlib.contextmanager
def atomic_output_dir(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary folder beside `path`; on success it becomes `path`, on failure it is
    deleted. An existing `path` is refused unless `overwrite`, and is only removed once the new
    folder is complete, so no failure loses the old one.

    In an object store (no rename) the files are written in place, the file that marks the folder
    complete last (the caller's order), and a failure deletes what was written; replacing an
    existing folder there is refused, since a failure would lose the old one."""
    if storage.is_url(path):
        yield from _object_store_output_dir(path, overwrite)
        return
    path = os.path.realpath(path)  # a link to the output: the folder it names is replaced, the link kept
    parent, base = os.path.dirname(path), os.path.basename(path)
    os.makedirs(parent, exist_ok=True)
    _clean_up_after_killed_runs(parent, base, path)
    existed = holds_something(path)  # an empty folder made for the output is no output to keep
    if existed and not overwrite:
        raise CheckpointError(f"output {path} already exists; choose another path or pass --overwrite")
    tmp = storage.make_folder(parent, f".{base}.tmp-{storage.writer_tag()}-")
    appeared = CheckpointError(f"output {path} appeared while this job was writing (another job, or a person, "
                               "made it); it is left as it is: choose another path, or rerun with --overwrite if it "
                               "may be replaced")
    try:
        yield tmp
        if holds_something(path) and not existed:  # --overwrite was judged on what was there at the start
            raise appeared
        if existed and os.path.exists(path):
            old = tempfile.mkdtemp(prefix=f".{base}.old-{storage.writer_tag()}-", dir=parent)
            os.rename(path, os.path.join(old, "previous"))
            os.rename(tmp, path)
            shutil.rmtree(old)
        else:
            try:
                os.rename(tmp, path)
            except OSError as e:  # made in the last instant (an empty folder there is replaced: rename's rule)
                if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                    raise
                raise appeared from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def holds_something(path: str) -> bool:
    """Whether a local path is there, other than as an empty folder."""
    return os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path))


def _clean_up_after_killed_runs(parent: str, base: str, path: str) -> None:
    """What a killed earlier run (storage.writer_gone) left beside `path`: its unfinished temporary
    folder is deleted; an old output it had moved aside before the swap is put back if `path` is
    missing."""
    left_by_a_run = re.compile(rf"\.{re.escape(base)}\.(tmp|old)-{storage.WRITER}")
    for match, folder in list(storage.folders_of_gone_writers(parent, left_by_a_run)):
        previous = os.path.join(folder, "previous")
        if match[1] == "old" and os.path.exists(previous) and not os.path.exists(path):
            os.rename(previous, path)
        shutil.rmtree(folder, ignore_errors=True)


def no_overwrite_in_a_bucket(path: str) -> CheckpointError:
    return CheckpointError(f"--overwrite cannot replace {path}: an object store has no atomic rename, so a failed "
                           "conversion would lose the old folder; delete it first or choose another path")


def _object_store_output_dir(path: str, overwrite: bool) -> Iterator[str]:
    if storage.exists(path):
        if not overwrite:
            raise CheckpointError(f"output {path} already exists; choose another path or pass --overwrite")
        raise no_overwrite_in_a_bucket(path)
    try:
        yield path
    except BaseException:
        storage.rmtree(path)
        raise


def save_checkpoint(path: str, params: Params, config: CheckpointConfig, overwrite: bool = False,
                    weights_note: str | None = None) -> None:
    """Writes a converted folder atomically (see atomic_output_dir), its config recording the
    weights' digest and `weights_note`, what the export it was converted from said of them (or which set
    of a train.py checkpoint they are). The weights are stored in the config's param_dtype, as a
    restore reads them."""
    import orbax.checkpoint as ocp

    dtype = np.dtype(config.model.parameter_dtype)
    host_arrays = jax.tree.map(lambda a: np.asarray(a, dtype), params)
    record = {**config.to_json(), WEIGHTS_DIGEST: weights_digest(host_arrays)}
    if weights_note:
        record[WEIGHTS_NOTE] = weights_note
    with atomic_output_dir(path, overwrite) as tmp:
        arrays = jax.tree.map(jax.device_put, host_arrays)
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(storage.join(tmp, PARAMS_DIR), arrays)
            checkpointer.wait_until_finished()
        finally:  # on Ctrl-C too: orbax's background writes end before the partial folder is removed
            checkpointer.close()  # (a Ctrl-C ~4 s into a conversion left files they wrote after it, 4 of ~40)
        storage.write_json_atomically(storage.join(tmp, CONFIG_FILE), record)  # last: marks it complete


def weights_digest(params: Params) -> str:
    """sha256 of the parameters: each one's name, dtype, shape and little-endian bytes, in the
    order of their names. The same on every host and jax version, and whatever files orbax writes
    them to (it names them afresh at each save). Parameters are hashed in threads (hashlib lets go
    of the GIL): an XL checkpoint's 2.5 GiB took ~4 s on a shared 2-core machine, ~1 GB/s a thread."""
    leaves = sorted(named_leaves(params), key=lambda named: named[0])
    with futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
        each = list(pool.map(lambda named: parameter_digest(*named), leaves))
    return hashlib.sha256(b"".join(each)).hexdigest()


def parameter_digest(name: str, value) -> bytes:
    """sha256 of one parameter (a device array is copied to the host here, one at a time)."""
    array = np.asarray(value)
    digest = hashlib.sha256(json.dumps([name, array.dtype.name, list(array.shape)]).encode())
    digest.update(little_endian_bytes(array))
    return digest.digest()


def little_endian_bytes(array: np.ndarray) -> np.ndarray:
    """The array's bytes with each element in little-endian order, on any host and from any byte
    order (a bfloat16 as its two bytes): no copy where they are so already."""
    little = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)
    return little.reshape(-1).view(np.uint8)


def weights_fingerprint(config: CheckpointConfig, digest: str) -> str:
    """A short hash of a converted folder's weights and the config they are sampled with: the same
    for the same weights converted again, anywhere; another for any other weights or config."""
    record = json.dumps({"config": config.to_json(), WEIGHTS_DIGEST: digest}, sort_keys=True)
    return hashlib.sha256(record.encode()).hexdigest()[:16]


class ConvertedRecord(NamedTuple):
    """What a converted folder's pixelflow_config.json holds."""

    config: CheckpointConfig
    digest: str | None  # of the weights; None in folders converted before 2026-12-03
    weights_note: str | None  # what the export it was converted from said of its weights, or which set of a
    # train.py checkpoint it holds; else None


def read_config(path: str) -> CheckpointConfig:
    return read_record(path).config


def read_record(path: str) -> ConvertedRecord:
    config_path = storage.join(path, CONFIG_FILE)
    try:
        values = storage.read_json(config_path)
        return ConvertedRecord(CheckpointConfig.from_json(values), recorded_digest(values), recorded_note(values))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a converted pixelflow-jax checkpoint (no {CONFIG_FILE}); "
                              "convert a release checkpoint with convert_torch_ckpt.py first") from None
    except KeyError as e:
        raise CheckpointError(f"{config_path} is not a valid pixelflow-jax config: it lacks {', '.join(map(repr, e.args))} (convert "
                              "the checkpoint again with convert_torch_ckpt.py)") from None
    except (json.JSONDecodeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{config_path} is not a valid pixelflow-jax config: {e}") from None


def recorded_digest(values: dict) -> str | None:
    """The weights_sha256 a conversion recorded, checked to be one."""
    digest = values.get(WEIGHTS_DIGEST)
    if digest is not None and not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
        raise ValueError(f"{WEIGHTS_DIGEST} must be the 64 hex digits of a sha256, got {digest!r} (convert the "
                         "checkpoint again with convert_torch_ckpt.py)")
    return digest


def recorded_note(values: dict) -> str | None:
    """The weights_note a conversion of an export recorded, checked to be text."""
    note = values.get(WEIGHTS_NOTE)
    if note is not None and not isinstance(note, str):
        raise ValueError(f"{WEIGHTS_NOTE} must be text, got {note!r} (convert the checkpoint again with "
                         "convert_torch_ckpt.py)")
    return note


def abstract_params(model: ModelConfig, sharding) -> dict:
    """The nested parameter dict of an architecture as ShapeDtypeStructs (orbax restore targets)."""
    target = {}
    for keys, shape in param_shapes(model).items():
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = jax.ShapeDtypeStruct(shape, model.parameter_dtype, sharding=sharding)
    return target


def restore_params(path: str, config: CheckpointConfig, record: ConvertedRecord | None = None) -> Params:
    """Reads the parameter tree of a converted folder, checked against the config's architecture
    and, when read in the dtype they were saved in, against the digest its conversion recorded.
    `record` is the folder's read_record where the caller has read it already (in a bucket, each
    read is a request)."""
    import orbax.checkpoint as ocp

    params_path = storage.join(storage.absolute(path), PARAMS_DIR)
    if not storage.isdir(params_path):
        raise CheckpointError(f"{path} has no {PARAMS_DIR}/ folder; the conversion did not finish, convert again")
    saved, digest, _ = record or read_record(path)
    target = abstract_params(config.model, jax.sharding.SingleDeviceSharding(jax.local_devices()[0]))
    try:
        with late_restore_callbacks_dropped(), ocp.StandardCheckpointer() as checkpointer:
            params = checkpointer.restore(params_path, target)
    except Exception as e:  # orbax raises many types; all mean the same thing to the user
        from pixelflow_jax.checkpoints.run_checkpoint import restore_error

        raise CheckpointError(f"cannot restore parameters from {params_path} (damaged, or not the architecture "
                              f"{config.model.architecture()}): {restore_error(e)}; convert again") from None
    check_weights_finite(params, params_path, lambda: "convert again")
    # Cast as they are restored (another param_dtype asked for), they are no longer the bytes hashed.
    if digest and saved.model.param_dtype == config.model.param_dtype and weights_digest(params) != digest:
        raise CheckpointError(f"{params_path} holds other weights than {storage.join(path, CONFIG_FILE)} records (its "
                              f"{PARAMS_DIR}/ replaced by another conversion's, or files damaged after they were "
                              f"written; the config and {PARAMS_DIR}/ of a folder go together): convert again")
    return params


@jax.jit
def leaves_finite(tree: Params) -> Params:
    """Whether each leaf holds finite values only: one program for the whole tree, compiled once
    per architecture (a jit made per call compiled again at every load of a notebook's sweep)."""
    return jax.tree.map(lambda x: jax.numpy.isfinite(x).all(), tree)


def non_finite_params(params: Params) -> list[str]:
    """The names (a/b/kernel) of the parameters holding NaN or inf: files damaged after they were
    written still restore, and a NaN weight makes every image NaN. One transfer of the answers."""
    finite = jax.device_get(leaves_finite(params))
    return [name for name, ok in named_leaves(finite) if not ok]


def named_leaves(tree) -> list[tuple[str, object]]:
    """(a/b/kernel, leaf) for each leaf of a nested dict."""
    return [("/".join(str(getattr(key, "key", key)) for key in path), leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]]


def check_weights_finite(params: Params, what: str, fix: Callable[[], str]) -> None:
    """Raises a CheckpointError naming the parameters that hold NaN or inf, `what` held them, and
    fix() (asked only then: it may list a run's steps, requests in a bucket)."""
    if bad := non_finite_params(params):
        raise CheckpointError(f"{what}: {listed(bad)} hold NaN or inf values (files damaged after they were written, "
                              f"or a diverged run); every image sampled from them would be NaN: {fix()}")


def listed(names: list[str], shown: int = 5) -> str:
    """The first `shown` names, and how many more, for a message."""
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def module_with_params(create, params: Params, dtype=None):
    """The module `create()` builds, holding `params` (a pure dict of its nnx.Param values, cast to
    dtype if given) instead of a random initialisation, which is never computed."""
    module = nnx.eval_shape(create)
    state = nnx.state(module, nnx.Param)
    # Host arrays are cast on the host and placed in one transfer (an eager cast per array costs a
    # compile per shape and a dispatch each); arrays already on devices are cast where they are.
    dtype = None if dtype is None else jax.numpy.dtype(dtype)
    leaves, tree = jax.tree.flatten(params)
    on_host = [i for i, leaf in enumerate(leaves) if not isinstance(leaf, jax.Array)]
    for i, array in zip(on_host, jax.device_put([np.asarray(leaves[i], dtype) for i in on_host])):
        leaves[i] = array
    leaves = [leaf if dtype in (None, leaf.dtype) else leaf.astype(dtype) for leaf in leaves]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(tree, leaves))
    nnx.update(module, state)
    return module


def build_model(config: CheckpointConfig, params: Params) -> PixelFlow:
    """An NNX model of the config's architecture holding the given parameters (no random init)."""
    return module_with_params(lambda: PixelFlow(config.model, rngs=nnx.Rngs(0)), params,
                              config.model.parameter_dtype)
