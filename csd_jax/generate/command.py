"""`csd-jax generate`'s orchestration: the prompts, the model (a Hugging Face directory or a run's
student, loaded as `csd-jax eval` loads it), the settings, and the files written.

`--format jsonl` writes the responses to `--out` itself (resumable, see `responses.py`);
`alpaca_eval` and `mt_bench` keep that JSONL beside the answer file as `OUT.responses` (the
record a re-run resumes from; no `.jsonl` suffix, so that FastChat, which reads every `*.jsonl`
of its answer directory, never takes it for a model's answers) and write `OUT` from it once
every response is there.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

from csd_jax.runtime import paths
from csd_jax.errors import UserError
from csd_jax.generate.prompt_sets import check_format, load_prompts, write_answer_file
from csd_jax.generate.responses import DEFAULT_SAMPLING, GenerateConfig, generate_responses
from csd_jax.sampling import Sampling

RESPONSES_SUFFIX = ".responses"


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
  """What the command line asked for (defaults: the official CSD generation script's)."""

  prompts: str
  out: str
  workdir: str | None = None
  model: str | None = None
  best: bool = False
  output_format: str = "jsonl"
  model_id: str | None = None
  n: int = 1
  seed: int = 42
  temperature: float = DEFAULT_SAMPLING.temperature
  top_p: float = DEFAULT_SAMPLING.top_p
  top_k: int = 0
  max_new_tokens: int = 1024
  max_prompt_length: int = 2048
  batch_size: int = 32
  template: str | None = None          # None: a run's data.template, else chat
  mt_bench_temperatures: bool = False
  max_examples: int | None = None
  dtype: str = "auto"                  # a model directory's: auto = bfloat16 on GPU / TPU
  progress_every: float = 10.0         # seconds between progress lines


def responses_path(out: str | pathlib.Path, output_format: str) -> pathlib.Path:
  """Where the responses' JSONL goes: `out` itself for jsonl, else `out` + `.responses`."""
  out = pathlib.Path(out)
  return out if output_format == "jsonl" else out.with_name(out.name + RESPONSES_SUFFIX)


def _dtype(name: str) -> Any:
  import jax
  import jax.numpy as jnp

  if name == "auto":
    return None if jax.default_backend() == "cpu" else jnp.bfloat16
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if name not in dtypes:
    raise UserError(f"--dtype {name!r}: valid: auto, float32, bfloat16")
  return dtypes[name]


def run_generate(request: GenerateRequest) -> tuple[pathlib.Path, dict[str, Any]]:
  """Generate as `request` says; returns the output path and a summary (responses, new tokens,
  unfinished responses, model id)."""
  from csd_jax.data.chat import stop_ids
  from csd_jax.eval.command import load_model

  if not request.workdir and not request.model:
    raise UserError("pass --model DIR (a Hugging Face directory) or --workdir RUN")
  prompts = load_prompts(request.prompts, request.max_examples)   # bad input before loading
  check_format(request.output_format, prompts, request.n)
  if paths.is_remote(request.out):
    raise UserError(f"--out {request.out}: generate appends and syncs each batch to a local "
                    "file (that is how it resumes); write it locally, then copy it to the bucket")
  out = pathlib.Path(request.out)
  if not out.parent.is_dir():
    raise UserError(f"--out {out}: directory {out.parent} does not exist; create it first")
  if not 0 <= request.seed < 2**31:
    raise UserError(f"--seed {request.seed}: must be within 0 <= seed < 2**31")
  sampling = Sampling(temperature=request.temperature, top_p=request.top_p,
                      top_k=request.top_k)
  settings = GenerateConfig(sampling=sampling, max_new_tokens=request.max_new_tokens,
                            max_prompt_length=request.max_prompt_length, seed=request.seed,
                            n=request.n, batch_size=request.batch_size,
                            template=request.template or "chat",
                            mt_bench_temperatures=request.mt_bench_temperatures)
  model, tokenizer, own, _ = load_model(request.workdir, request.model, best=request.best,
                                        dtype=None if request.workdir else _dtype(request.dtype))
  if request.template is None and request.workdir:
    settings = dataclasses.replace(settings, template=own["template"])
  source = paths.absolute(request.workdir or request.model)   # local or gs://...
  model_id = request.model_id or (source.name + ("-best" if request.best else ""))
  stops = stop_ids(tokenizer, model, extra=own["stop_ids"])
  records = generate_responses(model, tokenizer, prompts, settings,
                               responses_path(out, request.output_format), model_id=model_id,
                               stops=stops, progress_every=request.progress_every)
  if request.output_format != "jsonl":
    write_answer_file(request.output_format, out, prompts, records, model_id, seed=request.seed)
  summary = {"responses": len(records), "new_tokens": sum(r["new_tokens"] for r in records),
             "unfinished": sum(not r["finished"] for r in records), "model_id": model_id,
             "responses_file": str(responses_path(out, request.output_format))}
  return out, summary
