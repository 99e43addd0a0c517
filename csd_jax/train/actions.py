"""The training loop's periodic actions, one per concern, and the resume that precedes them.

Each action is called after every step with the number of steps done and the state, decides
with `itstime` whether it is its turn, and returns the metrics it produced (an empty dict when
it did nothing); the loop writes a step's metrics in one row.

- `Log`: the step's metrics, throughput and MFU every `train.log_every` steps, progress bar;
- `HeldOut`: the held-out loss, KL, CSD and agreement every `train.heldout_every` steps;
- `GenerationEval`: evaluation by generation every `eval.every` steps or epoch
  (W/eval/step_<N>.json), and model selection (the best checkpoint in W/best/);
- `Save`: a checkpoint every `checkpoint.every` steps, and the final one;
- `Preemption`: SIGTERM or the platform's notice: the loop saves and stops.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from csd_jax.runtime import paths
from csd_jax.run.checkpoint import Checkpointer
from csd_jax.config import to_dict
from csd_jax.runtime.distributed import from_every_process
from csd_jax.errors import UserError
from csd_jax.metrics import ProgressBar, mfu, peak_flops_per_device
from csd_jax.run.state import TrainState, all_finite
from csd_jax.metrics.flops import model_flops_per_token

logger = logging.getLogger("csd_jax.train")


def itstime(step: int, every: int, total: int, *, last: bool = True) -> bool:
  """Whether an action with period `every` (0: never, but at the end with `last`) runs after
  `step` of `total` steps: at every multiple of `every`, and at the last step when `last`."""
  return (every > 0 and step % every == 0) or (last and step == total)


def host_value(x: jax.Array) -> np.ndarray:
  """The value of a replicated array (on several hosts, any local replica is the value)."""
  return np.asarray(x if x.is_fully_addressable else x.addressable_data(0))


def _fetch(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
  return {k: float(host_value(v)) for k, v in metrics.items()}


class NonFinite:
  """Updates the step skipped because the loss, the gradients or the result were not finite:
  counted (`nonfinite_steps`), each streak warned about, and the run stopped with one line
  after `train.max_nonfinite_steps` in a row.

  A step's flag is read one step late (after the next step is dispatched), so that the loop
  never waits on the device for it; `settle` reads it at once (before a save, at the end).
  """

  def __init__(self, trainer: Any, checkpointer: Checkpointer):
    self.limit = trainer.config.train.max_nonfinite_steps
    self.config, self.checkpointer = trainer.config, checkpointer
    self.pending: tuple[int, jax.Array] | None = None
    self.streak = self.total = 0

  def observe(self, done: int, metrics: Mapping[str, jax.Array]) -> None:
    previous, self.pending = self.pending, (done, metrics["nonfinite"])
    if previous is not None:
      self._count(*previous)

  def settle(self) -> None:
    if self.pending is not None:
      pending, self.pending = self.pending, None
      self._count(*pending)

  def _count(self, step: int, flag: jax.Array) -> None:
    if not int(host_value(flag)):
      self.streak = 0
      return
    self.streak += 1
    self.total += 1
    if self.streak == 1:
      logger.warning("step %d: the loss or the gradients are not finite (NaN / inf); the update "
                     "was skipped", step)
    if self.streak >= self.limit:
      self.checkpointer.wait()   # a save in flight counts
      saved = self.checkpointer.steps()
      raise UserError(
          f"step {step}: {self.streak} updates in a row were not finite and were skipped "
          f"(train.max_nonfinite_steps={self.limit}); the run stopped. Likely causes: "
          f"optim.lr={self.config.optim.lr:g} too high, data.max_length="
          f"{self.config.data.max_length} beyond the model's positions, float16 overflow "
          f"(use bfloat16); " + (f"the last checkpoint, step {saved[-1]}, is finite: fix the "
                                 "cause and re-run to resume from it" if saved
                                 else "no checkpoint was written"))


class Log:
  """The train step's metrics, tokens/s and MFU every `train.log_every` steps and at the end
  (fetched from the device only then), and the progress bar."""

  def __init__(self, trainer: Any, *, enabled: bool, nonfinite: NonFinite):
    self.every, self.total = trainer.config.train.log_every, trainer.total_steps
    self.nonfinite = nonfinite
    seq_len = trainer.config.data.max_length
    teacher = trainer.models.teacher
    self.flops_per_token = (
        model_flops_per_token(trainer.models.student, seq_len, backward=True)
        + (model_flops_per_token(teacher, seq_len, backward=False) if teacher else 0))
    peak = peak_flops_per_device(jax.devices()[0])
    self.peak = peak * jax.device_count() if peak else None
    self.progress = ProgressBar(self.total) if enabled else None
    self.metrics: Mapping[str, jax.Array] = {}
    self.last: dict[str, float] = {}
    self.tokens, self.since = 0, time.perf_counter()

  def observe(self, metrics: Mapping[str, jax.Array], batch: Mapping[str, Any]) -> None:
    """A step's (device) metrics and its batch's tokens."""
    self.metrics = metrics
    self.tokens += int(np.prod(batch["input_ids"].shape))

  def __call__(self, done: int, state: TrainState) -> dict[str, float]:
    del state
    if not itstime(done, self.every, self.total):
      return {}
    row = _fetch(self.metrics)
    # The step's own flag (not yet counted: read one step late) -> the run's count so far.
    row["nonfinite_steps"] = self.nonfinite.total + int(row.pop("nonfinite"))
    elapsed = time.perf_counter() - self.since
    row["tokens_per_s"] = self.tokens / elapsed
    utilisation = mfu(self.flops_per_token * self.tokens, elapsed, self.peak)
    if utilisation is not None:
      row["mfu"] = utilisation
    if self.progress:
      self.progress.update(done, loss=row["loss"], tokens_per_s=row["tokens_per_s"],
                           mfu=row.get("mfu"))
    self.tokens, self.since, self.last = 0, time.perf_counter(), row
    return row

  def close(self) -> None:
    if self.progress:
      self.progress.close()


class HeldOut:
  """Held-out metrics every `train.heldout_every` steps and at the end, over the same
  `train.heldout_batches` batches each time (the loader is rewound): the objective's loss
  (`eval_loss`), KL(p||q) and CSD at T = 1 whatever the objective (`eval_kl`, `eval_csd`: runs
  with different losses compare on them) and the teacher-student top-1 agreement."""

  def __init__(self, trainer: Any):
    self.trainer = trainer
    self.every = trainer.config.train.heldout_every
    self.batches = trainer.config.train.heldout_batches
    self.last: dict[str, float] = {}

  def __call__(self, done: int, state: TrainState, *, force: bool = False) -> dict[str, float]:
    loader = self.trainer.inputs.eval
    if loader is None or not (force or itstime(done, self.every, self.trainer.total_steps)):
      return {}
    loader.rewind()
    sums: dict[str, float] = {}
    for _ in range(self.batches):
      out = _fetch(self.trainer.eval_step(state, self.trainer.teacher_state, next(loader)))
      sums = {k: sums.get(k, 0.0) + v for k, v in out.items()}
    count = max(sums["count"], 1.0)
    if "kd" not in sums:   # supervised fine-tuning: the objective is the cross-entropy
      self.last = {"eval_loss": sums["ce"] / count}
      return self.last
    self.last = {"eval_loss": sums["kd"] / count, "eval_kl": sums["kl"] / count,
                 "eval_csd": sums["csd"] / count, "eval_agreement": sums["agree"] / count}
    return self.last


class GenerationEval:
  """The student judged by generation every `eval.every` steps, after every epoch
  (`eval.every_epoch`) and at the end (neither set: never), with the results (samples
  included) in W/eval/step_<N>.json. With `eval.select`, model selection as the official runs:
  the checkpoint with the best ROUGE-L on that dataset so far is kept in W/best/ (a resumed run
  goes on comparing with it). One process only."""

  def __init__(self, trainer: Any, workdir: paths.PathLike):
    self.trainer, self.workdir = trainer, workdir
    config = trainer.config
    self.every, self.total = config.eval.every, trainer.total_steps
    self.epoch = trainer.inputs.train.steps_per_epoch if config.eval.every_epoch else 0
    self.best: Save | None = None
    if not (self.every or self.epoch):
      return
    if jax.process_count() > 1:
      raise UserError("eval.every / eval.every_epoch run on one process only; turn them off and "
                      "run `csd-jax eval --workdir W` on the checkpoints")
    from csd_jax.eval import generation
    from csd_jax.run.models import selection_metric

    self.generation = generation
    self.settings = generation.run_settings(config)
    self.datasets = generation.run_datasets(config)
    if config.eval.select is not None:
      self.metric = selection_metric(config)
      self.best = Save(trainer, Checkpointer(workdir, best_metric=self.metric))
      kept = self.best.checkpointer.best()
      self.best_value = kept[1] if kept else -float("inf")
      if kept:
        logger.info("model selection: the best checkpoint so far is step %d (%s %.4g)", kept[0],
                    self.metric, kept[1])

  def due(self, done: int) -> bool:
    return (itstime(done, self.every, self.total, last=False)
            or itstime(done, self.epoch, self.total, last=bool(self.every or self.epoch)))

  def __call__(self, done: int, state: TrainState) -> dict[str, float]:
    if not (self.every or self.epoch) or not self.due(done):
      return {}
    start = time.perf_counter()
    results = self.generation.evaluate(
        self.trainer.student(state), self.trainer.inputs.tokenizer, self.datasets,
        teacher=self.trainer.models.teacher, config=self.settings)
    (self.workdir / "eval").mkdir(exist_ok=True)
    self.generation.write_results(results, self.workdir / "eval" / f"step_{done}.json")
    metrics = self.generation.flat_metrics(results)
    logger.info("step %d, evaluation by generation (%.0f s): %s", done,
                time.perf_counter() - start, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    if self.best is not None and metrics[self.metric] > self.best_value:
      self.best_value = metrics[self.metric]
      self.best(done, state, wait=True, metrics={self.metric: self.best_value})
      logger.info("model selection: step %d is the best so far (%s %.4g), kept in %s", done,
                  self.metric, self.best_value, self.best.checkpointer.directory)
    return metrics

  def close(self) -> None:
    if self.best is not None:
      self.best.checkpointer.close()


# ---- checkpoints: save, preemption, resume ---------------------------------------------------

@jax.jit
def _state_is_finite(state: TrainState) -> jax.Array:
  return all_finite((state.params, state.opt_state))


class Save:
  """Checkpoints with every process's data position and the resolved config."""

  def __init__(self, trainer: Any, checkpointer: Checkpointer, *,
               flush: Callable[[], None] = lambda: None):
    self.trainer, self.checkpointer = trainer, checkpointer
    self.every = trainer.config.checkpoint.every
    self.flush = flush   # the metrics writer's: on object storage it buffers a few seconds

  def __call__(self, step: int, state: TrainState, *, wait: bool = False,
               metrics: Mapping[str, float] | None = None) -> None:
    if not bool(host_value(_state_is_finite(state))):   # a checkpoint is never poisoned
      logger.warning("step %d: the state holds non-finite values; not saved (the checkpoints "
                     "in %s are kept as they are)", step, self.checkpointer.directory)
      return
    inputs = self.trainer.inputs
    mine = {"train": inputs.train.get_state(),
            **({"lm": inputs.lm.get_state()} if inputs.lm is not None else {})}
    self.flush()   # every step up to the checkpoint's is stored before the checkpoint is
    self.checkpointer.save(step, state, {"per_process": from_every_process(mine)},
                           to_dict(self.trainer.config), wait=wait, metrics=metrics)

  def preempted(self, done: int, state: TrainState) -> None:
    """The checkpoint of a preempted run, written before the process goes."""
    self(done, state, wait=True)
    logger.warning("preempted: saved the checkpoint of step %d in %s; re-run the same command "
                   "to continue", done, self.checkpointer.directory)

  def due(self, done: int) -> bool:
    """Every `checkpoint.every` steps before the last (the loop saves the last one itself)."""
    return done < self.trainer.total_steps and itstime(done, self.every, 0, last=False)


class Preemption:
  """SIGTERM and Ctrl-C (SIGINT) set a flag; `requested(step)` is True on every process once
  any process got one (agreed at log steps: a collective, so not every step) or JAX announced
  a preemption. A second Ctrl-C exits at once (status 130), without a traceback.

  Entered before anything compiles: Python's default SIGINT handler raises KeyboardInterrupt
  wherever the main thread is, and raised while XLA compiles (a call into C++ that may be
  running Python callbacks) it crashed the process; a handler that only sets a flag is safe.
  """

  def __init__(self, log_every: int):
    self.log_every = log_every
    self.checkpointer: Checkpointer | None = None   # set once the run has one
    self.signalled: int | None = None   # the first signal received
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> Preemption:
    if threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGINT and self.signalled == signal.SIGINT:
      print("\ninterrupted again: exiting now, without saving", file=sys.stderr, flush=True)
      os._exit(130)   # at once, wherever the main thread is: no traceback, no clean-up
    if signum == signal.SIGINT:
      print("\ninterrupted: saving at the next step boundary, then exiting (Ctrl-C again to "
            "exit now, without saving)", file=sys.stderr, flush=True)
    self.signalled = self.signalled or signum

  @property
  def interrupted(self) -> bool:
    """Stopped by Ctrl-C (the command exits 130), not by SIGTERM / a preemption (0)."""
    return self.signalled == signal.SIGINT

  def __exit__(self, *exc: object) -> None:
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def requested(self, step: int) -> bool:
    stop = self.signalled is not None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      stop = (bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
              if step % self.log_every == 0 else False)
    return stop or (self.checkpointer is not None and self.checkpointer.reached_preemption(step))


def resume(checkpointer: Checkpointer, trainer: Any) -> TrainState:
  """The state to start from: the latest readable checkpoint's (the loaders moved to its data
  position), or the trainer's fresh one."""
  restored = checkpointer.restore_latest(trainer.state)
  if restored is None and checkpointer.steps():
    # Never start over on top of a run's checkpoints: a changed config (LoRA, on-policy
    # buffer) no longer matches their structure, or every one of them is damaged.
    raise UserError(f"none of the checkpoints {checkpointer.steps()} in "
                    f"{checkpointer.directory} can be restored into this config's state "
                    "(changed lora.* or onpolicy.*? see the warnings above); resume with the "
                    "run's own config, or use a new workdir")
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
