"""LoRA adapters on the student's dense layers, and merging them back for export.

With `ModelConfig.lora_rank > 0`, every `Dense` whose name is in `lora_targets` (q, k, v, o,
gate, up, down) gains `lora_a [in..., r]` and `lora_b [r, out...]` as `LoraParam`s:
`y = x W + dropout(x) A B * alpha / r`. B starts at zero, so the adapted model starts equal to
the base model. Only `LoraParam`s are trained (`nnx.state(model, LoraParam)`); `merge_lora`
folds them into the kernels for export.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


class LoraParam(nnx.Param):
  """A LoRA adapter weight: the only parameters trained under LoRA."""


def lora_delta(module: nnx.Module) -> jax.Array:
  """The adapter's contribution to the kernel: A B * alpha / r, shaped like the kernel."""
  a, b = module.lora_a[...], module.lora_b[...]
  rank = a.shape[-1]
  delta = jnp.tensordot(a.astype(jnp.float32), b.astype(jnp.float32), axes=1)
  return delta * (module.cfg.lora_alpha / rank)


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Fold every adapter into its kernel (in place) and drop the adapters; returns the model."""
  for _, module in nnx.iter_graph(model):
    if getattr(module, "lora_a", None) is not None:
      kernel = module.kernel[...]
      module.kernel[...] = (kernel.astype(jnp.float32) + lora_delta(module)).astype(kernel.dtype)
      del module.lora_a, module.lora_b
  return model
