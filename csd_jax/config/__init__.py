"""The run configuration.

- `schema`: the frozen dataclasses, one per section (`Config` holds them), and the valid choices.
- `load`: `load_config(path, overrides)`, YAML plus dotted `key=value` overrides, every key and
  type checked while the dataclasses are built, then the values by `checks`.
- `checks`: the value checks, each a one-line `ConfigError` naming the keys and the fix.
- `paths`: `resolve_paths`, a config's relative local paths made absolute.

The names below are the ones the rest of the project imports from `csd_jax.config`. Importing
it imports neither JAX nor the models: the checks that need them import them when they run.
"""

from csd_jax.config.checks import check
from csd_jax.config.load import apply_override, load_config, to_dict
from csd_jax.config.paths import resolve_paths
from csd_jax.config.schema import (
    VALIDATION_SPLIT, CheckpointConfig, Config, ConfigError, DataConfig, GenEvalConfig,
    LoraConfig, LossConfig, MeshConfig, MetricsConfig, ModelSpec, OnPolicyConfig, OptimConfig,
    TrainConfig, WandbConfig)

__all__ = ["VALIDATION_SPLIT", "CheckpointConfig", "Config", "ConfigError", "DataConfig",
           "GenEvalConfig", "LoraConfig", "LossConfig", "MeshConfig", "MetricsConfig",
           "ModelSpec", "OnPolicyConfig", "OptimConfig", "TrainConfig", "WandbConfig",
           "apply_override", "check", "load_config", "resolve_paths", "to_dict"]
