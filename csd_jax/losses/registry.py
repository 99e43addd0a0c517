"""The loss registry: names, parameters with their defaults and checks, and the logits API.

`logit_loss` is the public entry point on materialised logits; `per_token_loss` gives the
unreduced values (for inspection). Both upcast to float32 before any arithmetic.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from csd_jax.losses import divergences
from csd_jax.losses.reduce import token_weights, weighted_sum
from csd_jax.losses.vocab import VocabAxis

Array = jax.Array

IGNORE_LABEL = -100


@dataclasses.dataclass(frozen=True)
class LossSpec:
  """A registered loss: its per-token function and its keyword parameters with defaults."""

  name: str
  fn: Callable[..., Array]
  defaults: Mapping[str, Any]
  takes_labels: bool


def _spec(name: str, fn: Callable[..., Array], takes_labels: bool = False) -> LossSpec:
  defaults = {p.name: p.default for p in inspect.signature(fn).parameters.values()
              if p.kind is inspect.Parameter.KEYWORD_ONLY}
  return LossSpec(name, fn, defaults, takes_labels)


LOSSES: dict[str, LossSpec] = {
    spec.name: spec for spec in (
        _spec("csd", divergences.csd),
        _spec("fkl", divergences.fkl),
        _spec("rkl", divergences.rkl),
        _spec("symkl", divergences.symkl),
        _spec("jeffreys", divergences.jeffreys),
        _spec("tvd", divergences.tvd),
        _spec("jsd", divergences.jsd),
        _spec("skl", divergences.skl),
        _spec("srkl", divergences.srkl),
        _spec("ab", divergences.ab),
        _spec("dld", divergences.dld),
        _spec("ce", divergences.ce, takes_labels=True),
    )
}
LOSS_NAMES = tuple(LOSSES)


def _check_weight(key: str, value: Any) -> None:
  if isinstance(value, str):
    if value not in divergences.WEIGHT_NAMES:
      raise ValueError(f"{key}={value!r}: valid weightings are "
                       f"{', '.join(divergences.WEIGHT_NAMES)} or a float mixture in [0, 1]")
  elif not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
    raise ValueError(f"{key}={value!r}: a mixture coefficient must be a float in [0, 1]")


def _check_value(key: str, value: Any) -> None:
  if key in ("w1", "w2", "weight"):
    _check_weight(key, value)
  elif key == "temperature":
    if not isinstance(value, (int, float)) or value <= 0:
      raise ValueError(f"temperature={value!r}: must be a positive float")
  elif key == "lam":
    if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
      raise ValueError(f"lam={value!r}: must be a float in [0, 1]")
  elif key in ("alpha", "beta"):
    if not isinstance(value, (int, float)):
      raise ValueError(f"{key}={value!r}: must be a float")
  elif key == "logit_norm" and value not in divergences.LOGIT_NORMS:
    raise ValueError(f"logit_norm={value!r}: valid: {', '.join(divergences.LOGIT_NORMS)}")


def resolve(name: str, params: Mapping[str, Any]) -> tuple[LossSpec, dict[str, Any]]:
  """The spec of `name` and its full parameters (defaults filled in), checked.

  Raises:
    ValueError: unknown loss name, unknown parameter or invalid value (listing the valid ones).
  """
  if name not in LOSSES:
    raise ValueError(f"unknown loss {name!r}; valid losses: {', '.join(LOSS_NAMES)}")
  spec = LOSSES[name]
  unknown = sorted(set(params) - set(spec.defaults))
  if unknown:
    valid = ", ".join(spec.defaults) or "none"
    raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for loss {name!r}; "
                     f"valid: {valid}")
  full = {**spec.defaults, **params}
  for key, value in full.items():
    _check_value(key, value)
  return spec, full


def prepare_logits(student_logits: Array, target: Array,
                   takes_labels: bool) -> tuple[Array, Array, Array]:
  """float32 logits with non-finite entries zeroed, the target, and the entries to compute on.

  Only the finite entries are computed on, so that no value or gradient sees a NaN; `-inf`
  marks an entry outside the vocabulary, and `nonfinite_poison` makes a position with a NaN
  or `+inf` entry give NaN, so that a broken model is never mistaken for a good one.
  """
  z = jnp.asarray(student_logits).astype(jnp.float32)
  if takes_labels:
    labels = jnp.asarray(target)
    if labels.shape != z.shape[:-1]:
      raise ValueError(f"labels shape {labels.shape} does not match logits {z.shape[:-1]}")
    valid = jnp.isfinite(z)
    return jnp.where(valid, z, 0.0), labels.astype(jnp.int32), valid
  t = jnp.asarray(target).astype(jnp.float32)
  if t.shape[-1] != z.shape[-1]:
    raise ValueError(f"vocabulary mismatch: student logits have V={z.shape[-1]}, teacher "
                     f"V={t.shape[-1]}; cut both to the common vocabulary first")
  if t.shape != z.shape:
    raise ValueError(f"student logits {z.shape} and teacher logits {t.shape} differ in shape")
  valid = jnp.isfinite(z) & jnp.isfinite(t)
  return jnp.where(valid, z, 0.0), jnp.where(valid, t, 0.0), valid


def nonfinite_poison(logits: Array, axis: VocabAxis) -> Array:
  """Per position: NaN where an entry of `logits` is NaN or `+inf` (a broken model), else 0.

  Added to a position's loss it makes the loss NaN without touching the gradient (the logits
  only choose between constants); summed over the vocabulary through `axis`, so that every
  shard of a split vocabulary agrees.
  """
  x = jnp.asarray(logits)
  broken = jnp.isnan(x) | (x == jnp.inf)
  return axis.sum(jnp.where(broken, jnp.nan, 0.0).astype(jnp.float32))


def spec_loss(spec: LossSpec, student_logits: Array, target: Array, axis: VocabAxis,
              **params: Any) -> Array:
  """`spec`'s per-position loss on raw logits (`-inf`: outside the vocabulary), NaN at a
  position where the student's or the teacher's logits hold a NaN or `+inf`."""
  z, tgt, valid = prepare_logits(student_logits, target, spec.takes_labels)
  poison = nonfinite_poison(student_logits, axis)
  if not spec.takes_labels:
    poison = poison + nonfinite_poison(target, axis)
  return spec.fn(z, tgt, valid, axis, **params) + poison


def per_token_loss(name: str, student_logits: Array, target: Array, *,
                   vocab_axis: VocabAxis = VocabAxis(), **params: Any) -> Array:
  """Unreduced float32 loss per position: `[...]` for logits `[..., V]`.

  `target` is the teacher's logits `[..., V]`, or integer labels `[...]` for `ce`.
  """
  spec, full = resolve(name, params)
  return spec_loss(spec, student_logits, target, vocab_axis, **full)


def loss_mask(name: str, positions: tuple[int, ...], mask: Array | None,
              labels: Array | None = None) -> Array:
  """The float32 positions that count: `mask` (all if None), and labels != -100 for `ce`."""
  spec, _ = resolve(name, {})
  out = jnp.ones(positions, jnp.float32) if mask is None else jnp.asarray(mask, jnp.float32)
  if out.shape != tuple(positions):
    raise ValueError(f"mask shape {out.shape} does not match the positions {tuple(positions)}")
  if spec.takes_labels:
    out = out * (jnp.asarray(labels) != IGNORE_LABEL)
  return out


def logit_loss(name: str, student_logits: Array, teacher_logits: Array,
               mask: Array | None = None, *, normalize: str = "token",
               num_valid_tokens: Array | float | None = None,
               num_sequences: Array | float | None = None, row_weights: Array | None = None,
               **params: Any) -> Array:
  """A distillation loss on logits, reduced to a float32 scalar.

  Args:
    name: one of `LOSS_NAMES`.
    student_logits: `[..., V]`, any float dtype (computed in float32).
    teacher_logits: `[..., V]`; for `ce`, integer labels `[...]` (-100 = ignored).
    mask: `[...]` bool or float; None = every position.
    normalize: "token" (mean over valid positions) or "sequence" (per sequence, then over
      sequences; the mask's last axis is the sequence).
    num_valid_tokens / num_sequences: the global normaliser, for micro-batches and shards.
    row_weights: a factor per sequence (`mask.shape[:-1]`), e.g. the chat pairs' (see
      `reduce.pair_row_weights`); None: 1.
    **params: the loss's parameters (see `LOSSES[name].defaults`).
  """
  spec, _ = resolve(name, params)
  positions = jnp.shape(student_logits)[:-1]
  labels = teacher_logits if spec.takes_labels else None
  weights = token_weights(loss_mask(name, positions, mask, labels), normalize=normalize,
                          num_valid_tokens=num_valid_tokens, num_sequences=num_sequences,
                          row_weights=row_weights)
  values = per_token_loss(name, student_logits, teacher_logits, **params)
  return weighted_sum(values, weights)
