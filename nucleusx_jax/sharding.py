"""Device mesh and sharding rules: logical axis names -> mesh axes ``data``, ``fsdp``, ``tensor``, ``sequence``.

Parameters carry logical names (``nn.with_logical_partitioning`` in :mod:`nucleusx_jax.modeling`):

=============  =====================  ================================================================
logical        mesh axis              what it shards
=============  =====================  ================================================================
``batch``      (``data``, ``fsdp``)   the rows of every batch
``embed``      ``fsdp``               the model width of every matrix (FSDP / ZeRO-3)
``heads``      ``tensor``             q/k/v/g columns and out_proj rows (Megatron tensor parallelism)
``mlp``        ``tensor``             fc1/gate columns and fc2 rows
``vocab``      ``tensor``             the embedding table and the LM head over the vocabulary
``norm``       replicated             norm weights
``layers``     replicated             the leading depth axis of ``scan_layers`` parameters (each device holds
                                      every layer's share of the other axes)
``length``     ``sequence``           the positions of the residual stream ``[B, T, E]``, constrained to
                                      (``batch``, ``length``, ``act_embed``): sequence parallelism
``act_embed``  replicated             the width of the residual stream
=============  =====================  ================================================================

Along ``sequence`` every device holds a contiguous slice of each row; retention passes its state across the
slices (:mod:`nucleusx_jax.sequence_parallel`), every other part of the model works token by token.

The optimizer state mirrors the parameters, so it is sharded the same way.
"""

from typing import Any, Dict, Mapping, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

SEQUENCE_AXIS, TENSOR_AXIS = "sequence", "tensor"
MESH_AXES: Tuple[str, ...] = ("data", "fsdp", TENSOR_AXIS, SEQUENCE_AXIS)
BATCH_AXES: Tuple[str, ...] = ("data", "fsdp")
LOGICAL_AXIS_RULES: Tuple[Tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),
    ("length", SEQUENCE_AXIS),
    ("act_embed", None),
)
AnyMesh = Union[Mesh, AbstractMesh]


def resolve_mesh_shape(shape: Mapping[str, int], num_devices: int) -> Dict[str, int]:
    """Sizes of every axis of ``MESH_AXES`` from ``shape`` (missing axes: 1; at most one ``-1``, which takes the rest).

    Raises ``ValueError`` naming the sizes when they do not multiply to ``num_devices``.
    """
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"mesh axes {sorted(unknown)} are unknown: valid axes are {', '.join(MESH_AXES)}")
    sizes = {axis: int(shape.get(axis, 1)) for axis in MESH_AXES}
    bad = {a: s for a, s in sizes.items() if s == 0 or s < -1}
    if bad:
        raise ValueError(f"mesh sizes {bad} are invalid: each must be >= 1, or -1 for 'the rest of the devices'")
    fill = [a for a, s in sizes.items() if s == -1]
    if len(fill) > 1:
        raise ValueError(f"mesh axes {fill} are all -1: at most one axis may be -1")
    known = int(np.prod([s for s in sizes.values() if s != -1]))
    if fill:
        if num_devices % known:
            raise ValueError(f"mesh {sizes}: the fixed axes multiply to {known}, which does not divide the "
                             f"{num_devices} devices, so -1 on '{fill[0]}' cannot be filled")
        sizes[fill[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(f"mesh {sizes} has {known} devices but {num_devices} are available; "
                         "make the sizes multiply to the device count or set one axis to -1")
    return sizes


def make_mesh(sizes: Mapping[str, int], devices: Sequence[Any] = None) -> Mesh:
    """A ``Mesh`` over ``devices`` (default all) with the axes ``MESH_AXES`` in Auto mode, laid out on the
    physical network (:func:`device_grid`). Raises ``ValueError`` for sizes that do not fit the devices."""
    devices = list(jax.devices() if devices is None else devices)
    resolved = resolve_mesh_shape(sizes, len(devices))
    grid = device_grid(tuple(resolved[a] for a in MESH_AXES), devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def num_slices(devices: Sequence[Any]) -> int:
    """How many TPU slices (joined over the data-centre network, DCN) ``devices`` span; 1 off TPU."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def device_grid(shape: Tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
    """``devices`` arranged as an array of ``shape`` (sizes of ``MESH_AXES``) that follows the network.

    TPU: every axis maps onto axes of the chips' torus, a physical axis split between mesh axes where no whole
    axes multiply to a size (``data`` 2 x ``fsdp`` 32 on a 4x4x4 v5p-128). Devices of several slices: the
    ``data`` axis runs across the slices (DCN, a hybrid mesh: ``slices`` x ``data / slices``), every other axis
    inside one slice (ICI). Elsewhere (CPU, GPU) jax's own order. Raises ``ValueError`` naming the sizes and the
    torus when no such layout exists.
    """
    slices = num_slices(devices)
    if devices[0].platform != "tpu":
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape), devices=devices).devices
    data = MESH_AXES.index("data")
    if shape[data] % slices:
        raise ValueError(f"mesh.data={shape[data]} must be a multiple of the {slices} TPU slices: the data axis "
                         "spans the slices (DCN), every other axis stays inside one slice")
    inner = tuple(s // slices if i == data else s for i, s in enumerate(shape))
    try:
        if slices == 1:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
        outer = tuple(slices if i == data else 1 for i in range(len(shape)))
        return mesh_utils.create_hybrid_device_mesh(inner, outer, devices, allow_split_physical_axes=True)
    except (NotImplementedError, ValueError, AssertionError) as err:
        torus = "x".join(str(1 + max(d.coords[i] for d in devices if getattr(d, "slice_index", 0) == 0)) for i in range(3))
        raise ValueError(f"mesh {dict(zip(MESH_AXES, inner))} per slice cannot be laid out on a {torus} torus of "
                         f"{devices[0].device_kind} chips ({len(devices) // slices} devices per slice): {err}") from None


def make_abstract_mesh(sizes: Mapping[str, int], num_devices: int) -> AbstractMesh:
    """The device-free mesh of the same shape, to check shardings of configs for machines not present."""
    resolved = resolve_mesh_shape(sizes, num_devices)
    return AbstractMesh(tuple(resolved[a] for a in MESH_AXES), MESH_AXES,
                        axis_types=(AxisType.Auto,) * len(MESH_AXES))


def logical_specs(boxed_tree: Any) -> Any:
    """Mesh ``PartitionSpec`` of every leaf of a tree holding ``nn.Partitioned`` boxes (abstract or real)."""
    return nn.logical_to_mesh(nn.get_partition_spec(boxed_tree), LOGICAL_AXIS_RULES)


def named_shardings(mesh: AnyMesh, specs: Any) -> Any:
    """``NamedSharding`` for every ``PartitionSpec`` leaf of ``specs``."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))


def batch_spec(ndim: int = 2) -> PartitionSpec:
    """Rows over (``data``, ``fsdp``), everything else replicated."""
    return PartitionSpec(BATCH_AXES, *([None] * (ndim - 1)))


def token_spec() -> PartitionSpec:
    """Token arrays ``[B, T]``: rows over (``data``, ``fsdp``), positions over ``sequence``."""
    return PartitionSpec(BATCH_AXES, SEQUENCE_AXIS)


def check_divisible(shapes: Any, specs: Any, mesh_shape: Mapping[str, int]) -> None:
    """Raise ``ValueError`` naming the array, dimension and sizes if a sharded dimension is not divisible.

    ``shapes``: a tree of objects with ``.shape`` (e.g. ``jax.ShapeDtypeStruct``); ``specs``: the matching
    tree of ``PartitionSpec``; ``mesh_shape``: axis name -> size (``mesh.shape`` of a Mesh or AbstractMesh).
    """
    problems = []
    flat_specs = jax.tree_util.tree_leaves_with_path(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    flat_shapes = jax.tree_util.tree_leaves(shapes)
    if len(flat_specs) != len(flat_shapes):
        raise ValueError(f"{len(flat_specs)} partition specs for {len(flat_shapes)} arrays")
    for (path, spec), leaf in zip(flat_specs, flat_shapes):
        for dim, axes in enumerate(spec):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            parts = int(np.prod([mesh_shape[a] for a in axes]))
            if leaf.shape[dim] % parts:
                problems.append(f"{jax.tree_util.keystr(path)} dim {dim} of shape {tuple(leaf.shape)} has size "
                                f"{leaf.shape[dim]}, not divisible by {'x'.join(axes)} = {parts}")
    if problems:
        raise ValueError("shardings do not divide their arrays on mesh "
                         f"{dict(mesh_shape)}:\n  " + "\n  ".join(problems))
