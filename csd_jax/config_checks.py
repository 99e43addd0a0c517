"""The config's cross-field checks: each a one-line `ConfigError` that names the keys and the fix.

`csd_jax.config.load_config` runs `check` on every config it builds; single keys (types, choices,
unknown names) are checked while the config is built.
"""

from __future__ import annotations

from csd_jax.config import Config, ConfigError
from csd_jax.errors import UserError


def check(config: Config) -> None:
  """Cross-field checks, each a one-line error naming the keys."""
  from csd_jax.losses import resolve

  try:
    resolve(config.loss.name, config.loss.params)
  except ValueError as error:
    raise ConfigError(f"loss: {error}") from error
  for role in ("teacher", "student"):
    spec = getattr(config, role)
    if spec is None:   # teacher: null, checked by _check_sft
      continue
    if (spec.path is None) == (spec.config is None):
      raise ConfigError(f"{role}: set exactly one of {role}.path (a model directory or hub id) "
                        f"and {role}.config (a transformers config to initialise randomly)")
  if config.teacher is not None and config.teacher.dropout is not None:
    raise ConfigError("teacher.dropout: the teacher never drops (it only gives targets); remove "
                      "it, or set student.dropout")
  if config.student.dropout is not None and not 0.0 <= config.student.dropout < 1.0:
    raise ConfigError(f"student.dropout={config.student.dropout}: must be in [0, 1) (null: the "
                      "checkpoint's own rates)")
  train = config.train
  if train.batch_size % train.grad_accum:
    raise ConfigError(f"train.batch_size={train.batch_size} does not divide into "
                      f"train.grad_accum={train.grad_accum} micro-batches")
  if train.steps <= 0 and train.epochs <= 0:
    raise ConfigError("set train.steps or train.epochs to a positive number")
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
  if config.data.source == "minillm" and not config.data.minillm_dolly:
    raise ConfigError("data.source=minillm needs data.minillm_dolly: the directory of MiniLLM's "
                      "Dolly files (raw.jsonl, valid.jsonl; hub dataset MiniLLM/dolly)")
  _check_sft(config)
  _check_onpolicy(config)
  _check_eval(config)
  _check_mesh(config)


def _check_mesh(config: Config) -> None:
  """mesh.rules names known logical and mesh axes (sharding.resolve_rules checks them)."""
  # Imported here: sharding imports jax, which config must not pull in at import time.
  from csd_jax.sharding import resolve_rules

  try:
    resolve_rules(config.mesh.rules)
  except UserError as error:
    raise ConfigError(f"mesh.rules: {error}") from error


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
