"""A smaller student from a teacher checkpoint: keep a few of its layers (layer-dropped init).

`layer_dropped_copy(src, out, layers)` writes a Hugging Face directory whose model has only
`layers` of `src` (in that order), with everything else (embeddings, final norm, head,
tokenizer files) copied, and the config's per-layer lists (`layer_types`: which layers slide)
cut to the kept layers. Tensors are read and written one at a time.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from collections.abc import Sequence

from csd_jax.errors import UserError
from csd_jax.models.io.safetensors import SafetensorsCheckpoint, write_sharded

_LAYER = re.compile(r"^(.*?\b(?:layers|h))\.(\d+)\.(.*)$")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer")
_PER_LAYER_KEYS = ("layer_types",)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja",
                    "generation_config.json")


def layer_dropped_copy(src: str | os.PathLike, out: str | os.PathLike,
                       layers: Sequence[int]) -> pathlib.Path:
  """Write `out`: the model of `src` with only `layers` kept (renumbered 0..k-1).

  Raises:
    UserError: a layer index outside the source model, or a repeated one.
  """
  src, out = pathlib.Path(src), pathlib.Path(out)
  config = json.loads((src / "config.json").read_text())
  count_key = next(k for k in _LAYER_COUNT_KEYS if k in config)
  total = config[count_key]
  if not layers or any(not 0 <= i < total for i in layers) or len(set(layers)) != len(layers):
    raise UserError(f"layers {list(layers)}: pick distinct indices in 0..{total - 1}")
  new_index = {old: new for new, old in enumerate(layers)}
  checkpoint = SafetensorsCheckpoint(src)

  def tensors():
    for name in checkpoint.names():
      match = _LAYER.match(name)
      if match is None:
        yield name, checkpoint.read(name)
      elif int(match.group(2)) in new_index:
        yield (f"{match.group(1)}.{new_index[int(match.group(2))]}.{match.group(3)}",
               checkpoint.read(name))

  out.mkdir(parents=True, exist_ok=True)
  write_sharded(out, tensors(), max_shard_bytes=5 * 2**30)
  config[count_key] = len(layers)
  for key in _PER_LAYER_KEYS:
    if isinstance(config.get(key), list) and len(config[key]) == total:
      config[key] = [config[key][i] for i in layers]
  (out / "config.json").write_text(json.dumps(config, indent=2))
  for name in _TOKENIZER_FILES:
    if (src / name).exists():
      shutil.copy(src / name, out / name)
  return out
