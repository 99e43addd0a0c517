"""Fused LM-head + loss: the loss of `hidden @ head` without ever materialising `[N, V]` logits.

`fused_logit_loss` walks the tokens in chunks of `chunk_size`. For each chunk it forms the
student's and teacher's logits (float32 accumulation), the per-token loss and its gradient `g`
with respect to the student's logits, then `d hidden = g W^T` and `d W += h^T g`. All of this
happens in the forward pass of a `jax.custom_vjp`; the backward pass only scales the stored
gradients by the incoming cotangent. Peak extra memory is O(chunk x V), whatever N is, plus the
float32 `d W` accumulator. Each head is read in the layout it is stored in (`[H, V]`, or `[V, H]`
for a tied embedding with `vocab_major`): a transposed head fed to the chunk loop is a full copy.

On a mesh, tokens are split over the data axes and the vocabulary over the tensor axis (a
`shard_map`): each device computes its tokens' logits for its slice of the vocabulary, the
per-row reductions over V are combined across the tensor axis (see `vocab.VocabAxis`), and no
device ever holds a full `[N, V]` array. A vocabulary that does not divide the tensor axis is
padded with columns that count as invalid (-inf logits): the result is unchanged.

The teacher is frozen: its hidden states and head get zero gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from csd_jax.losses.reduce import token_weights, weighted_sum
from csd_jax.losses.registry import IGNORE_LABEL, LossSpec, loss_mask, resolve, spec_loss
from csd_jax.losses.vocab import VocabAxis

Array = jax.Array

DEFAULT_CHUNK_SIZE = 1024


def softcap(logits: Array, cap: float | None) -> Array:
  """Gemma-2 style `cap * tanh(logits / cap)`; None: no cap."""
  return logits if cap is None else cap * jnp.tanh(logits / cap)


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _logits(h: Array, w: Array, vocab_major: bool) -> Array:
  """`[C, H]` hidden states times a head (`[H, V]`, or `[V, H]` if vocab-major): `[C, V]` f32."""
  dims = ((1,), (1,)) if vocab_major else ((1,), (0,))
  return lax.dot_general(h, w, (dims, ((), ())), preferred_element_type=jnp.float32)


def _head_vjp(h: Array, g: Array, w: Array, vocab_major: bool) -> tuple[Array, Array]:
  """`d h = g W^T` `[C, H]` and the chunk's `d W` (in the head's own layout), both f32."""
  dh = lax.dot_general(g.astype(w.dtype), w, (((1,), (0 if vocab_major else 1,)), ((), ())),
                       preferred_element_type=jnp.float32)
  g = g.astype(h.dtype)
  lhs, rhs = (g, h) if vocab_major else (h, g)
  dw = lax.dot_general(lhs, rhs, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return dh, dw


def _chunked_value_and_grads(
    spec: LossSpec, params: dict[str, Any], hs: Array, ws: Array, target: Array,
    wt: Array | None, weights: Array, *, chunk_size: int, vocab_size: int,
    softcaps: tuple[float | None, float | None], axis: VocabAxis,
    vocab_major: tuple[bool, bool]) -> tuple[Array, Array, Array]:
  """Loss value, d/d hs and d/d ws over (this device's) tokens and vocabulary slice.

  The first chunk runs before the `lax.scan` over the others and its `d W` starts the
  float32 accumulator: a zero-filled `[H, V]` initial carry depends on nothing, and XLA's
  scheduler was free to create it (and hold it) as early as the step's first forward layer.
  """
  n = hs.shape[0]
  student_vm, teacher_vm = vocab_major
  local_vocab = ws.shape[0 if student_vm else 1]
  chunk = min(chunk_size, max(n, 1))
  n_pad = _round_up(n, chunk)
  pad = n_pad - n
  hs_c = jnp.pad(hs, ((0, pad), (0, 0))).reshape(n_pad // chunk, chunk, -1)
  w_c = jnp.pad(weights, (0, pad)).reshape(n_pad // chunk, chunk)
  if spec.takes_labels:
    tgt_c = jnp.pad(target, (0, pad), constant_values=IGNORE_LABEL).reshape(-1, chunk)
  else:
    tgt_c = jnp.pad(target, ((0, pad), (0, 0))).reshape(n_pad // chunk, chunk, -1)
  # Columns past the real vocabulary (padding for an even split) are invalid: -inf logits.
  in_vocab = axis.global_index(local_vocab) < vocab_size
  student_cap, teacher_cap = softcaps

  def chunk_loss(z_pre: Array, target_logits: Array, w: Array) -> Array:
    z = jnp.where(in_vocab, softcap(z_pre, student_cap), -jnp.inf)
    return weighted_sum(spec_loss(spec, z, target_logits, axis, **params), w)

  def one_chunk(h: Array, tgt: Array, w: Array) -> tuple[Array, Array, Array]:
    z_pre = _logits(h, ws, student_vm)
    if not spec.takes_labels:
      t = _logits(tgt, wt, teacher_vm)[:, :local_vocab]  # a wider teacher head: its first V
      tgt = jnp.where(in_vocab, softcap(t, teacher_cap), -jnp.inf)
    value, g = jax.value_and_grad(chunk_loss)(z_pre, tgt, w)
    dh, dw = _head_vjp(h, g, ws, student_vm)
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


def _mesh_axes(mesh: Any, token_axes: Sequence[str], vocab_axis: str
               ) -> tuple[tuple[str, ...], str | None]:
  names = tuple(mesh.axis_names)
  tokens = tuple(a for a in token_axes if a in names)
  return tokens, (vocab_axis if vocab_axis in names else None)


def _pad_vocab(w: Array, pad: int, vocab_major: bool) -> Array:
  return jnp.pad(w, ((0, pad), (0, 0)) if vocab_major else ((0, 0), (0, pad)))


def _make_fused(spec: LossSpec, params: dict[str, Any], *, chunk_size: int,
                softcaps: tuple[float | None, float | None], mesh: Any,
                token_axes: Sequence[str], vocab_axis: str,
                vocab_major: tuple[bool, bool]) -> Callable[..., Array]:
  """The custom-VJP function (hs, ws, target, wt, weights) -> loss for one configuration."""
  student_vm, teacher_vm = vocab_major

  def value_and_grads(hs, ws, target, wt, weights):
    vocab_size = ws.shape[0 if student_vm else 1]
    options = {"chunk_size": chunk_size, "vocab_size": vocab_size, "softcaps": softcaps,
               "vocab_major": vocab_major}
    if mesh is None or mesh.empty:
      return _chunked_value_and_grads(spec, params, hs, ws, target, wt, weights,
                                      axis=VocabAxis(), **options)
    tokens, vocab = _mesh_axes(mesh, token_axes, vocab_axis)
    n_token_shards = math.prod(mesh.shape[a] for a in tokens)
    n_vocab_shards = mesh.shape[vocab] if vocab else 1
    # Pad tokens (zero weight) and vocabulary (invalid columns) to split evenly.
    n = hs.shape[0]
    pad_n = _round_up(n, n_token_shards) - n
    pad_v = _round_up(vocab_size, n_vocab_shards) - vocab_size
    hs_p = jnp.pad(hs, ((0, pad_n), (0, 0)))
    ws_p = _pad_vocab(ws, pad_v, student_vm)
    weights_p = jnp.pad(weights, (0, pad_n))
    if spec.takes_labels:
      target_p, wt_p = jnp.pad(target, (0, pad_n), constant_values=IGNORE_LABEL), None
    else:
      if n_vocab_shards > 1 and wt.shape[0 if teacher_vm else 1] != vocab_size:
        # Split over the tensor axis, a wider teacher head is cut to V first (a copy): its
        # shards must hold the student's shards' columns.
        wt = wt[:vocab_size] if teacher_vm else wt[:, :vocab_size]
      target_p, wt_p = jnp.pad(target, ((0, pad_n), (0, 0))), _pad_vocab(wt, pad_v, teacher_vm)
    rows = P(tokens or None)
    rows_h = P(tokens or None, None)

    def cols(vm: bool) -> P:
      return P(vocab, None) if vm else P(None, vocab)

    def local(hs_l, ws_l, target_l, wt_l, w_l):
      value, dhs, dws = _chunked_value_and_grads(
          spec, params, hs_l, ws_l, target_l, wt_l, w_l, axis=VocabAxis(vocab), **options)
      if tokens:
        value = lax.psum(value, tokens)
        dws = lax.psum(dws, tokens)
      if vocab:
        dhs = lax.psum(dhs, vocab)
      return value, dhs, dws

    target_spec = rows if spec.takes_labels else rows_h
    wt_spec = None if wt_p is None else cols(teacher_vm)
    value, dhs, dws = jax.shard_map(
        local, mesh=mesh, in_specs=(rows_h, cols(student_vm), target_spec, wt_spec, rows),
        out_specs=(P(), rows_h, cols(student_vm)))(hs_p, ws_p, target_p, wt_p, weights_p)
    return value, dhs[:n], (dws[:vocab_size] if student_vm else dws[:, :vocab_size])

  @jax.custom_vjp
  def fused(hs, ws, target, wt, weights):
    return value_and_grads(hs, ws, target, wt, weights)[0]

  def fused_fwd(hs, ws, target, wt, weights):
    value, dhs, dws = value_and_grads(hs, ws, target, wt, weights)
    return value, (dhs.astype(hs.dtype), dws.astype(ws.dtype), target, wt, weights)

  def fused_bwd(residuals, cotangent):
    dhs, dws, target, wt, weights = residuals
    # The teacher is frozen and the weights are constants: zero cotangents for them.
    return ((cotangent * dhs).astype(dhs.dtype), (cotangent * dws).astype(dws.dtype),
            _zero_cotangent(target), _zero_cotangent(wt), jnp.zeros_like(weights))

  fused.defvjp(fused_fwd, fused_bwd)
  return fused


def _zero_cotangent(x: Array | None) -> Any:
  if x is None:
    return None
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
  student_layout, teacher_layout = ("[V, H]" if vm else "[H, V]"
                                    for vm in (vocab_major, teacher_vocab_major))
  if (student_head.ndim != 2
      or student_head.shape[1 if vocab_major else 0] != student_hidden.shape[-1]):
    raise ValueError(f"student head {student_head.shape} does not match hidden size "
                     f"{student_hidden.shape[-1]}: expected {student_layout}")
  vocab_size = student_head.shape[0 if vocab_major else 1]
  if spec.takes_labels:
    if labels is None:
      raise ValueError(f"loss {name!r} needs labels=")
    target, wt = jnp.reshape(labels, (-1,)), None
  else:
    if teacher_hidden is None or teacher_head is None:
      raise ValueError(f"loss {name!r} needs teacher_hidden and teacher_head")
    if teacher_hidden.shape[:-1] != positions:
      raise ValueError(f"teacher hidden {teacher_hidden.shape} and student hidden "
                       f"{student_hidden.shape} cover different positions")
    teacher_dims = teacher_head.shape[::-1] if teacher_vocab_major else teacher_head.shape
    if (teacher_head.ndim != 2 or teacher_dims[0] != teacher_hidden.shape[-1]
        or teacher_dims[1] < vocab_size):
      raise ValueError(f"vocabulary mismatch: student head {student_head.shape} "
                       f"({student_layout}), teacher head {teacher_head.shape} "
                       f"({teacher_layout}); the teacher's must cover the student's V")
    target = jnp.reshape(teacher_hidden, (-1, teacher_hidden.shape[-1]))
    wt = teacher_head
  weights = token_weights(loss_mask(name, positions, mask, labels), normalize=normalize,
                          num_valid_tokens=num_valid_tokens, num_sequences=num_sequences,
                          row_weights=row_weights)
  if mesh is None:
    mesh = jax.sharding.get_abstract_mesh()
  softcaps = (logit_softcap, teacher_logit_softcap)
  fused = _make_fused(spec, full, chunk_size=chunk_size, softcaps=softcaps, mesh=mesh,
                      token_axes=tuple(token_axes), vocab_axis=vocab_axis,
                      vocab_major=(vocab_major, teacher_vocab_major))
  hs = jnp.reshape(student_hidden, (-1, student_hidden.shape[-1]))
  return fused(hs, student_head, lax.stop_gradient(target),
               None if wt is None else lax.stop_gradient(wt),
               lax.stop_gradient(weights.reshape(-1)))
