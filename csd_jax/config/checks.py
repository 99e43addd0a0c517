"""The config's value checks: each a one-line `ConfigError` that names the keys and the fix.

`csd_jax.config.load_config` runs `check` on every config it builds; types, choices and unknown
names are checked while the config is built. Here: the range of each number (`BOUNDS`, then the
few that need more than a lower bound), the models' transformers configs, and the rules that
tie keys together. They run before a run touches its workdir, so a refused config leaves
nothing behind.
"""

from __future__ import annotations

import functools
import json
import pathlib
from typing import Any

from csd_jax.config.schema import Config, ConfigError
from csd_jax.errors import UserError

# key, the smallest valid value, what the key means (the hint the error gives).
BOUNDS: tuple[tuple[str, float, str], ...] = (
    ("train.steps", 0, "optimizer steps; 0: train.epochs decides"),
    ("train.epochs", 0, "passes over the data, used when train.steps is 0"),
    ("train.batch_size", 1, "rows per optimizer step"),
    ("train.grad_accum", 1, "micro-batches per step; 1: none"),
    ("train.log_every", 1, "log the metrics every N steps; the last step is always logged"),
    ("train.heldout_every", 0, "0: the held-out loss only at the end"),
    ("train.heldout_batches", 0, "batches of the held-out set per evaluation"),
    ("train.max_nonfinite_steps", 1, "skipped non-finite updates in a row before the run stops"),
    ("train.seed", 0, "the seed of the data order and dropout"),
    ("optim.end_lr", 0, "the learning rate the schedule ends at"),
    ("optim.warmup_steps", 0, "steps of linear warm-up; 0: none"),
    ("optim.weight_decay", 0, "AdamW's decoupled weight decay; 0: none"),
    ("optim.clip_norm", 0, "the global gradient-norm clip; 0: no clipping"),
    ("optim.eps", 0, "Adam's epsilon, e.g. 1e-8"),
    ("loss.kd_coef", 0, "the weight of the distillation term"),
    ("loss.ce_coef", 0, "the weight of the cross-entropy term on the responses"),
    ("loss.lm_coef", 0, "the weight of the LM term on data.lm_files"),
    ("loss.chunk_size", 1, "tokens per chunk of the fused loss"),
    ("data.max_length", 1, "tokens per training row"),
    ("data.minillm_dev_num", 0, "raw.jsonl's first N records are the validation set"),
    ("data.synthetic_samples", 1, "random sequences of the synthetic source"),
    ("lora.rank", 0, "the adapters' rank; 0: full fine-tuning"),
    ("checkpoint.every", 0, "save every N steps; 0: only at the end"),
    ("checkpoint.keep", 1, "the newest N checkpoints are kept; 0 would delete every one"),
    ("onpolicy.buffer_size", 1, "rows of the replay buffer"),
)
# key: what the key means, for the keys that must be above 0 (0 is no default there).
POSITIVE = {"optim.lr": "the peak learning rate, e.g. 1e-4"}
# key: what the key means, for the keys that must lie in [0, 1).
FRACTIONS = {"optim.b1": "Adam's first-moment decay, e.g. 0.9",
             "optim.b2": "Adam's second-moment decay, e.g. 0.999",
             "lora.dropout": "the adapters' dropout rate; 0: none",
             "optim.warmup_ratio": "warm-up as a share of the steps, e.g. 0.1; 0: none"}


def _value(config: Config, key: str) -> Any:
  return functools.reduce(getattr, key.split("."), config)


def check(config: Config) -> None:
  """Every check, each a one-line error naming the keys."""
  _check_numbers(config)
  _check_models(config)
  _check_rules(config)
  _check_sft(config)
  _check_onpolicy(config)
  _check_pairs(config)
  _check_eval(config)
  _check_mesh(config)
  _check_metrics(config)
  _check_local_paths(config)


def _check_numbers(config: Config) -> None:
  """Each number within its range (`BOUNDS`, `POSITIVE`, `FRACTIONS`, the seed, the mesh sizes)."""
  for key, low, hint in BOUNDS:
    if _value(config, key) < low:
      raise ConfigError(f"{key}={_value(config, key)}: must be >= {low} ({hint})")
  for key, hint in POSITIVE.items():
    if not _value(config, key) > 0:
      raise ConfigError(f"{key}={_value(config, key)}: must be > 0 ({hint})")
  for key, hint in FRACTIONS.items():
    if not 0.0 <= _value(config, key) < 1.0:
      raise ConfigError(f"{key}={_value(config, key)}: must be in [0, 1) ({hint})")
  train, data = config.train, config.data
  if train.seed >= 2**32:   # Grain's shuffle takes 32 bits
    raise ConfigError(f"train.seed={train.seed}: must be below 2**32 ({2**32})")
  if train.steps == 0 and train.epochs == 0:
    raise ConfigError("train.steps=0 and train.epochs=0: set train.steps or train.epochs to a "
                      "positive number")
  heldout = data.source not in ("files", "pairs") or data.eval_files   # runs with a held-out set
  if heldout and train.heldout_batches < 1:
    raise ConfigError(f"train.heldout_batches={train.heldout_batches}: must be >= 1 (batches of "
                      "the held-out set per evaluation)")
  if data.source != "synthetic" and data.max_prompt_length < 1:
    raise ConfigError(f"data.max_prompt_length={data.max_prompt_length}: must be >= 1 (prompt "
                      "tokens kept per record)")
  sizes = {f"mesh.{axis}": getattr(config.mesh, axis) for axis in ("data", "fsdp", "tensor")}
  for key, size in sizes.items():
    if size < 1 and size != -1:
      raise ConfigError(f"{key}={size}: must be >= 1, or -1 (the devices the other sizes leave)")
  if list(sizes.values()).count(-1) > 1:
    raise ConfigError(f"{', '.join(f'{k}={v}' for k, v in sizes.items())}: at most one mesh "
                      "size may be -1; give the others")


def _check_models(config: Config) -> None:
  """Teacher and student: exactly one of path and config, and a transformers config the port
  reads (`student.config`, or `config.json` of a local `path` or of a hub id the local hub
  cache holds): supported family, heads that divide the hidden size, key / value heads that
  divide the heads."""
  for role in ("teacher", "student"):
    spec = getattr(config, role)
    if spec is None:   # teacher: null, checked by _check_sft
      continue
    if (spec.path is None) == (spec.config is None):
      raise ConfigError(f"{role}: set exactly one of {role}.path (a model directory or hub id) "
                        f"and {role}.config (a transformers config to initialise randomly)")
    if spec.config is not None:
      _check_model_config(spec.config, f"{role}.config")
    elif (found := _config_json(spec.path)) is not None:   # else checked on loading
      try:
        hf = json.loads(found.read_text())
      except (OSError, ValueError):   # unreadable: the model loader says so, naming the file
        continue
      _check_model_config(hf, f"{role}.path: {found}")
  if config.teacher is not None and config.teacher.dropout is not None:
    raise ConfigError("teacher.dropout: the teacher never drops (it only gives targets); remove "
                      "it, or set student.dropout")
  if config.student.dropout is not None and not 0.0 <= config.student.dropout < 1.0:
    raise ConfigError(f"student.dropout={config.student.dropout}: must be in [0, 1) (null: the "
                      "checkpoint's own rates)")


def _config_json(path: str) -> Any | None:
  """config.json of a local model directory, or of a hub id in the local hub cache (never
  downloaded here: a config loads offline)."""
  if (pathlib.Path(path) / "config.json").is_file():
    return pathlib.Path(path) / "config.json"
  from csd_jax.models.io.hub import cached_file, parse_hub_id   # later: it imports JAX

  return cached_file(path, "config.json") if parse_hub_id(path) is not None else None


def _check_model_config(hf: Any, where: str) -> None:
  # Imported here: the models import JAX and Flax, which config must not pull in at import time.
  from csd_jax.models.families import IncompleteConfig, config_from_hf

  if not isinstance(hf, dict):
    raise ConfigError(f"{where}: expected a transformers config (a mapping with model_type)")
  try:
    config_from_hf(hf)
  except IncompleteConfig:   # building the model names the key; a config read only for its
    return                   # settings (stop ids) may leave out the model's shape
  except UserError as error:
    message = str(error)
    prefix = f"{hf.get('model_type')} config: "   # the family's own prefix: `where` says it
    raise ConfigError(f"{where}: {message.removeprefix(prefix)}") from error


def _check_rules(config: Config) -> None:
  """Rules that tie keys together."""
  from csd_jax.losses import resolve

  try:
    resolve(config.loss.name, config.loss.params)
  except ValueError as error:
    raise ConfigError(f"loss: {error}") from error
  train = config.train
  if train.batch_size % train.grad_accum:
    raise ConfigError(f"train.batch_size={train.batch_size} does not divide into "
                      f"train.grad_accum={train.grad_accum} micro-batches")
  if config.data.max_prompt_length >= config.data.max_length:
    raise ConfigError(f"data.max_prompt_length={config.data.max_prompt_length} must be below "
                      f"data.max_length={config.data.max_length}")
  if config.loss.lm_coef and not config.data.lm_files:
    raise ConfigError("loss.lm_coef > 0 needs data.lm_files (pre-training text: JSONL of text, "
                      "or MiniLLM's token files train_<k>.bin / .idx)")
  from csd_jax.models.lora import LORA_TARGETS

  unknown = sorted(set(config.lora.targets) - set(LORA_TARGETS))
  if unknown:
    raise ConfigError(f"lora.targets: unknown {unknown}; valid: {', '.join(LORA_TARGETS)}")
  if config.data.source == "files" and not config.data.train_files:
    raise ConfigError("data.source=files needs data.train_files")
  if config.optim.warmup_steps and config.optim.warmup_ratio:
    raise ConfigError(f"optim.warmup_steps={config.optim.warmup_steps} and optim.warmup_ratio="
                      f"{config.optim.warmup_ratio}: set one of them (the other 0)")
  if config.data.source == "minillm" and not config.data.minillm_dolly:
    raise ConfigError("data.source=minillm needs data.minillm_dolly: the directory of MiniLLM's "
                      "Dolly files (raw.jsonl, valid.jsonl; hub dataset MiniLLM/dolly)")


def _check_mesh(config: Config) -> None:
  """mesh.rules names known logical and mesh axes (sharding.resolve_rules checks them);
  mesh.slice is a known TPU slice."""
  # Imported here: sharding imports jax, which config must not pull in at import time.
  from csd_jax.runtime.sharding import resolve_rules

  try:
    resolve_rules(config.mesh.rules)
  except UserError as error:
    raise ConfigError(f"mesh.rules: {error}") from error
  from csd_jax.compile.topologies import SLICES   # a table: imports no JAX

  if config.mesh.slice is not None and config.mesh.slice not in SLICES:
    raise ConfigError(f"mesh.slice={config.mesh.slice}: unknown TPU slice; known slices: "
                      f"{', '.join(SLICES)}")


def _check_sft(config: Config) -> None:
  """`teacher: null` is supervised fine-tuning: cross-entropy on the responses, nothing else
  that needs a teacher."""
  if config.teacher is not None:
    return
  if config.loss.kd_coef or not config.loss.ce_coef:
    raise ConfigError(f"teacher: null trains without a teacher (supervised fine-tuning): set "
                      f"loss.kd_coef=0 and loss.ce_coef=1 (now {config.loss.kd_coef} and "
                      f"{config.loss.ce_coef}), or give a teacher")
  if config.onpolicy.ratio:
    raise ConfigError("onpolicy.ratio > 0 needs a teacher to score the student's answers; set "
                      "onpolicy.ratio=0 for supervised fine-tuning (teacher: null)")


def _check_onpolicy(config: Config) -> None:
  onpolicy = config.onpolicy
  if not 0.0 <= onpolicy.ratio <= 1.0:
    raise ConfigError(f"onpolicy.ratio={onpolicy.ratio}: must be within 0..1")
  if not onpolicy.ratio:
    return
  if config.data.pack:
    raise ConfigError("onpolicy.ratio > 0 needs data.pack=false: a student answer fills a row "
                      "of its own")
  if onpolicy.mix == "imitkd" and int(onpolicy.ratio * config.train.batch_size + 0.5) < 1:
    raise ConfigError(f"onpolicy.ratio={onpolicy.ratio} of train.batch_size="
                      f"{config.train.batch_size} rows is no row: raise the ratio to at least "
                      f"{0.5 / config.train.batch_size:.3g}")
  if onpolicy.mix in ("imitkd", "distillm") and onpolicy.buffer_size < config.train.batch_size:
    raise ConfigError(f"onpolicy.buffer_size={onpolicy.buffer_size} must hold at least one "
                      f"batch (train.batch_size={config.train.batch_size})")
  room = config.data.max_length - config.data.max_prompt_length
  if not 0 <= onpolicy.max_new_tokens <= room:
    raise ConfigError(f"onpolicy.max_new_tokens={onpolicy.max_new_tokens}: must be within "
                      f"0..{room} (data.max_length - data.max_prompt_length; 0 = all of it)")


def _check_pairs(config: Config) -> None:
  """Chat pairs (data.source pairs) and the pair objective's beta."""
  loss, data = config.loss, config.data
  for key, value in (("loss.pair_beta", loss.pair_beta),
                     ("loss.pair_beta_end", loss.pair_beta_end)):
    if value is not None and not 0.0 <= value <= 2.0:
      raise ConfigError(f"{key}={value}: must be within 0..2 (the teacher's response weighs "
                        "2 - beta, the student's beta)")
  if not 0.0 < loss.pair_beta_ramp <= 1.0:
    raise ConfigError(f"loss.pair_beta_ramp={loss.pair_beta_ramp}: must be in (0, 1] (the share "
                      "of the steps over which beta moves to loss.pair_beta_end)")
  if data.source != "pairs":
    if loss.pair_beta != 1.0 or loss.pair_beta_end is not None:
      raise ConfigError("loss.pair_beta / loss.pair_beta_end weigh chat pairs: they need "
                        "data.source=pairs")
    return
  if not data.train_files:
    raise ConfigError("data.source=pairs needs data.train_files (the official reformat.py's "
                      "train.json, or JSONL of prompt / teacher / student)")
  if loss.normalize != "sequence":
    raise ConfigError("data.source=pairs: the pair objective is per sequence (token means per "
                      "response, averaged over pairs, as the official); set "
                      "loss.normalize=sequence")
  if data.pack or config.onpolicy.ratio:
    raise ConfigError("data.source=pairs keeps each pair's two rows whole: set data.pack=false "
                      "and onpolicy.ratio=0")
  if config.train.batch_size % 2:
    raise ConfigError(f"train.batch_size={config.train.batch_size}: chat pairs are two rows "
                      "each; use an even number of rows (2 x pairs per step)")


def _check_eval(config: Config) -> None:
  if config.eval.every < 0:
    raise ConfigError(f"eval.every={config.eval.every}: must be >= 0")
  if config.eval.select is not None and config.eval.select not in config.eval.datasets:
    raise ConfigError(f"eval.select={config.eval.select!r}: not one of eval.datasets "
                      f"({', '.join(config.eval.datasets) or 'none'}); name the dataset whose "
                      "ROUGE-L picks the best checkpoint, e.g. eval.datasets.valid=split:valid")
  if config.eval.select is not None and not (config.eval.every or config.eval.every_epoch):
    raise ConfigError("eval.select needs evaluations during training: set eval.every_epoch=true "
                      "(as the official runs) or eval.every=N")
  if (config.eval.every or config.eval.every_epoch) and not config.eval.datasets:
    raise ConfigError("eval.every > 0 needs eval.datasets (name: instruction file), e.g. "
                      "eval.datasets.dolly=dolly_test.jsonl")
  if (config.eval.every or config.eval.every_epoch) and config.data.source == "synthetic":
    raise ConfigError("eval.every > 0 needs a tokenizer: use data.source files or dolly")
  if config.eval.batch_size < 1 or config.eval.max_examples < 0:
    raise ConfigError(f"eval.batch_size={config.eval.batch_size} must be >= 1 and "
                      f"eval.max_examples={config.eval.max_examples} >= 0 (0 = all)")
  if not config.eval.seeds or not all(isinstance(s, int) for s in config.eval.seeds):
    raise ConfigError(f"eval.seeds={config.eval.seeds}: expected a list of integers")


def _check_local_paths(config: Config) -> None:
  """What must live on each host's own disk, not in a bucket."""
  if "://" in config.data.data_dir:
    raise ConfigError(f"data.data_dir={config.data.data_dir}: the TFDS cache is read with random "
                      "access on every host; keep it on a local disk (the default "
                      "~/tensorflow_datasets); the data files themselves may be in a bucket")


def _check_metrics(config: Config) -> None:
  """metrics.wandb: names W&B accepts (it would refuse them only once the run is under way, and
  a refused W&B only warns: the user would find the run unlogged)."""
  wandb = config.metrics.wandb
  for key in ("project", "entity", "name"):
    value = getattr(wandb, key)
    if value is not None and not value.strip():
      raise ConfigError(f"metrics.wandb.{key}={value!r}: empty; give a name or null")
  if wandb.project is not None and any(c in wandb.project for c in "/\\#?%:"):
    raise ConfigError(f"metrics.wandb.project={wandb.project!r}: W&B project names cannot "
                      "contain / \\ # ? % : (for entity/project set metrics.wandb.entity too)")
  if not all(isinstance(t, str) and 0 < len(t) <= 64 for t in wandb.tags):
    raise ConfigError(f"metrics.wandb.tags={wandb.tags!r}: expected a list of strings of 1 to 64 "
                      "characters (W&B's limit)")
  if (wandb.entity or wandb.name or wandb.tags) and wandb.project is None:
    raise ConfigError("metrics.wandb.entity / name / tags need metrics.wandb.project (W&B is "
                      "on only when a project is set)")
