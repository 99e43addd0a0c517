"""Model shapes the benches share: transformers config dicts with the real sizes, and the
teacher -> student pairs (with batch x sequence) of bench/step.py and bench/models.py.

Random-init models of these shapes stand in for the real checkpoints: speed and memory depend on
the shapes, not on the weights. Every dict is what `AutoConfig.for_model(**config)` and
`csd_jax.models.init_random(config)` both take.
"""

from __future__ import annotations

from typing import Any

GPT2 = dict(model_type="gpt2", n_positions=1024, vocab_size=50257, bos_token_id=0,
            eos_token_id=0)
GPT2_XL = dict(GPT2, n_embd=1600, n_layer=48, n_head=25)
GPT2_MEDIUM = dict(GPT2, n_embd=1024, n_layer=24, n_head=16)
GPT2_SMALL = dict(GPT2, n_embd=768, n_layer=12, n_head=12)

GEMMA = dict(model_type="gemma", vocab_size=256000, max_position_embeddings=8192, head_dim=256)
GEMMA_7B = dict(GEMMA, hidden_size=3072, num_hidden_layers=28, num_attention_heads=16,
                num_key_value_heads=16, intermediate_size=24576)
GEMMA_2B = dict(GEMMA, hidden_size=2048, num_hidden_layers=18, num_attention_heads=8,
                num_key_value_heads=1, intermediate_size=16384)

# Gemma 2: sliding-window attention on every other layer, attention and final-logit soft-caps,
# query scale 1/sqrt(query_pre_attn_scalar), tied embeddings.
GEMMA2 = dict(model_type="gemma2", vocab_size=256000, max_position_embeddings=8192, head_dim=256,
              query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
              final_logit_softcapping=30.0, sliding_window=4096, tie_word_embeddings=True,
              hidden_activation="gelu_pytorch_tanh", rms_norm_eps=1e-6, rope_theta=10000.0)
GEMMA2_9B = dict(GEMMA2, hidden_size=3584, num_hidden_layers=42, num_attention_heads=16,
                 num_key_value_heads=8, intermediate_size=14336)
GEMMA2_2B = dict(GEMMA2, hidden_size=2304, num_hidden_layers=26, num_attention_heads=8,
                 num_key_value_heads=4, intermediate_size=9216)

# Qwen2.5: the 7B has an untied head over 152064 tokens, the 1.5B a tied one over 151936; the
# tokenizer has 151665 tokens, so the loss uses the shared 151936 (Objective.vocab_size).
QWEN2 = dict(model_type="qwen2", max_position_embeddings=32768, rope_theta=1000000.0,
             rms_norm_eps=1e-6, use_sliding_window=False, hidden_act="silu")
QWEN25_7B = dict(QWEN2, vocab_size=152064, hidden_size=3584, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, intermediate_size=18944,
                 tie_word_embeddings=False)
QWEN25_15B = dict(QWEN2, vocab_size=151936, hidden_size=1536, num_hidden_layers=28,
                  num_attention_heads=12, num_key_value_heads=2, intermediate_size=8960,
                  tie_word_embeddings=True)

# OpenLLaMA (v1 / v2 share these shapes): untied heads over 32000 tokens.
LLAMA = dict(model_type="llama", vocab_size=32000, max_position_embeddings=2048,
             rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu")
OPENLLAMA_7B = dict(LLAMA, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                    num_key_value_heads=32, intermediate_size=11008)
OPENLLAMA_3B = dict(LLAMA, hidden_size=3200, num_hidden_layers=26, num_attention_heads=32,
                    num_key_value_heads=32, intermediate_size=8640)


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
