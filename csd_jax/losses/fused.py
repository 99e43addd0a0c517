"""Fused LM-head + loss: the loss of `hidden @ head` without ever materialising `[N, V]` logits.

`fused_logit_loss` walks the tokens in chunks of `chunk_size`. For each chunk it forms the
student's and teacher's logits (float32 accumulation), the per-token loss and its gradient `g`
with respect to the student's logits, then `d hidden = g W^T` and `d W += h^T g`. All of this
happens in the forward pass of a `jax.custom_vjp`; the backward pass only scales the stored
gradients by the incoming cotangent. Peak extra memory is O(chunk x V), whatever N is, plus the
float32 `d W` accumulator. Each model's head travels as a `fused_sharding.Head` (weight, layout,
soft-cap) and is read in the layout it is stored in (`[H, V]`, or `[V, H]` for a tied embedding
with `vocab_major`): a transposed head fed to the chunk loop is a full copy.

On a mesh, `fused_sharding.split_over_mesh` runs the chunk loop under a `shard_map`: tokens are
split over the data axes and the vocabulary over the tensor axis, each device computes its
tokens' logits for its slice of the vocabulary, the per-row reductions over V are combined across
the tensor axis (see `vocab.VocabAxis`), and no device ever holds a full `[N, V]` array. A
vocabulary that does not divide the tensor axis is padded with columns that count as invalid
(-inf logits): the result is unchanged.

The teacher is frozen: its hidden states and head get zero gradients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from csd_jax.losses.fused_sharding import Head, pad_rows, round_up, split_over_mesh
from csd_jax.losses.reduce import token_weights, weighted_sum
from csd_jax.losses.registry import IGNORE_LABEL, LossSpec, loss_mask, resolve, spec_loss
from csd_jax.losses.vocab import VocabAxis

Array = jax.Array

DEFAULT_CHUNK_SIZE = 1024


def softcap(logits: Array, cap: float | None) -> Array:
  """Gemma-2 style `cap * tanh(logits / cap)`; None: no cap."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def _chunked_value_and_grads(
    spec: LossSpec, params: dict[str, Any], hs: Array, student: Head, target: Array,
    teacher: Head | None, weights: Array, axis: VocabAxis, *, chunk_size: int,
    vocab_size: int) -> tuple[Array, Array, Array]:
  """Loss value, d/d hs and d/d the student's weight over (this device's) tokens and vocabulary
  slice; `vocab_size` is the real V, past which columns are padding.

  The first chunk runs before the `lax.scan` over the others and its `d W` starts the
  float32 accumulator: a zero-filled `[H, V]` initial carry depends on nothing, and XLA's
  scheduler was free to create it (and hold it) as early as the step's first forward layer.
  """
  n = hs.shape[0]
  local_vocab = student.vocab_size
  chunk = min(chunk_size, max(n, 1))
  n_pad = round_up(n, chunk)

  def chunked(x: Array, value: int = 0) -> Array:
    return pad_rows(x, n_pad - n, value).reshape(n_pad // chunk, chunk, *x.shape[1:])

  hs_c, w_c = chunked(hs), chunked(weights)
  tgt_c = chunked(target, IGNORE_LABEL if spec.takes_labels else 0)
  # Columns past the real vocabulary (padding for an even split) are invalid: -inf logits.
  in_vocab = axis.global_index(local_vocab) < vocab_size

  def final_logits(z: Array, head: Head) -> Array:
    return jnp.where(in_vocab, softcap(z, head.softcap), -jnp.inf)

  def chunk_loss(z_pre: Array, target_logits: Array, w: Array) -> Array:
    return weighted_sum(spec_loss(spec, final_logits(z_pre, student), target_logits, axis,
                                  **params), w)

  def one_chunk(h: Array, tgt: Array, w: Array) -> tuple[Array, Array, Array]:
    z_pre = student.logits(h)
    if teacher is not None:
      # A teacher head over a padded vocabulary is wider: the loss runs over its first V.
      tgt = final_logits(teacher.logits(tgt)[:, :local_vocab], teacher)
    value, g = jax.value_and_grad(chunk_loss)(z_pre, tgt, w)
    dh, dw = student.vjp(h, g)
    return value, dh, dw

  def body(dws_acc: Array, xs: tuple[Array, Array, Array]) -> tuple[Array, tuple[Array, Array]]:
    value, dh, dw = one_chunk(*xs)
    return dws_acc + dw, (value, dh)

  value0, dh0, dws = one_chunk(hs_c[0], tgt_c[0], w_c[0])
  values, dhs = value0[None], dh0[None]
  if n_pad > chunk:
    dws, (rest_values, rest_dhs) = lax.scan(body, dws, (hs_c[1:], tgt_c[1:], w_c[1:]))
    values = jnp.concatenate([values, rest_values])
    dhs = jnp.concatenate([dhs, rest_dhs])
  return jnp.sum(values), dhs.reshape(n_pad, -1)[:n], dws


def _make_fused(spec: LossSpec, params: dict[str, Any], *, chunk_size: int, mesh: Any,
                token_axes: Sequence[str], vocab_axis: str) -> Callable[..., Array]:
  """The custom-VJP function (hs, student, target, teacher, weights) -> loss for one
  configuration; the heads' layouts and caps travel as their static fields."""

  def value_and_grads(hs: Array, student: Head, target: Array, teacher: Head | None,
                      weights: Array) -> tuple[Array, Array, Array]:
    local = functools.partial(_chunked_value_and_grads, spec, params, chunk_size=chunk_size,
                              vocab_size=student.vocab_size)
    return split_over_mesh(local, hs, student, target, teacher, weights, mesh=mesh,
                           token_axes=token_axes, vocab_axis=vocab_axis)

  @jax.custom_vjp
  def fused(hs, student, target, teacher, weights):
    return value_and_grads(hs, student, target, teacher, weights)[0]

  def fused_fwd(hs, student, target, teacher, weights):
    value, dhs, dws = value_and_grads(hs, student, target, teacher, weights)
    grads = (dhs.astype(hs.dtype), student.with_weight(dws.astype(student.weight.dtype)))
    return value, (grads, (target, teacher, weights))

  def fused_bwd(residuals, cotangent):
    grads, frozen = residuals
    # The teacher is frozen and the token weights are constants: zero cotangents for them.
    return (*jax.tree.map(lambda d: (cotangent * d).astype(d.dtype), grads),
            *jax.tree.map(_zero_cotangent, frozen))

  fused.defvjp(fused_fwd, fused_bwd)
  return fused


def _zero_cotangent(x: Array) -> Array:
  if jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.zeros(x.shape, jax.dtypes.float0)
  return jnp.zeros_like(x)


def fused_logit_loss(
    name: str, student_hidden: Array, student_head: Array, teacher_hidden: Array | None,
    teacher_head: Array | None, mask: Array | None = None, *, labels: Array | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE, logit_softcap: float | None = None,
    teacher_logit_softcap: float | None = None, vocab_major: bool = False,
    teacher_vocab_major: bool = False, normalize: str = "token",
    num_valid_tokens: Array | float | None = None, num_sequences: Array | float | None = None,
    row_weights: Array | None = None, mesh: Any = None,
    token_axes: Sequence[str] = ("data", "fsdp"), vocab_axis: str = "tensor",
    **params: Any) -> Array:
  """`logit_loss(name, hs @ Ws, ht @ Wt, mask)` with O(chunk x V) memory, same value and grads.

  Args:
    name: a loss name (see `LOSS_NAMES`); `ce` takes `labels` and no teacher.
    student_hidden: `[..., Hs]` final hidden states (after the final norm).
    student_head: `[Hs, V]` the student's LM-head weight; `[V, Hs]` with `vocab_major`.
    teacher_hidden: `[..., Ht]` (Ht may differ from Hs); None for `ce`.
    teacher_head: `[Ht, V']` (`[V', Ht]` with `teacher_vocab_major`), V' >= V: the loss runs
      over its first V columns, sliced from each chunk's logits (a padded vocabulary, as
      Qwen2.5-7B's 152064 against the 1.5B's 151936, needs no copy of the head); None for `ce`.
    mask: `[...]` bool or float; None = every position.
    labels: `[...]` int, for `ce` (-100 = ignored).
    chunk_size: tokens per chunk (the peak extra memory is ~ chunk x V float32 a few times).
    logit_softcap: Gemma-2 style `cap * tanh(logits / cap)` on the student's logits; None: no
      cap.
    teacher_logit_softcap: the same for the teacher's logits, each model with its own cap;
      None: no cap (not the student's: a Gemma-2 student may distil from an uncapped teacher).
    vocab_major, teacher_vocab_major: the student's / teacher's head is given `[V, H]`, as a
      tied embedding stores it. Pass each head in the layout it is stored in: the chunk loop
      reads it in place, where the transpose of a stored weight would be a full copy (XLA gives
      a loop's operands its default layout: 1.6 GB for Gemma-7B's head).
    normalize, num_valid_tokens, num_sequences, row_weights: the reduction, as in
      `logit_loss`.
    mesh: a `Mesh` / `AbstractMesh` to split over; default: the ambient mesh (`jax.set_mesh`),
      and none outside one.
    token_axes: mesh axes the tokens are split over (those the mesh has).
    vocab_axis: mesh axis the vocabulary is split over (if the mesh has it).
    **params: the loss's parameters.
  """
  spec, full = resolve(name, params)
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: must be a positive number of tokens")
  positions = student_hidden.shape[:-1]
  student = Head(student_head, vocab_major, logit_softcap)
  if student_head.ndim != 2 or student.hidden_size != student_hidden.shape[-1]:
    raise ValueError(f"student head {student_head.shape} does not match hidden size "
                     f"{student_hidden.shape[-1]}: expected {student.layout}")
  if spec.takes_labels:
    if labels is None:
      raise ValueError(f"loss {name!r} needs labels=")
    target, teacher = jnp.reshape(labels, (-1,)), None
  else:
    if teacher_hidden is None or teacher_head is None:
      raise ValueError(f"loss {name!r} needs teacher_hidden and teacher_head")
    if teacher_hidden.shape[:-1] != positions:
      raise ValueError(f"teacher hidden {teacher_hidden.shape} and student hidden "
                       f"{student_hidden.shape} cover different positions")
    teacher = Head(teacher_head, teacher_vocab_major, teacher_logit_softcap)
    if (teacher_head.ndim != 2 or teacher.hidden_size != teacher_hidden.shape[-1]
        or teacher.vocab_size < student.vocab_size):
      raise ValueError(f"vocabulary mismatch: student head {student_head.shape} "
                       f"({student.layout}), teacher head {teacher_head.shape} "
                       f"({teacher.layout}); the teacher's must cover the student's V")
    target = jnp.reshape(teacher_hidden, (-1, teacher_hidden.shape[-1]))
  weights = token_weights(loss_mask(name, positions, mask, labels), normalize=normalize,
                          num_valid_tokens=num_valid_tokens, num_sequences=num_sequences,
                          row_weights=row_weights)
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  fused = _make_fused(spec, full, chunk_size=chunk_size, mesh=mesh,
                      token_axes=tuple(token_axes), vocab_axis=vocab_axis)
  hs = jnp.reshape(student_hidden, (-1, student_hidden.shape[-1]))
  return fused(hs, student, lax.stop_gradient(target), lax.stop_gradient(teacher),
               lax.stop_gradient(weights.reshape(-1)))
