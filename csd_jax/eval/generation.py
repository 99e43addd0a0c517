"""`csd-jax eval`: a student judged by generation, as the paper does.

For every dataset (local JSONL / JSON / Parquet instruction files: Dolly test, Self-Instruct,
Vicuna, S-NI, UnNI, ...) and every seed (10, 20, 30, 40, 50 by default), the model samples an
answer to each prompt (temperature 1, top-p 1, top-k 0 by default; prompt <= 256 and total <=
512 tokens) with the KV cache. Reported per dataset: ROUGE-L against the reference responses
(averaged over seeds), Self-BLEU across the seeds' answers to the same prompt (diversity), the
perplexity of the reference responses, and, with a teacher, the teacher-student KL(p||q) and
CSD at T = 1 on the reference responses.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from csd_jax.data.instruct import InstructionTokenizer, records_from_json, render_prompt
from csd_jax.data.loader import pad_batch
from csd_jax.data.tfds_builder import read_json_records
from csd_jax.eval.text_metrics import rouge_l, self_bleu
from csd_jax.losses import logit_loss
from csd_jax.models import generate

DEFAULT_SEEDS = (10, 20, 30, 40, 50)
logger = logging.getLogger("csd_jax.eval")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  seeds: Sequence[int] = DEFAULT_SEEDS
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  no_repeat_ngram_size: int = 0     # the paper's evaluation uses 6 as an option
  max_prompt_length: int = 256
  max_length: int = 512
  batch_size: int = 16
  template: str = "minillm"
  max_examples: int | None = None   # the first N records of each dataset (None: all)


def run_settings(config: Any) -> EvalConfig:
  """The evaluation settings of a training run: its `eval` section's seeds and sampling, its
  data's template and lengths."""
  section, data = config.eval, config.data
  return EvalConfig(seeds=tuple(section.seeds), temperature=section.sampling.temperature,
                    top_p=section.sampling.top_p, top_k=section.sampling.top_k,
                    no_repeat_ngram_size=section.sampling.no_repeat_ngram_size,
                    max_prompt_length=data.max_prompt_length, max_length=data.max_length,
                    batch_size=section.batch_size, template=data.template)


def run_datasets(config: Any) -> dict[str, list[dict[str, str]]]:
  """The records of a training run's `eval.datasets` (the first `eval.max_examples`)."""
  return {name: load_records(path, config.eval.max_examples or None)
          for name, path in config.eval.datasets.items()}


def flat_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
  """`{dataset}/{metric}` scalars of `evaluate`'s results, for the metrics log."""
  names = ("rougeL", "self_bleu", "perplexity", "kl", "csd")
  return {f"{dataset}/{k}": float(row[k]) for dataset, row in results.items()
          for k in names if k in row}


def load_records(path: str | pathlib.Path, limit: int | None = None) -> list[dict[str, str]]:
  records = [records_from_json(r) for _, r in read_json_records(path)]
  if not records:
    raise ValueError(f"{path}: no records")
  return records[:limit] if limit else records


def _answers(model: Any, tokenizer: Any, prompts: Sequence[str], seed: int,
             cfg: EvalConfig) -> list[str]:
  tokenizer.padding_side = "left"
  tokenizer.truncation_side = "left"  # a long prompt keeps its end, as in training
  if tokenizer.pad_token_id is None:   # GPT-2 has none; the mask hides padding anyway
    tokenizer.pad_token = tokenizer.eos_token
  answers = []
  for start in range(0, len(prompts), cfg.batch_size):
    enc = tokenizer(list(prompts[start:start + cfg.batch_size]), return_tensors="np",
                    padding=True, truncation=True, max_length=cfg.max_prompt_length,
                    add_special_tokens=False)
    new = cfg.max_length - enc["input_ids"].shape[1]
    out = np.asarray(generate(model, enc["input_ids"], prompt_mask=enc["attention_mask"],
                              max_new_tokens=new, temperature=cfg.temperature, top_k=cfg.top_k,
                              top_p=cfg.top_p, no_repeat_ngram_size=cfg.no_repeat_ngram_size,
                              seed=seed * 1_000_003 + start,  # no two (seed, batch) alike
                              eos_id=tokenizer.eos_token_id))
    answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out]
  return answers


def teacher_forced_metrics(model: Any, teacher: Any | None, tokenizer: Any,
                    records: Sequence[Mapping[str, str]], cfg: EvalConfig) -> dict[str, float]:
  """Perplexity of the reference responses; with a teacher, KL(p||q) and CSD on them."""
  encode = InstructionTokenizer(tokenizer, template=cfg.template, max_length=cfg.max_length,
                                max_prompt_length=cfg.max_prompt_length)
  examples = [e for e in map(encode, records) if e is not None]
  sums = {"ce": 0.0, "fkl": 0.0, "csd": 0.0}
  count = 0
  for start in range(0, len(examples), cfg.batch_size):
    batch = pad_batch(examples[start:start + cfg.batch_size], pad_id=encode.pad_id,
                      max_length=cfg.max_length, bucket_multiple=64)
    ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
    labels = jnp.asarray(batch["labels"])
    valid = labels != -100
    n = int(valid.sum())
    logits = model(ids, mask)
    sums["ce"] += float(logit_loss("ce", logits, labels, valid)) * n
    if teacher is not None:
      teacher_logits = teacher(ids, mask)
      vocab = min(logits.shape[-1], teacher_logits.shape[-1])  # padded rows, as in training
      for name in ("fkl", "csd"):
        sums[name] += float(logit_loss(name, logits[..., :vocab], teacher_logits[..., :vocab],
                                       valid)) * n
    count += n
  out = {"perplexity": float(np.exp(sums["ce"] / max(count, 1)))}
  if teacher is not None:
    out.update(kl=sums["fkl"] / max(count, 1), csd=sums["csd"] / max(count, 1))
  return out


def evaluate(model: Any, tokenizer: Any, datasets: Mapping[str, Sequence[Mapping[str, str]]],
             *, teacher: Any | None = None, config: EvalConfig = EvalConfig()
             ) -> dict[str, dict[str, Any]]:
  """Metrics per dataset (and the generated samples per seed, and the sampling settings)."""
  sampling = {"temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
              "no_repeat_ngram_size": config.no_repeat_ngram_size}
  results = {}
  for name, records in datasets.items():
    prompts = [render_prompt(r, config.template, tokenizer) for r in records]
    references = [r["response"] for r in records]
    samples = {}
    for i, seed in enumerate(config.seeds):
      start = time.perf_counter()
      samples[seed] = _answers(model, tokenizer, prompts, seed, config)
      logger.info("%s: seed %d (%d/%d), %d answers in %.0f s", name, seed, i + 1,
                  len(config.seeds), len(prompts), time.perf_counter() - start)
    rouge = [rouge_l(samples[s], references) for s in config.seeds]
    diversity = ([self_bleu([samples[s][i] for s in config.seeds]) for i in range(len(prompts))]
                 if len(config.seeds) > 1 else [])
    results[name] = {"rougeL": float(np.mean(rouge)), "rougeL_per_seed": rouge,
                     **({"self_bleu": float(np.mean(diversity))} if diversity else {}),
                     **teacher_forced_metrics(model, teacher, tokenizer, records, config),
                     "examples": len(records), "sampling": sampling,
                     "samples": {str(s): v for s, v in samples.items()}}
  return results


def _cell(value: float | None) -> str:
  """A 12-wide column: 3 decimals, or scientific notation where that would not fit."""
  if value is None:
    return f"{'-':>12}"
  return f"{value:>12.3f}" if abs(value) < 1e7 else f"{value:>12.3e}"


def format_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  columns = ("rougeL", "self_bleu", "perplexity", "kl", "csd")
  lines = [f"{'dataset':<16}" + "".join(f"{c:>12}" for c in columns)]
  for name, row in results.items():
    lines.append(f"{name:<16}" + "".join(_cell(row.get(c)) for c in columns))
  return "\n".join(lines)


def write_results(results: Mapping[str, Any], path: str | pathlib.Path) -> None:
  pathlib.Path(path).write_text(json.dumps(results, indent=2))
