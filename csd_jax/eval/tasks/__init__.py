"""Task-specific evaluators: the paper's task-specific experiments (Gemma-7B-IT -> 2B-IT), judged
as the official scripts judge them (aailab-kaist/CSD `task_specific_distillation/eval/`, from
google-research `speculative_kd/eval/`): GSM8K accuracy, summarisation ROUGE-1/2/L, translation
BLEU / chrF (and COMET where its model is at hand). `csd-jax eval --task NAME` runs one
(`runner.run_task`); every task prompts through the tokenizer's chat template and decodes
greedily up to its own number of new tokens and stop strings.

A task module has: NAME, COLUMNS (its table's metrics), MAX_NEW_TOKENS, MAX_PROMPT_LENGTH,
STOP_STRINGS, `read(path, limit) -> list[Example]` and `score(examples, prompts, outputs,
**options) -> dict` (the metrics and one record per example). This package imports no JAX: the
command line lists its tasks without starting it.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

from csd_jax.errors import UserError

TASK_NAMES = ("gsm8k", "summarization", "translation")
# Short names, as the official configs and files spell the tasks (kd_train_summ.yaml, mt_test.json).
ALIASES = {"gsm": "gsm8k", "summ": "summarization", "mt": "translation"}


@dataclasses.dataclass(frozen=True)
class Example:
  """One evaluation example: the user's message (a Dolly-form `record`, rendered by the chat
  template), its reference(s), and for translation the source sentence (COMET's `src`)."""

  record: Mapping[str, str]
  references: tuple[str, ...]
  source: str | None = None


def get_task(name: str) -> ModuleType:
  """The module of task `name` (or its short name: gsm, summ, mt)."""
  name = ALIASES.get(name, name)
  if name not in TASK_NAMES:
    raise UserError(f"--task {name!r}: valid: {', '.join(TASK_NAMES)} (or {', '.join(ALIASES)})")
  return importlib.import_module(f"csd_jax.eval.tasks.{name}")


def read_examples(path: str | os.PathLike, limit: int | None,
                  to_example: Callable[[Any, Mapping[str, Any]], Example],
                  expected: str) -> list[Example]:
  """One example per record of `path` (JSONL / JSON / Parquet; the first `limit`), made by
  `to_example(key, record)`; a file without records is refused naming the `expected` ones."""
  from csd_jax.data.records import read_json_records

  examples = []
  for key, raw in read_json_records(path):
    if limit and len(examples) >= limit:
      break
    examples.append(to_example(key, raw))
  if not examples:
    raise UserError(f"{path}: no records; pass a file of {expected}")
  return examples
