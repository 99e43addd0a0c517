"""A run's models and files: what training builds from a config and what a run directory holds.

    run = open_run("workdirs/x", teacher=True)   # config, tokenizer, student, teacher, step
    run.student(...)                              # the latest checkpoint's student

Training builds its teacher and student with `build_models`; export, `csd-jax eval --workdir`,
the notebook's backend and the demo open a finished (or running) run with `open_run`. Both read
the tokenizer with `resolve_tokenizer`, in one order: `data.tokenizer`, then the teacher's
directory, then the student's. A run directory holds `config.yaml` (the resolved config, with
paths that open from any working directory) and `checkpoints/`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath
from jax.sharding import Mesh

from csd_jax.runtime import paths
from csd_jax.config import Config, ModelSpec, load_config
from csd_jax.config.paths import resolve_paths
from csd_jax.errors import UserError
from csd_jax.models import CausalLM, init_random, load_pretrained
from csd_jax.models.io import hub
from csd_jax.runtime.sharding import make_mesh, resolve_rules
from csd_jax.run.state import (TrainState, init_train_state, initial_replay, make_optimizer,
                               trainable_filter)

logger = logging.getLogger("csd_jax.run.models")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
CONFIG_FILE = "config.yaml"


# ---- models from a config --------------------------------------------------------------------

def model_settings(spec: ModelSpec, *, trainable: bool, **options: Any
                   ) -> tuple[Any, Any, dict[str, Any]]:
  """(compute dtype, storage dtype, `ModelConfig` overrides) of a teacher or student: a model
  that is not trained (the teacher) stores its weights in its compute dtype."""
  dtype = DTYPES[spec.dtype]
  param_dtype = DTYPES[spec.param_dtype] if trainable else dtype
  options = {"remat": spec.remat, "attention_impl": spec.attention_impl,
             "layer_barrier": spec.layer_barrier, **options}
  if spec.dropout is not None:
    options.update(embed_dropout=spec.dropout, attention_dropout=spec.dropout,
                   residual_dropout=spec.dropout)
  return dtype, param_dtype, options


def build_model(spec: ModelSpec, mesh: Mesh, *, trainable: bool,
                rules: Mapping[str, Sequence[str]] | None = None, **options: Any) -> CausalLM:
  """A model from a path / hub id or a random-init config, born sharded over `mesh` by `rules`
  (default `sharding.RULES`), with `model_settings`; `options` are `ModelConfig` overrides
  (LoRA)."""
  dtype, param_dtype, options = model_settings(spec, trainable=trainable, **options)
  if spec.path is not None:
    return load_pretrained(spec.path, dtype=dtype, param_dtype=param_dtype, mesh=mesh,
                           rules=rules, **options)
  return init_random(spec.config, seed=spec.seed, dtype=dtype, param_dtype=param_dtype,
                     mesh=mesh, rules=rules, **options)


def student_adapters(config: Config) -> dict[str, Any]:
  """The student's LoRA settings as `ModelConfig` overrides ({} without LoRA)."""
  lora = config.lora
  return ({"lora_rank": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
           "lora_targets": tuple(lora.targets)} if lora.rank > 0 else {})


def build_student(config: Config, mesh: Mesh) -> CausalLM:
  """The student as the run trains it (with its LoRA adapters, if any)."""
  return build_model(config.student, mesh, trainable=True,
                     rules=resolve_rules(config.mesh.rules), **student_adapters(config))


def common_vocab_size(teacher: CausalLM, student: CausalLM) -> int:
  """The vocabulary both heads cover. Different sizes (padded embedding rows, e.g. Qwen2.5's
  151936 vs 152064) are cut to the smaller, with a warning; the tokenizer is the same."""
  v_t, v_s = teacher.cfg.vocab_size, student.cfg.vocab_size
  if v_t != v_s:
    logger.warning("teacher vocabulary %d and student vocabulary %d differ: both heads are cut "
                   "to the first %d entries (padded rows); the tokenizer must be the same",
                   v_t, v_s, min(v_t, v_s))
  return min(v_t, v_s)


def _tokenizer_at(path: str, *, weights: bool = True) -> Any | None:
  """The tokenizer of a local directory or hub id (`hub.resolve`, the models' one resolution
  order; `weights`: a model's repo, resolved with its weights once for both)."""
  import transformers

  directory = hub.resolve(path, weights=weights)   # UserError: a hub id that does not resolve
  try:
    return transformers.AutoTokenizer.from_pretrained(str(directory))
  except (OSError, ValueError):
    return None  # no tokenizer files there


def check_same_tokenizer(teacher_dir: str | None, student_dir: str | None) -> None:
  """Refuse a teacher and a student whose tokenizers differ (token ids would not match)."""
  if teacher_dir is None or student_dir is None:
    return
  teacher_tok, student_tok = _tokenizer_at(teacher_dir), _tokenizer_at(student_dir)
  if teacher_tok is None or student_tok is None:
    return
  teacher_vocab, student_vocab = teacher_tok.get_vocab(), student_tok.get_vocab()
  common = set(teacher_vocab) & set(student_vocab)
  differ = sum(teacher_vocab[t] != student_vocab[t] for t in common)
  if differ or len(common) < 0.99 * min(len(teacher_vocab), len(student_vocab)):
    raise UserError(f"teacher ({teacher_dir}) and student ({student_dir}) use different "
                    f"tokenizers ({differ} shared tokens map to other ids); distillation needs "
                    "one tokenizer: pick a student of the teacher's family")


@dataclasses.dataclass
class Models:
  """The frozen teacher (None: supervised fine-tuning) and the trained student, on one mesh."""

  teacher: CausalLM | None
  student: CausalLM
  vocab_size: int  # the vocabulary both heads are cut to (SFT: the student's)


def build_teacher(config: Config, mesh: Mesh) -> CausalLM | None:
  """The run's frozen teacher, born sharded over `mesh`; None for `teacher: null` (SFT)."""
  if config.teacher is None:
    return None
  return build_model(config.teacher, mesh, trainable=False,
                     rules=resolve_rules(config.mesh.rules))


def build_models(config: Config, mesh: Mesh) -> Models:
  """Teacher and student of a run, born sharded over `mesh`."""
  if config.teacher is not None:
    check_same_tokenizer(config.teacher.path, config.student.path)
  teacher = build_teacher(config, mesh)
  student = build_student(config, mesh)
  vocab = (student.cfg.vocab_size if teacher is None
           else common_vocab_size(teacher, student))
  return Models(teacher, student, vocab)


def resolve_tokenizer(config: Config) -> Any | None:
  """The run's tokenizer: `data.tokenizer` (which must load), else the teacher's directory's,
  else the student's; None when none of them has one (synthetic data, random models)."""
  if config.data.tokenizer:
    tokenizer = _tokenizer_at(config.data.tokenizer, weights=False)
    if tokenizer is None:
      raise UserError(f"data.tokenizer={config.data.tokenizer}: no tokenizer there; point it "
                      "at a directory with tokenizer files (or a hub id)")
    return tokenizer
  teacher_path = config.teacher.path if config.teacher is not None else None
  for path in (teacher_path, config.student.path):
    if path and (tokenizer := _tokenizer_at(path)) is not None:
      return tokenizer
  return None


# ---- a run directory ---------------------------------------------------------------------------

def selection_metric(config: Config) -> str:
  """The metric model selection maximises: `{eval.select}/rougeL` (W/best/ is kept by it)."""
  return f"{config.eval.select}/rougeL"


def inference_mesh() -> Mesh:
  """Every local device on the `fsdp` axis: weights sharded (a 7B model need not fit on one
  chip), rows of a batch split over the devices."""
  return make_mesh(1, -1, 1, devices=jax.local_devices())


def load_run_config(workdir: paths.PathLike) -> Config:
  """The resolved config of the run in `workdir` (relative paths taken from the workdir)."""
  workdir = paths.as_path(workdir)
  if not (workdir / CONFIG_FILE).is_file():
    raise UserError(f"{workdir} has no {CONFIG_FILE}: not a csd-jax run directory (pass the "
                    "--workdir of a `csd-jax train` run)")
  return resolve_paths(load_config(workdir / CONFIG_FILE), workdir)


def train_state_template(config: Config, student: CausalLM, mesh: Mesh, *, pad_id: int = 0
                         ) -> tuple[Any, TrainState]:
  """The student's graph and a fresh train state of the run's structure (the optimizer over the
  run's steps, the LoRA split, the replay buffer): what training starts from and what a
  checkpoint of the run restores into."""

  optimizer, _ = make_optimizer(config.optim, max(config.train.steps, 1))
  return init_train_state(student, optimizer, mesh, trainable=trainable_filter(config.lora),
                          seed=config.train.seed, replay=initial_replay(config, pad_id))


@dataclasses.dataclass
class Run:
  """A run directory, opened: its config and tokenizer, the student of its latest checkpoint
  (step `step`), and its teacher when asked for (None for a run without one: SFT)."""

  workdir: epath.Path
  config: Config
  tokenizer: Any | None
  student: CausalLM
  teacher: CausalLM | None
  vocab_size: int       # the vocabulary student and teacher share (the student's alone)
  step: int
  mesh: Mesh


def open_run(workdir: paths.PathLike, *, teacher: bool = False,
             mesh: Mesh | None = None, best: bool = False) -> Run:
  """The run in `workdir` at its latest readable checkpoint (`best`: its best one, kept in
  W/best/ by model selection), its models sharded over `mesh` (default: `inference_mesh()`).

  Raises:
    UserError: no config.yaml, or no readable checkpoint.
  """
  from csd_jax.run.checkpoint import Checkpointer

  workdir = paths.as_path(workdir)
  config = load_run_config(workdir)
  mesh = mesh or inference_mesh()
  graphdef, template = train_state_template(config, build_student(config, mesh), mesh)
  checkpointer = (Checkpointer(workdir, best_metric=selection_metric(config)) if best
                  else Checkpointer(workdir, keep=config.checkpoint.keep))
  restored = checkpointer.restore_latest(template, move_aside=False)  # read-only: never moves
  if restored is None and best:
    raise UserError(f"no best checkpoint in {checkpointer.directory}: model selection keeps one "
                    "when eval.select names an eval.datasets entry; use the latest checkpoint "
                    "(drop --best)")
  if restored is None:
    raise UserError(f"no readable checkpoint in {checkpointer.directory}: train first, or "
                    "wait for the run's first checkpoint (checkpoint.every)")
  step, state, _ = restored
  student = state.student(graphdef)
  teacher_model = build_teacher(config, mesh) if teacher else None
  vocab = (common_vocab_size(teacher_model, student) if teacher_model is not None
           else student.cfg.vocab_size)
  return Run(workdir, config, resolve_tokenizer(config), student, teacher_model, vocab, step,
             mesh)
