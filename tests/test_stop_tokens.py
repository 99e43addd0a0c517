"""Stop tokens and chat turns: `csd_jax.data.chat` with real chat templates (SmolLM2's ChatML,
Qwen2.5-Instruct, Gemma 2 IT, Llama 3.1 Instruct), the exact tokens a chat row's loss covers,
and generation / evaluation / on-policy rows ending at any stop id."""

import json
import types

import jax.numpy as jnp
import numpy as np
import pytest

from chat_tokenizers import chat_tokenizer
from csd_jax.train import onpolicy
from csd_jax.data.batching import pad_batch
from csd_jax.data.chat import (chat_response, end_of_turn, model_eos_ids, run_model_stop_ids,
                               stop_ids)
from csd_jax.data.fields import IGNORE_INDEX
from csd_jax.data.instruct import InstructionTokenizer, render_prompt
from csd_jax.eval import generation
from csd_jax.run.state import ROW_KEYS

RECORD = {"instruction": "Name a primary color.", "context": "", "response": " Blue is one. "}
END = {"smollm2": "<|im_end|>", "qwen2.5": "<|im_end|>", "gemma2": "<end_of_turn>",
       "llama3.1": "<|eot_id|>"}
# What each template writes after the generation prompt for RECORD's response (Gemma and
# Llama trim the message; ChatML keeps it), then what follows the end-of-turn token.
WRITTEN = {"smollm2": (" Blue is one. ", "\n"), "qwen2.5": (" Blue is one. ", "\n"),
           "gemma2": ("Blue is one.", "\n"), "llama3.1": ("Blue is one.", "")}


@pytest.fixture(scope="module")
def smollm2(converted):
  import transformers

  return transformers.AutoTokenizer.from_pretrained(converted)


@pytest.fixture(params=list(END))
def family(request):
  """(name, tokenizer) for each real chat template."""
  if request.param == "smollm2":
    return request.param, request.getfixturevalue("smollm2")
  return request.param, chat_tokenizer(request.param)


def encode(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_end_of_turn_is_what_the_template_writes_after_an_answer(family):
  name, tok = family
  token, token_id = end_of_turn(tok)
  assert token == END[name] and token_id == tok.convert_tokens_to_ids(END[name])
  content, after = WRITTEN[name]
  full = tok.apply_chat_template([{"role": "user", "content": "Q"},
                                  {"role": "assistant", "content": RECORD["response"]}],
                                 tokenize=False)
  assert full.endswith(content + token + after)   # the template's own text, checked here
  assert chat_response(tok, "Q", RECORD["response"]) == content + token
  assert chat_response(tok, "Q", RECORD["response"], with_end=False) == content


def test_chat_rows_cover_the_answer_and_its_end_of_turn_token(family):
  """The loss covers exactly the answer's tokens and the end-of-turn token, not the eos
  appended after it nor the template's newline that follows it."""
  name, tok = family
  out = InstructionTokenizer(tok, template="chat", max_length=256, max_prompt_length=200)(RECORD)
  prompt = encode(tok, render_prompt(RECORD, "chat", tok))
  content, _ = WRITTEN[name]
  end_id = tok.convert_tokens_to_ids(END[name])
  start = int(np.argmax(out["labels"] != IGNORE_INDEX))
  assert start == len(prompt) - 1
  assert out["input_ids"][:start + 1].tolist() == prompt
  assert out["labels"][start:].tolist() == encode(tok, content) + [end_id]
  assert len(out["labels"]) == len(prompt) + len(encode(tok, content))   # nothing after it
  if name in ("gemma2", "llama3.1"):   # eos differs from the end of a turn: not trained
    assert tok.eos_token_id not in out["labels"].tolist()


def test_real_token_ids_of_smollm2_and_the_other_templates(smollm2):
  """SmolLM2: "Blue." <|im_end|> is [23390, 30, 2]; the generation prompt ends
  <|im_start|> assistant \\n (1, 520, 9531, 198)."""
  out = InstructionTokenizer(smollm2, template="chat", max_length=128,
                             max_prompt_length=100)(dict(RECORD, response="Blue."))
  start = int(np.argmax(out["labels"] != IGNORE_INDEX))
  assert out["input_ids"][start - 3:start + 1].tolist() == [1, 520, 9531, 198]
  assert out["labels"][start:].tolist() == [23390, 30, 2]
  gemma = chat_tokenizer("gemma2")
  out = InstructionTokenizer(gemma, template="chat", max_length=64,
                             max_prompt_length=48)(dict(RECORD, response="Hi"))
  assert gemma.decode(out["labels"][out["labels"] != IGNORE_INDEX]) == "Hi<end_of_turn>"
  assert gemma.decode(out["input_ids"]).startswith("<bos><start_of_turn>user\n")


def test_minillm_and_add_eos_false_keep_their_ends():
  gemma = chat_tokenizer("gemma2")
  minillm = InstructionTokenizer(gemma, template="minillm", max_length=128,
                                 max_prompt_length=100)(RECORD)
  assert minillm["labels"][-1] == gemma.eos_token_id
  bare = InstructionTokenizer(gemma, template="chat", max_length=128, max_prompt_length=100,
                              add_eos=False)(RECORD)
  assert gemma.decode(bare["labels"][bare["labels"] != IGNORE_INDEX]) == "Blue is one."


def test_response_cut_from_the_right_loses_its_end_token():
  tok = chat_tokenizer("qwen2.5")
  encoder = InstructionTokenizer(tok, template="chat", max_length=120, max_prompt_length=100)
  out = encoder(dict(RECORD, response="x" * 200))
  assert len(out["input_ids"]) == 120 and tok.eos_token_id not in out["labels"].tolist()
  assert encoder.stats.responses_truncated == 1


def test_stop_ids_of_the_tokenizers(family):
  name, tok = family
  ids = stop_ids(tok)
  assert ids[0] == tok.eos_token_id and tok.convert_tokens_to_ids(END[name]) in ids
  assert len(ids) == len(set(ids))


def test_known_end_of_turn_tokens_without_a_template():
  tok = chat_tokenizer("qwen2.5")
  tok.chat_template = None
  tok.eos_token = "<|endoftext|>"   # a base model's tokenizer
  assert end_of_turn(tok) is None
  assert stop_ids(tok) == (256, tok.convert_tokens_to_ids("<|im_end|>"))


def test_a_template_that_refuses_a_conversation_has_no_end_of_turn():
  tok = chat_tokenizer("gemma2")
  tok.chat_template = "{{ raise_exception('no') }}"
  assert end_of_turn(tok) is None
  assert stop_ids(tok) == (tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>"))


def _model_dir(path, config_eos, generation_eos=None):
  path.mkdir()
  (path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                "eos_token_id": config_eos}))
  if generation_eos is not None:
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": generation_eos}))
  return path


def test_stop_ids_gather_config_and_generation_config(tmp_path):
  # Qwen2.5-7B-Instruct: config.json 151645, generation_config.json [151645, 151643].
  qwen = _model_dir(tmp_path / "qwen", 151645, [151645, 151643])
  assert model_eos_ids(qwen) == [151645, 151645, 151643]
  assert stop_ids(chat_tokenizer("qwen2.5"), qwen) == (258, 151645, 151643)
  # Llama 3.1 Instruct: a list in config.json; no generation_config.json.
  llama = _model_dir(tmp_path / "llama", [128001, 128008, 128009])
  assert stop_ids(chat_tokenizer("llama3.1"), llama) == (257, 260, 128001, 128008, 128009)
  assert stop_ids(None, {"eos_token_id": 7}, types.SimpleNamespace(eos_token_id=[8, 7]),
                  types.SimpleNamespace(cfg=types.SimpleNamespace(eos_token_id=9)),
                  None, extra=(10,)) == (7, 8, 9, 10)


def test_hub_ids_are_read_from_the_cache_only(tmp_path, monkeypatch):
  from huggingface_hub import constants

  snapshot = tmp_path / "models--org--chat" / "snapshots" / "abc"
  snapshot.mkdir(parents=True)
  (tmp_path / "models--org--chat" / "refs").mkdir()
  (tmp_path / "models--org--chat" / "refs" / "main").write_text("abc")
  (snapshot / "generation_config.json").write_text(json.dumps({"eos_token_id": [5, 6]}))
  monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
  assert stop_ids(None, "org/chat") == (5, 6)
  assert stop_ids(None, "org/not-cached", "./no/such/dir") == ()


def test_a_run_gathers_its_student_and_teacher_ids(tmp_path):
  from csd_jax.config import load_config

  teacher = _model_dir(tmp_path / "teacher", [1, 107])
  config = load_config(None, [f"teacher.path={teacher}",
                              "student.config={model_type: gemma2, eos_token_id: 1}"])
  assert run_model_stop_ids(config) == (1, 107)
  assert generation.run_settings(config).stop_ids == (1, 107)


def test_generation_stops_at_any_stop_id():
  from csd_jax.models import generate, init_random

  model = init_random({"model_type": "llama", "hidden_size": 16, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "num_key_value_heads": 1,
                       "intermediate_size": 32, "vocab_size": 64}, seed=3)
  prompt = jnp.asarray([[5, 6, 7]], jnp.int32)
  free = np.asarray(generate(model, prompt, max_new_tokens=8))[0].tolist()
  k = next(i for i in range(1, 8) if free[i] not in free[:i])   # a token's first appearance
  stopped = np.asarray(generate(model, prompt, max_new_tokens=8, eos_id=[63, free[k], 62],
                                pad_id=0))[0].tolist()
  assert stopped[:k + 1] == free[:k + 1] and stopped[k + 1:] == [0] * (7 - k)


def test_eval_answers_end_at_the_first_stop_id(monkeypatch):
  tok = chat_tokenizer("gemma2")
  eot = tok.convert_tokens_to_ids("<end_of_turn>")
  body = encode(tok, "Blue")
  seen = {}

  def fake_generate(model, ids, *, eos_id, **kwargs):
    seen["eos_id"] = eos_id
    rows = [body + [eot] + encode(tok, "junk"), body + [tok.eos_token_id, 40, 41, 42, 43]]
    return np.asarray([row[:9] for row in rows])

  monkeypatch.setattr(generation, "generate", fake_generate)
  stops = stop_ids(tok, {"eos_token_id": [1, 107]})
  answers = generation.generate_answers(None, tok, [[5, 6], [7]], 10,
                                        generation.EvalConfig(batch_size=2), stops)
  assert answers == ["Blue", "Blue"] and seen["eos_id"] == stops
  assert set(stops) == {tok.eos_token_id, eot, 1, 107}


def test_onpolicy_uses_every_stop_id(monkeypatch, tmp_path):
  from csd_jax.config import load_config

  seen = {}
  monkeypatch.setattr(onpolicy, "OnPolicy", lambda *a, **kw: seen.update(kw))
  student = _model_dir(tmp_path / "student", [128001, 128009])
  config = load_config(None, [f"student.path={student}", f"teacher.path={student}",
                              "onpolicy.ratio=0.5"])
  tok = chat_tokenizer("llama3.1")
  onpolicy.build(config, None, tok, 0, 100)
  assert seen["eos_ids"] == (257, 260, 128001, 128009)


def test_onpolicy_chat_rows_round_trip():
  """A chat row's prompt plus its own response sampled up to the end-of-turn token (and junk
  after it) gives back the row: on-policy rows end where the data's chat rows end."""
  tok = chat_tokenizer("qwen2.5")
  encode_row = InstructionTokenizer(tok, template="chat", max_length=192, max_prompt_length=160)
  example = encode_row(RECORD)
  batch = {k: jnp.asarray(v) for k, v in pad_batch([example], pad_id=encode_row.pad_id,
                                                   max_length=192, bucket_multiple=192).items()}
  prompt, _, lengths = onpolicy.batch_prompts(batch, 160, encode_row.pad_id)
  start = int(np.argmax(example["labels"] != IGNORE_INDEX))
  response = example["labels"][start:].tolist()
  answer = np.asarray([response + encode(tok, "\nmore") + [0] * 8], np.int32)[:, :32]
  rows = onpolicy.answer_rows(prompt, lengths, jnp.asarray(answer), eos_ids=stop_ids(tok),
                              pad_id=encode_row.pad_id, length=192)
  for key in ROW_KEYS:
    np.testing.assert_array_equal(np.asarray(rows[key]), np.asarray(batch[key]), err_msg=key)
