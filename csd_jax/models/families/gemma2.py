"""Gemma 2: Gemma with norms after attention and after the MLP too, attention-logit and
final-logit soft-caps, a `query_pre_attn_scalar` scale, and sliding-window layers alternating
with global ones (even layers slide)."""

from __future__ import annotations

from typing import Any

from csd_jax.models.config import FULL, SLIDING, ModelConfig
from csd_jax.models.families.base import (SANDWICH_NORMS, Family, HFConfig, WeightEntry,
                                          layer_types, llama_weights)
from csd_jax.models.families.gemma import gemma_fields


def config_fields(hf: HFConfig) -> dict[str, Any]:
  fields = gemma_fields(hf)
  count = fields["num_layers"]
  alternating = tuple(SLIDING if i % 2 == 0 else FULL for i in range(count))
  fields.update(
      post_norms=True, query_scale=float(hf["query_pre_attn_scalar"]) ** -0.5,
      attn_logit_softcap=hf.get("attn_logit_softcapping"), sliding_window=hf["sliding_window"],
      layer_types=layer_types(hf, count, alternating))
  return fields


def weights(cfg: ModelConfig) -> list[WeightEntry]:
  return llama_weights(cfg, SANDWICH_NORMS)


FAMILY = Family(model_type="gemma2", architecture="Gemma2ForCausalLM",
                config_fields=config_fields, weights=weights)
