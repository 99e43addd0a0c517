"""chunked_token_sums equals the unchunked metrics on full logits, and its memory is O(chunk x V).

The reference materialises the logits, caps each model's with its own cap, and sums
`per_token_loss` over the valid tokens (labels != -100).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from csd_jax.losses import chunked_token_sums, logit_loss, per_token_loss

LOSSES = {"csd": ("csd", {}), "csd_ts": ("csd", {"w1": "teacher", "temperature": 2.0}),
          "fkl": ("fkl", {}), "dld": ("dld", {"logit_norm": "std"}), "nll": ("ce", {})}


def _problem(seed, shape=(4, 6), hs=8, ht=12, vocab=37, scale=3.0):
  rng = np.random.default_rng(seed)
  arr = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
  n = int(np.prod(shape))
  labels = np.where(rng.random(n) > 0.25, rng.integers(0, vocab, n), -100)
  # Logits of scale ~10 against caps of 2-5: a cap on the wrong model shows.
  return (arr(*shape, hs), arr(hs, vocab) * scale, arr(*shape, ht), arr(ht, vocab) * scale,
          jnp.asarray(labels.reshape(shape)))


def _cap(x, cap):
  return x if cap is None else cap * jnp.tanh(x / cap)


def _reference(h_s, w_s, h_t, w_t, labels, softcap=None, teacher_softcap=None, losses=()):
  valid = labels != -100
  z = _cap(h_s @ w_s, softcap)
  total = lambda v: jnp.sum(jnp.where(valid, v, 0.0))  # noqa: E731
  out = {"count": jnp.sum(valid).astype(jnp.float32),
         "ce": total(per_token_loss("ce", z, labels))}
  if h_t is None:
    return out
  t = _cap(h_t @ w_t, teacher_softcap)
  out["agree"] = jnp.sum((jnp.argmax(z, -1) == jnp.argmax(t, -1)) & valid).astype(jnp.float32)
  for key, (name, params) in dict(losses).items():
    out[key] = total(per_token_loss(name, z, labels if name == "ce" else t, **params))
  return out


def _assert_same(got, want):
  assert set(got) == set(want)
  for key in want:
    assert got[key].shape == () and got[key].dtype == jnp.float32, key
    # float32 rounding: the chunked sums add the same terms in another order.
    np.testing.assert_allclose(got[key], want[key], rtol=2e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("chunk_size", [4, 5, 64])  # divides N = 24, does not, > N
@pytest.mark.parametrize("softcap,teacher_softcap", [(None, None), (3.0, None), (None, 3.0),
                                                     (2.0, 5.0)])
def test_sums_equal_unchunked(chunk_size, softcap, teacher_softcap):
  problem = _problem(0)
  got = jax.jit(lambda *a: chunked_token_sums(
      *a, chunk_size=chunk_size, logit_softcap=softcap, teacher_logit_softcap=teacher_softcap,
      losses=LOSSES))(*problem)
  _assert_same(got, _reference(*problem, softcap, teacher_softcap, LOSSES))


def test_sums_are_the_unnormalised_logit_loss():
  h_s, w_s, h_t, w_t, labels = _problem(1)
  got = chunked_token_sums(h_s, w_s, h_t, w_t, labels, chunk_size=7, losses={"kd": ("csd", {})})
  valid = labels != -100
  mean = logit_loss("csd", h_s @ w_s, h_t @ w_t, valid)
  np.testing.assert_allclose(got["kd"] / got["count"], mean, rtol=2e-5)
  np.testing.assert_allclose(got["ce"] / got["count"],
                             logit_loss("ce", h_s @ w_s, labels, valid), rtol=2e-5)


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("chunk_size", [5, 64])
def test_without_teacher(softcap, chunk_size):
  h_s, w_s, _, _, labels = _problem(2)
  got = chunked_token_sums(h_s, w_s, None, None, labels, chunk_size=chunk_size,
                           logit_softcap=softcap)
  _assert_same(got, _reference(h_s, w_s, None, None, labels, softcap))


def test_ignored_tokens_count_nowhere_even_when_not_finite():
  h_s, w_s, h_t, w_t, labels = _problem(3)
  ignored = labels == -100
  assert bool(ignored.any())
  poison = lambda h: jnp.where(ignored[..., None], jnp.nan, h)  # noqa: E731
  got = chunked_token_sums(poison(h_s), w_s, poison(h_t), w_t, labels, chunk_size=5,
                           losses=LOSSES)
  _assert_same(got, _reference(h_s, w_s, h_t, w_t, labels, losses=LOSSES))


def test_all_ignored_gives_zeros():
  h_s, w_s, h_t, w_t, labels = _problem(4)
  got = chunked_token_sums(h_s, w_s, h_t, w_t, jnp.full_like(labels, -100), chunk_size=5,
                           losses=LOSSES)
  assert all(float(v) == 0.0 for v in got.values())


def test_same_numbers_under_a_sharded_mesh():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  h_s, w_s, h_t, w_t, labels = _problem(5, shape=(8, 6), vocab=40)
  f = jax.jit(lambda *a: chunked_token_sums(*a, chunk_size=5, logit_softcap=3.0, losses=LOSSES))
  want = f(h_s, w_s, h_t, w_t, labels)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  rows = ("data", "fsdp")
  args = (put(h_s, P(rows, None, None)), put(w_s, P(None, "tensor")),
          put(h_t, P(rows, None, None)), put(w_t, P(None, "tensor")), put(labels, P(rows, None)))
  with jax.set_mesh(mesh):
    got = f(*args)
  _assert_same(got, {k: np.asarray(v) for k, v in want.items()})


@pytest.mark.parametrize("call,match", [
    (lambda p: chunked_token_sums(*p, chunk_size=0), "positive"),
    (lambda p: chunked_token_sums(p[0], p[1].T, *p[2:]), "expected \\[H, V\\]"),
    (lambda p: chunked_token_sums(*p[:4], p[4][:, :3]), "different positions"),
    (lambda p: chunked_token_sums(p[0], p[1], p[2], None, p[4]), "or neither"),
    (lambda p: chunked_token_sums(*p[:3], p[3][:, :30], p[4]), "vocabulary mismatch"),
    (lambda p: chunked_token_sums(p[0], p[1], None, None, p[4], losses={"kd": ("csd", {})}),
     "teacher"),
    (lambda p: chunked_token_sums(*p, losses={"ce": ("fkl", {})}), "collide"),
    (lambda p: chunked_token_sums(*p, losses={"kd": ("nope", {})}), "unknown loss"),
    (lambda p: chunked_token_sums(*p, losses={"kd": ("csd", {"lam": 0.5})}), "unknown param"),
])
def test_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call(_problem(6))


def _temp_bytes(n_tokens, chunk_size, vocab=32768, hidden=64):
  shape = lambda *s, dtype=jnp.float32: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
  f = lambda h, w, ht, wt, y: chunked_token_sums(  # noqa: E731
      h, w, ht, wt, y, chunk_size=chunk_size, logit_softcap=30.0,
      losses={"csd": ("csd", {}), "fkl": ("fkl", {})})
  compiled = jax.jit(f).lower(shape(n_tokens, hidden), shape(hidden, vocab),
                              shape(n_tokens, hidden), shape(hidden, vocab),
                              shape(n_tokens, dtype=jnp.int32)).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_temp_memory_is_order_chunk_times_vocab():
  # Compile only (nothing allocated): XLA's own analysis of the temporary buffers.
  chunk, vocab = 128, 32768
  small, large = _temp_bytes(4 * chunk, chunk), _temp_bytes(32 * chunk, chunk)
  logits_growth = (32 - 4) * chunk * vocab * 4  # what [N, V] float32 logits would add
  assert large - small < 0.05 * logits_growth
  assert large < 32 * chunk * vocab * 4 / 4  # far below one [N, V] float32 copy
