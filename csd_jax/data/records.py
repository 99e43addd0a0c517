"""Reading record files: JSONL, JSON (a list, or {"data": [...]}) and Parquet, one dict a record.

Pure Python (Parquet through pyarrow, imported only for a Parquet file): the TFDS builders
and evaluation both read files through here, so evaluation needs neither grain nor
tensorflow-datasets.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

from csd_jax.errors import UserError


def read_json_records(path: str | os.PathLike) -> Iterator[tuple[str, Mapping[str, Any]]]:
  """(key, record) for every record of a JSONL, JSON (a list, or {"data": [...]}) or Parquet file.

  Raises:
    UserError: the file does not exist or cannot be parsed.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f"data file {path} does not exist; pass the path of a JSONL, JSON or "
                    "Parquet file")
  suffix = path.suffix.lower()
  if suffix == ".parquet":
    try:
      import pyarrow.parquet as pq
    except ImportError as error:
      raise UserError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from error
    for i, row in enumerate(pq.read_table(path).to_pylist()):
      yield f"{path.name}:{i}", row
    return
  if suffix == ".json":
    try:
      data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
      raise UserError(f"{path}:{error.lineno}: not valid JSON ({error.msg}); fix the file, or "
                      "name it .jsonl if it holds one record a line") from error
    rows = data.get("data") if isinstance(data, dict) else data
    if not isinstance(rows, list):
      raise UserError(f"{path}: expected a JSON list of records (or {{'data': [...]}}); write "
                      "the records in such a list")
    for i, row in enumerate(rows):
      yield f"{path.name}:{i}", row
    return
  with open(path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, 1):
      if line.strip():
        try:
          yield f"{path.name}:{line_number}", json.loads(line)
        except json.JSONDecodeError as error:
          raise UserError(f"{path}:{line_number}: not valid JSON ({error.msg}); write one JSON "
                          "object a line") from error
