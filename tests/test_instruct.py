"""Record -> token tests for `csd_jax.data.instruct`, with the real GPT-2 and SmolLM2 tokenizers."""

import logging

import numpy as np
import pytest

from csd_jax.data.instruct import (InstructionTokenizer, TextTokenizer, TokenizeStats,
                                   records_from_json, render_prompt, text_from_json)
from csd_jax.errors import UserError

NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately"
            " completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides"
              " further context. Write a response that appropriately completes the request.\n\n"
              "### Instruction:\n{instruction}\n\n### Input:\n{context}\n\n### Response:\n")
GPT2_EOS = 50256
RECORD = {"instruction": "Name a primary color.", "context": "",
          "response": "Blue is a primary color."}


@pytest.fixture(scope="module")
def gpt2(gpt2_tokenizer):
  """The conftest GPT-2 tokenizer, checked to carry the real vocabulary (not an empty BPE)."""
  ids = gpt2_tokenizer("Hello world", add_special_tokens=False)["input_ids"]
  assert ids == [15496, 995], (
      f"gpt2_tokenizer encodes 'Hello world' as {ids}: with transformers 5 the vocab_file= /"
      " merges_file= arguments are ignored; build it with GPT2TokenizerFast.from_pretrained(dir)")
  return gpt2_tokenizer


@pytest.fixture(scope="module")
def smol(converted):
  import transformers

  return transformers.AutoTokenizer.from_pretrained(converted)


def encode(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_render_minillm_with_and_without_context():
  with_ctx = dict(RECORD, context="Think of the sky.")
  assert render_prompt(with_ctx, "minillm") == WITH_INPUT.format(
      instruction="Name a primary color.", context="Think of the sky.")
  assert render_prompt(RECORD, "minillm") == NO_INPUT.format(instruction="Name a primary color.")
  assert render_prompt(with_ctx, "none") == "Name a primary color.\n\nThink of the sky."
  assert render_prompt(RECORD, "none") == "Name a primary color."


def test_render_errors(gpt2):
  with pytest.raises(UserError, match="chat template"):
    render_prompt(RECORD, "chat", gpt2)
  with pytest.raises(UserError, match="chat template"):
    render_prompt(RECORD, "chat")
  with pytest.raises(UserError, match="unknown prompt template 'alpaca'"):
    render_prompt(RECORD, "alpaca")
  with pytest.raises(UserError, match="chat template"):
    InstructionTokenizer(gpt2, template="chat")


def test_exact_ids_with_both_sides_truncated(gpt2):
  # The no-input prompt ends "\n\n### Response:\n" = [198, 198, 21017, 18261, 25, 198].
  prompt = encode(gpt2, NO_INPUT.format(instruction=RECORD["instruction"]))
  assert prompt[-4:] == [21017, 18261, 25, 198]
  assert encode(gpt2, RECORD["response"]) == [14573, 318, 257, 4165, 3124, 13]
  tok = InstructionTokenizer(gpt2, max_length=7, max_prompt_length=4)
  out = tok(RECORD)
  # full = last 4 prompt tokens + first 4 response tokens (max_length + 1 = 8 tokens).
  assert out["input_ids"].tolist() == [21017, 18261, 25, 198, 14573, 318, 257]
  assert out["labels"].tolist() == [-100, -100, -100, 14573, 318, 257, 4165]
  assert out["input_ids"].dtype == np.int32 and out["labels"].dtype == np.int32
  assert tok.stats == TokenizeStats(samples=1, prompts_truncated=1, responses_truncated=1)
  # DistiLLM / CSD keep a long prompt's first tokens (data.keep_prompt=start)
  first = InstructionTokenizer(gpt2, max_length=7, max_prompt_length=4, keep_prompt="start")
  assert first(RECORD)["input_ids"].tolist() == prompt[:4] + [14573, 318, 257]


def test_exact_layout_without_truncation(gpt2):
  prompt = encode(gpt2, NO_INPUT.format(instruction=RECORD["instruction"]))
  response = [14573, 318, 257, 4165, 3124, 13]
  tok = InstructionTokenizer(gpt2, max_length=64, max_prompt_length=48)
  out = tok(RECORD)
  assert out["input_ids"].tolist() == prompt + response   # the final eos is only a target
  assert out["labels"].tolist() == [-100] * (len(prompt) - 1) + response + [GPT2_EOS]
  assert tok.stats == TokenizeStats(samples=1)
  no_eos = InstructionTokenizer(gpt2, max_length=64, max_prompt_length=48, add_eos=False)(RECORD)
  assert no_eos["labels"].tolist() == [-100] * (len(prompt) - 1) + response
  assert no_eos["input_ids"].tolist() == prompt + response[:-1]


def test_empty_context_uses_no_input_template(gpt2):
  tok = InstructionTokenizer(gpt2, max_length=128, max_prompt_length=100)
  out = tok(RECORD)
  n_prompt = int(np.argmax(out["labels"] != -100)) + 1
  text = gpt2.decode(out["input_ids"][:n_prompt].tolist())
  assert text == NO_INPUT.format(instruction=RECORD["instruction"])
  with_ctx = tok(dict(RECORD, context="Think of the sky."))
  n_ctx = int(np.argmax(with_ctx["labels"] != -100)) + 1
  assert "### Input:\nThink of the sky.\n\n" in gpt2.decode(with_ctx["input_ids"][:n_ctx].tolist())


def test_very_long_response_cut_exactly_to_max_length(gpt2):
  response = " ".join(f"word{i}" for i in range(400))
  response_ids = encode(gpt2, response)
  prompt = encode(gpt2, NO_INPUT.format(instruction=RECORD["instruction"]))
  tok = InstructionTokenizer(gpt2, max_length=50, max_prompt_length=40)
  out = tok(dict(RECORD, response=response))
  assert len(out["input_ids"]) == 50 and len(out["labels"]) == 50
  kept = 50 + 1 - len(prompt)
  assert out["labels"].tolist() == [-100] * (len(prompt) - 1) + response_ids[:kept]
  assert GPT2_EOS not in out["labels"].tolist()   # the eos was cut with the tail
  assert tok.stats == TokenizeStats(samples=1, responses_truncated=1)


def test_long_prompt_keeps_its_last_tokens(gpt2):
  instruction = " ".join(f"step{i}" for i in range(200))
  prompt = encode(gpt2, NO_INPUT.format(instruction=instruction))
  tok = InstructionTokenizer(gpt2, max_length=64, max_prompt_length=32)
  out = tok(dict(RECORD, instruction=instruction))
  assert out["input_ids"][:32].tolist() == prompt[-32:]
  assert (out["labels"][:31] == -100).all() and out["labels"][31] == 14573
  assert tok.stats.prompts_truncated == 1 and tok.stats.responses_truncated == 0


def test_empty_response_dropped_and_counted(gpt2):
  tok = InstructionTokenizer(gpt2, max_length=64, max_prompt_length=48, add_eos=False)
  assert tok(dict(RECORD, response="")) is None
  assert tok(RECORD) is not None
  assert tok.stats == TokenizeStats(samples=2, dropped_no_response=1)
  assert tok.stats.kept == 1
  with_eos = InstructionTokenizer(gpt2, max_length=64, max_prompt_length=48)
  out = with_eos(dict(RECORD, response=""))
  assert out["labels"][out["labels"] != -100].tolist() == [GPT2_EOS]


@pytest.mark.parametrize("which", ["gpt2", "smol"])
def test_unicode_round_trips(which, request):
  tokenizer = request.getfixturevalue(which)
  record = {"instruction": "Traduis « où est la café ? » — 日本語で", "context": "Ångström 😀",
            "response": "Café 😀 日本語 naïve — 中文 🎉"}
  tok = InstructionTokenizer(tokenizer, max_length=256, max_prompt_length=200, add_eos=False)
  out = tok(record)
  n_prompt = int(np.argmax(out["labels"] != -100)) + 1
  assert tokenizer.decode(out["labels"][n_prompt - 1:].tolist()) == record["response"]
  assert tokenizer.decode(out["input_ids"][:n_prompt].tolist()) == render_prompt(record, "minillm")


def test_pad_token_warning(gpt2, smol, caplog):
  with caplog.at_level(logging.WARNING, logger="csd_jax.data"):
    tok = InstructionTokenizer(gpt2)
  assert tok.pad_id == GPT2_EOS
  warned = [r for r in caplog.records if r.name == "csd_jax.data"]
  assert len(warned) == 1 and "no pad token" in warned[0].getMessage()
  assert "eos" in warned[0].getMessage()
  assert gpt2.pad_token is None   # the caller's tokenizer is left as it was
  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="csd_jax.data"):
    assert InstructionTokenizer(smol).pad_id == smol.pad_token_id
  assert not [r for r in caplog.records if r.name == "csd_jax.data"]


@pytest.mark.parametrize("max_length,max_prompt_length", [(8, 8), (8, 9), (8, 0), (8, -1)])
def test_bad_max_lengths(gpt2, max_length, max_prompt_length):
  with pytest.raises(UserError) as error:
    InstructionTokenizer(gpt2, max_length=max_length, max_prompt_length=max_prompt_length)
  message = str(error.value)
  assert f"max_prompt_length={max_prompt_length}" in message
  assert f"max_length={max_length}" in message and "lower max_prompt_length" in message


def test_chat_template_smollm2(smol):
  record = dict(RECORD, context="Think of the sky.", response="Blue.")
  rendered = render_prompt(record, "chat", smol)
  assert rendered.endswith("<|im_start|>user\nName a primary color.\n\nThink of the sky."
                           "<|im_end|>\n<|im_start|>assistant\n")
  tok = InstructionTokenizer(smol, template="chat", max_length=128, max_prompt_length=100)
  out = tok(record)
  prompt = encode(smol, rendered)
  assert prompt[-4:] == [1, 520, 9531, 198]   # <|im_start|> assistant \n
  start = int(np.argmax(out["labels"] != -100))
  assert start == len(prompt) - 1 and out["input_ids"][start] == 198
  assert smol.decode(out["input_ids"][:start + 1].tolist()).endswith("<|im_start|>assistant\n")
  assert out["labels"][start:].tolist() == [23390, 30, 2]   # "Blue" "." <|im_end|>


def test_add_bos_survives_left_truncation(smol):
  instruction = " ".join(f"step{i}" for i in range(100))
  tok = InstructionTokenizer(smol, max_length=32, max_prompt_length=16, add_bos=True)
  out = tok(dict(RECORD, instruction=instruction))
  prompt = encode(smol, render_prompt(dict(RECORD, instruction=instruction), "minillm"))
  assert out["input_ids"][:16].tolist() == [smol.bos_token_id] + prompt[-15:]
  assert smol.bos_token_id == 1 and tok.stats.prompts_truncated == 1


@pytest.mark.parametrize("obj,expected", [
    ({"instruction": "i", "context": "c", "response": "r"}, ("i", "c", "r")),
    ({"prompt": "i", "completion": "r"}, ("i", "", "r")),
    ({"question": "i", "answer": "r", "category": "qa"}, ("i", "", "r")),
    ({"instruction": "i", "input": "c", "output": "r"}, ("i", "c", "r")),
    ({"instruction": "i", "context": None, "response": "r"}, ("i", "", "r")),
    ({"id": "d0", "dialogue": "i", "summary": "r", "topic": "t"}, ("i", "", "r")),
])
def test_records_from_json_aliases(obj, expected):
  assert records_from_json(obj) == dict(zip(("instruction", "context", "response"), expected))


def test_records_from_json_missing_fields():
  with pytest.raises(UserError) as error:
    records_from_json({"query": "q", "reply": "r"})
  assert str(error.value) == ("record has fields ['query', 'reply']; expected"
                              " instruction/prompt/question/dialogue and"
                              " response/output/completion/answer/summary"
                              ": rename its fields to those")
  with pytest.raises(UserError, match=r"\['instruction'\]"):
    records_from_json({"instruction": "only"})
  assert text_from_json({"text": "hello", "id": 3}) == {"text": "hello"}
  with pytest.raises(UserError, match=r"record has fields \['body'\]; expected text"):
    text_from_json({"body": "hello"})
  with pytest.raises(UserError, match="record is a JSON list, expected an object"):
    records_from_json(["i", "r"])
  with pytest.raises(UserError, match="record field 'response' is int, expected a string"):
    records_from_json({"instruction": "i", "response": 3})


@pytest.mark.parametrize("max_length", [1, 2, 3, 7, 16, 1000])
def test_text_windows_cover_every_target_once(gpt2, max_length):
  text = "The quick brown fox jumps over the lazy dog. 日本語 😀 " * 3
  ids = encode(gpt2, text) + [GPT2_EOS]
  windows = TextTokenizer(gpt2, max_length=max_length)({"text": text})
  targets = np.concatenate([w["labels"] for w in windows]).tolist()
  inputs = np.concatenate([w["input_ids"] for w in windows]).tolist()
  assert targets == ids[1:] and inputs == ids[:-1]
  assert all(1 <= len(w["input_ids"]) == len(w["labels"]) <= max_length for w in windows)
  assert all((w["labels"][:-1] == w["input_ids"][1:]).all() for w in windows)
  assert len(windows) == -(-(len(ids) - 1) // max_length)


def test_stats_add_and_summary():
  a = TokenizeStats(samples=3, prompts_truncated=1, responses_truncated=0, dropped_no_response=1)
  b = TokenizeStats(samples=2, prompts_truncated=0, responses_truncated=2, dropped_no_response=0)
  assert a + b == TokenizeStats(5, 1, 2, 1)
  line = (a + b).summary()
  assert "\n" not in line
  assert "5 records" in line and "4 kept" in line and "2 responses" in line and "1 dropped" in line
