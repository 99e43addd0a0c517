"""Examples -> a padded batch, in NumPy: shared by the Grain loader and evaluation.

A batch is a dict of `[B, T]` int32 arrays: `input_ids`, `labels` (pre-shifted next-token
targets, -100 where no loss), `attention_mask` (1 real, 0 padding) and `positions`, plus any
other per-token field the examples carry (the chat pairs' `pair_role`), 0 on padding. This
module imports neither grain nor tensorflow-datasets, so evaluation can batch without them.

Generation's prompts are left-padded instead (`left_pad`, widths multiples of
`PROMPT_WIDTH_MULTIPLE`), and its rows cut at their first stop id (`until_stop`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from csd_jax.data.fields import IGNORE_INDEX

Example = dict[str, np.ndarray]
Batch = dict[str, Any]

# Left-padded prompt widths are multiples of this: a sampler compiles once per width used.
PROMPT_WIDTH_MULTIPLE = 64


def bucket_length(longest: int, *, multiple: int, cap: int) -> int:
  """`longest` rounded up to a multiple of `multiple`, at most `cap`: a few fixed widths, so
  that a jitted function sees a few shapes (one compilation each), not one per batch."""
  return min(cap, -(-longest // multiple) * multiple)


def pad_batch(examples: Sequence[Example], *, pad_id: int, max_length: int,
              bucket_multiple: int) -> Batch:
  """Right-pad examples to the bucket length: the longest, rounded up to `bucket_multiple`."""
  length = bucket_length(max(len(e["input_ids"]) for e in examples), multiple=bucket_multiple,
                         cap=max_length)
  rows = len(examples)
  batch = {"input_ids": np.full((rows, length), pad_id, np.int32),
           "labels": np.full((rows, length), IGNORE_INDEX, np.int32),
           "attention_mask": np.zeros((rows, length), np.int32),
           "positions": np.zeros((rows, length), np.int32)}
  extra = [k for k in examples[0] if k not in ("input_ids", "labels")]
  batch.update({k: np.zeros((rows, length), np.int32) for k in extra})
  for i, example in enumerate(examples):
    n = len(example["input_ids"])
    batch["input_ids"][i, :n] = example["input_ids"]
    batch["labels"][i, :n] = example["labels"]
    batch["attention_mask"][i, :n] = 1
    batch["positions"][i, :n] = np.arange(n)
    for k in extra:
      batch[k][i, :n] = example[k]
  return batch


def left_pad(rows: Sequence[Sequence[int]], width: int, pad_id: int
             ) -> tuple[np.ndarray, np.ndarray]:
  """`[len(rows), width]` int32 ids and attention mask of token rows, each right-aligned (the
  layout a sampler continues from)."""
  ids = np.full((len(rows), width), pad_id, np.int32)
  mask = np.zeros((len(rows), width), np.int32)
  for i, row in enumerate(rows):
    if row:
      ids[i, width - len(row):], mask[i, width - len(row):] = row, 1
  return ids, mask


def until_stop(row: np.ndarray, stops: Sequence[int]) -> np.ndarray:
  """`row` up to its first stop id (excluded)."""
  hits = np.flatnonzero(np.isin(row, stops)) if stops else []
  return row[:hits[0]] if len(hits) else row
