"""`csd-jax export`: the student of a run's latest (or best) checkpoint as a Hugging Face
directory.

Only the student is built (not the teacher, not the data), sharded over the local devices;
LoRA adapters are merged into the kernels; the run's tokenizer is saved beside the weights, so
transformers (and vLLM) load the directory as it is. Its generation_config.json lists every
stop id of the run (`data.chat.stop_ids`: the tokenizer's eos, the chat template's end of turn,
the models' own eos ids), over the student's original generation settings where it has them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import pathlib
import tempfile
from typing import Any

from etils import epath

from csd_jax.runtime import paths
from csd_jax.data.chat import run_model_stop_ids, stop_ids
from csd_jax.errors import UserError
from csd_jax.models import save_pretrained
from csd_jax.models.io import hub
from csd_jax.run.models import open_run

logger = logging.getLogger("csd_jax.export")


def export(workdir: paths.PathLike, out: paths.PathLike, *, best: bool = False
           ) -> tuple[epath.Path, int]:
  """Write the latest checkpoint's student (`best`: the best one's, W/best/) to `out`; returns
  (out, the checkpoint's step). An `out` in an object store (gs://...) is written in a local
  temporary directory first (safetensors and tokenizers write local files), then uploaded.

  Raises:
    UserError: `out` is a file, or a directory of something other than a model; no config.yaml
      or no readable checkpoint in `workdir`. Checked before anything is written.
  """
  check_out_dir(out, "--out")
  out = paths.as_path(out)
  run = open_run(workdir, best=best)
  with contextlib.ExitStack() as stack:
    local = (pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="csd-export-")))
             if paths.is_remote(out) else out)
    save_pretrained(run.student, local, run.tokenizer)
    _write_generation_config(paths.as_path(local), run.config, run.tokenizer)
    if local is not out:
      paths.copy_tree(local, out, last=("config.json",))   # a cut upload is no model
  logger.info("exported the student of step %d to %s", run.step, out)
  return out, run.step


def check_out_dir(out: paths.PathLike, option: str) -> None:
  """`out` can become a model directory: absent, empty, or a model directory already (written
  over); not a file, and not a directory of other files (a workdir, a home), which an export
  would litter.

  Raises:
    UserError: naming `option` and the path.
  """
  out = paths.as_path(out)
  if out.exists() and not out.is_dir():
    raise UserError(f"{option} {out}: is a file, not a directory; name a new directory (or a "
                    "model directory to write over)")
  if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
    raise UserError(f"{option} {out}: a directory that holds other files than a model; name a "
                    "new or empty directory")


def _write_generation_config(out: epath.Path, config: Any, tokenizer: Any) -> None:
  source = config.student.path
  original = hub.cached_file(source, "generation_config.json") if source else None
  settings = json.loads(original.read_text()) if original is not None else {}
  eos = list(stop_ids(tokenizer, extra=run_model_stop_ids(config)))
  if eos:
    settings["eos_token_id"] = eos if len(eos) > 1 else eos[0]
  for name in ("bos_token_id", "pad_token_id"):
    value = getattr(tokenizer, name, None)
    if value is not None:
      settings.setdefault(name, value)
  (out / "generation_config.json").write_text(json.dumps(settings, indent=2))
