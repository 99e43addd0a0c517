"""Multi-turn chat rows: a `messages` list (system / user / assistant turns, the form of
UltraChat's `messages` column and most chat sets) -> `input_ids` and labels on every assistant
turn.

A record is a conversation when its `messages` field is a list (a JSON array, or a Parquet list
of {role, content} structs); `records_from_json` stores it as JSON text next to its first
exchange (`instruction`: the first user message, `response`: the first answer after it, the
reference that evaluation by generation compares with), and `InstructionTokenizer` hands it
here. It needs `data.template: chat`: the other templates render one instruction.

The assistant turns are found by rendering incrementally: for each assistant message i, the
chat template's text of `messages[:i]` with the generation prompt must start with the text
already laid out (the turns before, as a later render writes them), and the text of
`messages[:i + 1]` must start with it; what it adds is the turn, taken up to and including the
template's end-of-turn token (`chat.end_of_turn`, as `chat.chat_response` takes a single-turn
response). The loss covers those tokens only: no system or user text, no template scaffolding
(`<|im_start|>assistant\\n`, Gemma's `<start_of_turn>model\\n`), nor the newline some templates
write after the end-of-turn token. A template that writes earlier turns differently once later
ones follow (Qwen3's reasoning blocks) fails the check with a `UserError`.

Truncation keeps whole turns: trailing exchanges that do not fit `max_length` are dropped
(`TokenizeStats.turns_dropped`); only when the first exchange alone is too long is it cut as a
single-turn row is (its context to `max_prompt_length`, then its answer from the right). A
conversation with no assistant turn is dropped (`TokenizeStats.dropped_no_response`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from csd_jax.data.chat import render_chat
from csd_jax.data.fields import IGNORE_INDEX, RESPONSE_FIELDS
from csd_jax.errors import UserError

ASSISTANT = "assistant"


def is_conversation(obj: Any) -> bool:
  """Whether a raw record is a chat conversation: a mapping whose `messages` is a list, with an
  assistant turn or no response field (a prompt's messages next to a `response` stay an
  instruction record, as they were read before conversations were)."""
  if not isinstance(obj, Mapping) or not isinstance(obj.get("messages"), (list, tuple)):
    return False
  answered = any(isinstance(m, Mapping) and m.get("role") == ASSISTANT for m in obj["messages"])
  return answered or all(obj.get(name) is None for name in RESPONSE_FIELDS)


def parse_messages(value: Any) -> list[dict[str, str]]:
  """`value` (a list of {role, content}, or its JSON text) as a list of {role, content} dicts.

  Raises:
    UserError: not a list of messages with string roles and contents.
  """
  if isinstance(value, (str, bytes)):
    try:
      value = json.loads(value)
    except ValueError as error:
      raise UserError(f"record field 'messages' is not valid JSON ({error}); rebuild the data "
                      "from the files") from error
  if not isinstance(value, (list, tuple)) or not all(
      isinstance(m, Mapping) and isinstance(m.get("role"), str)
      and isinstance(m.get("content"), str) for m in value):
    raise UserError("record field 'messages' must be a list of {role, content} objects with "
                    "string values, e.g. [{\"role\": \"user\", \"content\": \"Hi\"}]")
  # Only role and content reach the template: other keys (UltraChat has none) are dropped.
  return [{"role": m["role"], "content": m["content"]} for m in value]


def conversation_record(obj: Mapping[str, Any]) -> dict[str, str]:
  """A conversation as training stores it: `messages` (JSON text) and its first exchange
  (`instruction`: the first user message; `response`: the first assistant answer after it, or
  "" where there is none), which evaluation by generation uses as prompt and reference."""
  messages = parse_messages(obj["messages"])
  users = [i for i, m in enumerate(messages) if m["role"] == "user"]
  first = users[0] if users else -1
  answer = next((m["content"] for m in messages[first + 1:] if m["role"] == ASSISTANT), "")
  return {"instruction": messages[first]["content"] if users else "", "context": "",
          "response": answer, "messages": json.dumps(messages, ensure_ascii=False)}


def _need_chat(template: str) -> None:
  if template != "chat":
    raise UserError(f"a data row holds a chat conversation ('messages'), which template "
                    f"{template!r} cannot render: set data.template=chat")


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], *,
            add_generation_prompt: bool) -> str:
  try:
    return render_chat(tokenizer, messages, add_generation_prompt=add_generation_prompt)
  except Exception as error:  # noqa: BLE001 (jinja's TemplateError, a template's raise_exception)
    message = (str(error).strip().splitlines() or [type(error).__name__])[0]
    raise UserError(f"the chat template refuses a conversation of roles "
                    f"{[m['role'] for m in messages]} ({message}); fix the data's roles (e.g. "
                    "fold a system message into the first user message)") from error


def conversation_prompt(record: Mapping[str, Any], template: str, tokenizer: Any) -> str:
  """The prompt that evaluation by generation answers: the conversation up to its first
  assistant answer (system message included), rendered with the generation prompt."""
  _need_chat(template)
  messages = parse_messages(record["messages"])
  users = [i for i, m in enumerate(messages) if m["role"] == "user"]
  if not users:
    raise UserError("a conversation has no user message; a prompt needs one")
  answers = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT and i > users[0]]
  end = answers[0] if answers else len(messages)
  return _render(tokenizer, messages[:end], add_generation_prompt=True)


def turn_texts(tokenizer: Any, messages: Sequence[Mapping[str, str]],
               end: tuple[str, int] | None) -> list[tuple[str, str]]:
  """(context, answer) texts of each assistant turn that follows another message: `context` is
  what the template writes from the end of the previous answer up to this one (the previous
  turn's trailing newline, user turns, headers), `answer` the turn as the template writes it,
  up to and including `end`'s token (everything the turn adds when `end` is None).
  Concatenated, they are the conversation's render up to its last answer.

  Raises:
    UserError: the template fails the prefix property (see the module docstring).
  """
  turns, laid_out = [], ""
  for i, message in enumerate(messages):
    if message["role"] != ASSISTANT or i == 0:   # a leading assistant message is context
      continue
    prompt = _render(tokenizer, messages[:i], add_generation_prompt=True)
    full = _render(tokenizer, messages[:i + 1], add_generation_prompt=False)
    if not prompt.startswith(laid_out) or not full.startswith(prompt):
      raise UserError(
          f"the chat template writes assistant turn {len(turns) + 1} differently once later "
          "turns follow, so its tokens cannot be masked turn by turn; train on one exchange a "
          "row (a 'prompt' and 'response' per record) or use a tokenizer whose template renders "
          "each conversation as a prefix of the longer ones")
    answer = full[len(prompt):]
    if end is not None and (cut := answer.rfind(end[0])) >= 0:
      answer = answer[:cut + len(end[0])]   # what follows the token is the next turn's context
    turns.append((prompt[len(laid_out):], answer))
    laid_out = prompt + answer
  return turns


def _encode(tokenizer: Any, text: str) -> list[int]:
  return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_conversation(encoder: Any, record: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
  """One conversation -> {"input_ids", "labels"} (pre-shifted, -100 outside the assistant
  turns) or None (no assistant turn, or no answer token left), with `encoder`'s settings and
  counts (an `instruct.InstructionTokenizer`, whose `stats.samples` already counts it)."""
  _need_chat(encoder.template)
  stats, tokenizer = encoder.stats, encoder.tokenizer
  messages = parse_messages(record["messages"])
  texts = turn_texts(tokenizer, messages, encoder.end_of_turn)
  if not texts:
    stats.dropped_no_response += 1
    return None
  end = encoder.end_of_turn
  turns = []
  for context, answer in texts:
    if end is not None and not encoder.add_eos and answer.endswith(end[0]):
      answer = answer[:-len(end[0])]   # add_eos=False: the turn without its end token
    turns.append((_encode(tokenizer, context), _encode(tokenizer, answer)))
  # No end-of-turn token to stop at: the row's last answer ends with eos, as a single turn does.
  tail = [encoder.eos_id] if end is None and encoder.add_eos else []
  head = [] if encoder.bos_id is None else [encoder.bos_id]
  room = encoder.max_length + 1   # the row holds max_length + 1 tokens before the shift
  kept, total = 0, len(head)
  for context, answer in turns:
    if total + len(context) + len(answer) + len(tail) > room:
      break
    kept, total = kept + 1, total + len(context) + len(answer)
  if kept == 0:   # the first exchange alone is too long: cut it as a single-turn row
    context, answer = turns[0][0], turns[0][1] + tail
    keep = encoder.max_prompt_length - len(head)
    if len(context) > keep:
      stats.prompts_truncated += 1
      context = context[:keep] if encoder.keep_prompt == "start" else context[len(context) - keep:]
    budget = room - len(head) - len(context)
    if len(answer) > budget:
      stats.responses_truncated += 1
      answer = answer[:max(budget, 0)]
    if not answer:
      stats.dropped_no_response += 1
      return None
    turns, kept = [(context, answer)], 1
  else:
    turns = turns[:kept - 1] + [(turns[kept - 1][0], turns[kept - 1][1] + tail)]
  if kept < len(texts):
    stats.turns_dropped += 1
  answers = [m["content"] for m in messages[1:] if m["role"] == ASSISTANT][:kept]
  if any(not a.strip() for a in answers):
    stats.empty_responses += 1
  ids, trained = list(head), [False] * len(head)
  for context, answer in turns:
    ids += context + answer
    trained += [False] * len(context) + [True] * len(answer)
  full = np.asarray(ids, dtype=np.int32)
  labels = np.where(np.asarray(trained[1:]), full[1:], IGNORE_INDEX).astype(np.int32)
  return {"input_ids": full[:-1], "labels": labels}
