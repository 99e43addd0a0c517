"""Trained runs that several test files read: each is trained once per test session, whichever
xdist worker asks first (a file lock makes the other wait), into a directory both workers see.

A test never changes a shared run: it reads it, or copies it first.
"""

import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable

import filelock
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
# The checkpointed run of the checkpoint and damage tests: float32, a save every 2 steps.
CHECKPOINTED = ["train.steps=12", "checkpoint.every=2", "checkpoint.keep=2",
                "student.dtype=float32"]


def session_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
  """A directory of this test session that every xdist worker sees (each worker's own base
  temp lies inside it; without xdist, the base temp itself)."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared(tmp_path_factory: pytest.TempPathFactory, name: str,
           build: Callable[[pathlib.Path], None]) -> pathlib.Path:
  """`build(directory)` once per session across workers; the directory it filled."""
  directory = session_dir(tmp_path_factory) / f"shared-{name}"
  with filelock.FileLock(f"{directory}.lock"):
    if not (directory.parent / f"{directory.name}.done").exists():
      shutil.rmtree(directory, ignore_errors=True)
      directory.mkdir()
      build(directory)
      (directory.parent / f"{directory.name}.done").touch()   # beside it: copies stay clean
  return directory


def train_in_subprocess(workdir: pathlib.Path, *args: str) -> str:
  """`csd-jax train --config tiny.yaml ARGS` in a new process (tests/train_until.py); its output."""
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.run([sys.executable, str(ROOT / "tests" / "train_until.py"), "--config", TINY,
                         "--workdir", str(workdir), *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=600, check=False)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out
  return out


@pytest.fixture(scope="session")
def checkpointed_run(tmp_path_factory) -> pathlib.Path:
  """A finished 12-step tiny run (`CHECKPOINTED`), trained once a session: the reference of the
  checkpoint, kill / resume and damage tests."""
  return shared(tmp_path_factory, "checkpointed",
                lambda workdir: train_in_subprocess(workdir, *CHECKPOINTED))
