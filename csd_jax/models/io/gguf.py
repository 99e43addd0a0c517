"""Convert a GGUF file (llama.cpp) into a Hugging Face model directory, without torch.

`convert_gguf(gguf_path, out_dir)` writes config.json, model.safetensors,
generation_config.json and the tokenizer files (with the chat template), so the result loads
with the project's Hugging Face checkpoint I/O and with
`transformers.AutoModelForCausalLM.from_pretrained(out_dir)`. Architectures: `llama`
(LlamaForCausalLM) and `gemma3` (Gemma3ForCausalLM, model_type "gemma3_text"); what differs
between them (tensor names, config fields, llama.cpp's tensor changes to undo) lives in
`gguf_archs`. The `gguf` package reads and dequantises the tensors, and the tokenizer comes from
transformers' GGUF tokenizer builder fed with metadata read by `gguf` (transformers' own GGUF
entry points import torch; see `_tokenizer`).

Quantised tensors (Q4_1, Q4_K, Q6_K, Q8_0, ...) are dequantised to float32, fixed up and then
cast to `dtype`; the result is what transformers' own GGUF loader produces. Tensors are
converted one at a time, so peak memory is one dequantised copy of the model plus the
(memory-mapped) GGUF file. float32 metadata values (rms_norm_eps, rope_theta) are written in
their shortest decimal form (1e-05, not 9.999999747378752e-06); both denote the same float32.
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
from csd_jax.models.io.gguf_archs import ARCHS, GGUFArch, unpermute_rotary_rows

__all__ = ["SUPPORTED_DTYPES", "convert_gguf", "unpermute_rotary_rows"]

SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")

_GGUF_MAGIC = b"GGUF"
_PROGRESS_AFTER_S = 3.0   # print progress only for conversions that take longer than this
_PROGRESS_EVERY = 32      # ... one line per this many tensors

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


_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def _hf_name(arch: GGUFArch, name: str) -> tuple[str, str] | None:
  """(HF name, kind) of a GGUF tensor name: kind is `attn_q`, `output_norm`, ..."""
  if name in arch.global_names:
    return arch.global_names[name], name.rsplit(".", 1)[0]
  m = _BLOCK_RE.fullmatch(name)
  if m and m.group(2) in arch.block_names:
    return f"model.layers.{m.group(1)}.{arch.block_names[m.group(2)]}.{m.group(3)}", m.group(2)
  return None


def _target_dtype(dtype: str) -> np.dtype:
  if dtype not in SUPPORTED_DTYPES:
    raise UserError(f"dtype must be one of {', '.join(SUPPORTED_DTYPES)}, got {dtype!r}; "
                    "pass one of those")
  if dtype == "bfloat16":
    import ml_dtypes  # a jax dependency; numpy has no bfloat16 of its own
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(dtype)


def _config(reader: Any, path: pathlib.Path, arch: GGUFArch, names: set[str],
            dtype: str) -> dict[str, Any]:
  embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
  if embd is None:
    raise UserError(f"{path}: GGUF file has no token_embd.weight tensor; convert a complete "
                    "GGUF model file")
  vocab = int(embd.shape[-1])   # ggml order: shape is [hidden, vocab]
  try:
    config = arch.config(lambda key, default=None: _field(reader, key, default), names, vocab,
                         dtype)
  except UserError as e:
    raise UserError(f"{path}: {e}") from None
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


def _generation_config(config: dict[str, Any], tokenizer: Any, arch: GGUFArch) -> dict[str, Any]:
  generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                if k in config}
  turn = tokenizer.convert_tokens_to_ids(arch.end_of_turn) if arch.end_of_turn else None
  if turn is not None and turn != tokenizer.unk_token_id and "eos_token_id" in generation:
    generation["eos_token_id"] = [generation["eos_token_id"], turn]   # as Gemma's own files
  return generation


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 dtype: str = "float32") -> pathlib.Path:
  """Write a Hugging Face directory for the GGUF file at `gguf_path`; return `out_dir`.

  `dtype` ("float32", "float16" or "bfloat16") is the dtype of the saved weights; quantised
  tensors are dequantised to float32 first. Raises UserError for a missing file, a file that is
  not GGUF, one whose architecture is not supported ("llama", "gemma3") or one that lacks what
  its architecture needs.
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
  arch_name = _field(reader, "general.architecture")
  if arch_name not in ARCHS:
    supported = ", ".join(repr(a) for a in ARCHS)
    raise UserError(f"{path}: GGUF architecture is {arch_name!r} (supported: {supported}); pass "
                    "a GGUF of one of those, or load the model's Hugging Face directory instead")
  arch = ARCHS[arch_name]

  names = {t.name for t in reader.tensors}
  unknown = sorted(n for n in names if _hf_name(arch, n) is None)
  if unknown:
    raise UserError(f"{path}: unexpected tensors for a {arch_name} model: "
                    f"{', '.join(unknown[:5])}; pass a plain {arch_name}-architecture GGUF")
  config = _config(reader, path, arch, names, dtype)
  # the tokenizer first: it fails fast, before the long part
  tokenizer = _tokenizer(path, reader, config["max_position_embeddings"])
  if not getattr(tokenizer, "chat_template", None) and arch.chat_template:
    tokenizer.chat_template = arch.chat_template

  tensors: dict[str, np.ndarray] = {}
  start = time.monotonic()
  for i, t in enumerate(reader.tensors, 1):
    name, kind = _hf_name(arch, t.name)
    try:
      w = dequantize(t.data, t.tensor_type)   # numpy (row-major) order: [out, in] like HF
    except NotImplementedError as e:
      raise UserError(f"{path}: {t.name} is {t.tensor_type.name}, which the installed gguf "
                      "package cannot dequantise; convert a GGUF quantised otherwise (Q8_0, F16,"
                      " ...) or upgrade gguf") from e
    w = arch.fix(kind, np.asarray(w, np.float32), config)
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
  generation = _generation_config(config, tokenizer, arch)
  (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
  tokenizer.save_pretrained(out)
  return out
