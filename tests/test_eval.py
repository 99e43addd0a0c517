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
def tiny_model_dir(converted, tmp_path_factory):
  """A random 1-layer LLaMA over SmolLM2's real tokenizer (vocabulary 49152)."""
  directory = tmp_path_factory.mktemp("eval_model")
  config = {"model_type": "llama", "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 1, "intermediate_size": 64,
            "vocab_size": 49152, "tie_word_embeddings": True, "bos_token_id": 1,
            "eos_token_id": 2}
  save_pretrained(init_random(config, seed=0), directory,
                  transformers.AutoTokenizer.from_pretrained(converted))
  return directory


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


def test_cli_eval_writes_json_and_a_table(tiny_model_dir, data_file, tmp_path):
  out = tmp_path / "results.json"
  result = subprocess.run(
      [sys.executable, "-m", "csd_jax.cli", "eval", "--model", str(tiny_model_dir), "--data",
       f"colours={data_file}", "--seeds", "10,20", "--max-prompt-length", "48",
       "--max-length", "64", "--out", str(out)], capture_output=True, text=True, check=False,
      cwd=ROOT, timeout=600)
  assert result.returncode == 0, result.stderr
  assert "colours" in result.stdout and "rougeL" in result.stdout
  results = json.loads(out.read_text())
  assert set(results["colours"]["samples"]) == {"10", "20"}
  bad = subprocess.run([sys.executable, "-m", "csd_jax.cli", "eval", "--model",
                        str(tiny_model_dir), "--data", "nofile.jsonl"], capture_output=True,
                       text=True, check=False, cwd=ROOT, timeout=300)
  assert bad.returncode == 2 and "expected NAME=FILE" in bad.stderr


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
