"""pytorch-fid's FID Inception weights (pt_inception-2015-12-05-6726825d.pth) -> InceptionV3.

Strict like the PixelFlow converter: every tensor used, every parameter filled, shapes equal.
Two tensors are read and dropped on purpose: `fc.bias` (ADM's Inception Score multiplies by the
softmax weights only) and BatchNorm's `num_batches_tracked` counters (training bookkeeping).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import nnx, traverse_util

from pixelflow_jax import storage
from pixelflow_jax.checkpoints.checkpoint import CheckpointError, module_with_params
from pixelflow_jax.evaluation.inception import InceptionV3

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_NAME
UNUSED = ("fc.bias",)
# NNX leaf -> (torch suffix, torch -> NNX layout)
_LEAVES = {
    "kernel": ("conv.weight", lambda w: w.transpose(2, 3, 1, 0)),  # (out, in, kh, kw) -> (kh, kw, in, out)
    "bn_scale": ("bn.weight", None),
    "bn_bias": ("bn.bias", None),
    "bn_mean": ("bn.running_mean", None),
    "bn_var": ("bn.running_var", None),
}


def torch_key(path: tuple[str, ...]) -> tuple[str, object]:
    if path == ("fc_weight",):
        return "fc.weight", lambda w: w.T
    suffix, layout = _LEAVES[path[-1]]
    return ".".join([*path[:-1], suffix]), layout


def inception_params(state_dict: Mapping[str, np.ndarray]) -> dict:
    abstract = nnx.eval_shape(InceptionV3)
    shapes = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    missing, misshapen, flat, used = [], [], {}, set(UNUSED)
    for path, leaf in shapes.items():
        path = tuple(str(p) for p in path)
        key, layout = torch_key(path)
        if key not in state_dict:
            missing.append(key)
            continue
        used.add(key)
        value = np.asarray(state_dict[key], np.float32)
        value = layout(value) if layout else value
        if value.shape != leaf.shape:
            misshapen.append(f"{key}: shape {state_dict[key].shape} does not fit {'.'.join(path)} {leaf.shape}")
        flat[path] = value
    unused = sorted(k for k in set(state_dict) - used if not k.endswith("num_batches_tracked"))
    if not (missing or misshapen or unused):
        return traverse_util.unflatten_dict(flat)
    if "patch_embed.proj.weight" in state_dict:  # the likeliest wrong file here
        raise CheckpointError(f"a PixelFlow model's weights, not the FID Inception's: pass pytorch-fid's "
                              f"{WEIGHTS_NAME} ({WEIGHTS_URL})")
    # Counts and a few names: a wrong file lacks all ~470 tensors, and a line each buried the point.
    problems = [f"{len(missing)} of its {len(shapes)} tensors missing: {', '.join(missing[:5])}"
                + (", ..." if len(missing) > 5 else "")] if missing else []
    problems += misshapen[:5] + ([f"{len(misshapen) - 5} more of other shapes"] if len(misshapen) > 5 else [])
    if unused:
        problems.append(f"{len(unused)} tensor{'s' * (len(unused) > 1)} the FID Inception does not have, e.g. "
                        f"{unused[:3]}")
    raise CheckpointError(f"weights that are not the FID Inception's (pytorch-fid's {WEIGHTS_NAME}):\n  "
                          + "\n  ".join(problems))


def load_inception(path: str) -> InceptionV3:
    """The FID Inception from pytorch-fid's weights file; no download ever happens here."""
    if not storage.isfile(path):
        raise CheckpointError(f"Inception weights {path} not found: download {WEIGHTS_URL} (pytorch-fid's "
                              "FID Inception, converted from the 2015-12-05 TensorFlow graph) and pass its path")
    from pixelflow_jax.checkpoints.torch_io import float32_numpy, load_tensor_dict

    try:  # a file that is no torch file (an .npz given for the weights) was named without what to pass
        state_dict = float32_numpy(load_tensor_dict(path))
    except CheckpointError as e:
        raise CheckpointError(f"{e}; the Inception weights are pytorch-fid's {WEIGHTS_NAME} ({WEIGHTS_URL})") from None
    try:
        params = inception_params(state_dict)
    except CheckpointError as e:
        raise CheckpointError(f"{path} holds {e}") from None
    return module_with_params(InceptionV3, params)
