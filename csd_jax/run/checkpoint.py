"""Orbax checkpoints of a run: the student's trained state, the data position, the config.

`W/checkpoints/<step>/` holds `state` (the fields of `csd_jax.run.state.TrainState`: the student's
trained and untrained variables, the optimizer state, the step, the RNG key, the replay
buffer), `loader` (the data iterators' positions, JSON), `config` (the resolved config, JSON)
and `checksums.process_<i>.json` (see `csd_jax.run.integrity`). Never the teacher: it is
rebuilt from its source. Saves are asynchronous; Orbax writes each step into a temporary
directory and renames it when complete (in an object store, which has no rename, it writes
`commit_success.txt` last), so a process killed mid-save leaves nothing that looks finished. Restoring goes straight into the arrays' current shardings, whatever the mesh was at
save time.

A damaged checkpoint never blocks nor poisons a run: a restore first checks the step's files
against their checksums, and a step that fails them, or that Orbax cannot read, is skipped for
the one before it with a one-line warning (Orbax's own tracebacks go to the debug log). When
training resumes, such a step is moved out of Orbax's sight into `W/checkpoints.unreadable/
<step>-<UTC time>/`, never deleted: left in place, the resumed run would reach its step again
and fail to save over it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import io
import logging
import sys
import threading
import traceback
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from csd_jax.run import integrity
from csd_jax.runtime import paths
from csd_jax.runtime.distributed import from_every_process
from csd_jax.runtime.logs import quiet_closed_loop_errors
from csd_jax.run.state import TrainState

logger = logging.getLogger("csd_jax.run.checkpoint")


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
UNREADABLE_SUFFIX = ".unreadable"   # W/checkpoints.unreadable/: a sibling Orbax never lists
# Loggers that report a failing read in their own words (absl: Orbax; asyncio: its event loop).
_NOISY_LOGGERS = ("absl", "orbax", "asyncio", "tensorstore")


def _one_line(error: BaseException) -> str:
  text = str(error).splitlines()[0] if str(error) else ""
  text = text if len(text) <= 200 else text[:199] + "…"
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


@contextlib.contextmanager
def _quiet_orbax(what: str) -> Iterator[None]:
  """Keep Orbax's own reports of a damaged step off the terminal: its absl ERROR lines (a step
  metadata file that does not parse, when the manager lists the steps), and the "Event loop is
  closed" tracebacks of TensorStore callbacks that find a failed restore's asyncio loop gone
  (unraisable exceptions: Python prints them through `sys.unraisablehook`). They go to this
  module's debug log; the user gets csd-jax's one-line warning. Only around listing and
  restoring, when no training step runs beside them."""
  buffer = io.StringIO()
  handler = logging.StreamHandler(buffer)
  saved = []
  for name in _NOISY_LOGGERS:
    noisy = logging.getLogger(name)
    saved.append((noisy, noisy.handlers, noisy.propagate))
    noisy.handlers, noisy.propagate = [handler], False

  def unraisable(args: Any) -> None:
    buffer.write(f"{args.err_msg or 'Exception ignored in'}: {args.object!r}\n")
    buffer.write("".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                    args.exc_traceback)))

  hook, sys.unraisablehook = sys.unraisablehook, unraisable
  try:
    yield
  finally:
    sys.unraisablehook = hook
    for noisy, handlers, propagate in saved:
      noisy.handlers, noisy.propagate = handlers, propagate
    if text := buffer.getvalue():
      logger.debug("Orbax's output while %s:\n%s", what, text)


class Checkpointer:
  """A run's `CheckpointManager`: `save(step, ...)`, `restore_latest(template) -> ... | None`.

  `W/checkpoints/` holds the newest `keep`; `W/best/` (`best_metric` set) holds the one
  checkpoint with the highest value of that metric, stored with it (Orbax writes a step's
  metrics in the step's own directory, so the record and the weights are committed together)
  and never touched by `checkpoint.keep`.
  """

  def __init__(self, workdir: paths.PathLike, *, keep: int = 3, async_save: bool = True,
               best_metric: str | None = None):
    self.best_metric = best_metric
    self.directory = paths.absolute(workdir) / (BEST if best_metric else CHECKPOINTS)
    self.unreadable = self.directory.with_name(self.directory.name + UNREADABLE_SUFFIX)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=1 if best_metric else keep, create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True,
        best_fn=(lambda metrics: metrics[best_metric]) if best_metric else None,
        best_mode="max")
    with _quiet_orbax(f"opening {self.directory}"):
      self.manager = ocp.CheckpointManager(self.directory, options=options)
    self._checksums: threading.Thread | None = None

  def save(self, step: int, state: TrainState, loader_state: Mapping[str, Any],
           config: Mapping[str, Any], *, wait: bool = False,
           metrics: Mapping[str, float] | None = None) -> None:
    """Start saving `step` (in the background unless `wait`), with `metrics` (W/best/). Its
    checksums follow in the background once it is committed."""
    self._wait_for_checksums()  # the previous step's: before `keep` can delete that step
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(_to_tree(state)),
        loader=ocp.args.JsonSave(dict(loader_state)), config=ocp.args.JsonSave(dict(config))),
        metrics=dict(metrics) if metrics else None, force=True)
    # A thread of our own, not an Orbax hook: Orbax's post-finalization callback runs on the
    # primary process only and before the rename. Not a daemon: a committed step gets its
    # checksums even when the main thread dies first.
    self._checksums = threading.Thread(target=self._write_checksums, args=(step,),
                                       name=f"checksums-{step}")
    self._checksums.start()
    if wait:
      self.wait()

  def wait(self) -> None:
    """Until the save in flight is committed and its checksums are written."""
    self.manager.wait_until_finished()
    self._wait_for_checksums()

  def _write_checksums(self, step: int) -> None:
    """Once `step` is committed on every process (the manager's finalize: commit, rename,
    barrier), hash the files this process wrote; immediately, so that the newest checkpoint,
    the one a crashed run resumes from, is the one most likely to be checked."""
    try:
      self.manager.wait_until_finished()
    except Exception:  # noqa: BLE001 (a failed save: Orbax raises it in the main thread too)
      return
    step_dir = self.directory / str(step)
    if not step_dir.is_dir():  # not committed, or already replaced by a better W/best/
      return
    try:
      integrity.write_checksums(step_dir, jax.process_index(), jax.process_count())
    except OSError as error:
      logger.warning("could not write the checksums of checkpoint %d (%s); it will be "
                     "restored unverified", step, _one_line(error))

  def _wait_for_checksums(self) -> None:
    if self._checksums is not None:
      self._checksums.join()
      self._checksums = None

  def best(self) -> tuple[int, float] | None:
    """(step, value) of the best checkpoint kept in W/best/, or None when there is none."""
    self._reload()
    step = self.manager.best_step()
    if step is None:
      return None
    return step, float(self.manager.metrics(step)[self.best_metric])

  def restore_latest(self, template: TrainState, *, move_aside: bool = True
                     ) -> tuple[int, TrainState, dict[str, Any]] | None:
    """(step, state, loader state) of the newest readable checkpoint, restored into the
    shardings of `template` (the freshly built state), or None when there is none.

    A step whose files fail their checksums, or that Orbax cannot restore while an older one
    restores, is skipped, and moved into `<directory>.unreadable/` when `move_aside`
    (training: it will save that step again); read-only users (eval, export) pass False. A
    step that Orbax fails to restore when no older one restores either is left in place: the
    template more likely does not fit the checkpoints (a changed config) than they are all
    damaged. A step without checksums is restored with a warning. Every process calls this;
    they reach the same verdicts (gathered), and only process 0 moves directories."""
    self._wait_for_checksums()
    self._reload()
    target = _abstract(_to_tree(template))
    damaged: list[tuple[int, str]] = []     # checksums failed: damage for certain
    failed: list[tuple[int, str]] = []      # Orbax failed: damage, unless every step fails
    for step in sorted(self.manager.all_steps(), reverse=True):
      verdict = integrity.verify(self.directory / str(step), jax.process_index(),
                                 jax.process_count())
      if verdict.damage:
        damaged.append((step, verdict.damage))
        continue
      error = None
      try:
        with _quiet_orbax(f"restoring step {step}"):
          restored = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore()))
      except Exception as exc:  # noqa: BLE001 (any unreadable checkpoint: fall back)
        error = _one_line(exc)
        quiet_closed_loop_errors()
      if error := next((e for e in from_every_process(error) if e), None):
        failed.append((step, error))
        continue
      self._set_aside(damaged + failed, move_aside)
      if verdict.unverified:
        logger.warning("checkpoint %d in %s could not be verified: %s; restored it unchecked",
                       step, self.directory, verdict.unverified)
      return step, _from_tree(restored["state"], template), dict(restored["loader"])
    # Nothing restored: only what the checksums prove damaged is moved; an Orbax failure on
    # every step is more likely a state that does not fit (the caller says so).
    oldest = min((step for step, _ in damaged + failed), default=None)
    self._set_aside(damaged, move_aside, oldest=oldest)
    self._set_aside(failed, False, oldest=oldest)
    return None

  def _set_aside(self, unreadable: list[tuple[int, str]], move: bool, *,
                 oldest: int | None = None) -> None:
    """Warn about each unreadable step and, when `move`, rename it out of Orbax's sight first.
    `oldest`: the oldest step on disk, when none was restored (there is nothing to fall back
    to after it)."""
    if not unreadable:
      return
    actions = {step: "left it in place" for step, _ in unreadable}
    if move:
      if jax.process_count() > 1:  # every process is done reading them
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("csd_jax.run.checkpoint: set aside")
      stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
      mine = ({str(step): self._move(step, stamp) for step, _ in unreadable}
              if jax.process_index() == 0 else {})
      actions = {int(step): action for step, action in from_every_process(mine)[0].items()}
      self._reload()  # after process 0's renames: the gather waited for them
    for step, reason in sorted(unreadable, reverse=True):
      then = ("no older checkpoint is left" if step == oldest
              else "falling back to the one before it")
      logger.warning("checkpoint %d in %s cannot be read (%s); %s, %s", step, self.directory,
                     reason, actions[step], then)

  def _move(self, step: int, stamp: str) -> str:
    """Rename step `step` into `<directory>.unreadable/<step>-<stamp>[-n]/`; what was done,
    for the warning (a rename can fail: a read-only or foreign directory)."""
    try:
      self.unreadable.mkdir(parents=True, exist_ok=True)
      destination, n = self.unreadable / f"{step}-{stamp}", 1
      while destination.exists():
        n += 1
        destination = self.unreadable / f"{step}-{stamp}-{n}"
      paths.rename_tree(self.directory / str(step), destination)
      return f"moved it to {destination}"
    except OSError as error:
      return f"could not move it aside ({_one_line(error)})"

  def _reload(self) -> None:
    with _quiet_orbax(f"listing {self.directory}"):
      self.manager.reload()

  def steps(self) -> list[int]:
    """The steps of the complete checkpoints on disk (readable or not)."""
    self._reload()
    return sorted(self.manager.all_steps())

  def reached_preemption(self, step: int) -> bool:
    """True when the platform announced a preemption (JAX's preemption notice)."""
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.wait()
    self.manager.close()
