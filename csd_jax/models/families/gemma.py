"""Gemma 1: LLaMA with GeGLU, `1 + w` RMSNorm scales, embeddings scaled by sqrt(hidden), tied
head."""

from __future__ import annotations

from typing import Any

from csd_jax.models.families.base import Family, HFConfig, get, llama_fields, llama_weights


def gemma_fields(hf: HFConfig) -> dict[str, Any]:
  """The Gemma choices every generation shares."""
  fields = llama_fields(hf)
  fields.update(norm_offset=1.0, embed_scale=True, tie_word_embeddings=True,
                activation=get(hf, "hidden_activation", "hidden_act",
                               default="gelu_pytorch_tanh"))
  return fields


FAMILY = Family(model_type="gemma", architecture="GemmaForCausalLM", config_fields=gemma_fields,
                weights=llama_weights)
