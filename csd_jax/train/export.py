"""`csd-jax export`: the student of a run's latest checkpoint as a Hugging Face directory.

Only the student is built (not the teacher, not the data), sharded over the local devices;
LoRA adapters are merged into the kernels; the run's tokenizer is saved beside the weights, so
transformers (and vLLM) load the directory as it is.
"""

from __future__ import annotations

import logging
import pathlib

from csd_jax.models import save_pretrained
from csd_jax.run import open_run

logger = logging.getLogger("csd_jax.export")


def export(workdir: str | pathlib.Path, out: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  """Write the latest checkpoint's student to `out`; returns (out, the checkpoint's step).

  Raises:
    UserError: no config.yaml or no readable checkpoint in `workdir`.
  """
  run = open_run(workdir)
  save_pretrained(run.student, out, run.tokenizer)
  logger.info("exported the student of step %d to %s", run.step, out)
  return pathlib.Path(out), run.step
