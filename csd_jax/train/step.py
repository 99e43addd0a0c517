"""The jitted distillation step: teacher forward, student forward / backward, loss, update.

One call does a whole optimizer step over `grad_accum` micro-batches (a `lax.scan`). Every
micro-batch's loss is normalised by the valid-token count of the *whole* global batch, so the
summed gradients equal those of the batch in one piece, however it is split or sharded. The
teacher runs under `stop_gradient` and is an input only: it is never updated, never donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from csd_jax.losses import IGNORE_LABEL, fused_logit_loss, logit_loss

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


def _count_kwargs(labels: Array, normalize: str) -> dict[str, Array]:
  """The global normaliser of a batch: valid tokens, or sequences with one."""
  valid = labels != IGNORE_LABEL
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


def distill_loss(student: Any, teacher: Any, batch: Batch, objective: Objective,
                 counts: Mapping[str, Array], dropout_key: Array | None = None
                 ) -> tuple[Array, dict[str, Array]]:
  """The objective on one (micro-)batch, normalised by the global `counts`."""
  valid = batch["labels"] != IGNORE_LABEL
  hidden = _forward(student, batch, dropout_key)
  head = _head(student, objective.vocab_size)
  common = {"normalize": objective.normalize, **counts}
  parts: dict[str, Array] = {}
  if objective.kd_coef:
    teacher_hidden = jax.lax.stop_gradient(_forward(teacher, batch))
    teacher_head = jax.lax.stop_gradient(_head(teacher, objective.vocab_size))
    if objective.fused:
      parts["kd"] = fused_logit_loss(
          objective.name, hidden, head, teacher_hidden, teacher_head, valid,
          chunk_size=objective.chunk_size, logit_softcap=student.cfg.final_logit_softcap,
          teacher_logit_softcap=teacher.cfg.final_logit_softcap, **common, **objective.params)
    else:
      v = objective.vocab_size
      parts["kd"] = logit_loss(objective.name, student.logits(hidden)[..., :v],
                               teacher.logits(teacher_hidden)[..., :v], valid, **common,
                               **objective.params)
  if objective.ce_coef:
    parts["ce"] = fused_logit_loss("ce", hidden, head, None, None, valid, labels=batch["labels"],
                                   chunk_size=objective.chunk_size,
                                   logit_softcap=student.cfg.final_logit_softcap, **common)
  total = objective.kd_coef * parts.get("kd", 0.0) + objective.ce_coef * parts.get("ce", 0.0)
  return total, parts


def lm_loss(student: Any, batch: Batch, objective: Objective, counts: Mapping[str, Array]
            ) -> Array:
  """Next-token cross-entropy of the student on pre-training text."""
  hidden = _forward(student, batch)
  return fused_logit_loss("ce", hidden, _head(student, objective.vocab_size), None, None,
                          batch["labels"] != IGNORE_LABEL, labels=batch["labels"],
                          chunk_size=objective.chunk_size, normalize=objective.normalize,
                          logit_softcap=student.cfg.final_logit_softcap, **counts)


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

  `state` = {"params": trained variables, "frozen": the student's other variables,
  "opt_state", "step", "key"}; `lm_batch` is None without an LM term.
  """

  def micro_loss(params, frozen, teacher_state, batch, lm_batch, counts, lm_counts, key):
    student = nnx.merge(student_graphdef, params, frozen)
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    total, parts = distill_loss(student, teacher, batch, objective, counts, key)
    if lm_batch is not None and objective.lm_coef:
      parts["lm"] = lm_loss(student, lm_batch, objective, lm_counts)
      total = total + objective.lm_coef * parts["lm"]
    return total, parts

  def step(state, teacher_state, batch, lm_batch=None):
    counts = _count_kwargs(batch["labels"], objective.normalize)
    lm_counts = None if lm_batch is None else _count_kwargs(lm_batch["labels"],
                                                            objective.normalize)
    micro = split_micro_batches(batch, grad_accum)
    lm_micro = None if lm_batch is None else split_micro_batches(lm_batch, grad_accum)
    step_key = jax.random.fold_in(state["key"], state["step"])
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(grads, inputs):
      index, mb, lm_mb = inputs
      (total, parts), g = grad_fn(state["params"], state["frozen"], teacher_state, mb, lm_mb,
                                  counts, lm_counts, jax.random.fold_in(step_key, index))
      return jax.tree.map(jnp.add, grads, g), (total, parts)

    zeros = jax.tree.map(jnp.zeros_like, state["params"])
    grads, (totals, parts) = jax.lax.scan(
        accumulate, zeros, (jnp.arange(grad_accum), micro, lm_micro))
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": jnp.sum(totals), "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state["step"]), "valid_tokens": jnp.sum(batch["labels"] != -100),
               **{k: jnp.sum(v) for k, v in parts.items()}}
    new_state = {**state, "params": params, "opt_state": opt_state, "step": state["step"] + 1}
    return new_state, metrics

  return step


def make_eval_step(student_graphdef: nnx.GraphDef, teacher_graphdef: nnx.GraphDef,
                   objective: Objective) -> Callable:
  """`eval(params, frozen, teacher_state, batch) -> sums` for held-out metrics: the distillation
  loss summed over valid tokens, the valid count, and the teacher-student top-1 agreement."""

  def evaluate(params, frozen, teacher_state, batch):
    student = nnx.merge(student_graphdef, params, frozen)
    teacher = nnx.merge(teacher_graphdef, teacher_state)
    valid = batch["labels"] != IGNORE_LABEL
    count = jnp.sum(valid)
    plain = dataclasses.replace(objective, kd_coef=1.0, ce_coef=0.0, normalize="token")
    _, parts = distill_loss(student, teacher, batch, plain, {"num_valid_tokens": 1.0})
    v = objective.vocab_size
    hidden_s, hidden_t = _forward(student, batch), _forward(teacher, batch)
    agree = jnp.argmax(student.logits(hidden_s)[..., :v], -1) == jnp.argmax(
        teacher.logits(hidden_t)[..., :v], -1)
    return {"kd_sum": parts["kd"], "count": count, "agree": jnp.sum(agree & valid)}

  return evaluate
