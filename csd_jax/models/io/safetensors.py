"""Reading and writing safetensors files one tensor at a time, bfloat16 included, without torch.

safetensors' own NumPy loader cannot return bfloat16 (NumPy has no such dtype), and most LLM
checkpoints are bfloat16. The format is simple (an 8-byte header length, a JSON header of
dtypes, shapes and byte offsets, then the raw little-endian data), so this module reads tensors
straight from a memory map, using ml_dtypes for bfloat16 and float8. Host memory while loading
is about one tensor, not the model.
"""

from __future__ import annotations

import json
import os
import pathlib
import struct
from collections.abc import Iterable, Mapping

import ml_dtypes
import numpy as np

from csd_jax.errors import UserError

DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


def _read_header(path: pathlib.Path) -> tuple[int, dict]:
  with open(path, "rb") as f:
    raw = f.read(8)
    if raw.startswith(b"version "):   # "version https://git-lfs.github.com/spec/v1"
      raise UserError(f"{path}: a Git LFS pointer, not the weights; fetch them (git lfs pull) "
                      "or download the model again")
    if len(raw) != 8:
      raise UserError(f"{path}: not a safetensors file ({len(raw)} bytes); it is corrupt or "
                      "cut short: download or save it again")
    (length,) = struct.unpack("<Q", raw)
    if 8 + length > os.path.getsize(path):
      raise UserError(f"{path}: not a safetensors file (bad header length); it is corrupt or"
                      " cut short: download or save it again")
    try:
      header = json.loads(f.read(length))
      # The largest end offset: the data must reach it (a cut file ends before).
      end = int(max((info["data_offsets"][1] for name, info in header.items()
                     if name != "__metadata__"), default=0))
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, TypeError,
            IndexError, ValueError) as error:
      raise UserError(f"{path}: not a safetensors file (unreadable header); it is corrupt or "
                      "cut short: download or save it again") from error
  size = os.path.getsize(path)
  if 8 + length + end > size:
    raise UserError(f"{path}: truncated safetensors file ({size} bytes, its header needs "
                    f"{8 + length + end}); it is corrupt or cut short: download or save it again")
  return 8 + length, header


class SafetensorsCheckpoint:
  """The tensors of a checkpoint directory: one `*.safetensors` file or several with an index."""

  def __init__(self, directory: str | os.PathLike):
    directory = pathlib.Path(directory)
    index = directory / INDEX_FILE
    if index.exists():
      try:
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
      except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise UserError(f"{index}: not a safetensors index (JSON with a weight_map); fix it "
                        "or download it again") from error
      paths = [directory / f for f in files]
    else:
      paths = sorted(directory.glob("*.safetensors"))
    if not paths:
      raise UserError(f"no *.safetensors files in {directory}; a Hugging Face model "
                      "directory needs model.safetensors (or shards with an index)")
    self._where: dict[str, tuple[pathlib.Path, int, dict]] = {}
    for path in paths:
      if not path.exists():
        raise UserError(f"{path} is named in {INDEX_FILE} but missing; copy the missing "
                        "shard into the directory")
      data_start, header = _read_header(path)
      for name, info in header.items():
        if name != "__metadata__":
          self._where[name] = (path, data_start, info)

  def names(self) -> list[str]:
    return list(self._where)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._where[name][2]["shape"])

  def read(self, name: str) -> np.ndarray:
    """The tensor `name` as a NumPy array (a copy, read through a memory map)."""
    path, data_start, info = self._where[name]
    if info["dtype"] not in DTYPES:
      raise UserError(f"{name}: unsupported dtype {info['dtype']} in {path}; save the model "
                      f"in one of {', '.join(DTYPES)}")
    dtype = np.dtype(DTYPES[info["dtype"]])
    begin, end = info["data_offsets"]
    if end == begin:
      return np.zeros(info["shape"], dtype)
    raw = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start + begin,
                    shape=(end - begin,))
    return np.array(raw.view(dtype).reshape(info["shape"]))


def write_file(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
  """Write one safetensors file (atomically: a temporary file renamed into place)."""
  header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
  offset = 0
  arrays = {}
  for name, value in tensors.items():
    array = np.ascontiguousarray(value)
    if array.dtype not in _NAMES:
      raise ValueError(f"{name}: dtype {array.dtype} cannot be written to safetensors")
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    arrays[name] = array
    offset += array.nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
  tmp = pathlib.Path(str(path) + ".tmp")
  with open(tmp, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for array in arrays.values():
      f.write(array.tobytes())
  os.replace(tmp, path)


def write_sharded(directory: str | os.PathLike, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int) -> list[str]:
  """Write tensors into `model.safetensors`, or into numbered shards with an index file when
  they exceed `max_shard_bytes`; one shard is in memory at a time. Returns the files written."""
  directory = pathlib.Path(directory)
  written: list[tuple[pathlib.Path, list[str], int]] = []
  shard: dict[str, np.ndarray] = {}

  def flush() -> None:
    path = directory / f"shard-{len(written):05d}.partial"
    write_file(path, shard)
    written.append((path, list(shard), sum(a.nbytes for a in shard.values())))
    shard.clear()

  for name, array in tensors:
    if shard and sum(a.nbytes for a in shard.values()) + array.nbytes > max_shard_bytes:
      flush()
    shard[name] = array
  if shard or not written:
    flush()
  if len(written) == 1:
    os.replace(written[0][0], directory / "model.safetensors")
    return ["model.safetensors"]
  names = [f"model-{i + 1:05d}-of-{len(written):05d}.safetensors" for i in range(len(written))]
  weight_map = {}
  for file_name, (path, tensor_names, _) in zip(names, written):
    os.replace(path, directory / file_name)
    weight_map.update({tensor: file_name for tensor in tensor_names})
  index = {"metadata": {"total_size": sum(size for _, _, size in written)},
           "weight_map": weight_map}
  (directory / INDEX_FILE).write_text(json.dumps(index, indent=2))
  return names + [INDEX_FILE]
