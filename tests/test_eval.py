"""`csd-jax eval`: ROUGE-L / Self-BLEU / perplexity by seeded generation; teacher KL and CSD."""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import transformers

from csd_jax.eval.generation import EvalConfig, evaluate, load_records
from csd_jax.models import init_random, save_pretrained

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
  path = tmp_path_factory.mktemp("eval_data") / "set.jsonl"
  path.write_text("\n".join(json.dumps({"instruction": f"Name colour {i}.", "input": "",
                                        "output": f"Colour {i} is blue."}) for i in range(5)))
  return path


def test_seeded_generation_metrics_and_a_teacher_equal_to_the_student(tiny_model_dir, data_file):
  from csd_jax.models import load_pretrained

  model = load_pretrained(tiny_model_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  cfg = EvalConfig(seeds=(10, 20), max_prompt_length=48, max_length=64, batch_size=4)
  records = {"set": load_records(data_file)}
  first = evaluate(model, tokenizer, records, teacher=model, config=cfg)["set"]
  again = evaluate(model, tokenizer, records, config=cfg)["set"]
  assert first["samples"] == again["samples"]  # same seeds, same samples
  assert first["samples"]["10"] != first["samples"]["20"]
  assert 0.0 <= first["rougeL"] <= 100.0 and len(first["rougeL_per_seed"]) == 2
  assert 0.0 <= first["self_bleu"] <= 100.0
  # A random model over a 49152-token vocabulary: perplexity near the vocabulary size.
  assert 1e4 < first["perplexity"] < 1e5
  assert first["kl"] == pytest.approx(0.0, abs=1e-6) and first["csd"] == pytest.approx(0.0,
                                                                                       abs=1e-6)
  assert "kl" not in again


@pytest.mark.slow
def test_cli_eval_writes_json_and_a_table(tiny_model_dir, data_file, tmp_path, run_cli):
  out = tmp_path / "results.json"
  code, stdout, stderr = run_cli(
      "eval", "--model", tiny_model_dir, "--data", f"colours={data_file}", "--seeds", "10,20",
      "--max-prompt-length", "48", "--max-length", "64", "--out", out, cwd=ROOT)
  assert code == 0, stderr
  assert "colours" in stdout and "rougeL" in stdout
  results = json.loads(out.read_text())
  assert set(results["colours"]["samples"]) == {"10", "20"}
  code, _, stderr = run_cli("eval", "--model", tiny_model_dir, "--data", "nofile.jsonl",
                            cwd=ROOT)
  assert code == 2 and "expected NAME=FILE" in stderr


def test_table_columns_stay_aligned_for_huge_perplexities():
  from csd_jax.eval.generation import format_table

  table = format_table({"before": {"rougeL": 0.1, "perplexity": 7.215e8},
                        "after": {"rougeL": 13.8, "perplexity": 62.9, "kl": 2.9}})
  lines = table.splitlines()
  assert len({len(line) for line in lines}) == 1, table
  assert "7.215e+08" in lines[1] and "62.900" in lines[2] and lines[1].endswith("-")


def test_teacher_with_padded_vocabulary_rows(tiny_model_dir, data_file, tmp_path):
  """Teacher and student heads are compared on the vocabulary both have, as in training."""
  from csd_jax.eval.generation import teacher_forced_metrics
  from csd_jax.models import load_pretrained

  model = load_pretrained(tiny_model_dir)
  config = json.loads((tiny_model_dir / "config.json").read_text())
  padded = tmp_path / "padded"
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  save_pretrained(init_random({**config, "vocab_size": 49152 + 64}, seed=0), padded, tokenizer)
  cfg = EvalConfig(max_prompt_length=48, max_length=64, batch_size=4)
  out = teacher_forced_metrics(model, load_pretrained(padded), tokenizer,
                               load_records(data_file), cfg)
  # seed 0 gives the same weights for the shared rows: only the padded rows differ
  assert out["kl"] >= 0.0 and np.isfinite(out["csd"])


def _mixed_records(count: int) -> list[dict[str, str]]:
  """Instructions of 0, 1, 2, ... padding words: prompts of many lengths."""
  return [{"instruction": "Name " + "very " * i + f"colour {i}.",
           "context": "", "response": f"Colour {i} is blue."} for i in range(count)]


@pytest.mark.slow
def test_generation_compiles_once_per_prompt_width_and_keeps_the_tokenizer(tiny_model_dir):
  """64 prompts of mixed lengths in batches of 10 (the last one partial): `generate`'s jitted
  loop compiles once per padding width, not once per batch, and so does the teacher-forced
  pass; the tokenizer given comes back as it was."""
  from csd_jax.data.batching import bucket_length
  from csd_jax.data.instruct import render_prompt
  from csd_jax.data.batching import PROMPT_WIDTH_MULTIPLE
  from csd_jax.eval.generation import _token_sums, encode_prompts
  from csd_jax.models import load_pretrained
  from csd_jax.models.generate import _generate

  model = load_pretrained(tiny_model_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  tokenizer.padding_side = tokenizer.truncation_side = "right"
  settings = ("padding_side", "truncation_side", "pad_token", "pad_token_id")
  before = {name: getattr(tokenizer, name) for name in settings}
  records = _mixed_records(64)
  cfg = EvalConfig(seeds=(10,), max_prompt_length=160, max_length=192, batch_size=10)
  lengths = [len(ids) for ids in encode_prompts(tokenizer, [render_prompt(r, cfg.template)
                                                            for r in records], cfg)]
  longest = [max(lengths[s:s + 10]) for s in range(0, 64, 10)]
  widths = {bucket_length(n, multiple=PROMPT_WIDTH_MULTIPLE, cap=160) for n in longest}
  # the test bites: batches differ in their longest prompt more often than in their width
  assert len(widths) >= 2 and len(set(longest)) > len(widths), (longest, widths)
  _generate.clear_cache()
  _token_sums.clear_cache()
  result = evaluate(model, tokenizer, {"mixed": records}, teacher=model, config=cfg)["mixed"]
  assert len(result["samples"]["10"]) == 64
  assert 1 <= _generate._cache_size() <= len(widths)
  assert 1 <= _token_sums._cache_size() <= -(-cfg.max_length // PROMPT_WIDTH_MULTIPLE)  # 64..192
  assert {name: getattr(tokenizer, name) for name in settings} == before


def test_answers_do_not_depend_on_the_batch(tiny_model_dir):
  """Greedy answers are the same alone or in a batch completed with filler rows."""
  from csd_jax.models import load_pretrained
  from csd_jax.sampling import GREEDY

  model = load_pretrained(tiny_model_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  records = {"short": _mixed_records(6)}   # prompts all in one width
  common = dict(seeds=(10,), sampling=GREEDY, max_prompt_length=64, max_length=96)
  batched = evaluate(model, tokenizer, records, config=EvalConfig(batch_size=4, **common))
  alone = evaluate(model, tokenizer, records, config=EvalConfig(batch_size=1, **common))
  assert batched["short"]["samples"] == alone["short"]["samples"]
  assert batched["short"]["sampling"]["temperature"] == 0.0


@pytest.mark.slow
def test_chunked_metrics_equal_dense_logits(tiny_model_dir, data_file, tmp_path):
  """Perplexity, KL, CSD and agreement from the chunked heads equal those of full logits, with
  a different, soft-capped teacher; a student with more vocabulary rows than its teacher keeps
  its own perplexity."""
  import jax.numpy as jnp

  from csd_jax.data.batching import pad_batch
  from csd_jax.data.instruct import InstructionTokenizer
  from csd_jax.eval.generation import teacher_forced_metrics
  from csd_jax.losses import logit_loss
  from csd_jax.models import load_pretrained

  student = load_pretrained(tiny_model_dir)
  config = json.loads((tiny_model_dir / "config.json").read_text())
  teacher = init_random(config, seed=1, final_logit_softcap=2.0)
  tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
  records = load_records(data_file)
  cfg = EvalConfig(max_prompt_length=48, max_length=64, batch_size=2)
  got = teacher_forced_metrics(student, teacher, tokenizer, records, cfg)

  encode = InstructionTokenizer(tokenizer, max_length=64, max_prompt_length=48)
  batch = pad_batch([encode(r) for r in records], pad_id=encode.pad_id, max_length=64,
                    bucket_multiple=64)
  ids, mask = jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"])
  labels = jnp.asarray(batch["labels"])
  valid = labels != -100
  logits, teacher_logits = student(ids, mask), teacher(ids, mask)
  want = {"perplexity": float(jnp.exp(logit_loss("ce", logits, labels, valid))),
          "kl": float(logit_loss("fkl", logits, teacher_logits, valid)),
          "csd": float(logit_loss("csd", logits, teacher_logits, valid)),
          "agreement": float(jnp.sum((logits.argmax(-1) == teacher_logits.argmax(-1)) & valid)
                             / jnp.sum(valid))}
  assert got == pytest.approx(want, rel=1e-4)
  assert abs(got["kl"]) > 1e-3   # a different teacher: the comparison is not void

  wide = tmp_path / "wide"
  save_pretrained(init_random({**config, "vocab_size": 49152 + 64}, seed=0), wide, tokenizer)
  wide_student = load_pretrained(wide)
  alone = teacher_forced_metrics(wide_student, None, tokenizer, records, cfg)
  with_teacher = teacher_forced_metrics(wide_student, student, tokenizer, records, cfg)
  assert with_teacher["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-5)


def test_eval_imports_neither_grain_nor_tensorflow_datasets():
  code = ("import sys, csd_jax.eval.generation; "
          "print([m for m in ('grain', 'tensorflow_datasets') if m in sys.modules])")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                       cwd=ROOT, timeout=300).stdout
  assert out.strip() == "[]"
