"""`csd-jax pairs`: a teacher's and a student's `csd-jax generate` files joined into the chat
pairs file that `data.source: pairs` trains on.

The official general-chat recipe generates a teacher and a student response to every prompt,
then its `reformat.py` writes `train.json`: a JSON list with one record per prompt, `{"prompt",
"chosen": [user, assistant: teacher], "rejected": [user, assistant: student]}`. `join` does the
same from two generate JSONL files, matched by prompt index (sample 0, turn 0: one response per
prompt and model, as the official), checking that both files answer the same prompts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from csd_jax.errors import UserError


def _first_responses(path: str | os.PathLike) -> dict[int, Mapping[str, Any]]:
  """index -> the generate line of (index, sample 0, turn 0) in `path`."""
  lines: dict[int, Mapping[str, Any]] = {}
  try:
    text = open(path, encoding="utf-8").read()
  except FileNotFoundError:
    raise UserError(f"{path}: no such file; write it with csd-jax generate --out") from None
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      raise UserError(f"{path}:{number}: not JSON (a torn line: re-run the same csd-jax "
                      "generate command to finish the file)") from None
    if not isinstance(record, dict) or not {"index", "prompt", "response"} <= record.keys():
      raise UserError(f"{path}:{number}: not a csd-jax generate line (index, prompt, response)")
    if record.get("sample", 0) == 0 and record.get("turn", 0) == 0:
      lines[record["index"]] = record
  if not lines:
    raise UserError(f"{path}: no responses")
  return lines


def join(teacher: str | os.PathLike, student: str | os.PathLike) -> list[dict[str, Any]]:
  """The official `train.json` records: one per prompt that both files answer."""
  teachers, students = _first_responses(teacher), _first_responses(student)
  if teachers.keys() != students.keys():
    only = sorted(teachers.keys() ^ students.keys())
    raise UserError(f"{teacher} and {student} answer different prompts (indices "
                    f"{only[:5]}{' ...' if len(only) > 5 else ''}); generate both from the same "
                    "--prompts file and let both runs finish")
  records = []
  for index in sorted(teachers):
    prompt = teachers[index]["prompt"]
    if students[index]["prompt"] != prompt:
      raise UserError(f"prompt {index} differs between {teacher} and {student}; generate both "
                      "from the same --prompts file")
    user = {"content": prompt, "role": "user"}
    records.append({
        "prompt": prompt,
        "chosen": [user, {"content": teachers[index]["response"], "role": "assistant"}],
        "rejected": [user, {"content": students[index]["response"], "role": "assistant"}]})
  return records


def write(records: list[dict[str, Any]], out: str | os.PathLike) -> None:
  """`records` as one JSON list, written through a temporary file (never half a file)."""
  temporary = f"{os.fspath(out)}.tmp"
  with open(temporary, "w", encoding="utf-8") as f:
    json.dump(records, f)
  os.replace(temporary, out)
