"""The training loop: the one place that ties config, mesh, models, data, step and metrics.

    config -> mesh -> teacher + student (born sharded) -> loaders -> jitted step -> loop
           -> W/metrics.jsonl, W/tensorboard/, progress bar, held-out evaluation

Metrics stay on the device between log steps (no host synchronisation in the loop body);
every `train.log_every` steps they are fetched and written. Only process 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import signal
import threading
import time
from typing import Any

import jax
import numpy as np
import yaml
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from csd_jax import onpolicy as onpolicy_lib
from csd_jax.checkpoint import Checkpointer
from csd_jax.config import Config, to_dict
from csd_jax.metrics import MetricsWriter, ProgressBar, mfu, peak_flops_per_device
from csd_jax.sharding import make_mesh
from csd_jax.train.inputs import Inputs, build_inputs
from csd_jax.train.state import (Models, build_models, count_params, make_optimizer,
                                 model_flops_per_token, trainable_filter)
from csd_jax.train.step import Objective, make_eval_step, make_train_step

logger = logging.getLogger("csd_jax.train")


def _replicated(mesh, value: np.ndarray) -> jax.Array:
  """A host value replicated on every device of the mesh (of every process)."""
  value = np.asarray(value)
  return jax.make_array_from_callback(value.shape, NamedSharding(mesh, P()), lambda _: value)


def _host(x: jax.Array) -> np.ndarray:
  """The value of a replicated array (on several hosts, any local replica is the value)."""
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def _commit(tree: Any, mesh) -> Any:
  """Every leaf committed to a NamedSharding of `mesh` (a 1-device mesh hands out uncommitted
  single-device arrays, whose first jitted step would otherwise compile twice)."""
  def commit(x):
    if isinstance(x.sharding, NamedSharding):
      return x
    return jax.device_put(x, NamedSharding(mesh, P()))

  return jax.tree.map(commit, tree)


def _fetch(metrics: dict[str, Any]) -> dict[str, float]:
  return {k: float(_host(v)) for k, v in metrics.items()}


def evaluate(eval_step, state, teacher_state, loader, batches: int) -> dict[str, float]:
  """Held-out distillation loss and teacher-student top-1 agreement over `batches` batches
  (the same batches every time: the loader is rewound first)."""
  loader.rewind()
  totals = {"kd_sum": 0.0, "count": 0.0, "agree": 0.0}
  for _ in range(batches):
    out = _fetch(eval_step(state["params"], state["frozen"], teacher_state, next(loader)))
    totals = {k: totals[k] + out[k] for k in totals}
  count = max(totals["count"], 1.0)
  return {"eval_loss": totals["kd_sum"] / count, "eval_agreement": totals["agree"] / count}


@dataclasses.dataclass
class Trainer:
  """Everything a run needs, built from the config: the mesh, the models split into the jitted
  step's inputs, the loaders, and the step functions."""

  config: Config
  mesh: Mesh
  models: Models
  inputs: Inputs
  total_steps: int
  state: dict[str, Any]
  teacher_state: nnx.State
  student_graphdef: nnx.GraphDef
  train_step: Any
  eval_step: Any
  onpolicy: onpolicy_lib.OnPolicy | None = None

  def student(self, state: dict[str, Any] | None = None) -> Any:
    """The student model with the parameters of `state` (default: the trainer's)."""
    state = self.state if state is None else state
    return nnx.merge(self.student_graphdef, state["params"], state["frozen"])


@dataclasses.dataclass
class RunResult:
  metrics: dict[str, float]   # the last logged step's and the final held-out ones
  student: Any                # the trained student (an NNX model)
  preempted: bool = False     # stopped early by SIGTERM / a preemption notice, after a save


def build_trainer(config: Config, mesh: Mesh | None = None) -> Trainer:
  """Mesh (from `config.mesh` unless given), models born sharded, loaders, optimizer state and
  the jitted steps."""
  # ---- mesh, models, data ----------------------------------------------------------------
  mesh = mesh or make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  micro_rows = config.train.batch_size // config.train.grad_accum
  if micro_rows % data_parallel:
    raise ValueError(f"micro-batches of {micro_rows} rows (train.batch_size / train.grad_accum) "
                     f"do not split over the {data_parallel} data-parallel devices (mesh.data x "
                     f"mesh.fsdp); use a multiple of {data_parallel} rows")
  models = build_models(config, mesh)
  inputs = build_inputs(config, mesh, models.vocab_size)
  total_steps = config.train.steps or math.ceil(config.train.epochs *
                                                inputs.train.steps_per_epoch)

  # ---- optimizer and state ---------------------------------------------------------------
  tx, schedule = make_optimizer(config.optim, total_steps)
  student_graphdef, params, frozen = nnx.split(models.student, trainable_filter(config), ...)
  teacher_graphdef, teacher_state = nnx.split(models.teacher)
  state = {"params": params, "frozen": frozen, "opt_state": jax.jit(tx.init)(params),
           "step": _replicated(mesh, np.int32(0)),
           "key": jax.random.wrap_key_data(_replicated(
               mesh, jax.random.key_data(jax.random.key(config.train.seed))))}
  onpolicy = onpolicy_lib.build(config, student_graphdef, mesh, inputs.tokenizer, inputs.pad_id,
                                models.vocab_size)
  if onpolicy is not None and (replay := onpolicy.init_state(config)) is not None:
    state["replay"] = replay  # checkpointed with the rest: a resumed run draws the same rows
  state, teacher_state = _commit(state, mesh), _commit(teacher_state, mesh)
  logger.info("student %s parameters trained of %s; teacher %s (frozen)",
              f"{count_params(params):,}", f"{count_params(nnx.state(models.student)):,}",
              f"{count_params(teacher_state):,}")

  # ---- the jitted steps ------------------------------------------------------------------
  objective = Objective(config.loss.name, config.loss.params, config.loss.kd_coef,
                        config.loss.ce_coef, config.loss.lm_coef, config.loss.fused,
                        config.loss.chunk_size, config.loss.normalize, models.vocab_size)
  state_shardings = jax.tree.map(lambda x: x.sharding, state)
  train_step = jax.jit(
      make_train_step(student_graphdef, teacher_graphdef, tx, schedule, objective,
                      config.train.grad_accum),
      in_shardings=(state_shardings, None, None, None), out_shardings=(state_shardings, None),
      donate_argnums=(0,))
  eval_step = jax.jit(make_eval_step(student_graphdef, teacher_graphdef, objective))
  return Trainer(config, mesh, models, inputs, total_steps, state, teacher_state,
                 student_graphdef, train_step, eval_step, onpolicy)


class _PreemptionFlag:
  """Set by SIGTERM: the loop saves at the next step boundary and exits cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> _PreemptionFlag:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def __exit__(self, *exc: object) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _from_every_process(obj: Any) -> list[Any]:
  """`obj` (JSON-able) of every process, in process order (a host-level all-gather)."""
  if jax.process_count() == 1:
    return [obj]
  from jax.experimental import multihost_utils

  data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  sizes = multihost_utils.process_allgather(np.int32(data.size))
  padded = np.zeros(int(np.max(sizes)), np.uint8)
  padded[:data.size] = data
  gathered = multihost_utils.process_allgather(padded)
  return [json.loads(bytes(gathered[i][:int(sizes[i])]).decode()) for i in range(len(sizes))]


def _loader_states(inputs: Inputs) -> dict[str, Any]:
  """Every process's data position (each reads its own slice of the data)."""
  mine = {"train": inputs.train.get_state(),
          **({"lm": inputs.lm.get_state()} if inputs.lm is not None else {})}
  return {"per_process": _from_every_process(mine)}


def _any_process(flag: bool) -> bool:
  """True on every process when `flag` is True on any (SIGTERM may reach one process first)."""
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils

  return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _resume(checkpointer: Checkpointer, trainer: Trainer) -> dict[str, Any]:
  """The state to start from: the latest readable checkpoint's, or the fresh one."""
  restored = checkpointer.restore_latest(trainer.state)
  if restored is None and checkpointer.steps():
    # Never start over on top of a run's checkpoints: a changed config (LoRA, on-policy
    # buffer) no longer matches their structure, or every one of them is damaged.
    raise ValueError(f"none of the checkpoints {checkpointer.steps()} in {checkpointer.directory}"
                     " can be restored into this config's state (changed lora.* or onpolicy.*? "
                     "see the warnings above); resume with the run's own config, or use a new "
                     "workdir")
  if restored is None:
    return trainer.state
  step, state, loaders = restored
  per_process = loaders["per_process"]
  if len(per_process) != jax.process_count():
    logger.warning("the checkpoint was written by %d processes, this run has %d: each process "
                   "continues from process 0's data position", len(per_process),
                   jax.process_count())
  mine = per_process[jax.process_index() if len(per_process) == jax.process_count() else 0]
  trainer.inputs.train.set_state(mine["train"])
  if trainer.inputs.lm is not None and "lm" in mine:
    trainer.inputs.lm.set_state(mine["lm"])
  logger.info("resuming from the checkpoint of step %d in %s", step, checkpointer.directory)
  return state


def _generation_eval(config: Config, trainer: Trainer, workdir: pathlib.Path):
  """`(step, state) -> metrics`: the student judged by generation (`eval.every` steps), with
  the results (samples included) in W/eval/step_<N>.json; None when `eval.every` is 0."""
  if not config.eval.every:
    return None
  if jax.process_count() > 1:
    raise ValueError("eval.every > 0 runs on one process only; set eval.every=0 and run "
                     "`csd-jax eval --workdir W` on the checkpoints")
  from csd_jax.eval import generation

  settings, datasets = generation.run_settings(config), generation.run_datasets(config)
  teacher = trainer.models.teacher

  def run(step: int, state: dict[str, Any]) -> dict[str, float]:
    start = time.perf_counter()
    results = generation.evaluate(trainer.student(state), trainer.inputs.tokenizer, datasets,
                                  teacher=teacher, config=settings)
    (workdir / "eval").mkdir(exist_ok=True)
    generation.write_results(results, workdir / "eval" / f"step_{step}.json")
    metrics = generation.flat_metrics(results)
    logger.info("step %d, evaluation by generation (%.0f s): %s", step,
                time.perf_counter() - start, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics

  return run


def train(config: Config, workdir: str | pathlib.Path) -> RunResult:
  """Run the distillation described by `config` in `workdir`, or continue it from the latest
  complete checkpoint there. SIGTERM (or the platform's preemption notice) saves at the next
  step boundary and returns with `preempted` set."""
  workdir = pathlib.Path(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    workdir.mkdir(parents=True, exist_ok=True)
  trainer = build_trainer(config)
  models, inputs, total_steps = trainer.models, trainer.inputs, trainer.total_steps
  teacher_state = trainer.teacher_state
  train_step, eval_step, mesh = trainer.train_step, trainer.eval_step, trainer.mesh
  checkpointer = Checkpointer(workdir, keep=config.checkpoint.keep)
  state = _resume(checkpointer, trainer)
  if is_main:  # after the resume: a refused config must not replace the run's own
    (workdir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
  generation_eval = _generation_eval(config, trainer, workdir)

  def save(step: int, wait: bool = False) -> None:
    checkpointer.save(step, state, _loader_states(inputs), to_dict(config), wait=wait)

  # ---- the loop --------------------------------------------------------------------------
  seq_len = config.data.max_length
  flops_per_token = (model_flops_per_token(models.student, seq_len, backward=True)
                     + model_flops_per_token(models.teacher, seq_len, backward=False))
  peak = peak_flops_per_device(jax.devices()[0])
  peak = peak * jax.device_count() if peak else None
  start_step = int(_host(state["step"]))
  progress = ProgressBar(total_steps, start_step=start_step) if is_main else None
  logged: dict[str, float] = {}
  final: dict[str, float] = {}
  tokens_since, time_since = 0, time.perf_counter()
  with (jax.set_mesh(mesh), MetricsWriter(workdir, enabled=is_main) as writer,
        _PreemptionFlag() as preemption):
    for step in range(start_step, total_steps):
      batch = next(inputs.train)
      lm_batch = next(inputs.lm) if inputs.lm is not None else None
      if trainer.onpolicy is not None:
        state, batch = trainer.onpolicy(state, batch, step)
      state, metrics = train_step(state, teacher_state, batch, lm_batch)
      tokens_since += int(np.prod(batch["input_ids"].shape))
      done = step + 1
      if done % config.train.log_every == 0 or done == total_steps:
        logged = _fetch(metrics)
        elapsed = time.perf_counter() - time_since
        logged["tokens_per_s"] = tokens_since / elapsed
        utilisation = mfu(flops_per_token * tokens_since, elapsed, peak)
        if utilisation is not None:
          logged["mfu"] = utilisation
        if config.train.eval_every and done % config.train.eval_every == 0 and inputs.eval:
          logged.update(evaluate(eval_step, state, teacher_state, inputs.eval,
                                 config.train.eval_batches))
        writer.write(done, logged)
        if progress:
          progress.update(done, loss=logged["loss"], tokens_per_s=logged["tokens_per_s"],
                          mfu=logged.get("mfu"))
        tokens_since, time_since = 0, time.perf_counter()
      # Across processes the SIGTERM flag is agreed on at log steps (a collective, so not every
      # step); JAX's own preemption notice is already agreed on.
      stop = preemption.requested
      if jax.process_count() > 1:
        stop = _any_process(stop) if done % config.train.log_every == 0 else False
      if done < total_steps and (stop or checkpointer.reached_preemption(done)):
        save(done, wait=True)
        checkpointer.close()
        if progress:
          progress.close()
        logger.warning("preempted: saved the checkpoint of step %d in %s; re-run the same "
                       "command to continue", done, checkpointer.directory)
        return RunResult(logged, trainer.student(state), preempted=True)
      if config.checkpoint.every and done % config.checkpoint.every == 0 and done < total_steps:
        save(done)
      if generation_eval and (done % config.eval.every == 0 or done == total_steps):
        writer.write(done, generation_eval(done, state))
    if progress:
      progress.close()
    if start_step < total_steps:
      save(total_steps, wait=True)
    if inputs.eval is not None:
      final = evaluate(eval_step, state, teacher_state, inputs.eval, config.train.eval_batches)
      writer.write(total_steps, {**logged, **final})
  checkpointer.close()
  logger.info("done: %d steps; %s", total_steps,
              ", ".join(f"{k} {v:.4g}" for k, v in {**logged, **final}.items()))
  return RunResult({**logged, **final}, trainer.student(state))
