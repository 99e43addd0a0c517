"""How per-token losses become one scalar: the weight of each token position.

The loss is `sum_i weight_i * loss_i`. With the default `normalize="token"`, every valid
position weighs 1 / (number of valid positions in the *global* batch); pass that count as
`num_valid_tokens` when the batch is split into micro-batches or shards, and the pieces' losses
and gradients add up to exactly those of the whole batch. `normalize="sequence"` averages over
each sequence first, then over sequences (`num_sequences` plays the same role there).
An all-masked batch gets all-zero weights: its loss is 0, not NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

NORMALIZATIONS = ("token", "sequence")


def token_weights(mask: Array, *, normalize: str = "token",
                  num_valid_tokens: Array | float | None = None,
                  num_sequences: Array | float | None = None) -> Array:
  """Float32 weights with the shape of `mask` (bool or float; 0 = ignored position).

  Args:
    mask: `[...]` for "token"; `[..., T]` (sequences along the last axis) for "sequence".
    normalize: "token" or "sequence".
    num_valid_tokens: the global count of valid positions ("token" only); default: this mask's.
    num_sequences: the global count of sequences with a valid position ("sequence" only);
      default: this mask's.
  """
  mask = jnp.asarray(mask).astype(jnp.float32)
  if normalize == "token":
    if num_sequences is not None:
      raise ValueError("num_sequences applies to normalize='sequence'; use num_valid_tokens")
    count = jnp.sum(mask) if num_valid_tokens is None else jnp.asarray(num_valid_tokens,
                                                                         jnp.float32)
    return mask / jnp.maximum(count, 1.0)
  if normalize == "sequence":
    if num_valid_tokens is not None:
      raise ValueError("num_valid_tokens applies to normalize='token'; use num_sequences")
    if mask.ndim < 1:
      raise ValueError("normalize='sequence' needs a mask of shape [..., T], got a scalar")
    per_sequence = jnp.sum(mask, axis=-1, keepdims=True)
    if num_sequences is None:
      num_sequences = jnp.sum(per_sequence > 0)
    count = jnp.asarray(num_sequences, jnp.float32)
    return mask / jnp.maximum(per_sequence, 1.0) / jnp.maximum(count, 1.0)
  raise ValueError(f"unknown normalize={normalize!r}; valid: {', '.join(NORMALIZATIONS)}")


def weighted_sum(values: Array, weights: Array) -> Array:
  """sum_i weights_i * values_i, ignoring whatever a zero-weight position holds (even NaN)."""
  return jnp.sum(jnp.where(weights != 0, values, 0.0) * weights)
