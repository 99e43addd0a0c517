"""Reading record files: JSONL, JSON (a list, {"data": [...]} or {"instances": [...]}) and
Parquet, one dict a record. `{"instances": [...]}` is the layout of google-research
`speculative_kd`'s task files (gsm_1k_train.json, summ_1k_train.json, mt_test.json, ...), which
its scripts read with `load_dataset("json", field="instances")`.

Pure Python (Parquet through pyarrow, imported only for a Parquet file): the TFDS builders
and evaluation both read files through here, so evaluation needs neither grain nor
tensorflow-datasets.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from csd_jax.runtime import paths
from csd_jax.errors import UserError


def read_json_records(path: str | os.PathLike) -> Iterator[tuple[str, Mapping[str, Any]]]:
  """(key, record) for every record of a JSONL, JSON (a list, {"data": [...]} or
  {"instances": [...]}) or Parquet file.

  Raises:
    UserError: the file does not exist or cannot be parsed.
  """
  path = paths.as_path(path)   # a local file or an object (gs://...)
  if not path.is_file():
    raise UserError(f"data file {path} does not exist; pass the path of a JSONL, JSON or "
                    "Parquet file")
  suffix = path.suffix.lower()
  if suffix == ".parquet":
    try:
      import pyarrow
      import pyarrow.parquet as pq
    except ImportError as error:
      raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from error
    try:
      with path.open("rb") as f:
        table = pq.read_table(f)
    except (pyarrow.ArrowException, OSError) as error:
      raise UserError(f"{path}: not a readable Parquet file ({_first_line(error)}); it is "
                      "corrupt or cut short: write or download it again") from error
    for i, row in enumerate(table.to_pylist()):
      yield f"{path.name}:{i}", row
    return
  if suffix == ".json":
    raw = path.read_bytes()
    try:
      data = json.loads(_utf8(raw, path, 1))
    except json.JSONDecodeError as error:
      raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix the file, or "
                      "name it .jsonl if it holds one record a line") from error
    rows = (data.get("data", data.get("instances")) if isinstance(data, dict) else data)
    if not isinstance(rows, list):
      raise UserError(f"{path}: expected a JSON list of records (or {{'data': [...]}}, "
                      "{'instances': [...]}); write the records in such a list")
    for i, row in enumerate(rows):
      yield f"{path.name}:{i}", row
    return
  # Bytes, decoded a line at a time: a bad byte's error names its line.
  with path.open("rb") as f:
    for line_number, raw_line in enumerate(f, 1):
      line = _utf8(raw_line, path, line_number)
      if line.strip():
        try:
          yield f"{path.name}:{line_number}", json.loads(line)
        except json.JSONDecodeError as error:
          raise UserError(f"{path}:{line_number}: not valid JSON ({error.msg}); write one JSON "
                          "object a line") from error


def _utf8(raw: bytes, path: paths.PathLike, line_number: int) -> str:
  """`raw` (the text from line `line_number` on) as UTF-8, without a byte-order mark.

  Raises:
    UserError: naming the file, the line and the byte, when `raw` is not UTF-8.
  """
  try:
    return raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
  except UnicodeDecodeError as error:
    line = line_number + raw[:error.start].count(b"\n")
    raise UserError(f"{path}:{line}: not UTF-8 (byte 0x{raw[error.start]:02x}); convert the "
                    "file to UTF-8, e.g. iconv -f latin1 -t utf-8") from None


def _first_line(error: Exception) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0]
