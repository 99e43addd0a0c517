"""How per-token losses become one scalar: the weight of each token position.

The loss is `sum_i weight_i * loss_i`. With the default `normalize="token"`, every valid
position weighs 1 / (number of valid positions in the *global* batch); pass that count as
`num_valid_tokens` when the batch is split into micro-batches or shards, and the pieces' losses
and gradients add up to exactly those of the whole batch. `normalize="sequence"` averages over
each sequence first, then over sequences (`num_sequences` plays the same role there).
An all-masked batch gets all-zero weights: its loss is 0, not NaN.

`row_weights` scale whole sequences. The chat pairs' objective (the official general-chat
recipe) is one: a pair is two rows, the prompt with the teacher's response and with the
student's, and the loss is, averaged over pairs, `(2 - beta) x` the teacher-response row's
token mean plus `beta x` the student-response row's. That is `normalize="sequence"` with
`pair_row_weights` and the pair count (`num_pairs`) as `num_sequences`; being a sum over rows,
it splits over micro-batches and shards like any other reduction (a pair's two rows need not
meet). `pair_beta` is beta at a step: a constant, or the official gradual schedule.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

NORMALIZATIONS = ("token", "sequence")
# The `pair_role` of a batch row (constant along the row): 0 no pair, the teacher's response,
# the student's response. The data pipeline writes the same numbers (csd_jax.data.pairs).
PAIR_NONE, PAIR_TEACHER, PAIR_STUDENT = 0, 1, 2


def token_weights(mask: Array, *, normalize: str = "token",
                  num_valid_tokens: Array | float | None = None,
                  num_sequences: Array | float | None = None,
                  row_weights: Array | None = None) -> Array:
  """Float32 weights with the shape of `mask` (bool or float; 0 = ignored position).

  Args:
    mask: `[...]` for "token"; `[..., T]` (sequences along the last axis) for "sequence".
    normalize: "token" or "sequence".
    num_valid_tokens: the global count of valid positions ("token" only); default: this mask's.
    num_sequences: the global count of sequences with a valid position ("sequence" only);
      default: this mask's. With pair row weights: the global count of pairs (`num_pairs`).
    row_weights: `mask.shape[:-1]`, a factor per sequence (e.g. `pair_row_weights`); None: 1.
  """
  mask = jnp.asarray(mask).astype(jnp.float32)
  if row_weights is not None:
    if mask.ndim < 1 or jnp.shape(row_weights) != mask.shape[:-1]:
      raise ValueError(f"row_weights shape {jnp.shape(row_weights)} does not match the mask's "
                       f"rows {mask.shape[:-1]}")
    rows = jnp.asarray(row_weights, jnp.float32)[..., None]
  else:
    rows = None
  if normalize == "token":
    if num_sequences is not None:
      raise ValueError("num_sequences applies to normalize='sequence'; use num_valid_tokens")
    count = jnp.sum(mask) if num_valid_tokens is None else jnp.asarray(num_valid_tokens,
                                                                         jnp.float32)
    weights = mask / jnp.maximum(count, 1.0)
    return weights if rows is None else weights * rows
  if normalize == "sequence":
    if num_valid_tokens is not None:
      raise ValueError("num_valid_tokens applies to normalize='token'; use num_sequences")
    if mask.ndim < 1:
      raise ValueError("normalize='sequence' needs a mask of shape [..., T], got a scalar")
    per_sequence = jnp.sum(mask, axis=-1, keepdims=True)
    if num_sequences is None:
      num_sequences = jnp.sum(per_sequence > 0)
    count = jnp.asarray(num_sequences, jnp.float32)
    weights = mask / jnp.maximum(per_sequence, 1.0) / jnp.maximum(count, 1.0)
    return weights if rows is None else weights * rows
  raise ValueError(f"unknown normalize={normalize!r}; valid: {', '.join(NORMALIZATIONS)}")


def weighted_sum(values: Array, weights: Array) -> Array:
  """sum_i weights_i * values_i, ignoring whatever a zero-weight position holds (even NaN)."""
  return jnp.sum(jnp.where(weights != 0, values, 0.0) * weights)


def pair_row_weights(pair_role: Array, beta: Array | float) -> Array:
  """Per row of `pair_role` (`[..., T]`, read at position 0): `2 - beta` for the teacher's
  response, `beta` for the student's, 0 for a row of no pair (padding rows of a batch)."""
  role = jnp.asarray(pair_role)[..., 0]
  beta = jnp.asarray(beta, jnp.float32)
  return jnp.where(role == PAIR_TEACHER, 2.0 - beta,
                   jnp.where(role == PAIR_STUDENT, beta, 0.0)).astype(jnp.float32)


def num_pairs(pair_role: Array, mask: Array) -> Array:
  """The pairs of a batch whose teacher-response row has a valid position (float32): the
  denominator of the pair objective, counted over the whole global batch."""
  role = jnp.asarray(pair_role)[..., 0]
  valid = jnp.any(jnp.asarray(mask) != 0, axis=-1)
  return jnp.sum((role == PAIR_TEACHER) & valid).astype(jnp.float32)


def pair_beta(step: Array | int, *, start: float = 1.0, end: float | None = None,
              ramp: float = 0.5, total_steps: int = 1) -> Array:
  """beta at optimizer step `step` (0 for the first update): `start` throughout when `end` is
  None, else linear from `start` to `end` over the first `ramp` of `total_steps`, then `end`.

  The official gradual schedule (CSDTrainer.kd_loss, `gradual_beta`) is start 1, end 1.5,
  ramp 0.5: `1 + 0.5 * min(1, 2 * global_step / max_steps)`.
  """
  start_value = jnp.float32(start)
  if end is None:
    return start_value
  span = jnp.maximum(jnp.float32(ramp) * total_steps, 1e-9)
  progress = jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / span)
  return start_value + (jnp.float32(end) - start_value) * progress
