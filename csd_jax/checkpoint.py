"""Orbax checkpoints of a run: the student's trained state, the data position, the config.

`W/checkpoints/<step>/` holds `state` (trained parameters (LoRA only under LoRA), the student's
other variables, the optimizer state, the step, the RNG key), `loader` (the data iterators'
positions, JSON) and `config` (the resolved config, JSON). Never the teacher: it is rebuilt
from its source. Saves are asynchronous; Orbax writes each step into a temporary directory and
renames it when complete, so a process killed mid-save leaves nothing that looks finished.
Restoring goes straight into the arrays' current shardings, whatever the mesh was at save
time; a checkpoint that cannot be read is skipped for the one before it, with a warning.
"""

from __future__ import annotations

import logging
import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

logger = logging.getLogger("csd_jax.checkpoint")


def _to_savable(state: Mapping[str, Any]) -> dict[str, Any]:
  """Typed PRNG keys become their raw key data (Orbax stores plain arrays)."""
  return {**state, "key": jax.random.key_data(state["key"])}


def _from_savable(state: Mapping[str, Any]) -> dict[str, Any]:
  return {**state, "key": jax.random.wrap_key_data(state["key"])}


def _abstract(tree: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpointer:
  """A run's `CheckpointManager`: `save(step, ...)`, `restore_latest(template) -> ... | None`."""

  def __init__(self, workdir: str | pathlib.Path, *, keep: int = 3, async_save: bool = True):
    self.directory = pathlib.Path(workdir).absolute() / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save,
                                           cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step: int, state: Mapping[str, Any], loader_state: Mapping[str, Any],
           config: Mapping[str, Any], *, wait: bool = False) -> None:
    """Start saving `step` (in the background unless `wait`)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_savable(state)),
        loader=ocp.args.JsonSave(dict(loader_state)), config=ocp.args.JsonSave(dict(config))),
        force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore_latest(self, template: Mapping[str, Any]
                     ) -> tuple[int, dict[str, Any], dict[str, Any]] | None:
    """(step, state, loader state) of the newest readable checkpoint, restored into the
    shardings of `template` (the freshly built state), or None when there is none."""
    self.manager.reload()
    target = _abstract(_to_savable(template))
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore()))
      except Exception as error:  # noqa: BLE001 (any unreadable checkpoint: fall back)
        logger.warning("checkpoint %d in %s cannot be read (%s: %s); falling back to the one "
                       "before it", step, self.directory, type(error).__name__,
                       str(error).splitlines()[0][:200] if str(error) else "")
        continue
      return step, _from_savable(restored["state"]), dict(restored["loader"])
    return None

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints on disk (readable or not)."""
    self.manager.reload()
    return sorted(self.manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True when the platform announced a preemption (JAX's preemption notice)."""
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
