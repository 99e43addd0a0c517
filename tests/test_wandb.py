"""Weights & Biases (optional): the config section, offline run files that hold the logged
scalars, a resumed run that continues the same W&B run, and a W&B that fails, is unreachable
or is missing, none of which stops training."""

import json
import logging
import os
import pathlib
import re
import struct
import subprocess
import sys
import time
import zlib

import pytest

from csd_jax.config import ConfigError, load_config
from csd_jax.metrics import MetricsWriter, read_metrics, read_tensorboard_scalars

wandb = pytest.importorskip("wandb")   # the `test` extra installs it
from wandb.proto import wandb_internal_pb2  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
FAST = ["train.heldout_batches=1"]   # one held-out batch: the runs here test logging


@pytest.fixture(scope="module")
def xla_cache(tmp_path_factory):
  """One persistent XLA cache for the module's training runs: they compile the same programs."""
  return f"train.compile_cache={tmp_path_factory.mktemp('xla_cache')}"


@pytest.fixture
def offline(monkeypatch, tmp_path):
  """W&B in offline mode (files only, no network), its settings and caches under tmp_path."""
  for name in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME",
               "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_NAME", "WANDB_TAGS"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("WANDB_MODE", "offline")
  monkeypatch.setenv("WANDB_CONSOLE", "off")   # leave pytest's capture of stdout alone
  monkeypatch.setenv("WANDB_SILENT", "true")
  for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
    monkeypatch.setenv(name, str(tmp_path / "wandb_home" / name.lower()))
  return tmp_path


def _records(path: pathlib.Path) -> list:
  """The records of a `.wandb` run file (wandb 0.31 has no Python reader of them): LevelDB
  log framing in 32 KiB blocks after a 7-byte header, each record `crc32 (type + data) | length
  | type | data` (type 1 whole, 2 / 3 / 4 first / middle / last part), data a `Record` proto."""
  data, block, header = path.read_bytes(), 32768, 7
  assert data[:4] == b":W&B", path
  i, out, part = header, [], b""
  while i + 7 <= len(data):
    if block - i % block < 7:   # a block's tail too short for a header is padding
      i += block - i % block
      continue
    crc, n, kind = struct.unpack("<IHB", data[i:i + 7])
    if kind == 0 or i + 7 + n > len(data):   # the end, or a record still being written
      break
    body = data[i + 7:i + 7 + n]
    assert zlib.crc32(body, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad crc at {i}"
    i += 7 + n
    part = body if kind in (1, 2) else part + body
    if kind in (1, 4):
      record = wandb_internal_pb2.Record()
      record.ParseFromString(part)
      out.append(record)
  return out


def _finished_records(path: pathlib.Path, timeout: float = 30.0) -> list:
  """The records of a finished run's file, once its exit record is there: W&B's core (its own
  process) may still be writing the file when `finish()` returns (seen under load)."""
  deadline = time.monotonic() + timeout
  while True:
    records = _records(path)
    if any(r.WhichOneof("record_type") == "exit" for r in records):
      return records
    assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
    time.sleep(0.1)


def _offline_runs(wandb_dir: pathlib.Path) -> list[dict]:
  """Each offline run under `wandb_dir`, in creation order: its id, project, name, tags and its
  history rows by our step."""
  runs = []
  for run_file in sorted(wandb_dir.glob("wandb/offline-run-*/run-*.wandb")):
    run, history, exit_code = None, {}, None
    for record in _finished_records(run_file):
      kind = record.WhichOneof("record_type")
      if kind == "run":
        run = record.run
      elif kind == "exit":
        exit_code = record.exit.exit_code
      elif kind == "history":
        row = {item.key or ".".join(item.nested_key): json.loads(item.value_json)
               for item in record.history.item}
        history[row["step"]] = {k: v for k, v in row.items() if not k.startswith("_")}
    runs.append({"id": run.run_id, "project": run.project, "name": run.display_name,
                 "tags": list(run.tags), "history": history, "exit_code": exit_code})
  return runs


def test_offline_run_files_hold_the_scalars_and_a_resume_continues_the_run(offline, xla_cache):
  workdir = offline / "run"
  common = [*FAST, "checkpoint.every=2", xla_cache,
            "metrics.wandb.project=csd-test", "metrics.wandb.name=tiny",
            "metrics.wandb.tags=[ci, tiny]"]
  from csd_jax.train.loop import train

  train(load_config(TINY, ["train.steps=3", *common]), workdir)
  (first,) = _offline_runs(workdir)   # WANDB_DIR unset: W&B's files in the workdir
  assert {k: first[k] for k in ("project", "name", "tags")} == {
      "project": "csd-test", "name": "tiny", "tags": ["ci", "tiny"]}
  assert json.loads((workdir / "wandb_run.json").read_text())["id"] == first["id"]
  assert first["exit_code"] == 0
  # The same scalars as metrics.jsonl (and TensorBoard), step for step, value for value.
  rows = {r["step"]: r for r in read_metrics(workdir)}
  assert sorted(first["history"]) == [1, 2, 3]
  assert first["history"] == rows
  tensorboard = read_tensorboard_scalars(workdir / "tensorboard")
  assert set(tensorboard) == set(rows[3]) - {"step"}
  assert [s for s, _ in tensorboard["loss"]] == [1, 2, 3]

  train(load_config(TINY, ["train.steps=5", *common]), workdir)   # resumed from step 3
  runs = _offline_runs(workdir)
  assert len(runs) == 2 and runs[1]["id"] == first["id"]   # the same W&B run, continued
  rows = {r["step"]: r for r in read_metrics(workdir)}
  assert sorted(runs[1]["history"]) == [4, 5]
  assert runs[1]["history"] == {s: rows[s] for s in (4, 5)}


@pytest.mark.slow
def test_a_failing_wandb_init_leaves_training_running(offline, xla_cache, monkeypatch, caplog):
  def refuse(*args, **kwargs):
    raise wandb.errors.CommError("the W&B server said no\nand more lines")

  monkeypatch.setattr(wandb, "init", refuse)
  from csd_jax.train.loop import train

  with caplog.at_level(logging.WARNING, logger="csd_jax.metrics"):
    result = train(load_config(TINY, ["train.steps=2", *FAST, "metrics.wandb.project=p",
                                      xla_cache]), offline / "run")
  assert [r["step"] for r in read_metrics(offline / "run")] == [1, 2]
  assert result.metrics["loss"] > 0 and not result.preempted
  warnings = [r.getMessage() for r in caplog.records if r.name == "csd_jax.metrics"]
  assert warnings == ["W&B did not start (CommError: the W&B server said no); training goes on "
                      "without it"]


def _spec(**kwargs):
  return load_config(TINY, [f"metrics.wandb.{k}={v}" for k, v in kwargs.items()]).metrics.wandb


def test_a_failing_log_warns_once_and_the_files_are_written(offline, monkeypatch, caplog):
  monkeypatch.setenv("WANDB_DIR", str(offline / "wandb_files"))
  calls = []

  def broken(self, *args, **kwargs):
    calls.append(args)
    raise OSError("the W&B service went away")

  monkeypatch.setattr(wandb.Run, "log", broken)
  with caplog.at_level(logging.WARNING, logger="csd_jax.metrics"):
    with MetricsWriter(offline / "run", wandb=_spec(project="p")) as w:
      for step in (1, 2, 3):
        w.write(step, {"loss": float(step)})
  assert len(calls) == 1   # not tried again after the failure
  assert wandb.run is None   # but finished: the next init starts a new run
  assert [r["step"] for r in read_metrics(offline / "run")] == [1, 2, 3]
  warnings = [r.getMessage() for r in caplog.records if r.name == "csd_jax.metrics"]
  assert warnings == ["W&B failed to log step 1 (OSError: the W&B service went away); training "
                      "goes on without it"]
  assert list((offline / "wandb_files").glob("wandb/offline-run-*"))   # WANDB_DIR respected
  assert not (offline / "run" / "wandb").exists()


def test_a_run_that_raises_marks_its_wandb_run_failed(offline, monkeypatch):
  monkeypatch.setenv("WANDB_DIR", str(offline / "wandb_files"))
  with pytest.raises(RuntimeError, match="boom"):
    with MetricsWriter(offline / "run", wandb=_spec(project="p")) as w:
      w.write(1, {"loss": 0.5})
      raise RuntimeError("boom")
  (run,) = _offline_runs(offline / "wandb_files")
  assert run["exit_code"] == 1 and run["history"] == {1: {"step": 1, "loss": 0.5}}


def test_an_unreachable_server_only_warns(offline):
  """A real online init against a closed port, in a fresh process (W&B keeps the settings of
  its first init for the process), with a key, so that W&B does not ask for one."""
  code = ("import logging, sys; logging.basicConfig(level=logging.WARNING, format='%(message)s')\n"
          "from csd_jax.config import load_config\n"
          "from csd_jax.metrics import MetricsWriter\n"
          f"spec = load_config({str(TINY)!r}, ['metrics.wandb.project=p']).metrics.wandb\n"
          f"with MetricsWriter({str(offline / 'run')!r}, wandb=spec) as w:\n"
          "  w.write(1, {'loss': 1.0})\n")
  env = {**os.environ, "WANDB_MODE": "online", "WANDB_BASE_URL": "http://127.0.0.1:1",
         "WANDB_API_KEY": "x" * 40, "WANDB_INIT_TIMEOUT": "1", "WANDB_SILENT": "true"}
  result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr
  assert read_metrics(offline / "run") == [{"step": 1, "loss": 1.0}]
  ours = [line for line in result.stderr.splitlines() if line.startswith("W&B")]
  assert len(ours) == 1 and ours[0].startswith("W&B did not start (") and ours[0].endswith(
      "; training goes on without it"), result.stderr


def test_wandb_missing_only_warns(offline, monkeypatch, caplog):
  monkeypatch.setitem(sys.modules, "wandb", None)   # `import wandb` raises ImportError
  with caplog.at_level(logging.WARNING, logger="csd_jax.metrics"):
    with MetricsWriter(offline / "run", wandb=_spec(project="p")) as w:
      w.write(1, {"loss": 1.0})
  assert read_metrics(offline / "run") == [{"step": 1, "loss": 1.0}]
  assert [r.getMessage() for r in caplog.records if r.name == "csd_jax.metrics"] == [
      "metrics.wandb.project=p, but wandb is not installed (pip install 'csd-jax[wandb]'); "
      "training goes on without W&B"]


def test_a_damaged_run_file_starts_a_new_run(offline, caplog):
  from csd_jax.metrics.wandb_logger import RUN_FILE, run_id

  workdir = offline / "run"
  workdir.mkdir()
  spec = _spec(project="p")
  first = run_id(workdir, spec)
  assert run_id(workdir, spec) == first and len(first) == 8 and first.isalnum()
  (workdir / RUN_FILE).write_text("{not json")
  with caplog.at_level(logging.WARNING, logger="csd_jax.metrics"):
    second = run_id(workdir, spec)
  assert second != first and run_id(workdir, spec) == second
  assert "holds no W&B run id" in caplog.text


def test_wandb_is_imported_only_when_configured(tmp_path):
  code = ("import sys; from csd_jax.metrics import MetricsWriter\n"
          "from csd_jax.config import load_config\n"
          f"spec = load_config({str(TINY)!r}).metrics.wandb\n"
          f"MetricsWriter({str(tmp_path)!r}, wandb=spec).write(1, {{'loss': 1.0}})\n"
          "assert 'wandb' not in sys.modules, 'wandb imported'\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("override,message", [
    ("metrics.wandb.projct=p", "unknown config key 'metrics.wandb.projct'; did you mean "
                               "metrics.wandb.project"),
    ("metrics.wandb.tags=ci", "metrics.wandb.tags='ci': expected list"),
    ("metrics.wandb.tags=[ci, 3]", "metrics.wandb.tags=['ci', 3]: expected a list of strings"),
    ("metrics.wandb.entity=me", "metrics.wandb.entity / name / tags need metrics.wandb.project"),
    ("metrics.wandb.project=me/p", "metrics.wandb.project='me/p': W&B project names cannot "
                                   "contain / \\ # ? % : (for entity/project set "
                                   "metrics.wandb.entity too)"),
    ("metrics.wandb.project=' '", "metrics.wandb.project=' ': empty"),
])
def test_config_errors(override, message):
  with pytest.raises(ConfigError, match="^" + re.escape(message)):
    load_config(TINY, [override])


def test_config_round_trip():
  config = load_config(TINY, ["metrics.wandb.project=p", "metrics.wandb.tags=[a, b]"])
  assert config.metrics.wandb.project == "p" and config.metrics.wandb.tags == ["a", "b"]
  assert config.metrics.wandb.entity is None and config.metrics.wandb.name is None
  assert load_config(TINY).metrics.wandb.project is None
