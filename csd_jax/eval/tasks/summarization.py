"""Summarisation ROUGE as the official `eval/eval_summ.py` computes it (aailab-kaist/CSD
`task_specific_distillation/eval/eval_summ.py`; google-research `speculative_kd/eval/eval_summ.py`).

- Prompt: the dialogue itself as the user's turn of the chat template (no instruction around it).
- Decoding: greedy, up to 128 new tokens, cut at the first line break (vLLM's
  `stop=['\\nuser', '\\n']`: a line break always comes first).
- Metrics: ROUGE-1, ROUGE-2 and ROUGE-L F-measures of `rouge-score`, with what Hugging Face
  `evaluate.load('rouge')` uses by default (its default tokenizer, no stemming), x 100. With
  several references an example takes, per ROUGE type, the best (`score_multi`, as evaluate
  does).
- Departure: the official's `evaluate` reports the median of 1,000 bootstrap resamples of the
  mean ("mid"), which is random by a few hundredths of a point; here the plain mean.

Files: JSONL / JSON / Parquet with `dialogue` / `summary` (DialogSum, `knkarthick/dialogsum`;
speculative_kd's summ_1k_*.json as `{"instances": [...]}`), or any instruction / response
fields `csd_jax.data.instruct.records_from_json` reads (a list of references allowed).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from csd_jax.data.instruct import records_from_json
from csd_jax.eval.tasks import Example, read_examples

NAME = "summarization"
COLUMNS = ("rouge1", "rouge2", "rougeL")
MAX_NEW_TOKENS = 128
MAX_PROMPT_LENGTH = 1024   # the official training's input length (kd_train_summ.yaml)
STOP_STRINGS = ("\nuser", "\n")


def _example(_: Any, raw: Mapping[str, Any]) -> Example:
  record = records_from_json(raw)
  return Example(record={"instruction": record["instruction"],
                         "context": record.get("context") or ""},
                 references=tuple(record.get("references") or [record["response"]]))


def read(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
  """The examples of a summarisation file (the first `limit`)."""
  return read_examples(path, limit, _example, "dialogue / summary records")


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]
                 ) -> dict[str, float]:
  """Mean ROUGE-1 / 2 / L F-measures x 100 (each example: its best reference per type)."""
  from rouge_score import rouge_scorer

  if len(predictions) != len(references) or not predictions:
    raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
  scorer = rouge_scorer.RougeScorer(list(COLUMNS), use_stemmer=False)
  scores = [scorer.score_multi(list(refs), prediction)
            for prediction, refs in zip(predictions, references)]
  return {name: 100.0 * float(np.mean([s[name].fmeasure for s in scores])) for name in COLUMNS}


def score(examples: Sequence[Example], prompts: Sequence[str], outputs: Sequence[str],
          **_: Any) -> dict[str, Any]:
  """ROUGE-1 / 2 / L and the per-example records."""
  metrics = rouge_scores(outputs, [e.references for e in examples])
  records = [{"prompt": prompt, "output": output, "references": list(example.references)}
             for example, prompt, output in zip(examples, prompts, outputs, strict=True)]
  return {**metrics, "records": records}
