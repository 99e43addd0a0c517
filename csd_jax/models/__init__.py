"""Flax NNX ports of the decoder families (csd_jax/models/families/: GPT-2, LLaMA 1-3.x,
Mistral, Qwen2/2.5, Qwen3, Gemma 1-3), with Hugging Face checkpoint I/O (models/io/) and
generation.

- `load_pretrained(path_or_hub_id, dtype=..., param_dtype=..., mesh=...)`, `init_random(config)`,
  `save_pretrained(model, path, tokenizer)`;
- `model(input_ids, attention_mask, positions) -> logits`; `model.hidden_states(...)` and
  `model.head_weight()` for the fused loss;
- `generate(model, prompt_ids, max_new_tokens=..., ...)`.

This package never imports the losses, data, training or checkpoint code.
"""

from csd_jax.models.config import ModelConfig
from csd_jax.models.families import SUPPORTED_FAMILIES, config_from_hf
from csd_jax.models.generate import generate
from csd_jax.models.io.hf import init_random, load_pretrained, save_pretrained
from csd_jax.models.transformer import CausalLM, positions_from_mask

__all__ = [
    "SUPPORTED_FAMILIES", "CausalLM", "ModelConfig", "config_from_hf", "generate", "init_random",
    "load_pretrained", "positions_from_mask", "save_pretrained",
]
