"""Checkpoints: kill -9 and resume, SIGTERM, half-written and unreadable checkpoints, new mesh.

An interrupted and resumed run must give the same per-step losses and final parameters as an
uninterrupted one, bit for bit on CPU.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from csd_jax.run.checkpoint import Checkpointer
from csd_jax.config import load_config
from csd_jax.metrics import read_metrics
from csd_jax.runtime.sharding import make_mesh
from csd_jax.train.loop import build_trainer

from shared_runs import CHECKPOINTED as ARGS, ROOT, TINY


def _start(workdir, *extra):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.Popen([sys.executable, str(ROOT / "tests" / "train_until.py"), "--config",
                           TINY, "--workdir", str(workdir), *ARGS, *extra], env=env, cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _run(workdir):
  proc = _start(workdir)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return out


def _wait_for_step(workdir, step, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline:
    rows = read_metrics(workdir) if (workdir / "metrics.jsonl").exists() else []
    if rows and rows[-1]["step"] >= step:
      return rows[-1]["step"]
    assert proc.poll() is None, proc.stdout.read()
    time.sleep(0.05)
  raise TimeoutError(f"step {step} not reached")


def _complete_steps(workdir):
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if (
      directory.exists()) else []


def _final_params(workdir, mesh=None):
  config = load_config(TINY, ARGS)
  trainer = build_trainer(config, mesh or make_mesh(-1, 1, 1))
  step, state, _ = Checkpointer(workdir).restore_latest(trainer.state)
  return step, {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state.params)}


def _losses(workdir):
  return [(r["step"], r["loss"]) for r in read_metrics(workdir)]


@pytest.fixture
def uninterrupted(checkpointed_run):
  return checkpointed_run


def _assert_same_run(workdir, reference):
  assert _losses(workdir) == _losses(reference)  # bit-identical on CPU
  step, params = _final_params(workdir)
  ref_step, ref_params = _final_params(reference)
  assert step == ref_step == 12
  for path, value in ref_params.items():
    np.testing.assert_array_equal(params[path], value, err_msg=str(path))


@pytest.mark.slow
@pytest.mark.parametrize("kill_after", [3, 7])
def test_kill_9_then_resume_equals_the_uninterrupted_run(tmp_path, uninterrupted, kill_after):
  proc = _start(tmp_path)
  reached = _wait_for_step(tmp_path, kill_after, proc)
  while not _complete_steps(tmp_path):  # at least one finished checkpoint to resume from
    assert proc.poll() is None
    time.sleep(0.05)
  proc.kill()  # SIGKILL: no chance to save
  proc.wait()
  assert reached < 12
  out = _run(tmp_path)
  assert "resuming from the checkpoint of step" in out
  _assert_same_run(tmp_path, uninterrupted)


def test_sigterm_saves_and_exits_0_then_resumes(tmp_path, uninterrupted):
  proc = _start(tmp_path, "checkpoint.every=0")
  _wait_for_step(tmp_path, 3, proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 0, out
  assert "preempted: saved the checkpoint of step" in out
  saved = _complete_steps(tmp_path)
  assert len(saved) == 1 and 3 <= saved[0] < 12
  _run(tmp_path)
  _assert_same_run(tmp_path, uninterrupted)


def test_half_written_and_unreadable_checkpoints_are_skipped(tmp_path, uninterrupted, caplog):
  shutil.copytree(uninterrupted / "checkpoints", tmp_path / "checkpoints")
  assert _complete_steps(tmp_path) == [10, 12]
  # A save killed half-way leaves only a temporary directory: never a candidate.
  (tmp_path / "checkpoints" / "14.orbax-checkpoint-tmp-1234").mkdir()
  # The newest complete-looking checkpoint lost its array data: fall back to the one before.
  for f in (tmp_path / "checkpoints" / "12" / "state").rglob("*"):
    if f.is_file() and "metadata" not in f.name:
      f.write_bytes(b"garbage")
  step, _ = _final_params(tmp_path)
  assert step == 10
  assert "checkpoint 12" in caplog.text and "falling back" in caplog.text


def test_restore_on_a_different_mesh(uninterrupted):
  step, on_8 = _final_params(uninterrupted, make_mesh(2, 2, 2))
  _, on_1 = _final_params(uninterrupted, make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  assert step == 12
  for path, value in on_1.items():
    np.testing.assert_array_equal(on_8[path], value)
