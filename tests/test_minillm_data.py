"""The files MiniLLM / DistiLLM distribute (tests/data/minillm: tiny files in their formats) and
the official evaluation protocol, checked on tokens."""

import json
import pathlib

import numpy as np
import pytest
import transformers

from csd_jax.config import load_config
from csd_jax.data.instruct import load_records, render_prompt
from csd_jax.eval import command, generation
from csd_jax.eval.text_metrics import rouge_l

ROOT = pathlib.Path(__file__).resolve().parents[1]
MINILLM = ROOT / "tests" / "data" / "minillm"
SETS = {"dolly": "dolly/valid.jsonl", "self_inst": "self-inst/valid.jsonl",
        "vicuna": "vicuna/valid.jsonl", "sinst": "sinst/11_/valid.jsonl",
        "uinst": "uinst/11_/valid.jsonl"}


@pytest.mark.parametrize("name", sorted(SETS))
def test_each_evaluation_set_loads_with_its_verbatim_prompt(name):
  lines = [json.loads(line) for line in (MINILLM / SETS[name]).read_text().splitlines()]
  records = load_records(MINILLM / SETS[name])
  assert len(records) == len(lines) == 3
  for line, record in zip(lines, records):
    official = line["prompt"].replace("<n>", "\n")   # prompt_datasets.py
    assert render_prompt(record, "minillm") == official
    # taken apart, the template renders the same prompt again (the chat template gets the
    # instruction and input, not the template's text)
    assert render_prompt({**record, "prompt": None}, "minillm") == official
    assert "Below is" not in render_prompt(record, "none")
    refs = line["output"] if isinstance(line["output"], list) else [line["output"]]
    assert record.get("references", [record["response"]]) == refs


def test_rouge_l_of_several_references_is_their_maximum():
  from rouge_score import rouge_scorer

  record = load_records(MINILLM / SETS["uinst"])[0]          # references: car / Car is ...
  prediction = "The odd one out is the car."
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
  each = [scorer.score(r, prediction)["rougeL"].fmeasure for r in record["references"]]
  assert each[0] != each[1]
  assert rouge_l([prediction], [record["references"]]) == pytest.approx(100 * max(each))


def test_the_minillm_source_splits_raw_jsonl_as_process_data_dolly(tmp_path):
  """data.source=minillm: the first data.minillm_dev_num records of raw.jsonl are the
  validation set (model selection), the rest the training set."""
  from csd_jax.data.inputs import instruction_splits, validation_records

  config = load_config(ROOT / "configs" / "tiny.yaml", [
      "data.source=minillm", f"data.minillm_dolly={MINILLM / 'dolly'}",
      "data.minillm_dev_num=4", f"data.data_dir={tmp_path}"])
  raw = [json.loads(line) for line in (MINILLM / "dolly" / "raw.jsonl").read_text().splitlines()]
  splits = instruction_splits(config)
  assert len(splits["valid"]) == 4 and len(splits["train"]) == len(raw) - 4
  assert [r["response"] for r in validation_records(config)] == [r["output"] for r in raw[:4]]
  trained = sorted(splits["train"][i]["response"].decode() for i in range(len(raw) - 4))
  assert trained == sorted(r["output"] for r in raw[4:])
  with pytest.raises(Exception, match="no raw.jsonl there"):
    instruction_splits(load_config(ROOT / "configs" / "tiny.yaml", [
        "data.source=minillm", f"data.minillm_dolly={tmp_path}", f"data.data_dir={tmp_path}"]))


def test_the_protocols_settings_and_what_overrides_them():
  run = {"template": "chat", "max_prompt_length": 24, "max_length": 40, "stop_ids": (7,)}
  official = command.eval_config(command.EvalRequest(data=[]), run)
  assert (official.template, official.max_prompt_length, official.max_length) == ("chat", 256,
                                                                                   512)
  assert (official.max_new_tokens, official.keep_prompt) == (256, "start")
  assert not official.prompt_special_tokens    # the chat template writes its own BOS
  minillm = command.eval_config(command.EvalRequest(data=[], template="minillm"), run)
  assert minillm.prompt_special_tokens
  assert official.sampling.no_repeat_ngram_size == 6 and official.seeds == (10, 20, 30, 40, 50)
  assert official.sampling.temperature == 1.0 and official.sampling.top_k == 0
  assert official.stop_ids == (7,)
  own = command.eval_config(command.EvalRequest(data=[], protocol="run"), run)
  assert (own.template, own.max_prompt_length, own.max_length, own.max_new_tokens) == (
      "chat", 24, 40, None)
  assert own.sampling.no_repeat_ngram_size == 0 and not own.prompt_special_tokens
  mixed = command.eval_config(command.EvalRequest(
      data=[], no_repeat_ngram_size=0, max_new_tokens=32, seeds=(1,)), None)
  assert mixed.template == "minillm" and mixed.sampling.no_repeat_ngram_size == 0
  assert mixed.max_new_tokens == 32 and mixed.seeds == (1,)


def _llama3_like_tokenizer():
  """The Llama 3.1 chat tokenizer of the tests with the real one's post-processor: BOS
  (<|begin_of_text|>) in front when special tokens are asked for."""
  from tokenizers import processors

  from chat_tokenizers import chat_tokenizer

  tokenizer = chat_tokenizer("llama3.1")
  bos = tokenizer.convert_tokens_to_ids("<|begin_of_text|>")
  tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])
  return tokenizer, bos


def test_prompts_keep_their_first_tokens_with_the_tokenizers_bos(gpt2_tokenizer):
  tokenizer, bos = _llama3_like_tokenizer()
  prompt = "".join(f"word{i} " for i in range(200))          # byte-level: ~1400 tokens
  plain = tokenizer(prompt, add_special_tokens=False)["input_ids"]
  official = command.eval_config(command.EvalRequest(data=[]), None)
  [ids] = generation.encode_prompts(tokenizer, [prompt], official)
  assert ids == ([bos] + plain)[:256] and len(ids) == 256
  own = command.eval_config(command.EvalRequest(data=[], protocol="run"), None)
  [ids] = generation.encode_prompts(tokenizer, [prompt], own)
  assert ids == plain[-256:]
  gpt2 = generation.encode_prompts(gpt2_tokenizer, ["Hello there."], official)
  assert gpt2 == [[15496, 612, 13]]                         # GPT-2: no BOS, as officially


def _repeats(prompt, answer, n):
  """n-grams ending in the answer that occurred before (the prompt's own repeats are not the
  sampler's doing)."""
  row = list(prompt) + list(answer)
  grams = [tuple(row[i:i + n]) for i in range(len(row) - n + 1)]
  first_new = max(len(prompt) - n + 1, 0)
  return sum(grams[i] in grams[:i] for i in range(first_new, len(grams)))


def test_every_prompt_gets_256_new_tokens_and_no_repeated_6_gram(tiny_model_dir, monkeypatch):
  """Prompts of two bucket widths both get 256 new tokens (not 512 minus the width); greedy
  decoding of a random model loops, and no_repeat_ngram_size 6 stops every repeat of a 6-gram
  over prompt and answer (transformers' rule, left padding excluded)."""
  from csd_jax.models import load_pretrained
  from csd_jax.sampling import GREEDY

  model = load_pretrained(tiny_model_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  real_generate, seen = generation.generate, []

  def recording(model, ids, *, prompt_mask, **kwargs):
    out = real_generate(model, ids, prompt_mask=prompt_mask, **kwargs)
    seen.append((np.asarray(ids), np.asarray(prompt_mask), np.asarray(out)))
    return out

  monkeypatch.setattr(generation, "generate", recording)
  records = {"set": [{"instruction": "Name " + "a very long " * k + "colour.", "context": "",
                      "response": "Blue."} for k in (1, 30)]}
  for ngram in (0, 6):
    config = command.eval_config(command.EvalRequest(
        data=[], seeds=(10,), no_repeat_ngram_size=ngram), {"stop_ids": ()})
    config = generation.EvalConfig(**{**config.__dict__, "batch_size": 1,
                                      "sampling": GREEDY.__class__(
                                          temperature=0.0, no_repeat_ngram_size=ngram)})
    seen.clear()
    generation.evaluate(model, tokenizer, records, config=config)
    widths = {ids.shape[1] for ids, _, _ in seen}
    assert len(widths) == 2 and {out.shape[1] for _, _, out in seen} == {256}
    rows = [(ids[0][mask[0] == 1], out[0]) for ids, mask, out in seen]
    if ngram:
      assert all(_repeats(prompt, answer, 6) == 0 for prompt, answer in rows)
    else:
      assert any(_repeats(prompt, answer, 6) > 0 for prompt, answer in rows)   # it bites
