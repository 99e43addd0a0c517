"""csd_jax losses against independent references (tests/reference_impls.py, CSD_MATH.md).

- values: float64 NumPy, brute force for CSD (the O(V^2) double sum), every loss and parameter;
- CSD gradients: central finite differences of the brute-force value, weights frozen at the base
  point (CSD_MATH.md: the weights are stop-gradient constants);
- gradients: PyTorch float64 autograd of the official code's formulas (CSD's surrogates, whose
  gradient is the reference, and the DistiLLM baselines).

JAX runs in float32 (the package's arithmetic); references in float64 on the same float32
inputs. Tolerances are float32 rounding: ~1e-7 relative per operation, accumulated over sums of
V <= 40 terms, exp/log and the softmax, so values agree to rtol 1e-5 and gradients (smaller,
with more cancellation) to rtol 1e-4 plus an absolute floor of 1e-5 x the largest entry.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import reference_impls as ref
from csd_jax.losses import LOSS_NAMES, logit_loss, per_token_loss

jax.config.update("jax_enable_x64", False)

WEIGHTS = ["student", "teacher", "uniform", 0.3]
WEIGHT_PAIRS = [(w, w) for w in WEIGHTS] + [
    ("uniform", "student"), ("teacher", "student"), ("student", 0.7), ("teacher", "uniform")]
TEMPERATURES = [1.0, 2.0]


def logits(seed, n=4, v=17, scale=2.5):
  """Float32 student and teacher logits [n, v], standard normal times `scale`."""
  rng = np.random.default_rng(seed)
  z = (scale * rng.standard_normal((n, v))).astype(np.float32)
  t = (scale * rng.standard_normal((n, v))).astype(np.float32)
  return z, t


def jax_grad(name, z, t, mask=None, **params):
  """Gradient of the token-averaged `logit_loss` with respect to the student logits."""
  g = jax.grad(lambda x: logit_loss(name, x, jnp.asarray(t), mask, **params))(jnp.asarray(z))
  return np.asarray(g, np.float64)


def assert_grad_close(actual, expected, rtol=1e-4):
  expected = np.asarray(expected, np.float64)
  assert np.max(np.abs(expected)) > 1e-6  # a vanishing reference would make the check vacuous
  np.testing.assert_allclose(actual, expected, rtol=rtol, atol=1e-5 * np.max(np.abs(expected)))


# ------------------------------------------------------------------------------- CSD values


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("w1,w2", WEIGHT_PAIRS)
def test_csd_value_matches_brute_force(w1, w2, tau):
  z, t = logits(1, n=5, v=23)
  expected = ref.np_csd(z, t, w1, w2, tau)
  got = per_token_loss("csd", z, t, w1=w1, w2=w2, temperature=tau)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
  mean = logit_loss("csd", z, t, w1=w1, w2=w2, temperature=tau)
  np.testing.assert_allclose(float(mean), expected.mean(), rtol=1e-5)


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("w1,w2", WEIGHT_PAIRS)
def test_csd_gradient_matches_finite_differences_with_frozen_weights(w1, w2, tau):
  z, t = logits(2, n=3, v=11)
  # Weights from the unperturbed logits, held fixed while z moves.
  weight1, weight2 = ref.np_weight(w1, z, t, tau), ref.np_weight(w2, z, t, tau)
  z64, eps = z.astype(np.float64), 1e-4

  def mean_value(zz):
    return ref.np_csd_weighted(zz, t, weight1, weight2).mean()

  fd = np.zeros_like(z64)
  for idx in np.ndindex(*z64.shape):
    step = np.zeros_like(z64)
    step[idx] = eps
    fd[idx] = (mean_value(z64 + step) - mean_value(z64 - step)) / (2 * eps)
  assert_grad_close(jax_grad("csd", z, t, w1=w1, w2=w2, temperature=tau), fd)


# ---------------------------------------------------- gradients vs the official PyTorch code


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("w1,w2,official", [
    ("student", "student", lambda z, t, tau: ref.torch_csd(z, t, tau)),
    ("teacher", "student", lambda z, t, tau: ref.torch_csd_weighting_function(z, t, "TS", tau)),
    ("student", "teacher", lambda z, t, tau: ref.torch_csd_weighting_function(z, t, "TS", tau)),
    ("uniform", "student", lambda z, t, tau: ref.torch_csd_weighting_function(z, t, "US", tau)),
    (0.15, 0.15, lambda z, t, tau: ref.torch_csd_ts_mix(z, t, 0.15, tau)),
    (0.6, 0.6, lambda z, t, tau: ref.torch_csd_ts_mix(z, t, 0.6, tau)),
], ids=["SS", "TS", "ST", "US", "mix0.15", "mix0.6"])
def test_csd_gradient_matches_official_surrogate(w1, w2, official, tau):
  z, t = logits(3, n=4, v=29)
  expected = ref.torch_grad(official, z, t, tau=tau)
  assert_grad_close(jax_grad("csd", z, t, w1=w1, w2=w2, temperature=tau), expected)


BASELINE_GRADS = [
    ("fkl", {}, ref.torch_forward_kl, {}),
    ("rkl", {}, ref.torch_reverse_kl, {}),
    ("jsd", {}, ref.torch_js_distance, {"lam": 0.9}),
    ("jsd", {"lam": 0.1}, ref.torch_js_distance, {"lam": 0.1}),
    ("jsd", {"lam": 0.5}, ref.torch_js_distance, {"lam": 0.5}),
    ("skl", {}, ref.torch_skewed_forward_kl, {"lam": 0.1}),
    ("skl", {"lam": 0.4}, ref.torch_skewed_forward_kl, {"lam": 0.4}),
    ("srkl", {}, ref.torch_skewed_reverse_kl, {"lam": 0.1}),
    ("srkl", {"lam": 0.4}, ref.torch_skewed_reverse_kl, {"lam": 0.4}),
    ("tvd", {}, ref.torch_tv_distance, {}),
]


@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("name,params,official,official_params", BASELINE_GRADS,
                         ids=[f"{c[0]}{c[1]}" for c in BASELINE_GRADS])
def test_baseline_gradient_matches_official(name, params, official, official_params, tau):
  z, t = logits(4, n=4, v=31)
  expected = ref.torch_grad(official, z, t, tau=tau, **official_params)
  assert_grad_close(jax_grad(name, z, t, temperature=tau, **params), expected)


def test_gradient_averages_over_valid_tokens_only():
  z, t = logits(5, n=5, v=13)
  mask = np.array([1, 0, 1, 1, 0], np.float32)
  keep = mask.astype(bool)
  got = jax_grad("csd", z, t, mask=jnp.asarray(mask), w1="teacher", w2="student")
  # The reference sees only the valid rows, so its token-mean divides by their count (3).
  expected = ref.torch_grad(lambda a, b: ref.torch_csd_weighting_function(a, b, "TS"),
                            z[keep], t[keep])
  assert np.all(got[~keep] == 0.0)
  assert_grad_close(got[keep], expected)


# ----------------------------------------------------------------------- values of every loss

VALUE_CASES = [
    ("fkl", {}), ("rkl", {}), ("jeffreys", {}), ("tvd", {}),
    ("symkl", {}), ("symkl", {"lam": 0.1}), ("symkl", {"lam": 0.5}),
    ("jsd", {}), ("jsd", {"lam": 0.1}), ("jsd", {"lam": 0.5}),
    ("skl", {}), ("skl", {"lam": 0.5}), ("skl", {"lam": 0.9}),
    ("srkl", {}), ("srkl", {"lam": 0.5}), ("srkl", {"lam": 0.9}),
    ("ab", {}), ("ab", {"alpha": 0.5, "beta": 0.5}), ("ab", {"alpha": 1.2, "beta": -0.3}),
    ("ab", {"alpha": 0.0, "beta": 0.0}), ("ab", {"alpha": 0.0, "beta": 0.7}),
    ("ab", {"alpha": 0.6, "beta": 0.0}), ("ab", {"alpha": 0.4, "beta": -0.4}),
    ("fkl", {"temperature": 2.0}), ("jsd", {"lam": 0.1, "temperature": 2.0}),
    ("ab", {"temperature": 2.0}), ("tvd", {"temperature": 0.5}),
] + [("dld", {"weight": w, "logit_norm": norm})
     for w in ["student", "teacher", "uniform", 0.3]
     for norm in ["none", "mean", "min", "max", "std", "range"]] + [
    ("dld", {"weight": "teacher", "logit_norm": "std", "temperature": 2.0})]


@pytest.mark.parametrize("name,params", VALUE_CASES,
                         ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in p.items())}"
                              for n, p in VALUE_CASES])
def test_value_matches_numpy(name, params):
  z, t = logits(6, n=5, v=19)
  expected = ref.np_loss(name, z, t, **dict(params))
  assert np.all(np.abs(expected) > 1e-4)  # away from 0, so that rtol means something
  got = per_token_loss(name, z, t, **params)
  # Divergences of order 1 summed over V terms in float32: rtol 2e-5 (mixtures, powers, logs).
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(float(logit_loss(name, z, t, **params)), expected.mean(), rtol=2e-5)


def test_ab_special_cases_are_the_limits_of_the_general_formula():
  # Guards the reference itself: each special case is the limit of the general formula. The gap
  # is first order in the 1e-5 offset (~1e-4 relative here); a wrong formula is off by O(1).
  z, t = logits(7, n=3, v=9, scale=1.0)
  lq, lp = ref.np_log_softmax(z), ref.np_log_softmax(t)
  for (a, b), near in [((0.0, 0.0), (1e-5, 2e-5)), ((0.0, 0.7), (1e-5, 0.7)),
                       ((0.6, 0.0), (0.6, 1e-5)), ((0.4, -0.4), (0.4, -0.4 + 1e-5))]:
    np.testing.assert_allclose(ref.np_ab(lq, lp, a, b), ref.np_ab(lq, lp, *near), rtol=1e-3)


def test_ce_value_and_ignored_labels():
  z, _ = logits(8, n=6, v=21)
  labels = np.array([3, 0, 20, 7, 7, 12], np.int32)
  np.testing.assert_allclose(np.asarray(per_token_loss("ce", z, labels)), ref.np_ce(z, labels),
                             rtol=1e-5)
  masked = labels.copy()
  masked[[1, 4]] = -100
  keep = masked != -100
  np.testing.assert_allclose(float(logit_loss("ce", z, masked)),
                             ref.np_ce(z[keep], labels[keep]).mean(), rtol=1e-5)


# -------------------------------------------------------------------------- per-position values


@pytest.mark.parametrize("name", [n for n in LOSS_NAMES if n != "ce"])
def test_per_token_loss_keeps_positions(name):
  batch, seq, v = 2, 3, 15
  z, t = logits(9, n=batch * seq, v=v)
  got = np.asarray(per_token_loss(name, z.reshape(batch, seq, v), t.reshape(batch, seq, v)))
  assert got.shape == (batch, seq)
  expected = ref.np_loss(name, z, t).reshape(batch, seq)
  assert len(np.unique(np.round(expected, 6))) == batch * seq  # distinct: a mix-up would show
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


def test_every_loss_name_has_a_reference():
  z, t = logits(10, n=2, v=7)
  labels = np.array([1, 4])
  for name in LOSS_NAMES:
    target = labels if name == "ce" else t
    np.testing.assert_allclose(np.asarray(per_token_loss(name, z, target)),
                               ref.np_loss(name, z, target), rtol=2e-5, atol=1e-6)
