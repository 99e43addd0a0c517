"""The run's metrics: `metrics.jsonl` and TensorBoard event files, written and read; optionally
Weights & Biases too (`csd_jax.metrics.wandb_logger`).

`MetricsWriter` adds each logged step to both files; `read_metrics` reads the JSONL back and
`read_tensorboard_scalars` the event files (the codec is in `csd_jax.metrics.tfevents`). Paths
are `etils.epath` paths: a local directory, or object storage (`gs://bucket/run`).

On a local disk each line is appended and flushed as written. Object stores have neither append
nor seek: there a file's whole content is kept in memory and the whole object is rewritten on
flush (as TensorFlow's GCS file writer does), at most every `OBJECT_FLUSH_SECONDS`, at close,
and whenever `flush()` is called (the loop does before each checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from etils import epath

from csd_jax.runtime import paths
from csd_jax.metrics.tfevents import decode_records, decode_scalars, encode_event, encode_record

if TYPE_CHECKING:
  from csd_jax.config import WandbConfig

# Each flush to an object store uploads the whole file again, so not every line: a few seconds
# bound what a kill loses (only lines after the last checkpoint, which the resumed run logs
# again) while a run logging every step uploads a small object a few times a minute, not 10/s
# (GCS also throttles writes to one object beyond about one a second).
OBJECT_FLUSH_SECONDS = 5.0
_clock = time.monotonic   # the flush interval's clock (tests move it by hand)


def _appendable(path: epath.Path) -> bool:
  """Whether `path` is on a local file system (append, seek); `gs://`, `s3://`... are not."""
  return not paths.is_remote(path)


def _json_value(value: Any) -> Any:
  if isinstance(value, int) and not isinstance(value, bool):
    return value
  value = float(value)
  return value if math.isfinite(value) else None


class _LocalFile:
  """A local file, appended to and flushed per write: a killed run keeps every finished write.

  `end_lines`: a file left ending in half a line (a killed run) gets that line ended first.
  """

  def __init__(self, path: epath.Path, *, end_lines: bool):
    self._file = open(os.fspath(path), "a+b")  # "a": every write goes to the end
    if end_lines and self._file.seek(0, os.SEEK_END):
      self._file.seek(-1, os.SEEK_END)
      if self._file.read(1) != b"\n":
        self._file.write(b"\n")

  def write(self, data: bytes) -> None:
    self._file.write(data)
    self._file.flush()

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class _ObjectFile:
  """A file on object storage: its whole content in memory (the existing object's first, so a
  resumed run continues it), the whole object rewritten on flush.

  Writes flush when `OBJECT_FLUSH_SECONDS` have passed since the last flush (the first write
  at once, so the object exists early); `flush()` and `close()` always do.
  """

  def __init__(self, path: epath.Path, *, end_lines: bool):
    self.path = path
    self._content = bytearray(path.read_bytes() if path.exists() else b"")
    self._dirty = False
    if end_lines and self._content and not self._content.endswith(b"\n"):
      self._content += b"\n"   # cannot happen with whole-object writes, unless written by hand
      self._dirty = True
    self._flushed = -math.inf
    self._closed = False

  def write(self, data: bytes) -> None:
    self._content += data
    self._dirty = True
    if _clock() - self._flushed >= OBJECT_FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    if self._dirty:
      self.path.write_bytes(bytes(self._content))
      self._dirty = False
    self._flushed = _clock()

  def close(self) -> None:
    if not self._closed:
      self._closed = True
      self.flush()


def _open(path: epath.Path, *, end_lines: bool = False) -> _LocalFile | _ObjectFile:
  return (_LocalFile if _appendable(path) else _ObjectFile)(path, end_lines=end_lines)


class MetricsWriter:
  """Adds `{"step": s, **metrics}` lines to `workdir/metrics.jsonl` and TensorBoard scalars.

  On a local disk each JSONL line is flushed as written (a killed run keeps every finished
  line); on object storage the files are rewritten whole every few seconds and on `flush()`.
  NaN/inf become `null`. Each writer opens a new event file under `workdir/tensorboard/` (a
  resumed run adds one beside the old). `enabled=False` (non-zero processes of a multi-host run)
  writes nothing. `wandb` (a `metrics.wandb` section with a project; `run_config` is shown with
  the run) also logs every step to Weights & Biases; W&B failing only ever warns.
  """

  _uid = 0

  def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool = True,
               wandb: WandbConfig | None = None, run_config: Mapping[str, Any] | None = None):
    self.enabled = enabled
    self._jsonl = self._events = self._wandb = None
    if not enabled:
      return
    workdir = epath.Path(workdir)
    (workdir / "tensorboard").mkdir(parents=True, exist_ok=True)
    self._jsonl = _open(workdir / "metrics.jsonl", end_lines=True)
    MetricsWriter._uid += 1
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{MetricsWriter._uid:06d}")  # zero-padded: file names sort in order
    self._events = _open(workdir / "tensorboard" / name)
    self._events.write(encode_record(encode_event(time.time(), 0, file_version="brain.Event:2")))
    if wandb is not None and wandb.project:
      from csd_jax.metrics.wandb_logger import WandbLogger   # imports wandb: only when asked

      self._wandb = WandbLogger.open(wandb, workdir, run_config)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs `metrics` (scalars: Python/NumPy/JAX numbers) at `step` to every output."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row, allow_nan=False).encode() + b"\n")
    scalars = {k: float(v) for k, v in metrics.items()}
    self._events.write(encode_record(encode_event(time.time(), int(step), scalars=scalars)))
    if self._wandb is not None:
      self._wandb.log(int(step), scalars)

  def flush(self) -> None:
    """Everything written so far is stored (on object storage: the objects rewritten)."""
    for f in (self._jsonl, self._events):
      if f is not None:
        f.flush()

  def close(self, *, failed: bool = False) -> None:
    """Stores and closes every output (idempotent); `failed`: the run ends with an error."""
    try:
      for f in (self._jsonl, self._events):
        if f is not None:
          f.close()
    finally:
      if self._wandb is not None:
        self._wandb.finish(failed=failed)
      self._jsonl = self._events = self._wandb = None
      self.enabled = False

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
    self.close(failed=exc_type is not None and not issubclass(exc_type, KeyboardInterrupt))


def read_metrics(workdir: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """The `metrics.jsonl` rows ordered by step; for a step logged twice the last line wins.

  Lines that do not parse (half a line from a killed run) are skipped.
  """
  path = epath.Path(workdir) / "metrics.jsonl"
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
  path = epath.Path(path)
  scalars: dict[str, list[tuple[int, float]]] = {}
  files = sorted(path.glob("*tfevents*"), key=lambda f: f.name) if path.is_dir() else [path]
  for file in files:
    for record in decode_records(file.read_bytes(), name=str(file)):
      step, values = decode_scalars(record)
      for tag, value in values:
        scalars.setdefault(tag, []).append((step, value))
  return scalars
