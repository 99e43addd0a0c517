"""The workdir lock in a GCS bucket (tests/gcs_emulator.py, which honours ifGenerationMatch):
stale locks taken over by exactly one contender through a conditional delete, a lock left by a
retried create held by its own run."""

import json
import logging
import socket
import threading
import time

import pytest

from csd_jax.runtime import paths
from csd_jax.run.lock import WorkdirLock, _boot_id, _now, _pid_namespace
from gcs_emulator import DEFAULT_BUCKET as BUCKET
from lock_helpers import dead_pid as _dead_pid, race_to_acquire as _race_to_acquire


def _gcs_workdir(gcs, request) -> str:
  return f"gs://{BUCKET}/{request.node.name.replace('[', '-').rstrip(']')}-{time.time_ns()}"


def _write_remote_lock(workdir: str, **fields) -> bytes:
  info = {"host": socket.gethostname(), "pid": _dead_pid(),
          "pid_start": None, "pid_ns": _pid_namespace(), "boot": _boot_id(),
          "command": "csd-jax train ...", "started": "2024-01-02T03:04:05Z",
          "heartbeat": _now(), "token": "theirs", **fields}
  raw = json.dumps(info).encode()
  paths.as_path(f"{workdir}/.lock").write_bytes(raw)
  return raw


def test_gcs_generation_and_conditional_delete(gcs, request, tmp_path):
  lock = f"{_gcs_workdir(gcs, request)}/.lock"
  paths.as_path(lock).write_bytes(b"first")
  first = paths.generation(lock)
  paths.as_path(lock).write_bytes(b"second")
  second = paths.generation(lock)
  assert first and second and first != second
  assert not paths.delete_if_generation(lock, first)   # rewritten since: refused
  assert paths.as_path(lock).read_bytes() == b"second"
  assert paths.delete_if_generation(lock, second)
  assert not paths.as_path(lock).exists()
  assert not paths.delete_if_generation(lock, second)   # gone
  with pytest.raises(FileNotFoundError):
    paths.generation(lock)
  local = tmp_path / "f"
  local.write_bytes(b"x")
  assert paths.generation(local) == paths.generation(local)
  with pytest.raises(ValueError, match="gs://"):
    paths.delete_if_generation(local, paths.generation(local))


@pytest.mark.parametrize("fields", [
    {}, {"host": "other-host", "heartbeat": "2024-01-02T03:04:05Z"}])
def test_gcs_stale_lock_is_taken_over(fields, gcs, request, caplog):
  workdir = _gcs_workdir(gcs, request)
  _write_remote_lock(workdir, **fields)
  with caplog.at_level(logging.WARNING, logger="csd_jax.train"):
    with WorkdirLock(workdir, process_index=0) as lock:
      assert json.loads(paths.as_path(f"{workdir}/.lock").read_bytes())["token"] == lock.token
  assert "taking over" in caplog.text
  assert not paths.as_path(f"{workdir}/.lock").exists()


def test_gcs_take_over_loses_to_a_contender_that_recreated_the_lock(gcs, request, monkeypatch):
  """The race of a read-compare-unlink take-over: both contenders read the stale lock, A deletes
  it and creates its own, then B deletes. B's delete names the stale generation: refused."""
  workdir = _gcs_workdir(gcs, request)
  raw = _write_remote_lock(workdir)
  a, b = WorkdirLock(workdir, process_index=0), WorkdirLock(workdir, process_index=0)
  real = paths.delete_if_generation

  def b_deletes_late(path, generation):
    monkeypatch.setattr(paths, "delete_if_generation", real)
    a.acquire()   # meanwhile A takes the stale lock over: deleted, and created anew
    return real(path, generation)

  monkeypatch.setattr(paths, "delete_if_generation", b_deletes_late)
  try:
    assert b._remove_stale(raw) is False
    assert a.held
    assert json.loads(paths.as_path(f"{workdir}/.lock").read_bytes())["token"] == a.token
  finally:
    a.release()


def test_gcs_two_contenders_deleting_one_stale_lock_one_wins(gcs, request, monkeypatch):
  workdir = _gcs_workdir(gcs, request)
  raw = _write_remote_lock(workdir)
  real, barrier, results = paths.delete_if_generation, threading.Barrier(2), []

  def together(path, generation):
    barrier.wait(timeout=30)   # both read and compared the stale lock: both delete now
    return real(path, generation)

  monkeypatch.setattr(paths, "delete_if_generation", together)
  locks = [WorkdirLock(workdir, process_index=0) for _ in range(2)]
  threads = [threading.Thread(target=lambda lock=lock: results.append(lock._remove_stale(raw)))
             for lock in locks]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert sorted(results) == [False, True], results
  assert not paths.as_path(f"{workdir}/.lock").exists()


def test_gcs_concurrent_acquires_one_wins(gcs, request):
  workdir = _gcs_workdir(gcs, request)
  _write_remote_lock(workdir)
  results = _race_to_acquire(workdir, 4)
  assert sorted(results) == ["refused"] * 3 + ["won"], results
  assert not paths.as_path(f"{workdir}/.lock").exists()


def test_gcs_lock_with_this_runs_token_is_held(gcs, request, monkeypatch):
  workdir = _gcs_workdir(gcs, request)
  real = paths.create_exclusive

  def lost_answer(path, data):   # gcsfs retried the create: the retry got 412
    assert real(path, data)
    return False

  monkeypatch.setattr(paths, "create_exclusive", lost_answer)
  with WorkdirLock(workdir, process_index=0, heartbeat_s=0.05) as lock:
    assert lock.held and lock._thread.is_alive()
    assert json.loads(paths.as_path(f"{workdir}/.lock").read_bytes())["token"] == lock.token
  assert not paths.as_path(f"{workdir}/.lock").exists()
