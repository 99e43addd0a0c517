"""`csd-jax eval --task NAME`: a run's student (or a model directory) judged on a task as the
official evaluator judges it, with `csd-jax eval`'s batched KV-cache generation
(`generation.generate_answers`) and its results JSON and table (`write_results`,
`format_table`).

Every prompt is the user's turn of the tokenizer's chat template with its generation prompt
(the official scripts' `apply_chat_template(..., add_generation_prompt=True)`), encoded without
the tokenizer's special tokens by default (the template writes its own BOS; vLLM, which the
official scripts use, adds a second one to Gemma's prompts: `prompt_special_tokens=True` does
the same). A prompt longer than `max_prompt_length` keeps its end (the generation prompt) and is
counted in `prompts_truncated`. Decoding is greedy, up to the task's new tokens; an answer ends
at the model's stop ids (eos, end of turn) and is cut at the task's stop strings, as vLLM's
`stop=[...]` cuts it. Generation also stops at any token whose text holds a stop string: what
follows would be cut anyway.

Results, per dataset: the task's metrics, the settings (new tokens, prompt length, stop strings
and ids, sampling), the counts, the wall time, and one record per example (prompt, output, and
the task's fields). Written to `--out`, else beside the run (W/eval_{task}.json) or to
./eval_{task}.json for a model directory.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

from csd_jax.runtime import paths
from csd_jax.errors import UserError
from csd_jax.eval.tasks import get_task

logger = logging.getLogger("csd_jax.eval")


@dataclasses.dataclass(frozen=True)
class TaskRequest:
  """What the command line asked for; None means "as the task sets it"."""

  task: str
  data: Sequence[str]                  # NAME=FILE
  workdir: str | None = None
  model: str | None = None
  best: bool = False                   # the run's best checkpoint (W/best/), not its latest
  max_new_tokens: int | None = None
  max_prompt_length: int | None = None
  max_examples: int | None = None
  prompt_special_tokens: bool = False
  batch_size: int = 16
  comet_model: str | None = None       # translation: a local COMET checkpoint
  out: str | None = None


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
  """`text` up to the earliest occurrence of any stop string (excluded)."""
  cuts = [i for i in (text.find(s) for s in stop_strings) if i != -1]
  return text[:min(cuts)] if cuts else text


def text_stop_ids(tokenizer: Any, stop_strings: Sequence[str]) -> tuple[int, ...]:
  """Ids of the tokens whose own text holds a stop string (`\\n`, `.\\n\\n`, ...)."""
  if not stop_strings:
    return ()
  singles = [[i] for i in range(len(tokenizer))]
  backend = getattr(tokenizer, "backend_tokenizer", None)   # a fast tokenizer: 4x quicker
  pieces = (backend.decode_batch(singles, skip_special_tokens=True) if backend is not None
            else tokenizer.batch_decode(singles, skip_special_tokens=True))
  return tuple(i for i, piece in enumerate(pieces) if any(s in piece for s in stop_strings))


def answer_decoder(tokenizer: Any, end_ids: Sequence[int], text_ids: Sequence[int],
                   stop_strings: Sequence[str]) -> Callable[[np.ndarray], str]:
  """Row of new token ids -> answer: up to the first end id (excluded) or text-stop token
  (included: its text before the stop string belongs to the answer), decoded without special
  tokens, cut at the first stop string."""
  texts = set(text_ids) - set(end_ids)
  stops = np.asarray(sorted(set(end_ids) | texts), np.int64)

  def decode(row: np.ndarray) -> str:
    hits = np.flatnonzero(np.isin(row, stops))
    if len(hits):
      first = int(hits[0])
      row = row[:first + (1 if int(row[first]) in texts else 0)]
    return cut_at_stop_strings(tokenizer.decode(row, skip_special_tokens=True), stop_strings)

  return decode


def _output_path(request: TaskRequest, default: epath.Path, task_name: str) -> epath.Path:
  if request.out:
    return paths.as_path(request.out)
  return default.with_name(default.name.replace("eval_results", f"eval_{task_name}"))


def run_task(request: TaskRequest) -> tuple[dict[str, dict[str, Any]], epath.Path, Any]:
  """Evaluate as `request` says; returns the results (also written to their JSON file), the
  file's path and the task module (its `COLUMNS` make the table)."""
  from csd_jax.data.chat import stop_ids
  from csd_jax.data.instruct import render_prompt
  from csd_jax.eval import generation
  from csd_jax.eval.command import load_model, parse_datasets
  from csd_jax.sampling import GREEDY

  task = get_task(request.task)
  if request.comet_model:
    if task.NAME != "translation":
      raise UserError(f"--comet-model scores translations: use it with --task translation, not "
                      f"{task.NAME}")
    task.check_comet_model(request.comet_model)
  if request.batch_size < 1:
    raise UserError(f"--batch-size {request.batch_size}: must be >= 1")
  datasets = parse_datasets(request.data, request.max_examples, task.read)
  max_new = request.max_new_tokens or task.MAX_NEW_TOKENS
  max_prompt = request.max_prompt_length or task.MAX_PROMPT_LENGTH
  model, tokenizer, own, default_out = load_model(request.workdir, request.model,
                                                  best=request.best)
  config = generation.EvalConfig(
      seeds=(0,), sampling=GREEDY, max_prompt_length=max_prompt,
      max_length=max_prompt + max_new, max_new_tokens=max_new, batch_size=request.batch_size,
      template="chat", keep_prompt="end", prompt_special_tokens=request.prompt_special_tokens,
      stop_ids=tuple((own or {}).get("stop_ids", ())))
  ends = stop_ids(tokenizer, model, extra=config.stop_ids)
  texts = text_stop_ids(tokenizer, task.STOP_STRINGS)
  decode = answer_decoder(tokenizer, ends, texts, task.STOP_STRINGS)
  results = {}
  for name, examples in datasets.items():
    start = time.perf_counter()
    prompts = [render_prompt(e.record, "chat", tokenizer) for e in examples]
    lengths = [len(ids) for ids in tokenizer(
        prompts, add_special_tokens=config.prompt_special_tokens)["input_ids"]]
    truncated = sum(length > max_prompt for length in lengths)
    if truncated:
      logger.warning("%s: %d of %d prompts longer than %d tokens lost their start: raise "
                     "--max-prompt-length", name, truncated, len(prompts), max_prompt)
    prompt_ids = generation.encode_prompts(tokenizer, prompts, config)
    outputs = generation.generate_answers(model, tokenizer, prompt_ids, 0, config,
                                          (*ends, *texts), decode=decode)
    scored = task.score(examples, prompts, outputs, comet_model=request.comet_model)
    records = scored.pop("records")
    seconds = time.perf_counter() - start
    results[name] = {"task": task.NAME, **scored, "examples": len(examples),
                     "prompts_truncated": truncated, "max_new_tokens": max_new,
                     "max_prompt_length": max_prompt, "stop_strings": list(task.STOP_STRINGS),
                     "stop_ids": list(ends), "sampling": dataclasses.asdict(GREEDY),
                     "prompt_special_tokens": request.prompt_special_tokens,
                     "seconds": seconds, "records": records}
    logger.info("%s: %s on %d examples in %.0f s: %s", name, task.NAME, len(examples), seconds,
                ", ".join(f"{c} {scored[c]:.2f}" if isinstance(scored[c], float)
                          else f"{c} {scored[c]}" for c in task.COLUMNS))
  out = _output_path(request, default_out, task.NAME)
  generation.write_results(results, out)
  return results, out, task
