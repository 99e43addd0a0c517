"""LLaMA 1/2/3.x (and OpenLLaMA, SmolLM2): RMSNorm, SwiGLU, RoPE with `linear` or Llama-3
`rope_scaling` (3.1, 3.2), optional biases, tied (3.2 1B/3B) or untied heads."""

from csd_jax.models.families.base import Family, llama_fields, llama_weights

FAMILY = Family(model_type="llama", architecture="LlamaForCausalLM", config_fields=llama_fields,
                weights=llama_weights)
