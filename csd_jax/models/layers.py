"""Building blocks of the decoders: dense layers, norms, rotary embeddings, attention, MLPs.

Every parameter is an `nnx.Param` with `logical_axes` metadata (see `csd_jax.sharding.RULES`).
Parameters are stored in `cfg.param_dtype` and cast to `cfg.dtype` where they are used; norms
and softmaxes run in float32.
"""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from csd_jax.errors import UserError
from csd_jax.models.config import ModelConfig
from csd_jax.models.lora import LoraParam

Array = jax.Array
KVCache = tuple[Array, Array]  # keys, values: [B, S, K, H]

ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
}

INIT_STD = 0.02


def sub_key(key: Array | None, index: int) -> Array | None:
  """An independent key per sub-layer (LoRA dropout), or None when there is no dropout."""
  return None if key is None else jax.random.fold_in(key, index)


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str | None], cfg: ModelConfig,
          init: str = "normal") -> nnx.Param:
  """A parameter of `shape` with logical axis names, initialised normal(0.02), ones or zeros."""
  shape = tuple(shape)
  if init == "normal":
    value = jax.random.normal(rngs.params(), shape, cfg.param_dtype) * INIT_STD
  elif init == "ones":
    value = jnp.ones(shape, cfg.param_dtype)
  else:
    value = jnp.zeros(shape, cfg.param_dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class Dense(nnx.Module):
  """x[..., *in_shape] -> [..., *out_shape] by a kernel [*in_shape, *out_shape] (+ bias)."""

  def __init__(self, in_shape: Sequence[int], out_shape: Sequence[int],
               in_axes: Sequence[str | None], out_axes: Sequence[str | None], *,
               bias: bool, cfg: ModelConfig, rngs: nnx.Rngs, name: str = ""):
    self.cfg = cfg
    self.n_in = len(in_shape)
    self.kernel = param(rngs, (*in_shape, *out_shape), (*in_axes, *out_axes), cfg)
    self.bias = param(rngs, out_shape, out_axes, cfg, "zeros") if bias else None
    adapted = cfg.lora_rank > 0 and name in cfg.lora_targets
    r = cfg.lora_rank
    self.lora_a = LoraParam(
        jax.random.normal(rngs.params(), (*in_shape, r), cfg.param_dtype)
        / math.sqrt(math.prod(in_shape)), logical_axes=(*in_axes, None)) if adapted else None
    self.lora_b = LoraParam(jnp.zeros((r, *out_shape), cfg.param_dtype),
                            logical_axes=(None, *out_axes)) if adapted else None

  def _project(self, x: Array, kernel: Array, n_in: int) -> Array:
    letters = string.ascii_letters
    contract, out = letters[:n_in], letters[n_in:kernel.ndim]
    return jnp.einsum(f"...{contract},{contract}{out}->...{out}", x, kernel.astype(x.dtype))

  def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
    x = x.astype(self.cfg.dtype)
    y = self._project(x, self.kernel[...], self.n_in)
    if getattr(self, "lora_a", None) is not None:
      lora_in = x
      rate = self.cfg.lora_dropout
      if dropout_key is not None and rate > 0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - rate, x.shape)
        lora_in = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
      low_rank = self._project(lora_in, self.lora_a[...], self.n_in)
      y = y + self._project(low_rank, self.lora_b[...], 1) * (
          self.cfg.lora_alpha / self.cfg.lora_rank)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.cfg.dtype)
    return y


class Norm(nnx.Module):
  """RMSNorm (optionally Gemma's `1 + w`) or LayerNorm, computed in float32."""

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.scale = param(rngs, (dim,), ("embed",), cfg, "zeros" if cfg.norm_offset else "ones")
    self.bias = param(rngs, (dim,), ("embed",), cfg, "zeros") if cfg.norm == "layernorm" else None

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    if self.cfg.norm == "layernorm":
      x32 = x32 - jnp.mean(x32, -1, keepdims=True)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.cfg.norm_eps)
    y = y * (self.cfg.norm_offset + self.scale[...].astype(jnp.float32))
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.cfg.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> Array:
  """RoPE inverse frequencies [head_dim / 2], with `linear` or Llama-3 `rope_scaling`."""
  dim = cfg.head_dim
  inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
  scaling = cfg.rope_scaling
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


class Attention(nnx.Module):
  """Multi-head attention with GQA / MQA, RoPE or none, causal + padding masks, a KV cache."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
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

  def __call__(self, x: Array, positions: Array, kv_valid: Array,
               cache: KVCache | None = None, cache_index: Array | int = 0,
               query_segments: Array | None = None, dropout_key: Array | None = None
               ) -> tuple[Array, KVCache | None]:
    """x [B, T, D]; positions [B, T]; kv_valid [B, S] (S = T, or the cache length).

    Query i sits at slot `cache_index + i` and sees the keys at slots <= its own that are
    valid (kv_valid > 0) and, when `query_segments` [B, T] is given, in the same segment
    (kv_valid holds the keys' segment ids then). With a cache, this call's keys and values
    are written at `cache_index` first.
    """
    q, k, v = (self.q(x, sub_key(dropout_key, 0)), self.k(x, sub_key(dropout_key, 1)),
               self.v(x, sub_key(dropout_key, 2)))
    if self.cfg.positions == "rope":
      inv_freq = rope_inverse_frequencies(self.cfg)
      q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      cache = (lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start),
               lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start))
      k, v = cache
    query_slots = cache_index + jnp.arange(x.shape[1])
    causal = jnp.arange(k.shape[1])[None, :] <= query_slots[:, None]
    mask = causal[None, None] & (kv_valid[:, None, None, :] > 0)
    if query_segments is not None:  # packed rows: attend within the own segment only
      mask = mask & (query_segments[:, None, :, None] == kv_valid[:, None, None, :])
    out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=mask,
                                       scale=self.cfg.head_dim**-0.5,
                                       implementation=self.cfg.attention_impl)
    return self.o(out, sub_key(dropout_key, 3)), cache


class MLP(nnx.Module):
  """Gated (SwiGLU / GeGLU: down(act(gate x) * up x)) or plain (GPT-2: down(act(up x)))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    d, f, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
    self.gate = (Dense([d], [f], ["embed"], ["mlp"], bias=bias, cfg=cfg, rngs=rngs, name="gate")
                 if cfg.mlp == "gated" else None)
    self.up = Dense([d], [f], ["embed"], ["mlp"], bias=bias, cfg=cfg, rngs=rngs, name="up")
    self.down = Dense([f], [d], ["mlp"], ["embed"], bias=bias, cfg=cfg, rngs=rngs, name="down")

  def __call__(self, x: Array, dropout_key: Array | None = None) -> Array:
    if self.cfg.activation not in ACTIVATIONS:
      raise UserError(f"unsupported activation {self.cfg.activation!r} in the model config; "
                      f"supported: {', '.join(ACTIVATIONS)}")
    act = ACTIVATIONS[self.cfg.activation]
    up = self.up(x, sub_key(dropout_key, 1))
    hidden = act(self.gate(x, sub_key(dropout_key, 0))) * up if self.gate is not None else act(up)
    return self.down(hidden, sub_key(dropout_key, 2))


class Block(nnx.Module):
  """A pre-norm decoder block: x + attn(norm(x)), then x + mlp(norm(x))."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.attn_norm = Norm(cfg.hidden_size, cfg, rngs)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = Norm(cfg.hidden_size, cfg, rngs)
    self.mlp = MLP(cfg, rngs)

  def __call__(self, x: Array, positions: Array, kv_valid: Array, cache: KVCache | None = None,
               cache_index: Array | int = 0, query_segments: Array | None = None,
               dropout_key: Array | None = None) -> tuple[Array, KVCache | None]:
    attn_out, cache = self.attn(self.attn_norm(x), positions, kv_valid, cache=cache,
                                cache_index=cache_index, query_segments=query_segments,
                                dropout_key=sub_key(dropout_key, 0))
    x = x + attn_out
    return x + self.mlp(self.mlp_norm(x), sub_key(dropout_key, 1)), cache
