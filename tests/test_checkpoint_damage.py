"""Damaged checkpoints: found by their checksums or by Orbax, moved aside (never deleted), and
the resumed run ends exactly where an undamaged one does, bit for bit on CPU.

One uninterrupted run is the reference; each test damages a copy of it.
"""

import json
import logging
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from csd_jax.run import integrity
from csd_jax.run.checkpoint import Checkpointer, _to_tree
from csd_jax.config import load_config
from csd_jax.metrics import read_metrics
from csd_jax.runtime.sharding import make_mesh
from csd_jax.train.loop import build_trainer

from shared_runs import CHECKPOINTED as ARGS, TINY, train_in_subprocess


def _run(workdir: pathlib.Path) -> str:
  return train_in_subprocess(workdir, *ARGS)


@pytest.fixture
def reference(checkpointed_run) -> pathlib.Path:
  return checkpointed_run


@pytest.fixture(scope="module")
def template():
  """A freshly built state of the reference's config, to restore into."""
  return build_trainer(load_config(TINY, ARGS), make_mesh(-1, 1, 1)).state


def _copy(reference: pathlib.Path, tmp_path: pathlib.Path) -> pathlib.Path:
  workdir = tmp_path / "run"
  shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns(".lock"))
  return workdir


def _files(directory: pathlib.Path) -> set[str]:
  return {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}


def _data_files(step_dir: pathlib.Path) -> list[pathlib.Path]:
  """The OCDBT data files (array bytes) of a step, largest first."""
  return sorted((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(),
                key=lambda p: -p.stat().st_size)


def _leaves(state) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(_to_tree(state))]


def _params(workdir: pathlib.Path, template) -> tuple[int, dict]:
  step, state, _ = Checkpointer(workdir).restore_latest(template, move_aside=False)
  return step, {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state.params)}


def _assert_same_run(workdir: pathlib.Path, reference: pathlib.Path, template) -> None:
  losses = [(r["step"], r["loss"]) for r in read_metrics(workdir)]
  assert losses == [(r["step"], r["loss"]) for r in read_metrics(reference)]  # bit-identical
  (step, params), (ref_step, ref_params) = _params(workdir, template), _params(reference, template)
  assert step == ref_step == 12
  for path, value in ref_params.items():
    np.testing.assert_array_equal(params[path], value, err_msg=str(path))


def _moved_aside(workdir: pathlib.Path, step: int) -> pathlib.Path:
  aside = list((workdir / "checkpoints.unreadable").glob(f"{step}-*Z"))
  assert len(aside) == 1, aside
  return aside[0]


def test_every_checkpoint_of_a_run_has_its_checksums(reference):
  for step in (10, 12):
    step_dir = reference / "checkpoints" / str(step)
    assert (step_dir / "checksums.process_0.json").is_file()
    assert integrity.verify(step_dir) == integrity.Verdict(None, None)


def test_each_process_hashes_its_own_files_and_checks_a_share_of_all(tmp_path):
  """The layout of a 2-process save: process i lists its shards, process 0 the rest; at
  restore each process checks every other file, and both get the same verdict."""
  step = tmp_path / "4"
  files = {"_CHECKPOINT_METADATA": b"m", "state/_METADATA": b"t", "state/d/root": b"r",
           "state/array_metadatas/process_0": b"a0", "state/array_metadatas/process_1": b"a1",
           "state/ocdbt.process_0/d/x": b"x" * 100, "state/ocdbt.process_1/d/y": b"y" * 100,
           "state/ocdbt.process_1/manifest.ocdbt": b"m1"}
  for rel, data in files.items():
    (step / rel).parent.mkdir(parents=True, exist_ok=True)
    (step / rel).write_bytes(data)
  assert integrity.verify(step).unverified.startswith("it has no checksums")
  integrity.write_checksums(step, 1, 2)
  assert integrity.verify(step).unverified == "no checksums from process(es) 0"
  integrity.write_checksums(step, 0, 2)
  lists = {i: set(json.loads((step / f"checksums.process_{i}.json").read_text())["files"])
           for i in (0, 1)}
  assert lists[1] == {rel for rel in files if "process_1" in rel}
  assert lists[0] == set(files) - lists[1]
  assert not list(step.glob(".*"))  # no temporary left behind

  def both(step_dir):
    mine = [integrity.verify(step_dir, i, 2, gather=lambda x: [x]).damage for i in (0, 1)]
    return [integrity.verify(step_dir, i, 2, gather=lambda x: mine).damage for i in (0, 1)]

  assert both(step) == [None, None]
  (step / "state/ocdbt.process_1/d/y").write_bytes(b"y" * 99 + b"z")
  assert both(step) == ["state/ocdbt.process_1/d/y does not match its crc32 checksum"] * 2
  (step / "state/ocdbt.process_1/d/y").write_bytes(b"y" * 100)
  (step / "state/d/root").unlink()
  assert both(step) == ["state/d/root is missing"] * 2


def test_unreadable_newest_checkpoint_on_the_grid_is_moved_aside_and_redone(
    reference, template, tmp_path):
  workdir = _copy(reference, tmp_path)
  step_dir = workdir / "checkpoints" / "12"
  files = _files(step_dir)
  for f in _data_files(step_dir):
    f.write_bytes(b"garbage")
  out = _run(workdir)  # before: "Checkpoint for step 12 already exists" once 12 is reached again
  assert "checkpoint 12 in" in out and "cannot be read" in out
  assert "resuming from the checkpoint of step 10" in out
  aside = _moved_aside(workdir, 12)
  assert f"moved it to {aside}" in out
  assert _files(aside) == files  # never deleted: every file is still there
  # A data file that was damaged (`state/d/` holds the merged root's b-tree nodes, untouched;
  # the set's order changes with the hash seed, so pick by name).
  damaged = min(f for f in files if "ocdbt.process_0/d/" in f)
  assert (aside / damaged).read_bytes() == b"garbage"
  assert "Traceback" not in out and "ERROR" not in out
  _assert_same_run(workdir, reference, template)


def _silent_flip(reference: pathlib.Path, tmp_path: pathlib.Path, template
                 ) -> tuple[str, bytes]:
  """(file, its new bytes): a byte flipped in step 12's largest data file that Orbax restores
  without a word into a wrong value when the checksums are gone. Places from the middle of the
  file outwards are tried, each in a fresh copy, until one restores silently: a flip in some
  bytes is never read, and one in a zstd chunk's header fails the read instead (where those lie
  depends on the order TensorStore wrote the chunks in, which varies from run to run)."""
  good = _leaves(Checkpointer(reference).restore_latest(template, move_aside=False)[1])
  largest = _data_files(reference / "checkpoints" / "12")[0]
  rel = largest.relative_to(reference / "checkpoints" / "12").as_posix()
  for fraction in sorted((i / 24 for i in range(1, 24)), key=lambda f: abs(f - 0.5)):
    unchecked = _copy(reference, tmp_path / f"unchecked-{fraction}")
    for lists in (unchecked / "checkpoints").glob("*/checksums.process_*.json"):
      lists.unlink()
    data = bytearray(largest.read_bytes())
    data[int(len(data) * fraction)] ^= 0xFF
    (unchecked / "checkpoints" / "12" / rel).write_bytes(bytes(data))
    step, state, _ = Checkpointer(unchecked).restore_latest(template, move_aside=False)
    if step == 12 and any(not np.array_equal(a, b) for a, b in zip(_leaves(state), good)):
      return rel, bytes(data)
  pytest.fail("no flipped byte in the middle of the largest data file restores silently")


def test_flipped_bytes_are_caught_by_the_checksums(reference, template, tmp_path):
  rel, data = _silent_flip(reference, tmp_path, template)
  workdir = _copy(reference, tmp_path)
  (workdir / "checkpoints" / "12" / rel).write_bytes(data)
  out = _run(workdir)
  assert f"checkpoint 12 in {workdir / 'checkpoints'} cannot be read ({rel} does not match its " \
         "crc32 checksum); moved it to" in out
  aside = _moved_aside(workdir, 12)
  assert f"moved it to {aside}" in out
  assert _files(aside) == _files(reference / "checkpoints" / "12")
  assert (aside / rel).read_bytes() == data
  _assert_same_run(workdir, reference, template)


def test_a_step_without_checksums_is_restored_with_a_warning(reference, template, tmp_path,
                                                               caplog):
  workdir = _copy(reference, tmp_path)
  (workdir / "checkpoints" / "12" / "checksums.process_0.json").unlink()
  with caplog.at_level(logging.WARNING, "csd_jax.run.checkpoint"):
    step, params = _params(workdir, template)
  assert step == 12
  warnings = [r.getMessage() for r in caplog.records if r.name == "csd_jax.run.checkpoint"]
  assert len(warnings) == 1 and "checkpoint 12" in warnings[0]
  assert "could not be verified" in warnings[0]
  for path, value in _params(reference, template)[1].items():
    np.testing.assert_array_equal(params[path], value)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_orbax_failure_is_one_line_and_read_only_restores_move_nothing(
    reference, template, tmp_path, caplog, capfd):
  """A step Orbax cannot read (no checksums to say so first): one warning, none of Orbax's
  ERROR lines or asyncio tracebacks; `move_aside=False` (eval, export) leaves it in place."""
  workdir = _copy(reference, tmp_path)
  step_dir = workdir / "checkpoints" / "12"
  (step_dir / "checksums.process_0.json").unlink()
  for manifest in (step_dir / "state").rglob("manifest.ocdbt"):
    manifest.write_bytes(b"garbage")
  (step_dir / "_CHECKPOINT_METADATA").write_bytes(b"garbage")  # absl logs an ERROR for this
  capfd.readouterr()
  with caplog.at_level(logging.DEBUG):
    step, _, _ = Checkpointer(workdir).restore_latest(template, move_aside=False)
  assert step == 10
  shown = [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert [r.name for r in shown] == ["csd_jax.run.checkpoint"], [r.getMessage() for r in shown]
  assert "checkpoint 12" in shown[0].getMessage() and "left it in place" in shown[0].getMessage()
  captured = capfd.readouterr()
  assert "Traceback" not in captured.err + captured.out
  assert step_dir.is_dir() and not (workdir / "checkpoints.unreadable").exists()
  # Training's restore moves it, since the step before it restores.
  caplog.clear()
  assert Checkpointer(workdir).restore_latest(template)[0] == 10
  aside = _moved_aside(workdir, 12)
  assert f"moved it to {aside}" in caplog.text
  assert Checkpointer(workdir).steps() == [10]
