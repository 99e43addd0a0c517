"""Ctrl-C at random points of a run's start (model build, XLA compilation) and first steps.

Each try starts `csd-jax train` on the tiny config (no compile cache: every start compiles),
sends SIGINT a random 0-12 s after the run took its workdir lock, and prints the phase it hit,
the exit status (130: saved and stopped), whether a traceback was shown and the checkpoints
left. Before the handler was installed ahead of compilation, 5 tries in 7 crashed.

    .venv/bin/python bench/ctrl_c.py --tries 7
"""

from __future__ import annotations

import argparse
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _default_sigint() -> None:
  # A shell starts background jobs with SIGINT ignored; a terminal's Ctrl-C is not.
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tries", type=int, default=7)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  rng = random.Random(args.seed)
  print("| try | SIGINT after s | phase | exit | traceback | checkpoints |")
  print("|---|---|---|---|---|---|")
  for i in range(args.tries):
    workdir = pathlib.Path(tempfile.mkdtemp()) / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "csd_jax.cli", "train", "--config", "configs/tiny.yaml",
         "--workdir", str(workdir), "train.steps=100000", "train.log_every=1",
         "train.compile_cache="], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, preexec_fn=_default_sigint)
    while not (workdir / ".lock").exists():
      time.sleep(0.01)
    delay = rng.uniform(0.0, 12.0)
    time.sleep(delay)
    phase = "stepping" if (workdir / "metrics.jsonl").exists() else "building / compiling"
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    saved = (sorted(p.name for p in (workdir / "checkpoints").iterdir())
             if (workdir / "checkpoints").exists() else [])
    print(f"| {i} | {delay:.1f} | {phase} | {proc.returncode} | {'Traceback' in out} | "
          f"{', '.join(saved) or 'none'} |", flush=True)
    shutil.rmtree(workdir.parent, ignore_errors=True)


if __name__ == "__main__":
  main()
