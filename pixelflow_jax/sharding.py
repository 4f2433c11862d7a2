"""Meshes and partition rules: the batch over ('data', 'fsdp'), parameters over 'fsdp'.

One code path from one CPU device to a pod: with fsdp = 1 every parameter is replicated and the
batch is split over 'data'; with fsdp > 1 each parameter is split along its largest axis that
'fsdp' divides (never the stacked-layer axis), and XLA gathers it where it is used.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh over every device; 'data' takes what 'fsdp' leaves."""
    count = jax.device_count()
    if fsdp < 1 or count % fsdp:
        raise ValueError(f"mesh.fsdp ({fsdp}) must be a positive divisor of the device count ({count})")
    auto = jax.sharding.AxisType.Auto
    return jax.make_mesh((count // fsdp, fsdp), BATCH_AXES, axis_types=(auto, auto))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, stacked: bool) -> P:
    """Split the largest axis divisible by fsdp (skipping a leading layer axis); else replicate."""
    if fsdp == 1 or not shape:
        return P()
    first = 1 if stacked else 0
    candidates = [axis for axis in range(first, len(shape)) if shape[axis] % fsdp == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda a: shape[a])
    spec = [None] * len(shape)
    spec[axis] = "fsdp"
    return P(*spec)


def map_over_batch_shards(fn, *arrays):
    """fn(*arrays) run on each device's share of the batch (axis 0 of every array; None passes
    through) of the context mesh (`jax.set_mesh`), or once on the whole batch without one.

    Pallas kernels are opaque to XLA's partitioner, which would gather a sharded batch onto every
    device to call them; inside shard_map each device calls the kernel on its own examples.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or arrays[0].shape[0] % mesh.size:
        return fn(*arrays)
    batch = P(mesh.axis_names)
    specs = tuple(None if a is None else batch for a in arrays)
    return jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=batch, check_vma=False)(*arrays)


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a nested parameter dict (stacked block parameters sit under
    'transformer_blocks' with a leading layer axis)."""
    fsdp = mesh.shape["fsdp"]

    def rule(path, leaf):
        stacked = any(getattr(k, "key", None) == "transformer_blocks" for k in path)
        return NamedSharding(mesh, fsdp_spec(tuple(np.shape(leaf)), fsdp, stacked))

    return jax.tree_util.tree_map_with_path(rule, params)
