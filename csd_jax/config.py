"""The run configuration: typed, frozen dataclasses; YAML in, dotted `key=value` overrides.

    config = load_config("configs/tiny.yaml", ["train.steps=20", "loss.name=fkl"])

Every key is checked: an unknown key fails with the closest valid ones, a value of the wrong
type fails naming the key and the type expected. `to_dict(config)` gives back plain YAML-able
data (the resolved config written to `W/config.yaml`).
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

from csd_jax.errors import UserError
from csd_jax.sampling import Sampling


VALIDATION_SPLIT = "split:valid"   # eval.datasets.NAME: the run's own validation split


class ConfigError(UserError):
  """A bad config file or override; the message is one line that names the key and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """A teacher or student: a Hugging Face directory / hub id, or a transformers config to
  initialise randomly (`config`: a dict with `model_type` and its fields)."""

  path: str | None = None
  config: dict | None = None
  dtype: str = "bfloat16"          # compute dtype
  param_dtype: str = "float32"     # storage; the teacher is cast to `dtype` when frozen
  remat: str = "none"              # none | full | dots
  attention_impl: str | None = None
  seed: int = 0
  dropout: float | None = None     # student: None = its config.json's rates (GPT-2: 0.1); a
                                   # number replaces the embedding, attention and residual rates


@dataclasses.dataclass(frozen=True)
class LossConfig:
  name: str = "csd"
  params: dict = dataclasses.field(default_factory=dict)  # e.g. {w1: teacher, w2: student}
  kd_coef: float = 1.0
  ce_coef: float = 0.0            # SFT term on the data's responses
  lm_coef: float = 0.0            # LM term on pre-training text (data.lm_files)
  fused: bool = True
  chunk_size: int = 1024
  normalize: str = "token"
  # Chat pairs: (2 - beta) KD(teacher's response) + beta KD(student's); beta from pair_beta to
  # pair_beta_end (null: constant) over the first pair_beta_ramp of the steps (official 1.5, 0.5)
  pair_beta: float = 1.0
  pair_beta_end: float | None = None
  pair_beta_ramp: float = 0.5


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  lr: float = 1e-4
  schedule: str = "cosine"        # cosine | linear | constant
  warmup_steps: int = 0
  warmup_ratio: float = 0.0       # warm-up as a share of the steps (Hugging Face's), if no steps
  end_lr: float = 0.0
  weight_decay: float = 0.01
  clip_norm: float = 1.0          # 0 = no clipping
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 0                  # 0: epochs x steps per epoch
  epochs: float = 1.0
  batch_size: int = 8             # global rows per optimizer step
  grad_accum: int = 1             # micro-batches per step (batch_size divides into them)
  seed: int = 0
  log_every: int = 10
  heldout_every: int = 0          # held-out loss every N steps (0: only at the end)
  heldout_batches: int = 4        # batches of the held-out set per evaluation
  max_nonfinite_steps: int = 3    # skipped non-finite updates in a row before the run stops
  compile_cache: str = "workdir"  # XLA's persistent cache: workdir (W/xla_cache), a directory,
                                  # or "" (off)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  # Logical axis -> list of mesh axes (data, fsdp, tensor), overriding sharding.RULES for
  # teacher and student alike, e.g. {vocab: [], mlp: [fsdp, tensor]}.
  rules: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  source: str = "synthetic"       # synthetic | files | minillm | dolly | pairs (chat pairs)
  train_files: list = dataclasses.field(default_factory=list)
  eval_files: list = dataclasses.field(default_factory=list)
  lm_files: list = dataclasses.field(default_factory=list)
  minillm_dolly: str | None = None  # minillm: MiniLLM's Dolly directory (raw.jsonl, valid.jsonl)
  minillm_dev_num: int = 1000     # minillm: raw.jsonl's first N records are the validation set
  dolly_source: str = "databricks/databricks-dolly-15k"   # dolly: the hub file, re-split
  data_dir: str = "~/tensorflow_datasets"
  tokenizer: str | None = None    # default: the teacher's directory
  template: str = "minillm"       # minillm | chat | none
  max_length: int = 512
  max_prompt_length: int = 256
  keep_prompt: str = "end"        # a long prompt keeps its end, or its start (DistiLLM / CSD)
  pack: bool = False
  synthetic_samples: int = 256    # synthetic: random token sequences of max_length


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  rank: int = 0                   # 0: full fine-tuning
  alpha: float = 16.0
  dropout: float = 0.0
  targets: list = dataclasses.field(default_factory=lambda: ["q", "k", "v", "o"])


@dataclasses.dataclass(frozen=True)
class OnPolicyConfig:
  """Student-generated training rows (csd_jax/onpolicy.py).

  imitkd: every step the student answers the batch's prompts into a replay buffer, and a share
  `ratio` of the batch's rows is drawn from the buffer. gkd: with probability `ratio` a step's
  whole batch is the student's fresh answers, otherwise the dataset's. distillm (the official
  DistiLLM / CSD `--student-gen` mixing): with probability `ratio` the student answers the
  batch's prompts into the buffer and the whole batch is drawn from the buffer; otherwise the
  dataset's batch, nothing generated.
  """

  ratio: float = 0.0              # 0: off
  mix: str = "imitkd"             # imitkd | gkd | distillm
  buffer_size: int = 1000         # imitkd, distillm: the replay buffer's rows (>= batch_size)
  max_new_tokens: int = 0         # 0: data.max_length - data.max_prompt_length
  sampling: Sampling = dataclasses.field(default_factory=Sampling)  # csd_jax/sampling.py


@dataclasses.dataclass(frozen=True)
class GenEvalConfig:
  """Evaluation by generation during training (csd_jax/eval/generation.py)."""

  every: int = 0                  # 0: never during training (`csd-jax eval` afterwards)
  every_epoch: bool = False       # also after every epoch (the official runs' model selection)
  datasets: dict = dataclasses.field(default_factory=dict)  # name: file, or split:valid (the run's
                                                            # validation split)
  select: str | None = None       # a datasets name: its ROUGE-L keeps the best checkpoint (W/best)
  max_examples: int = 64          # the first N records of each dataset (0: all)
  seeds: list = dataclasses.field(default_factory=lambda: [10])
  batch_size: int = 16
  sampling: Sampling = dataclasses.field(default_factory=Sampling)  # csd_jax/sampling.py


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every: int = 0                  # 0: only at the end
  keep: int = 3


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """Weights & Biases, optional (`pip install 'csd-jax[wandb]'`): process 0 logs the scalars
  TensorBoard gets; a resumed run continues the same W&B run (its id is kept in
  W/wandb_run.json); W&B failing or unreachable never stops training (one warning)."""

  project: str | None = None      # None: W&B off
  entity: str | None = None       # the team or user; None: the API key's default entity
  name: str | None = None         # the run's display name; None: W&B picks one
  tags: list = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class MetricsConfig:
  """Where the metrics go besides W/metrics.jsonl and W/tensorboard/ (always written)."""

  wandb: WandbConfig = dataclasses.field(default_factory=WandbConfig)


@dataclasses.dataclass(frozen=True)
class Config:
  # None (`teacher: null`): supervised fine-tuning of the student, no teacher loaded
  teacher: ModelSpec | None = dataclasses.field(default_factory=ModelSpec)
  student: ModelSpec = dataclasses.field(default_factory=ModelSpec)
  loss: LossConfig = dataclasses.field(default_factory=LossConfig)
  optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
  train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
  mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
  data: DataConfig = dataclasses.field(default_factory=DataConfig)
  lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
  checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
  onpolicy: OnPolicyConfig = dataclasses.field(default_factory=OnPolicyConfig)
  eval: GenEvalConfig = dataclasses.field(default_factory=GenEvalConfig)
  metrics: MetricsConfig = dataclasses.field(default_factory=MetricsConfig)


CHOICES = {
    "loss.normalize": ("token", "sequence"), "optim.schedule": ("cosine", "linear", "constant"),
    "data.source": ("synthetic", "files", "minillm", "dolly", "pairs"),
    "data.template": ("minillm", "chat", "none"),
    "data.keep_prompt": ("start", "end"),
    "teacher.remat": ("none", "full", "dots"), "student.remat": ("none", "full", "dots"),
    "teacher.dtype": ("float32", "bfloat16", "float16"),
    "student.dtype": ("float32", "bfloat16", "float16"),
    "teacher.param_dtype": ("float32", "bfloat16", "float16"),
    "student.param_dtype": ("float32", "bfloat16", "float16"),
    "onpolicy.mix": ("imitkd", "gkd", "distillm"),
}
# Dict-valued fields: their keys are free (checked by their users), not config keys.
FREE_DICTS = ("loss.params", "teacher.config", "student.config", "eval.datasets", "mesh.rules")


# Keys that were renamed: an old config gets the new name, not a guess.
RENAMED = {"train.eval_every": "train.heldout_every (the held-out loss; eval.every is evaluation "
                               "by generation)",
           "train.eval_batches": "train.heldout_batches"}


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
    from csd_jax import paths   # etils.epath: a gs://... config file reads like a local one

    path = paths.as_path(path)
    if not path.is_file():
      raise ConfigError(f"config file {path} does not exist")
    try:
      data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
      raise ConfigError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
  for override in overrides:
    apply_override(data, override)
  config = _build(Config, data)
  from csd_jax.config_checks import check  # it imports Config: a later import, not a cycle

  check(config)
  return config
