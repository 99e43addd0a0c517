"""Parameter counts and model FLOPs per token of a model, for MFU (the loop and bench/)."""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from csd_jax.metrics import transformer_flops_per_token


def count_params(state: Any) -> int:
  """The number of values in a pytree of arrays (an NNX state)."""
  return sum(x.size for x in jax.tree.leaves(state))


def model_flops_per_token(model: Any, seq_len: int, *, backward: bool) -> float:
  """Matmul FLOPs per token of a forward (x3 with the backward) pass: every parameter that
  multiplies (the LM head included, the embedding lookup and learned positions not) plus
  attention's scores and values."""
  cfg = model.cfg
  matmul = count_params(nnx.state(model, nnx.Param))
  if not cfg.tie_word_embeddings:
    matmul -= cfg.vocab_size * cfg.hidden_size  # the lookup table; the head is counted
  if model.pos_embed is not None:
    matmul -= model.pos_embed.get_value().size
  return transformer_flops_per_token(matmul, cfg.num_layers, seq_len,
                                     cfg.num_heads * cfg.head_dim, backward=backward)
