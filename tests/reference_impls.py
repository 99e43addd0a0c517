"""Independent reference implementations of the csd_jax losses (CSD_MATH.md), for the tests.

Nothing here imports csd_jax. Two families:

- float64 NumPy values per token (`np_*`, `np_loss`): brute force where the package uses a
  closed form (CSD is the O(V^2) double sum), with weights from a softmax at temperature tau.
- PyTorch float64 autograd versions of the official CSD / DistiLLM code (`torch_*`,
  `torch_grad`): the baselines' plain formulas and CSD's surrogate losses, whose *gradient* (not
  value) is the reference. Each is averaged over tokens, like `logit_loss` with no mask.

All functions take logits `[N, V]` (one row per token position) and return `[N]` values, except
`torch_grad` which returns the gradient `[N, V]` of the token-mean.
"""

from __future__ import annotations

import numpy as np
import torch

# ----------------------------------------------------------------------------- NumPy (float64)


def np_log_softmax(x, tau=1.0):
  x = np.asarray(x, np.float64) / tau
  m = x.max(axis=-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def np_softmax(x, tau=1.0):
  return np.exp(np_log_softmax(x, tau))


def np_weight(spec, z, t, tau=1.0):
  """CSD / DLD weights per token: "student" q, "teacher" p, "uniform" 1/V, float a: a p + (1-a) q."""
  q, p = np_softmax(z, tau), np_softmax(t, tau)
  if isinstance(spec, str):
    if spec == "student":
      return q
    if spec == "teacher":
      return p
    if spec == "uniform":
      return np.full_like(q, 1.0 / q.shape[-1])
    raise ValueError(spec)
  return spec * p + (1.0 - spec) * q


def np_csd_weighted(z, t, w1, w2):
  """1/4 sum_y sum_x w1(y) w2(x) (d_x - d_y)^2 with given weights: the O(V^2) double sum.

  Brute force (no closed form): the full [N, V, V] array of pair terms, indexed [n, y, x].
  """
  d = np.asarray(z, np.float64) - np.asarray(t, np.float64)
  pairs = (d[:, None, :] - d[:, :, None]) ** 2
  return 0.25 * np.sum(w1[:, :, None] * w2[:, None, :] * pairs, axis=(1, 2))


def np_csd(z, t, w1="student", w2="student", tau=1.0):
  return np_csd_weighted(z, t, np_weight(w1, z, t, tau), np_weight(w2, z, t, tau))


def _kl(log_a, log_b):
  return np.sum(np.exp(log_a) * (log_a - log_b), axis=-1)


def _log_mix(lam_a, log_a, log_b):
  """log(lam_a a + (1 - lam_a) b)."""
  return np.log(lam_a * np.exp(log_a) + (1.0 - lam_a) * np.exp(log_b))


def np_ab(lq, lp, alpha, beta):
  """Alpha-beta divergence with the official code's special cases."""
  if alpha == 0 and beta == 0:
    return 0.5 * np.sum((lq - lp) ** 2, axis=-1)
  if alpha == 0:
    return np.sum(np.exp(beta * lq) * (beta * (lq - lp) - 1) + np.exp(beta * lp), -1) / beta**2
  if beta == 0:
    return np.sum(np.exp(alpha * lp) * (alpha * (lp - lq) - 1) + np.exp(alpha * lq), -1) / alpha**2
  if alpha + beta == 0:
    r = lq - lp
    return np.sum(alpha * r + np.exp(-alpha * r) - 1, axis=-1) / alpha**2
  p, q, s = np.exp(lp), np.exp(lq), alpha + beta
  cross = np.sum(p**alpha * q**beta, -1)
  return -(cross - alpha / s * np.sum(p**s, -1) - beta / s * np.sum(q**s, -1)) / (alpha * beta)


def np_normalise(x, how):
  x = np.asarray(x, np.float64)
  if how == "none":
    return x
  if how == "mean":
    return x - x.mean(-1, keepdims=True)
  if how == "min":
    return x - x.min(-1, keepdims=True)
  if how == "max":
    return x - x.max(-1, keepdims=True)
  if how == "std":
    return (x - x.mean(-1, keepdims=True)) / (x.std(-1, ddof=1, keepdims=True) + 1e-9)  # torch.std
  if how == "range":
    lo, hi = x.min(-1, keepdims=True), x.max(-1, keepdims=True)
    return 2 * (x - lo) / (hi - lo + 1e-9) - 1  # [-1, 1], the official ablation
  raise ValueError(how)


def np_ce(z, labels):
  ls = np_log_softmax(z)
  return -ls[np.arange(ls.shape[0]), np.asarray(labels)]


def np_loss(name, z, t, **params):
  """float64 per-token value of loss `name` (for "ce", `t` is the integer labels)."""
  if name == "ce":
    return np_ce(z, t)
  tau = params.pop("temperature", 1.0)
  if name == "csd":
    return np_csd(z, t, params.get("w1", "student"), params.get("w2", "student"), tau)
  if name == "dld":
    w = np_weight(params.get("weight", "student"), z, t, tau)
    how = params.get("logit_norm", "none")
    return 0.25 * np.sum(w * (np_normalise(z, how) - np_normalise(t, how)) ** 2, axis=-1)
  lq, lp = np_log_softmax(z, tau), np_log_softmax(t, tau)
  if name == "fkl":
    return _kl(lp, lq)
  if name == "rkl":
    return _kl(lq, lp)
  if name == "symkl":
    lam = params.get("lam", 0.9)
    return (1 - lam) * _kl(lp, lq) + lam * _kl(lq, lp)
  if name == "jeffreys":
    return _kl(lp, lq) + _kl(lq, lp)
  if name == "tvd":
    return 0.5 * np.sum(np.abs(np.exp(lp) - np.exp(lq)), axis=-1)
  if name == "jsd":
    lam = params.get("lam", 0.9)
    lm = _log_mix(1 - lam, lp, lq)  # m = (1 - lam) p + lam q
    return lam * _kl(lq, lm) + (1 - lam) * _kl(lp, lm)
  if name == "skl":
    return _kl(lp, _log_mix(params.get("lam", 0.1), lp, lq))  # m = lam p + (1 - lam) q
  if name == "srkl":
    return _kl(lq, _log_mix(1 - params.get("lam", 0.1), lp, lq))  # m = (1 - lam) p + lam q
  if name == "ab":
    return np_ab(lq, lp, params.get("alpha", 0.2), params.get("beta", 0.7))
  raise ValueError(name)


# ------------------------------------------------------------ PyTorch (float64), official code


def _probs(z, t, tau):
  return (torch.softmax(z / tau, -1), torch.softmax(t / tau, -1),
          torch.log_softmax(z / tau, -1), torch.log_softmax(t / tau, -1))


def torch_forward_kl(z, t, tau=1.0):
  """Official forward_kl: the cross-entropy form -sum p log q (same gradient as KL(p||q))."""
  q, p, lq, lp = _probs(z, t, tau)
  return -torch.sum(p * lq, -1)


def torch_reverse_kl(z, t, tau=1.0):
  q, p, lq, lp = _probs(z, t, tau)
  return torch.sum(q * (lq - lp), -1)


def torch_js_distance(z, t, lam=0.9, tau=1.0):
  q, p, lq, lp = _probs(z, t, tau)
  mixed_probs = (1 - lam) * p + lam * q
  log_m = torch.log(mixed_probs)
  return lam * torch.sum(q * (lq - log_m), -1) + (1 - lam) * torch.sum(p * (lp - log_m), -1)


def torch_skewed_forward_kl(z, t, lam=0.1, tau=1.0):
  q, p, lq, lp = _probs(z, t, tau)
  mixed_probs = lam * p + (1 - lam) * q
  return -torch.sum(p * torch.log(mixed_probs), -1)


def torch_skewed_reverse_kl(z, t, lam=0.1, tau=1.0):
  q, p, lq, lp = _probs(z, t, tau)
  mixed_probs = (1 - lam) * p + lam * q
  return torch.sum(q * (lq - torch.log(mixed_probs)), -1)


def torch_tv_distance(z, t, tau=1.0):
  q, p, lq, lp = _probs(z, t, tau)
  return 0.5 * torch.sum(torch.abs(p - q), -1)


def torch_csd(z, t, tau=1.0):
  """Official csd() (S,S) surrogate: sum(sg[q (d - E_q d)] z); only its gradient is meaningful."""
  q = torch.softmax(z / tau, -1).detach()
  d = (z - t).detach()
  grad = q * (d - torch.sum(q * d, -1, keepdim=True))
  return torch.sum(grad.detach() * z, -1)


def torch_csd_weighting_function(z, t, mode, tau=1.0):
  """Official csd_weighting_function: "US" (w1 uniform) or "TS" (w1 teacher), w2 student."""
  q = torch.softmax(z / tau, -1).detach()
  if mode == "US":
    w1 = torch.full_like(q, 1.0 / q.shape[-1])
  elif mode == "TS":
    w1 = torch.softmax(t / tau, -1).detach()
  else:
    raise ValueError(mode)
  w2 = q
  d = (z - t).detach()
  w_grad = (w1 * (d - torch.sum(w2 * d, -1, keepdim=True))
            + w2 * (d - torch.sum(w1 * d, -1, keepdim=True)))
  return torch.sum(w_grad.detach() * z / 2, -1)


def torch_csd_ts_mix(z, t, a, tau=1.0):
  """Official csd_ts_mix: m_a = a p + (1 - a) q as both weights; surrogate sum(sg[m_a (d - E d)] z)."""
  m = (a * torch.softmax(t / tau, -1) + (1 - a) * torch.softmax(z / tau, -1)).detach()
  d = (z - t).detach()
  grad = m * (d - torch.sum(m * d, -1, keepdim=True))
  return torch.sum(grad.detach() * z, -1)


def torch_grad(fn, z, t, **kwargs):
  """float64 gradient [N, V] of mean_n fn(z, t)[n] with respect to z (inputs: NumPy arrays)."""
  zt = torch.tensor(np.asarray(z, np.float64), requires_grad=True)
  tt = torch.tensor(np.asarray(t, np.float64))
  fn(zt, tt, **kwargs).mean().backward()
  return zt.grad.numpy()
