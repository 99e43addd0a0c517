"""The fused head + loss equals the loss on materialised logits: value and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from csd_jax.losses import LOSS_NAMES, fused_logit_loss, logit_loss
from csd_jax.losses.fused_sharding import Head

PARAMS = {"csd": [{}, {"w1": "uniform", "w2": "student", "temperature": 2.0},
                  {"w1": "teacher", "w2": "student"}, {"w1": 0.15, "w2": 0.15}],
          "jsd": [{"lam": 0.1}], "ab": [{}, {"alpha": 0.0, "beta": 0.5}],
          "dld": [{"logit_norm": "range", "weight": "teacher"}, {"logit_norm": "max"}]}
CASES = [(name, params) for name in LOSS_NAMES for params in PARAMS.get(name, [{}])]


def _problem(seed, n=23, hs=8, ht=12, vocab=37):
  rng = np.random.default_rng(seed)
  arr = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
  mask = jnp.asarray(rng.random(n) > 0.3)
  labels = jnp.asarray(np.where(rng.random(n) > 0.2, rng.integers(0, vocab, n), -100))
  return arr(n, hs), arr(hs, vocab) * 0.7, arr(n, ht), arr(ht, vocab) * 0.7, mask, labels


def _cap(x, softcap):
  return x if softcap is None else softcap * jnp.tanh(x / softcap)


def _both(name, params, problem, chunk_size, mesh=None, softcap=None, teacher_softcap=None):
  h_s, w_s, h_t, w_t, mask, labels = problem
  fused_kw = {"labels": labels} if name == "ce" else {}

  def fused(h, w):
    return fused_logit_loss(name, h, w, h_t, w_t, mask, chunk_size=chunk_size, mesh=mesh,
                            logit_softcap=softcap, teacher_logit_softcap=teacher_softcap,
                            **fused_kw, **params)

  def unfused(h, w):
    # Each model's logits capped explicitly with its own cap (None: uncapped).
    target = labels if name == "ce" else _cap(h_t @ w_t, teacher_softcap)
    return logit_loss(name, _cap(h @ w, softcap), target, mask, **params)

  grad = lambda f: jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(h_s, w_s)  # noqa: E731
  return grad(fused), grad(unfused)


def _assert_same(got, want):
  (v1, (gh1, gw1)), (v2, (gh2, gw2)) = got, want
  # float32 rounding: chunked sums add the same terms in another order.
  np.testing.assert_allclose(v1, v2, rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(gh1, gh2, rtol=2e-4, atol=2e-6)
  np.testing.assert_allclose(gw1, gw2, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("chunk_size", [5, 64])
def test_fused_equals_unfused(name, params, chunk_size):
  problem = _problem(0)
  _assert_same(*_both(name, params, problem, chunk_size))


@pytest.mark.parametrize("name", ["csd", "fkl", "ce"])
def test_fused_with_softcap_and_leading_batch_dims(name):
  h_s, w_s, h_t, w_t, mask, labels = _problem(1, n=24)
  problem = (h_s.reshape(4, 6, -1), w_s * 5, h_t.reshape(4, 6, -1), w_t * 5,
             mask.reshape(4, 6), labels.reshape(4, 6))
  _assert_same(*_both(name, {}, problem, 7, softcap=3.0, teacher_softcap=3.0))


@pytest.mark.parametrize("name", ["csd", "fkl", "tvd"])
@pytest.mark.parametrize("softcap,teacher_softcap", [(3.0, None), (None, 3.0), (2.0, 5.0)])
def test_fused_each_model_has_its_own_softcap(name, softcap, teacher_softcap):
  # Logits of scale ~10 against caps of 2-5: a cap applied to the wrong model shows.
  h_s, w_s, h_t, w_t, mask, labels = _problem(6, n=24)
  problem = (h_s, w_s * 5, h_t, w_t * 5, mask, labels)
  got, want = _both(name, {}, problem, 7, softcap=softcap, teacher_softcap=teacher_softcap)
  _assert_same(got, want)
  # And not the result of capping both (or neither) alike: the check has teeth.
  shared = softcap if softcap is not None else teacher_softcap
  _, alike = _both(name, {}, problem, 7, softcap=shared, teacher_softcap=shared)
  assert abs(float(got[0]) - float(alike[0])) > 1e-3 * abs(float(alike[0]))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


@pytest.mark.parametrize("name,params", CASES)
def test_fused_on_a_mesh_with_sharded_vocabulary(name, params, mesh):
  # V = 37 does not divide the tensor axis (2) and N = 23 not the data axes (4).
  problem = _problem(2)
  _assert_same(*_both(name, params, problem, 4, mesh=mesh))


def test_fused_under_ambient_mesh_with_sharded_inputs(mesh):
  h_s, w_s, h_t, w_t, mask, _ = _problem(3, n=32, vocab=40)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
  h_s, h_t = put(h_s, P(("data", "fsdp"), None)), put(h_t, P(("data", "fsdp"), None))
  w_s, w_t = put(w_s, P(None, "tensor")), put(w_t, P(None, "tensor"))
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(
        lambda h, w: fused_logit_loss("csd", h, w, h_t, w_t, mask, chunk_size=3),
        argnums=(0, 1)))(h_s, w_s)
  want = jax.value_and_grad(lambda h, w: logit_loss("csd", h @ w, h_t @ w_t, mask),
                            argnums=(0, 1))(h_s, w_s)
  _assert_same(got, want)


def test_no_device_holds_full_logits_on_a_mesh(mesh):
  n, vocab, hidden = 512, 4096, 16
  h = jax.ShapeDtypeStruct((n, hidden), jnp.float32)
  w = jax.ShapeDtypeStruct((hidden, vocab), jnp.float32)
  m = jax.ShapeDtypeStruct((n,), jnp.bool_)
  f = jax.jit(jax.grad(lambda h, w, ht, wt, m: fused_logit_loss(
      "csd", h, w, ht, wt, m, chunk_size=32, mesh=mesh), argnums=(0, 1)))
  hlo = f.lower(h, w, h, w, m).compile().as_text()
  full_logits = f"f32[{n},{vocab}]"
  local_chunk = f"f32[32,{vocab // 2}]"
  assert full_logits not in hlo
  assert local_chunk in hlo


def test_fused_gradient_of_the_frozen_teacher_is_zero():
  h_s, w_s, h_t, w_t, mask, _ = _problem(4)
  grads = jax.grad(lambda ht, wt: fused_logit_loss("csd", h_s, w_s, ht, wt, mask),
                   argnums=(0, 1))(h_t, w_t)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in grads)


@pytest.mark.parametrize("call,match", [
    (lambda p: fused_logit_loss("csd", p[0], p[1], p[2], p[3][:, :30], p[4]),
     "vocabulary mismatch"),
    (lambda p: fused_logit_loss("csd", p[0], p[1].T, p[2], p[3], p[4]), "expected \\[H, V\\]"),
    (lambda p: fused_logit_loss("ce", p[0], p[1], None, None, p[4]), "needs labels"),
    (lambda p: fused_logit_loss("csd", p[0], p[1], None, None, p[4]), "needs teacher_hidden"),
    (lambda p: fused_logit_loss("csd", p[0], p[1], p[2], p[3], p[4], chunk_size=0), "positive"),
])
def test_fused_bad_input(call, match):
  with pytest.raises(ValueError, match=match):
    call(_problem(5))


@pytest.mark.parametrize("on_mesh", [False, True])
@pytest.mark.parametrize("name,layouts", [("csd", (True, False)), ("fkl", (False, True)),
                                          ("csd", (True, True)), ("ce", (True, False))])
def test_fused_takes_heads_in_vocab_major_layout(name, layouts, on_mesh, mesh):
  """A head given [V, H] (a tied embedding's layout) gives the same value and gradients, the
  gradient in its own layout; on a mesh V = 37 is split unevenly over the tensor axis."""
  h_s, w_s, h_t, w_t, mask, labels = _problem(7)
  student_vm, teacher_vm = layouts
  kw = {"labels": labels} if name == "ce" else {}
  teacher_head = w_t.T if teacher_vm else w_t

  def fused(h, w):
    return fused_logit_loss(name, h, w, h_t, teacher_head, mask, chunk_size=5,
                            mesh=mesh if on_mesh else None, vocab_major=student_vm,
                            teacher_vocab_major=teacher_vm, **kw)

  value, (dh, dw) = jax.jit(jax.value_and_grad(fused, argnums=(0, 1)))(
      h_s, w_s.T if student_vm else w_s)
  target = labels if name == "ce" else h_t @ w_t
  want = jax.value_and_grad(lambda h, w: logit_loss(name, h @ w, target, mask),
                            argnums=(0, 1))(h_s, w_s)
  _assert_same((value, (dh, dw.T if student_vm else dw)), want)


def test_fused_vocab_major_head_shape_is_checked():
  h_s, w_s, h_t, w_t, mask, _ = _problem(5)
  with pytest.raises(ValueError, match="expected \\[V, H\\]"):
    fused_logit_loss("csd", h_s, w_s, h_t, w_t, mask, vocab_major=True)
  with pytest.raises(ValueError, match="vocabulary mismatch"):
    fused_logit_loss("csd", h_s, w_s.T, h_t, w_t, mask, vocab_major=True,
                     teacher_vocab_major=True)


@pytest.mark.parametrize("on_mesh", [False, True])
@pytest.mark.parametrize("teacher_vm", [False, True])
def test_fused_uses_the_first_columns_of_a_wider_teacher_head(teacher_vm, on_mesh, mesh):
  """A teacher head over a padded vocabulary (Qwen2.5-7B's 152064 against 151936): the loss
  runs over the student's V; the extra columns, however large, change nothing."""
  h_s, w_s, h_t, w_t, mask, _ = _problem(8)
  wide = jnp.concatenate([w_t, 50.0 * jnp.ones((w_t.shape[0], 5))], axis=1)
  teacher_head = wide.T if teacher_vm else wide
  got = jax.jit(jax.value_and_grad(lambda h, w: fused_logit_loss(
      "csd", h, w, h_t, teacher_head, mask, chunk_size=5, mesh=mesh if on_mesh else None,
      teacher_vocab_major=teacher_vm), argnums=(0, 1)))(h_s, w_s)
  want = jax.value_and_grad(lambda h, w: logit_loss("csd", h @ w, h_t @ w_t, mask),
                            argnums=(0, 1))(h_s, w_s)
  _assert_same(got, want)


def test_a_vocab_major_head_reads_like_its_transpose():
  """A `Head` stored `[V, H]` gives the logits, gradients, padding and cut of the same head
  stored `[H, V]`, each in its own layout."""
  h, w, _, _, _, _ = _problem(9)
  g = jnp.asarray(np.random.default_rng(9).normal(size=(h.shape[0], w.shape[1])), jnp.float32)
  plain, tied = Head(w), Head(w.T, vocab_major=True)
  assert (plain.vocab_size, plain.hidden_size) == (tied.vocab_size, tied.hidden_size) == (37, 8)
  # Same products, other operand layouts: float32 rounding may differ in the last bit.
  np.testing.assert_allclose(plain.logits(h), tied.logits(h), rtol=1e-6, atol=1e-6)
  (dh1, dw1), (dh2, dw2) = plain.vjp(h, g), tied.vjp(h, g)
  np.testing.assert_allclose(dh1, dh2, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(dw1, dw2.T, rtol=1e-6, atol=1e-6)
  for edit in (lambda head: head.padded(3), lambda head: head.cut(30)):
    a, b = edit(plain), edit(tied)
    assert b.vocab_major and a.vocab_size == b.vocab_size
    np.testing.assert_array_equal(a.weight, b.weight.T)
