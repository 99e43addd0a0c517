"""The device mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names (`embed`, `vocab`, `heads`, `kv_heads`, `head_dim`,
`mlp`, ...) in its `logical_axes` metadata; `RULES` maps them to the mesh axes
`('data', 'fsdp', 'tensor')`. Teacher and student use the same mesh and the same rules. A
dimension that a mesh axis does not divide (one KV head over two tensor shards, a vocabulary of
50257) stays replicated over that axis rather than failing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# Logical axis -> mesh axes, in order of preference. The one table for teacher and student.
RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "vocab": ("tensor",),
    "embed": ("fsdp",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "head_dim": (),
    "positions": (),
    "layers": (),
}


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh; one size may be -1 (fill with the remaining devices).

  Raises:
    ValueError: the sizes do not multiply to the device count (or do not divide it, with -1).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: use positive sizes "
                     "and at most one -1 (fill)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor} does not divide the "
                       f"{len(devices)} devices; choose sizes whose product divides it")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]} needs "
                     f"{math.prod(sizes)} devices, found {len(devices)}; make the product "
                     "equal the device count or set one size to -1")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh) -> P:
  """The PartitionSpec for one array: each logical axis takes the mesh axes its rule names,
  unless they are already used by another dimension or do not divide this dimension."""
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape, strict=True):
    axes = []
    for axis in RULES.get(name, ()) if name else ():
      size = mesh.shape.get(axis, 1)
      if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in axes) * size):
        continue
      axes.append(axis)
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
  """NamedShardings for every variable of an (abstract) NNX state, from its logical axes."""

  def one(variable: nnx.Variable) -> NamedSharding:
    axes = variable.get_metadata().get("logical_axes")
    shape = variable.get_value().shape
    if axes is None:
      axes = (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
