"""`csd-jax generate`'s batch plan: which rows are sampled together, in which order.

Pure (no model, no tokenizer, no JAX): rows in, batches out. The plan depends only on the rows
(their keys, prompt ids and sampling) and `batch_size`, never on what a response file already
holds, so that a resumed run plans the batches of an uninterrupted one: a row's batch (its
neighbours and its padded width) is the same, and so are its responses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from csd_jax.data.batching import PROMPT_WIDTH_MULTIPLE, bucket_length
from csd_jax.sampling import Sampling


class RowKey(NamedTuple):
  """What a row (and its response line) answers: the prompt's `index` (its record's position
  in the prompt file), the `sample` (0 to n - 1) and the `turn` of a multi-turn prompt (0 for a
  single prompt). Sorts, hashes and compares as the plain tuple (index, sample, turn)."""

  index: int
  sample: int
  turn: int

  @classmethod
  def of(cls, line: Mapping[str, Any]) -> RowKey:
    """The key of a response line (a mapping with `index`, `sample` and `turn`)."""
    return cls(line["index"], line["sample"], line["turn"])

  def label(self) -> str:
    """How error messages name the row."""
    return f"index {self.index}, sample {self.sample}, turn {self.turn}"


@dataclasses.dataclass(frozen=True)
class Row:
  """One prompt to sample: its key, its token ids (at most `max_prompt_length`), its sampling
  and the width its batch is left-padded to."""

  key: RowKey
  ids: list[int]
  sampling: Sampling
  width: int


def make_row(key: RowKey, ids: Sequence[int], sampling: Sampling, max_prompt_length: int
             ) -> Row:
  """The row of a prompt's ids: their last `max_prompt_length` (the end of a conversation is
  what is answered), padded to the next multiple of `PROMPT_WIDTH_MULTIPLE` (at most
  `max_prompt_length`), so that the jitted sampler compiles once per width, not once per
  prompt length."""
  ids = list(ids)[-max_prompt_length:]
  width = bucket_length(len(ids), multiple=PROMPT_WIDTH_MULTIPLE, cap=max_prompt_length)
  return Row(key, ids, sampling, width)


def plan_batches(rows: Sequence[Row], batch_size: int) -> list[list[Row]]:
  """The batches of `rows` (those of one turn), in the order they run.

  Contract:
  - Every row is in exactly one batch; a batch holds 1 to `batch_size` rows.
  - The rows of a batch share their `width` and `sampling` (one sampler call: one padded
    width, one static sampling).
  - Rows are grouped by (width, sampling); the groups run by width, narrowest first, then by
    the sampling's fields (`dataclasses.astuple`), so the order never depends on which group
    came first in `rows`.
  - Within a group, rows keep their order in `rows` (callers pass (index, sample) order), and
    the group is cut into consecutive batches of `batch_size`: only a group's last batch may be
    short (`fill_batch` completes it).
  """
  groups: dict[tuple[int, Sampling], list[Row]] = {}
  for row in rows:
    groups.setdefault((row.width, row.sampling), []).append(row)
  plan = []
  for width, sampling in sorted(groups, key=lambda g: (g[0], dataclasses.astuple(g[1]))):
    group = groups[width, sampling]
    plan.extend(group[start:start + batch_size] for start in range(0, len(group), batch_size))
  return plan


def fill_batch(batch: Sequence[Row], batch_size: int) -> list[Row]:
  """`batch` completed to `batch_size` rows with copies of its last row, whose responses the
  caller drops: every sampler call has the same batch shape (no compilation per batch size,
  rows spread evenly over the devices' data axis)."""
  return list(batch) + [batch[-1]] * (batch_size - len(batch))
