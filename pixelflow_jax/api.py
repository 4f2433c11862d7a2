"""The public entry point: a converted checkpoint (or a release folder) -> NNX model + config."""

from __future__ import annotations

import dataclasses
import os

from pixelflow_jax.checkpoint import (CONFIG_FILE, CheckpointConfig, CheckpointError, build_model, read_config,
                                      restore_params)
from pixelflow_jax.model import PixelFlow


def load_model(path: str, *, dtype: str | None = None, attention: str | None = None,
               weights: str = "ema") -> tuple[PixelFlow, CheckpointConfig]:
    """Loads a model ready to call.

    path: a folder written by convert_torch_ckpt.py, or a release folder (config.yaml + model.pt;
      needs torch) converted in memory.
    dtype: compute dtype ('float32', 'bfloat16'); default: the one stored with the checkpoint.
    attention: attention backend (see pixelflow_jax.attention); default: the stored one.
    weights: for a train.py checkpoint, 'ema' or 'model'.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist")
    if os.path.isfile(os.path.join(path, CONFIG_FILE)):
        config = read_config(path)
        params = None
    else:
        from pixelflow_jax.convert import torch_to_params
        from pixelflow_jax.torch_io import read_release_checkpoint

        config, state_dict = read_release_checkpoint(path, weights=weights)
        params = torch_to_params(state_dict, config.model)
    runtime = {k: v for k, v in (("dtype", dtype), ("attention", attention)) if v is not None}
    if runtime:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, **runtime))
    if params is None:
        params = restore_params(path, config)
    return build_model(config, params), config
