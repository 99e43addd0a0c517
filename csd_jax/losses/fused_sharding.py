"""The fused loss's per-model `Head` record, and the split of its work over a mesh.

`Head` holds what the fused loss knows of one model's LM head: the weight, the layout it is
stored in (`[H, V]`, or `[V, H]` for a tied embedding: `vocab_major`) and the model's logit
soft-cap. It is a pytree whose only leaf is the weight (traced, and the student's
differentiated); the layout and the cap are static. Its methods read the weight in the layout it
is stored in: a transposed head fed to a loop would be a full copy.

`split_over_mesh` runs the per-device loss (`fused.py`'s chunk loop) under a `jax.shard_map`:
tokens split over the data axes, the vocabulary over the tensor axis. Tokens are padded to split
evenly (zero weight, ignored labels), the vocabulary with columns the loss counts as invalid; the
per-device sums are then combined with psums, so no device ever holds a full `[N, V]` array.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from csd_jax.losses.registry import IGNORE_LABEL
from csd_jax.losses.vocab import VocabAxis

Array = jax.Array


def round_up(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is at least `n`."""
  return -(-n // multiple) * multiple


def pad_rows(x: Array, pad: int, value: int = 0) -> Array:
  """`x` with `pad` more entries along its first (token) axis, filled with `value`."""
  return jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1), constant_values=value)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["weight"],
                   meta_fields=["vocab_major", "softcap"])
@dataclasses.dataclass(frozen=True)
class Head:
  """One model's LM head, as the fused loss reads it.

  Attributes:
    weight: `[H, V]`, or `[V, H]` with `vocab_major`.
    vocab_major: the weight is stored `[V, H]`, as a tied embedding stores it.
    softcap: Gemma-2 style `cap * tanh(logits / cap)` on this model's logits; None: no cap.
  """

  weight: Array
  vocab_major: bool = False
  softcap: float | None = None

  @property
  def layout(self) -> str:
    return "[V, H]" if self.vocab_major else "[H, V]"

  @property
  def hidden_size(self) -> int:
    return self.weight.shape[1 if self.vocab_major else 0]

  @property
  def vocab_size(self) -> int:
    return self.weight.shape[0 if self.vocab_major else 1]

  def with_weight(self, weight: Array) -> Head:
    """The same layout and cap over another weight (a gradient, a shard, a zero cotangent)."""
    return dataclasses.replace(self, weight=weight)

  def logits(self, h: Array) -> Array:
    """`[C, H]` hidden states times the head: `[C, V]` float32, before the soft-cap."""
    dims = ((1,), (1,)) if self.vocab_major else ((1,), (0,))
    return lax.dot_general(h, self.weight, (dims, ((), ())), preferred_element_type=jnp.float32)

  def vjp(self, h: Array, g: Array) -> tuple[Array, Array]:
    """For `g` = d loss / d logits: `d h = g W^T` `[C, H]` and `d W` in the head's layout (f32)."""
    w = self.weight
    dh = lax.dot_general(g.astype(w.dtype), w, (((1,), (0 if self.vocab_major else 1,)), ((), ())),
                         preferred_element_type=jnp.float32)
    g = g.astype(h.dtype)
    lhs, rhs = (g, h) if self.vocab_major else (h, g)
    dw = lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return dh, dw

  def padded(self, pad: int) -> Head:
    """The head with `pad` zero columns past its vocabulary."""
    widths = ((0, pad), (0, 0)) if self.vocab_major else ((0, 0), (0, pad))
    return self.with_weight(jnp.pad(self.weight, widths))

  def cut(self, vocab: int) -> Head:
    """The head over its first `vocab` columns (a copy)."""
    w = self.weight
    return self.with_weight(w[:vocab] if self.vocab_major else w[:, :vocab])

  def partition_spec(self, vocab_axis: str | None) -> P:
    """The weight's partition: the vocabulary over `vocab_axis`, the hidden size whole."""
    return P(vocab_axis, None) if self.vocab_major else P(None, vocab_axis)


# (hs, student, target, teacher, weights, axis) -> (loss, d hs, d student weight), each a sum
# over the given tokens and, for `d hs`, over the given slice of the vocabulary.
LocalLoss = Callable[[Array, Head, Array, "Head | None", Array, VocabAxis],
                     tuple[Array, Array, Array]]


def split_over_mesh(local: LocalLoss, hs: Array, student: Head, target: Array,
                    teacher: Head | None, weights: Array, *, mesh: Any,
                    token_axes: Sequence[str], vocab_axis: str) -> tuple[Array, Array, Array]:
  """`local`'s loss value and gradients over all tokens and the whole vocabulary.

  Args:
    local: the per-device loss; its vocabulary reductions go through the `VocabAxis` it gets.
    hs: `[N, Hs]` student hidden states.
    student: the student's head.
    target: `[N]` labels (with no teacher) or `[N, Ht]` teacher hidden states.
    teacher: the teacher's head (V' >= V columns), or None with labels.
    weights: `[N]` per-token weights.
    mesh: a `Mesh` / `AbstractMesh`; None or an empty one: `local` runs once, unsplit.
    token_axes: mesh axes the tokens are split over (those the mesh has).
    vocab_axis: mesh axis the vocabulary is split over (if the mesh has it).

  Returns:
    The loss, `d hs` `[N, Hs]` and `d W` in the student head's layout, as `local` gives them.
  """
  if mesh is None or mesh.empty:
    return local(hs, student, target, teacher, weights, VocabAxis())
  names = tuple(mesh.axis_names)
  tokens = tuple(a for a in token_axes if a in names)
  vocab = vocab_axis if vocab_axis in names else None
  n_token_shards = math.prod(mesh.shape[a] for a in tokens)
  n_vocab_shards = mesh.shape[vocab] if vocab else 1
  n, vocab_size = hs.shape[0], student.vocab_size
  pad_n = round_up(n, n_token_shards) - n
  pad_v = round_up(vocab_size, n_vocab_shards) - vocab_size
  hs_p, student_p, weights_p = pad_rows(hs, pad_n), student.padded(pad_v), pad_rows(weights, pad_n)
  if teacher is None:
    target_p = pad_rows(target, pad_n, IGNORE_LABEL)
  else:
    if n_vocab_shards > 1 and teacher.vocab_size != vocab_size:
      # Split over the tensor axis, a wider teacher head is cut to V first (a copy): its
      # shards must hold the student's shards' columns.
      teacher = teacher.cut(vocab_size)
    target_p, teacher = pad_rows(target, pad_n), teacher.padded(pad_v)
  rows, rows_h = P(tokens or None), P(tokens or None, None)

  def on_device(hs_l: Array, student_l: Head, target_l: Array, teacher_l: Head | None,
                weights_l: Array) -> tuple[Array, Array, Array]:
    value, dhs, dws = local(hs_l, student_l, target_l, teacher_l, weights_l, VocabAxis(vocab))
    if tokens:
      value = lax.psum(value, tokens)
      dws = lax.psum(dws, tokens)
    if vocab:
      dhs = lax.psum(dhs, vocab)
    return value, dhs, dws

  # A head's spec stands for its one leaf, the weight.
  in_specs = (rows_h, student.partition_spec(vocab), rows if teacher is None else rows_h,
              None if teacher is None else teacher.partition_spec(vocab), rows)
  value, dhs, dws = jax.shard_map(
      on_device, mesh=mesh, in_specs=in_specs,
      out_specs=(P(), rows_h, student.partition_spec(vocab)))(
          hs_p, student_p, target_p, teacher, weights_p)
  return value, dhs[:n], student.with_weight(dws).cut(vocab_size).weight
