"""Ctrl-C: the first SIGINT saves at the next step boundary and exits 130 with one line; a
second exits at once; neither shows a traceback, including during XLA compilation."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _start(workdir):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  # Many steps: the run is always interrupted, never done; no compile cache: every start
  # compiles, so that a signal can land inside XLA's compiler.
  return subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "train_until.py"), "--config", TINY, "--workdir",
       str(workdir), "train.steps=100000", "train.log_every=1", "train.compile_cache="],
      env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(proc, workdir, predicate, timeout=300):
  deadline = time.time() + timeout
  while not predicate(workdir):
    assert proc.poll() is None, proc.stdout.read()
    assert time.time() < deadline, "timed out"
    time.sleep(0.02)


def _saved_steps(workdir):
  directory = workdir / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _compiling(workdir):
  # The lock is taken after the handlers are installed and before the models are built: from
  # here on the run initialises and compiles, and no metrics row is written yet.
  return (workdir / ".lock").exists()


def _stepping(workdir):
  return (workdir / "metrics.jsonl").exists() and (workdir / "metrics.jsonl").read_text()


@pytest.mark.parametrize("when", ["compiling", "stepping"])
def test_ctrl_c_saves_at_the_next_step_and_exits_130(tmp_path, when):
  proc = _start(tmp_path)
  _wait_for(proc, tmp_path, _compiling if when == "compiling" else _stepping)
  if when == "compiling":
    time.sleep(1.0)   # inside model initialisation / the first compilations
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 130, out
  assert "Traceback" not in out and "KeyboardInterrupt" not in out, out
  assert "interrupted: saving at the next step boundary" in out
  assert "preempted: saved the checkpoint of step" in out
  assert len(_saved_steps(tmp_path)) == 1
  assert not (tmp_path / ".lock").exists()


def test_a_second_ctrl_c_exits_at_once(tmp_path):
  proc = _start(tmp_path)
  _wait_for(proc, tmp_path, _compiling)
  proc.send_signal(signal.SIGINT)
  time.sleep(0.2)
  start = time.time()
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 130, out
  assert time.time() - start < 10   # no step, no save waited for
  assert "interrupted again: exiting now" in out
  assert "Traceback" not in out, out
