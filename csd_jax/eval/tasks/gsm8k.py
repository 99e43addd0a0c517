"""GSM8K accuracy as the official `eval/eval_gsm.py` computes it (aailab-kaist/CSD
`task_specific_distillation/eval/eval_gsm.py`; google-research `speculative_kd/eval/eval_gsm.py`).

- Prompt: the question as the user's turn of the chat template, written `Q: {question} \\n\\nA:`
  (with the space before the blank line, as the official f-string has it). Records that carry
  their own prompt (speculative_kd's `instruction` / `response` files, e.g. gsm_1k_vali.json)
  are asked their `instruction` as it is.
- Decoding: greedy, up to 512 new tokens, cut at the first blank line (vLLM's `stop=['\\n\\n']`).
- Answer: the text after the first `####` up to the end of its line, stripped; an output with
  no `####` is wrong. Reference: the text after the reference solution's `####`, stripped.
- Verdict: `math_equal` (csd_jax/eval/tasks/math_equal.py) with relative tolerance 1e-3; where
  either side holds `\\pi`, right if equal with pi = 3.14159... or 3.14, at the grader's default
  tolerance 1e-4 (the official passes no tolerance there).
- Reported: accuracy in percent (the official prints the fraction), the number right, and per
  example the prompt, output, extracted answer, reference answer and verdict.

Files: JSONL / JSON / Parquet with `question` / `answer` (the `openai/gsm8k` layout, and
speculative_kd's gsm8k_vali.json as `{"instances": [...]}`) or `instruction` / `response`
(speculative_kd's gsm_1k_*.json).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from csd_jax.data.instruct import records_from_json
from csd_jax.errors import UserError
from csd_jax.eval.tasks import Example, read_examples
from csd_jax.eval.tasks.math_equal import math_equal

NAME = "gsm8k"
COLUMNS = ("accuracy",)
MAX_NEW_TOKENS = 512
# Room for the longest GSM8K question in a chat template (the official passes prompts whole).
MAX_PROMPT_LENGTH = 512
STOP_STRINGS = ("\n\n",)
TOLERANCE = 1e-3
PI_VALUES = (math.pi, 3.14)
ANSWER_MARK = "####"


def question_prompt(question: str) -> str:
  """The user's message for a GSM8K question, as eval_gsm.py writes it."""
  return f"Q: {question} \n\nA:"


def extract_answer(output: str) -> str | None:
  """The text after the output's first `####` up to its line's end, stripped; None without one."""
  if ANSWER_MARK not in output:
    return None
  return output.split(ANSWER_MARK)[1].split("\n")[0].strip()


def reference_answer(solution: str) -> str | None:
  """The final answer of a reference solution (`... #### 72`), or None without `####`."""
  return solution.split(ANSWER_MARK)[1].strip() if ANSWER_MARK in solution else None


def is_correct(answer: str | None, reference: str) -> bool:
  """The official verdict on an extracted answer (None: no `####`, wrong)."""
  if answer is None:
    return False
  if "\\pi" in answer or "\\pi" in reference:
    return any(math_equal(answer, reference, pi=pi) for pi in PI_VALUES)
  return math_equal(answer, reference, tolerance=TOLERANCE)


def _example(key: str, raw: Mapping[str, Any]) -> Example:
  if isinstance(raw, Mapping) and "instruction" not in raw and isinstance(raw.get("question"),
                                                                          str):
    user, solution = question_prompt(raw["question"]), raw.get("answer")
  else:
    record = records_from_json(raw)
    context = record.get("context") or ""
    user = record["instruction"] + ("\n\n" + context if context else "")
    solution = record["response"]
  if not isinstance(solution, str):
    raise UserError(f"{key}: no reference solution; give each question its `answer` (GSM8K's "
                    "solution ending in '#### <answer>')")
  reference = reference_answer(solution)
  if reference is None:
    raise UserError(f"{key}: the reference solution has no '{ANSWER_MARK}'; GSM8K solutions end "
                    f"with '{ANSWER_MARK} <answer>': pass the dataset's own answers")
  return Example(record={"instruction": user, "context": ""}, references=(reference,))


def read(path: str | os.PathLike, limit: int | None = None) -> list[Example]:
  """The examples of a GSM8K file (the first `limit`)."""
  return read_examples(path, limit, _example, "GSM8K question / answer records")


def score(examples: Sequence[Example], prompts: Sequence[str], outputs: Sequence[str],
          **_: Any) -> dict[str, Any]:
  """Accuracy (percent), the count right, and the per-example records."""
  records = []
  for example, prompt, output in zip(examples, prompts, outputs, strict=True):
    answer, reference = extract_answer(output), example.references[0]
    records.append({"prompt": prompt, "output": output, "answer": answer,
                    "reference": reference, "correct": is_correct(answer, reference)})
  correct = sum(r["correct"] for r in records)
  return {"accuracy": 100.0 * correct / len(records), "correct": correct, "records": records}
