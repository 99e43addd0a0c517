"""Model shapes the benches share: transformers config dicts with the real sizes, and the
teacher -> student pairs (with batch x sequence) of bench/step.py and bench/models.py.

The shapes live in `csd_jax.models.io.architectures` (`csd-jax compile` builds from them too).
Random-init models of these shapes stand in for the real checkpoints: speed and memory depend on
the shapes, not on the weights. Every dict is what `AutoConfig.for_model(**config)` and
`csd_jax.models.init_random(config)` both take.
"""

from __future__ import annotations

from typing import Any

from csd_jax.models.io.architectures import (  # noqa: F401  (the shapes the benches use)
    GEMMA_2B, GEMMA_7B, GEMMA2_2B, GEMMA2_9B, GPT2_MEDIUM, GPT2_SMALL, GPT2_XL, OPENLLAMA_3B,
    OPENLLAMA_7B, QWEN25_7B, QWEN25_15B)


def shrink(config: dict, **changes: Any) -> dict:
  return {**config, **changes}


# name: (teacher config, student config, batch, sequence length). "paper": the paper's pairs at
# its batch shapes (OpenLLaMA fully fine-tuned here, where the paper's config uses LoRA), and two
# newer families at 256k / 152k vocabularies.
PAIRS: dict[str, dict[str, tuple[dict, dict, int, int]]] = {
    "tiny": {"gpt2-tiny": (shrink(GPT2_XL, n_embd=64, n_layer=2, n_head=4, vocab_size=512),
                           shrink(GPT2_SMALL, n_embd=32, n_layer=1, n_head=2, vocab_size=512),
                           2, 32)},
    "small": {
        "gpt2-xl/8->gpt2/8": (shrink(GPT2_XL, n_embd=200, n_layer=6, n_head=5),
                              shrink(GPT2_SMALL, n_embd=96, n_layer=2, n_head=3), 4, 128),
        "gemma-7b/16->2b/16": (shrink(GEMMA_7B, hidden_size=192, num_hidden_layers=2,
                                      intermediate_size=1536, head_dim=64, vocab_size=32000),
                               shrink(GEMMA_2B, hidden_size=128, num_hidden_layers=2,
                                      intermediate_size=1024, head_dim=64, vocab_size=32000),
                               2, 128)},
    "paper": {"gpt2-xl->gpt2": (GPT2_XL, GPT2_SMALL, 8, 512),
              "gpt2-xl->gpt2-medium": (GPT2_XL, GPT2_MEDIUM, 8, 512),
              "gemma-7b->gemma-2b": (GEMMA_7B, GEMMA_2B, 2, 1024),
              "openllama-7b->3b": (OPENLLAMA_7B, OPENLLAMA_3B, 8, 512),
              "qwen2.5-7b->1.5b": (QWEN25_7B, QWEN25_15B, 4, 1024),
              "gemma-2-9b->2b": (GEMMA2_9B, GEMMA2_2B, 2, 1024)},
}

# bench/models.py: (name, config, batch, sequence length).
MODELS: dict[str, list[tuple[str, dict, int, int]]] = {
    "tiny": [("gpt2-tiny", shrink(GPT2_XL, n_embd=64, n_layer=2, n_head=4, vocab_size=1024),
              2, 64)],
    "small": [("gpt2-xl/16", shrink(GPT2_XL, n_embd=400, n_layer=6, n_head=5), 4, 256),
              ("gemma-7b/16", shrink(GEMMA_7B, hidden_size=384, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=4, head_dim=64,
                                     intermediate_size=1536, vocab_size=32000), 2, 256)],
    "paper": [("gpt2-xl", GPT2_XL, 8, 512), ("gemma-7b", GEMMA_7B, 2, 1024),
              ("qwen2.5-7b", QWEN25_7B, 4, 1024), ("qwen2.5-1.5b", QWEN25_15B, 4, 1024),
              ("gemma-2-9b", GEMMA2_9B, 2, 1024), ("gemma-2-2b", GEMMA2_2B, 2, 1024)],
}


def shared_vocab(teacher: dict, student: dict) -> int:
  """The vocabulary the loss runs over: the smaller head (Qwen2.5-7B pads its own)."""
  return min(teacher["vocab_size"], student["vocab_size"])
