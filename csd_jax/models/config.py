"""The model configuration shared by the three families, and its mapping from Hugging Face.

One `ModelConfig` describes a pre-norm decoder; each family (GPT-2, LLaMA, Gemma) is a set of
choices in it (norm, MLP, positions, biases, embedding scale). `config_from_hf` reads a
transformers `config.json` (a dict or a `PretrainedConfig`) and keeps it for `save_pretrained`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from csd_jax.errors import UserError

SUPPORTED_FAMILIES = ("gpt2", "llama", "gemma")
REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True, eq=False)
class ModelConfig:
  """A decoder-only LM. Field defaults are LLaMA's; `config_from_hf` fills all of them."""

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
  bos_token_id: int | None = None
  eos_token_id: int | list[int] | None = None
  pad_token_id: int | None = None
  dtype: Any = jnp.float32            # compute dtype
  param_dtype: Any = jnp.float32
  remat: str = "none"                 # "none" | "full" | "dots"
  attention_impl: str | None = None   # None (XLA picks) | "xla" | "cudnn"
  lora_rank: int = 0                  # > 0: LoRA adapters on `lora_targets` (see lora.py)
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_targets: tuple[str, ...] = ()
  hf_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def replace(self, **changes: Any) -> ModelConfig:
    return dataclasses.replace(self, **changes)


def _get(hf: Mapping[str, Any], *names: str, default: Any = None) -> Any:
  for name in names:
    if hf.get(name) is not None:
      return hf[name]
  return default


def _gpt2(hf: Mapping[str, Any]) -> dict[str, Any]:
  hidden = hf["n_embd"]
  return dict(
      hidden_size=hidden, num_layers=hf["n_layer"], num_heads=hf["n_head"],
      num_kv_heads=hf["n_head"], head_dim=hidden // hf["n_head"],
      intermediate_size=_get(hf, "n_inner", default=4 * hidden), norm="layernorm",
      norm_eps=_get(hf, "layer_norm_epsilon", default=1e-5), mlp="plain",
      activation=_get(hf, "activation_function", default="gelu_new"), positions="learned",
      max_position_embeddings=_get(hf, "n_positions", default=1024), attention_bias=True,
      output_bias=True, mlp_bias=True, tie_word_embeddings=True)


def _llama(hf: Mapping[str, Any]) -> dict[str, Any]:
  heads = hf["num_attention_heads"]
  bias = bool(hf.get("attention_bias", False))
  return dict(
      hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=_get(hf, "num_key_value_heads", default=heads),
      head_dim=_get(hf, "head_dim", default=hf["hidden_size"] // heads),
      intermediate_size=hf["intermediate_size"], norm_eps=_get(hf, "rms_norm_eps", default=1e-6),
      activation=_get(hf, "hidden_act", default="silu"),
      max_position_embeddings=_get(hf, "max_position_embeddings", default=2048),
      rope_theta=_rope_theta(hf), rope_scaling=_get(hf, "rope_scaling", "rope_parameters"),
      attention_bias=bias, output_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))


def _gemma(hf: Mapping[str, Any]) -> dict[str, Any]:
  out = _llama(hf)
  out.update(norm_offset=1.0, embed_scale=True, tie_word_embeddings=True,
             activation=_get(hf, "hidden_activation", "hidden_act",
                             default="gelu_pytorch_tanh"))
  return out


def _rope_theta(hf: Mapping[str, Any]) -> float:
  # transformers 5 moved rope_theta into rope_parameters; 4.x kept it at the top level.
  params = hf.get("rope_parameters") or {}
  return float(_get(hf, "rope_theta", default=params.get("rope_theta", 10000.0)))


_FAMILIES = {"gpt2": _gpt2, "llama": _llama, "gemma": _gemma}


def config_from_hf(hf_config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                   **overrides: Any) -> ModelConfig:
  """A `ModelConfig` from a transformers config (dict, `PretrainedConfig` or its JSON dict).

  Raises:
    UserError: an unsupported `model_type` (naming the supported families).
  """
  hf = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
  family = hf.get("model_type")
  if family not in _FAMILIES:
    raise UserError(f"unsupported model_type {family!r}; supported families: "
                    f"{', '.join(SUPPORTED_FAMILIES)} (pass a model of one of those)")
  fields = _FAMILIES[family](hf)
  rope_scaling = fields.get("rope_scaling")
  if rope_scaling and _get(rope_scaling, "rope_type", "type") == "default":
    fields["rope_scaling"] = None
  cfg = ModelConfig(
      family=family, vocab_size=hf["vocab_size"], bos_token_id=hf.get("bos_token_id"),
      eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
      final_logit_softcap=hf.get("final_logit_softcapping"), dtype=dtype,
      param_dtype=param_dtype or jnp.float32, hf_config=hf, **fields)
  return cfg.replace(**overrides) if overrides else cfg
