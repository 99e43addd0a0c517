"""Prompt sets for `csd-jax generate`: the prompts of a file, and the answer files of AlpacaEval
and MT-Bench written from the responses.

A record (JSONL / JSON / Parquet, `csd_jax.data.records`) is one of, first match wins:
- an MT-Bench question (FastChat `llm_judge/data/mt_bench/question.jsonl`): `turns`, a list of
  user messages each answered after the model's answer to the one before, with `question_id`
  and `category`;
- a prompt: `instruction` / `prompt` / `question`, with `context` / `input` below it (the fields
  the instruction reader knows), e.g. AlpacaEval's `alpaca_eval.json` (its `dataset` goes into
  the answer file) or UltraChat's `prompt` (the first user turn, as the official CSD script takes);
- a chat: `messages` ([{role, content}]), the conversation up to its last user message (a
  trailing assistant message, the data set's own answer, is dropped).

Answer files: AlpacaEval's model outputs are a JSON list of {instruction, output, generator,
dataset} (tatsu-lab/alpaca_eval `example/outputs.json`); FastChat's MT-Bench answers are JSONL,
one line a question, {question_id, answer_id, model_id, choices: [{index, turns: [...]}],
tstamp}, sorted by question_id (`gen_model_answer.py`, `reorg_answer_file`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

from csd_jax.data.fields import CONTEXT_FIELDS, INSTRUCTION_FIELDS
from csd_jax.data.records import read_json_records
from csd_jax.errors import UserError

FORMATS = ("jsonl", "alpaca_eval", "mt_bench")
# FastChat llm_judge's `temperature_config` (common.py): MT-Bench's sampling temperature per
# question category; other categories get 0.7. Temperature 0 is greedy.
MT_BENCH_TEMPERATURES = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0,
                         "coding": 0.0, "reasoning": 0.0, "stem": 0.1, "humanities": 0.1}
MT_BENCH_DEFAULT_TEMPERATURE = 0.7


@dataclasses.dataclass(frozen=True)
class Prompt:
  """One prompt of a set: the user turns to answer in order (one for a single prompt), the
  messages before the first of them (a chat's system message and earlier turns), and the
  record's fields the answer files carry."""

  index: int                                  # the record's position in the file
  turns: tuple[str, ...]
  history: tuple[Mapping[str, str], ...] = ()
  context: str = ""                           # a prompt's context / input (minillm template)
  question_id: Any = None
  category: str | None = None
  dataset: str | None = None

  def user_text(self, turn: int) -> str:
    """The user's message of `turn`: the first one with its context below it."""
    text = self.turns[turn]
    return text + ("\n\n" + self.context if turn == 0 and self.context else "")


def _string(value: Any, where: str, name: str) -> str:
  if not isinstance(value, str):
    raise UserError(f"{where}: field {name!r} is {type(value).__name__}, expected a string")
  if not value.strip():
    raise UserError(f"{where}: field {name!r} is empty; remove the record or give it a prompt")
  return value


def _messages(value: Any, where: str) -> tuple[tuple[Mapping[str, str], ...], str]:
  """(the messages before the last user message, that message's text)."""
  if not isinstance(value, list) or not all(
      isinstance(m, Mapping) and isinstance(m.get("role"), str)
      and isinstance(m.get("content"), str) for m in value):
    raise UserError(f"{where}: 'messages' must be a list of {{role, content}} objects with "
                    "string values, e.g. [{\"role\": \"user\", \"content\": \"Hi\"}]")
  users = [i for i, m in enumerate(value) if m["role"] == "user"]
  if not users:
    raise UserError(f"{where}: 'messages' has no user message; a prompt needs one")
  last = users[-1]
  history = tuple({"role": m["role"], "content": m["content"]} for m in value[:last])
  return history, _string(value[last]["content"], where, "messages[].content")


def prompt_from_record(record: Any, index: int, where: str) -> Prompt:
  """The `Prompt` of one record (see the module docstring for the fields read).

  Raises:
    UserError: naming `where` (file:line): not an object, no prompt field, a wrong type.
  """
  if not isinstance(record, Mapping):
    raise UserError(f"{where}: record is a JSON {type(record).__name__}, expected an object "
                    "with a prompt field")
  extra = {"question_id": record.get("question_id", record.get("id")),
           "category": record.get("category") if isinstance(record.get("category"), str)
           else None,
           "dataset": record.get("dataset") if isinstance(record.get("dataset"), str) else None}
  if record.get("turns") is not None:
    turns = record["turns"]
    if not isinstance(turns, list) or not turns:
      raise UserError(f"{where}: 'turns' must be a non-empty list of user messages")
    return Prompt(index, tuple(_string(t, where, "turns[]") for t in turns), **extra)
  for name in INSTRUCTION_FIELDS:
    if record.get(name) is not None:
      context = next((record[c] for c in CONTEXT_FIELDS if record.get(c)), "")
      if not isinstance(context, str):
        raise UserError(f"{where}: the context field is {type(context).__name__}, expected a "
                        "string")
      return Prompt(index, (_string(record[name], where, name),), context=context, **extra)
  if record.get("messages") is not None:
    history, text = _messages(record["messages"], where)
    return Prompt(index, (text,), history=history, **extra)
  raise UserError(f"{where}: record has fields {sorted(record)}; expected a prompt "
                  f"({'/'.join(INSTRUCTION_FIELDS)}), a chat ('messages') or MT-Bench "
                  "'turns': rename the prompt field to one of those")


def load_prompts(path: str | os.PathLike, limit: int | None = None) -> list[Prompt]:
  """The prompts of a JSONL / JSON / Parquet file (the first `limit`), in file order.

  Raises:
    UserError: a missing or unreadable file, a bad record (its line named), no records.
  """
  prompts = []
  for key, record in read_json_records(path):
    if limit and len(prompts) >= limit:
      break
    prompts.append(prompt_from_record(record, len(prompts), str(pathlib.Path(path).parent / key)))
  if not prompts:
    raise UserError(f"{path}: no records; pass a file with at least one prompt")
  return prompts


def check_format(output_format: str, prompts: Sequence[Prompt], n: int) -> None:
  """Refuse a prompt set that the answer format cannot hold, before any generation."""
  if output_format not in FORMATS:
    raise UserError(f"--format {output_format!r}: unknown; valid: {', '.join(FORMATS)}")
  if output_format == "alpaca_eval":
    if n != 1:
      raise UserError(f"--format alpaca_eval takes one output per instruction: pass --n 1 "
                      f"(got {n})")
    multi = next((p for p in prompts if len(p.turns) > 1), None)
    if multi is not None:
      raise UserError(f"--format alpaca_eval: prompt {multi.index} has {len(multi.turns)} "
                      "turns; AlpacaEval instructions are single-turn")
  if output_format == "mt_bench":
    missing = next((p for p in prompts if p.question_id is None), None)
    if missing is not None:
      raise UserError(f"--format mt_bench: prompt {missing.index} has no question_id; MT-Bench "
                      "answers are matched to questions by it (use FastChat's question.jsonl)")


def _by_prompt(responses: Sequence[Mapping[str, Any]]) -> dict[int, dict[int, list[str]]]:
  """{index: {sample: [response of turn 0, 1, ...]}}."""
  table: dict[int, dict[int, dict[int, str]]] = {}
  for r in responses:
    table.setdefault(r["index"], {}).setdefault(r["sample"], {})[r["turn"]] = r["response"]
  return {i: {s: [turns[t] for t in sorted(turns)] for s, turns in samples.items()}
          for i, samples in table.items()}


def alpaca_eval_outputs(prompts: Sequence[Prompt], responses: Sequence[Mapping[str, Any]],
                        generator: str) -> list[dict[str, str]]:
  """AlpacaEval's model outputs: one {instruction, output, generator[, dataset]} a prompt, in
  file order (the instruction with its context, as AlpacaEval merges the two)."""
  table = _by_prompt(responses)
  outputs = []
  for prompt in prompts:
    entry = {"instruction": prompt.user_text(0), "output": table[prompt.index][0][0],
             "generator": generator}
    if prompt.dataset is not None:
      entry["dataset"] = prompt.dataset
    outputs.append(entry)
  return outputs


def mt_bench_answers(prompts: Sequence[Prompt], responses: Sequence[Mapping[str, Any]],
                     model_id: str, *, seed: int) -> list[dict[str, Any]]:
  """FastChat's MT-Bench answers: one line a question, its samples as `choices`, sorted by
  question_id. `answer_id` is derived from (model, question, seed) rather than FastChat's
  random shortuuid, so that writing the file again gives the same ids."""
  table = _by_prompt(responses)
  now = time.time()
  answers = []
  for prompt in prompts:
    digest = hashlib.sha256(json.dumps([model_id, prompt.question_id, seed]).encode())
    answers.append({"question_id": prompt.question_id, "answer_id": digest.hexdigest()[:22],
                    "model_id": model_id,
                    "choices": [{"index": s, "turns": turns}
                                for s, turns in sorted(table[prompt.index].items())],
                    "tstamp": now})
  return sorted(answers, key=lambda a: (str(type(a["question_id"])), a["question_id"]))


def write_answer_file(output_format: str, path: str | os.PathLike, prompts: Sequence[Prompt],
                      responses: Sequence[Mapping[str, Any]], model_id: str, *,
                      seed: int) -> None:
  """Write `path` in `output_format` ("alpaca_eval" or "mt_bench") from the responses, through
  a temporary file: an interrupted write leaves no half file."""
  if output_format == "alpaca_eval":
    text = json.dumps(alpaca_eval_outputs(prompts, responses, model_id), indent=2,
                      ensure_ascii=False) + "\n"
  elif output_format == "mt_bench":
    text = "".join(json.dumps(a, ensure_ascii=False) + "\n"
                   for a in mt_bench_answers(prompts, responses, model_id, seed=seed))
  else:
    raise UserError(f"--format {output_format!r}: no answer file to write; valid: alpaca_eval, "
                    "mt_bench")
  path = pathlib.Path(path)
  temporary = path.with_name(path.name + ".tmp")
  temporary.write_text(text, encoding="utf-8")
  os.replace(temporary, path)
