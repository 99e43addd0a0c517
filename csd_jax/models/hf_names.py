"""Where each parameter lives in a Hugging Face checkpoint, per family, and how to convert it.

A `WeightEntry` ties one checkpoint tensor to one or more of our parameters (GPT-2's fused
`c_attn` holds q, k and v) with the conversions both ways. Layouts: torch `Linear` weights are
[out, in]; GPT-2's `Conv1D` weights are [in, out]; ours are [in..., out...] (see `layers.Dense`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from csd_jax.models.config import ModelConfig

Path = tuple[str | int, ...]
Arrays = tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class WeightEntry:
  hf_name: str
  paths: tuple[Path, ...]
  to_ours: Callable[[np.ndarray], Arrays]
  to_hf: Callable[[Arrays], np.ndarray]


def _same(path: Path, name: str) -> WeightEntry:
  return WeightEntry(name, (path,), lambda w: (w,), lambda ws: ws[0])


def _transposed(path: Path, name: str) -> WeightEntry:
  return WeightEntry(name, (path,), lambda w: (w.T,), lambda ws: ws[0].T)


def _linear_in(path: Path, name: str, heads: int, head_dim: int) -> WeightEntry:
  """torch Linear [heads * head_dim, D] <-> our kernel [D, heads, head_dim]."""
  return WeightEntry(name, (path,), lambda w: (w.T.reshape(-1, heads, head_dim),),
                     lambda ws: ws[0].reshape(ws[0].shape[0], -1).T)


def _linear_out(path: Path, name: str, heads: int, head_dim: int) -> WeightEntry:
  """torch Linear [D, heads * head_dim] <-> our kernel [heads, head_dim, D]."""
  return WeightEntry(name, (path,), lambda w: (w.T.reshape(heads, head_dim, -1),),
                     lambda ws: ws[0].reshape(heads * head_dim, -1).T)


def _head_bias(path: Path, name: str, heads: int, head_dim: int) -> WeightEntry:
  return WeightEntry(name, (path,), lambda b: (b.reshape(heads, head_dim),),
                     lambda bs: bs[0].reshape(-1))


def _llama_like(cfg: ModelConfig) -> list[WeightEntry]:
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  entries = [_same(("embed",), "model.embed_tokens.weight"),
             _same(("final_norm", "scale"), "model.norm.weight")]
  if not cfg.tie_word_embeddings:
    entries.append(_transposed(("lm_head",), "lm_head.weight"))
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}.", ("layers", i)
    attn = ours + ("attn",)
    entries += [
        _same(ours + ("attn_norm", "scale"), hf + "input_layernorm.weight"),
        _same(ours + ("mlp_norm", "scale"), hf + "post_attention_layernorm.weight"),
        _linear_in(attn + ("q", "kernel"), hf + "self_attn.q_proj.weight", n, h),
        _linear_in(attn + ("k", "kernel"), hf + "self_attn.k_proj.weight", k, h),
        _linear_in(attn + ("v", "kernel"), hf + "self_attn.v_proj.weight", k, h),
        _linear_out(attn + ("o", "kernel"), hf + "self_attn.o_proj.weight", n, h),
    ]
    if cfg.attention_bias:
      entries += [_head_bias(attn + (p, "bias"), hf + f"self_attn.{p}_proj.bias", heads, h)
                  for p, heads in (("q", n), ("k", k), ("v", k))]
    if cfg.output_bias:
      entries.append(_same(attn + ("o", "bias"), hf + "self_attn.o_proj.bias"))
    for proj in ("gate", "up", "down"):
      entries.append(_transposed(ours + ("mlp", proj, "kernel"), hf + f"mlp.{proj}_proj.weight"))
      if cfg.mlp_bias:
        entries.append(_same(ours + ("mlp", proj, "bias"), hf + f"mlp.{proj}_proj.bias"))
  return entries


def _gpt2(cfg: ModelConfig) -> list[WeightEntry]:
  n, h, d = cfg.num_heads, cfg.head_dim, cfg.hidden_size
  entries = [_same(("embed",), "transformer.wte.weight"),
             _same(("pos_embed",), "transformer.wpe.weight"),
             _same(("final_norm", "scale"), "transformer.ln_f.weight"),
             _same(("final_norm", "bias"), "transformer.ln_f.bias")]
  for i in range(cfg.num_layers):
    hf, ours = f"transformer.h.{i}.", ("layers", i)
    attn = ours + ("attn",)
    qkv = tuple(attn + (p, "kernel") for p in "qkv")
    qkv_bias = tuple(attn + (p, "bias") for p in "qkv")
    entries += [
        _same(ours + ("attn_norm", "scale"), hf + "ln_1.weight"),
        _same(ours + ("attn_norm", "bias"), hf + "ln_1.bias"),
        _same(ours + ("mlp_norm", "scale"), hf + "ln_2.weight"),
        _same(ours + ("mlp_norm", "bias"), hf + "ln_2.bias"),
        # Conv1D [D, 3D] = [q | k | v], each [D, N * H].
        WeightEntry(hf + "attn.c_attn.weight", qkv,
                    lambda w: tuple(p.reshape(d, n, h) for p in np.split(w, 3, axis=1)),
                    lambda ws: np.concatenate([p.reshape(d, -1) for p in ws], axis=1)),
        WeightEntry(hf + "attn.c_attn.bias", qkv_bias,
                    lambda b: tuple(p.reshape(n, h) for p in np.split(b, 3)),
                    lambda bs: np.concatenate([p.reshape(-1) for p in bs])),
        WeightEntry(hf + "attn.c_proj.weight", (attn + ("o", "kernel"),),
                    lambda w: (w.reshape(n, h, d),), lambda ws: ws[0].reshape(n * h, d)),
        _same(attn + ("o", "bias"), hf + "attn.c_proj.bias"),
        _same(ours + ("mlp", "up", "kernel"), hf + "mlp.c_fc.weight"),
        _same(ours + ("mlp", "up", "bias"), hf + "mlp.c_fc.bias"),
        _same(ours + ("mlp", "down", "kernel"), hf + "mlp.c_proj.weight"),
        _same(ours + ("mlp", "down", "bias"), hf + "mlp.c_proj.bias"),
    ]
  return entries


_MAPS = {"gpt2": _gpt2, "llama": _llama_like, "gemma": _llama_like}

# Checkpoint tensors that are buffers, not parameters: present in some files, never needed.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def weight_entries(cfg: ModelConfig) -> list[WeightEntry]:
  """Every checkpoint tensor of this configuration, with its parameters."""
  return _MAPS[cfg.family](cfg)


def canonical_name(cfg: ModelConfig, name: str) -> str:
  """Checkpoint names as `weight_entries` spells them (original GPT-2 files lack `transformer.`)."""
  if cfg.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
    return "transformer." + name
  return name
