"""Hugging Face checkpoints <-> NNX models: load, random init, save.

`load_pretrained` reads `config.json` and the safetensors weights one tensor at a time, straight
into (sharded) device arrays; `init_random` builds a random model from a transformers config,
born sharded; `save_pretrained` writes a directory that
`transformers.AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from csd_jax.errors import UserError
from csd_jax.models.config import ModelConfig
from csd_jax.models.families import (IGNORED_SUFFIXES, architecture, canonical_name,
                                     config_from_hf, weight_entries)
from csd_jax.models.io import hub
from csd_jax.models.io.safetensors import SafetensorsCheckpoint, write_sharded
from csd_jax.models.lora import LoraParam, merge_lora
from csd_jax.models.transformer import CausalLM
from csd_jax.runtime.sharding import state_shardings

MAX_SHARD_BYTES = 5 * 2**30


def resolve_model_dir(path_or_hub_id: str | os.PathLike) -> pathlib.Path:
  """A local model directory, or a hub id's cached snapshot (`csd_jax.models.io.hub.resolve`:
  a local path always wins; downloaded when online and not cached).

  Raises:
    UserError: neither a local model directory nor a hub id that resolves (named).
  """
  path = pathlib.Path(hub.resolve(path_or_hub_id))   # a local path: unchanged
  if path.is_dir():
    if not (path / "config.json").exists():
      source = "" if str(path) == str(path_or_hub_id) else f" ({path_or_hub_id})"
      raise UserError(f"{path}{source} has no config.json: not a Hugging Face model "
                      "directory; pass a directory with config.json and *.safetensors")
    return path
  raise UserError(f"{path} is not a model directory; pass a Hugging Face model directory "
                  "(config.json and *.safetensors) or a hub id (owner/name[@revision])")


def _abstract(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
  return nnx.split(nnx.eval_shape(lambda: CausalLM(cfg, nnx.Rngs(0))))


def init_random(hf_config: Any, seed: int = 0, *, dtype: Any = jnp.float32,
                param_dtype: Any = None, mesh: Mesh | None = None,
                rules: Mapping[str, Sequence[str]] | None = None, **overrides: Any) -> CausalLM:
  """A randomly initialised model for a transformers config (dict or `PretrainedConfig`),
  born sharded over `mesh` when one is given (by `rules`, default
  `csd_jax.runtime.sharding.RULES`)."""
  cfg = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, **overrides)
  graphdef, abstract = _abstract(cfg)

  def create() -> nnx.State:
    return nnx.state(CausalLM(cfg, nnx.Rngs(seed)))

  shardings = state_shardings(abstract, mesh, rules) if mesh is not None else None
  state = jax.jit(create, out_shardings=shardings)()
  return nnx.merge(graphdef, state)


def abstract_model(hf_config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                   mesh: Mesh | None = None, rules: Mapping[str, Sequence[str]] | None = None,
                   **overrides: Any) -> CausalLM:
  """A model of a transformers config's shapes whose variables are `jax.ShapeDtypeStruct`s,
  carrying the shardings `init_random` / `load_pretrained` would give them on `mesh`: nothing is
  allocated (what `csd-jax compile` lowers a run's programs with)."""
  cfg = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, **overrides)
  graphdef, abstract = _abstract(cfg)
  if mesh is not None:
    variables = dict(nnx.to_flat_state(abstract))
    for path, sharding in nnx.to_flat_state(state_shardings(abstract, mesh, rules)):
      value = variables[path].get_value()
      variables[path].set_value(jax.ShapeDtypeStruct(value.shape, value.dtype,
                                                     sharding=sharding))
    abstract = nnx.from_flat_state(variables)
  return nnx.merge(graphdef, abstract)


def _place(array: np.ndarray, sharding: Any) -> jax.Array:
  if sharding is None:
    return jnp.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def load_pretrained(path_or_hub_id: str | os.PathLike, *, dtype: Any = jnp.float32,
                    param_dtype: Any = None, mesh: Mesh | None = None,
                    rules: Mapping[str, Sequence[str]] | None = None,
                    **overrides: Any) -> CausalLM:
  """A model from a Hugging Face directory (config.json + safetensors) or hub id.

  Args:
    dtype: compute dtype. param_dtype: storage dtype (default float32).
    mesh: place each parameter straight into its sharded array.
    rules: logical axis -> mesh axes (default `csd_jax.runtime.sharding.RULES`).
    **overrides: `ModelConfig` fields (`remat`, `attention_impl`, ...).

  Raises:
    UserError: no model there; unsupported model_type; missing, unexpected or mis-shaped
      tensors (named).
  """
  directory = resolve_model_dir(path_or_hub_id)
  try:
    hf_config = json.loads((directory / "config.json").read_text())
  except json.JSONDecodeError as error:
    raise UserError(f"{directory / 'config.json'}: not valid JSON ({error.msg}, line "
                    f"{error.lineno}); fix or replace the model's config.json") from error
  cfg = config_from_hf(hf_config, dtype=dtype, param_dtype=param_dtype, **overrides)
  graphdef, abstract = _abstract(cfg)
  variables = dict(nnx.to_flat_state(abstract))
  shardings = (dict(nnx.to_flat_state(state_shardings(abstract, mesh, rules)))
               if mesh is not None else {})
  checkpoint = SafetensorsCheckpoint(directory)
  available = {canonical_name(cfg, n): n for n in checkpoint.names()}
  entries = weight_entries(cfg)
  needed = {e.hf_name for e in entries}
  missing = sorted(needed - set(available))
  unexpected = sorted(n for n in set(available) - needed if not n.endswith(IGNORED_SUFFIXES)
                      and not (cfg.tie_word_embeddings and n == "lm_head.weight"))
  if missing or unexpected:
    raise UserError(f"{directory}: checkpoint does not fit the {cfg.family} config: "
                    f"missing {missing[:8] or 'none'}{' ...' if len(missing) > 8 else ''}; "
                    f"unexpected {unexpected[:8] or 'none'}"
                    f"{' ...' if len(unexpected) > 8 else ''}; pass a directory whose "
                    "config.json and safetensors belong together")
  _init_adapters(variables, {p for e in entries for p in e.paths}, shardings, cfg)
  for entry in entries:
    parts = entry.to_ours(checkpoint.read(available[entry.hf_name]))
    for path, part in zip(entry.paths, parts, strict=True):
      variable = variables[path]
      expected = variable.get_value().shape
      if part.shape != expected:
        raise UserError(f"{directory}: {entry.hf_name}: shape "
                        f"{checkpoint.shape(available[entry.hf_name])} does not fit the config "
                        f"(expected {expected} for {path}); pass a directory whose config.json "
                        "and safetensors belong together")
      variable.set_value(_place(part.astype(cfg.param_dtype), shardings.get(path)))
  return nnx.merge(graphdef, nnx.from_flat_state(variables))


def _init_adapters(variables: dict, loaded: set, shardings: dict, cfg: ModelConfig) -> None:
  """LoRA adapters are not in the checkpoint: A random (scaled by 1/sqrt(fan-in)), B zero."""
  for index, (path, variable) in enumerate(sorted(variables.items(), key=lambda kv: str(kv[0]))):
    if path in loaded:
      continue
    if not isinstance(variable, LoraParam):
      raise AssertionError(f"{path} is neither in the checkpoint map nor a LoRA adapter")
    shape = variable.get_value().shape
    if path[-1] == "lora_b":
      value = np.zeros(shape, np.float32)
    else:
      rng = np.random.default_rng([cfg.lora_rank, index])
      value = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32)
    variable.set_value(_place(value.astype(cfg.param_dtype), shardings.get(path)))


def hf_config_of(cfg: ModelConfig) -> dict[str, Any]:
  """The transformers config.json of a model (its original one, with architectures and dtype)."""
  out = dict(cfg.hf_config)
  out.setdefault("architectures", [architecture(cfg)])
  out["model_type"] = cfg.family
  out["torch_dtype"] = out["dtype"] = jnp.dtype(cfg.param_dtype).name
  return out


def save_pretrained(model: CausalLM, path: str | os.PathLike, tokenizer: Any = None, *,
                    max_shard_bytes: int = MAX_SHARD_BYTES) -> pathlib.Path:
  """Write config.json and safetensors (sharded above `max_shard_bytes`) and the tokenizer.

  LoRA adapters are merged into the kernels of a copy first: the files hold a plain model.
  """
  if any(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(nnx.state(model))):
    model = merge_lora(nnx.clone(model))
  cfg = model.cfg
  directory = pathlib.Path(path)
  directory.mkdir(parents=True, exist_ok=True)
  variables = dict(nnx.to_flat_state(nnx.state(model)))

  def tensors():
    for entry in weight_entries(cfg):
      ours = tuple(np.asarray(jax.device_get(variables[p].get_value())) for p in entry.paths)
      yield entry.hf_name, entry.to_hf(ours)

  write_sharded(directory, tensors(), max_shard_bytes)
  (directory / "config.json").write_text(json.dumps(hf_config_of(cfg), indent=2, default=str))
  if tokenizer is not None:
    tokenizer.save_pretrained(directory)
  return directory
