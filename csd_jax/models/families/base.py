"""What a model family is, and the pieces its module is built from.

A family module (`csd_jax/models/families/<name>.py`) defines one `FAMILY = Family(...)`: its
transformers `model_type` and architecture class, how a `config.json` maps to `ModelConfig`
fields (refusing the switches the port does not implement), and where each parameter lives in
its checkpoint. Everything a family shares with others (the weight-name helpers, the LLaMA-style
layer map, the config readers) lives here.

Layouts: torch `Linear` weights are [out, in]; GPT-2's `Conv1D` weights are [in, out]; ours are
[in..., out...] (see `layers.Dense`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from csd_jax.errors import UserError
from csd_jax.models.config import FULL, SLIDING, ModelConfig

Path = tuple[str | int, ...]
Arrays = tuple[np.ndarray, ...]
HFConfig = Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class WeightEntry:
  """One checkpoint tensor and the parameter(s) it holds, with the conversions both ways."""

  hf_name: str
  paths: tuple[Path, ...]
  to_ours: Callable[[np.ndarray], Arrays]
  to_hf: Callable[[Arrays], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Family:
  """A model family: a transformers `model_type` and everything needed to port it.

  Attributes:
    model_type: transformers' `model_type` (the key of the registry).
    architecture: the `*ForCausalLM` class written into an exported config.json.
    config_fields: `config.json` dict -> `ModelConfig` fields (all but the common ones:
      vocab_size, token ids, dtypes); raises `UserError` for switches the port lacks.
    weights: `ModelConfig` -> every checkpoint tensor of the model.
    canonical_name: a checkpoint tensor name as `weights` spells it (some files use prefixes).
  """

  model_type: str
  architecture: str
  config_fields: Callable[[HFConfig], dict[str, Any]]
  weights: Callable[[ModelConfig], list[WeightEntry]]
  canonical_name: Callable[[str], str] = lambda name: name


# ---------------------------------------------------------------------------------------------
# Reading config.json
# ---------------------------------------------------------------------------------------------


def get(hf: HFConfig, *names: str, default: Any = None) -> Any:
  """The first of `names` set (not None) in `hf`, else `default`."""
  for name in names:
    if hf.get(name) is not None:
      return hf[name]
  return default


def refuse(hf: HFConfig, message: str) -> UserError:
  return UserError(f"{hf.get('model_type')} config: {message}")


def _divisors_near(n: int, near: int) -> str:
  """The divisors of `n` closest to `near` (at most three, ascending), for a hint."""
  divisors = sorted((d for d in range(1, n + 1) if n % d == 0), key=lambda d: (abs(d - near), d))
  return ", ".join(str(d) for d in sorted(divisors[:3]))


def check_heads(hf: HFConfig, *, hidden: str, heads: str, kv_heads: str | None = None,
                head_dim: str | None = None) -> None:
  """The attention shape adds up: `heads` divides `hidden` (unless the config gives `head_dim`:
  then heads x head_dim need not equal it), and `kv_heads` (grouped-query attention) divides
  `heads`. Otherwise the model trains with a cut head and transformers refuses the export.

  Raises:
    UserError: naming the keys and valid values.
  """
  optional = [key for key in (kv_heads, head_dim) if key and hf.get(key) is not None]
  for key in (hidden, heads, *optional):
    value = hf[key]   # a missing hidden / heads key: config_from_hf names it
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
      raise refuse(hf, f"{key}={value!r}: must be a positive integer")
  n = hf[heads]
  if head_dim not in optional and hf[hidden] % n:
    raise refuse(hf, f"{heads}={n} does not divide {hidden}={hf[hidden]} (each head gets "
                 f"{hidden} / {heads} dimensions); use {heads} = one of "
                 f"{_divisors_near(hf[hidden], n)}")
  k = hf.get(kv_heads) if kv_heads else None
  if k is not None and n % k:
    raise refuse(hf, f"{kv_heads}={k} does not divide {heads}={n} (each key / value head serves "
                 f"a group of query heads); use {kv_heads} = one of {_divisors_near(n, k)}")


def rope_parameters(hf: HFConfig, layer_type: str = FULL) -> tuple[float | None, dict | None]:
  """(rope_theta or None when unset, rope_scaling or None) of a layer type, in transformers 4
  or 5 layout.

  transformers 4 keeps `rope_theta` and `rope_scaling` at the top level; 5 moves them into
  `rope_parameters`, which holds one dict per layer type for models whose layers differ
  (Gemma 3). The top level applies to full-attention layers only.
  """
  params = hf.get("rope_parameters") or {}
  if isinstance(params.get(layer_type), Mapping):
    params = params[layer_type]
  elif any(isinstance(v, Mapping) for v in params.values()) or layer_type != FULL:
    params = {}
  theta = params.get("rope_theta")
  scaling = dict(params)
  if layer_type == FULL:
    theta = get(hf, "rope_theta", default=theta)
    scaling = dict(hf.get("rope_scaling") or scaling)
  kind = get(scaling, "rope_type", "type", default="default")
  if kind not in ("default", "linear", "llama3"):
    raise refuse(hf, f"rope type {kind!r} is not implemented (supported: default, linear, "
                 "llama3); use a model without it")
  return (None if theta is None else float(theta)), (None if kind == "default" else scaling)


def layer_types(hf: HFConfig, num_layers: int, default: tuple[str, ...]) -> tuple[str, ...]:
  """`layer_types` from the config, or the family's `default` pattern; checked."""
  types = tuple(hf.get("layer_types") or default)
  if len(types) != num_layers or set(types) - {FULL, SLIDING}:
    raise refuse(hf, f"layer_types {list(types)} must list {FULL!r} or {SLIDING!r} for each of "
                 f"the {num_layers} layers")
  return types


def llama_fields(hf: HFConfig) -> dict[str, Any]:
  """The fields every LLaMA-style config spells the same way."""
  check_heads(hf, hidden="hidden_size", heads="num_attention_heads",
              kv_heads="num_key_value_heads", head_dim="head_dim")
  heads = hf["num_attention_heads"]
  bias = bool(hf.get("attention_bias", False))
  theta, scaling = rope_parameters(hf)
  return dict(
      hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"], num_heads=heads,
      num_kv_heads=get(hf, "num_key_value_heads", default=heads),
      head_dim=get(hf, "head_dim", default=hf["hidden_size"] // heads),
      intermediate_size=hf["intermediate_size"], norm_eps=get(hf, "rms_norm_eps", default=1e-6),
      activation=get(hf, "hidden_act", default="silu"),
      max_position_embeddings=get(hf, "max_position_embeddings", default=2048),
      rope_theta=10000.0 if theta is None else theta, rope_scaling=scaling,
      attention_bias=bias, output_bias=bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      attention_dropout=float(hf.get("attention_dropout") or 0.0))


def refuse_qwen_sliding_window(hf: HFConfig) -> None:
  """Qwen2/3 configs carry a `sliding_window` that applies only when `use_sliding_window`."""
  if hf.get("use_sliding_window"):
    raise refuse(hf, "use_sliding_window=true (sliding attention above max_window_layers) is "
                 "not implemented; use a checkpoint with use_sliding_window false")


# ---------------------------------------------------------------------------------------------
# Weight names
# ---------------------------------------------------------------------------------------------


def same(path: Path, name: str) -> WeightEntry:
  return WeightEntry(name, (path,), lambda w: (w,), lambda ws: ws[0])


def transposed(path: Path, name: str) -> WeightEntry:
  return WeightEntry(name, (path,), lambda w: (w.T,), lambda ws: ws[0].T)


def linear_in(path: Path, name: str, heads: int, head_dim: int) -> WeightEntry:
  """torch Linear [heads * head_dim, D] <-> our kernel [D, heads, head_dim]."""
  return WeightEntry(name, (path,), lambda w: (w.T.reshape(-1, heads, head_dim),),
                     lambda ws: ws[0].reshape(ws[0].shape[0], -1).T)


def linear_out(path: Path, name: str, heads: int, head_dim: int) -> WeightEntry:
  """torch Linear [D, heads * head_dim] <-> our kernel [heads, head_dim, D]."""
  return WeightEntry(name, (path,), lambda w: (w.T.reshape(heads, head_dim, -1),),
                     lambda ws: ws[0].reshape(heads * head_dim, -1).T)


def head_bias(path: Path, name: str, heads: int, head_dim: int) -> WeightEntry:
  return WeightEntry(name, (path,), lambda b: (b.reshape(heads, head_dim),),
                     lambda bs: bs[0].reshape(-1))


# Where the norms of a LLaMA-style layer are stored. LLaMA's `post_attention_layernorm` is the
# norm before the MLP; Gemma 2/3 use that name for the norm *after* attention and call the one
# before the MLP `pre_feedforward_layernorm`.
LLAMA_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
SANDWICH_NORMS = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
                  "mlp_norm": "pre_feedforward_layernorm",
                  "post_mlp_norm": "post_feedforward_layernorm"}


def llama_weights(cfg: ModelConfig, norms: Mapping[str, str] = LLAMA_NORMS) -> list[WeightEntry]:
  """The checkpoint map of a LLaMA-style model (`model.layers.{i}.self_attn.q_proj`, ...)."""
  n, k, h = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  entries = [same(("embed",), "model.embed_tokens.weight"),
             same(("final_norm", "scale"), "model.norm.weight")]
  if not cfg.tie_word_embeddings:
    entries.append(transposed(("lm_head",), "lm_head.weight"))
  for i in range(cfg.num_layers):
    hf, ours = f"model.layers.{i}.", ("layers", i)
    attn = ours + ("attn",)
    entries += [same(ours + (our_norm, "scale"), hf + f"{name}.weight")
                for our_norm, name in norms.items()]
    entries += [
        linear_in(attn + ("q", "kernel"), hf + "self_attn.q_proj.weight", n, h),
        linear_in(attn + ("k", "kernel"), hf + "self_attn.k_proj.weight", k, h),
        linear_in(attn + ("v", "kernel"), hf + "self_attn.v_proj.weight", k, h),
        linear_out(attn + ("o", "kernel"), hf + "self_attn.o_proj.weight", n, h),
    ]
    if cfg.qk_norm:
      entries += [same(attn + (f"{p}_norm", "scale"), hf + f"self_attn.{p}_norm.weight")
                  for p in "qk"]
    if cfg.attention_bias:
      entries += [head_bias(attn + (p, "bias"), hf + f"self_attn.{p}_proj.bias", heads, h)
                  for p, heads in (("q", n), ("k", k), ("v", k))]
    if cfg.output_bias:
      entries.append(same(attn + ("o", "bias"), hf + "self_attn.o_proj.bias"))
    for proj in ("gate", "up", "down"):
      entries.append(transposed(ours + ("mlp", proj, "kernel"), hf + f"mlp.{proj}_proj.weight"))
      if cfg.mlp_bias:
        entries.append(same(ours + ("mlp", proj, "bias"), hf + f"mlp.{proj}_proj.bias"))
  return entries
