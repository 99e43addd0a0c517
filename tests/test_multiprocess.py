"""The tiny config on 2 local processes (2 CPU devices each, gloo): trains, checkpoints, is
killed, resumes, and ends with the same losses as 1 process on as many devices."""

import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cpu_devices import xla_flags
from csd_jax.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Without the GPT-2 student's dropout: each process takes every process_count-th record, so two
# processes hold the same batch in another row order than one, and a row meets another mask.
ARGS = ["--config", str(ROOT / "configs" / "tiny.yaml"), "train.steps=8", "checkpoint.every=2",
        "student.dtype=float32", "student.dropout=0.0"]


def _port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices, **extra):
  env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": xla_flags(devices), **extra}
  return env


def _start(workdir, processes, args=ARGS):
  port = _port()
  return [subprocess.Popen(
      [sys.executable, str(ROOT / "tests" / "train_until.py"), *args, "--workdir", str(workdir)],
      env=_env(2, CSD_JAX_COORDINATOR=f"127.0.0.1:{port}", CSD_JAX_NUM_PROCESSES="2",
               CSD_JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True) for i in range(processes)]


def _finish(procs):
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert [p.returncode for p in procs] == [0] * len(procs), outs
  return outs


def _checkpoints(workdir):
  directory = workdir / "checkpoints"
  return [p for p in directory.iterdir() if p.name.isdigit()] if directory.exists() else []


@pytest.mark.slow
def test_two_processes_killed_and_resumed_match_one_process(tmp_path):
  reference = tmp_path / "one_process"
  one = subprocess.run([sys.executable, str(ROOT / "tests" / "train_until.py"), *ARGS,
                        "--workdir", str(reference)], env=_env(4), capture_output=True,
                       text=True, timeout=600, check=False)
  assert one.returncode == 0, one.stderr

  workdir = tmp_path / "two_processes"
  procs = _start(workdir, 2)
  deadline = time.time() + 300
  while not (_checkpoints(workdir) and (workdir / "metrics.jsonl").exists()
             and read_metrics(workdir) and read_metrics(workdir)[-1]["step"] >= 3):
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.05)
  for p in procs:
    p.kill()
    p.wait()
  assert read_metrics(workdir)[-1]["step"] < 8
  outs = _finish(_start(workdir, 2))
  assert "resuming from the checkpoint of step" in outs[0]
  got = {r["step"]: r["loss"] for r in read_metrics(workdir)}
  want = {r["step"]: r["loss"] for r in read_metrics(reference)}
  assert sorted(got) == sorted(want) == list(range(1, 9))
  # float32 rounding: the same 4 devices, but collectives between processes go through gloo.
  np.testing.assert_allclose([got[s] for s in range(1, 9)], [want[s] for s in range(1, 9)],
                             rtol=1e-5)
  assert len(list((workdir / "tensorboard").iterdir())) == 2  # only process 0 writes: 2 runs


@pytest.mark.slow
def test_onpolicy_on_two_processes_is_deterministic_and_learns(tmp_path):
  """Student answers generated from global batches, a replicated replay buffer, on 2
  processes: both finish, the loss falls, and a second run repeats the first bit for bit.

  (A 1-process run samples other rows: the global batch holds the same rows in another order,
  process by process, and the sampling keys and replaced rows follow row positions.)"""
  args = [*ARGS, "train.steps=6", "checkpoint.every=0", "onpolicy.ratio=0.5",
          "onpolicy.buffer_size=16"]
  runs = []
  for name in ("first", "second"):
    _finish(_start(tmp_path / name, 2, args))
    runs.append([r["loss"] for r in read_metrics(tmp_path / name) if "loss" in r])
  assert runs[0] == runs[1] and len(runs[0]) >= 6
  assert runs[0][5] < 0.8 * runs[0][0], runs[0]


def test_launch_script_dry_run():
  result = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "--dry-run",
                           "3", "--", "train", "--config", "c.yaml", "--workdir", "W"],
                          capture_output=True, text=True, check=True)
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 3
  for i, line in enumerate(lines):
    assert f"CSD_JAX_PROCESS_ID={i}" in line and "CSD_JAX_NUM_PROCESSES=3" in line
    assert line.endswith(f"W/logs/process_{i}.log 2>&1 &")
  bad = subprocess.run(["bash", str(ROOT / "launch" / "local_multiprocess.sh"), "x", "--", "t"],
                       capture_output=True, text=True, check=False)
  assert bad.returncode == 2 and "N must be a positive integer" in bad.stderr


def test_tpu_and_slurm_dry_runs():
  tpu = subprocess.run(["bash", str(ROOT / "launch" / "tpu_pod.sh"), "--dry-run", "pod", "zone-a",
                        "--", "train", "--workdir", "gs://b/w"], capture_output=True, text=True,
                       check=True)
  assert "tpu-vm ssh pod --zone zone-a --worker=all" in tpu.stdout
  assert "tpu-vm scp" in tpu.stdout
  slurm = subprocess.run(["bash", str(ROOT / "launch" / "slurm_gpu.sbatch"), "train", "--workdir",
                          "/w"], capture_output=True, text=True, check=True,
                         env={**os.environ, "DRY_RUN": "1"})
  assert slurm.stdout.startswith("srun --ntasks-per-node=1") and "train --workdir /w" in slurm.stdout
