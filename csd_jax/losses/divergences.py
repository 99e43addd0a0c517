"""Per-token losses between student logits `z` and teacher logits `t` (CSD_MATH.md).

Each function maps float32 logits `[..., V]` (invalid entries already replaced by 0, `valid`
marking the rest) to per-token values `[...]`. Reductions over the vocabulary go through a
`VocabAxis`, so the same code runs on a full vocabulary or on one shard of it. Gradients come
from autodiff: CSD's weights are stop-gradient constants, which makes autodiff produce exactly
the closed-form gradient of CSD_MATH.md; the baselines' gradients are those of the official
PyTorch code, which also differentiates the plain formulas.

Keyword-only parameters of each function are its public parameters (the registry reads them).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from csd_jax.losses.vocab import LogProbs, VocabAxis, log_softmax, logsumexp

Array = jax.Array
WeightSpec = str | float

WEIGHT_NAMES = ("student", "teacher", "uniform")
LOGIT_NORMS = ("none", "mean", "min", "max", "std", "range")


def _kl(a: LogProbs, b_log_prob: Array, valid: Array, axis: VocabAxis) -> Array:
  """KL(a || b) = sum_v a_v (log a_v - log b_v) over the valid vocabulary."""
  return axis.sum(jnp.where(valid, a.prob * (a.log_prob - b_log_prob), 0.0))


def _log_mixture(lam_a: float, a: LogProbs, b: LogProbs) -> Array:
  """log(lam_a * a + (1 - lam_a) * b), stable in log space; exact at lam_a = 0 or 1."""
  if lam_a >= 1.0:
    return a.log_prob
  if lam_a <= 0.0:
    return b.log_prob
  return jnp.logaddexp(jnp.log(lam_a) + a.log_prob, jnp.log1p(-lam_a) + b.log_prob)


def _weight(spec: WeightSpec, q: LogProbs, p: LogProbs, valid: Array, axis: VocabAxis) -> Array:
  """A CSD / DLD weighting over the vocabulary, held constant for differentiation."""
  if spec == "student":
    w = q.prob
  elif spec == "teacher":
    w = p.prob
  elif spec == "uniform":
    count = axis.sum(valid.astype(jnp.float32))
    w = jnp.where(valid, 1.0 / jnp.maximum(count, 1.0)[..., None], 0.0)
  else:  # a float a: the mixture a * p + (1 - a) * q
    w = spec * p.prob + (1.0 - spec) * q.prob
  return lax.stop_gradient(w)


def csd(z: Array, t: Array, valid: Array, axis: VocabAxis, *, w1: WeightSpec = "student",
        w2: WeightSpec = "student", temperature: float = 1.0) -> Array:
  """Concrete Score Distillation: 1/4 sum_{x,y} w1(y) w2(x) (d_x - d_y)^2, d = z - t, in O(V).

  Centred on c = E_w2[d] before squaring, so that large logits (|d| ~ 1e4) lose nothing to
  cancellation: l = 1/4 (E_w1[(d - c)^2] + E_w2[(d - c)^2]). The temperature enters only the
  softmax weights; the residual d is never tempered.
  """
  q = log_softmax(z, valid, axis, temperature)
  p = log_softmax(t, valid, axis, temperature)
  weight1 = _weight(w1, q, p, valid, axis)
  weight2 = _weight(w2, q, p, valid, axis)
  d = jnp.where(valid, z - t, 0.0)
  centred = jnp.where(valid, d - axis.sum(weight2 * d)[..., None], 0.0)
  squared = centred * centred
  return 0.25 * (axis.sum(weight1 * squared) + axis.sum(weight2 * squared))


def fkl(z: Array, t: Array, valid: Array, axis: VocabAxis, *, temperature: float = 1.0) -> Array:
  """Forward KL(p || q): mode-covering."""
  q = log_softmax(z, valid, axis, temperature)
  p = log_softmax(t, valid, axis, temperature)
  return _kl(p, q.log_prob, valid, axis)


def rkl(z: Array, t: Array, valid: Array, axis: VocabAxis, *, temperature: float = 1.0) -> Array:
  """Reverse KL(q || p): mode-seeking."""
  q = log_softmax(z, valid, axis, temperature)
  p = log_softmax(t, valid, axis, temperature)
  return _kl(q, p.log_prob, valid, axis)


def symkl(z: Array, t: Array, valid: Array, axis: VocabAxis, *, lam: float = 0.9,
          temperature: float = 1.0) -> Array:
  """(1 - lam) KL(p || q) + lam KL(q || p)."""
  q = log_softmax(z, valid, axis, temperature)
  p = log_softmax(t, valid, axis, temperature)
  return (1.0 - lam) * _kl(p, q.log_prob, valid, axis) + lam * _kl(q, p.log_prob, valid, axis)


def jeffreys(z: Array, t: Array, valid: Array, axis: VocabAxis, *,
             temperature: float = 1.0) -> Array:
  """KL(p || q) + KL(q || p)."""
  q = log_softmax(z, valid, axis, temperature)
  p = log_softmax(t, valid, axis, temperature)
  return _kl(p, q.log_prob, valid, axis) + _kl(q, p.log_prob, valid, axis)


def tvd(z: Array, t: Array, valid: Array, axis: VocabAxis, *, temperature: float = 1.0) -> Array:
  """Total variation 1/2 sum |p - q|."""
  q = log_softmax(z, valid, axis, temperature)
  p = log_softmax(t, valid, axis, temperature)
  return 0.5 * axis.sum(jnp.where(valid, jnp.abs(p.prob - q.prob), 0.0))


def jsd(z: Array, t: Array, valid: Array, axis: VocabAxis, *, lam: float = 0.9,
        temperature: float = 1.0) -> Array:
  """Generalised JSD: m = (1 - lam) p + lam q; lam KL(q || m) + (1 - lam) KL(p || m)."""
  q = log_softmax(z, valid, axis, temperature)
  p = log_softmax(t, valid, axis, temperature)
  log_m = _log_mixture(lam, q, p)
  return lam * _kl(q, log_m, valid, axis) + (1.0 - lam) * _kl(p, log_m, valid, axis)


def skl(z: Array, t: Array, valid: Array, axis: VocabAxis, *, lam: float = 0.1,
        temperature: float = 1.0) -> Array:
  """Skew forward KL(p || lam p + (1 - lam) q)."""
  q = log_softmax(z, valid, axis, temperature)
  p = log_softmax(t, valid, axis, temperature)
  return _kl(p, _log_mixture(lam, p, q), valid, axis)


def srkl(z: Array, t: Array, valid: Array, axis: VocabAxis, *, lam: float = 0.1,
         temperature: float = 1.0) -> Array:
  """Skew reverse KL(q || (1 - lam) p + lam q)."""
  q = log_softmax(z, valid, axis, temperature)
  p = log_softmax(t, valid, axis, temperature)
  return _kl(q, _log_mixture(lam, q, p), valid, axis)


# Below this, a parameter of the AB-divergence counts as zero (as in the official code).
_AB_EPS = 1e-8


def ab(z: Array, t: Array, valid: Array, axis: VocabAxis, *, alpha: float = 0.2,
       beta: float = 0.7, temperature: float = 1.0) -> Array:
  """Alpha-beta divergence, with the limits at alpha, beta or alpha + beta = 0."""
  log_q = log_softmax(z, valid, axis, temperature).log_prob
  log_p = log_softmax(t, valid, axis, temperature).log_prob

  def total(x: Array) -> Array:
    return axis.sum(jnp.where(valid, x, 0.0))

  if abs(alpha) < _AB_EPS and abs(beta) < _AB_EPS:
    return 0.5 * total((log_q - log_p) ** 2)
  if abs(alpha) < _AB_EPS:
    r = log_q - log_p
    return total(jnp.exp(beta * log_q) * (beta * r - 1.0) + jnp.exp(beta * log_p)) / beta**2
  if abs(beta) < _AB_EPS:
    r = log_p - log_q
    return total(jnp.exp(alpha * log_p) * (alpha * r - 1.0) + jnp.exp(alpha * log_q)) / alpha**2
  if abs(alpha + beta) < _AB_EPS:
    r = log_q - log_p
    return total(alpha * r + jnp.exp(-alpha * r) - 1.0) / alpha**2
  apb = alpha + beta
  cross = jnp.exp(logsumexp(alpha * log_p + beta * log_q, valid, axis))
  teacher_term = alpha / apb * jnp.exp(logsumexp(apb * log_p, valid, axis))
  student_term = beta / apb * jnp.exp(logsumexp(apb * log_q, valid, axis))
  return -(cross - teacher_term - student_term) / (alpha * beta)


def _normalise_logits(x: Array, valid: Array, axis: VocabAxis, how: str) -> Array:
  if how == "none":
    return x
  count = jnp.maximum(axis.sum(valid.astype(jnp.float32)), 1.0)[..., None]
  if how in ("mean", "std"):
    centred = jnp.where(valid, x - axis.sum(jnp.where(valid, x, 0.0))[..., None] / count, 0.0)
    if how == "mean":
      return centred
    # unbiased (n - 1), as torch.std in the official ablation; + 1e-9 as it adds
    std = jnp.sqrt(axis.sum(centred * centred)[..., None] / jnp.maximum(count - 1.0, 1.0))
    return centred / (std + 1e-9)
  high = axis.max_differentiable(x, valid)[..., None]
  low = -axis.max_differentiable(-x, valid)[..., None]
  if how == "max":
    return jnp.where(valid, x - high, 0.0)
  if how == "min":
    return jnp.where(valid, x - low, 0.0)
  # range: to [-1, 1] as the official ablation (not [0, 1], which makes the loss 4x smaller)
  return jnp.where(valid, 2.0 * (x - low) / (high - low + 1e-9) - 1.0, 0.0)


def dld(z: Array, t: Array, valid: Array, axis: VocabAxis, *, weight: WeightSpec = "student",
        logit_norm: str = "none", temperature: float = 1.0) -> Array:
  """Direct logit distillation: 1/4 sum_v sg[w_v] (zn_v - tn_v)^2 on normalised logits."""
  q = log_softmax(z, valid, axis, temperature)
  p = log_softmax(t, valid, axis, temperature)
  w = _weight(weight, q, p, valid, axis)
  diff = _normalise_logits(z, valid, axis, logit_norm) - _normalise_logits(t, valid, axis,
                                                                           logit_norm)
  return 0.25 * axis.sum(jnp.where(valid, w * diff * diff, 0.0))


def ce(z: Array, labels: Array, valid: Array, axis: VocabAxis) -> Array:
  """Cross-entropy -log q(label) on the data's next token (the SFT term)."""
  is_label = axis.global_index(z.shape[-1]) == labels[..., None]
  label_logit = axis.sum(jnp.where(is_label & valid, z, 0.0))
  return logsumexp(z, valid, axis) - label_logit
