"""Gemma 3 text (`gemma3_text`): Gemma 2's sandwich norms and scale, plus `1 + w` RMSNorms over
each head's queries and keys, per-layer `layer_types` (sliding / full), and a RoPE base of its
own for sliding layers (`rope_local_base_freq`, unscaled) while global layers take `rope_theta`
and `rope_scaling`. No attention soft-cap unless the config sets one."""

from __future__ import annotations

from typing import Any

from csd_jax.errors import UserError
from csd_jax.models.config import FULL, SLIDING
from csd_jax.models.families.base import Family, HFConfig, get, layer_types, rope_parameters
from csd_jax.models.families.gemma2 import weights
from csd_jax.models.families.gemma import gemma_fields


def config_fields(hf: HFConfig) -> dict[str, Any]:
  if hf.get("use_bidirectional_attention"):
    raise UserError("gemma3_text config: use_bidirectional_attention=true (an encoder, not a "
                    "causal LM) is not supported; use a causal Gemma 3 checkpoint")
  fields = gemma_fields(hf)
  count = fields["num_layers"]
  # Older configs give a pattern instead of layer_types: every n-th layer is global.
  pattern = int(get(hf, "sliding_window_pattern", "_sliding_window_pattern", default=6))
  derived = tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(count))
  local_theta, local_scaling = rope_parameters(hf, SLIDING)
  if local_scaling:
    raise UserError(f"gemma3_text config: rope scaling on sliding layers ({local_scaling}) is "
                    "not implemented; use a model whose local layers use default RoPE")
  fields.update(
      qk_norm=True, post_norms=True,
      query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
      attn_logit_softcap=hf.get("attn_logit_softcapping"),
      sliding_window=hf["sliding_window"],
      layer_types=layer_types(hf, count, derived),
      rope_local_theta=float(get(hf, "rope_local_base_freq", default=local_theta or 10000.0)))
  return fields


FAMILY = Family(model_type="gemma3_text", architecture="Gemma3ForCausalLM",
                config_fields=config_fields, weights=weights)
