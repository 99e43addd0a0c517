"""TFDS builders that cache instruction and text datasets as ArrayRecord files (no TensorFlow).

- `InstructionFiles`: local JSONL / JSON / Parquet files of Dolly-form records, prompt /
  response pairs (field aliases in `instruct.records_from_json`) or chat conversations (a
  `messages` list, stored as JSON text: `conversation`), one or more files per split;
  also the evaluation sets (Dolly test, Self-Instruct, Vicuna, S-NI, UnNI) given as local files.
- `TextFiles`: local JSONL / JSON / Parquet files of `{"text": ...}`, for the LM term.
- `PairFiles`: chat pairs (a prompt, the teacher's and the student's response) in the official
  reformat.py's `train.json` or the other forms of `pairs.pair_record` (`data.source: pairs`).
- `MiniLLMDolly`: MiniLLM's own Dolly files (`raw.jsonl`), split as its
  `process_data_dolly.py`: the first 1000 records for model selection, the rest for training
  (the official split, `data.source: minillm`).
- `Dolly`: databricks-dolly-15k from the Hugging Face hub (online) or a local copy, re-split
  with a seeded shuffle into train / valid / test (500 valid, 500 test; `data.source: dolly`).

`build(...)` prepares a builder once under `data_dir` (a cache keyed by the sources' paths,
sizes and modification times) and returns a random-access data source per split, which the
Grain loader reads. Records come back with their text fields as UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from csd_jax.runtime import paths
from csd_jax.data import minillm
from csd_jax.data.instruct import records_from_json, text_from_json
from csd_jax.data.pairs import PAIR_FIELDS, pair_record
from csd_jax.data.records import read_json_records
from csd_jax.errors import UserError

DOLLY_HUB_ID = "databricks/databricks-dolly-15k"
DOLLY_EVAL_SIZE = 500
DOLLY_SPLIT_SEED = 1234

logger = logging.getLogger("csd_jax.data")


class _NoCustomConfigWarning(logging.Filter):
  """Drops TFDS's "Using custom data configuration" warning: every builder here names its
  config after its sources' fingerprint, by design, so the warning says nothing."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Using custom data configuration")


logging.getLogger("absl").addFilter(_NoCustomConfigWarning())  # TFDS logs through absl


class _QuietBuilder(tfds.core.GeneratorBasedBuilder):
  """TFDS print()s "Downloading and preparing dataset ..." and "... downloaded and prepared"
  around every build (no setting turns them off): here the second is one log line instead."""

  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    logger.info("%s: prepared under %s (later runs reuse it)", self.name, self.data_dir)


def _convert(records: Iterator[tuple[str, Mapping[str, Any]]],
             to_example: Callable[[Mapping[str, Any]], dict[str, str]],
             ) -> Iterator[tuple[str, dict[str, str]]]:
  for key, record in records:
    try:
      yield key, to_example(record)
    except UserError as error:   # a record the user can fix: name it
      raise UserError(f"{key}: {error}") from error


def _fingerprint(sources: Mapping[str, Sequence[str]]) -> str:
  """A cache key of the sources: their paths, sizes and modification times."""
  parts = []
  for split in sorted(sources):
    for source in sources[split]:
      path = paths.as_path(source)   # local, or an object in a bucket (gs://...)
      if not path.exists():
        parts.append(f"{split}|{source}||")
      elif paths.is_remote(path):
        # The object's checksum, not its time in whole seconds: a rewrite within a second
        # still changes the key.
        parts.append(f"{split}|{source}|{paths.file_size(path)}|{paths.object_crc32c(path)}")
      else:
        stat = os.stat(path)
        parts.append(f"{split}|{os.path.realpath(path)}|{stat.st_size}|{stat.st_mtime_ns}")
  return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


class _FilesBuilder(_QuietBuilder):
  """Shared by the file builders: one split per key of `sources`; each subclass names its
  fields and how a JSON record becomes an example (`_to_example`)."""

  VERSION = tfds.core.Version("1.0.0")
  _FIELDS: tuple[str, ...] = ()
  _to_example: Callable[[Mapping[str, Any]], dict[str, str]]

  def __init__(self, *, sources: Mapping[str, Sequence[str]], **kwargs: Any):
    for split, files in sources.items():
      if not files:
        raise UserError(f"split {split!r} has no files; list at least one data file for it")
      for p in files:
        if not paths.as_path(p).is_file():
          raise UserError(f"data file {p} (split {split!r}) does not exist; pass the path of "
                          "an existing JSONL, JSON or Parquet file")
    self._sources = {split: [str(p) for p in files] for split, files in sources.items()}
    config = tfds.core.BuilderConfig(name=f"src_{_fingerprint(self._sources)}")
    super().__init__(config=config, **kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        features=tfds.features.FeaturesDict({f: tfds.features.Text() for f in self._FIELDS}))

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    del dl_manager  # local files only
    return {split: self._generate_examples(paths) for split, paths in self._sources.items()}

  def _generate_examples(self, paths: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    count = 0
    for path in paths:
      for key, example in _convert(read_json_records(path), self._to_example):
        count += 1
        yield key, example
    if count == 0:
      raise UserError(f"no records in {', '.join(paths)}: the dataset is empty; pass files "
                      "with at least one record")


def training_record(obj: Mapping[str, Any]) -> dict[str, str]:
  """A record as training stores it: instruction, context and the (first) response. A prompt
  rendered with the MiniLLM template is stored taken apart (instruction and input), which that
  template renders back to the same text."""
  record = records_from_json(obj)
  return {field: record[field] for field in ("instruction", "context", "response")}


def instruction_example(obj: Mapping[str, Any]) -> dict[str, str]:
  """`training_record`'s fields and `messages`: a chat conversation's turns as JSON text
  (`conversation.conversation_record`), "" for an instruction record."""
  record = records_from_json(obj)
  return {field: record.get(field, "") for field in InstructionFiles._FIELDS}


class InstructionFiles(_FilesBuilder):
  """Instruction records (Dolly form or prompt / response pairs) and chat conversations (a
  `messages` list) from local files."""

  VERSION = tfds.core.Version("1.1.0")   # 1.1.0: `messages`; a 1.0.0 cache is built again
  _FIELDS = ("instruction", "context", "response", "messages")
  _to_example = staticmethod(instruction_example)


class TextFiles(_FilesBuilder):
  """Pre-training text (`{"text": ...}` records) from local files."""

  _FIELDS = ("text",)
  _to_example = staticmethod(text_from_json)


class PairFiles(_FilesBuilder):
  """Chat pairs (prompt messages as JSON text, the teacher's and the student's response)."""

  _FIELDS = PAIR_FIELDS
  _to_example = staticmethod(pair_record)


class _SplitRecords(_QuietBuilder):
  """A builder whose splits are lists of (key, Dolly-form record) made by `_split_generators`."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {f: tfds.features.Text() for f in ("instruction", "context", "response")}))

  def _generate_examples(self, records: Sequence[tuple[str, dict[str, str]]]
                         ) -> Iterator[tuple[str, dict[str, str]]]:
    yield from records


class Dolly(_SplitRecords):
  """databricks-dolly-15k with MiniLLM's train / valid / test split (500 valid, 500 test)."""

  def __init__(self, *, source: str = DOLLY_HUB_ID, **kwargs: Any):
    self._source = source
    name = f"src_{_fingerprint({'all': [source]})}"
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _local_file(self) -> str:
    if paths.as_path(self._source).exists():
      return self._source
    try:
      from huggingface_hub import hf_hub_download

      return hf_hub_download(self._source, "databricks-dolly-15k.jsonl", repo_type="dataset")
    except Exception as error:  # noqa: BLE001 (any hub failure means the same to the user)
      raise UserError(f"Dolly: {self._source!r} is not a local file and the Hugging "
                      f"Face hub is out of reach ({type(error).__name__}); download "
                      "databricks-dolly-15k.jsonl and pass its path") from error

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    del dl_manager
    records = list(_convert(read_json_records(self._local_file()), training_record))
    if len(records) <= 2 * DOLLY_EVAL_SIZE:
      raise UserError(f"Dolly source has {len(records)} records; expected the ~15k of "
                      "databricks-dolly-15k: pass the full databricks-dolly-15k.jsonl")
    order = np.random.default_rng(DOLLY_SPLIT_SEED).permutation(len(records))
    shuffled = [records[i] for i in order]
    return {"test": self._generate_examples(shuffled[:DOLLY_EVAL_SIZE]),
            "valid": self._generate_examples(shuffled[DOLLY_EVAL_SIZE:2 * DOLLY_EVAL_SIZE]),
            "train": self._generate_examples(shuffled[2 * DOLLY_EVAL_SIZE:])}


class MiniLLMDolly(_SplitRecords):
  """MiniLLM's Dolly training pool (`raw.jsonl`) split as its `process_data_dolly.py`: the
  first `dev_num` records are `valid` (model selection), the rest `train`."""

  def __init__(self, *, directory: str, dev_num: int = minillm.DEV_NUM, **kwargs: Any):
    self._pool, self._dev_num = minillm.dolly_pool(directory, dev_num), dev_num
    name = f"src_{_fingerprint({'raw': [str(self._pool)]})}_dev{dev_num}"
    super().__init__(config=tfds.core.BuilderConfig(name=name), **kwargs)

  def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
    del dl_manager
    records = list(_convert(read_json_records(self._pool), training_record))
    dev = self._dev_num
    if len(records) <= dev:
      raise UserError(f"{self._pool} has {len(records)} records, not more than the {dev} of the "
                      "validation split: pass MiniLLM's full raw.jsonl, or lower "
                      "data.minillm_dev_num")
    return {"valid": self._generate_examples(records[:dev]),
            "train": self._generate_examples(records[dev:])}


def build(builder: tfds.core.DatasetBuilder) -> dict[str, Any]:
  """Prepare `builder` (once; later calls reuse the cache) and return its data source per split."""
  tfds.disable_progress_bar()  # the trainer has its own progress output
  builder.download_and_prepare()
  return {split: builder.as_data_source(split=split) for split in builder.info.splits}


def instruction_files(sources: Mapping[str, Sequence[str | os.PathLike]],
                      data_dir: str | os.PathLike) -> dict[str, Any]:
  """Random-access sources per split for local instruction files, cached under `data_dir`."""
  builder = InstructionFiles(sources={k: [str(p) for p in v] for k, v in sources.items()},
                             data_dir=str(data_dir), file_format="array_record")
  return build(builder)


def text_files(sources: Mapping[str, Sequence[str | os.PathLike]],
               data_dir: str | os.PathLike) -> dict[str, Any]:
  """Random-access sources per split for local text files, cached under `data_dir`."""
  builder = TextFiles(sources={k: [str(p) for p in v] for k, v in sources.items()},
                      data_dir=str(data_dir), file_format="array_record")
  return build(builder)


def pair_files(sources: Mapping[str, Sequence[str | os.PathLike]],
               data_dir: str | os.PathLike) -> dict[str, Any]:
  """Random-access sources per split for local chat-pair files, cached under `data_dir`."""
  builder = PairFiles(sources={k: [str(p) for p in v] for k, v in sources.items()},
                      data_dir=str(data_dir), file_format="array_record")
  return build(builder)


def minillm_dolly(data_dir: str | os.PathLike, directory: str | os.PathLike,
                  dev_num: int = minillm.DEV_NUM) -> dict[str, Any]:
  """MiniLLM's Dolly train / valid sources (its `raw.jsonl`, the first `dev_num` as valid)."""
  return build(MiniLLMDolly(directory=str(directory), dev_num=dev_num, data_dir=str(data_dir),
                            file_format="array_record"))


def dolly(data_dir: str | os.PathLike, source: str = DOLLY_HUB_ID) -> dict[str, Any]:
  """Dolly's train / valid / test sources (hub id when online, or a local JSONL copy)."""
  return build(Dolly(source=source, data_dir=str(data_dir), file_format="array_record"))
