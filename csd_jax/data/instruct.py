"""Records -> token ids: prompt rendering, instruction tokenisation with masks, text windows.

Instruction records are in the Dolly form (`instruction`, `context`, `response`); prompts are
rendered with the MiniLLM / DistiLLM template, the tokenizer's chat template, or left bare.
`InstructionTokenizer` turns one record into `input_ids` and PRE-SHIFTED `labels`: `labels[t]` is
the token that follows position `t`, and -100 where that token is still part of the prompt.
A response ends with the tokenizer's eos (minillm, none) or, with the chat template, as the
template writes the assistant's turn up to its end-of-turn token (`chat.chat_response`: e.g.
Qwen's `answer<|im_end|>`, without the newline the template writes after it). The prompt is cut
to `max_prompt_length` (from the left, or keeping its start), the response from the right so
that the whole sample fits `max_length`; what was cut, dropped or empty is counted in `stats`,
and `truncation_warning` says which length to raise when much of it was cut.
`TextTokenizer` cuts a pre-training text into windows with the same label convention.
Padding, batching and packing are the loader's business, not this module's.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from csd_jax.data import conversation, minillm
from csd_jax.data.chat import chat_response, end_of_turn
from csd_jax.data.fields import (CONTEXT_FIELDS, IGNORE_INDEX, INSTRUCTION_FIELDS,
                                 RESPONSE_FIELDS, TEMPLATE_NAMES)
from csd_jax.data.records import read_json_records
from csd_jax.errors import UserError

logger = logging.getLogger("csd_jax.data")

PROMPT_TEMPLATES: dict[str, str] = {
    "with_context": (
        "Below is an instruction that describes a task, paired with an input that provides further"
        " context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n"),
    "without_context": (
        "Below is an instruction that describes a task. Write a response that appropriately"
        " completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"),
}


def _user_text(record: Mapping[str, str]) -> str:
  context = record.get("context") or ""
  return record["instruction"] + ("\n\n" + context if context else "")


def render_prompt(record: Mapping[str, str], template: str, tokenizer: Any = None) -> str:
  """The prompt text for `record` under `template` ("minillm", "chat" or "none"); a
  conversation's (`messages`, chat only) is its start up to the first answer."""
  if record.get("messages"):
    return conversation.conversation_prompt(record, template, tokenizer)
  context = record.get("context") or ""
  if template == "minillm":
    if record.get("prompt"):   # an official evaluation file's prompt, used as it is
      return record["prompt"]
    if context:
      return PROMPT_TEMPLATES["with_context"].format(instruction=record["instruction"],
                                                     context=context)
    return PROMPT_TEMPLATES["without_context"].format(instruction=record["instruction"])
  if template == "chat":
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
      name = type(tokenizer).__name__ if tokenizer is not None else "no tokenizer"
      raise UserError(f"template='chat' needs a tokenizer with a chat template ({name} has none);"
                      " use template='minillm' for base models")
    return tokenizer.apply_chat_template([{"role": "user", "content": _user_text(record)}],
                                         add_generation_prompt=True, tokenize=False)
  if template == "none":
    return _user_text(record)
  raise UserError(f"unknown prompt template {template!r}; expected one of {TEMPLATE_NAMES}")


# A share of cut prompts (or responses) above which the data report warns.
TRUNCATION_WARN_SHARE = 0.1


@dataclasses.dataclass
class TokenizeStats:
  """Counts over the records seen: `samples` counts every record, dropped ones included;
  `empty_responses` the kept ones whose response is empty (the end token is the only target)."""

  samples: int = 0
  prompts_truncated: int = 0
  responses_truncated: int = 0
  dropped_no_response: int = 0
  empty_responses: int = 0
  turns_dropped: int = 0   # conversations whose trailing turns did not fit max_length

  def __add__(self, other: TokenizeStats) -> TokenizeStats:
    if not isinstance(other, TokenizeStats):
      return NotImplemented
    return TokenizeStats(*(getattr(self, f.name) + getattr(other, f.name)
                           for f in dataclasses.fields(self)))

  @property
  def kept(self) -> int:
    """Records that produced a sample."""
    return self.samples - self.dropped_no_response

  def summary(self) -> str:
    """One line for the log."""
    empty = (f", {self.empty_responses} with an empty response" if self.empty_responses
             else "")
    if self.turns_dropped:
      empty += f", {self.turns_dropped} conversations cut to their first whole turns"
    return (f"{self.samples} records: {self.kept} kept, {self.prompts_truncated} prompts cut to"
            f" max_prompt_length, {self.responses_truncated} responses cut from the right,"
            f" {self.dropped_no_response} dropped with no response token{empty}")

  def warning(self, *, max_prompt_length: int, max_length: int) -> str | None:
    """One line on what to fix, or None: more than `TRUNCATION_WARN_SHARE` of the prompts or
    of the responses cut (the config key to raise), or any empty response."""
    if not self.samples:
      return None

    def share(count: int) -> str:
      return f"{count} of {self.samples} ({count / self.samples:.0%})"

    problems = []
    if self.prompts_truncated > TRUNCATION_WARN_SHARE * self.samples:
      problems.append(f"{share(self.prompts_truncated)} prompts cut to {max_prompt_length} "
                      "tokens: raise data.max_prompt_length (and data.max_length with it)")
    if self.responses_truncated > TRUNCATION_WARN_SHARE * self.samples:
      problems.append(f"{share(self.responses_truncated)} responses cut to fit {max_length} "
                      "tokens: raise data.max_length")
    if self.turns_dropped > TRUNCATION_WARN_SHARE * self.samples:
      problems.append(f"{share(self.turns_dropped)} conversations lost their last turns to fit "
                      f"{max_length} tokens: raise data.max_length")
    empty = self.empty_responses + self.dropped_no_response
    if empty:
      problems.append(f"{share(empty)} records have an empty response (the student learns to "
                      "stop at once): remove them from the data")
    return "; ".join(problems) or None


def _token_id(tokenizer: Any, name: str) -> int | None:
  value = getattr(tokenizer, f"{name}_token_id", None)
  return None if value is None else int(value)


def _pad_id(tokenizer: Any) -> int:
  pad = _token_id(tokenizer, "pad")
  if pad is not None:
    return pad
  eos = _token_id(tokenizer, "eos")
  if eos is None:
    raise UserError(f"{type(tokenizer).__name__} has neither a pad nor an eos token; set"
                    " tokenizer.pad_token before tokenising")
  logger.warning("%s has no pad token: using its eos token %r (id %d) as the pad token",
                 type(tokenizer).__name__, getattr(tokenizer, "eos_token", None), eos)
  return eos


def _eos_id(tokenizer: Any) -> int:
  eos = _token_id(tokenizer, "eos")
  if eos is None:
    raise UserError(f"{type(tokenizer).__name__} has no eos token; pass add_eos=False or set"
                    " tokenizer.eos_token")
  return eos


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class InstructionTokenizer:
  """Dolly-form record -> {"input_ids", "labels"} (int32, same length <= max_length) or None.

  `add_eos`: end each response with its end token, which the loss covers: the chat template's
  end-of-turn token with template="chat" (where the template has one), else the eos token.
  `keep_prompt`: a long prompt keeps its "end" (default: the instruction's last words, next to
  the response) or its "start" (DistiLLM / CSD's data processing, `data[:max_prompt_length]`).
  """

  def __init__(self, tokenizer: Any, *, template: str = "minillm", max_length: int = 512,
               max_prompt_length: int = 256, add_eos: bool = True, add_bos: bool = False,
               keep_prompt: str = "end"):
    if not 0 < max_prompt_length < max_length:
      raise UserError(
          f"need 0 < max_prompt_length < max_length, got max_prompt_length={max_prompt_length},"
          f" max_length={max_length}: lower max_prompt_length (or raise max_length) so that"
          " at least one response token fits")
    if template not in TEMPLATE_NAMES:
      raise UserError(f"unknown prompt template {template!r}; expected one of {TEMPLATE_NAMES}")
    if keep_prompt not in ("start", "end"):
      raise UserError(f"keep_prompt={keep_prompt!r}: valid: start, end")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
      raise UserError(f"template='chat' needs a tokenizer with a chat template"
                      f" ({type(tokenizer).__name__} has none); use template='minillm'")
    self.tokenizer = tokenizer
    self.template = template
    self.max_length = max_length
    self.max_prompt_length = max_prompt_length
    self.add_eos = add_eos
    self.keep_prompt = keep_prompt
    # chat: the turn ends with the template's end-of-turn token (else, or without one, eos)
    self.end_of_turn = end_of_turn(tokenizer) if template == "chat" else None
    self.eos_id = (_eos_id(tokenizer) if add_eos and self.end_of_turn is None
                   else _token_id(tokenizer, "eos"))
    self.bos_id = _token_id(tokenizer, "bos") if add_bos else None
    if add_bos and self.bos_id is None:
      logger.warning("add_bos=True but %s has no bos token: prompts get none",
                     type(tokenizer).__name__)
    self.pad_id = _pad_id(tokenizer)
    self.stats = TokenizeStats()

  def __call__(self, record: Mapping[str, str]) -> dict[str, np.ndarray] | None:
    self.stats.samples += 1
    if record.get("messages"):   # a chat conversation: every assistant turn is trained
      return conversation.encode_conversation(self, record)
    prompt = _encode(self.tokenizer, render_prompt(record, self.template, self.tokenizer))
    head = [] if self.bos_id is None else [self.bos_id]
    keep = self.max_prompt_length - len(head)
    if len(prompt) > keep:
      self.stats.prompts_truncated += 1
      prompt = prompt[:keep] if self.keep_prompt == "start" else prompt[len(prompt) - keep:]
    prompt = head + prompt
    if self.end_of_turn is not None:
      response = _encode(self.tokenizer, chat_response(
          self.tokenizer, _user_text(record), record["response"], end=self.end_of_turn,
          with_end=self.add_eos))
    else:
      response = _encode(self.tokenizer, record["response"])
      if self.add_eos:
        response.append(self.eos_id)
    budget = self.max_length + 1 - len(prompt)   # `full` may hold max_length + 1 tokens
    if len(response) > budget:
      self.stats.responses_truncated += 1
      response = response[:budget]
    if not response:
      self.stats.dropped_no_response += 1
      return None
    if not record["response"].strip():
      self.stats.empty_responses += 1
    full = np.asarray(prompt + response, dtype=np.int32)
    labels = full[1:].copy()
    labels[:max(len(prompt) - 1, 0)] = IGNORE_INDEX   # targets still inside the prompt
    return {"input_ids": full[:-1], "labels": labels}

  def truncation_warning(self) -> str | None:
    """`stats.warning` with this tokenizer's lengths (see `TokenizeStats.warning`)."""
    return self.stats.warning(max_prompt_length=self.max_prompt_length,
                              max_length=self.max_length)


class TextTokenizer:
  """{"text"} record -> windows {"input_ids", "labels"} of <= max_length tokens covering it."""

  def __init__(self, tokenizer: Any, *, max_length: int):
    if max_length < 1:
      raise UserError(f"max_length must be >= 1, got {max_length}; pass a positive length")
    self.tokenizer = tokenizer
    self.max_length = max_length
    self.eos_id = _eos_id(tokenizer)
    self.pad_id = _pad_id(tokenizer)

  def __call__(self, record: Mapping[str, str]) -> list[dict[str, np.ndarray]]:
    ids = np.asarray(_encode(self.tokenizer, record["text"]) + [self.eos_id], dtype=np.int32)
    windows = []
    for start in range(0, len(ids), self.max_length):   # windows share one token at each seam
      window = ids[start:start + self.max_length + 1]
      if len(window) >= 2:
        windows.append({"input_ids": window[:-1], "labels": window[1:]})
    return windows


def _first(obj: Mapping[str, Any], names: tuple[str, ...]) -> str | None:
  if not isinstance(obj, Mapping):
    raise UserError(f"record is a JSON {type(obj).__name__}, expected an object; write each "
                    "record as a JSON object of text fields")
  for name in names:
    value = obj.get(name)
    if value is not None:
      if not isinstance(value, str):
        raise UserError(f"record field {name!r} is {type(value).__name__}, expected a string;"
                        " write it as a JSON string")
      return value
  return None


def _references(obj: Mapping[str, Any]) -> list[str] | None:
  """The response field as a list of references (the official evaluation files may hold a
  list), or None when the record has none."""
  for name in RESPONSE_FIELDS:
    value = obj.get(name) if isinstance(obj, Mapping) else None
    if isinstance(value, list):
      if not value or not all(isinstance(v, str) for v in value):
        raise UserError(f"record field {name!r} is a list of {len(value)} items, expected "
                        "one or more strings (references)")
      return list(value)
  response = _first(obj, RESPONSE_FIELDS)
  return None if response is None else [response]


def records_from_json(obj: Mapping[str, Any]) -> dict[str, Any]:
  """A JSON record with any of the known field aliases, in the Dolly form (`instruction`,
  `context`, `response`). A list of references (`output: [...]`) adds `references` (the first
  is `response`); a prompt already rendered with the MiniLLM template (the official
  evaluation files, `csd_jax.data.minillm`) adds `prompt`, used verbatim by that template.
  A chat conversation (a `messages` list) is `conversation.conversation_record`'s: its first
  exchange and `messages`."""
  if conversation.is_conversation(obj):
    return conversation.conversation_record(obj)
  instruction = _first(obj, INSTRUCTION_FIELDS)
  references = _references(obj)
  if instruction is None or references is None:
    raise UserError(f"record has fields {sorted(obj)}; expected {'/'.join(INSTRUCTION_FIELDS)}"
                    f" and {'/'.join(RESPONSE_FIELDS)}: rename its fields to those")
  prompt = obj.get("prompt")
  if isinstance(prompt, str) and minillm.is_rendered_prompt(prompt):
    return minillm.rendered_record(prompt, references, obj)
  record = {"instruction": instruction, "context": _first(obj, CONTEXT_FIELDS) or "",
            "response": references[0]}
  return {**record, "references": references} if len(references) > 1 else record


def text_from_json(obj: Mapping[str, Any]) -> dict[str, str]:
  """A JSON record of the pre-training text source, as {"text": ...}."""
  text = _first(obj, ("text",))
  if text is None:
    raise UserError(f"record has fields {sorted(obj)}; expected text: put each record's text "
                    "in a 'text' field")
  return {"text": text}


def load_records(path: str | os.PathLike, limit: int | None = None) -> list[dict[str, Any]]:
  """The instruction records of a JSONL / JSON / Parquet file (the first `limit`), in any of
  the formats `records_from_json` reads (the official evaluation files included: verbatim
  prompts, lists of references)."""
  records = [records_from_json(r) for _, r in read_json_records(path)]
  if not records:
    raise UserError(f"{path}: no records; pass a file with at least one instruction record")
  return records[:limit] if limit else records
