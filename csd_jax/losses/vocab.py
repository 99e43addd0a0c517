"""Reductions over the vocabulary axis, local or combined across a sharded mesh axis.

Every per-token loss in `divergences.py` reduces over the vocabulary only through a `VocabAxis`.
Unsharded, a reduction is a plain sum / max over the last axis. Inside a `shard_map` whose
vocabulary is split over a mesh axis, the same code reduces its local slice and combines the
partial results across that axis (psum / pmax), so no device ever needs a full `[N, V]` array.

Entries of the vocabulary that are `-inf` in the student or the teacher (columns past the real
vocabulary, masked tokens) are *invalid*: they get zero weight, are left out of every sum, and
never produce a NaN, in the value or in the gradient. A NaN or `+inf` entry is a broken model,
not a masked one: the position's loss is NaN (`registry.nonfinite_poison`), its gradient stays
finite, and the train step skips the update.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array

# Smallest positive normal float32: a floor for sums of probabilities, so that a row with no
# valid entry divides 0 by this (giving 0) instead of 0 by 0.
_TINY = float(jnp.finfo(jnp.float32).tiny)


@dataclasses.dataclass(frozen=True)
class VocabAxis:
  """Reductions over the last (vocabulary) axis.

  Attributes:
    axis_name: the mesh axis the vocabulary is split over inside a `shard_map`, or None when
      each array holds the whole vocabulary.
  """

  axis_name: str | None = None

  def sum(self, x: Array) -> Array:
    s = jnp.sum(x, axis=-1)
    return lax.psum(s, self.axis_name) if self.axis_name else s

  def max(self, x: Array) -> Array:
    """Max over the vocabulary, for numerical stabilisation only (no gradient flows)."""
    m = jnp.max(lax.stop_gradient(x), axis=-1)
    if self.axis_name:
      m = lax.pmax(m, self.axis_name)
    return lax.stop_gradient(m)

  def max_differentiable(self, x: Array, valid: Array) -> Array:
    """Max over the valid entries whose gradient goes to the arg-max (split among ties).

    A row without any valid entry gives 0.
    """
    m = self.max(jnp.where(valid, x, -jnp.inf))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    hit = valid & (lax.stop_gradient(x) == m[..., None])
    ties = jnp.maximum(self.sum(hit.astype(x.dtype)), 1.0)
    return m + self.sum(jnp.where(hit, x - lax.stop_gradient(x), 0.0)) / ties

  def global_index(self, local_size: int) -> Array:
    """Vocabulary ids of the local slice: [local_size] int32."""
    offset = lax.axis_index(self.axis_name) * local_size if self.axis_name else 0
    return jnp.arange(local_size, dtype=jnp.int32) + offset


@dataclasses.dataclass(frozen=True)
class LogProbs:
  """A tempered distribution over the valid vocabulary: log-probs (0 where invalid) and probs."""

  log_prob: Array
  prob: Array


def log_softmax(x: Array, valid: Array, axis: VocabAxis, temperature: float = 1.0) -> LogProbs:
  """Softmax of `x / temperature` over the valid entries; invalid entries get probability 0.

  `x` must already be finite (invalid entries replaced by any finite value). A row without any
  valid entry gets all-zero probabilities.
  """
  xs = jnp.where(valid, x / temperature, 0.0)
  m = axis.max(jnp.where(valid, xs, -jnp.inf))
  m = jnp.where(jnp.isfinite(m), m, 0.0)[..., None]
  e = jnp.where(valid, jnp.exp(xs - m), 0.0)
  total = jnp.maximum(axis.sum(e), _TINY)[..., None]
  log_prob = jnp.where(valid, xs - m - jnp.log(total), 0.0)
  return LogProbs(log_prob=log_prob, prob=e / total)


def logsumexp(x: Array, valid: Array, axis: VocabAxis) -> Array:
  """log sum_v exp(x_v) over the valid entries (about -87, not -inf, for a row with none)."""
  m = axis.max(jnp.where(valid, x, -jnp.inf))
  m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
  total = axis.sum(jnp.where(valid, jnp.exp(jnp.where(valid, x, 0.0) - m_safe[..., None]), 0.0))
  return m_safe + jnp.log(jnp.maximum(total, _TINY))
