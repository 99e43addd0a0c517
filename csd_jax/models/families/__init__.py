"""The model families, one module each, found by their `FAMILY` (see `base.Family`).

Adding a family is adding one module here (and its parity test): `config_from_hf`, the weight
map and the exported architecture all come from the registry below.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import jax.numpy as jnp

from csd_jax.errors import UserError
from csd_jax.models.config import ModelConfig
from csd_jax.models.families.base import Family, WeightEntry

# Checkpoint tensors that are buffers, not parameters: present in some files, never needed.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def _discover() -> dict[str, Family]:
  found = {}
  for info in pkgutil.iter_modules(__path__):
    if info.name != "base":
      family = importlib.import_module(f"{__name__}.{info.name}").FAMILY
      found[family.model_type] = family
  return dict(sorted(found.items()))


class IncompleteConfig(UserError):
  """A transformers config that lacks a key its family needs (named in the message)."""


FAMILIES: dict[str, Family] = _discover()
SUPPORTED_FAMILIES = tuple(FAMILIES)


def family(model_type: str) -> Family:
  """The family of a transformers `model_type`.

  Raises:
    UserError: not a supported family (naming the supported ones).
  """
  if model_type not in FAMILIES:
    raise UserError(f"unsupported model_type {model_type!r}; supported families: "
                    f"{', '.join(SUPPORTED_FAMILIES)} (pass a model of one of those)")
  return FAMILIES[model_type]


def config_from_hf(hf_config: Any, *, dtype: Any = jnp.float32, param_dtype: Any = None,
                   **overrides: Any) -> ModelConfig:
  """A `ModelConfig` from a transformers config (dict, `PretrainedConfig` or its JSON dict).

  Raises:
    IncompleteConfig: a key the family needs is missing.
    UserError: an unsupported `model_type`, or a setting of it the port does not implement.
  """
  hf = dict(hf_config.to_dict() if hasattr(hf_config, "to_dict") else hf_config)
  model = family(hf.get("model_type"))
  try:   # the readers index the keys every config of the family has
    fields = model.config_fields(hf)
    vocab_size = hf["vocab_size"]
  except KeyError as error:
    raise IncompleteConfig(f"{model.model_type} config: no {error.args[0]!r}; add it (a "
                           f"{model.architecture} config.json has it)") from None
  cfg = ModelConfig(
      family=hf["model_type"], vocab_size=vocab_size, bos_token_id=hf.get("bos_token_id"),
      eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
      final_logit_softcap=hf.get("final_logit_softcapping"), dtype=dtype,
      param_dtype=param_dtype or jnp.float32, hf_config=hf, **fields)
  return cfg.replace(**overrides) if overrides else cfg


def weight_entries(cfg: ModelConfig) -> list[WeightEntry]:
  """Every checkpoint tensor of this configuration, with its parameters."""
  return FAMILIES[cfg.family].weights(cfg)


def canonical_name(cfg: ModelConfig, name: str) -> str:
  """A checkpoint tensor name as `weight_entries` spells it."""
  return FAMILIES[cfg.family].canonical_name(name)


def architecture(cfg: ModelConfig) -> str:
  """The transformers class an exported config.json names."""
  return FAMILIES[cfg.family].architecture
