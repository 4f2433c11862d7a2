"""Meshes and partition rules: the batch over ('data', 'fsdp'), parameters over 'fsdp'.

One code path from one CPU device to a pod: with fsdp = 1 every parameter is replicated and the
batch is split over 'data'; with fsdp > 1 each parameter is split along its largest axis that
'fsdp' divides (never the stacked-layer axis), and XLA gathers it where it is used.
"""

from __future__ import annotations

import logging

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(fsdp: int = 1) -> Mesh:
    """A ('data', 'fsdp') mesh over every device; 'data' takes what 'fsdp' leaves."""
    count = jax.device_count()
    if fsdp < 1 or count % fsdp:
        divisors = ", ".join(str(d) for d in range(1, count + 1) if count % d == 0)
        raise ValueError(f"--config.mesh.fsdp ({fsdp}) must divide the device count ({count}): one of {divisors}")
    auto = jax.sharding.AxisType.Auto
    devices = jax.devices()
    if len({getattr(device, "slice_index", 0) for device in devices}) == 1:
        return jax.make_mesh((count // fsdp, fsdp), BATCH_AXES, axis_types=(auto, auto))
    return Mesh(multi_slice_grid(count // fsdp, fsdp, devices), BATCH_AXES, axis_types=(auto, auto))


def multi_slice_grid(data: int, fsdp: int, devices) -> np.ndarray:
    """The (data, fsdp) grid of devices that span several slices: a TPU multislice job, or GPUs on
    several nodes (jax gives each node its own slice_index, and jax.make_mesh refuses them). Each
    fsdp group stays inside one slice where it fits, so its gathers use the fast links and only
    'data' (the gradient reduction) crosses the slower network; else the devices in (slice,
    process, id) order."""
    from jax.experimental import mesh_utils

    slices = len({device.slice_index for device in devices})
    if data % slices == 0:
        try:
            return mesh_utils.create_hybrid_device_mesh((data // slices, fsdp), (slices, 1), devices)
        except ValueError:  # slices of unequal sizes
            pass
    ordered = sorted(devices, key=lambda device: (device.slice_index, device.process_index, device.id))
    return np.array(ordered, dtype=object).reshape(data, fsdp)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_array(values: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """An array of `sharding` built from the full host copy every process holds (multi-host safe)."""
    return jax.make_array_from_callback(values.shape, sharding, lambda index: values[index])


def global_arrays(tree, shardings):
    """Each leaf of `tree` (held whole by every process: on the host or on one of its devices) in
    its sharding of `shardings`, each process placing only its own devices' parts. Not
    jax.device_put: onto devices of several processes it first gathers every leaf whole from every
    process to check that they agree (every host receives a copy from each host, a leaf at a time:
    150 GB per host for a 2.4 GB text encoder on 64 hosts) and compiles a gather per leaf shape."""
    return jax.tree.map(lambda values, sharding: global_array(np.asarray(values), sharding), tree, shardings)


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


def attention_split(mesh, batch: int, heads: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(axes splitting the batch, axes splitting the heads): each mesh axis in order goes to the
    batch if it still divides it, else to the heads if it divides them, else to neither (the
    devices along it repeat the same work)."""
    batch_axes, head_axes = [], []
    for name, size in mesh.shape.items():
        if batch % size == 0:
            batch_axes.append(name)
            batch //= size
        elif heads % size == 0:
            head_axes.append(name)
            heads //= size
    return tuple(batch_axes), tuple(head_axes)


def keep_batch_split(x: jax.Array) -> jax.Array:
    """x with its leading axis, the batch (not for use under vmap), split over the context mesh's
    Auto axes as attention_split splits a batch; x itself without a mesh, or where no Auto axis of
    more than one device divides the batch (Explicit axes carry their shardings in the types, and
    inside shard_map the axes are Manual). Inside the blocks: with fsdp > 1 XLA's partitioner
    otherwise served an MLP's sharded weights by gathering the whole stage batch's activations
    onto every device and all-reducing their partial sums (activation traffic, per layer), instead
    of gathering the weights (FSDP)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    auto = {name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == jax.sharding.AxisType.Auto}
    batch_axes = tuple(a for a in attention_split(mesh, x.shape[0], 1)[0] if mesh.shape[a] > 1 and a in auto)
    if not batch_axes:  # no mesh axis splits this batch (the demo's 3 images on 8 devices): as it was
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(batch_axes)))


AUTO_AXES_FIX = ("build the mesh with axis_types=(jax.sharding.AxisType.Auto,) * len(axis_names) (jax.make_mesh's "
                 "default is Explicit), as pixelflow_jax.sharding.make_mesh does")


def check_auto_axes_only(arrays: dict) -> None:
    """Refuses an Explicit axis in the context mesh or in the type of any of `arrays` ({name:
    array}). The model splits its batch over Auto axes (keep_batch_split); under Explicit ones,
    jax.make_mesh's default, its reshapes and gathers failed deep inside jax (a ShardingTypeError
    naming a reshape, a scan whose carry changed type), and an input placed whole on such a mesh
    moved nnx.jit's copy of the parameters there, failing the next call under an Auto mesh."""
    if explicit := explicit_axes(jax.sharding.get_abstract_mesh()):
        raise ValueError(f"the mesh in context has Explicit axes {explicit}, and the model splits its batch over Auto "
                         f"axes only: {AUTO_AXES_FIX}")
    for name, value in arrays.items():
        if isinstance(value, jax.Array) and (explicit := explicit_axes(jax.typeof(value).sharding.mesh)):
            raise ValueError(f"{name} lies on a mesh with Explicit axes {explicit}, and the model splits its batch "
                             f"over Auto axes only: place it on a mesh of Auto axes; {AUTO_AXES_FIX}")


def explicit_axes(mesh) -> list[str]:
    return [name for name, kind in zip(mesh.axis_names, mesh.axis_types) if kind == jax.sharding.AxisType.Explicit]


def map_attention_over_mesh(kernel, q, k, v, key_mask):
    """kernel(q, k, v, key_mask) on each device's share of the batch and heads of the context mesh
    (`jax.set_mesh`), or once on everything without one. q, k, v: (B, L, H, D); key_mask: (B, Lk)
    or None.

    Pallas kernels are opaque to XLA's partitioner, which would gather the operands onto every
    device (or refuse, on TPU) to call them; inside shard_map each device runs its own part.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return kernel(q, k, v, key_mask)
    batch_axes, head_axes = attention_split(mesh, q.shape[0], q.shape[2])
    spec = P(batch_axes or None, None, head_axes or None, None)
    mask_spec = None if key_mask is None else P(batch_axes or None, None)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, mask_spec), out_specs=spec,
                         check_vma=False)(q, k, v, key_mask)


def replicate_on_local_devices(params):
    """(params replicated on this process's devices, the sharding that splits rows over them).
    For helpers that every process runs on its whole batch and reads back to the host (the text
    encoder, the Inception): no cross-host gather is needed."""
    mesh = Mesh(np.array(jax.local_devices()), ("data",))
    return jax.device_put(params, NamedSharding(mesh, P())), NamedSharding(mesh, P("data"))


# Where a parameter dict keeps its blocks stacked with a leading layer axis: PixelFlow, T5.
STACKED_BLOCKS = ("transformer_blocks", "blocks")


# Arrays of at least this many values that fsdp cannot split are named in a warning.
LARGE_REPLICATED = 1 << 20


def param_shardings(params, mesh: Mesh):
    """NamedShardings for a nested parameter dict (stacked block parameters sit under
    STACKED_BLOCKS with a leading layer axis). Large arrays that no axis of which fsdp divides
    stay whole on every device: a warning names them."""
    fsdp = mesh.shape["fsdp"]
    whole = []

    def rule(path, leaf):
        stacked = any(getattr(k, "key", None) in STACKED_BLOCKS for k in path)
        spec = fsdp_spec(tuple(np.shape(leaf)), fsdp, stacked)
        if fsdp > 1 and spec == P() and np.size(leaf) >= LARGE_REPLICATED:
            whole.append((jax.tree_util.keystr(path), np.shape(leaf), np.size(leaf) * np.dtype(leaf.dtype).itemsize))
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(rule, params)
    if whole:
        name, shape, _ = max(whole, key=lambda entry: entry[2])
        logging.warning("with mesh.fsdp = %d, %d large arrays (%.2f GB; a training state counts parameters, EMA and "
                        "optimiser moments apart) stay whole on every device: no axis of theirs that may be split "
                        "(the stacked layer axis never is) divides by %d (e.g. %s %s); an fsdp that divides the "
                        "model's widths splits them",
                        fsdp, len(whole), sum(entry[2] for entry in whole) / 1e9, fsdp, name, shape)
    return shardings


def batch_for(count: int, batch_size: int, devices: int) -> int:
    """The batch for `count` items of a job whose batches are padded to one static shape: at most
    batch_size, a multiple of the device count, and as even as that allows over the batches
    batch_size takes (50 images at batch 16: 4 batches of 13, not 64 rows of which 14 padding; 4
    images padded to a batch of 10**6 ran out of memory)."""
    batches = max(1, -(-count // batch_size))
    even = -(-count // batches)
    return max(devices, min(batch_size, -(-even // devices) * devices))
