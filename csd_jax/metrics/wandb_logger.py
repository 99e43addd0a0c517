"""Weights & Biases for the run's metrics, optional: `metrics.wandb.project` turns it on.

`MetricsWriter` (process 0's: the only one enabled) hands each logged step here too: the same
scalars TensorBoard gets, with the run's step as W&B's x-axis. The W&B run id is kept in
`W/wandb_run.json`, so a resumed run continues the same W&B run (`resume="allow"`).

W&B is a side channel: not installed, unreachable, refusing the key, or failing later, it
warns once and training goes on without it. `wandb` is imported only when a project is set
(`pip install 'csd-jax[wandb]'`); W&B's own settings come from its environment variables
(`WANDB_API_KEY`, `WANDB_MODE=offline`, `WANDB_DIR`, `WANDB_INIT_TIMEOUT`, ...).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import string
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from etils import epath

if TYPE_CHECKING:
  from csd_jax.config import WandbConfig

logger = logging.getLogger("csd_jax.metrics")

RUN_FILE = "wandb_run.json"   # in the workdir: {"id": ..., "project": ..., "entity": ...}
STEP = "step"                 # the x-axis of every chart: the run's optimizer step
_ID_CHARS = string.ascii_lowercase + string.digits   # what W&B's own run ids are made of


def _first_line(error: BaseException) -> str:
  lines = str(error).strip().splitlines()
  return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def run_id(workdir: epath.Path, spec: WandbConfig) -> str:
  """The workdir's W&B run id: the one stored in `W/wandb_run.json`, or a new one, stored there
  (before W&B starts: a run whose first start failed still gets one id for good)."""
  path = workdir / RUN_FILE
  if path.exists():
    try:
      stored = json.loads(path.read_text())
    except ValueError:   # damaged by hand: a new W&B run, said so
      stored = None
    if isinstance(stored, dict) and isinstance(stored.get("id"), str) and stored["id"]:
      return stored["id"]
    logger.warning("%s holds no W&B run id; this run starts a new W&B run", path)
  new = "".join(secrets.choice(_ID_CHARS) for _ in range(8))
  path.write_text(json.dumps({"id": new, "project": spec.project, "entity": spec.entity}) + "\n")
  return new


def _files_dir(workdir: epath.Path) -> str | None:
  """Where W&B keeps its local files: `WANDB_DIR` if the user set it, else the workdir when it
  is local (the run's files together), else W&B's default (the working directory): W&B writes
  its files with local file calls. Given explicitly: W&B reads its environment once per
  process, at its first `init`."""
  if os.environ.get("WANDB_DIR"):
    return os.environ["WANDB_DIR"]
  return None if "://" in str(workdir) else os.fspath(workdir)


class WandbLogger:
  """A started W&B run: `log` each step's scalars, `finish` at the end. After a failed log it
  warns once and logs nothing more, but still finishes the run at the end (an unfinished run
  would be handed back by the next `wandb.init` of the process instead of a new one)."""

  def __init__(self, run: Any):
    self._run, self._logging = run, True

  @classmethod
  def open(cls, spec: WandbConfig, workdir: epath.Path,
           run_config: Mapping[str, Any] | None = None) -> WandbLogger | None:
    """The W&B run of `workdir` (resumed when it has one), or None after one warning line when
    wandb is missing or does not start."""
    try:
      import wandb
    except ImportError:
      logger.warning("metrics.wandb.project=%s, but wandb is not installed (pip install "
                     "'csd-jax[wandb]'); training goes on without W&B", spec.project)
      return None
    try:
      run = wandb.init(project=spec.project, entity=spec.entity, name=spec.name,
                       tags=list(spec.tags) or None, config=dict(run_config or {}),
                       id=run_id(workdir, spec), resume="allow", dir=_files_dir(workdir))
      # The run's step as the x-axis, not W&B's own `step=`: W&B drops a step below one it
      # has seen, and a resumed run logs again the steps after its checkpoint (TensorBoard
      # shows both, so does W&B).
      run.define_metric(STEP)
      run.define_metric("*", step_metric=STEP)
    except Exception as error:  # noqa: BLE001  W&B never stops a training run
      logger.warning("W&B did not start (%s); training goes on without it", _first_line(error))
      return None
    logger.info("W&B run %s (%s)", run.id, getattr(run, "url", None) or "offline")
    return cls(run)

  def log(self, step: int, scalars: Mapping[str, float]) -> None:
    """Logs `scalars` at `step` (W&B queues them: no network wait here)."""
    if self._run is None or not self._logging:
      return
    try:
      self._run.log({STEP: step, **scalars})
    except Exception as error:  # noqa: BLE001  W&B never stops a training run
      logger.warning("W&B failed to log step %d (%s); training goes on without it", step,
                     _first_line(error))
      self._logging = False

  def finish(self, *, failed: bool = False) -> None:
    """Ends the W&B run (uploads what it holds; `failed`: marked as crashed). Idempotent."""
    run, self._run = self._run, None
    if run is None:
      return
    try:
      run.finish(exit_code=1 if failed or not self._logging else 0)
    except Exception as error:  # noqa: BLE001  W&B never stops a training run
      logger.warning("W&B failed to finish its run (%s)", _first_line(error))
