"""The trainer: sharded step == 1-device step, accumulation, frozen teacher, LoRA, the tiny run."""

import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from csd_jax.config import load_config
from csd_jax.metrics import read_metrics, read_tensorboard_scalars
from csd_jax.models.lora import LoraParam
from csd_jax.runtime.sharding import make_mesh
from csd_jax.train.loop import build_trainer, train

TINY = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _run(overrides, mesh, steps=3):
  trainer = build_trainer(load_config(TINY, [f"train.steps={steps}", *overrides]), mesh)
  state, losses = trainer.state, []
  with jax.set_mesh(trainer.mesh):
    for _ in range(steps):
      state, metrics = trainer.train_step(state, trainer.teacher_state, next(trainer.inputs.train),
                                          None)
      losses.append(float(metrics["loss"]))
  return trainer, state, losses


def _flat(state):
  return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def _assert_params_close(got, want):
  # Adam divides by sqrt(v): where a gradient is near zero, float32 reordering noise in it shows
  # in the update, which is bounded by lr (3e-3) per step; 1e-5 over 3 steps is ~1e-3 of that.
  got, want = _flat(got), _flat(want)
  assert got.keys() == want.keys()
  for path, value in want.items():
    np.testing.assert_allclose(got[path], value, rtol=0, atol=1e-5, err_msg=str(path))
    assert not np.array_equal(value, 0)


# The step's arithmetic, compared across meshes and accumulation, without the GPT-2 student's
# dropout: micro-batches draw their own masks (accumulation is then another sample, not the
# same sum), and where Adam divides a near-zero gradient the masks' reordered sums show.
EXACT = ["student.dtype=float32", "student.dropout=0.0"]


@pytest.fixture(scope="module")
def one_device():
  return _run(EXACT, make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def test_step_on_8_devices_equals_the_1_device_step(one_device):
  _, state_1, losses_1 = one_device
  _, state_8, losses_8 = _run(EXACT, make_mesh(2, 2, 2))
  # float32 rounding: sharded matmuls and reductions add in another order.
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  _assert_params_close(state_8.params, state_1.params)


def test_accumulation_4x2_equals_1x8(one_device):
  _, state_1, losses_1 = one_device
  _, state_acc, losses_acc = _run([*EXACT, "train.grad_accum=4"],
                                  make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  np.testing.assert_allclose(losses_acc, losses_1, rtol=1e-5)
  _assert_params_close(state_acc.params, state_1.params)


def test_the_student_trains_with_its_checkpoints_dropout_the_same_on_any_mesh(one_device):
  """GPT-2's 0.1 dropout is on in training, keyed by the run's seed and step: another mesh
  draws the same masks (the random bits do not depend on sharding)."""
  _, _, exact = one_device
  _, _, dropped_1 = _run(["student.dtype=float32"], make_mesh(1, 1, 1,
                                                                devices=jax.devices()[:1]))
  _, _, dropped_8 = _run(["student.dtype=float32"], make_mesh(2, 2, 2))
  assert not np.allclose(dropped_1, exact, rtol=1e-3)
  np.testing.assert_allclose(dropped_8, dropped_1, rtol=1e-5)  # float32 reordering


def test_teacher_is_frozen_and_has_no_optimizer_state(one_device):
  trainer, state, _ = one_device
  before = _flat(build_trainer(load_config(TINY), trainer.mesh).teacher_state)
  after = _flat(trainer.teacher_state)
  assert before.keys() == after.keys()
  for path in before:
    np.testing.assert_array_equal(after[path], before[path])
  n_opt = sum(np.size(x) for x in jax.tree.leaves(state.opt_state))
  n_student = sum(v.size for v in _flat(state.params).values())
  assert 2 * n_student <= n_opt <= 2 * n_student + 16  # Adam's mu, nu (+ counters): student only


def test_lora_trains_only_adapters():
  overrides = ["student.dtype=float32", "train.steps=2"]
  config = load_config(TINY, overrides + ["lora.rank=4", "lora.targets=[q, v, up]"])
  trainer = build_trainer(config, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  assert all(isinstance(v, LoraParam) for _, v in nnx.to_flat_state(trainer.state.params))
  untrained_before = _flat(trainer.state.untrained)
  params_before = _flat(trainer.state.params)
  state = trainer.state
  with jax.set_mesh(trainer.mesh):
    for _ in range(2):
      state, _ = trainer.train_step(state, trainer.teacher_state, next(trainer.inputs.train), None)
  for path, value in _flat(state.untrained).items():
    np.testing.assert_array_equal(value, untrained_before[path])
  assert any(not np.array_equal(v, params_before[p]) for p, v in _flat(state.params).items())


def test_tiny_config_lowers_the_loss_and_writes_metrics(tmp_path):
  final = train(load_config(TINY), tmp_path).metrics
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows] == list(range(1, 31))
  for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
    assert all(key in r for r in rows), key
  assert rows[-1]["loss"] < 0.5 * rows[0]["loss"]
  assert "eval_loss" in final and 0.0 <= final["eval_agreement"] <= 1.0
  scalars = read_tensorboard_scalars(tmp_path / "tensorboard")
  assert [s for s, _ in scalars["loss"]][:3] == [1, 2, 3]
  assert (tmp_path / "config.yaml").exists()
  assert load_config(tmp_path / "config.yaml").train.steps == 30  # the resolved config reloads


@pytest.mark.slow
def test_sft_and_lm_terms_with_different_vocab_sizes(tmp_path, converted, caplog):
  """Instruction files + pre-training text through the real tokenizer; the teacher's head has
  padded rows (a larger vocabulary), cut to the common size with a warning."""
  import json

  (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(
      {"instruction": f"Name a colour number {i}.", "response": f"Colour {i} is blue."})
      for i in range(16)))
  (tmp_path / "text.jsonl").write_text("\n".join(json.dumps(
      {"text": f"The river {i} flows into the sea. " * 3}) for i in range(8)))
  model = {"model_type": "gpt2", "n_embd": 32, "n_layer": 1, "n_head": 2, "n_positions": 64}
  config = load_config(TINY, [
      f"teacher.config={json.dumps({**model, 'vocab_size': 49216})}",
      f"student.config={json.dumps({**model, 'vocab_size': 49152})}",
      "data.source=files", f"data.train_files=[{tmp_path / 'train.jsonl'}]",
      f"data.lm_files=[{tmp_path / 'text.jsonl'}]", f"data.tokenizer={converted}",
      f"data.data_dir={tmp_path / 'tfds'}", "data.max_length=48", "data.max_prompt_length=32",
      "loss.ce_coef=0.5", "loss.lm_coef=0.25", "train.steps=4"])
  result = train(config, tmp_path / "run")
  assert "teacher vocabulary 49216 and student vocabulary 49152 differ" in caplog.text
  rows = read_metrics(tmp_path / "run")
  for key in ("kd", "ce", "lm"):
    assert all(np.isfinite(r[key]) and r[key] > 0 for r in rows), key
  expected = rows[-1]["kd"] + 0.5 * rows[-1]["ce"] + 0.25 * rows[-1]["lm"]
  np.testing.assert_allclose(rows[-1]["loss"], expected, rtol=1e-5)
  assert result.student.cfg.vocab_size == 49152


def test_heldout_evaluation_at_every_multiple_of_its_period_whatever_log_every(tmp_path):
  train(load_config(TINY, ["train.steps=10", "train.log_every=4", "train.heldout_every=3"]),
        tmp_path)
  rows = read_metrics(tmp_path)
  assert [r["step"] for r in rows if "eval_loss" in r] == [3, 6, 9, 10]
  assert [r["step"] for r in rows if "loss" in r] == [4, 8, 10]
  for row in (r for r in rows if "eval_loss" in r):
    # the common measures of every run, whatever its objective (here CSD: eval_loss is CSD)
    assert row["eval_kl"] > 0 and row["eval_csd"] == pytest.approx(row["eval_loss"], rel=1e-6)
