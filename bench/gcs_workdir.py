"""The same run with its workdir on local disk and in a bucket (`--workdir gs://...`), side by
side: wall time of `csd-jax train` and of `csd-jax export` (best of --repeats, alternating),
and their ratio.

The bucket is a GCS server on 127.0.0.1 (tests/gcs_emulator.py: PyPI's gcp-storage-emulator,
one request at a time, in memory), so the ratio measures csd-jax's object-store path (whole-
object metrics uploads, OCDBT through TensorStore's HTTP driver, the checksums from object
metadata, fresh listings), not a real bucket's network.

    .venv/bin/python bench/gcs_workdir.py                       # configs/tiny.yaml, 8 steps
    .venv/bin/python bench/gcs_workdir.py --steps 20 --every 5
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from gcs_emulator import GcsEmulator  # noqa: E402 (the test bed, not a package)


def _timed(env: dict[str, str], *args: str) -> float:
  began = time.perf_counter()
  done = subprocess.run([sys.executable, "-m", "csd_jax.cli", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(done.stderr[-3000:])
  return time.perf_counter() - began


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--every", type=int, default=2, help="checkpoint.every")
  parser.add_argument("--repeats", type=int, default=3, help="runs of each (best kept)")
  args = parser.parse_args()
  emulator = GcsEmulator(("csd-bench",)).start()
  env = {**os.environ, **emulator.env, "JAX_PLATFORMS": "cpu"}
  train = ["train", "--config", args.config, f"train.steps={args.steps}",
           f"checkpoint.every={args.every}", "train.compile_cache="]
  places = {"local disk": ("{tmp}/run{i}", "{tmp}/export{i}"),
            "gs:// (emulator)": ("gs://csd-bench/run{i}", "gs://csd-bench/export{i}")}
  best = {name: [float("inf"), float("inf")] for name in places}
  try:
    with tempfile.TemporaryDirectory() as tmp:
      for i in range(args.repeats):   # alternating, best of each: no side gets the cold start
        for name, (workdir, out) in places.items():
          workdir, out = workdir.format(tmp=tmp, i=i), out.format(tmp=tmp, i=i)
          seconds = (_timed(env, *train, "--workdir", workdir),
                     _timed(env, "export", "--workdir", workdir, "--out", out))
          best[name] = [min(b, t) for b, t in zip(best[name], seconds)]
  finally:
    emulator.stop()
  rows = [(name, *seconds) for name, seconds in best.items()]
  base_train, base_export = rows[0][1], rows[0][2]
  print(f"{args.config}, {args.steps} steps, a checkpoint every {args.every}; one process; "
        f"best of {args.repeats}")
  print(f"{'workdir':<18} {'train s':>8} {'ratio':>6} {'export s':>9} {'ratio':>6}")
  for name, train_s, export_s in rows:
    print(f"{name:<18} {train_s:8.1f} {train_s / base_train:6.2f} {export_s:9.1f} "
          f"{export_s / base_export:6.2f}")


if __name__ == "__main__":
  main()
