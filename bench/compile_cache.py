"""A run's restart with and without XLA's persistent compilation cache (`train.compile_cache`).

For each setting, `csd-jax train` runs a config for N steps, then again for 2N (a resume: the
same programs), each in a fresh process; printed: the seconds XLA spent compiling (the run's
last log line) and the wall time of each start, side by side.

    .venv/bin/python bench/compile_cache.py                      # configs/tiny.yaml, 4 steps
    .venv/bin/python bench/compile_cache.py --config configs/demo.yaml --steps 2
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUMMARY = re.compile(r"XLA compiled (\d+) programs in ([\d.]+) s(?:, (\d+) of them loaded)?")


def _start(config: str, workdir: pathlib.Path, steps: int, cache: str) -> tuple[float, str]:
  began = time.perf_counter()
  done = subprocess.run(
      [sys.executable, "-m", "csd_jax.cli", "train", "--config", config, "--workdir",
       str(workdir), f"train.steps={steps}", f"train.compile_cache={cache}"],
      cwd=ROOT, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(done.stderr[-3000:])
  return time.perf_counter() - began, done.stderr


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
  parser.add_argument("--steps", type=int, default=4)
  args = parser.parse_args()
  print("| compile cache | start | programs | from the cache | compile s | wall s |")
  print("|---|---|---|---|---|---|")
  for cache in ("", "workdir"):
    with tempfile.TemporaryDirectory() as tmp:
      for start, steps in (("first", args.steps), ("re-run (resume)", 2 * args.steps)):
        wall, log = _start(args.config, pathlib.Path(tmp) / "run", steps, cache)
        programs, seconds, hits = SUMMARY.search(log).groups()
        print(f"| {cache or 'off'} | {start} | {programs} | {hits or 0} | {float(seconds):.1f} "
              f"| {wall:.1f} |", flush=True)


if __name__ == "__main__":
  main()
