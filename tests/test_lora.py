"""LoRA: adapters start as a no-op, only they train, dropout is keyed, export merges them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from csd_jax.models import init_random, load_pretrained, save_pretrained
from csd_jax.models.lora import LoraParam, merge_lora
from hf_tiny import CONFIGS, make_checkpoint

LORA = dict(lora_rank=4, lora_alpha=8.0, lora_targets=("q", "v", "up", "down"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  directory = tmp_path_factory.mktemp("lora")
  make_checkpoint("llama_gqa_untied_bias", directory)
  return directory


def test_adapters_start_as_a_no_op_and_sit_on_the_targets(checkpoint):
  base = load_pretrained(checkpoint)
  adapted = load_pretrained(checkpoint, **LORA)
  ids = jnp.arange(12)[None] % 97
  np.testing.assert_array_equal(np.asarray(adapted(ids)), np.asarray(base(ids)))
  paths = [p for p, v in nnx.to_flat_state(nnx.state(adapted)) if isinstance(v, LoraParam)]
  assert {p[-2] for p in paths} == {"q", "v", "up", "down"}
  assert len(paths) == 2 * 4 * 2  # a and b, four targets, two layers


def test_only_adapters_get_gradients_and_export_merges(checkpoint, tmp_path):
  model = load_pretrained(checkpoint, **LORA)
  ids = jnp.arange(16)[None] % 97
  graphdef, adapters, frozen = nnx.split(model, LoraParam, ...)

  def loss(adapters):
    return jnp.mean(nnx.merge(graphdef, adapters, frozen)(ids) ** 2)

  grads = jax.grad(loss)(adapters)
  assert all(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(grads))
  assert any(float(jnp.abs(v.get_value()).max()) > 0 for _, v in nnx.to_flat_state(grads))
  # A step on B makes the adapters matter; the exported (merged) model must keep that.
  adapters = jax.tree.map(lambda a, g: a - 1.0 * g, adapters, grads)
  trained = nnx.merge(graphdef, adapters, frozen)
  before = np.asarray(trained(ids))
  assert not np.allclose(before, np.asarray(load_pretrained(checkpoint)(ids)))
  save_pretrained(trained, tmp_path)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).float().eval()
  with torch.no_grad():
    ref = reloaded(torch.tensor(np.asarray(ids))).logits.numpy()
  assert np.abs(ref - before).max() / np.abs(before).max() <= 1e-4  # float32 rounding
  merged = merge_lora(nnx.clone(trained))
  np.testing.assert_allclose(np.asarray(merged(ids)), before, rtol=1e-4, atol=1e-5)


def test_lora_dropout_is_keyed():
  model = init_random(CONFIGS["llama_mqa_tied"](), seed=0, lora_dropout=0.5, **LORA)
  graphdef, adapters, frozen = nnx.split(model, LoraParam, ...)
  adapters = jax.tree.map(lambda a: a + 0.3, adapters)  # non-zero B
  model = nnx.merge(graphdef, adapters, frozen)
  ids = jnp.arange(8)[None]

  def hidden(key):
    return np.asarray(model.hidden_states(ids, dropout_key=key)[0])

  k1, k2 = jax.random.key(1), jax.random.key(2)
  np.testing.assert_array_equal(hidden(k1), hidden(k1))
  assert not np.array_equal(hidden(k1), hidden(k2))
  assert not np.array_equal(hidden(k1), hidden(None))
