"""The Grain input pipeline: shuffled, sharded per process, padded or packed, resumable.

    source (random access) -> shuffle(seed, reshuffled every epoch) -> repeat -> this process's
    slice -> encode (tokenise; a record gives 0..n examples) -> pad to a bucket | pack -> batch
    -> prefetch -> a global `jax.Array` batch under the batch sharding

Every process runs the same shuffle and takes every `process_count`-th record, so the processes
see disjoint slices that together cover the data; a record's rows stay together (a chat
pair's two rows: an encoder's `rows_per_record`). A batch is a dict of `[B, T]` int32 arrays:
`input_ids`, `labels` (pre-shifted next-token targets, -100 where no loss), `attention_mask`
(0 padding; 1, 2, ... the packed samples of a row) and `positions`. `T` is the longest sample
of the global batch rounded up to a multiple of `bucket_multiple` (capped at `max_length`), or
`max_length` when packing.

On several processes all pad to the same `T` with no per-batch collective: see `length_plan`.
`get_state()` / `set_state()` restore the position exactly. At construction the loader logs
(logger "csd_jax.data") how many records it has and, for an encoder that counts
(`instruct.InstructionTokenizer.stats`), how many are dropped, truncated or empty after
tokenisation: one info line, and a warning naming the config key to raise when many are cut
(`InstructionTokenizer.truncation_warning`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np

from csd_jax.data.batching import bucket_length, pad_batch
from csd_jax.data.instruct import TokenizeStats
from csd_jax.data.fields import IGNORE_INDEX
from csd_jax.data.length_plan import LengthPlan, LengthTable
from csd_jax.errors import UserError
from csd_jax.runtime.distributed import allgather

logger = logging.getLogger("csd_jax.data")

Example = dict[str, np.ndarray]
Batch = dict[str, Any]
# Records tokenised at construction to report drops and truncation: all of them up to this
# many, else an evenly spaced sample of this many. Tokenising Dolly's 14k records one by one
# takes ~10 s on a busy 2-core host, and the first epoch tokenises them again anyway, so a
# larger set gets an estimate that costs a few seconds at most (exact counts accumulate in
# `encode.stats` as training reads the data).
TOKENIZE_SCAN_LIMIT = 5000


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
  """How batches are formed. `global_batch_size` counts rows across all processes."""

  global_batch_size: int
  max_length: int
  seed: int = 0
  shuffle: bool = True
  pack: bool = False
  bucket_multiple: int = 64
  num_threads: int = 2
  prefetch: int = 4


def _decode(record: Mapping[str, Any]) -> dict[str, str]:
  """TFDS text features come back as bytes."""
  return {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in record.items()}


class _Encode(grain.experimental.FlatMapTransform):
  """A record -> its examples (an encoder returns an example, a list of them, or None)."""

  max_fan_out = 1 << 16

  def __init__(self, encode: Callable[[Mapping[str, str]], Any]):
    self._encode = encode

  def flat_map(self, element: Mapping[str, Any]) -> Sequence[Example]:
    out = self._encode(_decode(element))
    if out is None:
      return []
    return out if isinstance(out, list) else [out]


def stack_packed(rows: Sequence[Example], *, pad_id: int) -> Batch:
  """Packed rows from Grain's packer -> a batch with segment ids as the attention mask."""
  segments = np.stack([r["input_ids_segment_ids"] for r in rows]).astype(np.int32)
  padding = segments == 0
  return {"input_ids": np.where(padding, pad_id, np.stack([r["input_ids"] for r in rows])
                                ).astype(np.int32),
          "labels": np.where(padding, IGNORE_INDEX, np.stack([r["labels"] for r in rows])
                             ).astype(np.int32),
          "attention_mask": segments,
          "positions": np.where(padding, 0, np.stack([r["input_ids_positions"] for r in rows])
                                ).astype(np.int32)}


def padding_fraction(batch: Mapping[str, np.ndarray]) -> float:
  """The share of the batch's token slots that hold padding."""
  mask = np.asarray(batch["attention_mask"])
  return float(np.mean(mask == 0))


class BatchLoader:
  """An endless iterator of batches over a random-access source, with exact save / restore.

  Args:
    source: a random-access sequence of records (a TFDS data source, a list of dicts).
    encode: record (text fields as str) -> example dict(input_ids, labels), a list of them, or
      None (dropped); e.g. `instruct.InstructionTokenizer` or `instruct.TextTokenizer`. An
      encoder with `rows_per_record` = n (chat pairs: 2) gives n examples or none per record:
      a local batch then holds a multiple of n rows, so no record is split between batches or
      processes.
    pad_id: the token that fills padding.
    config: batch size, lengths, seed, packing.
    sharding: the global batch's `NamedSharding` (batch axis over the data axes); None gives
      this process's NumPy batch.
    process_index / process_count: default `jax.process_index()` / `jax.process_count()`.
  """

  def __init__(self, source: Sequence[Any], encode: Callable[[Mapping[str, str]], Any], *,
               pad_id: int, config: LoaderConfig, sharding: Any = None,
               process_index: int | None = None, process_count: int | None = None):
    self.config = config
    self.pad_id = pad_id
    self.sharding = sharding
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    if len(source) == 0:
      raise UserError("the dataset is empty: nothing to load; pass data with at least one "
                      "record")
    if config.global_batch_size % self.process_count:
      raise UserError(f"global batch size {config.global_batch_size} does not divide over "
                      f"{self.process_count} processes; use a multiple of {self.process_count}")
    self.local_batch_size = config.global_batch_size // self.process_count
    self.rows_per_record = int(getattr(encode, "rows_per_record", 1))
    if self.local_batch_size % self.rows_per_record:
      raise UserError(f"global batch size {config.global_batch_size} over {self.process_count} "
                      f"processes leaves {self.local_batch_size} rows per process, not whole "
                      f"records of {self.rows_per_record} rows (chat pairs); use a multiple "
                      f"of {self.rows_per_record * self.process_count}")
    self.num_records = len(source)
    if self.process_index == 0:  # every process reads the same records: one report is enough
      _log_tokenize_stats(source, encode)
    dataset = grain.MapDataset.source(source)
    if config.shuffle:
      dataset = dataset.shuffle(seed=config.seed)
    dataset = dataset.repeat()[self.process_index::self.process_count]
    examples = grain.experimental.FlatMapIterDataset(
        dataset.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                                  prefetch_buffer_size=config.prefetch)),
        _Encode(encode))
    if config.pack:
      lengths = {"input_ids": config.max_length, "labels": config.max_length}
      packed = grain.experimental.FirstFitPackIterDataset(
          examples, length_struct=lengths, num_packing_bins=self.local_batch_size,
          seed=config.seed, shuffle_bins=False)
      batches = packed.batch(self.local_batch_size, drop_remainder=True,
                             batch_fn=lambda rows: stack_packed(rows, pad_id=pad_id))
    else:
      batches = examples.batch(self.local_batch_size, drop_remainder=True, batch_fn=lambda ex: (
          pad_batch(ex, pad_id=pad_id, max_length=config.max_length,
                    bucket_multiple=config.bucket_multiple)))
    self._iterator = iter(batches)
    self._start_state = self._iterator.get_state()
    # Several processes and a width that depends on the rows: plan it (see length_plan).
    # Packed rows and a bucket of max_length are always max_length wide: nothing to agree on.
    self._plan: LengthPlan | None = None
    self._gather_every_batch = False   # a restored state without a plan (older csd-jax)
    if (self.process_count > 1 and not config.pack
        and bucket_length(1, multiple=config.bucket_multiple, cap=config.max_length)
        < config.max_length):
      order = grain.MapDataset.range(len(source))   # the records' permutations, by index
      order = order.shuffle(seed=config.seed) if config.shuffle else order
      table = LengthTable.gathered(source, _Encode(_apart(encode)).flat_map,
                                   self.process_index, self.process_count)
      self._plan = LengthPlan(table, order.repeat(), process_count=self.process_count,
                              local_batch_size=self.local_batch_size,
                              max_length=config.max_length,
                              bucket_multiple=config.bucket_multiple)

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per pass over the records (before samples dropped by the encoder)."""
    rows = self.num_records * self.rows_per_record
    return max(1, rows // self.config.global_batch_size)

  def __iter__(self) -> Iterator[Batch]:
    return self

  def __next__(self) -> Batch:
    local = next(self._iterator)
    if self._gather_every_batch:
      local = self._pad_to(local, self._gathered_length(local))
    elif self._plan is not None:
      length = self._plan.next_length()
      if local["input_ids"].shape[1] > length:
        raise UserError(f"process {self.process_index}'s batch is {local['input_ids'].shape[1]}"
                        f" tokens wide, the plan made at the start says {length}: the encoder "
                        "gives other lengths than it gave then; multi-host padding needs a "
                        "deterministic encoder")
      local = self._pad_to(local, length)
    if self.sharding is None:
      return local
    return {k: jax.make_array_from_process_local_data(self.sharding, v)
            for k, v in local.items()}

  def _gathered_length(self, local: Batch) -> int:
    """The per-batch agreement of older versions: an all-gather of every process's width."""
    return int(np.max(allgather(np.int32(local["input_ids"].shape[1]))))

  def _pad_to(self, local: Batch, length: int) -> Batch:
    """Right-pad a local batch to the agreed width (padding is masked: labels -100)."""
    extra = length - local["input_ids"].shape[1]
    if extra == 0:
      return local
    fill = {"input_ids": self.pad_id, "labels": IGNORE_INDEX, "attention_mask": 0, "positions": 0}
    return {k: np.pad(v, ((0, 0), (0, extra)), constant_values=fill.get(k, 0))
            for k, v in local.items()}

  def rewind(self) -> None:
    """Back to the first batch (held-out evaluation reads the same batches every time)."""
    self._iterator.set_state(self._start_state)
    if self._plan is not None:
      self._plan.cursors[:] = 0
      self._gather_every_batch = False

  def get_state(self) -> dict[str, Any]:
    """A JSON-serialisable state: the Grain iterator's, under "grain", and with a length plan
    every process's cursor in it, under "plan" (the same on every process)."""
    state = {"grain": json.loads(json.dumps(self._iterator.get_state(), default=_jsonable))}
    if self._plan is not None and not self._gather_every_batch:
      state["plan"] = {"process": self.process_index,
                       "cursors": self._plan.cursors.tolist()}
    return state

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Restore a state from `get_state()`: the next batches are those that followed it.

    Other keys are ignored (older checkpoints also hold "epoch_and_position"). A state of
    another process count (every process continues from process 0's position, as
    `train.actions.resume` does) puts every cursor at the saver's; a state without a plan
    (older versions, a 1-process run) falls back to a per-batch all-gather."""
    self._iterator.set_state(_restore(state["grain"]))
    if self._plan is None:
      return
    plan = state.get("plan")
    self._gather_every_batch = plan is None
    if plan is None:
      logger.warning("the data state holds no length plan (saved by an older csd-jax or a "
                     "1-process run): the processes agree on every batch's width by an "
                     "all-gather until the next fresh start")
    elif len(plan["cursors"]) == self.process_count:
      self._plan.cursors[:] = np.asarray(plan["cursors"], np.int64)
    else:
      self._plan.cursors[:] = np.asarray(plan["cursors"][plan["process"]], np.int64)


def _source_name(source: Any) -> str:
  info, split = getattr(source, "dataset_info", None), getattr(source, "split", None)
  if info is not None and split is not None:  # a TFDS data source
    return f"{info.name}[{split}]"
  return "data"


def _apart(encode: Callable[[Mapping[str, str]], Any]) -> Callable[[Mapping[str, str]], Any]:
  """`encode` for a read that is not training's: a counting encoder (`stats`) as a copy with its
  own counts, so that the caller's `encode.stats` keeps counting only training's reads."""
  if not isinstance(getattr(encode, "stats", None), TokenizeStats):
    return encode
  scan = copy.copy(encode)
  scan.stats = TokenizeStats()
  return scan


def _log_tokenize_stats(source: Sequence[Any], encode: Callable[[Mapping[str, str]], Any]
                        ) -> None:
  """Logs the record count and, when `encode` counts, its drops and truncations (see above)."""
  name, total = _source_name(source), len(source)
  if not isinstance(getattr(encode, "stats", None), TokenizeStats):
    logger.info("%s: %d records", name, total)
    return
  if total <= TOKENIZE_SCAN_LIMIT:
    indices = list(range(total))
  else:
    indices = np.linspace(0, total - 1, TOKENIZE_SCAN_LIMIT).astype(int).tolist()
  scan = _apart(encode)
  getitems = getattr(source, "__getitems__", None)
  for record in getitems(indices) if getitems is not None else (source[i] for i in indices):
    scan(_decode(record))
  if len(indices) == total:
    logger.info("%s: %s", name, scan.stats.summary())
  else:
    logger.info("%s: %d records; tokenising an evenly spaced sample of %s", name, total,
                scan.stats.summary())
  warning = getattr(scan, "truncation_warning", None)
  if warning is not None and (text := warning()):
    logger.warning("%s: %s", name, text)


def _jsonable(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, bytes):
    return {"__bytes__": value.hex()}
  raise TypeError(f"loader state holds a {type(value).__name__}")


def _restore(value: Any) -> Any:
  if isinstance(value, dict):
    if set(value) == {"__bytes__"}:
      return bytes.fromhex(value["__bytes__"])
    return {k: _restore(v) for k, v in value.items()}
  if isinstance(value, list):
    return [_restore(v) for v in value]
  return value
