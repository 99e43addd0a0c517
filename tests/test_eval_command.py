"""`csd-jax eval`'s choices: a run is judged on its own prompt format and tokenizer."""

import json
import pathlib

import pytest

from csd_jax.config import load_config
from csd_jax.errors import UserError
from csd_jax.eval import command, generation
from csd_jax.train.loop import train

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, gpt2_tokenizer):
  base = tmp_path_factory.mktemp("eval_command")
  gpt2_tokenizer.save_pretrained(base / "tokenizer")
  train(load_config(TINY, ["train.steps=1", "data.template=chat", "data.max_length=40",
                           "data.max_prompt_length=24", f"data.tokenizer={base / 'tokenizer'}"]),
        base / "run")
  (base / "set.jsonl").write_text(json.dumps({"instruction": "Hi.", "response": "Hello."}))
  return base


def _settings(monkeypatch, request):
  seen = {}

  def fake_evaluate(model, tokenizer, datasets, *, teacher=None, config):
    seen.update(config=config, tokenizer=tokenizer, datasets=datasets)
    return {name: {"rougeL": 0.0} for name in datasets}

  monkeypatch.setattr(generation, "evaluate", fake_evaluate)
  results, out = command.run_eval(request)
  return seen, results, out


def test_a_run_is_judged_on_its_own_format_and_opens_sharded(run_dir, monkeypatch, tmp_path):
  """One test over the run (its training is the cost): the defaults, the overrides, and the
  weights split over the devices (export and eval hold one copy, not one per device)."""
  import jax
  from flax import nnx

  from csd_jax.run.models import open_run

  data = [f"set={run_dir / 'set.jsonl'}"]
  seen, _, out = _settings(monkeypatch, command.EvalRequest(
      data=data, workdir=str(run_dir / "run"), protocol="run"))
  config = seen["config"]
  assert (config.template, config.max_prompt_length, config.max_length) == ("chat", 24, 40)
  seen, _, _ = _settings(monkeypatch, command.EvalRequest(data=data,
                                                          workdir=str(run_dir / "run")))
  config = seen["config"]   # the official protocol, with the run's own template
  assert (config.template, config.max_prompt_length, config.max_new_tokens) == ("chat", 256, 256)
  assert seen["tokenizer"].name_or_path.endswith("tokenizer")
  assert out == run_dir / "run" / "eval_results.json" and out.exists()

  seen, _, out = _settings(monkeypatch, command.EvalRequest(
      data=data, workdir=str(run_dir / "run"), protocol="run", template="minillm", max_length=64,
      out=str(tmp_path / "r.json")))
  config = seen["config"]
  assert (config.template, config.max_prompt_length, config.max_length) == ("minillm", 24, 64)
  assert out == tmp_path / "r.json"

  run = open_run(run_dir / "run", teacher=True)
  for model in (run.student, run.teacher):
    shardings = [v.get_value().sharding for _, v in nnx.to_flat_state(nnx.state(model))]
    assert all(len(s.device_set) == jax.local_device_count() for s in shardings)
    assert any("fsdp" in str(s.spec) for s in shardings)
    assert not all(s.is_fully_replicated for s in shardings)


def test_bad_requests_are_user_errors(tmp_path):
  (tmp_path / "set.jsonl").write_text(json.dumps({"instruction": "Hi.", "response": "Hello."}))
  with pytest.raises(UserError, match="expected NAME=FILE"):
    command.run_eval(command.EvalRequest(data=["set.jsonl"], workdir=str(tmp_path)))
  with pytest.raises(UserError, match="no config.yaml"):
    command.run_eval(command.EvalRequest(data=[f"set={tmp_path / 'set.jsonl'}"],
                                         workdir=str(tmp_path)))
