"""Orbax checkpoints of a run: the student's trained state, the data position, the config.

`W/checkpoints/<step>/` holds `state` (the fields of `csd_jax.state.TrainState`: the student's
trained and untrained variables, the optimizer state, the step, the RNG key, the replay
buffer), `loader` (the data iterators' positions, JSON) and `config` (the resolved config,
JSON). Never the teacher: it is rebuilt
from its source. Saves are asynchronous; Orbax writes each step into a temporary directory and
renames it when complete, so a process killed mid-save leaves nothing that looks finished.
Restoring goes straight into the arrays' current shardings, whatever the mesh was at save
time; a checkpoint that cannot be read is skipped for the one before it, with a warning.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from csd_jax.state import TrainState

logger = logging.getLogger("csd_jax.checkpoint")


def _to_tree(state: TrainState) -> dict[str, Any]:
  """The state as the checkpoint stores it: a dict of its fields (an absent replay buffer is
  left out), the PRNG key as its raw data (Orbax stores plain arrays)."""
  tree = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
  tree["key"] = jax.random.key_data(state.key)
  return {name: value for name, value in tree.items() if value is not None}


def _from_tree(tree: Mapping[str, Any], template: TrainState) -> TrainState:
  return template.replace(**{**tree, "key": jax.random.wrap_key_data(tree["key"])})


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


CHECKPOINTS, BEST = "checkpoints", "best"


class Checkpointer:
  """A run's `CheckpointManager`: `save(step, ...)`, `restore_latest(template) -> ... | None`.

  `W/checkpoints/` holds the newest `keep`; `W/best/` (`best_metric` set) holds the one
  checkpoint with the highest value of that metric, stored with it (Orbax writes a step's
  metrics in the step's own directory, so the record and the weights are committed together)
  and never touched by `checkpoint.keep`.
  """

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True,
               best_metric: str | None = None):
    self.best_metric = best_metric
    self.directory = pathlib.Path(workdir).absolute() / (BEST if best_metric else CHECKPOINTS)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1 if best_metric else keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
        best_mode="max")
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: TrainState, loader_state: Mapping[str, Any],
           config: Mapping[str, Any], *, wait: bool = False,
           metrics: Mapping[str, float] | None = None) -> None:
    """Start saving `step` (in the background unless `wait`), with `metrics` (W/best/)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_tree(state)),
        loader=ocp.args.JsonSave(dict(loader_state)), config=ocp.args.JsonSave(dict(config))),
        metrics=dict(metrics) if metrics else None, force=True)
    if wait:
      self.manager.wait_until_finished()

  def best(self) -> tuple[int, float] | None:
    """(step, value) of the best checkpoint kept in W/best/, or None when there is none."""
    self.manager.reload()
    step = self.manager.best_step()
    if step is None:
      return None
    return step, float(self.manager.metrics(step)[self.best_metric])

  def restore_latest(self, template: TrainState
                     ) -> tuple[int, TrainState, dict[str, Any]] | None:
    """(step, state, loader state) of the newest readable checkpoint, restored into the
    shardings of `template` (the freshly built state), or None when there is none."""
    self.manager.reload()
    target = _abstract(_to_tree(template))
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore()))
      except Exception as error:  # noqa: BLE001 (any unreadable checkpoint: fall back)
        logger.warning("checkpoint %d in %s cannot be read (%s: %s); falling back to the one "
                       "before it", step, self.directory, type(error).__name__,
                       str(error).splitlines()[0][:200] if str(error) else "")
        continue
      return step, _from_tree(restored["state"], template), dict(restored["loader"])
    return None

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints on disk (readable or not)."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True when the platform announced a preemption (JAX's preemption notice)."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
