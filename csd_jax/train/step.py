"""The jitted distillation step: teacher forward, student forward / backward, loss, update.

One call does a whole optimizer step over `grad_accum` micro-batches (a `lax.scan`). Every
micro-batch's loss is normalised by the valid-token count of the *whole* global batch, so the
summed gradients equal those of the batch in one piece, however it is split or sharded. The
teacher runs under `stop_gradient` and is an input only: it is never updated, never donated.

A batch of chat pairs (`data.source: pairs`) carries `pair_role` (`losses.PAIR_TEACHER` on the
row of the teacher's response, `PAIR_STUDENT` on the student's): the distillation term is then
the official pair objective, per sequence `(2 - beta)` x the teacher-response row's token mean
plus `beta` x the student-response row's, averaged over the global batch's pairs (beta from
`Objective.pair_beta` at the step); the cross-entropy term covers the teacher's responses only
(the official `seqkd`: SFT on the teacher's answer, never on the student's own).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from csd_jax.losses import (IGNORE_LABEL, PAIR_TEACHER, chunked_token_sums, fused_logit_loss,
                            logit_loss, num_pairs, pair_row_weights)
from csd_jax.runtime.sharding import loss_axes
from csd_jax.run.state import TrainState, all_finite

Array = jax.Array
Batch = Mapping[str, Array]


@dataclasses.dataclass(frozen=True)
class Objective:
  """`kd_coef * distill + ce_coef * ce (+ lm_coef * lm on pre-training text)`."""

  name: str
  params: Mapping[str, Any]
  kd_coef: float = 1.0
  ce_coef: float = 0.0
  lm_coef: float = 0.0
  fused: bool = True
  chunk_size: int = 1024
  normalize: str = "token"
  vocab_size: int | None = None  # both heads are cut to this (None: the student's)
  rules: Mapping[str, Any] | None = None  # mesh.rules: where the fused loss splits its work
  pair_beta: Callable[[Array], Array] | None = None  # chat pairs: step -> beta (None: 1)


def _count_kwargs(batch: Batch, normalize: str) -> dict[str, Array]:
  """The global normaliser of a batch: valid tokens, or sequences with one (pairs, for a batch
  of chat pairs: the pair objective averages over pairs)."""
  valid = batch["labels"] != IGNORE_LABEL
  if normalize == "sequence" and "pair_role" in batch:
    return {"num_sequences": num_pairs(batch["pair_role"], valid)}
  if normalize == "sequence":
    return {"num_sequences": jnp.sum(jnp.any(valid, axis=-1))}
  return {"num_valid_tokens": jnp.sum(valid)}


def _forward(model: Any, batch: Batch, dropout_key: Array | None = None) -> Array:
  hidden, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"],
                                  batch["positions"], dropout_key=dropout_key)
  return hidden


def _head(model: Any, vocab: int | None) -> Array:
  head = model.head_weight()
  return head if vocab is None else head[:, :vocab]


def _stored_head(model: Any, vocab: int | None) -> tuple[Array, bool]:
  """The LM head for the fused loss as it is stored (`CausalLM.stored_head`), cut to `vocab`."""
  head, vocab_major = model.stored_head()
  if vocab is not None:
    head = head[:vocab] if vocab_major else head[:, :vocab]
  return head, vocab_major


def distill_loss(student: Any, teacher: Any, batch: Batch, objective: Objective,
                 counts: Mapping[str, Array], dropout_key: Array | None = None,
                 pair_beta: Array | float = 1.0) -> tuple[Array, dict[str, Array]]:
  """The objective on one (micro-)batch, normalised by the global `counts`; `pair_beta` weighs
  a batch of chat pairs (see the module's docstring)."""
  valid = batch["labels"] != IGNORE_LABEL
  kd_rows = ce_rows = None
  if "pair_role" in batch:
    kd_rows = pair_row_weights(batch["pair_role"], pair_beta)
    ce_rows = (batch["pair_role"][..., 0] == PAIR_TEACHER).astype(jnp.float32)
  hidden = _forward(student, batch, dropout_key)
  head, vocab_major = _stored_head(student, objective.vocab_size)
  token_axes, vocab_axis = loss_axes(objective.rules)
  fused_axes = {"token_axes": token_axes, "vocab_axis": vocab_axis}
  common = {"normalize": objective.normalize, **counts}
  parts: dict[str, Array] = {}
  if objective.kd_coef:
    teacher_hidden = jax.lax.stop_gradient(_forward(teacher, batch))
    if objective.fused:
      # Uncut: the fused loss takes a wider teacher head's first V columns from each chunk.
      teacher_head, teacher_vocab_major = _stored_head(teacher, None)
      parts["kd"] = fused_logit_loss(
          objective.name, hidden, head, teacher_hidden, jax.lax.stop_gradient(teacher_head),
          valid, chunk_size=objective.chunk_size, logit_softcap=student.cfg.final_logit_softcap,
          teacher_logit_softcap=teacher.cfg.final_logit_softcap, vocab_major=vocab_major,
          teacher_vocab_major=teacher_vocab_major, row_weights=kd_rows, **fused_axes, **common,
          **objective.params)
    else:
      v = objective.vocab_size
      parts["kd"] = logit_loss(objective.name, student.logits(hidden)[..., :v],
                               teacher.logits(teacher_hidden)[..., :v], valid,
                               row_weights=kd_rows, **common, **objective.params)
  if objective.ce_coef:
    parts["ce"] = fused_logit_loss("ce", hidden, head, None, None, valid, labels=batch["labels"],
                                   chunk_size=objective.chunk_size,
                                   logit_softcap=student.cfg.final_logit_softcap,
                                   vocab_major=vocab_major, row_weights=ce_rows, **fused_axes,
                                   **common)
  total = objective.kd_coef * parts.get("kd", 0.0) + objective.ce_coef * parts.get("ce", 0.0)
  return total, parts


def lm_loss(student: Any, batch: Batch, objective: Objective, counts: Mapping[str, Array]
            ) -> Array:
  """Next-token cross-entropy of the student on pre-training text."""
  hidden = _forward(student, batch)
  head, vocab_major = _stored_head(student, objective.vocab_size)
  token_axes, vocab_axis = loss_axes(objective.rules)
  return fused_logit_loss("ce", hidden, head, None, None, batch["labels"] != IGNORE_LABEL,
                          labels=batch["labels"], chunk_size=objective.chunk_size,
                          normalize=objective.normalize,
                          logit_softcap=student.cfg.final_logit_softcap, vocab_major=vocab_major,
                          token_axes=token_axes, vocab_axis=vocab_axis, **counts)


def split_micro_batches(batch: Batch, grad_accum: int) -> Batch:
  """[B, T] -> [A, B / A, T], micro-batch a holding rows a, a + A, ...: every device keeps its
  own rows (the batch axis is sharded in contiguous blocks), so the split moves no data."""
  def split(x: Array) -> Array:
    rows = x.shape[0] // grad_accum
    return jnp.swapaxes(x.reshape(rows, grad_accum, *x.shape[1:]), 0, 1)

  return {k: split(v) for k, v in batch.items()}


def make_train_step(student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef,
                    tx: optax.GradientTransformation, schedule: optax.Schedule,
                    objective: Objective, grad_accum: int) -> Callable:
  """`step(state, teacher_state, batch, lm_batch) -> (state, metrics)` (to be jitted).

  `state` is the `TrainState`; `teacher_state` the teacher's variables (the graph and state
  are None without a teacher: supervised fine-tuning, `kd_coef` 0); `lm_batch` is None without
  an LM term.
  """

  def micro_loss(params, untrained, teacher_state, batch, lm_batch, counts, lm_counts, key, beta):
    student = nnx.merge(student_graphdef, params, untrained)
    teacher = None if teacher_graphdef is None else nnx.merge(teacher_graphdef, teacher_state)
    total, parts = distill_loss(student, teacher, batch, objective, counts, key, beta)
    if lm_batch is not None and objective.lm_coef:
      parts["lm"] = lm_loss(student, lm_batch, objective, lm_counts)
      total = total + objective.lm_coef * parts["lm"]
    return total, parts

  def step(state: TrainState, teacher_state: nnx.State, batch: Batch,
           lm_batch: Batch | None = None) -> tuple[TrainState, dict[str, Array]]:
    counts = _count_kwargs(batch, objective.normalize)
    lm_counts = None if lm_batch is None else _count_kwargs(lm_batch, objective.normalize)
    beta = (jnp.float32(1.0) if objective.pair_beta is None
            else jnp.asarray(objective.pair_beta(state.step), jnp.float32))
    micro = split_micro_batches(batch, grad_accum)
    lm_micro = None if lm_batch is None else split_micro_batches(lm_batch, grad_accum)
    step_key = jax.random.fold_in(state.key, state.step)
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(grads, inputs):
      index, mb, lm_mb = inputs
      (total, parts), g = grad_fn(state.params, state.untrained, teacher_state, mb, lm_mb,
                                  counts, lm_counts, jax.random.fold_in(step_key, index), beta)
      return jax.tree.map(jnp.add, grads, g), (total, parts)

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, (totals, parts) = jax.lax.scan(
        accumulate, zeros, (jnp.arange(grad_accum), micro, lm_micro))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    loss, grad_norm = jnp.sum(totals), optax.tree.norm(grads)
    # A non-finite loss, gradient or result is skipped: the weights and the optimizer stay as
    # they were (the step still counts: it consumed its batch), so that no NaN ever reaches
    # the state, a checkpoint or the next step; the loop stops after a few in a row.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & all_finite(params)

    def keep(new: Any, old: Any) -> Any:
      return jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)

    metrics = {"loss": loss, "grad_norm": grad_norm,
               "lr": schedule(state.step), "valid_tokens": jnp.sum(batch["labels"] != IGNORE_LABEL),
               "nonfinite": jnp.logical_not(finite).astype(jnp.int32),
               **{k: jnp.sum(v) for k, v in parts.items()},
               **({"pair_beta": beta} if "pair_role" in batch else {})}
    new_state = state.replace(params=keep(params, state.params),
                              opt_state=keep(opt_state, state.opt_state), step=state.step + 1)
    return new_state, metrics

  return step


# The divergences every held-out evaluation reports, whatever the run's objective, so that runs
# with different losses compare on common measures.
HELD_OUT_DIVERGENCES = {"kl": ("fkl", {}), "csd": ("csd", {})}


def make_eval_step(student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef,
                   objective: Objective) -> Callable:
  """`eval(state, teacher_state, batch) -> sums` of held-out metrics over the valid tokens: the
  objective's distillation loss (`kd`), the forward KL and CSD at T = 1 (`kl`, `csd`), the
  student's cross-entropy (`ce`), the teacher-student top-1 agreement (`agree`) and the
  count; without a teacher (SFT), `ce` and the count only. Through the chunked head path: O(chunk x V) memory, never [N, V] logits."""

  def evaluate(state: TrainState, teacher_state: nnx.State | None, batch: Batch
               ) -> dict[str, Array]:
    student = state.student(student_graphdef)
    if teacher_graphdef is None:   # supervised fine-tuning: the student's cross-entropy only
      return chunked_token_sums(_forward(student, batch), _head(student, objective.vocab_size),
                                None, None, batch["labels"], chunk_size=objective.chunk_size,
                                logit_softcap=student.cfg.final_logit_softcap)
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    return chunked_token_sums(
        _forward(student, batch), _head(student, objective.vocab_size),
        _forward(teacher, batch), _head(teacher, objective.vocab_size), batch["labels"],
        chunk_size=objective.chunk_size, logit_softcap=student.cfg.final_logit_softcap,
        teacher_logit_softcap=teacher.cfg.final_logit_softcap,
        losses={"kd": (objective.name, objective.params), **HELD_OUT_DIVERGENCES})

  return evaluate
