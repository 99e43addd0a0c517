"""Every shipped config compiled for the TPU slice it names (`mesh.slice`), in one table.

    PYTHONPATH=. python bench/tpu_fit.py                   # every configs/*.yaml, one at a time
    PYTHONPATH=. python bench/tpu_fit.py --only tiny,gpt2_xl_to_gpt2_dolly   # these, in order

Each config runs `csd-jax compile` in its own process (a 7B pair's compile holds about 18 GB of
host memory: never two at once on a 24 GB machine), and the table gives per chip: the teacher's
weights, the student's parameters, the optimizer state, the train step's temporaries and total
against the chip's HBM, whether every program fits, the headroom, and the compile time. A config
whose models cannot be resolved here (the demos' converted assets before `csd-jax demo` made
them) is listed with the reason. Needs libtpu (`pip install 'csd-jax[tpu]'`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

GiB = 2**30
ROOT = pathlib.Path(__file__).resolve().parents[1]


def _gib(n: float | None) -> str:
  return "-" if n is None else f"{n / GiB:.2f}"


def fit_row(config: pathlib.Path, out: pathlib.Path, timeout: float) -> dict:
  """Compile one config in a subprocess; its report.json, or the one-line reason it failed."""
  start = time.perf_counter()
  done = subprocess.run(
      [sys.executable, "-m", "csd_jax.cli", "compile", "--config", str(config), "--out",
       str(out)], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
  seconds = time.perf_counter() - start
  if done.returncode < 0:   # the kernel's OOM killer sends SIGKILL
    return {"config": config.stem, "seconds": seconds,
            "error": f"the compile was killed by signal {-done.returncode} (host memory?)"}
  if done.returncode != 0 or not (out / "report.json").exists():
    lines = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()
    return {"config": config.stem, "error": lines[-1][:160], "seconds": seconds}
  return {"config": config.stem, "seconds": seconds,
          **json.loads((out / "report.json").read_text())}


def format_row(row: dict) -> str:
  if "error" in row:
    return f"| {row['config']} | | not compiled: {row['error']} | | | | | | | {row['seconds']:.0f} |"
  parts = row["inputs_per_chip"]
  train = row["programs"][0]
  memory = train["memory"]
  hbm = row["hbm_bytes_per_chip"]
  total = memory.get("total")
  headroom = ("-" if total is None
              else f"{(hbm - total) / GiB:.2f} ({100 * (hbm - total) / hbm:.0f}%)")
  compile_s = sum(p["compile_s"] for p in row["programs"])
  return (f"| {row['config']} | {row['slice']} | {_gib(parts['teacher weights'])} | "
          f"{_gib(parts['student parameters'])} | {_gib(parts['optimizer state'])} | "
          f"{_gib(memory.get('temporaries'))} | {_gib(total)} | "
          f"{'yes' if row['fits'] else 'no'} | {headroom} | {compile_s:.0f} / {row['seconds']:.0f} |")


HEADER = ("| config | slice | teacher GiB/chip | student params | optimizer state | train-step "
          "temporaries | train-step total | fits | headroom GiB | compile s (programs / "
          "process) |\n|---|---|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="",
                      help="comma-separated config names (file stems), compiled in that order")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per config")
  parser.add_argument("--out", help="keep each config's report.json and HLO under this")
  args = parser.parse_args(argv)
  configs = sorted((ROOT / "configs").glob("*.yaml"))
  if args.only:
    known = {p.stem: p for p in configs}
    names = args.only.split(",")
    if unknown := [n for n in names if n not in known]:
      parser.error(f"--only: no configs/{unknown[0]}.yaml; known: {', '.join(known)}")
    configs = [known[n] for n in names]
  root = pathlib.Path(args.out or tempfile.mkdtemp(prefix="tpu_fit_"))
  print(HEADER, flush=True)
  start = time.perf_counter()
  for config in configs:
    try:
      row = fit_row(config, root / config.stem, args.timeout)
    except subprocess.TimeoutExpired:
      row = {"config": config.stem, "error": f"compile over {args.timeout:.0f} s",
             "seconds": args.timeout}
    print(format_row(row), flush=True)
  print(f"\n{len(configs)} configs in {time.perf_counter() - start:.0f} s; reports in {root}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
