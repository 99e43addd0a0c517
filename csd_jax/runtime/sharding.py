"""The device mesh and the one table that maps logical axis names to mesh axes.

Every parameter carries logical axis names (`embed`, `vocab`, `heads`, `kv_heads`, `head_dim`,
`mlp`, ...) in its `logical_axes` metadata; `RULES` maps them to the mesh axes
`('data', 'fsdp', 'tensor')`. Teacher and student use the same mesh and the same rules. A
dimension that a mesh axis does not divide (one KV head over two tensor shards, a vocabulary of
50257) stays replicated over that axis rather than failing.

Everything that depends on the table is derived from it here, so that a run that overrides it
(`mesh.rules` in the config, through `resolve_rules`) stays consistent: the parameters'
shardings (`logical_to_spec`, `state_shardings`), the batch's (`batch_sharding`), the
data-parallel size (`data_parallel_size`) and the fused loss's axes (`loss_axes`). Each takes
an optional `rules` (default: `RULES`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from csd_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
Rules = Mapping[str, Sequence[str]]

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
}


def resolve_rules(overrides: Rules | None) -> dict[str, tuple[str, ...]]:
  """`RULES` with `overrides` (logical axis -> mesh axes, in order of preference) applied.

  A single mesh axis may be given as a string and an empty list or None replicates.

  Raises:
    UserError: an unknown logical axis or mesh axis, or a mesh axis named twice in one rule.
  """
  rules = dict(RULES)
  for name, axes in (overrides or {}).items():
    if name not in RULES:
      raise UserError(f"sharding rules: unknown logical axis {name!r}; valid: "
                      f"{', '.join(RULES)}")
    # YAML gives `vocab: tensor` as a string and `vocab: null` as None: one axis, or none.
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    if not isinstance(axes, Sequence) or not all(isinstance(a, str) for a in axes):
      raise UserError(f"sharding rules: {name}={axes!r}: expected a list of mesh axes "
                      f"({', '.join(MESH_AXES)})")
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise UserError(f"sharding rules: {name}: unknown mesh axis {unknown[0]!r}; valid: "
                      f"{', '.join(MESH_AXES)}")
    if len(set(axes)) != len(axes):
      raise UserError(f"sharding rules: {name}={list(axes)} names a mesh axis twice; "
                      "name each at most once")
    rules[name] = tuple(axes)
  _check_vocab(rules["vocab"])
  return rules


def _check_vocab(axes: Sequence[str]) -> None:
  if len(axes) > 1:
    raise UserError(f"sharding rules: vocab={list(axes)}: the fused loss splits the "
                    "vocabulary over at most one mesh axis; give one (e.g. [tensor]) or none")


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A `('data', 'fsdp', 'tensor')` mesh; one size may be -1 (fill with the remaining devices).

  Raises:
    UserError: the sizes do not multiply to the device count (or do not divide it, with -1).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh sizes data={data}, fsdp={fsdp}, tensor={tensor}: use positive sizes "
                    "and at most one -1 (fill)")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise UserError(f"mesh data={data}, fsdp={fsdp}, tensor={tensor} does not divide the "
                      f"{len(devices)} devices; choose sizes whose product divides it")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise UserError(f"mesh data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]} needs "
                    f"{math.prod(sizes)} devices, found {len(devices)}; make the product "
                    "equal the device count or set one size to -1")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def _rules(rules: Rules | None) -> Rules:
  return RULES if rules is None else rules


def data_parallel_size(mesh: Mesh, rules: Rules | None = None) -> int:
  """How many ways the batch is split: the product of the `batch` rule's axes in `mesh`."""
  return math.prod(mesh.shape[a] for a in _rules(rules)["batch"] if a in mesh.shape)


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
  """A `[B, T]` batch's sharding: rows over the `batch` rule's axes (those the mesh has),
  tokens replicated."""
  axes = tuple(a for a in _rules(rules)["batch"] if a in mesh.shape)
  rows = axes if len(axes) > 1 else (axes[0] if axes else None)
  return NamedSharding(mesh, P(rows, None))


def loss_axes(rules: Rules | None = None) -> tuple[tuple[str, ...], str | None]:
  """`(token_axes, vocab_axis)` for `fused_logit_loss`: the `batch` rule's axes, and the
  `vocab` rule's one axis (None when the vocabulary is replicated).

  A vocab axis that also splits the tokens (FSDP-style) cannot split the vocabulary inside the
  loss as well: it gives None there (the head is gathered over it, like any FSDP weight).

  Raises:
    UserError: the `vocab` rule names more than one mesh axis.
  """
  rules = _rules(rules)
  tokens = tuple(rules["batch"])
  vocab = tuple(rules.get("vocab", ()))
  _check_vocab(vocab)
  return tokens, (vocab[0] if vocab and vocab[0] not in tokens else None)


def logical_to_spec(logical_axes: Sequence[str | None], shape: Sequence[int],
                    mesh: Mesh, rules: Rules | None = None) -> P:
  """The PartitionSpec for one array: each logical axis takes the mesh axes its rule names,
  unless they are already used by another dimension or do not divide this dimension; size-1
  mesh axes are left out."""
  rules = _rules(rules)
  used: set[str] = set()
  spec = []
  for name, dim in zip(logical_axes, shape, strict=True):
    axes = []
    for axis in rules.get(name, ()) if name else ():
      size = mesh.shape.get(axis, 1)
      if axis in used or size == 1 or dim % (math.prod(mesh.shape[a] for a in axes) * size):
        continue
      axes.append(axis)
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return P(*spec)


def state_shardings(state: nnx.State, mesh: Mesh, rules: Rules | None = None) -> nnx.State:
  """NamedShardings for every variable of an (abstract) NNX state, from its logical axes."""

  def one(variable: nnx.Variable) -> NamedSharding:
    axes = variable.get_metadata().get("logical_axes")
    shape = variable.get_value().shape
    if axes is None:
      axes = (None,) * len(shape)
    return NamedSharding(mesh, logical_to_spec(axes, shape, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
