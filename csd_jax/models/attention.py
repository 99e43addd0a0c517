"""Attention: rotary embeddings, the masks (causal, padding, packed segments, sliding windows)
and the attention kernel, with Gemma 2's logit soft-cap and attention dropout.

`jax.nn.dot_product_attention` (cuDNN or XLA, as `ModelConfig.attention_impl` asks) computes
plain attention. It can neither soft-cap the scores nor drop probabilities, so a layer that
needs either runs `xla_attention` instead, and a request for cuDNN on such a model is logged.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from csd_jax.errors import UserError
from csd_jax.models.config import ModelConfig
from csd_jax.models.layers import Dense, KVCache, Norm, dropout, sub_key

Array = jax.Array
logger = logging.getLogger(__name__)


def rope_inverse_frequencies(head_dim: int, theta: float,
                             scaling: Mapping[str, Any] | None = None) -> Array:
  """RoPE inverse frequencies [head_dim / 2], with `linear` or Llama-3 `rope_scaling`."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if not scaling:
    return inv_freq
  kind = scaling.get("rope_type", scaling.get("type"))
  factor = float(scaling.get("factor", 1.0))
  if kind == "linear":
    return inv_freq / factor
  if kind == "llama3":
    old_context = float(scaling["original_max_position_embeddings"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > old_context / low, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_context / high) & (wavelen <= old_context / low)
    return jnp.where(medium, smoothed, scaled)
  raise UserError(f"unsupported rope_scaling type {kind!r} in the model config; supported: "
                  "linear, llama3 (or none)")


def apply_rope(x: Array, positions: Array, inv_freq: Array) -> Array:
  """Rotary embedding in the `rotate_half` layout of transformers: x [B, T, N, H]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, -1)[:, :, None, :]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, -1)[:, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x.dtype)


def attention_mask(query_slots: Array, kv_valid: Array, query_segments: Array | None,
                   window: int | None) -> Array:
  """[B, 1, T, S]: query slot i sees key slot j <= i that is valid (kv_valid > 0), in its own
  segment (packed rows: kv_valid holds the keys' segment ids), and, in a sliding layer, fewer
  than `window` slots back (as transformers: j > i - window)."""
  key_slots = jnp.arange(kv_valid.shape[1])
  distance = query_slots[:, None] - key_slots[None, :]
  visible = distance >= 0
  if window is not None:
    visible = visible & (distance < window)
  mask = visible[None, None] & (kv_valid[:, None, None, :] > 0)
  if query_segments is not None:
    mask = mask & (query_segments[:, None, :, None] == kv_valid[:, None, None, :])
  return mask


def xla_attention(q: Array, k: Array, v: Array, mask: Array, *, scale: float,
                  softcap: float | None = None, dropout_rate: float = 0.0,
                  dropout_key: Array | None = None) -> Array:
  """Grouped-query attention with float32 scores: q [B, T, N, H], k and v [B, S, K, H],
  mask [B, 1, T, S] -> [B, T, N, H]. Scores are soft-capped (cap * tanh(s / cap)) before the
  mask; probabilities are dropped at `dropout_rate` when a key is given."""
  batch, length, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  grouped = q.reshape(batch, length, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("btkgh,bskh->bkgts", grouped, k,
                      preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    scores = softcap * jnp.tanh(scores / softcap)
  scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = dropout(jax.nn.softmax(scores, axis=-1), dropout_rate, dropout_key)
  out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v)
  return out.reshape(batch, length, heads, head_dim)


def log_kernel_choice(cfg: ModelConfig) -> None:
  """Say when a cuDNN request is overridden (soft-capped scores or attention dropout)."""
  if cfg.attention_impl == "cudnn" and (cfg.attn_logit_softcap or cfg.attention_dropout):
    logger.info("attention_impl=cudnn cannot %s: the %s model's attention runs on XLA",
                "soft-cap scores" if cfg.attn_logit_softcap else "drop probabilities",
                cfg.family)


class Attention(nnx.Module):
  """Multi-head attention of one layer: GQA / MQA, RoPE or none, optional q/k norms, full or
  sliding-window masks, soft-capped scores, a KV cache."""

  def __init__(self, cfg: ModelConfig, layer: int, rngs: nnx.Rngs):
    self.cfg = cfg
    self.layer = layer
    d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    bias = cfg.attention_bias
    self.q = Dense([d], [n, h], ["embed"], ["heads", "head_dim"], bias=bias, cfg=cfg, rngs=rngs,
                   name="q")
    self.k = Dense([d], [k, h], ["embed"], ["kv_heads", "head_dim"], bias=bias, cfg=cfg,
                   rngs=rngs, name="k")
    self.v = Dense([d], [k, h], ["embed"], ["kv_heads", "head_dim"], bias=bias, cfg=cfg,
                   rngs=rngs, name="v")
    self.o = Dense([n, h], [d], ["heads", "head_dim"], ["embed"], bias=cfg.output_bias, cfg=cfg,
                   rngs=rngs, name="o")
    self.q_norm = Norm(h, cfg, rngs, axis="head_dim") if cfg.qk_norm else None
    self.k_norm = Norm(h, cfg, rngs, axis="head_dim") if cfg.qk_norm else None

  def __call__(self, x: Array, positions: Array, kv_valid: Array,
               cache: KVCache | None = None, cache_index: Array | int = 0,
               query_segments: Array | None = None, dropout_key: Array | None = None
               ) -> tuple[Array, KVCache | None]:
    """x [B, T, D]; positions [B, T]; kv_valid [B, S] (S = T, or the cache length).

    Query i sits at slot `cache_index + i` (see `attention_mask`). With a cache, this call's
    keys and values are written at `cache_index` first. `dropout_key` (training only) keys
    LoRA and attention dropout.
    """
    cfg = self.cfg
    q, k, v = (self.q(x, sub_key(dropout_key, 0)), self.k(x, sub_key(dropout_key, 1)),
               self.v(x, sub_key(dropout_key, 2)))
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if cfg.positions == "rope":
      inv_freq = rope_inverse_frequencies(cfg.head_dim, *cfg.rope(self.layer))
      q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      cache = (lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start),
               lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start))
      k, v = cache
    mask = attention_mask(cache_index + jnp.arange(x.shape[1]), kv_valid, query_segments,
                          cfg.window(self.layer))
    scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim**-0.5
    drop = cfg.attention_dropout if dropout_key is not None else 0.0
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if cfg.attn_logit_softcap is None and not drop:
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale,
                                         implementation=cfg.attention_impl)
    else:
      out = xla_attention(q, k, v, mask, scale=scale, softcap=cfg.attn_logit_softcap,
                          dropout_rate=drop, dropout_key=sub_key(dropout_key, 4))
    out = self.o(out, sub_key(dropout_key, 3))
    return dropout(out, cfg.residual_dropout, sub_key(dropout_key, 5)), cache
