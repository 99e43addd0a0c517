"""Faults a run meets and must survive or report in one line: non-finite updates, a full or
read-only disk, a workdir that is a file, a refused start; and restarts that compile nothing."""

import os
import pathlib
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from csd_jax import cli
from csd_jax.run.checkpoint import Checkpointer
from csd_jax.config import load_config
from csd_jax.metrics import read_metrics
from csd_jax.run.state import all_finite
from csd_jax.train.loop import build_trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _cli(args, capsys):
  rc = cli.main(args)
  return rc, capsys.readouterr().err.strip().splitlines()


def _subprocess(*args):
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  return subprocess.run([sys.executable, "-m", "csd_jax.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)


# ---- non-finite training --------------------------------------------------------------------

def test_a_non_finite_update_is_skipped_and_counted():
  trainer = build_trainer(load_config(TINY, ["train.steps=4"]))
  batch = next(trainer.inputs.train)
  before = jax.tree.map(np.asarray, (trainer.state.params, trainer.state.opt_state))
  # A teacher gone NaN: its logits poison the loss (never read as a masked vocabulary).
  broken_teacher = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), trainer.teacher_state)
  state, metrics = trainer.train_step(trainer.state, broken_teacher, batch, None)
  assert int(metrics["nonfinite"]) == 1 and bool(jnp.isnan(metrics["loss"]))
  assert int(state.step) == 1   # the batch was consumed
  after = jax.tree.map(np.asarray, (state.params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)   # not touched
  state, metrics = trainer.train_step(state, trainer.teacher_state, batch, None)
  assert int(metrics["nonfinite"]) == 0 and bool(all_finite(state.params))
  assert not np.array_equal(np.asarray(jax.tree.leaves(state.params)[0]),
                            jax.tree.leaves(before[0])[0])


def test_a_diverged_run_stops_in_one_line_and_keeps_its_last_finite_checkpoint(tmp_path,
                                                                             capsys):
  # lr 1e30: the first update is finite but huge, every later one NaN.
  rc, err = _cli(["train", "--config", TINY, "--workdir", str(tmp_path), "train.steps=30",
                  "train.log_every=1", "checkpoint.every=1", "optim.lr=1e30",
                  "train.compile_cache="], capsys)
  assert rc == 2
  last = err[-1]
  assert last.startswith("csd-jax train: step 4: 3 updates in a row were not finite"), err
  assert "optim.lr=1e+30" in last and "data.max_length" in last
  assert "the last checkpoint, step 3, is finite" in last
  rows = read_metrics(tmp_path)
  assert [r["nonfinite_steps"] for r in rows] == [0, 1, 2, 3]
  assert rows[0]["loss"] is not None and all(r["loss"] is None for r in rows[1:])  # NaN, not 0
  trainer = build_trainer(load_config(TINY, ["train.steps=30", "optim.lr=1e30"]))
  restored = Checkpointer(tmp_path).restore_latest(trainer.state)
  assert restored[0] == 3 and bool(all_finite((restored[1].params, restored[1].opt_state)))


# ---- bad starts leave nothing -----------------------------------------------------------------

def test_a_workdir_that_is_a_file_is_refused(tmp_path, capsys):
  path = tmp_path / "a_file"
  path.write_text("mine")
  rc, err = _cli(["train", "--config", TINY, "--workdir", str(path)], capsys)
  assert rc == 2 and len(err) == 1 and "is a file, not a directory" in err[0]
  assert path.read_text() == "mine"


def test_a_start_refused_after_building_leaves_no_workdir(tmp_path, capsys):
  workdir = tmp_path / "run"
  rc, err = _cli(["train", "--config", TINY, "--workdir", str(workdir),
                  "data.max_length=100"], capsys)   # the tiny models have 64 positions
  assert rc == 2 and "data.max_length=100 is beyond the teacher's 64 positions" in err[-1]
  assert not workdir.exists()


# ---- restarts without recompiling ----------------------------------------------------------

def _compiled(stderr):
  match = re.search(r"XLA compiled (\d+) programs in ([\d.]+) s, (\d+) of them loaded", stderr)
  assert match, stderr
  return int(match.group(1)), float(match.group(2)), int(match.group(3))


@pytest.mark.slow
def test_a_rerun_loads_every_program_from_the_persistent_cache(tmp_path):
  # The run's own cache (W/xla_cache), not the tests' shared one: this test is about compiling.
  first = _subprocess("train", "--config", TINY, "--workdir", str(tmp_path), "train.steps=4",
                      "train.compile_cache=workdir")
  assert first.returncode == 0, first.stderr
  programs, _, hits = _compiled(first.stderr)
  assert programs > 0 and hits == 0
  assert any((tmp_path / "xla_cache").iterdir())
  again = _subprocess("train", "--config", TINY, "--workdir", str(tmp_path), "train.steps=8",
                      "train.compile_cache=workdir")
  assert again.returncode == 0, again.stderr
  assert "resuming from the checkpoint of step 4" in again.stderr
  programs, _, hits = _compiled(again.stderr)
  assert programs > 0 and hits == programs   # nothing compiled twice


# ---- a full or read-only disk ------------------------------------------------------------------

@pytest.fixture
def small_disk(tmp_path):
  """A 3 MB tmpfs (root only: skipped where mounting is not allowed)."""
  mount = tmp_path / "disk"
  mount.mkdir()
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3M", "tmpfs", str(mount)],
                        capture_output=True, text=True)
  if made.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
  yield mount
  subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_names_the_intact_checkpoint_without_a_traceback(small_disk):
  workdir = small_disk / "run"
  filler_path = small_disk / "filler"
  filler_path.touch()   # made first: the run's own checkpoints may fill the disk before we do
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  proc = subprocess.Popen(
      [sys.executable, "-m", "csd_jax.cli", "train", "--config", TINY, "--workdir",
       str(workdir), "train.steps=100000", "train.log_every=1", "checkpoint.every=2",
       "train.compile_cache="], cwd=ROOT, env=env, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (workdir / "checkpoints" / "2").is_dir():
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.05)
  with open(filler_path, "ab") as filler:   # the disk fills up under the run
    with pytest.raises(OSError):
      while True:
        filler.write(b"\0" * 65536)
        filler.flush()
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 2, out
  assert "Traceback" not in out, out
  last = out.strip().splitlines()[-1]
  match = re.search(r"no space left on the device; the checkpoint of step (\d+) in \S+ is intact",
                    last)
  assert match, last
  filler_path.unlink()
  trainer = build_trainer(load_config(TINY, ["train.steps=100000"]))
  restored = Checkpointer(workdir).restore_latest(trainer.state)
  assert restored is not None and restored[0] == int(match.group(1))


def test_a_read_only_workdir_is_one_line_and_unchanged(small_disk, capsys):
  run = small_disk / "run"
  run.mkdir()
  (run / "config.yaml").write_text("mine")
  subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
  try:
    rc, err = _cli(["train", "--config", TINY, "--workdir", str(run)], capsys)
    assert rc == 2 and len(err) == 1, err
    assert "read-only file system" in err[0] and "no checkpoint was written" in err[0]
    rc, err = _cli(["train", "--config", TINY, "--workdir", str(small_disk / "new")], capsys)
    assert rc == 2 and len(err) == 1 and "cannot be created (Read-only file system)" in err[0]
  finally:
    subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
  assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
  assert (run / "config.yaml").read_text() == "mine"
