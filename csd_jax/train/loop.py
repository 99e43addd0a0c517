"""The training loop: the one place that ties config, mesh, models, data, step and metrics.

    config -> mesh -> teacher + student (born sharded) -> loaders -> jitted step -> loop
           -> W/metrics.jsonl, W/tensorboard/, progress bar, checkpoints, evaluations

The loop body is the step plus periodic actions, one per concern (`actions.py`): logging,
held-out evaluation, evaluation by generation, checkpointing, preemption. Metrics stay on the
device between log steps (no host synchronisation in the loop body). Only process 0 writes
files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh

from csd_jax.train import onpolicy as onpolicy_lib
from csd_jax.runtime import paths
from csd_jax.run.checkpoint import CHECKPOINTS, Checkpointer
from csd_jax.config import Config, to_dict
from csd_jax.config.paths import resolve_paths
from csd_jax.errors import UserError, storage_failure
from csd_jax.metrics import MetricsWriter
from csd_jax.data.inputs import Inputs, build_inputs
from csd_jax.runtime.distributed import from_every_process
from csd_jax.losses import pair_beta
from csd_jax.run.models import Models, build_models, resolve_tokenizer, train_state_template
from csd_jax.runtime.sharding import data_parallel_size, make_mesh, resolve_rules
from csd_jax.run.state import TrainState, make_optimizer
from csd_jax.train import actions, compile_cache
from csd_jax.train.storage import storage_error
from csd_jax.metrics.flops import count_params
from csd_jax.train.step import Objective, make_eval_step, make_train_step
from csd_jax.run.lock import WorkdirLock, record_config

logger = logging.getLogger("csd_jax.train")


@dataclasses.dataclass
class Trainer:
  """Everything a run needs, built from the config: the mesh, the models, the loaders, the
  train state and the jitted steps."""

  config: Config
  mesh: Mesh
  models: Models
  inputs: Inputs
  total_steps: int
  state: TrainState
  student_graphdef: nnx.GraphDef
  teacher_state: nnx.State | None   # None: supervised fine-tuning (teacher: null)
  train_step: Any
  eval_step: Any
  onpolicy: onpolicy_lib.OnPolicy | None = None

  def student(self, state: TrainState | None = None) -> Any:
    """The student model with the variables of `state` (default: the trainer's)."""
    return (self.state if state is None else state).student(self.student_graphdef)


@dataclasses.dataclass
class RunResult:
  metrics: dict[str, float]   # the last logged step's and the final held-out ones
  student: Any                # the trained student (an NNX model)
  preempted: bool = False     # stopped early by SIGTERM / a preemption notice / Ctrl-C, saved
  interrupted: bool = False   # stopped by Ctrl-C (the command exits 130)


def build_trainer(config: Config, mesh: Mesh | None = None) -> Trainer:
  """Mesh (from `config.mesh` unless given), models born sharded, loaders, the train state and
  the jitted steps."""
  # ---- mesh, models, data ----------------------------------------------------------------
  mesh = mesh or make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  check_batch_split(config, mesh)
  models = build_models(config, mesh)
  inputs = build_inputs(config, mesh, models.vocab_size, resolve_tokenizer(config))
  total_steps = config.train.steps or math.ceil(config.train.epochs *
                                                inputs.train.steps_per_epoch)

  # ---- the train state -------------------------------------------------------------------
  student_graphdef, state = train_state_template(config, models.student, mesh,
                                                 pad_id=inputs.pad_id)
  teacher_graphdef, teacher_state = (nnx.split(models.teacher) if models.teacher is not None
                                     else (None, None))   # SFT: no teacher in memory
  onpolicy = onpolicy_lib.build(config, student_graphdef, inputs.tokenizer, inputs.pad_id,
                                models.vocab_size)
  logger.info("student %s parameters trained of %s; %s",
              f"{count_params(state.params):,}", f"{count_params(nnx.state(models.student)):,}",
              "no teacher (supervised fine-tuning)" if teacher_state is None
              else f"teacher {count_params(teacher_state):,} (frozen)")

  # ---- the jitted steps ------------------------------------------------------------------
  train_step, eval_step = make_steps(config, student_graphdef, teacher_graphdef,
                                     jax.tree.map(lambda x: x.sharding, state),
                                     total_steps, models.vocab_size)
  return Trainer(config, mesh, models, inputs, total_steps, state, student_graphdef,
                 teacher_state, train_step, eval_step, onpolicy)


def check_batch_split(config: Config, mesh: Mesh) -> None:
  """Raises UserError when a micro-batch's rows do not split over the mesh's data-parallel
  devices."""
  data_parallel = data_parallel_size(mesh, resolve_rules(config.mesh.rules))
  micro_rows = config.train.batch_size // config.train.grad_accum
  if micro_rows % data_parallel:
    raise UserError(f"micro-batches of {micro_rows} rows (train.batch_size / train.grad_accum) "
                    f"do not split over the {data_parallel} data-parallel devices of the mesh; "
                    f"use a multiple of {data_parallel} rows")


def make_steps(config: Config, student_graphdef: nnx.GraphDef,
               teacher_graphdef: nnx.GraphDef | None, state_shardings: Any, total_steps: int,
               vocab_size: int) -> tuple[Any, Any]:
  """The run's jitted train step (the train state donated, kept in `state_shardings`) and
  held-out eval step: what `build_trainer` trains with and `csd-jax compile` compiles."""
  tx, schedule = make_optimizer(config.optim, total_steps)
  loss = config.loss
  # Chat pairs: beta at each step (constant, or the official gradual schedule).
  beta = functools.partial(pair_beta, start=loss.pair_beta, end=loss.pair_beta_end,
                           ramp=loss.pair_beta_ramp, total_steps=total_steps)
  objective = Objective(loss.name, loss.params, loss.kd_coef, loss.ce_coef, loss.lm_coef,
                        loss.fused, loss.chunk_size, loss.normalize, vocab_size,
                        resolve_rules(config.mesh.rules),
                        beta if config.data.source == "pairs" else None)
  train_step = jax.jit(
      make_train_step(student_graphdef, teacher_graphdef, tx, schedule, objective,
                      config.train.grad_accum),
      in_shardings=(state_shardings, None, None, None), out_shardings=(state_shardings, None),
      donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(student_graphdef, teacher_graphdef, objective))
  return train_step, eval_step


def _check_positions(config: Config, models: Models) -> None:
  """A model with a learned position table (GPT-2) has no position past it: refuse a
  `data.max_length` beyond it (it would index garbage, NaN, not an error)."""
  for role, model in (("teacher", models.teacher), ("student", models.student)):
    if model is not None and model.cfg.positions == "learned" and (
        config.data.max_length > model.cfg.max_position_embeddings):
      raise UserError(f"data.max_length={config.data.max_length} is beyond the {role}'s "
                      f"{model.cfg.max_position_embeddings} positions (learned position "
                      f"table); set data.max_length <= {model.cfg.max_position_embeddings}")


def _prepare_workdir(workdir: paths.PathLike, is_main: bool) -> bool:
  """Refuse a workdir that is a file or cannot be made; whether this call created it. (In an
  object store a directory is only a name prefix: it exists once something is written in it.)"""
  if workdir.exists() and not workdir.is_dir():
    raise UserError(f"--workdir {workdir} is a file, not a directory; pass a directory (new "
                    "or a run's own)")
  if not is_main or workdir.exists():
    return False
  try:
    workdir.mkdir(parents=True)
  except OSError as error:
    raise UserError(f"--workdir {workdir} cannot be created ({error.strerror}); pass a "
                    "writable directory") from None
  return True


def train(config: Config, workdir: paths.PathLike) -> RunResult:
  """Run the distillation described by `config` in `workdir`, or continue it from the latest
  complete checkpoint there. SIGTERM, Ctrl-C (or the platform's preemption notice) save at the
  next step boundary and return with `preempted` set.

  Raises:
    UserError: bad input, a run that diverged (non-finite updates in a row), a full or
      read-only disk (naming the last intact checkpoint).
  """
  workdir, is_main = paths.as_path(workdir), jax.process_index() == 0
  config = resolve_paths(config, os.getcwd())  # config.yaml must open from anywhere
  created = _prepare_workdir(workdir, is_main)
  try:
    return _train(config, workdir, is_main)
  except UserError:
    # Refused before it wrote anything but compiled programs: leave no half-made run behind.
    if created and _holds_only_compiled_programs(workdir):
      paths.remove_tree(workdir)
    raise
  except Exception as error:
    if (reason := storage_failure(error)) is None:
      raise   # a bug: its traceback is shown
    raise storage_error(reason, workdir, workdir / CHECKPOINTS) from None


def _holds_only_compiled_programs(workdir: paths.PathLike) -> bool:
  try:
    return {p.name for p in workdir.iterdir()} <= {compile_cache.CACHE_DIR}
  except FileNotFoundError:   # an object store's directory with nothing in it
    return False


@contextlib.contextmanager
def _one_run(workdir: paths.PathLike) -> Iterator[None]:
  """W/.lock, held by process 0 for the run. Every process learns whether process 0 was
  refused (the others would otherwise wait for it in their first collective, for ever)."""
  lock, refused = WorkdirLock(workdir), None
  try:
    lock.__enter__()
  except UserError as error:
    refused = str(error)
  if jax.process_count() > 1:
    refused = next((r for r in from_every_process(refused) if r), None)
  if refused:
    lock.release()
    raise UserError(refused)
  try:
    yield
  finally:
    lock.__exit__(None, None, None)


def _train(config: Config, workdir: paths.PathLike, is_main: bool) -> RunResult:
  # One run per workdir (W/.lock); signals caught before anything compiles (Preemption).
  with (_one_run(workdir), actions.Preemption(config.train.log_every) as preemption,
        compile_cache.enabled(config.train.compile_cache, workdir) as compiled):
    trainer = build_trainer(config)
    _check_positions(config, trainer.models)
    checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep)
    preemption.checkpointer = checkpointer
    try:
      result = _run(trainer, checkpointer, preemption, workdir, is_main)
    except BaseException:
      try:   # let the saves in flight end (or fail: the first error is the one to tell)
        checkpointer.close()
      except Exception:  # noqa: BLE001
        pass
      raise
    checkpointer.close()
    logger.info("%s", compiled.summary())
  return result


def _run(trainer: Trainer, checkpointer: Checkpointer, preemption: actions.Preemption,
         workdir: paths.PathLike, is_main: bool) -> RunResult:
  """The loop: from the resumed state to the last step (or a preemption), with its actions."""
  config = trainer.config
  state = actions.resume(checkpointer, trainer)
  start, total = int(actions.host_value(state.step)), trainer.total_steps
  if is_main:  # after the resume: a refused config must not replace the run's own
    record_config(workdir, to_dict(config), start)   # a changed one: config.step-<start>.yaml
  writer = MetricsWriter(workdir, enabled=is_main, wandb=config.metrics.wandb,
                         run_config=to_dict(config))   # W&B: process 0 only, if configured
  with jax.set_mesh(trainer.mesh), writer:
    nonfinite = actions.NonFinite(trainer, checkpointer)
    log = actions.Log(trainer, enabled=is_main, nonfinite=nonfinite)
    periodic = [log, actions.HeldOut(trainer), actions.GenerationEval(trainer, workdir)]
    save, preempted = actions.Save(trainer, checkpointer, flush=writer.flush), False
    try:
      for step in range(start, total):
        batch = next(trainer.inputs.train)
        lm_batch = next(trainer.inputs.lm) if trainer.inputs.lm is not None else None
        if trainer.onpolicy is not None:
          state, batch = trainer.onpolicy(state, batch, step)
        state, metrics = trainer.train_step(state, trainer.teacher_state, batch, lm_batch)
        nonfinite.observe(step + 1, metrics)
        log.observe(metrics, batch)
        done = step + 1
        row = {k: v for action in periodic for k, v in action(done, state).items()}
        if row:
          writer.write(done, row)
        if preempted := done < total and preemption.requested(done):
          nonfinite.settle()
          save.preempted(done, state)
          break
        if save.due(done):
          nonfinite.settle()
          save(done, state)
      nonfinite.settle()
    finally:
      log.close()
      periodic[2].close()
    if start < total and not preempted:
      save(total, state, wait=True)
    elif start >= total and (row := periodic[1](total, state, force=True)):  # where it stands
      writer.write(total, row)
  if preempted:
    return RunResult(log.last, trainer.student(state), preempted=True,
                     interrupted=preemption.interrupted)
  final = {**log.last, **periodic[1].last}
  logger.info("done: %d steps; %s", total, ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
  return RunResult(final, trainer.student(state))
