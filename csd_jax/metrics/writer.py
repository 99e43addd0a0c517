"""The run's metrics on disk: `metrics.jsonl` and TensorBoard event files, written and read.

`MetricsWriter` appends each logged step to both; `read_metrics` reads the JSONL back and
`read_tensorboard_scalars` the event files (the codec is in `csd_jax.metrics.tfevents`).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import socket
import time
from collections.abc import Mapping
from typing import Any

from csd_jax.metrics.tfevents import decode_records, decode_scalars, encode_event, encode_record


def _json_value(value: Any) -> Any:
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  value = float(value)
  return value if math.isfinite(value) else None


class MetricsWriter:
  """Appends `{"step": s, **metrics}` lines to `workdir/metrics.jsonl` and TensorBoard scalars.

  Each JSONL line is flushed as written (a killed run keeps every finished line); NaN/inf become
  `null`. Each writer opens a new event file under `workdir/tensorboard/` (a resumed run adds one
  beside the old). `enabled=False` (non-zero processes of a multi-host run) writes nothing.
  """

  _uid = 0

  def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._events = None
    if not enabled:
      return
    workdir = pathlib.Path(workdir)
    (workdir / "tensorboard").mkdir(parents=True, exist_ok=True)
    self._jsonl = open(workdir / "metrics.jsonl", "a+b")  # "a": every write goes to the end
    if self._jsonl.seek(0, os.SEEK_END):
      self._jsonl.seek(-1, os.SEEK_END)
      if self._jsonl.read(1) != b"\n":  # a killed run left half a line: end it
        self._jsonl.write(b"\n")
    MetricsWriter._uid += 1
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{MetricsWriter._uid:06d}")  # zero-padded: file names sort in order
    self._events = open(workdir / "tensorboard" / name, "ab")
    self._events.write(encode_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
    self._events.flush()

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs `metrics` (scalars: Python/NumPy/JAX numbers) at `step` to both outputs."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row, allow_nan=False).encode() + b"\n")
    self._jsonl.flush()
    scalars = {k: float(v) for k, v in metrics.items()}
    self._events.write(encode_record(encode_event(time.time(), int(step), scalars=scalars)))
    self._events.flush()

  def close(self) -> None:
    """Closes both files (idempotent)."""
    for f in (self._jsonl, self._events):
      if f is not None:
        f.close()
    self._jsonl = self._events = None
    self.enabled = False

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The `metrics.jsonl` rows ordered by step; for a step logged twice the last line wins.

  Lines that do not parse (half a line from a killed run) are skipped.
  """
  path = pathlib.Path(workdir) / "metrics.jsonl"
  rows: dict[int, dict[str, Any]] = {}
  if path.exists():
    for line in path.read_text(encoding="utf-8").splitlines():
      try:
        row = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(row, dict) and "step" in row:
        rows[int(row["step"])] = row
  return [rows[s] for s in sorted(rows)]


def read_tensorboard_scalars(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
  """`{tag: [(step, value), ...]}` from an event file, or every event file of a directory.

  Files are read in name order (creation order for this writer's names); each record's CRCs
  are checked (ValueError on a mismatch); a record cut short ends its file. Only
  `simple_value` scalars are read.
  """
  path = pathlib.Path(path)
  scalars: dict[str, list[tuple[int, float]]] = {}
  for file in sorted(path.glob("*tfevents*")) if path.is_dir() else [path]:
    for record in decode_records(file.read_bytes(), name=str(file)):
      step, values = decode_scalars(record)
      for tag, value in values:
        scalars.setdefault(tag, []).append((step, value))
  return scalars
