"""A `Config` from a YAML file and dotted `key=value` overrides, every key checked.

    config = load_config("configs/tiny.yaml", ["train.steps=20", "loss.name=fkl"])

An unknown key fails with the closest valid ones, a value of the wrong type fails naming the key
and the type expected, and `checks.check` then tests the values. `to_dict(config)` gives back
plain YAML-able data (the resolved config written to `W/config.yaml`).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from csd_jax.config.checks import check
from csd_jax.config.schema import CHOICES, FREE_DICTS, RENAMED, Config, ConfigError
from csd_jax.runtime import paths


def _closest(key: str, valid: Sequence[str]) -> str:
  close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
  return f"did you mean {', '.join(close)}?" if close else f"valid: {', '.join(valid)}"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
  """`value` as the field's type (a YAML scalar from the command line may be a string)."""
  union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
  options = typing.get_args(annotation) if union else (annotation,)
  if value is None and type(None) in options:
    return None
  errors = []
  for option in (o for o in options if o is not type(None)):
    try:
      if option is bool:
        if isinstance(value, bool):
          return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
          return value.lower() == "true"
        raise TypeError
      if option is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
          raise TypeError
        return int(value)
      if option is float:
        if isinstance(value, bool):
          raise TypeError
        return float(value)
      if option is str:
        if isinstance(value, (dict, list)):
          raise TypeError
        return str(value)
      if option in (dict, list):
        if not isinstance(value, option):
          raise TypeError
        return value
    except (TypeError, ValueError):
      errors.append(getattr(option, "__name__", str(option)))
  raise ConfigError(f"{key}={value!r}: expected {' or '.join(errors)}")


def _section(hint: Any) -> type | None:
  """The config section class of a field's type (`ModelSpec` of `ModelSpec | None`), or None
  for a plain value."""
  if dataclasses.is_dataclass(hint):
    return hint
  union = typing.get_origin(hint) in (typing.Union, types.UnionType)
  return next((o for o in typing.get_args(hint) if dataclasses.is_dataclass(o)), None) if union \
      else None


def _build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
  if not isinstance(data, Mapping):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
  hints = typing.get_type_hints(cls)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = [k for k in data if k not in fields]
  if unknown and prefix + unknown[0] in RENAMED:
    raise ConfigError(f"config key {prefix + unknown[0]!r} was renamed "
                      f"{RENAMED[prefix + unknown[0]]}")
  if unknown:
    valid = [prefix + name for name in fields]
    raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; "
                      f"{_closest(prefix + unknown[0], valid)}")
  values = {}
  for name, value in data.items():
    key = prefix + name
    hint = hints[name]
    section = _section(hint)
    if section is not None and value is None and hint is not section:  # an optional section
      values[name] = None
    elif section is not None:
      values[name] = _build(section, value, key + ".")
    else:
      values[name] = _coerce(key, value, hint)
      if key in CHOICES and values[name] not in CHOICES[key]:
        raise ConfigError(f"{key}={values[name]!r}: valid: {', '.join(CHOICES[key])}")
  try:
    return cls(**values)
  except ValueError as error:   # a section that checks itself (Sampling): name the section
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {error}") from error


def to_dict(config: Any) -> dict[str, Any]:
  """Plain data (dicts, lists, scalars) of a config, for YAML."""
  return dataclasses.asdict(config)


def _all_keys(cls: type = Config, prefix: str = "") -> list[str]:
  keys = []
  for f in dataclasses.fields(cls):
    hint = typing.get_type_hints(cls)[f.name]
    section = _section(hint)
    if section is not None and hint is not section:   # optional: `teacher=null` is a key too
      keys.append(prefix + f.name)
    if section is not None:
      keys += _all_keys(section, prefix + f.name + ".")
    else:
      keys.append(prefix + f.name)
  return keys


def apply_override(data: dict[str, Any], override: str) -> None:
  """Apply one `dotted.key=value` (value parsed as YAML) to the nested dict `data`."""
  if "=" not in override:
    raise ConfigError(f"override {override!r}: expected key=value, e.g. train.steps=100")
  key, raw = override.split("=", 1)
  key = key.strip()
  try:
    value = yaml.safe_load(raw) if raw.strip() else ""
  except yaml.YAMLError as error:
    raise ConfigError(f"override {override!r}: the value is not valid YAML "
                      f"({str(error).splitlines()[0]}); quote it") from error
  free = next((f for f in FREE_DICTS if key.startswith(f + ".")), None)
  if key in RENAMED:
    raise ConfigError(f"config key {key!r} was renamed {RENAMED[key]}")
  if free is None and key not in _all_keys():
    raise ConfigError(f"unknown config key {key!r}; {_closest(key, _all_keys())}")
  node = data
  parts = key.split(".")
  for part in parts[:-1]:
    if node.get(part, {}) is None:   # `teacher.path=X` after `teacher: null`: a section again
      node[part] = {}
    node = node.setdefault(part, {})
    if not isinstance(node, dict):
      raise ConfigError(f"override {override!r}: {part!r} is not a section")
  node[parts[-1]] = value


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
  """The config of a YAML file (None: the defaults) with `key=value` overrides applied.

  Raises:
    ConfigError: unknown keys, wrong types, invalid choices, a missing file.
  """
  data: dict[str, Any] = {}
  if path is not None:
    path = paths.as_path(path)   # etils.epath: a gs://... config file reads like a local one
    if not path.is_file():
      raise ConfigError(f"config file {path} does not exist")
    try:
      data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
      raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
  for override in overrides:
    apply_override(data, override)
  config = _build(Config, data)
  check(config)
  return config
