"""The multi-host length plan: every process pads its rows to the same width, with no
per-batch collective.

The loader's global batch is `[B, T]`, each process holding only its rows, and `T` depends on
the rows (the longest sample of the GLOBAL batch rounded up to a bucket), so on several
processes all must build the same `T`; asking the others every step would make a pod's input
pipeline wait on the network. So at construction the processes tokenise the records once
between them and share, in ONE all-gather, each record's example count and longest example
(`LengthTable`, 8 bytes a record); each process then replays every process's slice of the
shuffle (`LengthPlan`, integer look-ups) and knows every global batch's `T` with no
collective: the `T` a per-batch all-gather gave, so as few compiles. The encoder must be
deterministic (a longer row than planned is an error). `csd_jax.data.loader.BatchLoader`
builds the plan and pads each local batch to its `T`; `allgather` is also its per-batch
fallback for a state saved without a plan (older csd-jax, a 1-process run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from csd_jax.data.batching import Example, bucket_length
from csd_jax.errors import UserError
from csd_jax.runtime.distributed import allgather

logger = logging.getLogger("csd_jax.data")


class LengthTable:
  """Per record: how many examples the encoder gives and the longest one's length ([N, 2])."""

  def __init__(self, counts_and_lengths: np.ndarray):
    self.table = np.asarray(counts_and_lengths, np.int32)

  @staticmethod
  def part(source: Sequence[Any], examples: Callable[[Any], Sequence[Example]],
           process_index: int, process_count: int) -> np.ndarray:
    """This process's contiguous block of the table (array_record reads in order), padded to
    the common block size for the gather. `examples`: a record -> the encoder's examples of
    it, as the loader's pipeline makes them (`loader._Encode(...).flat_map`)."""
    size, n = -(-len(source) // process_count), len(source)
    block = range(min(n, process_index * size), min(n, (process_index + 1) * size))
    part = np.zeros((size, 2), np.int32)
    flat_map, getitems = examples, getattr(source, "__getitems__", None)
    for start in range(block.start, block.stop, 1024):   # reads in chunks, not one by one
      indices = list(range(start, min(block.stop, start + 1024)))
      for i, record in zip(indices, getitems(indices) if getitems is not None
                           else [source[i] for i in indices]):
        lengths = [len(e["input_ids"]) for e in flat_map(record)]
        part[i - block.start] = (len(lengths), max(lengths, default=0))
    return part

  @classmethod
  def gathered(cls, source: Sequence[Any], examples: Callable[[Any], Sequence[Example]],
               process_index: int, process_count: int) -> LengthTable:
    """Every process's block, joined by the loader's only collective (at construction)."""
    start = time.perf_counter()
    if jax.process_count() == process_count:
      parts = allgather(cls.part(source, examples, process_index, process_count))
    else:   # processes simulated in one (tests): every block here
      parts = np.stack([cls.part(source, examples, i, process_count)
                        for i in range(process_count)])
    if process_index == 0:
      logger.info("length plan: %d records tokenised by %d processes in %.1f s", len(source),
                  process_count, time.perf_counter() - start)
    return cls(np.asarray(parts).reshape(-1, 2)[:len(source)])


class LengthPlan:
  """Every process's next batch, replayed from a `LengthTable`: the global batch's padded length.

  A process's stream is its slice (every `process_count`-th record) of the shuffled, repeated
  records, flat-mapped to examples and cut into `local_batch_size` rows, as `BatchLoader`
  builds it. `cursors[j]` = (next slice position, examples of that record already taken).
  """

  def __init__(self, table: LengthTable, order: Any, *, process_count: int,
               local_batch_size: int, max_length: int, bucket_multiple: int):
    if not table.table[:, 0].any():
      raise UserError("no record of the dataset gives a training example after tokenisation; "
                      "check data.max_length and the data files")
    self.table, self.order, self.process_count = table.table, order, process_count
    self.local_batch_size, self.max_length = local_batch_size, max_length
    self.bucket_multiple = bucket_multiple
    self.cursors = np.zeros((process_count, 2), np.int64)
    self._epochs: dict[int, np.ndarray] = {}

  def _record(self, position: int) -> int:
    # Grain's shuffle is random access but slow per element: one permutation per epoch, kept
    # for the epochs that lagging and leading processes straddle (recomputed if evicted).
    n = len(self.table)
    epoch = position // n
    if epoch not in self._epochs:
      if len(self._epochs) >= 3:
        del self._epochs[min(self._epochs)]
      self._epochs[epoch] = np.fromiter((self.order[epoch * n + t] for t in range(n)),
                                        np.int64, n)
    return int(self._epochs[epoch][position % n])

  def next_length(self) -> int:
    """The next global batch's padded length; moves every process's cursor past it."""
    longest = 0
    for j in range(self.process_count):
      k, taken = (int(x) for x in self.cursors[j])
      need = self.local_batch_size
      while need:
        count, length = self.table[self._record(j + k * self.process_count)]
        take = min(int(count) - taken, need)
        if take > 0:
          longest, need, taken = max(longest, int(length)), need - take, taken + take
        if taken >= count:
          k, taken = k + 1, 0
      self.cursors[j] = (k, taken)
    return bucket_length(longest, multiple=self.bucket_multiple, cap=self.max_length)
