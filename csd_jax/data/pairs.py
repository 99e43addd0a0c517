"""Chat pairs: a prompt with the teacher's and the student's response, as two training rows.

The official general-chat recipe (aailab-kaist/CSD `general_chat_distillation/`, on DistiLLM-2)
samples a teacher and a student response to every UltraChat prompt, and its `reformat.py`
writes one record per prompt to `train.json` (a JSON list):

    {"prompt": "<the user's message>",
     "chosen": [{"content": <prompt>, "role": "user"},
                {"content": <the teacher's response>, "role": "assistant"}],
     "rejected": [{"content": <prompt>, "role": "user"},
                  {"content": <the student's response>, "role": "assistant"}]}

`pair_record` reads that, and the looser forms `{"prompt" | "messages": text or messages,
"chosen" | "teacher": text, "rejected" | "student": text}`, into what the TFDS cache stores: the
prompt's messages (JSON text) and the two responses. `PairTokenizer` turns a record into two
examples, always both or neither, so that a batch of an even number of rows holds whole pairs:
the prompt rendered with the chat template (generation prompt included) followed by the
teacher's response, then by the student's, each response written as the template writes an
assistant turn up to its end-of-turn token (`chat.chat_response`); labels only on the
responses. Each example carries `pair_role` (`PAIR_TEACHER`, `PAIR_STUDENT`; the numbers
`csd_jax.losses.reduce` reads) along the row.

Lengths follow the official tokenisation (trl 0.9's `DPOTrainer.tokenize_row`): only when the
prompt and the longer response together exceed `max_length` is the prompt cut to
`max_prompt_length` (keeping its end, or its start), and if they still do, each response is cut
to `max_length - max_prompt_length` tokens; both rows of a pair keep the same prompt.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from csd_jax.data.chat import chat_response, render_chat
from csd_jax.data.fields import IGNORE_INDEX
from csd_jax.data.instruct import InstructionTokenizer, TokenizeStats, render_prompt
from csd_jax.errors import UserError

PAIR_TEACHER, PAIR_STUDENT = 1, 2   # = csd_jax.losses.reduce.PAIR_TEACHER / PAIR_STUDENT
PAIR_FIELDS = ("messages", "teacher", "student")   # what the TFDS cache stores per record
TEACHER_FIELDS = ("chosen", "teacher")
STUDENT_FIELDS = ("rejected", "student")


def _messages(value: Any, field: str) -> list[dict[str, str]]:
  """`value` as a list of {"role", "content"} messages: a string is one user message."""
  if isinstance(value, str):
    return [{"role": "user", "content": value}]
  if (not isinstance(value, list) or not value or not all(
      isinstance(m, Mapping) and isinstance(m.get("role"), str)
      and isinstance(m.get("content"), str) for m in value)):
    raise UserError(f"record field {field!r} is neither a string nor a list of messages "
                    "({role, content} strings); write it in one of those forms")
  return [{"role": m["role"], "content": m["content"]} for m in value]


def _response(obj: Mapping[str, Any], names: tuple[str, ...]) -> tuple[str, Any]:
  for name in names:
    if obj.get(name) is not None:
      return name, obj[name]
  raise UserError(f"record has fields {sorted(obj)}; a pair needs {'/'.join(TEACHER_FIELDS)} "
                  f"(the teacher's response) and {'/'.join(STUDENT_FIELDS)} (the student's), as "
                  "the official reformat.py writes them")


def pair_record(obj: Mapping[str, Any]) -> dict[str, str]:
  """A pair record (the official reformat.py's, or a looser form: see the module) as stored:
  `messages` (the prompt's messages as JSON text), `teacher` and `student` (the responses)."""
  if not isinstance(obj, Mapping):
    raise UserError(f"record is a JSON {type(obj).__name__}, expected an object with a prompt "
                    "and the teacher's and student's responses")
  responses, prompts = {}, []
  for role, names in (("teacher", TEACHER_FIELDS), ("student", STUDENT_FIELDS)):
    name, value = _response(obj, names)
    if isinstance(value, str):
      responses[role] = value
      continue
    turns = _messages(value, name)   # a conversation that ends with the assistant's answer
    if turns[-1]["role"] != "assistant" or len(turns) < 2:
      raise UserError(f"record field {name!r} must end with the assistant's response after the "
                      "prompt's turns, as reformat.py writes it")
    responses[role], prompts = turns[-1]["content"], prompts + [turns[:-1]]
  if len(prompts) == 2 and prompts[0] != prompts[1]:
    raise UserError("the teacher's and the student's conversations differ before their answers: "
                    "a pair answers one prompt; pair the responses by prompt")
  if prompts:
    messages = prompts[0]
  else:
    field = next((f for f in ("messages", "prompt") if obj.get(f) is not None), None)
    if field is None:
      raise UserError(f"record has fields {sorted(obj)}; a pair of text responses needs "
                      "'prompt' (text) or 'messages' (the prompt's messages)")
    messages = _messages(obj[field], field)
  return {"messages": json.dumps(messages, ensure_ascii=False), **responses}


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class PairTokenizer:
  """A stored pair record -> [teacher example, student example] (int32 `input_ids`, pre-shifted
  `labels`, `pair_role`, each <= max_length - 1 long) or [] (a pair with a response of no
  token). Arguments as `InstructionTokenizer`'s; `stats` counts pairs."""

  rows_per_record = 2   # the loader keeps a record's rows in one batch (loader.BatchLoader)

  def __init__(self, tokenizer: Any, *, template: str = "chat", max_length: int = 1024,
               max_prompt_length: int = 512, keep_prompt: str = "end"):
    # The checks, the end token and the pad id are InstructionTokenizer's.
    base = InstructionTokenizer(tokenizer, template=template, max_length=max_length,
                                max_prompt_length=max_prompt_length, keep_prompt=keep_prompt)
    self.tokenizer, self.template, self.keep_prompt = tokenizer, template, keep_prompt
    self.max_length, self.max_prompt_length = max_length, max_prompt_length
    self.end_of_turn, self.eos_id, self.pad_id = base.end_of_turn, base.eos_id, base.pad_id
    self.stats = TokenizeStats()

  def _prompt_and_responses(self, messages: list[dict[str, str]], responses: Sequence[str]
                            ) -> tuple[list[int], list[list[int]]]:
    if self.template == "chat":
      prompt = render_chat(self.tokenizer, messages, add_generation_prompt=True)
      if self.end_of_turn is not None:   # the turn as the template writes it, up to its end
        return _encode(self.tokenizer, prompt), [_encode(self.tokenizer, chat_response(
            self.tokenizer, messages, r, end=self.end_of_turn)) for r in responses]
    else:
      if len(messages) != 1 or messages[0]["role"] != "user":
        raise UserError(f"a prompt of {len(messages)} messages needs data.template=chat (the "
                        f"{self.template!r} template renders one user message)")
      prompt = render_prompt({"instruction": messages[0]["content"], "context": ""},
                             self.template)
    # No end-of-turn token to end on (a plain template, or a chat one without it): eos.
    return _encode(self.tokenizer, prompt), [_encode(self.tokenizer, r) + [self.eos_id]
                                             for r in responses]

  def __call__(self, record: Mapping[str, str]) -> list[dict[str, np.ndarray]]:
    self.stats.samples += 1
    try:
      messages = json.loads(record["messages"])
    except (KeyError, ValueError) as error:
      raise UserError(f"pair record without readable 'messages' ({error}); build the data with "
                      "data.source=pairs from the pair files") from error
    texts = (record["teacher"], record["student"])
    prompt, responses = self._prompt_and_responses(messages, texts)
    longer = max(len(r) for r in responses)
    if len(prompt) + longer > self.max_length:
      keep = self.max_prompt_length
      if len(prompt) > keep:
        self.stats.prompts_truncated += 1
        prompt = prompt[:keep] if self.keep_prompt == "start" else prompt[len(prompt) - keep:]
    if len(prompt) + longer > self.max_length:
      self.stats.responses_truncated += 1
      responses = [r[:self.max_length - self.max_prompt_length] for r in responses]
    if not all(responses):
      self.stats.dropped_no_response += 1
      return []
    if not all(t.strip() for t in texts):
      self.stats.empty_responses += 1
    examples = []
    for role, response in zip((PAIR_TEACHER, PAIR_STUDENT), responses):
      full = np.asarray(prompt + response, dtype=np.int32)
      labels = full[1:].copy()
      labels[:max(len(prompt) - 1, 0)] = IGNORE_INDEX   # targets still inside the prompt
      examples.append({"input_ids": full[:-1], "labels": labels,
                       "pair_role": np.full(len(full) - 1, role, np.int32)})
    return examples

  def truncation_warning(self) -> str | None:
    """`stats.warning` with this tokenizer's lengths (see `TokenizeStats.warning`)."""
    return self.stats.warning(max_prompt_length=self.max_prompt_length,
                              max_length=self.max_length)


def validation_record(record: Mapping[str, str]) -> dict[str, str]:
  """A stored pair as an instruction record for evaluation by generation: the prompt's last
  user message and the teacher's response as the reference."""
  messages = json.loads(record["messages"])
  user = [m["content"] for m in messages if m["role"] == "user"]
  return {"instruction": user[-1] if user else "", "context": "", "response": record["teacher"]}
