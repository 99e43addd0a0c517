"""The decoder-only LM shared by every family (`ModelConfig` picks the family's parts).

`model(input_ids, attention_mask, positions) -> logits [B, T, V]`. For the fused loss,
`model.hidden_states(...)` gives the final normed hidden states and `model.head_weight()` the LM
head `[D, V]`, without computing logits. Positions default to the count of real tokens before
each one, so left- and right-padded batches give each sequence the logits it has alone.

Packed rows (several samples in one row) pass segment ids as `attention_mask` (0 = padding,
1, 2, ... = the samples) and their own `positions`: a token attends only within its segment.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from csd_jax.errors import UserError
from csd_jax.models.attention import Attention, log_kernel_choice
from csd_jax.models.config import REMAT_POLICIES, ModelConfig
from csd_jax.models.layers import MLP, KVCache, Norm, dropout, param, sub_key

Array = jax.Array

_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def positions_from_mask(attention_mask: Array) -> Array:
  """Position of each token among the real ones (0 for leading padding): [B, T] int32."""
  return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


class Block(nnx.Module):
  """A pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x)); Gemma 2/3 norm the
  attention and MLP outputs too (`post_norms`)."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg.hidden_size, cfg, rngs)
    self.attn = Attention(cfg, layer, rngs)
    self.post_attn_norm = Norm(cfg.hidden_size, cfg, rngs) if cfg.post_norms else None
    self.mlp_norm = Norm(cfg.hidden_size, cfg, rngs)
    self.mlp = MLP(cfg, rngs)
    self.post_mlp_norm = Norm(cfg.hidden_size, cfg, rngs) if cfg.post_norms else None

  def __call__(self, x: Array, positions: Array, kv_valid: Array, cache: KVCache | None = None,
               cache_index: Array | int = 0, query_segments: Array | None = None,
               dropout_key: Array | None = None) -> tuple[Array, KVCache | None]:
    attn_out, cache = self.attn(self.attn_norm(x), positions, kv_valid, cache=cache,
                                cache_index=cache_index, query_segments=query_segments,
                                dropout_key=sub_key(dropout_key, 0))
    if self.post_attn_norm is not None:
      attn_out = self.post_attn_norm(attn_out)
    x = x + attn_out
    mlp_out = self.mlp(self.mlp_norm(x), sub_key(dropout_key, 1))
    if self.post_mlp_norm is not None:
      mlp_out = self.post_mlp_norm(mlp_out)
    return x + mlp_out, cache


class CausalLM(nnx.Module):
  """A pre-norm decoder-only language model."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    if cfg.remat not in REMAT_POLICIES:
      raise UserError(f"remat={cfg.remat!r}; valid: {', '.join(REMAT_POLICIES)}")
    self.cfg = cfg
    self.embed = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg)
    self.pos_embed = (param(rngs, (cfg.max_position_embeddings, cfg.hidden_size),
                            ("positions", "embed"), cfg) if cfg.positions == "learned" else None)
    log_kernel_choice(cfg)
    self.layers = nnx.List([Block(cfg, i, rngs) for i in range(cfg.num_layers)])
    self.final_norm = Norm(cfg.hidden_size, cfg, rngs)
    self.lm_head = (None if cfg.tie_word_embeddings else
                    param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg))

  def head_weight(self) -> Array:
    """The LM head [D, V] in the compute dtype (the embedding's transpose when tied)."""
    weight = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    return weight.astype(self.cfg.dtype)

  def stored_head(self) -> tuple[Array, bool]:
    """The LM head in the compute dtype as it is stored, and whether that is vocab-major: a
    tied embedding [V, D] as it is (a chunked loss reads it in place; its transpose would be
    copied whole), else the head [D, V]."""
    if self.lm_head is not None:
      return self.head_weight(), False
    return self.embed[...].astype(self.cfg.dtype), True

  def hidden_states(self, input_ids: Array, attention_mask: Array | None = None,
                    positions: Array | None = None, *, cache: Sequence[KVCache] | None = None,
                    cache_index: Array | int = 0, kv_valid: Array | None = None,
                    dropout_key: Array | None = None) -> tuple[Array, list[KVCache] | None]:
    """Final normed hidden states [B, T, D] (and the updated KV cache when one is given).

    Args:
      input_ids: [B, T] int.
      attention_mask: [B, T], 1 for real tokens, 0 for padding (default: all real); or segment
        ids of packed samples (tokens attend within their segment).
      positions: [B, T] (default: the count of real tokens before each; pass them for packed
        rows).
      cache: one (keys, values) pair per layer, each [B, S, K, H]; this call writes its keys
        and values at `cache_index`.
      cache_index: the cache slot of this call's first token.
      kv_valid: [B, S] which cache slots hold real tokens (required with `cache`).
      dropout_key: a PRNG key for dropout while training (the checkpoint's embedding,
        attention and residual rates, and LoRA's); None (teacher, evaluation, generation):
        no dropout.
    """
    cfg = self.cfg
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.int32)
    if positions is None:
      positions = positions_from_mask(attention_mask)
    query_segments = None
    if cache is None:
      kv_valid = query_segments = attention_mask
    elif kv_valid is None:
      raise ValueError("decoding with a cache needs kv_valid [B, S]")
    x = jnp.take(self.embed[...], input_ids, axis=0).astype(cfg.dtype)
    if cfg.embed_scale:
      x = x * jnp.asarray(cfg.hidden_size**0.5, cfg.dtype)
    if self.pos_embed is not None:
      x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(cfg.dtype)
    x = dropout(x, cfg.embed_dropout, sub_key(dropout_key, cfg.num_layers))
    new_cache = [] if cache is not None else None
    layers = list(self.layers)
    for i in range(len(layers)):
      block = layers[i]
      layer_cache = None if cache is None else cache[i]
      key = sub_key(dropout_key, i)
      if cfg.layer_barrier and i + 1 < len(layers):
        # The next layer's weights pass through a barrier with this layer's input: XLA may
        # gather them while this layer runs (one layer ahead), not earlier.
        graphdef, state = nnx.split(layers[i + 1])
        x, state = jax.lax.optimization_barrier((x, state))
        layers[i + 1] = nnx.merge(graphdef, state)
      if cfg.remat != "none" and cache is None:
        # jax.checkpoint over the block's state, not nnx.remat: a block's forward changes no
        # variable, and nnx.remat's write-back of the block's variables fails when they come
        # from two trace levels (LoRA: trained adapters beside the frozen base).
        graphdef, state = nnx.split(block)

        def forward(state, h, key=key):
          return nnx.merge(graphdef, state)(h, positions, kv_valid,
                                            query_segments=query_segments, dropout_key=key)[0]

        x = jax.checkpoint(forward, policy=_REMAT[cfg.remat])(state, x)
      else:
        x, layer_cache = block(x, positions, kv_valid, cache=layer_cache, cache_index=cache_index,
                               query_segments=query_segments, dropout_key=key)
      if new_cache is not None:
        new_cache.append(layer_cache)
    return self.final_norm(x), new_cache

  def logits(self, hidden: Array) -> Array:
    """Logits [..., V] in float32 from final hidden states (with the family's soft-cap)."""
    logits = jnp.dot(hidden, self.head_weight(), preferred_element_type=jnp.float32)
    cap = self.cfg.final_logit_softcap
    return logits if cap is None else cap * jnp.tanh(logits / cap)

  def __call__(self, input_ids: Array, attention_mask: Array | None = None,
               positions: Array | None = None) -> Array:
    """Logits [B, T, V] (float32)."""
    hidden, _ = self.hidden_states(input_ids, attention_mask, positions)
    return self.logits(hidden)

  def init_cache(self, batch: int, length: int, dtype=None) -> list[KVCache]:
    """An empty KV cache: per layer, keys and values [batch, length, K, H]."""
    cfg = self.cfg
    shape = (batch, length, cfg.num_kv_heads, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.num_layers)]
