"""Qwen3: LLaMA with an RMSNorm over each head's queries and keys, no q/k/v bias (unless
`attention_bias`), and a `head_dim` independent of hidden size / heads."""

from __future__ import annotations

from typing import Any

from csd_jax.models.families.base import (Family, HFConfig, llama_fields, llama_weights,
                                          refuse_qwen_sliding_window)


def config_fields(hf: HFConfig) -> dict[str, Any]:
  refuse_qwen_sliding_window(hf)
  fields = llama_fields(hf)
  fields.update(qk_norm=True)
  return fields


FAMILY = Family(model_type="qwen3", architecture="Qwen3ForCausalLM", config_fields=config_fields,
                weights=llama_weights)
