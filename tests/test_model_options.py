"""Model options: remat policies, attention implementation, dtypes, head and hidden states."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csd_jax.errors import UserError
from csd_jax.models import init_random
from hf_tiny import CONFIGS, SLIDING_WINDOW


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


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_under_lora_gives_the_adapters_the_same_gradients(remat):
  """The train step's split: gradients of the LoRA adapters only, the frozen base beside them
  (nnx.remat failed there: it wrote back variables of two trace levels)."""
  from csd_jax.models.lora import LoraParam

  config = CONFIGS["llama_gqa_untied_bias"]()
  ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 97)

  def value_and_grads(model):
    graphdef, adapters, base = nnx.split(model, LoraParam, ...)
    loss = lambda adapters, base: _loss(nnx.merge(graphdef, adapters, base), ids)  # noqa: E731
    return jax.jit(jax.value_and_grad(loss))(adapters, base)

  lora = {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ("q", "k", "v", "o", "up", "down")}
  v1, g1 = value_and_grads(init_random(config, seed=1, **lora))
  v2, g2 = value_and_grads(init_random(config, seed=1, remat=remat, **lora))
  np.testing.assert_allclose(v2, v1, rtol=1e-6)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(g1))
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-8)  # float32 recomputation


@pytest.mark.parametrize("remat", ["none", "dots"])
def test_layer_barrier_gives_the_same_value_and_gradients(remat):
  config = CONFIGS["llama_gqa_untied_bias"]()
  ids = jax.random.randint(jax.random.key(0), (2, 16), 0, 97)
  plain = init_random(config, seed=1, remat=remat, layer_barrier=False)
  barred = init_random(config, seed=1, remat=remat)   # the default
  assert barred.cfg.num_layers > 1   # a barrier sits before every layer but the first
  v1, g1 = jax.jit(nnx.value_and_grad(_loss))(plain, ids)
  v2, g2 = jax.jit(nnx.value_and_grad(_loss))(barred, ids)
  np.testing.assert_array_equal(v2, v1)   # the same operations: a barrier only orders them
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_array_equal(b, a)


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


@pytest.mark.parametrize("name", ["llama_gqa_untied_bias", "gemma2_softcaps", "gemma3_text"])
def test_packed_rows_equal_the_samples_alone(name):
  """Samples longer than the sliding window: the window counts within each sample."""
  model = init_random(CONFIGS[name](), seed=6)
  a = jax.random.randint(jax.random.key(5), (SLIDING_WINDOW + 4,), 0, 97)
  b = jax.random.randint(jax.random.key(6), (SLIDING_WINDOW + 2,), 0, 97)
  packed = jnp.concatenate([a, b, jnp.zeros((4,), jnp.int32)])[None]
  segments = jnp.asarray([[1] * len(a) + [2] * len(b) + [0] * 4])
  positions = jnp.asarray([list(range(len(a))) + list(range(len(b))) + [0] * 4])
  logits = model(packed, segments, positions)[0]
  np.testing.assert_allclose(logits[:len(a)], model(a[None])[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[len(a):len(a) + len(b)], model(b[None])[0], rtol=1e-5,
                             atol=1e-5)


def test_dropout_follows_the_checkpoint_and_needs_a_key():
  """GPT-2's config.json drops embeddings, attention and residuals at 0.1 while training (a
  dropout key); without a key (teacher, evaluation, generation) the model is deterministic."""
  config = CONFIGS["gpt2_n_inner"]()
  model = init_random(config, seed=7)
  cfg = model.cfg
  assert (cfg.embed_dropout, cfg.attention_dropout, cfg.residual_dropout) == (0.1, 0.1, 0.1)
  ids = jax.random.randint(jax.random.key(8), (2, 12), 0, 97)

  def hidden(m, key=None):
    return np.asarray(m.hidden_states(ids, dropout_key=key)[0])

  plain = hidden(model)
  np.testing.assert_array_equal(plain, hidden(model))
  dropped = hidden(model, jax.random.key(1))
  np.testing.assert_array_equal(dropped, hidden(model, jax.random.key(1)))
  assert not np.allclose(dropped, plain) and not np.allclose(dropped, hidden(model,
                                                                             jax.random.key(2)))
  rates = ("embed_dropout", "attention_dropout", "residual_dropout")
  off = init_random(config, seed=7, **dict.fromkeys(rates, 0.0))
  np.testing.assert_allclose(hidden(off, jax.random.key(1)), plain, rtol=1e-6, atol=1e-6)
  for rate in rates:  # each rate bites on its own
    one = init_random(config, seed=7, **{**dict.fromkeys(rates, 0.0), rate: 0.5})
    assert not np.allclose(hidden(one, jax.random.key(1)), plain), rate


def test_student_dropout_overrides_the_checkpoint_and_the_teacher_never_drops():
  from csd_jax.config import ConfigError, ModelSpec, load_config
  from csd_jax.run.models import build_model

  spec = ModelSpec(config=CONFIGS["gpt2_n_inner"]().to_dict(), dtype="float32", dropout=0.0)
  cfg = build_model(spec, None, trainable=True).cfg
  assert (cfg.embed_dropout, cfg.attention_dropout, cfg.residual_dropout) == (0.0, 0.0, 0.0)
  with pytest.raises(ConfigError, match="teacher.dropout: the teacher never drops"):
    load_config("configs/tiny.yaml", ["teacher.dropout=0.1"])
  with pytest.raises(ConfigError, match=r"student.dropout=1.5: must be in \[0, 1\)"):
    load_config("configs/tiny.yaml", ["student.dropout=1.5"])


def test_cudnn_cannot_soft_cap_so_the_model_runs_on_xla(caplog):
  config = CONFIGS["gemma2_softcaps"]()
  ids = jax.random.randint(jax.random.key(9), (2, 12), 0, 97)
  with caplog.at_level(logging.INFO, logger="csd_jax.models.attention"):
    cudnn = init_random(config, seed=3, attention_impl="cudnn")
  assert "attention_impl=cudnn cannot soft-cap scores" in caplog.text
  np.testing.assert_array_equal(np.asarray(cudnn(ids)),
                                np.asarray(init_random(config, seed=3)(ids)))


def _edited(name, **changes):
  return {**CONFIGS[name]().to_dict(), **changes}


@pytest.mark.parametrize("config, message", [
    (_edited("qwen2_tied", use_sliding_window=True), "qwen2 config: use_sliding_window=true"),
    (_edited("qwen3_head_dim", use_sliding_window=True), "qwen3 config: use_sliding_window=true"),
    (_edited("llama_mqa_tied", rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                "rope_theta": 1e4}),
     "rope type 'yarn' is not implemented"),
    (_edited("gemma3_text", use_bidirectional_attention=True), "use_bidirectional_attention"),
    (_edited("gemma3_text", rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}),
     "rope scaling on sliding layers"),
    (_edited("gemma2_softcaps", layer_types=["sliding_attention"]), "layer_types"),
], ids=["qwen2_sliding", "qwen3_sliding", "yarn", "bidirectional", "local_scaling",
        "layer_types"])
def test_unsupported_switches_are_refused_in_one_line(config, message):
  with pytest.raises(UserError, match=message) as error:
    init_random(config)
  assert "\n" not in str(error.value)


def test_flops_per_token_counts_the_head_once_tied_or_not():
  from csd_jax.metrics.flops import model_flops_per_token

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
