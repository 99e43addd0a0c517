"""Multi-turn chat rows (`csd_jax.data.conversation`): the loss on every assistant turn and
nothing else, whole-turn truncation, and UltraChat-shaped Parquet / JSONL files through the real
data path, on the real SmolLM2 tokenizer and the real Qwen2.5 / Gemma 2 / Llama 3.1 templates."""

import json
import logging
import pathlib

import numpy as np
import pytest

from chat_tokenizers import chat_tokenizer
from csd_jax.data.fields import IGNORE_INDEX
from csd_jax.data.instruct import (InstructionTokenizer, load_records, records_from_json,
                                   render_prompt)
from csd_jax.errors import UserError

SYSTEM = {"role": "system", "content": "Zebrafish rules apply."}
CHAT = [{"role": "user", "content": "Hi there."},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "And a number?"},
        {"role": "assistant", "content": "Seven, a prime."}]
ANSWERS = [m["content"] for m in CHAT if m["role"] == "assistant"]
END = {"smollm2": "<|im_end|>", "qwen2.5": "<|im_end|>", "gemma2": "<end_of_turn>",
       "llama3.1": "<|eot_id|>"}


@pytest.fixture(scope="module")
def smol(converted):
  import transformers

  return transformers.AutoTokenizer.from_pretrained(converted)


def encode(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def chat_row(tokenizer, messages, **kwargs):
  settings = {"max_length": 512, "max_prompt_length": 256, **kwargs}
  encoder = InstructionTokenizer(tokenizer, template="chat", **settings)
  return encoder({"messages": json.dumps(messages)}), encoder


def label_runs(labels):
  """The runs of consecutive trained label positions, as lists of ids."""
  runs, current = [], []
  for token in np.asarray(labels).tolist() + [IGNORE_INDEX]:
    if token != IGNORE_INDEX:
      current.append(token)
    elif current:
      runs, current = runs + [current], []
  return runs


def row_text(tokenizer, row):
  """The row's whole token sequence (the inputs and the last target), decoded."""
  ids = row["input_ids"].tolist() + row["labels"][-1:].tolist()
  return tokenizer.decode(ids, skip_special_tokens=False)


def test_every_assistant_turn_and_only_those_are_the_loss(smol):
  row, encoder = chat_row(smol, CHAT)
  end_id = smol.convert_tokens_to_ids("<|im_end|>")
  runs = label_runs(row["labels"])
  assert [smol.decode(r) for r in runs] == [a + "<|im_end|>" for a in ANSWERS]
  assert runs == [encode(smol, a) + [end_id] for a in ANSWERS]
  # The row is the template's own text, cut after the last answer, token for token.
  render = smol.apply_chat_template(CHAT, tokenize=False)
  whole = render[:render.rindex("<|im_end|>") + len("<|im_end|>")]
  assert row_text(smol, row) == whole
  assert row["input_ids"].tolist() + row["labels"][-1:].tolist() == encode(smol, whole)
  assert len(row["input_ids"]) == len(row["labels"])
  assert (encoder.stats.samples, encoder.stats.kept, encoder.stats.turns_dropped) == (1, 1, 0)


def test_system_user_and_scaffolding_are_never_in_the_loss(smol):
  row, _ = chat_row(smol, [SYSTEM, *CHAT])
  trained = [t for t in row["labels"].tolist() if t != IGNORE_INDEX]
  text = smol.decode(trained)
  assert "Zebrafish" in row_text(smol, row)   # the system prompt is in the inputs...
  assert "Zebrafish" not in text and "Hi there" not in text and "color" not in text
  start, newline = smol.convert_tokens_to_ids("<|im_start|>"), encode(smol, "\n")[0]
  assert start not in trained and newline not in trained   # no header, no newline after a turn
  assert not set(encode(smol, "assistant")) & set(trained)
  assert text == "".join(a + "<|im_end|>" for a in ANSWERS)


def test_truncation_keeps_whole_turns(smol):
  full, _ = chat_row(smol, [SYSTEM, *CHAT])
  two = smol.apply_chat_template([SYSTEM, *CHAT[:4]], tokenize=False).rstrip("\n")
  budget = len(encode(smol, two)) + 3   # room for two exchanges, not for the third
  assert budget < len(full["input_ids"])
  row, encoder = chat_row(smol, [SYSTEM, *CHAT], max_length=budget, max_prompt_length=16)
  assert row_text(smol, row) == two   # ends on the second answer's end-of-turn token
  assert len(row["input_ids"]) <= budget
  assert [smol.decode(r) for r in label_runs(row["labels"])] == [a + "<|im_end|>"
                                                                 for a in ANSWERS[:2]]
  assert (encoder.stats.turns_dropped, encoder.stats.responses_truncated) == (1, 0)
  assert "1 conversations cut to their first whole turns" in encoder.stats.summary()


def test_a_first_exchange_too_long_is_cut_as_a_single_turn(smol):
  long_answer = " ".join(f"word{i}" for i in range(200))
  messages = [SYSTEM, {"role": "user", "content": "Count."},
              {"role": "assistant", "content": long_answer}, *CHAT]
  prompt = encode(smol, smol.apply_chat_template(messages[:2], tokenize=False,
                                                 add_generation_prompt=True))
  assert len(prompt) > 16
  row, encoder = chat_row(smol, messages, max_length=64, max_prompt_length=16)
  assert len(row["input_ids"]) == 64
  assert row["input_ids"][:16].tolist() == prompt[-16:]   # the prompt keeps its end
  assert (row["labels"][:15] == IGNORE_INDEX).all() and (row["labels"][15:] != IGNORE_INDEX).all()
  runs = label_runs(row["labels"])
  assert len(runs) == 1 and smol.decode(runs[0]).startswith("word0 word1")
  assert "<|im_end|>" not in smol.decode(runs[0])   # cut from the right, before the end
  assert (encoder.stats.prompts_truncated, encoder.stats.responses_truncated,
          encoder.stats.turns_dropped) == (1, 1, 1)


def test_a_conversation_without_an_answer_is_dropped_and_counted(smol):
  encoder = InstructionTokenizer(smol, template="chat", max_length=128, max_prompt_length=64)
  assert encoder({"messages": json.dumps([SYSTEM, CHAT[0]])}) is None
  assert encoder({"messages": json.dumps(CHAT[:2])}) is not None
  assert (encoder.stats.samples, encoder.stats.kept, encoder.stats.dropped_no_response) == (2, 1, 1)
  assert "1 dropped with no response token" in encoder.stats.summary()


def test_a_conversation_needs_the_chat_template(smol):
  record = records_from_json({"messages": CHAT})
  for template in ("minillm", "none"):
    encoder = InstructionTokenizer(smol, template=template, max_length=128, max_prompt_length=64)
    with pytest.raises(UserError, match="set data.template=chat"):
      encoder(record)
    with pytest.raises(UserError, match="set data.template=chat"):   # evaluation's prompt
      render_prompt(record, template, smol)


def test_which_records_are_conversations():
  stored = records_from_json({"prompt": "Hi there.", "messages": CHAT})
  assert (stored["instruction"], stored["response"]) == ("Hi there.", ANSWERS[0])
  assert json.loads(stored["messages"]) == CHAT
  # A prompt's messages next to a response field: the instruction record it always was.
  plain = records_from_json({"prompt": "Q?", "messages": [CHAT[0]], "response": "A."})
  assert plain == {"instruction": "Q?", "context": "", "response": "A."}
  with pytest.raises(UserError, match="'messages' must be a list of"):
    records_from_json({"messages": [{"role": "user", "content": 3}]})


@pytest.mark.parametrize("family", ["qwen2.5", "gemma2", "llama3.1"])
def test_the_other_template_families(family):
  tok = chat_tokenizer(family)
  messages = CHAT if family == "gemma2" else [SYSTEM, *CHAT]   # Gemma 2 refuses a system turn
  row, _ = chat_row(tok, messages)
  end_id = tok.convert_tokens_to_ids(END[family])
  runs = label_runs(row["labels"])
  assert runs == [encode(tok, a) + [end_id] for a in ANSWERS]
  render = tok.apply_chat_template(messages, tokenize=False)
  assert row_text(tok, row) == render[:render.rindex(END[family]) + len(END[family])]
  assert tok.eos_token_id not in runs[-1][:-1]


def test_gemma_refusing_a_system_turn_is_one_line():
  with pytest.raises(UserError, match="System role not supported") as error:
    chat_row(chat_tokenizer("gemma2"), [SYSTEM, *CHAT])
  assert "\n" not in str(error.value)


def test_a_template_that_rewrites_earlier_turns_is_refused():
  tok = chat_tokenizer("qwen2.5")
  # The last answer is written with a marker that later renders drop (as Qwen3 drops its
  # reasoning block from earlier turns): no turn-by-turn mask exists.
  tok.chat_template = (
      "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if loop.last and m.role == "
      "'assistant' %}[final] {% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
      "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
  with pytest.raises(UserError, match="assistant turn 2 differently once later turns follow"):
    chat_row(tok, CHAT)
  row, _ = chat_row(tok, CHAT[:2])   # one exchange is still a prefix: trained as it is written
  assert tok.decode(label_runs(row["labels"])[0]) == "[final] " + ANSWERS[0] + "<|im_end|>"


def ultrachat_rows():
  """Rows in ultrachat_200k's columns (prompt, prompt_id, messages); the third has no answer."""
  return [{"prompt": "Hi there.", "prompt_id": "a1", "messages": CHAT},
          {"prompt": "Name a color.", "prompt_id": "b2", "messages": [SYSTEM, *CHAT[2:4]]},
          {"prompt": "Alone.", "prompt_id": "c3", "messages": [{"role": "user",
                                                                  "content": "Alone."}]}]


def write_parquet(path, rows):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.Table.from_pylist(rows), path)
  column = pq.read_schema(path).field("messages").type
  assert pa.types.is_list(column) and pa.types.is_struct(column.value_type)   # as on the hub
  return path


def test_ultrachat_parquet_and_jsonl_train_through_the_data_path(smol, converted, tmp_path,
                                                                 caplog):
  from csd_jax.config import load_config
  from csd_jax.data.inputs import build_inputs, validation_records
  from csd_jax.runtime.sharding import make_mesh

  rows = ultrachat_rows()
  train = write_parquet(tmp_path / "train_sft-00000-of-00001.parquet", rows)
  valid = tmp_path / "test_sft.jsonl"
  valid.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
  config = load_config(pathlib.Path(__file__).parents[1] / "configs" / "tiny.yaml", [
      "data.source=files", f"data.train_files=[{train}]", f"data.eval_files=[{valid}]",
      f"data.data_dir={tmp_path / 'tfds'}", "data.template=chat", "data.max_length=256",
      "data.max_prompt_length=128", "train.batch_size=2", f"data.tokenizer={converted}"])
  with caplog.at_level(logging.INFO, logger="csd_jax.data"):
    inputs = build_inputs(config, make_mesh(devices=__import__("jax").devices()[:1]),
                          smol.vocab_size, smol)
    batches = [next(inputs.train) for _ in range(2)]
  assert any("1 dropped with no response token" in r.getMessage() for r in caplog.records)
  seen = []
  for batch in batches:
    for labels in np.asarray(batch["labels"]):
      seen.append(tuple(smol.decode(r) for r in label_runs(labels)))
  expected = {tuple(a + "<|im_end|>" for a in ANSWERS), ("Blue.<|im_end|>",)}
  assert set(seen) == expected   # both conversations, every answer; the answerless row dropped
  held_out = next(inputs.eval)
  assert {tuple(smol.decode(r) for r in label_runs(labels))
          for labels in np.asarray(held_out["labels"])} == expected
  # Evaluation by generation: the first exchange, the system prompt in its prompt.
  records = validation_records(config)
  assert [(r["instruction"], r["response"]) for r in records] == [
      ("Hi there.", ANSWERS[0]), ("Name a color.", "Blue.")]
  assert render_prompt(records[1], "chat", smol) == smol.apply_chat_template(
      [SYSTEM, CHAT[2]], tokenize=False, add_generation_prompt=True)
  assert [r["response"] for r in load_records(train)] == [ANSWERS[0], "Blue.", ""]
