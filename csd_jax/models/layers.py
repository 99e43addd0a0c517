"""Building blocks of the decoders: dense layers, norms, dropout, MLPs (attention lives in
attention.py, the decoder block in transformer.py).

Every parameter is an `nnx.Param` with `logical_axes` metadata (see
`csd_jax.runtime.sharding.RULES`).
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
  """An independent key per sub-layer (dropout), or None when there is no dropout."""
  return None if key is None else jax.random.fold_in(key, index)


def dropout(x: Array, rate: float, key: Array | None) -> Array:
  """Inverted dropout: zero each entry with probability `rate`, scale the rest by
  1 / (1 - rate); the identity without a key (teacher, evaluation, generation)."""
  if key is None or not rate:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)


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
      lora_in = dropout(x, self.cfg.lora_dropout, dropout_key)
      low_rank = self._project(lora_in, self.lora_a[...], self.n_in)
      y = y + self._project(low_rank, self.lora_b[...], 1) * (
          self.cfg.lora_alpha / self.cfg.lora_rank)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.cfg.dtype)
    return y


class Norm(nnx.Module):
  """RMSNorm (optionally Gemma's `1 + w`) or LayerNorm over the last axis, in float32."""

  def __init__(self, dim: int, cfg: ModelConfig, rngs: nnx.Rngs, axis: str = "embed"):
    self.cfg = cfg
    self.scale = param(rngs, (dim,), (axis,), cfg, "zeros" if cfg.norm_offset else "ones")
    self.bias = param(rngs, (dim,), (axis,), cfg, "zeros") if cfg.norm == "layernorm" else None

  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    if self.cfg.norm == "layernorm":
      x32 = x32 - jnp.mean(x32, -1, keepdims=True)
    y = x32 * lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.cfg.norm_eps)
    y = y * (self.cfg.norm_offset + self.scale[...].astype(jnp.float32))
    if self.bias is not None:
      y = y + self.bias[...].astype(jnp.float32)
    return y.astype(self.cfg.dtype)


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
    out = self.down(hidden, sub_key(dropout_key, 2))
    return dropout(out, self.cfg.residual_dropout, sub_key(dropout_key, 3))
