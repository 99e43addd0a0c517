"""Examples -> a padded batch, in NumPy: shared by the Grain loader and evaluation.

A batch is a dict of `[B, T]` int32 arrays: `input_ids`, `labels` (pre-shifted next-token
targets, -100 where no loss), `attention_mask` (1 real, 0 padding) and `positions`, plus any
other per-token field the examples carry (the chat pairs' `pair_role`), 0 on padding. This
module imports neither grain nor tensorflow-datasets, so evaluation can batch without them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from csd_jax.data.instruct import IGNORE_INDEX

Example = dict[str, np.ndarray]
Batch = dict[str, Any]


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
