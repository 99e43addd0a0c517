"""`csd-jax eval`'s orchestration: which model, which tokenizer, which settings, which files.

The settings come from the protocol (`eval/protocol.py`; default `minillm`, the official
evaluation), then from the command line. A run (`--workdir`) keeps its own template under
either protocol (under `run`, its lengths too) and its tokenizer; `--best` takes its best
checkpoint (W/best/) instead of its latest. Answers end at any stop id: the
tokenizer's eos and end-of-turn token, and the eos ids of the model's config.json and
generation_config.json (a run's student and teacher). Models load sharded over every local
device (`csd_jax.run.models.inference_mesh`), so a teacher need not fit on one chip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from etils import epath

from csd_jax.runtime import paths
from csd_jax.data.chat import run_model_stop_ids, stop_ids
from csd_jax.errors import UserError
from csd_jax.eval import generation
from csd_jax.eval.protocol import protocol_settings
from csd_jax.sampling import Sampling


@dataclasses.dataclass(frozen=True)
class EvalRequest:
  """What the command line asked for; None means "as the protocol says" (`eval/protocol.py`:
  `minillm`, the official evaluation, or `run`, the run's own template and lengths)."""

  data: Sequence[str]                  # NAME=FILE
  workdir: str | None = None
  model: str | None = None
  teacher: str | None = None
  best: bool = False                   # the run's best checkpoint (W/best/), not its latest
  protocol: str = "minillm"
  seeds: Sequence[int] | None = None
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  no_repeat_ngram_size: int | None = None
  template: str | None = None
  max_prompt_length: int | None = None
  max_length: int | None = None
  max_new_tokens: int | None = None
  keep_prompt: str | None = None
  prompt_special_tokens: bool | None = None
  max_examples: int | None = None
  out: str | None = None


def parse_datasets(items: Sequence[str], limit: int | None,
                   read: Callable[[str, int | None], Any] | None = None) -> dict[str, Any]:
  """`NAME=FILE` items -> what `read(FILE, limit)` gives for each file (default: its first
  `limit` instruction records)."""
  datasets = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise UserError(f"--data {item!r}: expected NAME=FILE, e.g. test=test.jsonl")
    datasets[name] = (read or generation.load_records)(path, limit)
  return datasets


def load_model(workdir: str | None, model_dir: str | None, *, best: bool = False,
               dtype: Any = None) -> tuple[Any, Any, dict[str, Any] | None, epath.Path]:
  """(model, tokenizer, the run's own settings or None for a model directory, default output
  path) of a run's student (`workdir`; `best`: its best checkpoint) or of a Hugging Face
  directory (`model_dir`, loaded in `dtype`, default float32), sharded over every local device.
  Shared by `csd-jax eval` and `csd-jax generate`."""
  from csd_jax.run.models import inference_mesh, open_run

  if workdir:
    run = open_run(workdir, best=best)
    data = run.config.data
    own = {"template": data.template, "max_prompt_length": data.max_prompt_length,
           "max_length": data.max_length, "stop_ids": run_model_stop_ids(run.config)}
    if run.tokenizer is None:
      raise UserError(f"{workdir}: the run has no tokenizer (data.tokenizer, teacher or "
                      "student directory); generation needs one")
    name = "eval_results_best.json" if best else "eval_results.json"
    return run.student, run.tokenizer, own, run.workdir / name
  if best:
    raise UserError("--best picks a run's best checkpoint: use it with --workdir, not --model")
  import transformers

  from csd_jax.models import load_pretrained
  from csd_jax.models.io import hub

  dtypes = {"dtype": dtype, "param_dtype": dtype} if dtype is not None else {}
  model = load_pretrained(model_dir, mesh=inference_mesh(), **dtypes)
  try:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(hub.resolve(model_dir)))
  except (OSError, ValueError) as error:
    raise UserError(f"{model_dir}: no tokenizer files ({type(error).__name__}); save the "
                    "tokenizer beside the model (csd-jax export does)") from error
  return model, tokenizer, {"stop_ids": stop_ids(None, model_dir)}, paths.as_path(
      "eval_results.json")


def eval_config(request: EvalRequest, run: dict[str, Any] | None) -> generation.EvalConfig:
  """The protocol's settings, the run's where the protocol takes them from it, then every
  setting the request gives."""
  settings = protocol_settings(request.protocol, run)
  given = {k: getattr(request, k) for k in (
      "seeds", "no_repeat_ngram_size", "template", "max_prompt_length", "max_length",
      "max_new_tokens", "keep_prompt", "prompt_special_tokens")}
  settings.update({k: v for k, v in given.items() if v is not None})
  if settings["template"] == "chat" and request.prompt_special_tokens is None:
    settings["prompt_special_tokens"] = False   # a chat template writes its own BOS
  sampling = Sampling(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                      no_repeat_ngram_size=settings.pop("no_repeat_ngram_size"))
  return generation.EvalConfig(sampling=sampling, seeds=tuple(settings.pop("seeds")), **settings)


def run_eval(request: EvalRequest) -> tuple[dict[str, dict[str, Any]], epath.Path]:
  """Evaluate as `request` says; the results are written to their JSON file, whose path is
  returned with them."""
  from csd_jax.models import load_pretrained
  from csd_jax.run.models import inference_mesh

  datasets = parse_datasets(request.data, request.max_examples)
  model, tokenizer, run, out = load_model(request.workdir, request.model, best=request.best)
  config = eval_config(request, run)
  teacher = load_pretrained(request.teacher, mesh=inference_mesh()) if request.teacher else None
  results = generation.evaluate(model, tokenizer, datasets, teacher=teacher, config=config)
  out = paths.as_path(request.out) if request.out else out
  generation.write_results(results, out)
  return results, out
