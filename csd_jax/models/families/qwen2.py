"""Qwen2 / Qwen2.5: LLaMA with q/k/v biases (no o bias), `rope_theta` 1e6, tied (0.5B-3B) or
untied heads. `use_sliding_window` (off in every released checkpoint) is refused."""

from __future__ import annotations

from typing import Any

from csd_jax.models.families.base import (Family, HFConfig, llama_fields, llama_weights,
                                          refuse_qwen_sliding_window)


def config_fields(hf: HFConfig) -> dict[str, Any]:
  refuse_qwen_sliding_window(hf)
  fields = llama_fields(hf)
  fields.update(attention_bias=True, output_bias=False)
  return fields


FAMILY = Family(model_type="qwen2", architecture="Qwen2ForCausalLM", config_fields=config_fields,
                weights=llama_weights)
