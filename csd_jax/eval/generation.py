"""`csd-jax eval`: a student judged by generation, as the paper does.

For every dataset (local JSONL / JSON / Parquet instruction files: Dolly test, Self-Instruct,
Vicuna, S-NI, UnNI, ...) and every seed (10, 20, 30, 40, 50 by default), the model samples an
answer to each prompt (temperature 1, top-p 1, top-k 0 by default; prompt <= 256 and total <=
512 tokens) with the KV cache. Reported per dataset: ROUGE-L against the reference responses
(averaged over seeds), Self-BLEU across the seeds' answers to the same prompt (diversity), the
perplexity of the reference responses, and, with a teacher, the teacher-student KL(p||q), CSD
at T = 1 and the top-1 agreement on the reference responses.

Shapes are fixed so that compiles do not grow with the data: every batch has `batch_size`
rows, and prompts (left-padded) and teacher-forced rows (right-padded) are padded to multiples
of `PROMPT_WIDTH_MULTIPLE`; a prompt bucket of width w gets `max_length - w` new tokens. The
teacher-forced metrics come from hidden states and LM heads a chunk of tokens at a time
(`losses.chunked_token_sums`), never `[N, V]` logits. The tokenizer given is only read.
This package imports neither grain nor tensorflow-datasets (csd_jax.data.records / batching).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from csd_jax.runtime import paths
from csd_jax.data.batching import (PROMPT_WIDTH_MULTIPLE, bucket_length, left_pad, pad_batch,
                                   until_stop)
from csd_jax.data.chat import run_model_stop_ids, stop_ids
from csd_jax.data.fields import IGNORE_INDEX
from csd_jax.data.instruct import InstructionTokenizer, load_records, render_prompt
from csd_jax.errors import UserError
from csd_jax.eval.text_metrics import rouge_l, self_bleu
from csd_jax.losses import chunked_token_sums
from csd_jax.models import generate
from csd_jax.sampling import Sampling

DEFAULT_SEEDS = (10, 20, 30, 40, 50)
# Prompts and teacher-forced rows are padded to multiples of this (capped at the maximum
# length): a handful of shapes, so each jitted function compiles once per width, not per batch.
# Tokens per chunk of the teacher-forced metrics: each chunk holds a few [chunk, V] float32
# temporaries per model (0.2 GB each at 1024 x 50257), which a CPU host pays in RAM.
CHUNK_SIZE = 256
# The teacher-forced comparisons, as `chunked_token_sums` names them: KL(p||q) and CSD at T = 1.
_TEACHER_LOSSES = {"fkl": ("fkl", {}), "csd": ("csd", {})}
logger = logging.getLogger("csd_jax.eval")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """How `evaluate` samples and scores. Every batch has `batch_size` rows (the last one is
  filled with copies whose answers are dropped), so that shapes, not batches, set compiles."""

  seeds: Sequence[int] = DEFAULT_SEEDS
  sampling: Sampling = Sampling()   # the paper's: temperature 1, top-k / top-p / no-repeat off
  max_prompt_length: int = 256
  max_length: int = 512
  batch_size: int = 16
  template: str = "minillm"
  max_examples: int | None = None   # the first N records of each dataset (None: all)
  # None: a prompt bucket of width w gets max_length - w new tokens; a number: every prompt
  # gets that many (the official protocol: 256, its prompts all left-padded to 256)
  max_new_tokens: int | None = None
  keep_prompt: str = "end"          # a long prompt keeps its "end" (as training) or "start"
  prompt_special_tokens: bool = False  # the tokenizer's special tokens (BOS) on the prompt
  # Ids that end an answer besides the tokenizer's and the model's own (`evaluate` adds those):
  # a run's student / teacher files' eos ids (`run_settings`), e.g. generation_config.json's.
  stop_ids: tuple[int, ...] = ()

  def __post_init__(self) -> None:
    if not isinstance(self.sampling, Sampling):
      raise UserError(f"sampling={self.sampling!r}: expected a csd_jax.sampling.Sampling, e.g. "
                      "Sampling(temperature=1.0, top_p=0.9)")
    if self.batch_size < 1:
      raise UserError(f"batch_size={self.batch_size}: must be >= 1")
    if not 0 < self.max_prompt_length < self.max_length:
      raise UserError(f"max_prompt_length={self.max_prompt_length}, max_length="
                      f"{self.max_length}: need 0 < max_prompt_length < max_length, so that an "
                      "answer has room")
    if self.max_new_tokens is not None and self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")
    if self.keep_prompt not in ("start", "end"):
      raise UserError(f"keep_prompt={self.keep_prompt!r}: valid: start (the official protocol "
                      "keeps a prompt's first tokens), end (training keeps the last)")


def run_settings(config: Any) -> EvalConfig:
  """The evaluation settings of a training run: its `eval` section's seeds and sampling, its
  data's template and lengths, the eos ids its student and teacher declare."""
  section, data = config.eval, config.data
  return EvalConfig(seeds=tuple(section.seeds), sampling=section.sampling,
                    max_prompt_length=data.max_prompt_length, max_length=data.max_length,
                    batch_size=section.batch_size, template=data.template,
                    stop_ids=run_model_stop_ids(config))


def run_datasets(config: Any) -> dict[str, list[dict[str, str]]]:
  """The records of a training run's `eval.datasets` (the first `eval.max_examples`); the path
  `split:valid` names the run's own validation split (model selection, as the official runs)."""
  from csd_jax.config import VALIDATION_SPLIT
  from csd_jax.data.inputs import validation_records

  limit = config.eval.max_examples or None
  return {name: (validation_records(config, limit) if path == VALIDATION_SPLIT
                 else load_records(path, limit))
          for name, path in config.eval.datasets.items()}


def flat_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """`{dataset}/{metric}` scalars of `evaluate`'s results, for the metrics log."""
  names = ("rougeL", "self_bleu", "perplexity", "kl", "csd", "agreement")
  return {f"{dataset}/{k}": float(row[k]) for dataset, row in results.items()
          for k in names if k in row}


def _token_id(tokenizer: Any, name: str) -> int | None:
  value = getattr(tokenizer, f"{name}_token_id", None)
  return None if value is None else int(value)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], cfg: EvalConfig) -> list[list[int]]:
  """Token ids of each prompt (with the tokenizer's special tokens when
  `cfg.prompt_special_tokens`), a long one keeping its first or last `cfg.max_prompt_length`.

  Truncation and padding are done here, not by the tokenizer, so that the caller's tokenizer
  is never reconfigured (padding side, truncation side, pad token).
  """
  encoded = tokenizer(list(prompts), add_special_tokens=cfg.prompt_special_tokens)["input_ids"]
  keep = cfg.max_prompt_length
  return [list(ids)[:keep] if cfg.keep_prompt == "start" else list(ids)[-keep:]
          for ids in encoded]


def generate_answers(model: Any, tokenizer: Any, prompt_ids: Sequence[Sequence[int]],
                     seed: int, cfg: EvalConfig, stops: Sequence[int], *,
                     decode: Callable[[np.ndarray], str] | None = None) -> list[str]:
  """One sampled answer per prompt, ended by the first of `stops` (`decode`, given, turns a
  row of new token ids into the answer instead: the task evaluators cut at stop strings too).
  Batches are `batch_size` rows (the last one completed with copies of its last prompt, answers
  dropped) and `PROMPT_WIDTH_MULTIPLE`-wide buckets, with `cfg.max_new_tokens` new tokens or else
  the length budget of the bucket (`max_length - width`): `generate` compiles once per width used,
  whatever the number of batches."""
  pad = _token_id(tokenizer, "pad")
  pad = pad if pad is not None else (stops[0] if stops else 0)  # the mask hides left padding
  answers = []
  for start in range(0, len(prompt_ids), cfg.batch_size):
    chunk = list(prompt_ids[start:start + cfg.batch_size])
    rows = chunk + [chunk[-1]] * (cfg.batch_size - len(chunk))
    width = bucket_length(max(map(len, rows)), multiple=PROMPT_WIDTH_MULTIPLE,
                          cap=cfg.max_prompt_length)
    ids, mask = left_pad(rows, width, pad)
    new_tokens = cfg.max_new_tokens or cfg.max_length - width
    out = np.asarray(generate(model, ids, prompt_mask=mask, max_new_tokens=new_tokens,
                              sampling=cfg.sampling,
                              seed=seed * 1_000_003 + start,  # no two (seed, batch) alike
                              eos_id=tuple(stops)))
    answers += [decode(row) if decode is not None else
                tokenizer.decode(until_stop(row, stops), skip_special_tokens=True).strip()
                for row in out[:len(chunk)]]
  return answers


@functools.partial(jax.jit, static_argnames=("graphdef", "teacher_graphdef", "vocab",
                                             "separate_ce"))
def _token_sums(graphdef: nnx.GraphDef, state: nnx.State, teacher_graphdef: nnx.GraphDef | None,
                teacher_state: nnx.State | None, batch: Mapping[str, jax.Array], *,
                vocab: int | None, separate_ce: bool) -> dict[str, jax.Array]:
  """Sums over a batch's response tokens (`chunked_token_sums`): the student's NLL and, with a
  teacher, the agreement and `_TEACHER_LOSSES`, on the shared `vocab`; never `[N, V]` logits."""
  model = nnx.merge(graphdef, state)
  hidden, _ = model.hidden_states(batch["input_ids"], batch["attention_mask"],
                                  batch["positions"])
  head, cap = model.head_weight(), model.cfg.final_logit_softcap
  if teacher_graphdef is None:
    return chunked_token_sums(hidden, head, None, None, batch["labels"], logit_softcap=cap,
                              chunk_size=CHUNK_SIZE)
  teacher = nnx.merge(teacher_graphdef, teacher_state)
  teacher_hidden, _ = teacher.hidden_states(batch["input_ids"], batch["attention_mask"],
                                            batch["positions"])
  sums = chunked_token_sums(hidden, head[:, :vocab], teacher_hidden,
                            teacher.head_weight()[:, :vocab], batch["labels"],
                            logit_softcap=cap,
                            teacher_logit_softcap=teacher.cfg.final_logit_softcap,
                            losses=_TEACHER_LOSSES, chunk_size=CHUNK_SIZE)
  if separate_ce:   # the student's perplexity is over its own whole vocabulary, teacher or not
    sums["ce"] = chunked_token_sums(hidden, head, None, None, batch["labels"],
                                    logit_softcap=cap, chunk_size=CHUNK_SIZE)["ce"]
  return sums


def teacher_forced_metrics(model: Any, teacher: Any | None, tokenizer: Any,
                           records: Sequence[Mapping[str, str]], cfg: EvalConfig
                           ) -> dict[str, float]:
  """Perplexity of the reference responses; with a teacher, KL(p||q), CSD and the top-1
  agreement on them (the teacher and student compared on the vocabulary both have).

  One jitted function, compiled once per row width (multiples of `PROMPT_WIDTH_MULTIPLE`); the
  logits are formed a chunk of tokens at a time.
  """
  encode = InstructionTokenizer(tokenizer, template=cfg.template, max_length=cfg.max_length,
                                max_prompt_length=cfg.max_prompt_length)
  examples = [e for e in map(encode, records) if e is not None]
  graphdef, state = nnx.split(model)
  teacher_graphdef, teacher_state, vocab = None, None, None
  if teacher is not None:
    teacher_graphdef, teacher_state = nnx.split(teacher)
    vocab = min(model.cfg.vocab_size, teacher.cfg.vocab_size)  # padded rows, as in training
  pending = []
  for start in range(0, len(examples), cfg.batch_size):
    chunk = examples[start:start + cfg.batch_size]
    # Filler rows (a real row with no label) keep the batch's shape fixed and count nowhere.
    filler = {"input_ids": chunk[-1]["input_ids"],
              "labels": np.full_like(chunk[-1]["labels"], IGNORE_INDEX)}
    batch = pad_batch(chunk + [filler] * (cfg.batch_size - len(chunk)), pad_id=encode.pad_id,
                      max_length=cfg.max_length, bucket_multiple=PROMPT_WIDTH_MULTIPLE)
    pending.append(_token_sums(graphdef, state, teacher_graphdef, teacher_state, batch,
                               vocab=vocab, separate_ce=(teacher is not None
                                                         and vocab < model.cfg.vocab_size)))
  sums: dict[str, float] = {}
  for batch_sums in jax.device_get(pending):   # fetched once: the batches run back to back
    for key, value in batch_sums.items():
      sums[key] = sums.get(key, 0.0) + float(value)   # added in float64
  count = max(sums.get("count", 0.0), 1.0)
  out = {"perplexity": float(np.exp(sums.get("ce", 0.0) / count))}
  if teacher is not None:
    out.update(kl=sums.get("fkl", 0.0) / count, csd=sums.get("csd", 0.0) / count,
               agreement=sums.get("agree", 0.0) / count)
  return out


def evaluate(model: Any, tokenizer: Any, datasets: Mapping[str, Sequence[Mapping[str, str]]],
             *, teacher: Any | None = None, config: EvalConfig = EvalConfig()
             ) -> dict[str, dict[str, Any]]:
  """Metrics per dataset (and the generated samples per seed, and the sampling settings).

  An answer ends at any of the model's stop ids (`csd_jax.data.chat.stop_ids`: the
  tokenizer's eos and end-of-turn token, the model config's eos ids, `config.stop_ids`).
  The tokenizer is only read, never reconfigured."""
  sampling = dataclasses.asdict(config.sampling)
  stops = stop_ids(tokenizer, model, extra=config.stop_ids)
  results = {}
  for name, records in datasets.items():
    prompts = [render_prompt(r, config.template, tokenizer) for r in records]
    prompt_ids = encode_prompts(tokenizer, prompts, config)
    references = [r.get("references") or [r["response"]] for r in records]
    samples = {}
    for i, seed in enumerate(config.seeds):
      start = time.perf_counter()
      samples[seed] = generate_answers(model, tokenizer, prompt_ids, seed, config, stops)
      logger.info("%s: seed %d (%d/%d), %d answers in %.0f s", name, seed, i + 1,
                  len(config.seeds), len(prompts), time.perf_counter() - start)
    rouge = [rouge_l(samples[s], references) for s in config.seeds]
    diversity = ([self_bleu([samples[s][i] for s in config.seeds]) for i in range(len(prompts))]
                 if len(config.seeds) > 1 else [])
    results[name] = {"rougeL": float(np.mean(rouge)), "rougeL_per_seed": rouge,
                     **({"self_bleu": float(np.mean(diversity))} if diversity else {}),
                     **teacher_forced_metrics(model, teacher, tokenizer, records, config),
                     "examples": len(records), "sampling": sampling, "stop_ids": list(stops),
                     "samples": {str(s): v for s, v in samples.items()}}
  return results


# `csd-jax eval`'s columns; the task evaluators (csd_jax/eval/tasks) pass their own.
TABLE_COLUMNS = ("rougeL", "self_bleu", "perplexity", "kl", "csd", "agreement")


def _cell(value: float | str | None) -> str:
  """A 12-wide column: 3 decimals, or scientific notation where that would not fit; a text
  (a metric "not computed") as it is, with one space before it."""
  if value is None:
    return f"{'-':>12}"
  if isinstance(value, str):
    return f"{value:>12}" if len(value) < 12 else " " + value
  return f"{value:>12.3f}" if abs(value) < 1e7 else f"{value:>12.3e}"


def format_table(results: Mapping[str, Mapping[str, Any]],
                 columns: Sequence[str] = TABLE_COLUMNS) -> str:
  """One row per dataset, one column per metric of `columns` ("-" where a row lacks it)."""
  rows = [(name, [_cell(row.get(c)) for c in columns]) for name, row in results.items()]
  # a column is as wide as its widest cell (12, or a longer text): the rows stay aligned
  widths = [max([12, len(c) + 1] + [len(cells[i]) for _, cells in rows])
            for i, c in enumerate(columns)]
  lines = [f"{'dataset':<16}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
  for name, cells in rows:
    lines.append(f"{name:<16}" + "".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))
  return "\n".join(lines)


def write_results(results: Mapping[str, Any], path: str | os.PathLike) -> None:
  """`results` as indented JSON at `path` (a local file or an object, e.g. gs://...)."""
  paths.write_atomic(path, json.dumps(results, indent=2))
