"""The model configuration: one pre-norm decoder, each family a set of choices in it.

`ModelConfig` describes norms, MLP, positions, biases, embedding scale, soft-caps and the
attention of each layer (full or sliding window, its RoPE). The families
(`csd_jax/models/families/`) map a transformers `config.json` onto it; the original is kept in
`hf_config` for `save_pretrained`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

REMAT_POLICIES = ("none", "full", "dots")
FULL, SLIDING = "full_attention", "sliding_attention"  # transformers' layer_types names


@dataclasses.dataclass(frozen=True, eq=False)
class ModelConfig:
  """A decoder-only LM. Field defaults are LLaMA's; `families.config_from_hf` fills them."""

  family: str
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  norm: str = "rmsnorm"               # "rmsnorm" | "layernorm"
  norm_eps: float = 1e-6
  norm_offset: float = 0.0            # Gemma scales by (1 + w)
  mlp: str = "gated"                  # "gated" (SwiGLU / GeGLU) | "plain" (GPT-2)
  activation: str = "silu"
  positions: str = "rope"             # "rope" | "learned"
  max_position_embeddings: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: Mapping[str, Any] | None = None
  attention_bias: bool = False        # q, k, v (and o for LLaMA's attention_bias)
  output_bias: bool = False
  mlp_bias: bool = False
  embed_scale: bool = False           # Gemma multiplies embeddings by sqrt(hidden)
  tie_word_embeddings: bool = True
  final_logit_softcap: float | None = None
  attn_logit_softcap: float | None = None  # Gemma 2: cap * tanh(scores / cap) before softmax
  query_scale: float | None = None    # attention scale (None: head_dim ** -0.5)
  qk_norm: bool = False               # an RMSNorm over each head's q and k (Qwen3, Gemma 3)
  post_norms: bool = False            # norms on the attention and MLP outputs (Gemma 2/3)
  sliding_window: int | None = None   # a sliding layer's query sees this many slots, itself too
  layer_types: tuple[str, ...] = ()   # FULL / SLIDING per layer; () = all FULL
  rope_local_theta: float | None = None  # sliding layers' RoPE base, unscaled (Gemma 3)
  embed_dropout: float = 0.0          # dropout while training (GPT-2: embd_pdrop, attn_pdrop,
  attention_dropout: float = 0.0      # resid_pdrop); only where a dropout key is given
  residual_dropout: float = 0.0
  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  pad_token_id: int | None = None
  dtype: Any = jnp.float32            # compute dtype
  param_dtype: Any = jnp.float32
  remat: str = "none"                 # "none" | "full" | "dots"
  # Layer i+1's weights pass an XLA optimization barrier with layer i's input: under FSDP each
  # layer's weights are gathered at most one layer ahead, not whenever the scheduler likes (the
  # TPU compiler otherwise gathered GPT-2-XL's whole teacher at once: 2.79 -> 0.95 GiB of
  # temporaries per v5e chip). The values are unchanged: a barrier only orders work.
  layer_barrier: bool = True
  attention_impl: str | None = None   # None (XLA picks) | "xla" | "cudnn"
  lora_rank: int = 0                  # > 0: LoRA adapters on `lora_targets` (see lora.py)
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ()
  hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)

  def layer_type(self, layer: int) -> str:
    return self.layer_types[layer] if self.layer_types else FULL

  def rope(self, layer: int) -> tuple[float, Mapping[str, Any] | None]:
    """(base, scaling) of a layer's RoPE: Gemma 3's sliding layers have their own base."""
    if self.layer_type(layer) == SLIDING and self.rope_local_theta is not None:
      return self.rope_local_theta, None
    return self.rope_theta, self.rope_scaling

  def window(self, layer: int) -> int | None:
    """The sliding window of a layer, or None for full attention."""
    return self.sliding_window if self.layer_type(layer) == SLIDING else None
