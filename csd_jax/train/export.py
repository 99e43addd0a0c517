"""`csd-jax export`: the student of a run's latest (or best) checkpoint as a Hugging Face
directory.

Only the student is built (not the teacher, not the data), sharded over the local devices;
LoRA adapters are merged into the kernels; the run's tokenizer is saved beside the weights, so
transformers (and vLLM) load the directory as it is. Its generation_config.json lists every
stop id of the run (`data.chat.stop_ids`: the tokenizer's eos, the chat template's end of turn,
the models' own eos ids), over the student's original generation settings where it has them.
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

from csd_jax.data.chat import run_model_stop_ids, stop_ids
from csd_jax.models import save_pretrained
from csd_jax.run import open_run

logger = logging.getLogger("csd_jax.export")


def export(workdir: str | pathlib.Path, out: str | pathlib.Path, *, best: bool = False
           ) -> tuple[pathlib.Path, int]:
  """Write the latest checkpoint's student (`best`: the best one's, W/best/) to `out`; returns
  (out, the checkpoint's step).

  Raises:
    UserError: no config.yaml or no readable checkpoint in `workdir`.
  """
  run = open_run(workdir, best=best)
  save_pretrained(run.student, out, run.tokenizer)
  _write_generation_config(pathlib.Path(out), run.config, run.tokenizer)
  logger.info("exported the student of step %d to %s", run.step, out)
  return pathlib.Path(out), run.step


def _write_generation_config(out: pathlib.Path, config: Any, tokenizer: Any) -> None:
  source = config.student.path
  original = pathlib.Path(source) / "generation_config.json" if source else None
  settings = (json.loads(original.read_text()) if original is not None and original.is_file()
              else {})
  eos = list(stop_ids(tokenizer, extra=run_model_stop_ids(config)))
  if eos:
    settings["eos_token_id"] = eos if len(eos) > 1 else eos[0]
  for name in ("bos_token_id", "pad_token_id"):
    value = getattr(tokenizer, name, None)
    if value is not None:
      settings.setdefault(name, value)
  (out / "generation_config.json").write_text(json.dumps(settings, indent=2))
