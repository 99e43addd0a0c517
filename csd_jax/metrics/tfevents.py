"""The TensorBoard event-file codec, by hand (no TensorFlow, no `tensorboard` package).

An event file is TFRecord framing (uint64 length, masked crc32c of it, data, masked crc32c of
the data) around `Event` protos encoded here: Event{wall_time=1 double, step=2 int64,
file_version=3 string, summary=5}; Summary{value=1}; Value{tag=1 string, simple_value=2 float}.
crc32c is table-driven Python: the records are small and few, and it keeps the dependency out.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterator, Mapping
from typing import Any

from csd_jax.errors import UserError


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


def encode_event(wall_time: float, step: int, *, file_version: str | None = None,
                 scalars: Mapping[str, float] | None = None) -> bytes:
  """One serialised `Event` proto: a file-version header or `simple_value` scalars."""
  out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
  if file_version is not None:
    out += _field(3, 2, file_version.encode())
  if scalars:
    values = b"".join(
        _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, _float32(float(v))))
        for tag, v in scalars.items())
    out += _field(5, 2, values)
  return out


def encode_record(data: bytes) -> bytes:
  """`data` in TFRecord framing, ready to append to an event file."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", masked_crc32c(header)) + data
          + struct.pack("<I", masked_crc32c(data)))


def decode_records(data: bytes, *, name: str = "event file") -> Iterator[bytes]:
  """The records of TFRecord-framed `data`, each CRC-checked (UserError naming `name`).

  A record cut short (a killed writer) ends the data, as in TensorBoard.
  """
  i = 0
  while len(data) - i >= 16:
    header, (length,) = data[i:i + 8], struct.unpack("<Q", data[i:i + 8])
    if len(data) - i < 16 + length:
      return
    record = data[i + 12:i + 12 + length]
    crcs = struct.unpack("<II", data[i + 8:i + 12] + data[i + 12 + length:i + 16 + length])
    if crcs != (masked_crc32c(header), masked_crc32c(record)):
      raise UserError(f"{name}: bad crc in the record at byte {i}; the event file is corrupt:"
                      " move it out of the way")
    i += 16 + len(record)
    yield record


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


def decode_scalars(event: bytes) -> tuple[int, list[tuple[str, float]]]:
  """(step, [(tag, value), ...]) of one serialised `Event`; only `simple_value`s are read."""
  fields = _fields(event)
  step = next((v for n, v in fields if n == 2), 0)
  step -= (step >> 63) << 64  # int64 sign
  scalars = []
  for summary in (v for n, v in fields if n == 5):
    for value in (dict(_fields(v)) for n, v in _fields(summary) if n == 1):
      if 2 in value:
        scalars.append((value[1].decode(), struct.unpack("<f", value[2])[0]))
  return step, scalars
