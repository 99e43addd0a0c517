"""`csd-jax generate`: deterministic per seed, resumable after a kill without duplicates, the
AlpacaEval / MT-Bench answer formats, and bad input as one-line errors. A tiny random LLaMA over
a byte-level tokenizer with Qwen2.5's real chat template (vocabulary 320)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from chat_tokenizers import chat_tokenizer
from csd_jax import cli
from csd_jax.errors import UserError
from csd_jax.generate import prompt_sets, responses
from csd_jax.generate.command import GenerateRequest, run_generate

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAST = {"max_new_tokens": 6, "batch_size": 4, "progress_every": 0.0}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  from csd_jax.models import init_random, save_pretrained

  tokenizer = chat_tokenizer("qwen2.5")
  directory = tmp_path_factory.mktemp("generate_model")
  config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
            "vocab_size": 320, "tie_word_embeddings": True,
            "eos_token_id": tokenizer.convert_tokens_to_ids("<|im_end|>")}
  save_pretrained(init_random(config, seed=0), directory, tokenizer)
  return directory


@pytest.fixture(autouse=True, scope="module")
def _load_once(model_dir):
  """The model loads once for the module (in-process runs): a loaded model's graph compares by
  identity (`ModelConfig` is eq=False), so every load would compile the sampler again."""
  from csd_jax.eval import command

  real, cache = command.load_model, {}

  def load_model(workdir, model_dir, **options):
    key = (workdir, model_dir, tuple(sorted(options.items())))
    if key not in cache:
      cache[key] = real(workdir, model_dir, **options)
    return cache[key]

  command.load_model = load_model
  yield
  command.load_model = real


def _write(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))
  return path


def _records(count, long_every=3):
  """Single prompts of several lengths (two or more prompt buckets), one with an input, one
  chat with a system message and the data set's own answer."""
  records = [{"instruction": f"Say {i}." + (" Then tell me more." * 6 if i % long_every == 0
                                            else "")} for i in range(count)]
  records[1] = {"instruction": "Translate.", "input": "Bonjour", "dataset": "helpful_base"}
  records[2] = {"messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hi?"},
                             {"role": "assistant", "content": "Hello."}]}
  return records


def _lines(path):
  return [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]


def _run(model_dir, prompts, out, **options):
  request = GenerateRequest(prompts=str(prompts), out=str(out), model=str(model_dir),
                            **{**FAST, **options})
  return run_generate(request)


def test_responses_are_deterministic_per_seed(model_dir, tmp_path):
  prompts = _write(tmp_path / "p.jsonl", _records(6))
  _run(model_dir, prompts, tmp_path / "a.jsonl", n=2)
  _run(model_dir, prompts, tmp_path / "b.jsonl", n=2)
  _run(model_dir, prompts, tmp_path / "c.jsonl", n=2, seed=7)
  a, b, c = (_lines(tmp_path / f"{x}.jsonl") for x in "abc")
  assert a == b
  assert [(r["index"], r["sample"], r["turn"]) for r in a] == [
      (i, s, 0) for i in range(6) for s in range(2)]
  assert [r["response"] for r in a] != [r["response"] for r in c]
  assert any(a[2 * i]["response"] != a[2 * i + 1]["response"] for i in range(6))  # 2 samples
  first = a[0]
  assert first["model"] == model_dir.name
  assert first["prompt"] == "Say 0." + " Then tell me more." * 6
  assert first["settings"] == {"temperature": 0.8, "top_k": 0, "top_p": 0.95,
                               "no_repeat_ngram_size": 0, "max_new_tokens": 6,
                               "max_prompt_length": 2048, "seed": 42, "template": "chat"}
  assert a[2]["prompt"] == "Translate.\n\nBonjour" and a[4]["prompt"] == "Hi?"
  # A row draws with its own key: beside filler copies or beside other prompts, prompt 1's
  # responses are the same.
  _run(model_dir, _write(tmp_path / "two.jsonl", _records(6)[:2]), tmp_path / "d.jsonl", n=2)
  assert [r["response"] for r in _lines(tmp_path / "d.jsonl")[2:]] == [
      r["response"] for r in a[2:4]]


def test_a_killed_run_resumes_without_duplicates(model_dir, tmp_path):
  """SIGKILL mid-run, a torn last line and a batch half written, then a re-run: the file an
  uninterrupted run writes, every response once."""
  prompts = _write(tmp_path / "p.jsonl", _records(32, long_every=4))
  out = tmp_path / "killed.jsonl"
  proc = subprocess.Popen(
      [sys.executable, "-m", "csd_jax.cli", "generate", "--model", str(model_dir), "--prompts",
       str(prompts), "--out", str(out), "--n", "2", "--max-new-tokens", "6", "--batch-size",
       "4"], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (out.exists() and out.read_bytes().count(b"\n") >= 3):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, "no response line in 300 s"
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)   # the short prompts' batches are being written; the long
  proc.wait()                        # prompts' bucket then compiles for seconds
  written = _lines(out)
  assert 0 < len(written) < 64, "the run ended before the kill: make it longer"
  kept = out.read_text().splitlines(keepends=True)[:-1]   # the last batch: one row short
  out.write_text("".join(kept) + '{"index": 3, "sample": 1, "tu')   # and an append cut short
  _run(model_dir, prompts, out, n=2)
  _run(model_dir, prompts, tmp_path / "whole.jsonl", n=2)
  assert out.read_text() == (tmp_path / "whole.jsonl").read_text()
  keys = [(r["index"], r["sample"], r["turn"]) for r in _lines(out)]
  assert len(keys) == len(set(keys)) == 64
  assert all(r in _lines(out) for r in written)   # what was written before stays as it was


def test_alpaca_eval_and_mt_bench_files(model_dir, tmp_path):
  prompts = _write(tmp_path / "alpaca.jsonl", [
      {"instruction": "Name a colour.", "output": "Red.", "generator": "text_davinci_003",
       "dataset": "helpful_base"}, {"instruction": "Count to 3."}])
  out = tmp_path / "outputs.json"
  _run(model_dir, prompts, out, output_format="alpaca_eval", model_id="tiny")
  outputs = json.loads(out.read_text())
  assert [set(o) for o in outputs] == [{"instruction", "output", "generator", "dataset"},
                                       {"instruction", "output", "generator"}]
  assert outputs[0]["instruction"] == "Name a colour." and outputs[0]["generator"] == "tiny"
  assert outputs[0]["output"] == _lines(str(out) + ".responses")[0]["response"]

  questions = _write(tmp_path / "question.jsonl", [
      {"question_id": 82, "category": "math", "turns": ["What is 2+2?", "And 3+3?"]},
      {"question_id": 81, "category": "writing", "turns": ["Write a line.", "Shorter."]}])
  answers = tmp_path / "tiny.jsonl"
  _run(model_dir, questions, answers, output_format="mt_bench", model_id="tiny", n=2)
  lines = _lines(answers)
  assert [a["question_id"] for a in lines] == [81, 82]
  assert set(lines[0]) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
  assert [c["index"] for c in lines[0]["choices"]] == [0, 1]
  assert all(len(c["turns"]) == 2 for a in lines for c in a["choices"])
  rows = _lines(str(answers) + ".responses")
  assert [(r["index"], r["sample"], r["turn"]) for r in rows] == [
      (i, s, t) for i in range(2) for s in range(2) for t in range(2)]
  assert lines[1]["choices"][1]["turns"] == [rows[2]["response"], rows[3]["response"]]
  # FastChat's temperature per category (math greedy, writing 0.7)
  config = responses.GenerateConfig(mt_bench_temperatures=True)
  math, writing = prompt_sets.load_prompts(questions)
  assert (config.sampling_for(math).temperature, config.sampling_for(writing).temperature,
          config.sampling_for(math).top_p) == (0.0, 0.7, 0.95)
  # the second turn is asked in the conversation holding the model's own first answer
  prompt = prompt_sets.prompt_from_record({"turns": ["A?", "B?"]}, 0, "q")
  text = responses._render(prompt, 1, ["first answer"], chat_tokenizer("qwen2.5"), "chat")
  assert text.index("A?") < text.index("first answer") < text.index("B?")
  assert text.endswith("<|im_start|>assistant\n")


def test_bad_input_is_one_line(model_dir, tmp_path, capsys):
  good = _write(tmp_path / "good.jsonl", [{"instruction": "Hi."}])
  bad = {"no_prompt.jsonl": ('{"instruction": "Hi."}\n{"text": "x"}\n', "no_prompt.jsonl:2"),
         "messages.jsonl": ('{"messages": "Hi"}\n', "'messages' must be a list"),
         "assistant.jsonl": ('{"messages": [{"role": "assistant", "content": "x"}]}\n',
                             "no user message"),
         "number.jsonl": ('{"prompt": 3}\n', "field 'prompt' is int"),
         "not_json.jsonl": ('{"prompt": \n', "not valid JSON")}
  for name, (text, message) in bad.items():
    (tmp_path / name).write_text(text)
    assert cli.main(["generate", "--model", str(model_dir), "--prompts", str(tmp_path / name),
                     "--out", str(tmp_path / "o.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
  with pytest.raises(UserError, match="does not exist"):
    _run(model_dir, tmp_path / "missing.jsonl", tmp_path / "o.jsonl")
  with pytest.raises(UserError, match="unknown; valid"):
    _run(model_dir, good, tmp_path / "o.jsonl", output_format="vicuna")
  with pytest.raises(UserError, match="one output per instruction"):
    _run(model_dir, good, tmp_path / "o.json", output_format="alpaca_eval", n=2)
  with pytest.raises(UserError, match="no question_id"):
    _run(model_dir, good, tmp_path / "o.jsonl", output_format="mt_bench")
  with pytest.raises(UserError, match="renders single prompts only"):
    _run(model_dir, _write(tmp_path / "chat.jsonl", [{"turns": ["a", "b"]}]),
         tmp_path / "o.jsonl", template="none")
  (tmp_path / "other.jsonl").write_text('{"instruction": "x", "response": "y"}\n')
  with pytest.raises(UserError, match="not a `csd-jax generate` response line"):
    _run(model_dir, good, tmp_path / "other.jsonl")
  _run(model_dir, good, tmp_path / "done.jsonl")
  with pytest.raises(UserError, match="written with other settings"):
    _run(model_dir, good, tmp_path / "done.jsonl", temperature=0.5)


def test_bench_generate_runs_without_the_data_packages():
  """bench/generate.py prints its row, and imports neither grain, tensorflow-datasets nor
  rouge-score (the GPU host has none of them)."""
  script = ("import runpy, sys; sys.argv = ['bench/generate.py', '--sizes', 'tiny', "
            "'--repeats', '1']; runpy.run_path('bench/generate.py', run_name='__main__'); "
            "print('imported:', sorted({'grain', 'tensorflow_datasets', 'rouge_score'} "
            "& set(sys.modules)))")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
  assert result.returncode == 0, result.stderr
  row = [line for line in result.stdout.splitlines() if line.startswith("qwen-tiny")]
  assert len(row) == 1 and float(row[0].split()[-1]) > 0, result.stdout
  assert "imported: []" in result.stdout
