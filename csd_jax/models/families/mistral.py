"""Mistral: LLaMA with sliding-window attention on every layer (`sliding_window`; null = off)."""

from __future__ import annotations

from typing import Any

from csd_jax.models.config import FULL, SLIDING
from csd_jax.models.families.base import Family, HFConfig, llama_fields, llama_weights


def config_fields(hf: HFConfig) -> dict[str, Any]:
  fields = llama_fields(hf)
  window = hf.get("sliding_window")
  fields.update(sliding_window=window,
                layer_types=(SLIDING if window else FULL,) * fields["num_layers"])
  return fields


FAMILY = Family(model_type="mistral", architecture="MistralForCausalLM",
                config_fields=config_fields, weights=llama_weights)
