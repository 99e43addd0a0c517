"""The training loop: the one place that ties config, mesh, models, data, step and metrics.

    config -> mesh -> teacher + student (born sharded) -> loaders -> jitted step -> loop
           -> W/metrics.jsonl, W/tensorboard/, progress bar, checkpoints, evaluations

The loop body is the step plus periodic actions, one per concern (`actions.py`): logging,
held-out evaluation, evaluation by generation, checkpointing, preemption. Metrics stay on the
device between log steps (no host synchronisation in the loop body). Only process 0 writes
files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
from typing import Any

import jax
import yaml
from flax import nnx
from jax.sharding import Mesh

from csd_jax import onpolicy as onpolicy_lib
from csd_jax.checkpoint import Checkpointer
from csd_jax.config import Config, resolve_paths, to_dict
from csd_jax.errors import UserError
from csd_jax.metrics import MetricsWriter
from csd_jax.data.inputs import Inputs, build_inputs
from csd_jax.run import (CONFIG_FILE, Models, build_models, resolve_tokenizer,
                         train_state_template)
from csd_jax.sharding import data_parallel_size, make_mesh, resolve_rules
from csd_jax.state import TrainState, make_optimizer
from csd_jax.train import actions
from csd_jax.train.flops import count_params
from csd_jax.train.step import Objective, make_eval_step, make_train_step

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
  preempted: bool = False     # stopped early by SIGTERM / a preemption notice, after a save


def build_trainer(config: Config, mesh: Mesh | None = None) -> Trainer:
  """Mesh (from `config.mesh` unless given), models born sharded, loaders, the train state and
  the jitted steps."""
  # ---- mesh, models, data ----------------------------------------------------------------
  mesh = mesh or make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  rules = resolve_rules(config.mesh.rules)
  data_parallel = data_parallel_size(mesh, rules)
  micro_rows = config.train.batch_size // config.train.grad_accum
  if micro_rows % data_parallel:
    raise UserError(f"micro-batches of {micro_rows} rows (train.batch_size / train.grad_accum) "
                    f"do not split over the {data_parallel} data-parallel devices of the mesh; "
                    f"use a multiple of {data_parallel} rows")
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
  tx, schedule = make_optimizer(config.optim, total_steps)
  loss = config.loss
  objective = Objective(loss.name, loss.params, loss.kd_coef, loss.ce_coef, loss.lm_coef,
                        loss.fused, loss.chunk_size, loss.normalize, models.vocab_size, rules)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  train_step = jax.jit(
      make_train_step(student_graphdef, teacher_graphdef, tx, schedule, objective,
                      config.train.grad_accum),
      in_shardings=(state_shardings, None, None, None), out_shardings=(state_shardings, None),
      donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(student_graphdef, teacher_graphdef, objective))
  return Trainer(config, mesh, models, inputs, total_steps, state, student_graphdef,
                 teacher_state, train_step, eval_step, onpolicy)


def train(config: Config, workdir: str | pathlib.Path) -> RunResult:
  """Run the distillation described by `config` in `workdir`, or continue it from the latest
  complete checkpoint there. SIGTERM (or the platform's preemption notice) saves at the next
  step boundary and returns with `preempted` set."""
  workdir, is_main = pathlib.Path(workdir), jax.process_index() == 0
  config = resolve_paths(config, os.getcwd())  # config.yaml must open from anywhere
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  trainer = build_trainer(config)
  checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep)
  state = actions.resume(checkpointer, trainer)
  if is_main:  # after the resume: a refused config must not replace the run's own
    (workdir / CONFIG_FILE).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
  start, total = int(actions.host_value(state.step)), trainer.total_steps
  with (jax.set_mesh(trainer.mesh), MetricsWriter(workdir, enabled=is_main) as writer,
        actions.Preemption(checkpointer, config.train.log_every) as preemption):
    log = actions.Log(trainer, enabled=is_main)
    periodic = [log, actions.HeldOut(trainer), actions.GenerationEval(trainer, workdir)]
    save, preempted = actions.Save(trainer, checkpointer), False
    for step in range(start, total):
      batch = next(trainer.inputs.train)
      lm_batch = next(trainer.inputs.lm) if trainer.inputs.lm is not None else None
      if trainer.onpolicy is not None:
        state, batch = trainer.onpolicy(state, batch, step)
      state, metrics = trainer.train_step(state, trainer.teacher_state, batch, lm_batch)
      log.observe(metrics, batch)
      done = step + 1
      row = {k: v for action in periodic for k, v in action(done, state).items()}
      if row:
        writer.write(done, row)
      if preempted := done < total and preemption.requested(done):
        save.preempted(done, state)
        break
      save.periodic(done, state)
    log.close()
    periodic[2].close()
    if start < total and not preempted:
      save(total, state, wait=True)
    elif start >= total and (row := periodic[1](total, state, force=True)):  # where it stands
      writer.write(total, row)
  checkpointer.close()
  if preempted:
    return RunResult(log.last, trainer.student(state), preempted=True)
  final = {**log.last, **periodic[1].last}
  logger.info("done: %d steps; %s", total, ", ".join(f"{k} {v:.4g}" for k, v in final.items()))
  return RunResult(final, trainer.student(state))
