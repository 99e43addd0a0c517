"""Properties every loss must have: invariances, masking, -inf vocabularies, stability, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csd_jax.losses import LOSS_NAMES, logit_loss, per_token_loss, token_weights

DIVERGENCES = [n for n in LOSS_NAMES if n != "ce"]
CSD_WEIGHTINGS = [("student", "student"), ("uniform", "student"), ("teacher", "student"),
                  (0.15, 0.15), ("student", "teacher")]


def _logits(seed, shape, scale=2.0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=shape) * scale, jnp.float32),
          jnp.asarray(rng.normal(size=shape) * scale, jnp.float32))


def _grad(name, z, t, mask=None, **params):
  return jax.value_and_grad(lambda z: logit_loss(name, z, t, mask, **params))(z)


@pytest.mark.parametrize("w1,w2", CSD_WEIGHTINGS)
def test_csd_shift_invariance(w1, w2):
  z, t = _logits(0, (4, 6, 33))
  value, grad = _grad("csd", z, t, w1=w1, w2=w2)
  shift = jnp.asarray(np.random.default_rng(1).normal(size=(4, 6, 1)) * 50, jnp.float32)
  for zz, tt in ((z + shift, t), (z, t - shift)):
    v2, g2 = _grad("csd", zz, tt, w1=w1, w2=w2)
    # float32 rounding of logits shifted by ~50: relative 1e-5 of the value.
    np.testing.assert_allclose(v2, value, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(g2, grad, rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("w1,w2", CSD_WEIGHTINGS)
def test_csd_nonnegative_zero_at_match_and_symmetric(w1, w2):
  z, t = _logits(2, (5, 17))
  values = per_token_loss("csd", z, t, w1=w1, w2=w2)
  assert bool(jnp.all(values >= 0))
  assert float(values.min()) > 1e-3  # random logits: far from a match
  swapped = per_token_loss("csd", z, t, w1=w2, w2=w1)
  np.testing.assert_allclose(swapped, values, rtol=1e-5)
  matched = per_token_loss("csd", t + 3.0, t, w1=w1, w2=w2)
  np.testing.assert_allclose(matched, 0.0, atol=1e-5)


def test_csd_ss_is_half_student_variance_of_d():
  z, t = _logits(3, (3, 29))
  q = jax.nn.softmax(z, -1)
  d = z - t
  var = jnp.sum(q * d**2, -1) - jnp.sum(q * d, -1) ** 2
  np.testing.assert_allclose(per_token_loss("csd", z, t), 0.5 * var, rtol=1e-4)


def test_temperature_enters_only_the_weights():
  z, t = _logits(4, (3, 21))
  tau = 2.5
  q = jax.nn.softmax(z / tau, -1)
  d = z - t
  var = jnp.sum(q * d**2, -1) - jnp.sum(q * d, -1) ** 2
  np.testing.assert_allclose(per_token_loss("csd", z, t, temperature=tau), 0.5 * var, rtol=1e-4)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_all_masked_batch_is_zero_with_finite_gradients(name):
  z, t = _logits(5, (2, 4, 13))
  target = jnp.full((2, 4), -100, jnp.int32) if name == "ce" else t
  mask = jnp.zeros((2, 4), bool)
  value, grad = _grad(name, z, target, mask)
  assert float(value) == 0.0
  assert bool(jnp.all(jnp.isfinite(grad))) and float(jnp.abs(grad).max()) == 0.0


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_masked_positions_holding_garbage_do_not_leak(name):
  z, t = _logits(6, (2, 5, 11))
  mask = jnp.array([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], bool)
  garbage = jnp.where(mask[..., None], z, jnp.nan)
  target = jnp.where(mask, 3, -100) if name == "ce" else t
  v_clean, g_clean = _grad(name, z, target, mask)
  v_dirty, g_dirty = _grad(name, garbage, target, mask)
  np.testing.assert_allclose(v_dirty, v_clean, rtol=1e-6)
  assert bool(jnp.all(jnp.isfinite(g_dirty)))
  np.testing.assert_allclose(g_dirty, g_clean, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", DIVERGENCES)
def test_minus_inf_vocabulary_entries_equal_the_cut_vocabulary(name):
  z, t = _logits(7, (3, 4, 19))
  padded_z = jnp.concatenate([z, jnp.full((3, 4, 5), -jnp.inf)], -1)
  padded_t = jnp.concatenate([t, jnp.zeros((3, 4, 5))], -1)
  # Also an -inf in the teacher alone, inside the vocabulary: that entry is invalid too.
  padded_t = padded_t.at[..., 2].set(-jnp.inf)
  cut_z = jnp.concatenate([z[..., :2], z[..., 3:]], -1)
  cut_t = jnp.concatenate([t[..., :2], t[..., 3:]], -1)
  for params in ({}, {"temperature": 2.0}):
    v_pad, g_pad = _grad(name, padded_z, padded_t, **params)
    v_cut, g_cut = _grad(name, cut_z, cut_t, **params)
    assert bool(jnp.isfinite(v_pad)) and bool(jnp.all(jnp.isfinite(g_pad)))
    np.testing.assert_allclose(v_pad, v_cut, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(g_pad[..., 19:], 0.0)
    np.testing.assert_allclose(g_pad[..., 2], 0.0)
    np.testing.assert_allclose(
        jnp.concatenate([g_pad[..., :2], g_pad[..., 3:19]], -1), g_cut, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_rows_without_a_vocabulary_entry_give_finite_zero(name):
  z = jnp.full((2, 3, 7), -jnp.inf).at[0, 0].set(jnp.arange(7.0))
  t = jnp.full((2, 3, 7), -jnp.inf)
  target = jnp.zeros((2, 3), jnp.int32) if name == "ce" else t
  value, grad = _grad(name, z, target)
  assert bool(jnp.isfinite(value)) and bool(jnp.all(jnp.isfinite(grad)))


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
@pytest.mark.parametrize("name", LOSS_NAMES)
def test_nan_or_plus_inf_at_a_counted_position_gives_nan_never_a_silent_zero(name, bad):
  # A broken model (NaN weights after a bad update) must not look like a masked vocabulary.
  z, t = _logits(9, (2, 3, 7))
  mask = jnp.array([[1, 1, 0], [1, 0, 1]], bool)
  target = jnp.where(mask, 2, -100) if name == "ce" else t
  cases = [(z.at[0, 1, 3].set(bad), target), (jnp.full_like(z, bad), target)]
  if name != "ce":
    cases.append((z, t.at[1, 2, 5].set(bad)))
  for student, teacher in cases:
    value, grad = _grad(name, student, teacher, mask)
    assert bool(jnp.isnan(value)), (student, teacher)
    assert bool(jnp.all(jnp.isfinite(grad)))   # the loss tells; the update is skipped on it
  # At a masked position the same entry changes nothing.
  v_clean, _ = _grad(name, z, target, mask)
  v_masked, _ = _grad(name, z.at[0, 2, 3].set(bad), target, mask)
  np.testing.assert_array_equal(v_masked, v_clean)


@pytest.mark.parametrize("w1,w2", CSD_WEIGHTINGS)
def test_csd_stable_at_huge_logits(w1, w2):
  z, t = _logits(8, (4, 50), scale=1.0)
  big = 1e4
  value, grad = _grad("csd", z + big, t - big, w1=w1, w2=w2)
  # d = z - t + 2e4: centring before squaring keeps the value of the small residual intact.
  ref_value, ref_grad = _grad("csd", z, t, w1=w1, w2=w2)
  np.testing.assert_allclose(value, ref_value, rtol=2e-2)
  np.testing.assert_allclose(grad, ref_grad, rtol=5e-2, atol=2e-3)


@pytest.mark.parametrize("name", LOSS_NAMES)
def test_bf16_inputs_are_computed_in_float32(name):
  z, t = _logits(9, (3, 5, 23))
  z16, t16 = z.astype(jnp.bfloat16), t.astype(jnp.bfloat16)
  target = jnp.ones((3, 5), jnp.int32) if name == "ce" else t16
  value = logit_loss(name, z16, target)
  target32 = target if name == "ce" else t16.astype(jnp.float32)
  expected = logit_loss(name, z16.astype(jnp.float32), target32)
  assert value.dtype == jnp.float32
  np.testing.assert_allclose(value, expected, rtol=1e-6)


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("normalize", ["token", "sequence"])
def test_micro_batch_split_leaves_value_and_gradient_unchanged(name, normalize):
  z, t = _logits(10, (4, 6, 15))
  mask = jnp.asarray(np.random.default_rng(11).random((4, 6)) > 0.4)
  target = jnp.where(mask, 2, -100) if name == "ce" else t
  whole_v, whole_g = _grad(name, z, target, mask, normalize=normalize)
  total = jnp.sum(mask if name != "ce" else target != -100)
  count = {"num_valid_tokens": total} if normalize == "token" else {
      "num_sequences": jnp.sum(jnp.any(mask, -1))}
  parts_v, parts_g = 0.0, []
  for sl in (slice(0, 1), slice(1, 4)):
    v, g = _grad(name, z[sl], target[sl], mask[sl], normalize=normalize, **count)
    parts_v += v
    parts_g.append(g)
  np.testing.assert_allclose(parts_v, whole_v, rtol=1e-5)
  np.testing.assert_allclose(jnp.concatenate(parts_g), whole_g, rtol=1e-5, atol=1e-9)


def test_sequence_normalisation_weights():
  mask = jnp.array([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], jnp.float32)
  weights = token_weights(mask, normalize="sequence")
  np.testing.assert_allclose(weights, [[0.25, 0.25, 0, 0], [0.125] * 4, [0] * 4])
  np.testing.assert_allclose(token_weights(mask), mask / 6)


@pytest.mark.parametrize("call,match", [
    (lambda z, t: logit_loss("kld", z, t), "unknown loss 'kld'; valid losses: csd, fkl"),
    (lambda z, t: logit_loss("csd", z, t, lam=0.5), "unknown parameter.*lam.*valid: w1, w2"),
    (lambda z, t: logit_loss("csd", z, t, w1="mode"), "valid weightings are student"),
    (lambda z, t: logit_loss("csd", z, t, w2=1.5), r"float in \[0, 1\]"),
    (lambda z, t: logit_loss("csd", z, t, temperature=0.0), "positive"),
    (lambda z, t: logit_loss("dld", z, t, logit_norm="l2"), "valid: none, mean"),
    (lambda z, t: logit_loss("fkl", z, t, normalize="batch"), "valid: token, sequence"),
    (lambda z, t: logit_loss("fkl", z, t[..., :5]), "vocabulary mismatch"),
    (lambda z, t: logit_loss("fkl", z, t, jnp.ones((3,))), "mask shape"),
])
def test_bad_input_gives_a_clear_error(call, match):
  z, t = _logits(12, (2, 9))
  with pytest.raises(ValueError, match=match):
    call(z, t)


def test_dld_normalisations_are_the_official_ablation():
  """range maps each row onto [-1, 1] and std divides by the unbiased (n - 1) estimate, as the
  official ablation (torch.std): a student equal to the teacher up to those maps costs 0, and
  the range loss of a known pair is 1/4 sum (zn - tn)^2 with the [-1, 1] values."""
  z = jnp.asarray([[0.0, 1.0, 3.0]])
  t = jnp.asarray([[0.0, 3.0, 1.0]])
  uniform = {"weight": "uniform"}
  # zn = [-1, -1/3, 1], tn = [-1, 1, -1/3]: 1/4 * (1/3) * ((4/3)^2 * 2) = 0.2962...
  got = logit_loss("dld", z, t, logit_norm="range", **uniform)
  np.testing.assert_allclose(got, 0.25 / 3 * 2 * (4 / 3) ** 2, rtol=1e-5)  # float32
  zs = np.asarray([1.0, 2.0, 4.0])
  unbiased = (zs - zs.mean()) / zs.std(ddof=1)
  ts = jnp.asarray([np.zeros(3)])
  got = logit_loss("dld", jnp.asarray([zs]), ts, logit_norm="std", **uniform)
  np.testing.assert_allclose(got, 0.25 / 3 * np.sum(unbiased ** 2), rtol=1e-5)  # float32
