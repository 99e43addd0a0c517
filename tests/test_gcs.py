"""A run directory in Google Cloud Storage: `--workdir gs://bucket/run` on 2 processes, killed
and resumed, then read by `csd-jax export`, `csd-jax eval` and TensorBoard, all against a GCS
server on 127.0.0.1 (tests/gcs_emulator.py).

Every client of a real run talks to it: gcsfs under `etils.epath` (config.yaml, the lock,
metrics.jsonl, TensorBoard events, checksums, eval results, the export, a tokenizer read from
the bucket), TensorStore under Orbax (the arrays of the checkpoints, OCDBT), and TensorBoard's
own reader (through fsspec).
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import numpy as np
import pytest

from cpu_devices import xla_flags
from gcs_emulator import DEFAULT_BUCKET as BUCKET

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 8
# As tests/test_multiprocess.py: no dropout, float32, a checkpoint every 2 steps.
ARGS = ["--config", str(ROOT / "configs" / "tiny.yaml"), f"train.steps={STEPS}",
        "checkpoint.every=2", "student.dtype=float32", "student.dropout=0.0"]


def _port():
  from gcs_emulator import free_port

  return free_port()


def _env(gcs, **extra):
  return {**os.environ, **gcs.env, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
          "XLA_FLAGS": xla_flags(2), **extra}


def _start(gcs, workdir, extra_args=()):
  port = _port()
  return [subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "train_until.py"), *ARGS, *extra_args,
       "--workdir", str(workdir)],
      env=_env(gcs, CSD_JAX_COORDINATOR=f"127.0.0.1:{port}", CSD_JAX_NUM_PROCESSES="2",
               CSD_JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(2)]


def _finish(procs):
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  return outs


def _cli(run_cli, *args):
  """`csd-jax ARGS` in this process (the `gcs` fixture points it at the server too)."""
  code, out, err = run_cli(*args)
  assert code == 0, out + err


def _losses(workdir):
  from csd_jax.metrics import read_metrics

  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


@pytest.fixture(scope="module")
def tokenizer_in_bucket(gcs, gpt2_tokenizer, tmp_path_factory):
  """The GPT-2 tokenizer's files, uploaded: `data.tokenizer=gs://...` is read from the bucket."""
  from csd_jax.runtime import paths

  local = tmp_path_factory.mktemp("tokenizer")
  gpt2_tokenizer.save_pretrained(local)
  remote = f"gs://{BUCKET}/assets/gpt2-tokenizer"
  paths.copy_tree(local, remote)
  return remote


@pytest.mark.slow
def test_gs_workdir_killed_and_resumed_matches_a_local_run(gcs, tokenizer_in_bucket, tmp_path,
                                                            monkeypatch, run_cli):
  from csd_jax.runtime import paths
  from csd_jax.train.storage import complete_checkpoints

  tokenizer = [f"data.tokenizer={tokenizer_in_bucket}"]
  monkeypatch.setenv("CSD_JAX_CACHE", str(tmp_path / "cache"))   # the tokenizer's local copy

  local = tmp_path / "local"
  began = time.perf_counter()
  _finish(_start(gcs, local, tokenizer))
  local_seconds = time.perf_counter() - began

  workdir = f"gs://{BUCKET}/runs/killed"
  began = time.perf_counter()
  procs = _start(gcs, workdir, tokenizer)
  deadline = time.time() + 300
  while not any(step >= 2 for step in complete_checkpoints(f"{workdir}/checkpoints")):
    assert time.time() < deadline, "no checkpoint committed in the bucket within 300 s"
    assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
    time.sleep(0.2)
  for p in procs:   # SIGKILL: no handler runs, nothing is flushed or released
    p.kill()
    p.wait()
  killed_at = complete_checkpoints(f"{workdir}/checkpoints")
  assert killed_at and killed_at[-1] < STEPS
  outs = _finish(_start(gcs, workdir, tokenizer))
  gs_seconds = time.perf_counter() - began
  assert "resuming from the checkpoint of step" in outs[0]
  assert "taking over" in outs[0] and ".lock" in outs[0]   # the killed run's lock in the bucket

  want, got = _losses(local), _losses(workdir)
  assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
  # The same 2 processes and devices, the same programs: bit for bit, not a tolerance.
  assert [got[s] for s in sorted(got)] == [want[s] for s in sorted(want)]
  assert complete_checkpoints(f"{workdir}/checkpoints")[-1] == STEPS
  for step in complete_checkpoints(f"{workdir}/checkpoints"):
    lists = sorted(p.name for p in paths.as_path(f"{workdir}/checkpoints/{step}").glob(
        "checksums.process_*.json"))
    assert lists == ["checksums.process_0.json", "checksums.process_1.json"], step
  print(f"\n{STEPS} steps on 2 processes: local disk {local_seconds:.1f} s; gs:// with a "
        f"SIGKILL after step {killed_at[-1]} and a resume {gs_seconds:.1f} s")

  # TensorBoard's own reader, through fsspec: every step's loss, over the two runs' event files
  # (the killed run's steps after its checkpoint come again from the resumed one).
  from tensorboard.backend.event_processing import event_accumulator

  events = event_accumulator.EventAccumulator(f"{workdir}/tensorboard")
  events.Reload()
  logged = {e.step: e.value for e in events.Scalars("loss")}
  assert sorted(logged) == list(range(1, STEPS + 1))
  # TensorBoard stores float32: the JSON's float64 losses rounded once.
  assert [logged[s] for s in sorted(logged)] == [float(np.float32(want[s])) for s in sorted(want)]

  # export: from the bucket to the bucket, and the same weights as the local run's.
  _cli(run_cli, "export", "--workdir", workdir, "--out", f"gs://{BUCKET}/exports/killed")
  _cli(run_cli, "export", "--workdir", str(local), "--out", str(tmp_path / "local_export"))
  exported = paths.as_path(f"gs://{BUCKET}/exports/killed")
  names = sorted(p.name for p in exported.iterdir())
  assert "config.json" in names and "model.safetensors" in names and "tokenizer.json" in names
  from safetensors.numpy import load

  remote_weights = load((exported / "model.safetensors").read_bytes())
  local_weights = load((tmp_path / "local_export" / "model.safetensors").read_bytes())
  assert remote_weights.keys() == local_weights.keys()
  for name, value in local_weights.items():
    np.testing.assert_array_equal(remote_weights[name], value, err_msg=name)

  # eval: the run and a data file in the bucket, the results written beside the run.
  data = paths.as_path(f"gs://{BUCKET}/data/set.jsonl")
  data.write_text(json.dumps({"instruction": "Say hi.", "response": "Hi."}) + "\n")
  _cli(run_cli, "eval", "--workdir", workdir, "--data", f"set={data}", "--max-new-tokens", "4",
       "--seeds", "1")
  results = json.loads(paths.as_path(f"{workdir}/eval_results.json").read_text())
  assert "set" in results and "rougeL" in results["set"]


@pytest.mark.slow
def test_models_and_data_read_from_the_bucket(gcs, instruction_files, tmp_path, monkeypatch,
                                              run_cli):
  """`student.path`, `data.tokenizer` and `data.train_files` / `eval_files` in the bucket: the
  model and tokenizer directories are copied into the local cache once (safetensors and
  tokenizers read local files), the data files are read from the bucket directly."""
  import yaml

  from csd_jax.runtime import paths
  from csd_jax.models import init_random, save_pretrained

  monkeypatch.setenv("CSD_JAX_CACHE", str(tmp_path / "cache"))
  student = tmp_path / "student"
  config = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())["student"]["config"]
  save_pretrained(init_random(config, seed=3), student)
  (student / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
  bucket = f"gs://{BUCKET}/inputs"
  paths.copy_tree(student, f"{bucket}/student")
  paths.copy_tree(instruction_files, f"{bucket}/data")
  workdir = f"gs://{BUCKET}/runs/inputs"
  _cli(run_cli, "train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--workdir", workdir,
       "train.steps=2", "student.config=null", f"student.path={bucket}/student",
       "data.source=files",
       f"data.tokenizer={bucket}/data/tokenizer", f"data.train_files=[{bucket}/data/train.jsonl]",
       f"data.eval_files=[{bucket}/data/valid.jsonl]", f"data.data_dir={tmp_path / 'tfds'}")
  assert sorted(_losses(workdir)) == [1, 2]
  from csd_jax.data.chat import model_eos_ids

  assert {7, 9} <= set(model_eos_ids(f"{bucket}/student")) == set(model_eos_ids(student))
  saved = yaml.safe_load(paths.as_path(f"{workdir}/config.yaml").read_text())
  assert saved["student"]["path"] == f"{bucket}/student"   # the URL, not the local copy
  copies = list((tmp_path / "cache" / "remote").iterdir())
  assert sorted(p.name.split("-", 1)[1] for p in copies) == ["student", "tokenizer"]


def test_checksums_check_a_step_moved_into_or_out_of_the_bucket(gcs, tmp_path):
  """A run uploaded to a bucket (CRC-32 lists) or copied out of one (GCS's CRC-32C lists)
  checks like one that never moved; a flipped byte is still caught on either side."""
  from csd_jax.run import integrity
  from csd_jax.runtime import paths

  local = tmp_path / "4"
  for rel, data in {"_CHECKPOINT_METADATA": b"m", "state/d/root": b"r" * 300,
                    "state/ocdbt.process_0/d/x": b"x" * 1000}.items():
    (local / rel).parent.mkdir(parents=True, exist_ok=True)
    (local / rel).write_bytes(data)
  integrity.write_checksums(local, 0, 1)                       # crc32, on a disk
  uploaded = f"gs://{BUCKET}/moved/up/4"
  paths.copy_tree(local, uploaded)
  assert integrity.verify(uploaded) == integrity.Verdict(None, None)

  saved_remotely = f"gs://{BUCKET}/moved/down/4"
  paths.copy_tree(local, saved_remotely, skip_suffixes=(".json",))
  integrity.write_checksums(saved_remotely, 0, 1)              # GCS's own CRC-32C
  document = json.loads(paths.as_path(f"{saved_remotely}/checksums.process_0.json").read_text())
  assert document["algorithm"] == integrity.REMOTE_ALGORITHM
  downloaded = tmp_path / "down" / "4"
  paths.copy_tree(saved_remotely, downloaded)
  assert integrity.verify(downloaded) == integrity.Verdict(None, None)
  (downloaded / "state/d/root").write_bytes(b"r" * 299 + b"s")
  assert integrity.verify(downloaded).damage == (
      f"state/d/root does not match its {integrity.REMOTE_ALGORITHM} checksum")
  paths.as_path(f"{uploaded}/state/d/root").write_bytes(b"r" * 299 + b"s")
  assert integrity.verify(uploaded).damage == "state/d/root does not match its crc32 checksum"


def test_paths_in_a_bucket(gcs, tmp_path, monkeypatch):
  """What csd_jax.runtime.paths adds to etils.epath for object stores."""
  from csd_jax.runtime import paths

  monkeypatch.setenv("CSD_JAX_CACHE", str(tmp_path / "cache"))
  assert paths.is_remote("gs://b/run") and not paths.is_remote("csd=gs://b/run")
  assert paths.absolute("gs://b/run") == paths.as_path("gs://b/run")   # never $PWD/gs:/...
  root = f"gs://{BUCKET}/paths"
  assert paths.create_exclusive(f"{root}/lock", b"1")
  assert not paths.create_exclusive(f"{root}/lock", b"2")      # ifGenerationMatch=0
  assert paths.as_path(f"{root}/lock").read_bytes() == b"1"
  model = f"{root}/model"
  for rel, data in {"config.json": b"{}", "model.safetensors": b"w" * 100,
                    "sub/tokenizer.json": b"t"}.items():
    paths.as_path(f"{model}/{rel}").write_bytes(data)
  paths._filesystem(model).pipe(f"{BUCKET}/paths/model/", b"")   # consoles' "folder" objects
  paths._filesystem(model).pipe(f"{BUCKET}/paths/model/sub/", b"")
  assert paths.walk_files(model) == ["config.json", "model.safetensors", "sub/tokenizer.json"]
  copy = pathlib.Path(paths.local_copy(model))
  assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()) == [
      "config.json", "model.safetensors", "sub/tokenizer.json"]
  assert paths.local_copy(model) == str(copy)                   # unchanged: copied once
  tokenizer_only = pathlib.Path(paths.local_copy(model, skip_suffixes=(".safetensors",)))
  assert not (tokenizer_only / "model.safetensors").exists()
  paths.as_path(f"{model}/model.safetensors").write_bytes(b"v" * 100)   # the bucket changed
  fresh = pathlib.Path(paths.local_copy(model))
  assert fresh != copy and (fresh / "model.safetensors").read_bytes() == b"v" * 100
  paths.rename_tree(model, f"{root}/moved")
  assert not paths.as_path(model).exists()
  assert paths.walk_files(f"{root}/moved") == [
      "config.json", "model.safetensors", "sub/tokenizer.json"]


def test_what_must_stay_local_is_refused_in_one_line(tmp_path):
  from csd_jax.demo import command as demo
  from csd_jax.config import load_config
  from csd_jax.errors import UserError
  from csd_jax.generate import command as generate_command

  with pytest.raises(UserError, match=r"^data.data_dir=gs://b/tfds: the TFDS cache .* local "):
    load_config(ROOT / "configs" / "tiny.yaml", ["data.data_dir=gs://b/tfds"])
  prompts = tmp_path / "prompts.jsonl"
  prompts.write_text(json.dumps({"instruction": "Hi."}) + "\n")
  with pytest.raises(UserError, match=r"^--out gs://b/out.jsonl: generate appends .* locally"):
    generate_command.run_generate(generate_command.GenerateRequest(
        prompts=str(prompts), out="gs://b/out.jsonl", model=str(tmp_path)))
  with pytest.raises(UserError, match=r"^--workdir gs://b/demo: the demo .* local directory"):
    demo.run("gs://b/demo")
