"""Forward-only held-out metrics from hidden states and LM heads, without `[N, V]` logits.

`chunked_token_sums` walks the tokens in chunks (a `lax.map`): each chunk forms its logits
(float32 accumulation, each model's own soft-cap), reduces them to per-token values, and keeps
only their sums over the valid tokens. Peak extra memory is O(chunk x V), whatever N is.

It returns SUMS, not means, so that callers can add them over batches, hosts and micro-batches
and divide once at the end (`ce / count`, `agree / count`, ...). No gradient is needed here: it
is for evaluation. Plain `jnp` operations only, so under an ambient mesh (`jax.set_mesh`) GSPMD
partitions it like the inputs (tokens over the data axes, the vocabulary over the tensor axis).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from csd_jax.losses.fused import DEFAULT_CHUNK_SIZE, softcap
from csd_jax.losses.registry import IGNORE_LABEL, LOSSES, resolve, spec_loss
from csd_jax.losses.vocab import VocabAxis

Array = jax.Array

# The keys always returned (with a teacher, "agree" too): a loss key may not shadow them.
_RESERVED = ("count", "ce", "agree")


def _check_inputs(student_hidden: Array, student_head: Array, teacher_hidden: Array | None,
                  teacher_head: Array | None, labels: Array, chunk_size: int,
                  losses: Mapping[str, tuple[str, Mapping[str, Any]]]) -> None:
  if chunk_size < 1:
    raise ValueError(f"chunk_size={chunk_size}: must be a positive number of tokens")
  if student_head.ndim != 2 or student_head.shape[0] != student_hidden.shape[-1]:
    raise ValueError(f"student head {student_head.shape} does not match hidden size "
                     f"{student_hidden.shape[-1]}: expected [H, V]")
  if tuple(labels.shape) != tuple(student_hidden.shape[:-1]):
    raise ValueError(f"labels {labels.shape} and student hidden {student_hidden.shape} cover "
                     "different positions: labels must be [...] for hidden [..., H]")
  if (teacher_hidden is None) != (teacher_head is None):
    raise ValueError("pass both teacher_hidden and teacher_head, or neither")
  if teacher_hidden is None:
    if losses:
      raise ValueError(f"losses {sorted(losses)} compare with a teacher: pass teacher_hidden "
                       "and teacher_head, or no losses")
    return
  if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
    raise ValueError(f"teacher hidden {teacher_hidden.shape} and student hidden "
                     f"{student_hidden.shape} cover different positions")
  if teacher_head.shape != (teacher_hidden.shape[-1], student_head.shape[1]):
    raise ValueError(f"vocabulary mismatch: student head {student_head.shape}, teacher head "
                     f"{teacher_head.shape}; both must be [H, V] with the same V")
  shadowed = sorted(set(losses) & set(_RESERVED))
  if shadowed:
    raise ValueError(f"loss key(s) {shadowed} collide with the built-in sums "
                     f"{', '.join(_RESERVED)}: rename them")


def chunked_token_sums(student_hidden: Array, student_head: Array, teacher_hidden: Array | None,
                       teacher_head: Array | None, labels: Array, *,
                       chunk_size: int = DEFAULT_CHUNK_SIZE,
                       logit_softcap: float | None = None,
                       teacher_logit_softcap: float | None = None,
                       losses: Mapping[str, tuple[str, Mapping[str, Any]]] = ()
                       ) -> dict[str, Array]:
  """Float32 scalar sums over the valid tokens (labels != -100), in O(chunk x V) memory.

  Args:
    student_hidden: `[..., Hs]` final hidden states (after the final norm).
    student_head: `[Hs, V]` the student's LM-head weight.
    teacher_hidden: `[..., Ht]`, or None for the student's metrics only.
    teacher_head: `[Ht, V]` (cut to the student's V), or None.
    labels: `[...]` int next-token ids; -100 = ignored.
    chunk_size: tokens per chunk.
    logit_softcap: `cap * tanh(logits / cap)` on the student's logits; None: no cap.
    teacher_logit_softcap: the same for the teacher, its own cap; None: no cap.
    losses: `{key: (loss_name, params)}`: the per-token loss of each (as `per_token_loss`
      defines it, student logits vs teacher logits; `ce` takes the labels), summed under `key`.

  Returns:
    `"count"` (valid tokens), `"ce"` (the student's next-token NLL, summed); with a teacher,
    `"agree"` (tokens where the student's and teacher's argmax agree) and one entry per loss.

  Raises:
    ValueError: mismatched shapes, a bad chunk size, an unknown loss or parameter, losses
      without a teacher, or a loss key that shadows a built-in one.
  """
  losses = dict(losses)
  labels = jnp.asarray(labels)
  _check_inputs(student_hidden, student_head, teacher_hidden, teacher_head, labels, chunk_size,
                losses)
  resolved = {key: resolve(name, params) for key, (name, params) in losses.items()}
  ce_spec = LOSSES["ce"]
  axis = VocabAxis()

  hs = jnp.reshape(student_hidden, (-1, student_hidden.shape[-1]))
  ids = jnp.reshape(labels, (-1,)).astype(jnp.int32)
  n = hs.shape[0]
  chunk = min(chunk_size, max(n, 1))
  n_pad = -(-n // chunk) * chunk
  # Padded tokens carry the ignored label: they count nowhere.
  hs_c = jnp.pad(hs, ((0, n_pad - n), (0, 0))).reshape(n_pad // chunk, chunk, -1)
  ids_c = jnp.pad(ids, (0, n_pad - n), constant_values=IGNORE_LABEL).reshape(-1, chunk)
  xs: dict[str, Array] = {"h": hs_c, "ids": ids_c}
  if teacher_hidden is not None:
    ht = jnp.reshape(teacher_hidden, (-1, teacher_hidden.shape[-1]))
    xs["ht"] = jnp.pad(ht, ((0, n_pad - n), (0, 0))).reshape(n_pad // chunk, chunk, -1)

  def masked_sum(values: Array, valid: Array) -> Array:
    # where, not multiply: an ignored token's value may be anything (even NaN).
    return jnp.sum(jnp.where(valid, values, 0.0))

  def one_chunk(x: dict[str, Array]) -> dict[str, Array]:
    valid = x["ids"] != IGNORE_LABEL
    z_raw = softcap(jnp.dot(x["h"], student_head, preferred_element_type=jnp.float32),
                     logit_softcap)
    out = {"count": jnp.sum(valid.astype(jnp.float32)),
           "ce": masked_sum(spec_loss(ce_spec, z_raw, x["ids"], axis), valid)}
    if "ht" not in x:
      return out
    t_raw = softcap(jnp.dot(x["ht"], teacher_head, preferred_element_type=jnp.float32),
                     teacher_logit_softcap)
    agree = jnp.argmax(z_raw, axis=-1) == jnp.argmax(t_raw, axis=-1)
    out["agree"] = jnp.sum((agree & valid).astype(jnp.float32))
    for key, (spec, params) in resolved.items():
      target = x["ids"] if spec.takes_labels else t_raw
      out[key] = masked_sum(spec_loss(spec, z_raw, target, axis, **params), valid)
    return out

  # Sums per chunk, added once at the end: [N / chunk] scalars, never [N, V].
  per_chunk = lax.map(one_chunk, xs)
  return {key: jnp.sum(value).astype(jnp.float32) for key, value in per_chunk.items()}
