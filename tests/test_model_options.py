"""Model options: remat policies, attention implementation, dtypes, head and hidden states."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csd_jax.errors import UserError
from csd_jax.models import init_random
from hf_tiny import CONFIGS


def _loss(model, ids):
  return jnp.mean(model(ids) ** 2)


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_the_same_value_and_gradients(remat):
  config = CONFIGS["llama_gqa_untied_bias"]()
  ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 97)
  plain = init_random(config, seed=1)
  rematted = init_random(config, seed=1, remat=remat)
  v1, g1 = nnx.value_and_grad(_loss)(plain, ids)
  v2, g2 = nnx.value_and_grad(_loss)(rematted, ids)
  np.testing.assert_allclose(v2, v1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)  # float32 recomputation


def test_invalid_remat_policy_is_rejected():
  with pytest.raises(UserError, match="remat='some'; valid: none, full, dots"):
    init_random(CONFIGS["gpt2_n_inner"](), remat="some")


def test_explicit_xla_attention_matches_default():
  config = CONFIGS["gemma_mqa_head_dim"]()
  ids = jax.random.randint(jax.random.key(1), (2, 12), 0, 97)
  default = init_random(config, seed=2)(ids)
  xla = init_random(config, seed=2, attention_impl="xla")(ids)
  np.testing.assert_array_equal(np.asarray(xla), np.asarray(default))


def test_bf16_compute_with_float32_master_weights():
  config = CONFIGS["llama_mqa_tied"]()
  ids = jax.random.randint(jax.random.key(3), (2, 12), 0, 97)
  model = init_random(config, seed=4, dtype=jnp.bfloat16)
  assert model.embed.get_value().dtype == jnp.float32
  assert model.head_weight().dtype == jnp.bfloat16
  hidden, _ = model.hidden_states(ids)
  assert hidden.dtype == jnp.bfloat16
  reference = init_random(config, seed=4)(ids)
  logits = model(ids)
  assert logits.dtype == jnp.float32
  # bf16 keeps 8 bits of mantissa: ~1% of the logits' scale after two layers.
  assert float(jnp.abs(logits - reference).max()) <= 0.05 * float(jnp.abs(reference).max())


def test_hidden_states_and_head_give_the_logits():
  config = CONFIGS["llama_gqa_untied_bias"]()
  model = init_random(config, seed=5)
  ids = jax.random.randint(jax.random.key(4), (2, 9), 0, 97)
  hidden, _ = model.hidden_states(ids)
  np.testing.assert_allclose(hidden @ model.head_weight(), model(ids), rtol=1e-6, atol=1e-6)


def test_packed_rows_equal_the_samples_alone():
  config = CONFIGS["llama_gqa_untied_bias"]()
  model = init_random(config, seed=6)
  a = jax.random.randint(jax.random.key(5), (7,), 0, 97)
  b = jax.random.randint(jax.random.key(6), (5,), 0, 97)
  packed = jnp.concatenate([a, b, jnp.zeros((4,), jnp.int32)])[None]
  segments = jnp.asarray([[1] * 7 + [2] * 5 + [0] * 4])
  positions = jnp.asarray([list(range(7)) + list(range(5)) + [0] * 4])
  logits = model(packed, segments, positions)[0]
  np.testing.assert_allclose(logits[:7], model(a[None])[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[7:12], model(b[None])[0], rtol=1e-5, atol=1e-5)


def test_flops_per_token_counts_the_head_once_tied_or_not():
  from csd_jax.train.flops import model_flops_per_token

  tied = init_random(CONFIGS["llama_mqa_tied"](), seed=0)
  untied = init_random({**CONFIGS["llama_mqa_tied"]().to_dict(), "tie_word_embeddings": False},
                       seed=0)
  # Same layers and the same head matmul: the untied lookup table does no matmul.
  assert model_flops_per_token(tied, 16, backward=False) == model_flops_per_token(
      untied, 16, backward=False)
  cfg = tied.cfg
  layer = 32 * (4 * 8) + 2 * 32 * (1 * 8) + (4 * 8) * 32 + 3 * 32 * 64 + 2 * 32
  expected = 2 * (2 * layer + 32 + 97 * 32) + 4 * 2 * 16 * 32
  assert model_flops_per_token(tied, 16, backward=False) == expected
  assert model_flops_per_token(tied, 16, backward=True) == 3 * expected
