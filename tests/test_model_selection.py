"""Model selection as the official runs: evaluation by ROUGE-L every epoch, the best checkpoint
kept in W/best/ (never rotated out by checkpoint.keep), across a resume; export and eval --best."""

import json
import pathlib

import pytest

from csd_jax.run.checkpoint import Checkpointer
from csd_jax.config import ConfigError, load_config
from csd_jax.metrics import read_metrics
from csd_jax.train.export import export
from csd_jax.train.loop import train
from instruction_data import instruction_overrides

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
METRIC = "valid/rougeL"


def _config(files, *overrides):
  # 32 training records, 8 a batch: an epoch is 4 steps; the validation set is valid.jsonl.
  return load_config(TINY, [
      *instruction_overrides(files), f"data.eval_files=[{files / 'valid.jsonl'}]",
      "eval.every_epoch=true", "eval.datasets.valid=split:valid", "eval.select=valid",
      "eval.max_examples=4", "eval.batch_size=4", "checkpoint.keep=1", "checkpoint.every=2",
      "data.max_length=24", "student.dropout=0.0", *overrides])


def _evaluated(workdir):
  return {r["step"]: r[METRIC] for r in read_metrics(workdir) if METRIC in r}


@pytest.mark.slow
def test_the_best_checkpoint_is_kept_across_a_resume(instruction_files, tmp_path):
  workdir = tmp_path / "run"
  train(_config(instruction_files, "train.steps=8"), workdir)      # epochs end at 4 and 8
  train(_config(instruction_files, "train.steps=12"), workdir)     # resumed: 12
  scores = _evaluated(workdir)
  assert sorted(scores) == [4, 8, 12]
  best_step = max(scores, key=lambda s: (scores[s], -s))   # the first of equal scores is kept
  kept = Checkpointer(workdir, best_metric=METRIC).best()
  assert kept == (best_step, pytest.approx(scores[best_step]))
  assert [p.name for p in (workdir / "best").iterdir() if p.name.isdigit()] == [str(best_step)]
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir()
                if p.name.isdigit()) == ["12"]                    # keep=1 never touches best/
  out, step = export(workdir, tmp_path / "best_export", best=True)
  assert step == best_step and (out / "config.json").is_file()

  # The best and the latest student, evaluated with two seeds, side by side in Table 1.
  import numpy as np

  from csd_jax.eval.command import EvalRequest, run_eval
  from csd_jax.eval.report import run_report

  data = [f"dolly={instruction_files / 'test.jsonl'}"]
  for best in (True, False):
    run_eval(EvalRequest(data=data, workdir=str(workdir), best=best, seeds=(10, 20),
                         max_new_tokens=8))
  markdown = run_report([f"best={workdir / 'eval_results_best.json'}", f"last={workdir}"])
  for name, file in (("best", "eval_results_best.json"), ("last", "eval_results.json")):
    per_seed = json.loads((workdir / file).read_text())["dolly"]["rougeL_per_seed"]
    cell = f"{np.mean(per_seed):.2f} ± {np.std(per_seed, ddof=1):.2f}"
    assert f"| {name} | {cell} | {cell} |" in markdown     # Dolly, and Avg. (one set)


def test_the_validation_split_is_the_runs_and_selection_needs_evaluations(instruction_files):
  from csd_jax.eval.generation import run_datasets

  config = _config(instruction_files, "eval.max_examples=0")
  records = run_datasets(config)["valid"]
  want = [json.loads(line) for line in (instruction_files / "valid.jsonl").read_text().split("\n")]
  assert [r["response"] for r in records] == [w["response"] for w in want]
  with pytest.raises(ConfigError, match="not one of eval.datasets"):
    _config(instruction_files, "eval.select=dolly")
  with pytest.raises(ConfigError, match="eval.every_epoch=true"):
    _config(instruction_files, "eval.every_epoch=false")
