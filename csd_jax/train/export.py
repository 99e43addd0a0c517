"""`csd-jax export`: the student of a run's latest checkpoint as a Hugging Face directory.

Only the student is built (not the teacher, not the data); LoRA adapters are merged into the
kernels; the tokenizer (the run's `data.tokenizer`, else the teacher's or the student's) is
saved beside the weights, so transformers (and vLLM) load the directory as it is.
"""

from __future__ import annotations

import logging
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from csd_jax.checkpoint import Checkpointer
from csd_jax.config import load_config
from csd_jax.models import save_pretrained
from csd_jax.onpolicy import initial_replay
from csd_jax.sharding import make_mesh
from csd_jax.train.state import build_models_student_only, make_optimizer, trainable_filter

logger = logging.getLogger("csd_jax.export")


def _tokenizer(config: Any) -> Any | None:
  import transformers

  for path in (config.data.tokenizer, config.teacher.path, config.student.path):
    if path:
      try:
        return transformers.AutoTokenizer.from_pretrained(path)
      except (OSError, ValueError):
        continue
  return None


def restore_student(workdir: str | pathlib.Path) -> tuple[Any, Any, int]:
  """(the student of the latest readable checkpoint, the run's config, its step).

  Raises:
    FileNotFoundError: no config.yaml or no readable checkpoint in `workdir`.
  """
  workdir = pathlib.Path(workdir)
  if not (workdir / "config.yaml").exists():
    raise FileNotFoundError(f"{workdir} has no config.yaml: not a csd-jax run directory")
  config = load_config(workdir / "config.yaml")
  mesh = make_mesh(-1, 1, 1)
  student = build_models_student_only(config, mesh)
  graphdef, params, frozen = nnx.split(student, trainable_filter(config), ...)
  tx, _ = make_optimizer(config.optim, max(config.train.steps, 1))
  template = {"params": params, "frozen": frozen, "opt_state": jax.jit(tx.init)(params),
              "step": jnp.int32(0), "key": jax.random.key(0)}
  if (replay := initial_replay(config)) is not None:  # its shapes, to read the checkpoint
    template["replay"] = replay
  restored = Checkpointer(workdir, keep=config.checkpoint.keep).restore_latest(template)
  if restored is None:
    raise FileNotFoundError(f"no readable checkpoint in {workdir / 'checkpoints'}")
  step, state, _ = restored
  return nnx.merge(graphdef, state["params"], state["frozen"]), config, step


def run_tokenizer(config: Any) -> Any | None:
  """The run's tokenizer: `data.tokenizer`, else the teacher's, else the student's."""
  return _tokenizer(config)


def export(workdir: str | pathlib.Path, out: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """Write the latest checkpoint's student to `out`; returns (out, the checkpoint's step).

  Raises:
    FileNotFoundError: no config.yaml or no readable checkpoint in `workdir`.
  """
  model, config, step = restore_student(workdir)
  save_pretrained(model, out, _tokenizer(config))
  logger.info("exported the student of step %d to %s", step, out)
  return pathlib.Path(out), step
