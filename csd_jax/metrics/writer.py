"""Training metrics: a JSONL + TensorBoard writer, a TensorBoard reader, a progress bar, MFU.

TensorBoard event files are written by hand (no TensorFlow, no `tensorboard` package): TFRecord
framing (uint64 length, masked crc32c of it, data, masked crc32c of the data) around `Event`
protos encoded here (Event{wall_time=1 double, step=2 int64, file_version=3 string, summary=5};
Summary{value=1}; Value{tag=1 string, simple_value=2 float}). crc32c is table-driven Python.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import re
import socket
import struct
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO


# crc32c (Castagnoli, reflected polynomial 0x82F63B78) and the TFRecord masking of it.
def _crc_entry(c: int) -> int:
  for _ in range(8):
    c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
  return c


_CRC_TABLE = [_crc_entry(n) for n in range(256)]


def crc32c(data: bytes) -> int:
  """The CRC-32C checksum of `data` (crc32c(b"123456789") == 0xE3069283)."""
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _CRC_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  """The TFRecord checksum: crc32c rotated right by 15 bits plus 0xA282EAD8 (mod 2**32)."""
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
  value &= 0xFFFFFFFFFFFFFFFF  # negative int64 -> two's complement, as protobuf does
  out = bytearray()
  while value > 0x7F:
    out.append((value & 0x7F) | 0x80)
    value >>= 7
  out.append(value)
  return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
  if wire == 2:
    payload = _varint(len(payload)) + payload
  return _varint(number << 3 | wire) + payload


def _float32(value: float) -> bytes:
  try:
    return struct.pack("<f", value)
  except OverflowError:  # finite but beyond float32: TensorBoard would see +-inf anyway
    return struct.pack("<f", math.copysign(math.inf, value))


def _event(wall_time: float, step: int, *, file_version: str | None = None,
           scalars: Mapping[str, float] | None = None) -> bytes:
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _field(3, 2, file_version.encode())
  if scalars:
    values = b"".join(
        _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, _float32(float(v))))
        for tag, v in scalars.items())
    out += _field(5, 2, values)
  return out


def _record(data: bytes) -> bytes:
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


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
            f"{os.getpid()}.{MetricsWriter._uid}")
    self._events = open(workdir / "tensorboard" / name, "ab")
    self._events.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
    self._events.flush()

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Logs `metrics` (scalars: Python/NumPy/JAX numbers) at `step` to both outputs."""
    if not self.enabled:
      return
    row = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(row, allow_nan=False).encode() + b"\n")
    self._jsonl.flush()
    scalars = {k: float(v) for k, v in metrics.items()}
    self._events.write(_record(_event(time.time(), int(step), scalars=scalars)))
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


def _varint_at(data: bytes, i: int) -> tuple[int, int]:
  value = shift = 0
  while True:
    byte = data[i]
    value, i, shift = value | (byte & 0x7F) << shift, i + 1, shift + 7
    if byte < 0x80:
      return value, i


def _fields(data: bytes) -> list[tuple[int, Any]]:
  """Decodes one protobuf message into (field number, raw value) pairs."""
  out, i = [], 0
  while i < len(data):
    key, i = _varint_at(data, i)
    if key & 7 == 0:
      value, i = _varint_at(data, i)
    else:
      size, i = {1: (8, i), 5: (4, i)}.get(key & 7) or _varint_at(data, i)
      value, i = data[i:i + size], i + size
    out.append((key >> 3, value))
  return out


def read_tensorboard_scalars(path: str | os.PathLike[str]) -> dict[str, list[tuple[int, float]]]:
  """`{tag: [(step, value), ...]}` from an event file, or every event file of a directory.

  Files are read in name order (creation order for this writer's names); each record's CRCs
  are checked (ValueError on a mismatch). Only `simple_value` scalars are read.
  """
  path = pathlib.Path(path)
  scalars: dict[str, list[tuple[int, float]]] = {}
  for file in sorted(path.glob("*tfevents*")) if path.is_dir() else [path]:
    data, i = file.read_bytes(), 0
    while len(data) - i >= 16:
      header, (length,) = data[i:i + 8], struct.unpack("<Q", data[i:i + 8])
      if len(data) - i < 16 + length:
        break  # a record cut short by a killed writer ends the file, as in TensorBoard
      record = data[i + 12:i + 12 + length]
      crcs = struct.unpack("<II", data[i + 8:i + 12] + data[i + 12 + length:i + 16 + length])
      if crcs != (masked_crc32c(header), masked_crc32c(record)):
        raise ValueError(f"{file}: bad crc in the record at byte {i}")
      i += 16 + len(record)
      event = _fields(record)
      step = next((v for n, v in event if n == 2), 0)
      step -= (step >> 63) << 64  # int64 sign
      for summary in (v for n, v in event if n == 5):
        for value in (dict(_fields(v)) for n, v in _fields(summary) if n == 1):
          if 2 in value:
            scalars.setdefault(value[1].decode(), []).append(
                (step, struct.unpack("<f", value[2])[0]))
  return scalars


# bf16 dense peak FLOP/s of one device, by `device.device_kind` (case-insensitive); first match
# wins, so the specific patterns come first ("H100 PCIe" before "H100", "v5 lite" before "v5").
_PEAK_BF16 = [
    (r"h100 pcie", 756e12), (r"h100", 989e12), (r"h200", 989e12), (r"a100", 312e12),
    (r"\bl4\b", 121e12), (r"tpu v4\b", 275e12), (r"tpu v5 ?(lite|e)\b", 197e12),
    (r"tpu v5p?\b", 459e12), (r"tpu v6 ?(lite|e)?\b", 918e12),
]


def peak_flops_per_device(device: Any) -> float | None:
  """bf16 dense peak FLOP/s of one JAX device, or None for a CPU or an unknown kind.

  Per device: for a step that runs on several devices the total peak is this times the device
  count (`len(mesh.devices.flat)`), which the caller multiplies in.
  """
  if getattr(device, "platform", "") == "cpu":
    return None
  kind = str(getattr(device, "device_kind", "")).lower()
  return next((peak for pattern, peak in _PEAK_BF16 if re.search(pattern, kind)), None)


def mfu(flops_per_step: float, step_time_s: float, peak_flops: float | None) -> float | None:
  """Model FLOP utilisation as a fraction: flops_per_step / step_time_s / peak_flops.

  `flops_per_step` and `peak_flops` must cover the same devices (global FLOPs with the total
  peak). None when the peak is unknown or a time or peak is not positive.
  """
  if peak_flops is None or peak_flops <= 0 or step_time_s <= 0:
    return None
  return flops_per_step / step_time_s / peak_flops


def transformer_flops_per_token(num_params_matmul: int, num_layers: int, seq_len: int,
                                hidden: int, *, backward: bool) -> float:
  """Model FLOPs per token of a decoder transformer (the PaLM appendix B convention).

  Forward: 2*N for the matmul weights N (embedding lookups excluded; a tied or untied LM head
  included) plus 4*L*T*D for attention scores and weighted values over T keys of width D in L
  layers (causal masking not subtracted). With backward (training) both triple: 6*N + 12*L*T*D.
  Multiply by tokens per step for `mfu`; rematerialisation is not counted (it is not model work).
  """
  factor = 3 if backward else 1
  return factor * (2.0 * num_params_matmul + 4.0 * num_layers * seq_len * hidden)


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressBar:
  """A one-line progress display: step/total, loss, tokens/s, MFU and ETA.

  On a TTY the line is redrawn in place (carriage return); otherwise each shown update is its own
  line. Updates closer than `min_interval_s` to the last shown one are held back (the final step
  and `close()` show them). The ETA is the mean step time since the first update (excluded: it
  includes compilation) times the steps left. `start_step` is where a resumed run starts.
  """

  def __init__(self, total_steps: int, *, start_step: int = 0, stream: TextIO = sys.stderr,
               min_interval_s: float = 0.5):
    self.total_steps, self.stream, self.min_interval_s = total_steps, stream, min_interval_s
    self._tty = bool(getattr(stream, "isatty", lambda: False)())
    self._first: tuple[int, float] | None = None  # (step, time) of the first update
    self._last_shown = -math.inf  # time.monotonic() of the last shown update
    self._width, self._pending = 0, None
    self.start_step = start_step  # informational: the ETA is measured from the first update

  def update(self, step: int, *, loss: float, tokens_per_s: float,
             mfu: float | None = None) -> None:
    """Records `step` (done) with its loss, throughput and MFU fraction; maybe redraws."""
    now = time.monotonic()
    if self._first is None:
      self._first = (step, now)
    first_step, first_time = self._first
    eta = "?"
    if step > first_step:
      eta = _duration((now - first_time) / (step - first_step) * max(self.total_steps - step, 0))
    parts = [f"step {step}/{self.total_steps}", f"loss {float(loss):.4f}",
             f"{float(tokens_per_s):,.0f} tokens/s"]
    if mfu is not None:
      parts.append(f"MFU {100 * float(mfu):.1f}%")
    self._pending = " | ".join(parts + [f"ETA {eta}"])
    if now - self._last_shown >= self.min_interval_s or step >= self.total_steps:
      self._show()
      self._last_shown = now

  def _show(self) -> None:
    line, self._pending = self._pending, None
    if self._tty:
      self.stream.write("\r" + line.ljust(self._width))
      self._width = len(line)
    else:
      self.stream.write(line + "\n")
    self.stream.flush()

  def close(self) -> None:
    """Shows the last update if it was held back and ends the line."""
    if self._pending is not None:
      self._show()
    if self._tty and self._width:
      self.stream.write("\n")
      self.stream.flush()
    self._width = 0
