"""GPT-2: learned positions, LayerNorm, a plain GELU MLP, fused `c_attn` (Conv1D) weights."""

from __future__ import annotations

from typing import Any

import numpy as np

from csd_jax.models.config import ModelConfig
from csd_jax.models.families.base import (Family, HFConfig, WeightEntry, check_heads, get,
                                          same)


def config_fields(hf: HFConfig) -> dict[str, Any]:
  check_heads(hf, hidden="n_embd", heads="n_head")
  hidden = hf["n_embd"]
  return dict(
      hidden_size=hidden, num_layers=hf["n_layer"], num_heads=hf["n_head"],
      num_kv_heads=hf["n_head"], head_dim=hidden // hf["n_head"],
      intermediate_size=get(hf, "n_inner", default=4 * hidden), norm="layernorm",
      norm_eps=get(hf, "layer_norm_epsilon", default=1e-5), mlp="plain",
      activation=get(hf, "activation_function", default="gelu_new"), positions="learned",
      max_position_embeddings=get(hf, "n_positions", default=1024), attention_bias=True,
      output_bias=True, mlp_bias=True, tie_word_embeddings=True,
      embed_dropout=float(get(hf, "embd_pdrop", default=0.1)),
      attention_dropout=float(get(hf, "attn_pdrop", default=0.1)),
      residual_dropout=float(get(hf, "resid_pdrop", default=0.1)))


def weights(cfg: ModelConfig) -> list[WeightEntry]:
  n, h, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
  entries = [same(("embed",), "transformer.wte.weight"),
             same(("pos_embed",), "transformer.wpe.weight"),
             same(("final_norm", "scale"), "transformer.ln_f.weight"),
             same(("final_norm", "bias"), "transformer.ln_f.bias")]
  for i in range(cfg.num_layers):
    hf, ours = f"transformer.h.{i}.", ("layers", i)
    attn = ours + ("attn",)
    qkv = tuple(attn + (p, "kernel") for p in "qkv")
    qkv_bias = tuple(attn + (p, "bias") for p in "qkv")
    entries += [
        same(ours + ("attn_norm", "scale"), hf + "ln_1.weight"),
        same(ours + ("attn_norm", "bias"), hf + "ln_1.bias"),
        same(ours + ("mlp_norm", "scale"), hf + "ln_2.weight"),
        same(ours + ("mlp_norm", "bias"), hf + "ln_2.bias"),
        # Conv1D [D, 3D] = [q | k | v], each [D, N * H].
        WeightEntry(hf + "attn.c_attn.weight", qkv,
                    lambda w: tuple(p.reshape(d, n, h) for p in np.split(w, 3, axis=1)),
                    lambda ws: np.concatenate([p.reshape(d, -1) for p in ws], axis=1)),
        WeightEntry(hf + "attn.c_attn.bias", qkv_bias,
                    lambda b: tuple(p.reshape(n, h) for p in np.split(b, 3)),
                    lambda bs: np.concatenate([p.reshape(-1) for p in bs])),
        WeightEntry(hf + "attn.c_proj.weight", (attn + ("o", "kernel"),),
                    lambda w: (w.reshape(n, h, d),), lambda ws: ws[0].reshape(n * h, d)),
        same(attn + ("o", "bias"), hf + "attn.c_proj.bias"),
        same(ours + ("mlp", "up", "kernel"), hf + "mlp.c_fc.weight"),
        same(ours + ("mlp", "up", "bias"), hf + "mlp.c_fc.bias"),
        same(ours + ("mlp", "down", "kernel"), hf + "mlp.c_proj.weight"),
        same(ours + ("mlp", "down", "bias"), hf + "mlp.c_proj.bias"),
    ]
  return entries


def canonical_name(name: str) -> str:
  """The original GPT-2 files lack the `transformer.` prefix."""
  return name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name


FAMILY = Family(model_type="gpt2", architecture="GPT2LMHeadModel", config_fields=config_fields,
                weights=weights, canonical_name=canonical_name)
