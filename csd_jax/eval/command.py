"""`csd-jax eval`'s orchestration: which model, which tokenizer, which settings, which files.

A run (`--workdir`) is judged on its own prompt format: its template and lengths are the
defaults, and its tokenizer is the one it trained with. A model directory (`--model`) gets the
MiniLLM template and 256 / 512 tokens unless told otherwise. Answers end at any stop id: the
tokenizer's eos and end-of-turn token, and the eos ids of the model's config.json and
generation_config.json (a run's student and teacher). Models load sharded over every local
device (`csd_jax.run.inference_mesh`), so a teacher need not fit on one chip.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Sequence
from typing import Any

from csd_jax.data.chat import run_model_stop_ids, stop_ids
from csd_jax.errors import UserError
from csd_jax.eval import generation
from csd_jax.sampling import Sampling

# Without a run to take them from: the MiniLLM / DistiLLM evaluation's prompt format and lengths.
MODEL_DEFAULTS = {"template": "minillm", "max_prompt_length": 256, "max_length": 512}


@dataclasses.dataclass(frozen=True)
class EvalRequest:
  """What the command line asked for; None means "the run's, else MODEL_DEFAULTS"."""

  data: Sequence[str]                  # NAME=FILE
  workdir: str | None = None
  model: str | None = None
  teacher: str | None = None
  seeds: Sequence[int] = generation.DEFAULT_SEEDS
  sampling: Sampling = Sampling()
  template: str | None = None
  max_prompt_length: int | None = None
  max_length: int | None = None
  max_examples: int | None = None
  out: str | None = None


def parse_datasets(items: Sequence[str], limit: int | None
                   ) -> dict[str, list[dict[str, str]]]:
  """`NAME=FILE` items -> the records of each file (the first `limit`)."""
  datasets = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise UserError(f"--data {item!r}: expected NAME=FILE, e.g. dolly=dolly_test.jsonl")
    datasets[name] = generation.load_records(path, limit)
  return datasets


def _model_and_settings(request: EvalRequest) -> tuple[Any, Any, dict[str, Any], pathlib.Path]:
  """(model, tokenizer, the settings the request leaves open, default output path)."""
  from csd_jax.run import inference_mesh, open_run

  if request.workdir:
    run = open_run(request.workdir)
    data = run.config.data
    defaults = {"template": data.template, "max_prompt_length": data.max_prompt_length,
                "max_length": data.max_length, "stop_ids": run_model_stop_ids(run.config)}
    if run.tokenizer is None:
      raise UserError(f"{request.workdir}: the run has no tokenizer (data.tokenizer, teacher or "
                      "student directory); evaluation by generation needs one")
    return run.student, run.tokenizer, defaults, run.workdir / "eval_results.json"
  import transformers

  from csd_jax.models import load_pretrained

  model = load_pretrained(request.model, mesh=inference_mesh())
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(request.model)
  except (OSError, ValueError) as error:
    raise UserError(f"{request.model}: no tokenizer files ({type(error).__name__}); save the "
                    "tokenizer beside the model (csd-jax export does)") from error
  defaults = {**MODEL_DEFAULTS, "stop_ids": stop_ids(None, request.model)}
  return model, tokenizer, defaults, pathlib.Path("eval_results.json")


def run_eval(request: EvalRequest) -> tuple[dict[str, dict[str, Any]], pathlib.Path]:
  """Evaluate as `request` says; the results are written to their JSON file, whose path is
  returned with them."""
  from csd_jax.models import load_pretrained
  from csd_jax.run import inference_mesh

  datasets = parse_datasets(request.data, request.max_examples)
  model, tokenizer, settings, out = _model_and_settings(request)
  chosen = {"template": request.template, "max_prompt_length": request.max_prompt_length,
            "max_length": request.max_length}
  settings.update({k: v for k, v in chosen.items() if v is not None})
  teacher = load_pretrained(request.teacher, mesh=inference_mesh()) if request.teacher else None
  config = generation.EvalConfig(seeds=tuple(request.seeds), sampling=request.sampling,
                                 **settings)
  results = generation.evaluate(model, tokenizer, datasets, teacher=teacher, config=config)
  out = pathlib.Path(request.out) if request.out else out
  generation.write_results(results, out)
  return results, out
