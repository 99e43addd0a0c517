"""The architectures (transformers config dicts, shapes only) of the models the shipped configs
name, by hub id: what `csd-jax compile` builds its abstract models from where the checkpoint is
neither on disk nor in the hub cache (a TPU slice is costed before anything is downloaded).

    architecture("Qwen/Qwen2.5-7B-Instruct")   # -> {"model_type": "qwen2", ...}, or None

Every dict is what `AutoConfig.for_model(**config)` and `csd_jax.models.init_random(config)`
both take; the values are those of the models' published config.json files (weights do not
change a compile: only the shapes and the dtypes do). The benches build their random-init
models from the same dicts.
"""

from __future__ import annotations

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

# Llama 3.x: grouped-query attention, Llama-3 RoPE scaling, 128256 tokens; the 1B ties its head.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
LLAMA3 = dict(model_type="llama", vocab_size=128256, max_position_embeddings=131072,
              rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu", bos_token_id=128000,
              eos_token_id=[128001, 128008, 128009])
LLAMA31_8B = dict(LLAMA3, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=14336, tie_word_embeddings=False,
                  rope_scaling=LLAMA3_ROPE)
LLAMA32_1B = dict(LLAMA3, hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, intermediate_size=8192, head_dim=64,
                  tie_word_embeddings=True, rope_scaling=dict(LLAMA3_ROPE, factor=32.0))

# Hub id -> architecture. An instruction-tuned model has its base model's shapes.
BY_HUB_ID: dict[str, dict] = {
    "gpt2": GPT2_SMALL, "openai-community/gpt2": GPT2_SMALL,
    "gpt2-medium": GPT2_MEDIUM, "openai-community/gpt2-medium": GPT2_MEDIUM,
    "gpt2-xl": GPT2_XL, "openai-community/gpt2-xl": GPT2_XL,
    "google/gemma-2b": GEMMA_2B, "google/gemma-2b-it": GEMMA_2B,
    "google/gemma-7b": GEMMA_7B, "google/gemma-7b-it": GEMMA_7B,
    "google/gemma-2-2b": GEMMA2_2B, "google/gemma-2-2b-it": GEMMA2_2B,
    "google/gemma-2-9b": GEMMA2_9B, "google/gemma-2-9b-it": GEMMA2_9B,
    "Qwen/Qwen2.5-7B": QWEN25_7B, "Qwen/Qwen2.5-7B-Instruct": QWEN25_7B,
    "Qwen/Qwen2.5-1.5B": QWEN25_15B, "Qwen/Qwen2.5-1.5B-Instruct": QWEN25_15B,
    "openlm-research/open_llama_7b_v2": OPENLLAMA_7B, "openlm-research/open_llama_7b": OPENLLAMA_7B,
    "openlm-research/open_llama_3b_v2": OPENLLAMA_3B, "openlm-research/open_llama_3b": OPENLLAMA_3B,
    "meta-llama/Llama-3.1-8B": LLAMA31_8B, "meta-llama/Llama-3.1-8B-Instruct": LLAMA31_8B,
    "meta-llama/Llama-3.2-1B": LLAMA32_1B, "meta-llama/Llama-3.2-1B-Instruct": LLAMA32_1B,
}


def architecture(hub_id: str) -> dict | None:
  """The config dict of a known hub id (a revision, `@...`, ignored), else None."""
  return BY_HUB_ID.get(str(hub_id).split("@", 1)[0])
