"""The distillation step's two loss paths (fused chunks, materialised logits) agree, each model
with its own logit soft-cap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from csd_jax.models import init_random
from csd_jax.train.step import Objective, distill_loss

MODEL = dict(model_type="gpt2", n_embd=32, n_layer=1, n_head=2, n_positions=16, vocab_size=96)


# Random-init logits are small (|z| ~ 0.05): caps of that size bend them. A capped student
# with an uncapped teacher is the case that once went wrong (None read as "the student's cap");
# the fused function alone is tested with every mix in test_fused.py.
@pytest.mark.parametrize("student_cap,teacher_cap", [(0.02, None)])
def test_mixed_softcaps_give_the_same_loss_on_both_paths(student_cap, teacher_cap):
  student = init_random(MODEL, seed=0, final_logit_softcap=student_cap)
  teacher = init_random(MODEL, seed=1, final_logit_softcap=teacher_cap)
  ids = jax.random.randint(jax.random.key(0), (2, 17), 0, 96)
  batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:],
           "attention_mask": jnp.ones((2, 16), jnp.int32),
           "positions": jnp.broadcast_to(jnp.arange(16), (2, 16))}
  graphdef, params = nnx.split(student)

  def loss(params, fused):
    objective = Objective("csd", {}, fused=fused, chunk_size=8)
    total, _ = distill_loss(nnx.merge(graphdef, params), teacher, batch, objective,
                            {"num_valid_tokens": jnp.float32(32)})
    return total

  value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  fused, grads_fused = value_and_grad(params, True)
  plain, grads_plain = value_and_grad(params, False)
  # float32 rounding: the chunks add in another order
  np.testing.assert_allclose(fused, plain, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads_fused), jax.tree.leaves(grads_plain)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # the caps matter: both models uncapped give another loss
  other, _ = jax.jit(lambda s, t: distill_loss(s, t, batch, Objective("csd", {}, chunk_size=8),
                                               {"num_valid_tokens": jnp.float32(32)}))(
      init_random(MODEL, seed=0), init_random(MODEL, seed=1))
  assert abs(float(other) - float(fused)) > 0.1 * abs(float(fused))
