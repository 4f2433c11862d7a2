"""Reading and writing the PyTorch release's checkpoint formats (needs torch, imported lazily).

Accepted inputs:
  - a release folder: `config.yaml` + `model.pt` (a plain state dict), as sample_ddp.py loads it;
  - a bare state-dict `.pt` (architecture from a config.yaml given separately, or from shapes);
  - a train.py checkpoint: a dict with "model", "ema", "opt" and "args" (EMA weights by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import tempfile
import zipfile
from typing import Any, Mapping

import numpy as np
import yaml

from pixelflow_jax import storage
from pixelflow_jax.checkpoints.checkpoint import (CheckpointConfig, CheckpointError, atomic_output_dir,
                                                 check_weights_choice, held_in_words, is_text_token_count, listed)
from pixelflow_jax.checkpoints.convert import infer_architecture
from pixelflow_jax.config import ARCHITECTURE_FIELDS, ModelConfig
from pixelflow_jax.error_text import first_line
from pixelflow_jax.validation import (LARGEST_IMAGE_SIDE, MAX_TEXT_TOKENS, MIN_TEXT_TOKENS, TEXT_ENCODER_DTYPES,
                                      nearest_multiples)

RELEASE_MODEL_TARGET = "pixelflow.model.PixelFlowModel"
# The PixelFlowModel arguments without a default; the others default to attention_bias True,
# cross_attention_dim None (no text) and num_classes 0 (unconditional).
RELEASE_REQUIRED_PARAMS = ("in_channels", "out_channels", "num_attention_heads", "attention_head_dim", "depth",
                           "patch_size")
# What torch wrappers put before every key of a state dict: DistributedDataParallel, torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# torch.optim.swa_utils.AveragedModel (torch's own EMA) saves this step count beside the model's weights.
AVERAGING_COUNT = "n_averaged"
# Files a folder may hold its weights in under another name than the release's model.pt.
WEIGHT_FILE_ENDINGS = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# A shard's name as Hugging Face's and accelerate's save_pretrained/save_model write them: model-00001-of-00002.*
SHARD_NAME = r"-\d{5}-of-(\d{5})\."
# How shards become the one file this tool reads, after "join them into one model.pt".
SHARDS_JOINED = "(torch.save of the union of their state dicts) and convert it"
# The first part of the release's state dict keys (PixelFlowModel's modules).
RELEASE_KEY_ROOTS = {"class_embedder", "latent_size_embedder", "patch_embed", "proj_out_1", "proj_out_2",
                     "timestep_embedder", "transformer_blocks"}
ONE_SET_OF_WEIGHTS = ("the choice of weights ('model' for the raw ones) applies to training runs and the release's "
                      "train.py checkpoints: leave it at 'ema'")

# What the release ships for ImageNet 256 (configs/pixelflow_xl_c2i.yaml), used only where neither
# a config.yaml nor a flag says otherwise; none of these changes the network's outputs.
RELEASE_DEFAULTS = {"resolution": 256, "num_stages": 4, "num_train_timesteps": 1000}
# The text-to-image checkpoint ships without its config.yaml; the release's app.py samples it at
# 1024 px (4 stages, 1000 timesteps, as every released config).
RELEASE_T2I_DEFAULTS = {**RELEASE_DEFAULTS, "resolution": 1024}


def _import_torch():
    try:
        import torch
    except ImportError:
        raise CheckpointError("reading or writing PyTorch checkpoints needs torch: pip install torch==2.13.0 "
                              "--index-url https://download.pytorch.org/whl/cpu (the CPU build)") from None
    return torch


def load_torch_file(path: str) -> Any:
    """torch.load with weights_only (no code execution); one clear error for anything unreadable."""
    torch = _import_torch()
    if not storage.isfile(path):
        raise CheckpointError(f"{path} is not a file" if storage.exists(path) else f"{path} does not exist")
    try:
        # train.py pickles its argparse.Namespace next to the weights; allow exactly that class.
        with torch.serialization.safe_globals([argparse.Namespace]), storage.local_file(path) as local:
            if not os.path.getsize(local):  # torch's refusal was an EOFError, a word of its unpickler
                raise CheckpointError(f"{path} is empty (0 bytes): a download or a save that did not finish? Fetch or "
                                      f"save it again{hub_cache_hint(path)}")
            if is_torchscript(local):  # torch.load's refusal advises weights_only=False, which runs its code
                raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), which is read by running "
                                      "its code: save the weights alone (torch.save(model.state_dict(), path))")
            return torch.load(local, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(local))
    except (CheckpointError, storage.StorageError):  # a StorageError: the bucket, or the local copy's folder
        raise
    except Exception as e:
        reason = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()  # torch colours parts of its messages
        if reason.startswith("Weights only load failed") and "Unsupported global" in reason:  # not damage
            # named, the object tells where it is (a config or a pathlib.Path saved beside the weights)
            found = re.search(r"Unsupported global: GLOBAL (\S+)", reason)
            raise CheckpointError(f"{path} holds Python objects besides tensors{f' ({found[1]})' if found else ''}, "
                                  "which are not read (loading them could run code): save the state dict alone "
                                  "(torch.save(model.state_dict(), path))") from None
        if reason.startswith("Weights only load failed"):  # torch's own advice (weights_only=False) runs code
            detail = [line.strip() for line in reason.splitlines()[1:] if line.strip()]
            reason = f"not a file of tensors ({detail[1] if len(detail) > 1 else 'the safe unpickler refused it'})"
        else:
            reason = f"{type(e).__name__}: {reason.splitlines()[0]}" if reason else type(e).__name__
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint (truncated or not a checkpoint?): "
                              f"{reason}{hub_cache_hint(path)}") from None


def hub_cache_hint(path: str) -> str:
    """How to mend a damaged file of huggingface_hub's cache: a rerun would read the same bytes."""
    try:
        from huggingface_hub import constants
    except ImportError:  # then no file came from its cache
        return ""
    if storage.is_url(path) or not storage.is_inside(path, constants.HF_HUB_CACHE):
        return ""
    return (f"; it is in the Hugging Face cache, which a rerun reads again: remove {os.path.realpath(path)} to have "
            "it downloaded anew")


def is_torchscript(local: str) -> bool:
    """Whether a file is torch.jit.save's archive: a zip whose folder holds constants.pkl, as torch
    tells them."""
    if not zipfile.is_zipfile(local):
        return False
    with zipfile.ZipFile(local) as archive:
        return any(name.count("/") == 1 and name.endswith("/constants.pkl") for name in archive.namelist())


def what_it_holds(loaded: Any, torch) -> str:
    """The top-level keys of a dict that is no state dict, and the one among them that holds one (a
    PyTorch Lightning checkpoint's 'state_dict', say), with how to save it alone."""
    if not isinstance(loaded, Mapping) or not loaded:
        return f"; it holds {type(loaded).__name__}" + (" (empty)" if isinstance(loaded, Mapping) else "")
    holders = [k for k, v in loaded.items() if isinstance(v, Mapping) and v
               and all(isinstance(t, torch.Tensor) for t in v.values())]
    found = f"; its keys are {listed(sorted(map(str, loaded)))}"
    if holders:
        found += (f": the weights are likely its {holders[0]!r}: torch.save(checkpoint[{holders[0]!r}], "
                  "'weights.pt') and convert that")
    return found


def check_no_other_prefix(state_dict: Mapping[str, Any], path: str) -> None:
    """Every key under one name that is none of the model's (a LightningModule's 'model.', say):
    named with the fix, rather than a list of every key as missing and unexpected."""
    roots = {key.split(".", 1)[0] for key in state_dict}
    if len(roots) == 1 and "." in next(iter(state_dict)) and not roots & RELEASE_KEY_ROOTS:
        prefix = f"{roots.pop()}."
        raise CheckpointError(f"{path}: every key starts with {prefix!r}, which no PixelFlow weight does (a wrapper "
                              f"module's name): save them without it: torch.save({{k.removeprefix({prefix!r}): v "
                              "for k, v in state_dict.items()}, 'weights.pt') and convert that")


def extract_state_dict(loaded: Any, path: str, weights: str = "ema") -> dict[str, np.ndarray]:
    """The float32 numpy state dict inside whatever torch.load returned."""
    torch = _import_torch()
    check_weights_choice(weights, "--weights")
    if is_training_checkpoint(loaded):
        other = "model" if weights == "ema" else "ema"
        if weights not in loaded:
            raise CheckpointError(f"{path} is a training checkpoint without {weights!r} weights; "
                                  f"it has {sorted(loaded)}: pass --weights={other}")
        held = loaded[weights]
        if held is None or (isinstance(held, Mapping) and not held):  # a run without an EMA saved one so
            raise CheckpointError(f"{path} is a training checkpoint whose {weights!r} weights are empty "
                                  f"({'None' if held is None else 'no tensors'}): pass --weights={other}")
        loaded = held
    elif weights == "model":  # the default 'ema' reads a file's one set of weights; asking for 'model' means a mix-up
        raise CheckpointError(f"{path} holds one set of weights, not a train.py checkpoint's 'model' and 'ema': "
                              f"{ONE_SET_OF_WEIGHTS}")
    if not isinstance(loaded, Mapping) or not loaded or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise CheckpointError(f"{path} holds no PixelFlow state dict (expected a dict of tensors, "
                              f"or a train.py checkpoint with 'model'/'ema'){what_it_holds(loaded, torch)}")
    loaded = without_averaging_count(loaded, path)
    wrapped = True
    while wrapped:  # wrappers nest: torch.compile of a DistributedDataParallel model, say
        wrapped = next((w for w in WRAPPER_PREFIXES if all(k.startswith(w) for k in loaded)), None)
        if wrapped:
            logging.info("%s: the keys carry %r (a wrapped model's state dict); reading them without it", path, wrapped)
            loaded = {k[len(wrapped):]: v for k, v in loaded.items()}
    check_no_other_prefix(loaded, path)
    not_float = sorted(k for k, v in loaded.items() if not v.is_floating_point())
    if not_float:
        raise CheckpointError(f"{path}: {listed(not_float)} hold {loaded[not_float[0]].dtype} values, not weights "
                              "(every PixelFlow tensor is floating point)")
    wider = sorted(k for k, v in loaded.items() if v.dtype == torch.float64)
    if wider:  # float16 / bfloat16 widen exactly; float64 rounds
        logging.warning("%s: %s are float64, rounded to the float32 the model holds", path, listed(wider))
    state_dict = float32_numpy(loaded)
    not_finite = sorted(k for k, v in state_dict.items() if not np.isfinite(v).all())
    if not_finite:
        raise CheckpointError(f"{path}: {listed(not_finite)} hold NaN or inf values (a diverged run?); "
                              "the model would sample NaN images from them")
    return state_dict


def without_averaging_count(state_dict: Mapping[str, Any], path: str) -> Mapping[str, Any]:
    """An AveragedModel's state dict (a count of averaged steps, the weights under 'module.') without
    the count, so that it reads as a wrapped model's: the count was refused as an integer tensor that
    is no weight, the fix left to the user. Anything else is returned as it is."""
    count = state_dict.get(AVERAGING_COUNT)
    weights = {k: v for k, v in state_dict.items() if k != AVERAGING_COUNT}
    if count is None or count.is_floating_point() or count.numel() != 1 or not weights or not all(
            k.startswith("module.") for k in weights):
        return state_dict
    logging.info("%s: an AveragedModel's state dict (its %s, %d, is no weight); reading the weights", path,
                 AVERAGING_COUNT, int(count))
    return weights


def float32_numpy(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    torch = _import_torch()
    arrays = {}
    for key, value in tensors.items():
        try:
            arrays[key] = value.detach().to(torch.float32).numpy()
        except (TypeError, RuntimeError, NotImplementedError) as e:  # a meta tensor (saved without its data), ...
            raise CheckpointError(f"tensor {key} holds no readable values ({value.device} {value.dtype}): "
                                  f"{first_line(e)}") from None
    return arrays


def load_tensor_dict(path: str) -> dict[str, Any]:
    """The plain {name: tensor} dict in a torch file (Hugging Face pytorch_model.bin, pytorch-fid's
    weights), or a clear error."""
    torch = _import_torch()
    loaded = load_torch_file(path)
    if not isinstance(loaded, Mapping) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()):
        raise CheckpointError(f"{path} holds no dict of tensors (a state dict)")
    return loaded


def config_from_release_yaml(path: str) -> tuple[dict[str, Any], dict[str, int]]:
    """(model.params, {resolution, num_stages, num_train_timesteps} found) of a release config.yaml."""
    values = release_yaml_values(path)
    model = values.get("model") or {}
    if model.get("params") is None:
        raise CheckpointError(f"{path} has no model.params (the release's PixelFlowModel arguments), so it is not a "
                              "release config.yaml: pass the config.yaml that came with the checkpoint")
    params = mapping_in(path, "model.params", model["params"])
    target = model.get("target", RELEASE_MODEL_TARGET)
    if target != RELEASE_MODEL_TARGET:
        raise CheckpointError(f"{path} describes {target}, not {RELEASE_MODEL_TARGET}")
    if params.pop("dropout", 0.0):
        raise CheckpointError(f"{path} sets model dropout; pixelflow-jax implements dropout 0 only (as released)")
    missing = [name for name in RELEASE_REQUIRED_PARAMS if name not in params]
    if missing:
        raise CheckpointError(f"{path} lacks model.params {', '.join(missing)}, which the release's PixelFlowModel "
                              "requires too")
    # Only the release's arguments: this project's runtime settings (dtype, attention, ...) would be
    # baked into the converted folder, and the release itself refuses them.
    if unknown := sorted(set(params) - set(ARCHITECTURE_FIELDS)):
        raise CheckpointError(f"{path}: model.params {', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not "
                              f"an argument of the release's PixelFlowModel (its arguments: dropout, "
                              f"{', '.join(ARCHITECTURE_FIELDS)})")
    params.setdefault("num_classes", 0)  # the release's default (ours, for configs, is ImageNet's 1000)
    whole = lambda value: isinstance(value, int) and not isinstance(value, bool)  # 64.9 px is not rounded
    for name, value in params.items():
        if name == "attention_bias":
            fits, kind = isinstance(value, bool), "true or false"
        elif name == "cross_attention_dim":
            fits, kind = value is None or whole(value), "a whole number or null"
        else:
            fits, kind = whole(value), "a whole number"
        if not fits:
            raise CheckpointError(f"{path}: model.params.{name} must be {kind}, got {value!r}")
    extras = {}
    for section, key in (("scheduler", "num_stages"), ("scheduler", "num_train_timesteps"), ("data", "resolution")):
        found = values.get(section) or {}
        if key in found:
            if not whole(found[key]):
                raise CheckpointError(f"{path}: {section}.{key} must be a whole number, got {found[key]!r}")
            extras[key] = found[key]
    return params, extras


def parsed_yaml(text: str) -> Any:
    """yaml.safe_load (no Python objects built), with nesting deeper than Python reads a YAMLError, as
    other damage is (a crafted config.yaml's RecursionError came out of load_model as a traceback)."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise yaml.YAMLError(storage.too_deeply_nested()) from None


def release_yaml_values(path: str) -> dict[str, Any]:
    """The settings of a config.yaml, a mapping whose sections are mappings; else a one-line error
    that names what the file holds instead."""
    try:
        values = parsed_yaml(storage.read_text(path))
    except FileNotFoundError:
        raise CheckpointError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"config file {path} is a folder: pass the release's config.yaml itself") from None
    except UnicodeDecodeError:  # model.pt given for its config, say
        raise CheckpointError(f"{path} is not a text file, so not a release config.yaml (YAML text with "
                              "model.params); pass the config.yaml that came with the checkpoint") from None
    except yaml.MarkedYAMLError as e:  # its text spans lines (context, then a caret drawing): the problem and where
        where = f" at line {e.problem_mark.line + 1}, column {e.problem_mark.column + 1}" if e.problem_mark else ""
        raise CheckpointError(f"{path} is not valid YAML ({e.problem or e.context}{where}), so not a release "
                              "config.yaml: mend it, or pass the config.yaml that came with the checkpoint") from None
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path} is not a release config.yaml ({e}): pass the config.yaml that came with the "
                              "checkpoint") from None
    if not isinstance(values, dict):
        held = "is empty" if values is None else f"holds {held_in_words(values)}"
        raise CheckpointError(f"{path} {held}, not a release config.yaml (YAML settings with model.params, scheduler "
                              "and data): pass the config.yaml that came with the checkpoint")
    for section in ("model", "scheduler", "data", "train"):
        mapping_in(path, section, values.get(section))
    return values


def mapping_in(path: str, name: str, value: Any) -> dict[str, Any]:
    """A section of config.yaml as a mapping ({} where left empty); another shape is named, where
    it was a TypeError (`data: resolution`) or read as no section (`scheduler: [4]`)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        last = name.rsplit(".", 1)[-1]
        raise CheckpointError(f"{path}: {name} must be a mapping ({last}: followed by indented `name: value` lines), "
                              f"got {value!r}")
    return dict(value)


def weight_files(folder: str) -> list[str]:
    """The PyTorch weight files in a folder, in the order of the numbers in their names, so the
    newest of train.py's model_STEP.pt comes last (model_9000.pt before model_10000.pt)."""
    by_number = lambda name: [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]
    return sorted((name for name in storage.list_files(folder) if name.endswith(WEIGHT_FILE_ENDINGS)), key=by_number)


def shards_hint(folder: str) -> str:
    """For a folder of the shards of one state dict, what to do with them, as words to add; else ''.
    Offered as the newest of train.py's files, the last shard was converted as half the weights."""
    shards = [name for name in weight_files(folder) if is_part_of_the_weights(name)]
    if not shards:
        return ""
    return (f"; it holds {listed(shards)}, shards of one state dict, each only part of the weights: join them into "
            f"one model.pt in this folder {SHARDS_JOINED}")


def is_part_of_the_weights(name: str) -> bool:
    """Whether a file is one of several shards of a state dict (model-00001-of-00001.* is all of it)."""
    found = re.search(SHARD_NAME, name)
    return bool(found) and int(found[1]) > 1


def jax_checkpoint_hint(folder: str) -> str:
    """For a JAX checkpoint (a training run, one of its steps or a converted folder), how to export
    it, as words to add; else ''."""
    from pixelflow_jax.checkpoints.checkpoint import CONFIG_FILE
    from pixelflow_jax.checkpoints.run_checkpoint import find_run_step, is_run

    if storage.isfile(storage.join(folder, CONFIG_FILE)) or is_run(folder) or find_run_step(folder):
        return (f"; it is a JAX checkpoint (a training run or a converted folder): export it with --to_torch "
                f"--jax_checkpoint={folder}")
    return ""


def what_the_folder_holds(path: str) -> str:
    """What a folder without model.pt is instead: a JAX checkpoint, or weights under another name."""
    if jax_hint := jax_checkpoint_hint(path):
        return jax_hint
    if shards := shards_hint(path):
        return shards
    if others := weight_files(path):
        newest = others[-1]
        # torch.load tells a safetensors file by its name's ending: renamed model.pt, it no longer reads
        rename = ("" if newest.endswith(".safetensors")
                  else ", or rename it model.pt if it is the release's state dict")
        config = storage.join(path, "config.yaml")  # named only where it is: else the command fails on it
        described = f" --torch_config={config}" if storage.isfile(config) else ""
        return (f"; it holds {listed(others)}: convert that file (convert_torch_ckpt.py --torch_checkpoint="
                f"{storage.join(path, newest)}{described}){rename}")
    return ""


def settings_file_message(path: str, folder: str) -> str:
    """A YAML file named as the weights: a release folder's config.yaml, which describes them."""
    weights = storage.join(folder, "model.pt")
    if storage.isfile(weights):
        return (f"{path} is the release folder's settings file (config.yaml), not its weights: pass the folder "
                f"(--torch_checkpoint={folder}) or its model.pt (--torch_checkpoint={weights})")
    return (f"{path} is a settings file (a release config.yaml), not weights: pass the weights file it describes "
            f"(--torch_checkpoint=WEIGHTS.pt --torch_config={path}), or the folder holding both as config.yaml + "
            "model.pt")


@dataclasses.dataclass(frozen=True)
class ReleaseWeights:
    config: CheckpointConfig
    state_dict: dict[str, np.ndarray]
    note: str | None  # which of a train.py checkpoint's two sets these are (training_set_note); else None


def training_set_note(weights_path: str, weights: str) -> str:
    """Which set of a train.py checkpoint was read, in the words of an export's note: its conversion
    recorded nothing, so the folders of its EMA and of its raw weights could not be told apart. The
    file by its name alone: the folder is handed on, the path is this machine's."""
    which = "the EMA (--weights=ema)" if weights == "ema" else "the raw weights, not their EMA (--weights=model),"
    return f"weights: {which} of the train.py checkpoint {storage.basename(weights_path)}"


def read_release_checkpoint(path: str, **options) -> tuple[CheckpointConfig, dict[str, np.ndarray]]:
    """(config, numpy state dict) of read_release_weights."""
    release = read_release_weights(path, **options)
    return release.config, release.state_dict


def read_release_weights(path: str, *, torch_config: str | None = None, weights: str = "ema",
                         attention_head_dim: int | None = None,
                         overrides: Mapping[str, int] | None = None) -> ReleaseWeights:
    """The config and numpy state dict of a release folder, bare state dict or train.py checkpoint.

    The architecture comes from `torch_config` (or the folder's config.yaml), else from tensor
    shapes plus `attention_head_dim`. `overrides` sets resolution / num_stages /
    num_train_timesteps where the config has none (the release's values otherwise).
    """
    if storage.isdir(path):
        weights_path = storage.join(path, "model.pt")
        if not storage.isfile(weights_path):
            # a folder named like the weights (an unpacked archive?): "without model.pt" read as nonsense
            what = ("a folder, not a weights file" if path.rstrip("/").endswith(WEIGHT_FILE_ENDINGS)
                    else "a folder without model.pt")
            raise CheckpointError(f"{path} is {what}; a release folder holds config.yaml + "
                                  f"model.pt{what_the_folder_holds(path)}")
        described_by = folder_config_yaml(path)
        if torch_config and described_by:
            check_same_config(torch_config, described_by, weights_path)
        loaded = load_torch_file(weights_path)
    else:
        weights_path = path
        folder = storage.dirname(path) or "."
        if path.endswith((".yaml", ".yml")) and storage.isfile(path):  # torch read it as "Unsupported operand"
            raise CheckpointError(settings_file_message(path, folder))
        if is_part_of_the_weights(storage.basename(path)):  # converted, it listed the others' keys as missing
            raise CheckpointError(f"{path} is one shard of a state dict, only part of the weights: join the shards "
                                  f"into one model.pt {SHARDS_JOINED}")
        # a converted folder's pixelflow_config.json, say: torch's refusal read as a damaged file
        if not path.endswith(WEIGHT_FILE_ENDINGS) and (jax_hint := jax_checkpoint_hint(folder)):
            raise CheckpointError(f"{path} is not PyTorch weights but a file of the folder {folder}{jax_hint}")
        loaded = load_torch_file(weights_path)
        described_by = config_beside(path, loaded)
    torch_config = torch_config or described_by
    note = training_set_note(weights_path, weights) if is_training_checkpoint(loaded) else None
    state_dict = extract_state_dict(loaded, weights_path, weights)

    extras: dict[str, int] = {}
    if torch_config:
        params, extras = config_from_release_yaml(torch_config)
        if attention_head_dim is not None and attention_head_dim != params.get("attention_head_dim"):
            raise CheckpointError(f"--attention_head_dim={attention_head_dim} disagrees with {torch_config} "
                                  f"(attention_head_dim: {params.get('attention_head_dim')})")
    else:
        params = infer_architecture(state_dict, attention_head_dim)
    return ReleaseWeights(release_config(params, extras, overrides, path, torch_config, described_by), state_dict, note)


def folder_config_yaml(folder: str) -> str | None:
    """folder/config.yaml where that file is, else None; a folder of that name is named (read as no
    config.yaml, it had the converter ask for --torch_config=config.yaml)."""
    path = storage.join(folder, "config.yaml")
    if storage.isdir(path):
        raise CheckpointError(f"{path} is a folder, where a release folder's config.yaml is the YAML file of its "
                              "settings: move that folder away and put the config.yaml that came with model.pt there")
    return path if storage.isfile(path) else None


def config_beside(path: str, loaded: Any) -> str | None:
    """The config.yaml that describes a weights file named alone: beside a release folder's model.pt,
    or beside a train.py checkpoint, whose output folder train.py gives its config.yaml and its
    model_STEP.pt files (read without it, a 3-stage run's weights were converted as 4 stages)."""
    described = storage.basename(path) == "model.pt" or is_training_checkpoint(loaded)
    folder_config = folder_config_yaml(storage.dirname(path) or ".") if described else None
    if folder_config and is_release_yaml(folder_config):
        return folder_config  # another project's config.yaml beside a state dict says nothing
    return None


def is_training_checkpoint(loaded: Any) -> bool:
    """Whether torch.load's result is train.py's dict of 'model', 'ema', 'opt' and 'args'."""
    return isinstance(loaded, Mapping) and isinstance(loaded.get("model"), Mapping)


def check_same_config(flag_config: str, folder_config: str, weights_path: str) -> None:
    """--torch_config beside a release folder that has its own config.yaml: the flag's file won
    without a word (a 3-stage config over 4-stage weights converted as 3 stages)."""
    (given, given_extras), (own, own_extras) = map(config_from_release_yaml, (flag_config, folder_config))
    given, own = {**given, **given_extras}, {**own, **own_extras}
    differing = sorted(key for key in set(given) | set(own) if given.get(key) != own.get(key))
    if differing:
        raise CheckpointError(f"--torch_config {flag_config} disagrees with {folder_config}, the folder's own config "
                              f"(differing: {', '.join(differing)}): drop --torch_config, or name the weights file "
                              f"({weights_path}) to describe it with another config")


def is_release_yaml(path: str) -> bool:
    """Whether a YAML file is shaped as the release's configs (model.params); one that is, but wrong,
    is named by config_from_release_yaml."""
    try:
        values = parsed_yaml(storage.read_text(path))
    except (yaml.YAMLError, UnicodeDecodeError):
        values = None
    shaped = isinstance(values, dict) and isinstance(values.get("model"), dict) and "params" in values["model"]
    if not shaped:
        logging.warning("%s is not a release config.yaml (no model.params): not used", path)
    return shaped


def release_folder_config(folder: str) -> CheckpointConfig:
    """The CheckpointConfig of a release folder, from its config.yaml alone (model.pt unread)."""
    torch_config = storage.join(folder, "config.yaml")
    return release_config(*config_from_release_yaml(torch_config), None, folder, torch_config)


def resolution_source(given: Mapping[str, int], extras: Mapping[str, int]) -> str:
    """Where release_config's resolution came from: the flag, the config.yaml, or the release's default."""
    if "resolution" in extras:
        return "config.yaml"
    return "flag" if "resolution" in given else "assumed"


def check_whole_patch_grids(patch_size: int, settings: Mapping[str, int], source: str,
                            torch_config: str | None) -> None:
    """A resolution that leaves some stage without a whole patch grid, named as the user gave it
    (--resolution, the config.yaml's data.resolution, or the release's default assumed) with the fix:
    CheckpointConfig's own message named a value the user may never have given, and no flag."""
    resolution, num_stages = settings["resolution"], settings["num_stages"]
    if num_stages < 1 or resolution < 1:
        return  # no stages or no resolution: CheckpointConfig names them
    factor = patch_size * 2 ** (num_stages - 1)
    if factor > LARGEST_IMAGE_SIDE or resolution % factor == 0:
        return  # far too many stages: CheckpointConfig names them
    named = {"flag": f"--resolution={resolution}", "config.yaml": f"data.resolution {resolution} in {torch_config}",
             "assumed": f"the release's {resolution} px, assumed as no config.yaml gives data.resolution,"}[source]
    problem = (f"{named} must be a multiple of patch_size {patch_size} x 2^(num_stages {num_stages} - 1) = {factor} "
               "so that every stage has a whole patch grid")
    if source == "config.yaml":
        raise ValueError(f"{problem}: that config.yaml does not describe these weights; correct its data.resolution "
                         "or scheduler.num_stages")
    fitting = " or ".join(f"--resolution={multiple}" for multiple in nearest_multiples(resolution, factor))
    raise ValueError(f"{problem}: pass {fitting} (the resolution the weights were trained at), or --num_stages")


def release_config(params: dict[str, Any], extras: dict[str, int], overrides: Mapping[str, int] | None,
                   path: str, torch_config: str | None, described_by: str | None = None) -> CheckpointConfig:
    """The architecture `params`, with resolution / num_stages / num_train_timesteps from the
    config.yaml (`extras`), else `overrides`, else the release's values; the text training recorded
    by `torch_config` and by `described_by`, the config.yaml beside the weights (recorded_text_training)."""
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    conflicts = [f"--{k}={v} ({extras[k]} in {torch_config})" for k, v in given.items()
                 if k in extras and extras[k] != v]
    if conflicts:  # the config describes the weights: a flag that disagrees is a mistake, not an override
        raise CheckpointError(f"{', '.join(conflicts)}: the config.yaml decides these; drop the flags")
    defaults = RELEASE_T2I_DEFAULTS if params.get("cross_attention_dim") else RELEASE_DEFAULTS
    settings = {**defaults, **given, **extras}
    if "resolution" not in given and "resolution" not in extras:  # the weights fit any resolution: nothing can tell
        source = f"{torch_config} gives no data.resolution" if torch_config else "no config.yaml gives the resolution"
        logging.warning("%s: %s, so %d px is assumed (the release's); pass --resolution for weights trained at "
                        "another", path, source, settings["resolution"])
    assumed = [k for k in ("num_stages", "num_train_timesteps") if k not in given and k not in extras]
    if assumed:  # a config.yaml cut short (every released one gives them), or none: weights never tell them
        source = f"{torch_config} gives no" if torch_config else f"{path}: no config.yaml gives"
        logging.warning("%s scheduler.%s: %s assumed (the release's); pass %s to set %s", source,
                        " / ".join(assumed), ", ".join(f"{k} {settings[k]}" for k in assumed),
                        " / ".join(f"--{k}" for k in assumed), "them" if len(assumed) > 1 else "it")
    try:
        model = ModelConfig.from_mapping(params)
        check_whole_patch_grids(model.patch_size, settings, resolution_source(given, extras), torch_config)
        config = CheckpointConfig(model=model, **settings, **recorded_text_training(torch_config, described_by))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid architecture for {path}: {e}") from None
    if not config.model.num_classes and not config.model.cross_attention_dim:
        logging.warning("%s is an unconditional model (no num_classes, no cross_attention_dim): it can be inspected "
                        "and exported here, but not sampled or trained", path)
    return config


# config.yaml's first line in an export: what tells it from a release folder downloaded by the
# user, which convert_torch_ckpt.py --overwrite must never replace (a YAML comment: the release
# reads the file as before).
EXPORT_MARK = "# written by pixelflow-jax: convert_torch_ckpt.py --to_torch"


def export_header(folder: str) -> list[str] | None:
    """The first two lines of an export's config.yaml (the mark, then what follows it); None for
    a folder that is no export of this tool."""
    path = storage.join(folder, "config.yaml")
    if not storage.isfile(path):
        return None
    lines = storage.read_text(path).split("\n", 2)
    return lines[:2] if len(lines) > 1 and lines[0] == EXPORT_MARK else None


def is_export(folder: str) -> bool:
    return export_header(folder) is not None


def export_note(folder: str) -> str | None:
    """What an export's config.yaml says, under the mark, of the weights it holds (a training run's
    EMA or raw weights, and the step; write_release_checkpoint's weights_from), or None: also for
    a converted folder or a run's step, which hold no config.yaml."""
    second = (export_header(folder) or ["", ""])[1]
    return second[2:] if second.startswith("# ") else None


def release_yaml(config: CheckpointConfig) -> dict[str, Any]:
    """The model, scheduler and resolution of the release's config.yaml: what sample_ddp.py and
    the release's pipeline read to build a model (not train.py's training settings). A text run's
    export adds train.max_text_tokens and text_encoder_dtype, how it encoded captions (text_training_of)."""
    params = config.model.architecture()
    if not params["cross_attention_dim"]:
        params.pop("cross_attention_dim")  # the release's default, None, means no cross-attention
    values = {
        "model": {"target": RELEASE_MODEL_TARGET, "params": params},
        "scheduler": {"num_train_timesteps": config.num_train_timesteps, "num_stages": config.num_stages,
                      "pyramid_shift": False},
        "data": {"resolution": config.resolution},
    }
    if config.text_training():
        values["train"] = config.text_training()
    return values


def text_training_of(torch_config: str) -> dict[str, Any]:
    """{max_text_tokens, text_encoder_dtype}: how a text run encoded its captions, those that a
    release config.yaml records under train (an export of the run; the release's code reads
    neither and encodes prompts at 512 tokens with float32 T5 weights). Sampled so here, a prompt is
    cut where training cut its captions, and its embeddings are those the model learned."""
    train = release_yaml_values(torch_config).get("train") or {}
    recorded = {name: train[name] for name in ("max_text_tokens", "text_encoder_dtype") if name in train}
    tokens, dtype = recorded.get("max_text_tokens", 512), recorded.get("text_encoder_dtype", "float32")
    if not is_text_token_count(tokens):
        raise CheckpointError(f"{torch_config}: train.max_text_tokens must be a whole number from {MIN_TEXT_TOKENS} "
                              f"to {MAX_TEXT_TOKENS} (the prompt length the model trained with), got {tokens!r}: mend "
                              "it, or remove it to sample at the release's 512")
    if dtype not in TEXT_ENCODER_DTYPES:
        choices = " or ".join(map(repr, TEXT_ENCODER_DTYPES))
        raise CheckpointError(f"{torch_config}: train.text_encoder_dtype must be {choices} (the T5 weights' dtype "
                              f"the model trained with), got {dtype!r}: mend it, or remove it to sample with float32 "
                              "weights")
    return recorded


def recorded_text_training(torch_config: str | None, described_by: str | None) -> dict[str, Any]:
    """text_training_of `torch_config`, with what it lacks taken from `described_by`, the config.yaml
    beside the weights: --torch_config given beside an export (the release's file, of the same
    architecture) dropped how the run encoded its captions. A value the two give differently is named."""
    given = text_training_of(torch_config) if torch_config else {}
    if not described_by or described_by == torch_config:
        return given
    recorded = text_training_of(described_by)
    for name in sorted(given.keys() & recorded.keys()):
        if given[name] != recorded[name]:
            raise CheckpointError(f"--torch_config {torch_config} gives train.{name} {given[name]} where "
                                  f"{described_by}, which describes the weights, records {recorded[name]} (how their "
                                  f"run encoded its captions): drop train.{name} from {torch_config}, or drop "
                                  "--torch_config")
    return {**recorded, **given}


def write_release_checkpoint(path: str, state_dict: Mapping[str, np.ndarray], config: CheckpointConfig,
                             overwrite: bool = False, weights_from: str | None = None) -> None:
    """A release folder (config.yaml + model.pt) that the release loads with strict=True;
    `weights_from`, which weights they are, becomes a comment under the mark (yaml ignores it)."""
    torch = _import_torch()
    text = yaml.safe_dump(release_yaml(config), sort_keys=False)
    header = f"{EXPORT_MARK}\n" + (f"# {weights_from}\n" if weights_from else "")
    with atomic_output_dir(path, overwrite) as tmp:
        # model.pt last: in an object store, a folder without it is an unfinished export.
        storage.write_atomically(storage.join(tmp, "config.yaml"), f"{header}{text}")
        tensors = {k: torch.from_numpy(np.array(v, dtype=v.dtype, copy=True)) for k, v in state_dict.items()}
        if storage.is_url(tmp):
            with tempfile.TemporaryDirectory(prefix="pixelflow_export_") as local:
                torch.save(tensors, os.path.join(local, "model.pt"))
                storage.upload_file_atomically(os.path.join(local, "model.pt"), storage.join(tmp, "model.pt"))
        else:
            torch.save(tensors, os.path.join(tmp, "model.pt"))
