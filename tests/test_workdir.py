"""One run per workdir (W/.lock: refused while held, taken over when its run is gone, race-free
take-over, on a disk; in a bucket: test_workdir_gcs.py) and the config history of resumes
(config.step-N.yaml); no JAX needed."""

import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import yaml

from csd_jax.runtime import paths
from csd_jax.errors import UserError
from csd_jax.run.lock import (WorkdirLock, _boot_id, _now, _pid_namespace, process_start_time,
                             record_config)
from lock_helpers import dead_pid as _dead_pid, race_to_acquire as _race_to_acquire

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _write_lock(workdir: pathlib.Path, **fields) -> pathlib.Path:
  """A lock as another run would have left it."""
  info = {"host": socket.gethostname(), "pid": os.getpid(),
          "pid_start": process_start_time(os.getpid()), "pid_ns": _pid_namespace(),
          "boot": _boot_id(), "command": "csd-jax train ...",
          "started": "2024-01-02T03:04:05Z", "heartbeat": _now(), "token": "theirs", **fields}
  workdir.mkdir(parents=True, exist_ok=True)
  (workdir / ".lock").write_text(json.dumps(info))
  return workdir / ".lock"


def test_lock_acquired_and_released(tmp_path):
  workdir = tmp_path / "w"
  with WorkdirLock(workdir, process_index=0) as lock:
    info = json.loads((workdir / ".lock").read_text())
    assert lock.held and info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert {"pid_start", "command", "started", "heartbeat"} <= set(info)
  assert not (workdir / ".lock").exists()
  assert not any(t.name == "workdir-lock" for t in threading.enumerate())


def test_other_processes_take_no_lock(tmp_path):
  with WorkdirLock(tmp_path, process_index=1) as lock:
    assert not lock.held and not (tmp_path / ".lock").exists()


def test_second_run_is_refused_in_one_line(tmp_path):
  with WorkdirLock(tmp_path, process_index=0):
    with pytest.raises(UserError) as error:
      WorkdirLock(tmp_path, process_index=0).__enter__()
    message = str(error.value)
    assert "\n" not in message
    for part in (socket.gethostname(), f"pid {os.getpid()}", "started 20", "--workdir",
                 f"delete {tmp_path / '.lock'}"):
      assert part in message, message
    assert (tmp_path / ".lock").exists()   # the refused run leaves the holder's lock alone
  assert not (tmp_path / ".lock").exists()


@pytest.mark.parametrize("fields,reason", [
    (lambda: {"pid": _dead_pid()}, "is no longer running"),
    (lambda: {"pid_start": process_start_time(os.getpid()) + 1}, "is now another process"),
    (lambda: {"host": "other-host", "heartbeat": "2024-01-02T03:04:05Z"}, "no heartbeat for"),
    (lambda: {"pid_ns": "pid:[1]", "pid": _dead_pid(), "heartbeat": "2024-01-02T03:04:05Z"},
     "no heartbeat for"),   # another container on this host: judged by its heartbeat
])
def test_a_lock_left_by_a_gone_run_is_taken_over(fields, reason, tmp_path, caplog):
  if process_start_time(os.getpid()) is None:
    pytest.skip("no /proc")
  _write_lock(tmp_path, **fields())
  with caplog.at_level(logging.WARNING, logger="csd_jax.train"):
    with WorkdirLock(tmp_path, process_index=0) as lock:
      assert json.loads((tmp_path / ".lock").read_text())["token"] == lock.token
  warnings = [r.getMessage() for r in caplog.records if r.name == "csd_jax.train"]
  assert len(warnings) == 1 and "taking over" in warnings[0] and reason in warnings[0], warnings


@pytest.mark.parametrize("host,pid_ns", [("other-host", None), (socket.gethostname(), "pid:[1]")])
def test_another_hosts_lock_with_a_fresh_heartbeat_is_held(host, pid_ns, tmp_path):
  _write_lock(tmp_path, host=host, pid=_dead_pid(), heartbeat=_now(), pid_ns=pid_ns)
  with pytest.raises(UserError, match=f"host {host}, pid [0-9]+, started 2024-01-02T03:04:05Z"):
    WorkdirLock(tmp_path, process_index=0).__enter__()
  assert json.loads((tmp_path / ".lock").read_text())["token"] == "theirs"


@pytest.mark.parametrize("boot,heartbeat,taken", [
    ("another-boot", "2024-01-02T03:04:05Z", True),   # another VM of the same name: heartbeat
    ("another-boot", None, False),
    (None, "2024-01-02T03:04:05Z", False),   # a lock from before `boot`: judged by its pid
])
def test_a_lock_from_another_boot_is_judged_by_its_heartbeat(boot, heartbeat, taken, tmp_path):
  if _boot_id() is None or process_start_time(os.getpid()) is None:
    pytest.skip("no /proc")
  # This host's name, pid namespace and a pid that runs here (this test's own).
  lock_file = _write_lock(tmp_path, boot=boot, heartbeat=heartbeat or _now())
  if taken:
    with WorkdirLock(tmp_path, process_index=0) as lock:
      assert json.loads(lock_file.read_text())["token"] == lock.token
  else:
    with pytest.raises(UserError, match="in use by another run"):
      WorkdirLock(tmp_path, process_index=0).__enter__()
    assert json.loads(lock_file.read_text())["token"] == "theirs"


def test_the_lock_records_the_boot_id(tmp_path):
  with WorkdirLock(tmp_path, process_index=0):
    assert json.loads((tmp_path / ".lock").read_text())["boot"] == _boot_id()


def test_released_on_an_exception(tmp_path):
  with pytest.raises(RuntimeError), WorkdirLock(tmp_path, process_index=0):
    assert (tmp_path / ".lock").exists()
    raise RuntimeError("boom")
  assert not (tmp_path / ".lock").exists()


def test_a_lock_no_longer_held_is_not_removed(tmp_path, caplog):
  with WorkdirLock(tmp_path, process_index=0):
    _write_lock(tmp_path, token="another run's")   # e.g. taken over as stale meanwhile
  assert json.loads((tmp_path / ".lock").read_text())["token"] == "another run's"
  assert "no longer this run's" in caplog.text


def test_heartbeat_is_refreshed_until_release(tmp_path):
  with WorkdirLock(tmp_path, process_index=0, heartbeat_s=0.05) as lock:
    info = json.loads((tmp_path / ".lock").read_text())
    (tmp_path / ".lock").write_text(json.dumps({**info, "heartbeat": "2024-01-02T03:04:05Z"}))
    deadline = time.time() + 5
    while json.loads((tmp_path / ".lock").read_text())["heartbeat"].startswith("2024"):
      assert time.time() < deadline, "heartbeat not refreshed"
      time.sleep(0.02)
    thread = lock._thread
  assert not thread.is_alive() and not (tmp_path / ".lock").exists()
  assert [p.name for p in tmp_path.iterdir()] == []   # no temporary file left behind


@pytest.mark.parametrize("fails", ["write", "read"])
def test_heartbeat_survives_any_error(fails, tmp_path, monkeypatch, caplog):
  # gcsfs raises its HttpError (no OSError) once its retries are spent: the thread must live on.
  calls = []
  real_write, real_mine = paths.write_atomic, WorkdirLock._mine

  def write_atomic(path, data):
    calls.append(path)
    if fails == "write" and len(calls) == 1:
      raise RuntimeError("503 Service Unavailable")
    real_write(path, data)

  def mine(self):
    if fails == "read" and not calls:
      calls.append("read")
      raise RuntimeError("503 Service Unavailable")
    return real_mine(self)

  monkeypatch.setattr(paths, "write_atomic", write_atomic)
  monkeypatch.setattr(WorkdirLock, "_mine", mine)
  with caplog.at_level(logging.WARNING, logger="csd_jax.train"):
    with WorkdirLock(tmp_path, process_index=0, heartbeat_s=0.05) as lock:
      info = json.loads((tmp_path / ".lock").read_text())
      (tmp_path / ".lock").write_text(json.dumps({**info, "heartbeat": "2024-01-02T03:04:05Z"}))
      deadline = time.time() + 5
      while json.loads((tmp_path / ".lock").read_text())["heartbeat"].startswith("2024"):
        assert time.time() < deadline, "heartbeat not refreshed after the error"
        time.sleep(0.02)
      assert lock._thread.is_alive()
  assert len(calls) >= 2
  warnings = [r.getMessage() for r in caplog.records if r.name == "csd_jax.train"]
  assert len(warnings) == 1 and "RuntimeError: 503" in warnings[0], warnings


def test_a_lock_that_a_retried_create_made_is_held(tmp_path, monkeypatch):
  # The create's first try succeeded, its answer was lost, the retry got 412: False.
  real = paths.create_exclusive

  def lost_answer(path, data):
    assert real(path, data)
    return False

  monkeypatch.setattr(paths, "create_exclusive", lost_answer)
  with WorkdirLock(tmp_path, process_index=0, heartbeat_s=0.05) as lock:
    assert lock.held and lock._thread.is_alive()
    assert json.loads((tmp_path / ".lock").read_text())["token"] == lock.token
  assert not (tmp_path / ".lock").exists()


def test_concurrent_take_overs_in_threads_one_wins(tmp_path):
  for round_ in range(10):
    workdir = tmp_path / str(round_)
    _write_lock(workdir, pid=_dead_pid())
    results = _race_to_acquire(workdir, 8)
    assert sorted(results) == ["refused"] * 7 + ["won"], results
    assert [p.name for p in workdir.iterdir()] == []


_CONTENDER = """
import sys, time
from csd_jax.errors import UserError
from csd_jax.run.lock import WorkdirLock
lock = WorkdirLock(sys.argv[1], process_index=0)
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
  lock.acquire()
except UserError as error:
  print("refused", error)
else:
  print("won")
  time.sleep(1.0)
  lock.release()
"""


def test_concurrent_take_overs_in_processes_one_wins(tmp_path):
  _write_lock(tmp_path, pid=_dead_pid())
  start = time.time() + 1.5   # all started and imported by then
  contenders = [subprocess.Popen([sys.executable, "-c", _CONTENDER, str(tmp_path), str(start)],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(6)]
  outputs = [c.communicate(timeout=60)[0] for c in contenders]
  assert sorted(o.split()[0] for o in outputs) == ["refused"] * 5 + ["won"], outputs
  assert not (tmp_path / ".lock").exists()


CONFIG = {"loss": {"name": "csd", "params": {}}, "optim": {"lr": 3e-3, "betas": (0.9, 0.95)},
          "train": {"steps": 30}}


def _changed(config, **sections):
  return {k: {**v, **sections.get(k, {})} for k, v in config.items()}


def test_record_config_history(tmp_path, caplog):
  assert record_config(tmp_path, CONFIG, 0) == []
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
  assert yaml.safe_load((tmp_path / "config.yaml").read_text())["loss"]["name"] == "csd"

  mtime = (tmp_path / "config.yaml").stat().st_mtime_ns
  assert record_config(tmp_path, CONFIG, 10) == []   # identical (tuples are YAML lists)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]
  assert (tmp_path / "config.yaml").stat().st_mtime_ns == mtime

  with caplog.at_level(logging.WARNING, logger="csd_jax.train"):
    changes = record_config(tmp_path, _changed(CONFIG, loss={"name": "fkl"}), 20)
  assert changes == ["loss.name: csd -> fkl"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.step-20.yaml", "config.yaml"]
  assert yaml.safe_load((tmp_path / "config.step-20.yaml").read_text())["loss"]["name"] == "csd"
  assert yaml.safe_load((tmp_path / "config.yaml").read_text())["loss"]["name"] == "fkl"
  warnings = [r.getMessage() for r in caplog.records if r.name == "csd_jax.train"]
  assert len(warnings) == 1 and "\n" not in warnings[0]
  assert "config.step-20.yaml" in warnings[0] and "loss.name: csd -> fkl" in warnings[0]


def test_record_config_names_every_change_and_never_overwrites(tmp_path):
  record_config(tmp_path, CONFIG, 0)
  record_config(tmp_path, _changed(CONFIG, loss={"name": "fkl"}), 20)
  new = _changed(CONFIG, optim={"lr": 1e-3, "betas": [0.9, 0.99], "note": "x" * 100},
                 train={"steps": None})
  changes = record_config(tmp_path, new, 20)   # resumed from step 20 again
  assert changes == ["loss.name: fkl -> csd", "optim.lr: 0.003 -> 0.001",
                     "optim.betas: [0.9, 0.95] -> [0.9, 0.99]",
                     "optim.note: (absent) -> " + "x" * 37 + "...", "train.steps: 30 -> null"]
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "config.step-20.1.yaml", "config.step-20.yaml", "config.yaml"]
  assert yaml.safe_load((tmp_path / "config.step-20.yaml").read_text())["loss"]["name"] == "csd"
  assert yaml.safe_load((tmp_path / "config.step-20.1.yaml").read_text())["loss"]["name"] == "fkl"


def test_second_train_on_a_busy_workdir_is_refused(tmp_path):
  workdir = tmp_path / "w"
  command = [sys.executable, "-m", "csd_jax.cli", "train", "--config", "configs/tiny.yaml",
             "--workdir", str(workdir), "train.steps=400", "train.log_every=1"]
  log = open(tmp_path / "first.log", "w")   # a file, not a pipe that could fill and block it
  first = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
  try:
    deadline = time.time() + 120
    while not (workdir / ".lock").exists():
      assert first.poll() is None, (tmp_path / "first.log").read_text()
      assert time.time() < deadline, "the first run never took the lock"
      time.sleep(0.1)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    metrics = workdir / "metrics.jsonl"
    while not metrics.exists() or not metrics.stat().st_size:   # SIGTERM handled from here on
      assert first.poll() is None, "the first run ended early"
      assert time.time() < deadline + 300, "the first run logs no step"
      time.sleep(0.1)
    first.send_signal(signal.SIGTERM)   # a preemption: it saves and stops, no need for 400 steps
    first.wait(timeout=300)
  finally:
    if first.poll() is None:
      first.kill()
    log.close()
  assert second.returncode == 2, second.stderr
  errors = [line for line in second.stderr.splitlines() if line.startswith("csd-jax train:")]
  assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
  assert f"pid {first.pid}" in errors[0] and socket.gethostname() in errors[0], errors[0]
  assert first.returncode == 0, (tmp_path / "first.log").read_text()
  steps = [json.loads(row)["step"] for row in metrics.read_text().splitlines()]
  assert steps == list(range(1, len(steps) + 1)), steps   # the first run's rows, once each
  assert not (workdir / ".lock").exists()
