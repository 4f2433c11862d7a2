"""Mapping between the release's PyTorch state dict and this model's NNX parameters.

Every NNX parameter path names its torch key(s) mechanically (the modules mirror the release's
names); three layout rules cover the rest:
  - Linear: torch weight (out, in) <-> NNX kernel (in, out).
  - Patch embedding: torch Conv2d weight (C, c, p, p) <-> kernel (p*p*c, C) on (ph, pw, c) patches.
  - Blocks: torch `transformer_blocks.{i}.*` <-> one stacked NNX array with a leading depth axis.
Conversion is strict: every torch tensor used exactly once, every parameter filled, shapes equal.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping

import numpy as np
from flax import nnx, traverse_util

from pixelflow_jax.config import ModelConfig
from pixelflow_jax.model import PixelFlow

Params = dict  # nested dict of arrays, the pure-dict form of the model's nnx.Param state
BLOCKS = "transformer_blocks"


class ConversionError(ValueError):
    """The weights and the architecture do not match; the message lists every problem found."""


def param_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flat {path: shape} of the model's parameters, without allocating them."""
    abstract = nnx.eval_shape(lambda: PixelFlow(cfg, rngs=nnx.Rngs(0)))
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
    return {tuple(str(k) for k in path): tuple(leaf.shape) for path, leaf in flat.items()}


def _layout(path: tuple[str, ...], cfg: ModelConfig):
    """(torch leaf name, torch->nnx array fn, nnx->torch array fn) for one (unstacked) parameter."""
    *modules, leaf = path
    same = lambda a: a
    if leaf == "kernel" and modules == ["patch_embed", "proj"]:
        p, c = cfg.patch_size, cfg.in_channels
        to_nnx = lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * c, w.shape[0])
        to_torch = lambda k: k.reshape(p, p, c, k.shape[-1]).transpose(3, 2, 0, 1)
        return "weight", to_nnx, to_torch
    if leaf == "kernel":
        return "weight", lambda w: w.T, lambda k: k.T
    if leaf == "embedding":
        return "weight", same, same
    return leaf, same, same


def _torch_keys(path: tuple[str, ...], leaf_name: str, cfg: ModelConfig) -> list[str]:
    """The torch key(s) of a parameter: one per layer for stacked block parameters."""
    *modules, _ = path
    if modules[0] == BLOCKS:
        rest = ".".join([*modules[1:], leaf_name])
        return [f"{BLOCKS}.{i}.{rest}" for i in range(cfg.depth)]
    return [".".join([*modules, leaf_name])]


def _format_problems(missing, unexpected, mismatched) -> str:
    def listing(title, items):
        items = list(items)
        shown = "\n".join(f"    {item}" for item in items[:20])
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"  {title} ({len(items)}):\n{shown}{more}"

    parts = []
    if missing:
        parts.append(listing("missing keys (the architecture needs them, the checkpoint lacks them)", missing))
    if unexpected:
        parts.append(listing("unexpected keys (in the checkpoint, not in the architecture)", unexpected))
    if mismatched:
        parts.append(listing("shape mismatches (key: checkpoint shape vs architecture shape)", mismatched))
    return "\n".join(parts)


def torch_to_params(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig,
                    progress: Callable[[int, int], None] | None = None) -> Params:
    """Release state dict (name -> float array) -> nested NNX parameter dict in cfg.param_dtype.

    Raises ConversionError naming every missing, unexpected and mis-shaped key.
    """
    shapes = param_shapes(cfg)
    missing, mismatched, used = [], [], set()
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for path, shape in shapes.items():
        leaf_name, to_nnx, to_torch = _layout(path, cfg)
        keys = _torch_keys(path, leaf_name, cfg)
        layer_shape = shape[1:] if path[0] == BLOCKS else shape
        expected = tuple(to_torch(np.empty(layer_shape, np.float32)).shape)
        arrays = []
        for key in keys:
            if key not in state_dict:
                missing.append(key)
                continue
            used.add(key)
            tensor = np.asarray(state_dict[key])
            if tuple(tensor.shape) != expected:
                mismatched.append(f"{key}: {tuple(tensor.shape)} vs {expected}")
                continue
            arrays.append(to_nnx(tensor.astype(np.float32)))
        if len(arrays) == len(keys):
            value = np.stack(arrays) if path[0] == BLOCKS else arrays[0]
            flat[path] = value.astype(cfg.parameter_dtype)
        if progress:
            progress(len(used), len(state_dict))
    unexpected = sorted(set(state_dict) - used)
    if missing or unexpected or mismatched:
        raise ConversionError("the checkpoint does not match the architecture "
                              f"{cfg.architecture()}:\n{_format_problems(missing, unexpected, mismatched)}"
                              f"{_other_kind(state_dict, cfg) or _what_the_shapes_give(state_dict, cfg)}")
    return traverse_util.unflatten_dict(flat)


def _other_kind(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> str:
    """The cause in words when a text model's weights meet a config without cross-attention (the
    class config copied into the text release's folder, which ships none), or the other way round."""
    text_weights = any(key.startswith(f"{BLOCKS}.0.attn2.") for key in state_dict)
    if text_weights == bool(cfg.cross_attention_dim):
        return ""
    weights, config = (("cross-attention (attn2: a text-to-image model)", "none (a class config?)") if text_weights
                       else ("no cross-attention (attn2: not a text-to-image model)", "it (cross_attention_dim)"))
    return (f"\n  the weights have {weights} and the architecture has {config}: describe them with their own "
            "config.yaml, or with none (the architecture read from tensor shapes, with --attention_head_dim)")


def _what_the_shapes_give(state_dict: Mapping[str, np.ndarray], cfg: ModelConfig) -> str:
    """The architecture values that the weights' shapes give and the architecture does not, with the
    fix: a config.yaml of another preset was told by its keys alone, not by which of its values is wrong."""
    try:
        inferred = infer_architecture(state_dict, cfg.attention_head_dim)
    except ConversionError:  # too little of a PixelFlow state dict to tell
        return ""
    given = cfg.architecture()
    differing = [name for name, value in inferred.items() if value != given[name]]
    if not differing:
        return ""
    values = lambda architecture: ", ".join(f"{name} {architecture[name]}" for name in differing)
    return (f"\n  the weights' shapes give {values(inferred)} where the architecture has {values(given)}: describe "
            "them with the config.yaml they came with, or correct these values in it")


def check_exportable(cfg: ModelConfig) -> None:
    """Architectures the release's PixelFlow can load."""
    if cfg.pooled_text:
        raise ConversionError("this model has a pooled-text conditioning path (model.pooled_text=True) that the "
                              "release's PixelFlow lacks, so the release cannot load its weights; sample it with "
                              "this project (main.py --mode=sample), or train with model.pooled_text=False to export")


def params_to_torch(params: Params, cfg: ModelConfig) -> dict[str, np.ndarray]:
    """Nested NNX parameter dict -> the release's state dict (name -> numpy array), in the release's
    key order (embeddings, blocks by layer, output layers)."""
    check_exportable(cfg)
    shapes = param_shapes(cfg)
    flat = {tuple(str(k) for k in path): np.asarray(v) for path, v in traverse_util.flatten_dict(params).items()}
    missing = sorted(".".join(p) for p in set(shapes) - set(flat))
    unexpected = sorted(".".join(p) for p in set(flat) - set(shapes))
    mismatched = [f"{'.'.join(p)}: {flat[p].shape} vs {s}"
                  for p, s in shapes.items() if p in flat and flat[p].shape != s]
    if missing or unexpected or mismatched:
        raise ConversionError(f"the parameters do not match the architecture {cfg.architecture()}:\n"
                              f"{_format_problems(missing, unexpected, mismatched)}")
    state_dict = {}
    for path in shapes:
        leaf_name, _, to_torch = _layout(path, cfg)
        keys = _torch_keys(path, leaf_name, cfg)
        layers = flat[path] if path[0] == BLOCKS else [flat[path]]
        for key, value in zip(keys, layers):
            state_dict[key] = np.ascontiguousarray(to_torch(value), dtype=np.float32)  # the release's dtype
    return dict(sorted(state_dict.items(), key=lambda item: _release_order(item[0])))


_RELEASE_MODULE_ORDER = ["patch_embed", "timestep_embedder", "latent_size_embedder", "class_embedder", BLOCKS,
                         "proj_out_1", "proj_out_2"]
_RELEASE_BLOCK_ORDER = ["norm1", "attn1", "norm2", "attn2", "norm3", "mlp"]
_RELEASE_LEAF_ORDER = ["q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm", "linear_1", "linear_2", "fc1", "fc2"]


def _release_order(key: str):
    """Sort key reproducing the order in which the release registers its modules."""
    parts = key.split(".")
    rank = lambda name, order: order.index(name) if name in order else len(order)
    if parts[0] == BLOCKS:
        return (rank(BLOCKS, _RELEASE_MODULE_ORDER), int(parts[1]), rank(parts[2], _RELEASE_BLOCK_ORDER),
                rank(parts[3], _RELEASE_LEAF_ORDER) if len(parts) > 4 else 0, parts[-1] != "weight")
    return (rank(parts[0], _RELEASE_MODULE_ORDER), 0, 0, rank(parts[1], _RELEASE_LEAF_ORDER), parts[-1] != "weight")


def infer_architecture(state_dict: Mapping[str, np.ndarray], attention_head_dim: int | None) -> dict:
    """Architecture values that follow from tensor shapes. The split of the width into heads does
    not (q/k norms span the full width), so attention_head_dim must be given."""
    try:
        patch = state_dict["patch_embed.proj.weight"]
        out = state_dict["proj_out_2.weight"]
    except KeyError as e:
        raise ConversionError(f"cannot infer the architecture: the checkpoint has no {e.args[0]} tensor; "
                              "is it a PixelFlow state dict?") from None
    if np.ndim(patch) != 4 or patch.shape[2] != patch.shape[3] or not patch.shape[2]:
        raise ConversionError(f"cannot infer the architecture: patch_embed.proj.weight has shape {tuple(patch.shape)}, "
                              "where a PixelFlow checkpoint's is (width, in_channels, patch, patch): is the file "
                              "damaged, or not a PixelFlow state dict?")
    hidden, in_channels, patch_size = patch.shape[0], patch.shape[1], patch.shape[2]
    if np.ndim(out) != 2 or not out.shape[0] or out.shape[0] % (patch_size * patch_size):
        raise ConversionError(f"cannot infer the architecture: proj_out_2.weight has shape {tuple(out.shape)}, where a "
                              f"PixelFlow checkpoint with patch {patch_size} (patch_embed.proj.weight) has "
                              f"(out_channels x {patch_size * patch_size}, width): is the file damaged, or not a "
                              "PixelFlow state dict?")
    layer_ids = {int(m.group(1)) for k in state_dict if (m := re.match(rf"{BLOCKS}\.(\d+)\.", k))}
    if attention_head_dim is None:
        raise ConversionError(f"cannot infer how the width {hidden} splits into attention heads from tensor shapes; "
                              "pass --torch_config=config.yaml or --attention_head_dim (72 in the released models)")
    if attention_head_dim < 1:
        raise ConversionError(f"attention_head_dim must be a positive number of channels per head, got "
                              f"{attention_head_dim} (72 in the released models)")
    if hidden % attention_head_dim:
        raise ConversionError(f"attention_head_dim {attention_head_dim} does not divide the model width {hidden}")
    table = state_dict.get("class_embedder.embedding_table.weight")
    cross = state_dict.get(f"{BLOCKS}.0.attn2.k_proj.weight")
    return dict(
        num_attention_heads=hidden // attention_head_dim,
        attention_head_dim=attention_head_dim,
        depth=len(layer_ids),
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=out.shape[0] // (patch_size * patch_size),
        num_classes=0 if table is None else table.shape[0] - 1,
        attention_bias=f"{BLOCKS}.0.attn1.q_proj.bias" in state_dict,
        cross_attention_dim=0 if cross is None else cross.shape[1],
    )

