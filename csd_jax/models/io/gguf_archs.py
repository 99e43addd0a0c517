"""What differs per GGUF architecture: tensor names, config.json, tensor fixes, chat template.

`ARCHS[general.architecture]` is a `GGUFArch`; `gguf.convert_gguf` drives the conversion with it.

- `llama` -> `LlamaForCausalLM` (model_type "llama"). llama.cpp's converter permutes the rows of
  q_proj / k_proj (per head, from the rotary "half" layout to interleaved pairs): undone here.
- `gemma3` -> `Gemma3ForCausalLM` (model_type "gemma3_text", the text-only model). llama.cpp
  stores every Gemma RMSNorm weight (`*norm.weight`, q/k norms included) with +1 added, since
  Gemma's norm multiplies by `1 + w`: subtracted here, as transformers' GGUF loader does
  (`Gemma2TensorProcessor`). Gemma's q/k rows are NOT permuted (its rotary layout already is
  the "half" one llama.cpp's NEOX mode uses); the embedding is tied (no `output.weight`). What
  the GGUF metadata leaves out is what llama.cpp hard-codes for the architecture: local-layer
  RoPE base 10000, one global layer every 6 (`sliding_window_pattern`), queries scaled by
  1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 62-layer 27B), no logit soft-caps.
  A GGUF without a chat template (the base Gemma 3 files) gets Gemma's own turn format.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from csd_jax.errors import UserError

__all__ = ["ARCHS", "GGUFArch", "unpermute_rotary_rows"]

Field = Callable[..., Any]   # field(key, default=None) -> a metadata value


@dataclasses.dataclass(frozen=True)
class GGUFArch:
  """One GGUF architecture's mapping to a Hugging Face model.

  Attributes:
    global_names / block_names: GGUF tensor name (or `blk.N.<kind>` kind) -> HF name.
    config: (field, tensor names, vocab size, dtype) -> config.json without the token ids.
    fix: (kind: `attn_q`, `output_norm`, ..., float32 tensor, config) -> the tensor in HF's
      convention.
    chat_template: used when the GGUF metadata has none (None: leave the tokenizer without).
    end_of_turn: a token that also ends generation (written into generation_config.json).
  """

  global_names: dict[str, str]
  block_names: dict[str, str]
  config: Callable[[Field, set[str], int, str], dict[str, Any]]
  fix: Callable[[str, np.ndarray, dict[str, Any]], np.ndarray]
  chat_template: str | None = None
  end_of_turn: str | None = None


def unpermute_rotary_rows(w: np.ndarray, n_head: int) -> np.ndarray:
  """Undo llama.cpp's q_proj/k_proj row permutation (axis 0 holds n_head * head_dim rows).

  llama.cpp's convert script reshapes the rows to [n_head, 2, head_dim // 2] and swaps the last
  two axes (rotary "half" layout -> interleaved pairs); the inverse reshapes to
  [n_head, head_dim // 2, 2] and swaps them back. Same as transformers'
  `LlamaTensorProcessor._reverse_permute_weights`; `n_head` is the KV head count for k_proj.
  """
  rows = w.shape[0]
  if rows % (2 * n_head):
    raise UserError(f"cannot unpermute {rows} rows into {n_head} heads of even size: the GGUF "
                    "head count does not fit its q/k tensors; convert a well-formed GGUF file")
  half = rows // n_head // 2
  return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _need(field: Field, arch: str, key: str) -> Any:
  value = field(f"{arch}.{key}")
  if value is None:
    raise UserError(f"GGUF metadata lacks {arch}.{key}; convert a complete GGUF file (as "
                    "written by llama.cpp's convert_hf_to_gguf.py)")
  return value


def _common(field: Field, arch: str, vocab: int, dtype: str) -> dict[str, Any]:
  hidden = _need(field, arch, "embedding_length")
  n_head = _need(field, arch, "attention.head_count")
  return {
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": _need(field, arch, "feed_forward_length"),
      "num_hidden_layers": _need(field, arch, "block_count"),
      "num_attention_heads": n_head,
      "num_key_value_heads": field(f"{arch}.attention.head_count_kv", n_head),
      "head_dim": field(f"{arch}.attention.key_length", hidden // n_head),
      "max_position_embeddings": _need(field, arch, "context_length"),
      "rope_theta": field(f"{arch}.rope.freq_base", 10000.0),
      "attention_dropout": 0.0,
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": dtype,
  }


# --- llama ------------------------------------------------------------------------------------

def _llama_config(field: Field, names: set[str], vocab: int, dtype: str) -> dict[str, Any]:
  scaling = field("llama.rope.scaling.type", "none")
  if scaling not in ("none", None) or "rope_freqs.weight" in names:
    raise UserError(f"RoPE scaling ({scaling!r}, rope_freqs) is not supported; convert a model "
                    "without RoPE scaling, or load its Hugging Face original")
  common = _common(field, "llama", vocab, dtype)
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
      "hidden_act": "silu",
      "rms_norm_eps": field("llama.attention.layer_norm_rms_epsilon", 1e-5),
      "rope_scaling": None,
      "attention_bias": "blk.0.attn_q.bias" in names,
      "mlp_bias": "blk.0.ffn_gate.bias" in names,
      "pretraining_tp": 1,
      "tie_word_embeddings": "output.weight" not in names,
  }


def _llama_fix(kind: str, w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
  heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
  return unpermute_rotary_rows(w, heads[kind]) if kind in heads else w


_LLAMA_BLOCKS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

LLAMA = GGUFArch(
    global_names={"token_embd.weight": "model.embed_tokens.weight",
                  "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"},
    block_names=_LLAMA_BLOCKS, config=_llama_config, fix=_llama_fix)


# --- gemma3 -----------------------------------------------------------------------------------

# Gemma 3's chat template (google/gemma-3-*-it), text only: the first system message is folded
# into the first user turn; "assistant" turns are "model" turns; it writes BOS itself.
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")


def _sliding_pattern(field: Field, count: int) -> list[str]:
  """Per-layer attention kinds: the file's pattern if it has one, else llama.cpp's (every 6th
  layer global)."""
  pattern = field("gemma3.attention.sliding_window_pattern", 6)
  if isinstance(pattern, list):   # newer llama.cpp: one bool per layer (True = sliding)
    if len(pattern) != count:
      raise UserError(f"gemma3.attention.sliding_window_pattern lists {len(pattern)} layers, "
                      f"not {count}; convert a well-formed GGUF file")
    return ["sliding_attention" if s else "full_attention" for s in pattern]
  return ["full_attention" if (i + 1) % int(pattern) == 0 else "sliding_attention"
          for i in range(count)]


def _gemma3_config(field: Field, names: set[str], vocab: int, dtype: str) -> dict[str, Any]:
  common = _common(field, "gemma3", vocab, dtype)
  if "output.weight" in names:
    raise UserError("this gemma3 GGUF has an untied output.weight, which Gemma 3 never has; "
                    "convert an unmodified Gemma 3 GGUF file")
  scaling = None
  kind = field("gemma3.rope.scaling.type", "none")
  if kind == "linear":   # the 4B-27B models: on global layers only
    scaling = {"rope_type": "linear", "factor": float(_need(field, "gemma3", "rope.scaling.factor"))}
  elif kind not in ("none", None):
    raise UserError(f"gemma3 RoPE scaling {kind!r} is not supported (only linear); convert a "
                    "model without it")
  layers, hidden = common["num_hidden_layers"], common["hidden_size"]
  # llama.cpp: attention scale 1/sqrt(head_dim), except Gemma 3 27B (62 layers): 1/sqrt(d/heads)
  query_scalar = (hidden // common["num_attention_heads"] if layers == 62
                  else common["head_dim"])
  return {
      "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", **common,
      "hidden_activation": "gelu_pytorch_tanh",
      "rms_norm_eps": field("gemma3.attention.layer_norm_rms_epsilon", 1e-6),
      "rope_local_base_freq": 10000.0,
      "rope_scaling": scaling,
      "query_pre_attn_scalar": query_scalar,
      "sliding_window": _need(field, "gemma3", "attention.sliding_window"),
      "layer_types": _sliding_pattern(field, layers),
      "final_logit_softcapping": field("gemma3.final_logit_softcapping"),
      "attn_logit_softcapping": field("gemma3.attn_logit_softcapping"),
      "attention_bias": False,
      "use_bidirectional_attention": False,
      "tie_word_embeddings": True,
  }


def _gemma3_fix(kind: str, w: np.ndarray, config: dict[str, Any]) -> np.ndarray:
  return w - 1.0 if kind.endswith("norm") else w


GEMMA3 = GGUFArch(
    global_names={"token_embd.weight": "model.embed_tokens.weight",
                  "output_norm.weight": "model.norm.weight"},
    block_names={**_LLAMA_BLOCKS,
                 "attn_q_norm": "self_attn.q_norm",
                 "attn_k_norm": "self_attn.k_norm",
                 "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"},
    config=_gemma3_config, fix=_gemma3_fix,
    chat_template=GEMMA_CHAT_TEMPLATE, end_of_turn="<end_of_turn>")

ARCHS = {"llama": LLAMA, "gemma3": GEMMA3}
