"""Device mesh and the one logical-axis -> mesh-axis rule table.

The mesh has three axes: `data` (pure data parallelism: params replicated), `fsdp` (data
parallelism with params, grads and optimizer state sharded ZeRO-3 style) and `tensor`
(Megatron-style splitting of heads / MLP width / vocabulary). Model code never names mesh
axes: params get logical axis names from their rows in `gmod_jax.param_layout` (the one
declaration of the tree) and `LOGICAL_RULES` maps those names to mesh axes, so re-sharding is an
edit of one table. The mesh uses `AxisType.Auto`: we annotate params and the
batch and let GSPMD/Shardy propagate shardings through the (unannotated) model code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from gmod_jax import param_layout

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis -> mesh axes (a tuple shards one dimension over several mesh axes, in order).
LOGICAL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", BATCH_AXES),
    ("embed", ("fsdp",)),
    ("mlp", ("tensor",)),
    ("heads", ("tensor",)),
    ("kv_heads", ("tensor",)),
    ("vocab", ("tensor",)),
    ("head_dim", ()),
    ("layers", ()),  # scanned layer stacks: every device holds its slice of every layer
    ("length", ()),  # sequence axis stays whole: MoD gather/scatter is then device-local
    ("norm", ()),  # norm scales and other small vectors: replicated
)

@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; exactly one may be -1 (= all remaining devices)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1

    def resolve(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {self}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {self}")
        known = math.prod(s for s in sizes if s != -1)
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not split into mesh {self}")
            sizes[sizes.index(-1)] = num_devices // known
        if math.prod(sizes) != num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                             f"have {num_devices}")
        return tuple(sizes)


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> jax.sharding.Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = config.resolve(len(devices))
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    slices = len({getattr(d, "slice_index", 0) for d in devices})
    if slices == 1:
        return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
    # Multi-slice TPU (slices joined by the data-center network): only the `data` axis crosses
    # slices, so FSDP / tensor collectives stay on the fast in-slice interconnect.
    from jax.experimental import mesh_utils

    data, fsdp, tensor = shape
    if data % slices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} over {slices} slices: the data axis ({data}) "
                         f"must be a multiple of the slice count (only data parallelism crosses slices)")
    grid = mesh_utils.create_hybrid_device_mesh((data // slices, fsdp, tensor), (slices, 1, 1), devices)
    return jax.sharding.Mesh(grid, MESH_AXES, axis_types=axis_types)


# ----------------------------------------------------------------------------------------------
# Logical axes -> partition specs


def path_str(path) -> str:
    """'llm/layers/attn/q/kernel' from a jax key path (dict keys, attributes or indices)."""
    parts = []
    for k in path:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        else:
            parts.append(str(k))
    return "/".join(parts)


def param_logical_axes(path: str, ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a param leaf, from its row in `gmod_jax.param_layout`. A leaf without a
    row raises `param_layout.UnannotatedParam` instead of being silently replicated."""
    return param_layout.logical_axes(path, ndim)


def logical_to_spec(logical_axes: Iterable[str | None], shape: Sequence[int], axis_sizes: dict[str, int],
                    rules=LOGICAL_RULES) -> P:
    """PartitionSpec for one array. A dimension whose size is not divisible by the product of
    its mesh axes is replicated instead (e.g. 40 heads on tensor=16); a mesh axis already used
    by an earlier dimension is not reused (a spec may name each mesh axis once)."""
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, dim in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in the rule table")
        mesh_axes = tuple(a for a in table[name] if a not in used and axis_sizes.get(a, 1) > 1)
        size = math.prod(axis_sizes[a] for a in mesh_axes)
        if not mesh_axes or dim % size:
            spec.append(None)
            continue
        used.update(mesh_axes)
        spec.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    return P(*spec)


def _axis_sizes(mesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, mesh.axis_sizes))


def param_specs(params_or_shapes, axis_sizes: dict[str, int], rules=LOGICAL_RULES):
    """PartitionSpec tree for a param tree (arrays or ShapeDtypeStructs), from mesh axis sizes
    alone so it can be computed without devices."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: logical_to_spec(param_logical_axes(path_str(path), len(x.shape)), x.shape, axis_sizes, rules),
        params_or_shapes)


def param_shardings(params_or_shapes, mesh, rules=LOGICAL_RULES):
    """NamedSharding tree for a param tree (arrays or ShapeDtypeStructs)."""
    specs = param_specs(params_or_shapes, _axis_sizes(mesh), rules)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def batch_spec(ndim_prefix: int = 0) -> P:
    """Spec that shards the batch axis (after `ndim_prefix` unsharded leading axes, e.g. the
    grad-accumulation axis) over `data` x `fsdp`; every other axis whole."""
    return P(*([None] * ndim_prefix), BATCH_AXES)


def constrain_batch(x):
    """`x` [B, ...] with its batch axis pinned to the mesh's batch axes, when a mesh is set
    (`jax.set_mesh`) and they divide B; otherwise `x` unchanged.

    The mesh is `AxisType.Auto` and model code is unannotated, so GSPMD picks activation
    shardings by propagation, and the params' FSDP sharding of `embed` can win over the inputs'
    batch sharding: a 7B train step compiled for TPU then held the whole batch's activations on
    every chip, split over the hidden dimension, and all-reduced them at every layer
    (docs/tpu_aot.md). The decoder and the vision towers (CLIP, multi-path, ConvNeXt) pin their
    layer inputs with this."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
    axes = tuple(a for a in BATCH_AXES if sizes.get(a, 1) > 1)
    if not axes or x.shape[0] % math.prod(sizes[a] for a in axes):
        return x
    return jax.lax.with_sharding_constraint(x, P(axes, *([None] * (x.ndim - 1))))


def batch_sharding(mesh, ndim_prefix: int = 0) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(ndim_prefix))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def logical_sharding(mesh, logical_axes: Sequence[str | None], shape: Sequence[int], rules=LOGICAL_RULES):
    """NamedSharding for an activation named by logical axes (for `jax.lax.with_sharding_constraint`)."""
    return NamedSharding(mesh, logical_to_spec(logical_axes, shape, _axis_sizes(mesh), rules))


def batch_shard_count(mesh) -> int:
    sizes = _axis_sizes(mesh)
    return math.prod(sizes[a] for a in BATCH_AXES)


def process_batch_rows(mesh, batch_size: int) -> tuple[int, int]:
    """[start, stop) rows of a [batch_size, ...] batch-sharded array that this process's devices
    hold; every process feeds exactly these rows (`jax.make_array_from_process_local_data`)."""
    sharding = batch_sharding(mesh)
    rows = set()
    for index in sharding.addressable_devices_indices_map((batch_size,)).values():
        sl = index[0]
        rows.update(range(*sl.indices(batch_size)))
    lo, hi = min(rows), max(rows) + 1
    if len(rows) != hi - lo:
        raise ValueError("this process's devices hold a non-contiguous part of the batch; "
                         "order the mesh so each process owns one block of the batch axes")
    return lo, hi


def describe(params_or_shapes, mesh) -> str:
    """One line per param: path, shape and spec (for logs and debugging)."""
    specs = param_specs(params_or_shapes, _axis_sizes(mesh))
    lines = []
    for (path, x), spec in zip(jax.tree_util.tree_flatten_with_path(params_or_shapes)[0], jax.tree.leaves(
            specs, is_leaf=lambda s: isinstance(s, P))):
        lines.append(f"{path_str(path):45s} {str(tuple(np.shape(x))):28s} {spec}")
    return "\n".join(lines)
