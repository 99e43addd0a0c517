"""The data files MiniLLM / DistiLLM distribute, read in their own formats.

- Evaluation sets (`MiniLLM/{dolly,self-inst,Vicuna,sinst,uinst}` on the hub: `valid.jsonl`,
  S-NI and UnNI under `11_/`): each line holds `prompt`, the prompt already rendered with the
  MiniLLM template and with `<n>` for each newline, and `output`, one reference or a LIST of
  references. The official evaluation (`minillm/data_utils/prompt_datasets.py`) uses that
  prompt as it is (`<n>` -> newline) and scores against every reference (ROUGE-L: the
  maximum). `instruction` / `input` may be there too.
- The Dolly training pool (`MiniLLM/dolly` `raw.jsonl`: `instruction`, `input`, `output`),
  split as `minillm/tools/process_data_dolly.py` does: the first `dev_num` (1000) lines are
  the validation set used for model selection, the rest is the training set; `valid.jsonl`
  beside it (500 examples) is the Dolly evaluation set.
- The processed files (`processed_data/dolly/full/<model>/{train,valid}.jsonl`: `instruction`,
  `prompt`, `input`, `output`) read like any instruction file.

`parse_rendered_prompt` takes a rendered prompt apart again (instruction and input), so that
the same record can be shown under another template (chat); with the MiniLLM template the
rendered prompt is used verbatim, as the official evaluation does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from etils import epath

from csd_jax.runtime import paths
from csd_jax.errors import UserError

NEWLINE_MARK = "<n>"            # the official files' stand-in for "\n" in prompts
DEV_NUM = 1000                  # process_data_dolly.py --dev-num: the model-selection set
TRAIN_POOL, EVAL_SET = "raw.jsonl", "valid.jsonl"
PREAMBLE = "Below is an instruction that describes a task"
_RENDERED = re.compile(
    r"^Below is an instruction that describes a task(?:, paired with an input that provides "
    r"further context)?\. Write a response that appropriately completes the request\.\n\n"
    r"### Instruction:\n(?P<instruction>.*?)(?:\n\n### Input:\n(?P<input>.*?))?"
    r"\n\n### Response:\n$", re.DOTALL)


def is_rendered_prompt(text: str) -> bool:
  """Whether `text` is a prompt already in the MiniLLM template (`<n>` or real newlines)."""
  return text.replace(NEWLINE_MARK, "\n").startswith(PREAMBLE)


def parse_rendered_prompt(text: str) -> tuple[str, str] | None:
  """(instruction, input) of a prompt rendered with the MiniLLM template, or None when it does
  not have the template's layout."""
  match = _RENDERED.match(text.replace(NEWLINE_MARK, "\n"))
  return None if match is None else (match["instruction"], match["input"] or "")


def rendered_record(prompt: str, references: list[str],
                    fields: Mapping[str, object]) -> dict[str, object]:
  """A record of an official evaluation file: the verbatim prompt (`<n>` -> newline), the
  instruction and input (the record's own, else parsed out of the prompt, else the whole
  prompt), the first reference as `response` and all of them as `references`."""
  prompt = prompt.replace(NEWLINE_MARK, "\n")
  parsed = parse_rendered_prompt(prompt) or (prompt, "")
  instruction = fields.get("instruction")
  context = fields.get("input") if instruction is not None else None
  return {"instruction": instruction if isinstance(instruction, str) else parsed[0],
          "context": context if isinstance(context, str) else parsed[1],
          "response": references[0], "references": references, "prompt": prompt}


def dolly_pool(directory: str | os.PathLike, dev_num: int = DEV_NUM) -> epath.Path:
  """The training pool (`raw.jsonl`) of MiniLLM's Dolly directory; its first `dev_num`
  records are the validation set, the rest the training set (`process_data_dolly.py`)."""
  pool = paths.as_path(directory) / TRAIN_POOL
  if not pool.is_file():
    raise UserError(f"data.minillm_dolly={directory}: no {TRAIN_POOL} there; download the "
                    f"MiniLLM Dolly files (hub dataset MiniLLM/dolly: {TRAIN_POOL}, {EVAL_SET}) "
                    "into that directory")
  if dev_num < 1:
    raise UserError(f"data.minillm_dev_num={dev_num}: must be >= 1 (the official 1000)")
  return pool
