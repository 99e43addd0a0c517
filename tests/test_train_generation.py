"""A tiny run on instruction files with the real GPT-2 tokenizer: on-policy rows that end at the
tokenizer's eos, and evaluation by generation every N steps from inside `train`."""

import json
import pathlib

import pytest

from csd_jax.config import ConfigError, load_config
from csd_jax.metrics import read_metrics
from csd_jax.train.loop import train
from instruction_data import instruction_overrides

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def files(instruction_files):
  return instruction_files


def _config(files, *overrides):
  return load_config(TINY, [*instruction_overrides(files), "train.steps=4", *overrides])


@pytest.mark.slow
def test_onpolicy_rows_and_generation_eval_during_training(files, tmp_path):
  config = _config(files, "onpolicy.ratio=0.5", "onpolicy.buffer_size=8", "eval.every=2",
                   f"eval.datasets.test={files / 'test.jsonl'}", "eval.seeds=[10, 20]",
                   "eval.sampling.no_repeat_ngram_size=2")
  result = train(config, tmp_path)
  rows = read_metrics(tmp_path)
  logged = [r for r in rows if "test/rougeL" in r]
  assert [r["step"] for r in logged] == [2, 4]
  for r in logged:
    assert 0.0 <= r["test/rougeL"] <= 100.0 and 0.0 <= r["test/self_bleu"] <= 100.0
    assert r["test/perplexity"] > 1.0 and r["test/kl"] >= 0.0 and "test/csd" in r
  saved = json.loads((tmp_path / "eval" / "step_4.json").read_text())["test"]
  assert set(saved["samples"]) == {"10", "20"} and len(saved["samples"]["10"]) == 3
  assert saved["sampling"]["no_repeat_ngram_size"] == 2
  assert result.metrics["loss"] > 0.0


def test_generation_eval_needs_datasets_and_a_tokenizer(files):
  with pytest.raises(ConfigError, match="eval.datasets"):
    _config(files, "eval.every=2")
  with pytest.raises(ConfigError, match="needs a tokenizer"):
    load_config(TINY, ["eval.every=2", "eval.datasets.x=y.jsonl"])
