"""Tiny random transformers checkpoints (PyTorch, CPU) for parity tests.

Every 1-D weight (norms, biases) is randomised so that a weight the port misses shows in the
logits; `initializer_range` is large enough that greedy decoding has no near-ties.
"""

import pathlib

import torch
import transformers

VOCAB = 97
SLIDING_WINDOW = 5

CONFIGS = {
    "gpt2_n_inner": lambda: transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=4, n_inner=80, vocab_size=VOCAB, n_positions=64,
        bos_token_id=1, eos_token_id=2),
    "llama_gqa_untied_bias": lambda: transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, rope_theta=5e5, tie_word_embeddings=False,
        attention_bias=True, bos_token_id=1, eos_token_id=2),
    "llama_mqa_tied": lambda: transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=64, vocab_size=VOCAB, tie_word_embeddings=True, rope_theta=1e5,
        bos_token_id=1, eos_token_id=2),
    # Llama 3.2 1B / 3B: Llama-3 rope_scaling and a tied head.
    "llama32_tied_rope_scaling": lambda: transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=128,
        tie_word_embeddings=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        bos_token_id=1, eos_token_id=2),
    "gemma_mqa_head_dim": lambda: transformers.GemmaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        head_dim=16, intermediate_size=64, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2,
        pad_token_id=0),
    # Qwen2.5: q/k/v biases, rope_theta 1e6, tied (0.5B-3B) or untied heads.
    "qwen2_tied": lambda: transformers.Qwen2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=VOCAB, rope_theta=1e6, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2),
    "qwen2_untied": lambda: transformers.Qwen2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
        intermediate_size=64, vocab_size=VOCAB, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2),
    # Qwen3: q/k norms, head_dim 16 with 4 heads on a hidden size of 32.
    "qwen3_head_dim": lambda: transformers.Qwen3Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, vocab_size=VOCAB, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2),
    # Sliding windows of SLIDING_WINDOW slots, shorter than every test sequence.
    "mistral_sliding": lambda: transformers.MistralConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, intermediate_size=64, vocab_size=VOCAB, sliding_window=SLIDING_WINDOW,
        bos_token_id=1, eos_token_id=2),
    # Gemma 2: both soft-caps small enough to bite, query_pre_attn_scalar != head_dim.
    "gemma2_softcaps": lambda: transformers.Gemma2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, vocab_size=VOCAB, query_pre_attn_scalar=24,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0, sliding_window=SLIDING_WINDOW,
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
    # Gemma 3: per-layer types, a local RoPE base, linear scaling on the global layers.
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=64, vocab_size=VOCAB, query_pre_attn_scalar=24,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                     "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}},
        bos_token_id=1, eos_token_id=2, pad_token_id=0),
}


def make_checkpoint(name: str, directory: pathlib.Path, seed: int = 0):
  """Save a random `name` model into `directory`; returns the PyTorch model (float32, eval)."""
  config = CONFIGS[name]()
  config.initializer_range = 0.3
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config).float().eval()
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for param_name, p in model.named_parameters():
      if p.ndim == 1:
        is_scale = "norm" in param_name or ".ln_" in param_name
        p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + (1.0 if is_scale else 0.0))
  model.save_pretrained(directory)
  return model
