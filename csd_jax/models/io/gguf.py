"""Convert a LLaMA-architecture GGUF file (llama.cpp) into a Hugging Face model directory.

`convert_gguf(gguf_path, out_dir)` writes config.json (model_type "llama",
LlamaForCausalLM), model.safetensors, generation_config.json and the tokenizer files (with
the chat template), so the result loads with the project's Hugging Face checkpoint I/O and with
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)`. It needs no torch: the `gguf`
package reads and dequantises the tensors, and the tokenizer comes from transformers' GGUF
tokenizer builder fed with metadata read by `gguf` (transformers' own GGUF entry points import
torch; see `_tokenizer`).

Quantised tensors (Q4_1, Q8_0, ...) are dequantised to float32 and then cast to `dtype`; the
result is exactly what transformers' own GGUF loader produces. llama.cpp's converter permutes
the rows of q_proj/k_proj (per head, from the rotary "half" layout to interleaved pairs); that
permutation is undone here. Tensors are converted one at a time, so peak memory is one
dequantised copy of the model plus the (memory-mapped) GGUF file. float32 metadata values
(rms_norm_eps, rope_theta) are written in their shortest decimal form (1e-05, not
9.999999747378752e-06); both denote the same float32.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys
import time
from typing import Any

import numpy as np

from csd_jax.errors import UserError

__all__ = ["SUPPORTED_DTYPES", "convert_gguf", "unpermute_rotary_rows"]

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")

_GGUF_MAGIC = b"GGUF"
_PROGRESS_AFTER_S = 3.0   # print progress only for conversions that take longer than this
_PROGRESS_EVERY = 32      # ... one line per this many tensors

# GGUF tensor name -> Hugging Face LlamaForCausalLM parameter name.
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
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
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


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


def _check_file(path: pathlib.Path) -> None:
  if not path.exists():
    raise UserError(f"GGUF file not found: {path}; pass the path of an existing .gguf file")
  if not path.is_file():
    raise UserError(f"not a GGUF file (not a regular file): {path}; pass a .gguf file")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != _GGUF_MAGIC:
    raise UserError(f"not a GGUF file (starts with {magic!r}, expected {_GGUF_MAGIC!r}): {path};"
                    " pass a llama.cpp .gguf file")


def _field(reader: Any, key: str, default: Any = None) -> Any:
  """A scalar or string metadata value (works with every gguf release >= 0.10)."""
  field = reader.fields.get(key)
  if field is None or not field.data:
    return default
  part = field.parts[field.data[0]]
  if field.types and field.types[-1].name == "STRING":
    return bytes(part).decode("utf-8")
  value = part.tolist()[0]
  if isinstance(value, float):   # float32 in the file: keep its shortest decimal form (1e-05)
    value = float(str(np.float32(value)))
  return value


def _hf_name(name: str) -> str | None:
  if name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[name]
  m = _BLOCK_RE.fullmatch(name)
  if m and m.group(2) in _BLOCK_NAMES:
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
  return None


def _target_dtype(dtype: str) -> np.dtype:
  if dtype not in SUPPORTED_DTYPES:
    raise UserError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {dtype!r}; "
                    "pass one of those")
  if dtype == "bfloat16":
    import ml_dtypes  # a jax dependency; numpy has no bfloat16 of its own
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


def _config(reader: Any, path: pathlib.Path, names: set[str], dtype: str) -> dict[str, Any]:
  arch = "llama"

  def need(key: str) -> Any:
    value = _field(reader, f"{arch}.{key}")
    if value is None:
      raise UserError(f"{path}: GGUF metadata lacks {arch}.{key}; convert a complete GGUF file"
                      " (as written by llama.cpp's convert_hf_to_gguf.py)")
    return value

  hidden = need("embedding_length")
  n_head = need("attention.head_count")
  n_kv = _field(reader, f"{arch}.attention.head_count_kv", n_head)
  head_dim = _field(reader, f"{arch}.attention.key_length", hidden // n_head)
  scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
  if scaling not in ("none", None) or "rope_freqs.weight" in names:
    raise UserError(f"{path}: RoPE scaling ({scaling!r}, rope_freqs) is not supported; convert "
                    "a model without RoPE scaling, or load its Hugging Face original")
  embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embd is None:
    raise UserError(f"{path}: GGUF file has no token_embd.weight tensor; convert a complete "
                    "LLaMA GGUF file")
  vocab = int(embd.shape[-1])   # ggml order: shape is [hidden, vocab]
  config: dict[str, Any] = {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": vocab,
      "hidden_size": hidden,
      "intermediate_size": need("feed_forward_length"),
      "num_hidden_layers": need("block_count"),
      "num_attention_heads": n_head,
      "num_key_value_heads": n_kv,
      "head_dim": head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": need("context_length"),
      "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
      "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
      "rope_scaling": None,
      "attention_bias": "blk.0.attn_q.bias" in names,
      "attention_dropout": 0.0,
      "mlp_bias": "blk.0.ffn_gate.bias" in names,
      "initializer_range": 0.02,
      "pretraining_tp": 1,
      "tie_word_embeddings": "output.weight" not in names,
      "use_cache": True,
      "torch_dtype": dtype,
  }
  for gguf_key, key in (("bos", "bos"), ("eos", "eos"), ("padding", "pad"), ("unknown", "unk")):
    value = _field(reader, f"tokenizer.ggml.{gguf_key}_token_id")
    if value is not None:
      config[f"{key}_token_id"] = value
  return config


def _metadata(reader: Any, prefix: str) -> dict[str, Any]:
  """The metadata under `prefix` as Python values (strings, numbers, lists of either)."""
  values = {}
  for key, field in reader.fields.items():
    if not key.startswith(prefix):
      continue
    kind = field.types[-1].name if field.types else ""
    items = [bytes(field.parts[i]).decode("utf-8") if kind == "STRING"
             else field.parts[i].tolist()[0] for i in field.data]
    values[key] = items if field.types[0].name == "ARRAY" else items[0]
  return values


def _tokenizer(path: pathlib.Path, reader: Any, context_length: int) -> Any:
  """The tokenizer the GGUF metadata describes, built the way transformers builds it, torch-free.

  `AutoTokenizer.from_pretrained(dir, gguf_file=...)` reads the GGUF metadata with a reader that
  imports torch (transformers 5.24 `integrations/gguf/reader.py`; older `load_gguf_checkpoint`
  refuses to run without torch), so it fails on a host without torch. Here the
  metadata comes from `gguf.GGUFReader` and goes to transformers' own GGUF tokenizer builder
  (the torch-free half of that path); the test suite checks the result equals AutoTokenizer's.
  On a transformers without that builder, fall back to AutoTokenizer (which needs torch).
  """
  try:
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                       convert_gguf_tokenizer)
  except ImportError:
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                        local_files_only=True)
  else:
    # what transformers' get_gguf_tokenizer does, minus its torch-importing metadata reader
    meta = _metadata(reader, "tokenizer.")
    if "tokenizer.ggml.tokens" not in meta:
      raise UserError(f"{path}: GGUF file has no tokenizer (tokenizer.ggml.tokens); convert a "
                      "GGUF file that embeds its tokenizer")
    groups = {group: {name: meta[f"tokenizer.{key}"] for key, name in renames.items()
                      if f"tokenizer.{key}" in meta}
              for group, renames in GGUF_TOKENIZER_MAPPING.items()}
    spec, init = groups["tokenizer"], groups["tokenizer_config"]
    if spec.get("tokenizer_type") == "llama":   # llama.cpp adds BOS to unflagged SPM vocabularies
      init.setdefault("add_bos_token", True)
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
      token_id = meta.get(f"tokenizer.ggml.{key}")
      init[name] = spec["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(_field(reader, "general.architecture"), spec)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **init, **extra)
  if not getattr(tok, "chat_template", None):
    template = _field(reader, "tokenizer.chat_template")
    if template:
      tok.chat_template = template
  if tok.model_max_length > 10**9:   # "no limit" sentinel: use the model's context length
    tok.model_max_length = context_length
  return tok


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: str = "float32") -> pathlib.Path:
  """Write a Hugging Face LLaMA directory for the GGUF file at `gguf_path`; return `out_dir`.

  `dtype` ("float32", "float16" or "bfloat16") is the dtype of the saved weights; quantised
  tensors are dequantised to float32 first. Raises UserError for a missing file, a file that is
  not GGUF, one whose architecture is not "llama" or one that lacks what a LLaMA model needs.
  """
  from gguf import GGUFReader
  from gguf.quants import dequantize
  from safetensors.numpy import save_file

  path = pathlib.Path(gguf_path)
  out = pathlib.Path(out_dir)
  target = _target_dtype(dtype)
  _check_file(path)
  try:
    reader = GGUFReader(path)
  except Exception as e:  # a GGUF magic but a corrupt or truncated body
    first_line = (str(e).splitlines() or [type(e).__name__])[0]
    raise UserError(f"cannot read GGUF file {path} ({first_line}); it is corrupt or cut short:"
                    " download it again") from e
  arch = _field(reader, "general.architecture")
  if arch != "llama":
    raise UserError(f"{path}: GGUF architecture is {arch!r}; only 'llama' is supported: pass a "
                    "LLaMA-architecture GGUF, or load the model's Hugging Face directory instead")

  names = {t.name for t in reader.tensors}
  unknown = sorted(n for n in names if _hf_name(n) is None)
  if unknown:
    raise UserError(f"{path}: unexpected tensors for a llama model: {', '.join(unknown[:5])}; "
                    "pass a plain LLaMA-architecture GGUF")
  config = _config(reader, path, names, dtype)
  # the tokenizer first: it fails fast, before the long part
  tokenizer = _tokenizer(path, reader, config["max_position_embeddings"])

  heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
  tensors: dict[str, np.ndarray] = {}
  start = time.monotonic()
  for i, t in enumerate(reader.tensors, 1):
    name = _hf_name(t.name)
    try:
      w = dequantize(t.data, t.tensor_type)   # numpy (row-major) order: [out, in] like HF
    except NotImplementedError as e:
      raise UserError(f"{path}: {t.name} is {t.tensor_type.name}, which the installed gguf "
                      "package cannot dequantise; convert a GGUF quantised otherwise (Q8_0, F16,"
                      " ...) or upgrade gguf") from e
    kind = t.name.split(".")[-2]            # blk.N.<kind>.weight
    if kind in heads:
      w = unpermute_rotary_rows(w, heads[kind])
    tensors[name] = np.ascontiguousarray(w, dtype=target)
    del w
    elapsed = time.monotonic() - start
    if elapsed > _PROGRESS_AFTER_S and (i % _PROGRESS_EVERY == 0 or i == len(reader.tensors)):
      print(f"convert_gguf: {i}/{len(reader.tensors)} tensors ({elapsed:.0f}s)",
            file=sys.stderr, flush=True)

  out.mkdir(parents=True, exist_ok=True)
  save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
  del tensors
  (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if k in config}
  (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  tokenizer.save_pretrained(out)
  return out
