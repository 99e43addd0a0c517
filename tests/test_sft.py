"""Supervised fine-tuning (`teacher: null`): cross-entropy on the responses, no teacher built,
the trainer's checkpoints and resume as for distillation."""

import pathlib

import numpy as np
import pytest

from csd_jax.config import ConfigError, load_config
from csd_jax.metrics import read_metrics
from csd_jax.train.loop import build_trainer, train
from instruction_data import instruction_overrides

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SFT = ["teacher=null", "loss.kd_coef=0", "loss.ce_coef=1", "student.dropout=0.0",
       "train.heldout_every=4"]


@pytest.mark.slow
def test_sft_holds_no_teacher_and_its_loss_falls(instruction_files):
  config = load_config(TINY, [*instruction_overrides(instruction_files), *SFT, "train.steps=12"])
  assert config.teacher is None
  trainer = build_trainer(config)
  assert trainer.models.teacher is None and trainer.teacher_state is None
  state, losses = trainer.state, []
  for _ in range(12):
    state, metrics = trainer.train_step(state, None, next(trainer.inputs.train), None)
    losses.append(float(metrics["loss"]))
    assert "kd" not in metrics and float(metrics["ce"]) == pytest.approx(losses[-1])
  # a random start: about log(50257) a token; the responses are one pattern, quickly learnt
  assert losses[0] == pytest.approx(np.log(50257), rel=0.05)
  assert np.mean(losses[-3:]) < losses[0] - 1.0   # measured: 10.80 -> 9.01


def test_sft_resumes_as_an_uninterrupted_run(tmp_path):
  """6 steps, then 6 more from the step-6 checkpoint == 12 steps at once; the held-out loss
  is the student's cross-entropy."""
  straight = train(load_config(TINY, [*SFT, "train.steps=12"]), tmp_path / "straight")
  # The resumed run: a first process that stopped after 6 steps (a shorter run on the workdir).
  first = tmp_path / "resumed"
  train(load_config(TINY, [*SFT, "train.steps=6", "checkpoint.every=6"]), first)
  train(load_config(TINY, [*SFT, "train.steps=12"]), first)
  want = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "straight")}
  got = {r["step"]: r["loss"] for r in read_metrics(first) if "loss" in r}
  assert got.keys() == want.keys() and len(want) == 12
  np.testing.assert_array_equal([got[s] for s in sorted(got)], [want[s] for s in sorted(want)])
  assert "eval_loss" in straight.metrics and "eval_kl" not in straight.metrics


@pytest.mark.parametrize("overrides, message", [
    (["teacher=null"], "loss.kd_coef=0 and loss.ce_coef=1"),
    (["teacher=null", "loss.kd_coef=0"], "loss.ce_coef=1"),
    ([*SFT, "onpolicy.ratio=0.5"], "needs a teacher"),
])
def test_sft_refuses_what_needs_a_teacher(overrides, message):
  with pytest.raises(ConfigError, match=message):
    load_config(TINY, overrides)


def test_a_teacher_section_can_follow_a_null_one():
  config = load_config(TINY, ["teacher=null", "teacher.path=gpt2"])
  assert config.teacher.path == "gpt2" and config.teacher.config is None


def test_the_notebook_backend_refuses_an_sft_run_in_one_line(tmp_path):
  from csd_jax.errors import UserError
  from csd_jax.eval.loss_inspection import open_run

  train(load_config(TINY, [*SFT, "train.steps=1"]), tmp_path)
  with pytest.raises(UserError, match="supervised fine-tuning run"):
    open_run(tmp_path)
