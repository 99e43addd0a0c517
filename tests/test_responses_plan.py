"""`csd-jax generate`'s batch plan (`csd_jax.generate.plan`), without a model, a tokenizer or a
JAX compile: rows grouped by width and sampling, in their given order within a group, cut into
batches of `batch_size` (only a group's last one short, then completed with copies), every row
planned exactly once; and the rows' named keys."""

import dataclasses
import pathlib
import random
import subprocess
import sys

from csd_jax.data.batching import PROMPT_WIDTH_MULTIPLE
from csd_jax.generate.plan import Row, RowKey, fill_batch, make_row, plan_batches
from csd_jax.sampling import Sampling

ROOT = pathlib.Path(__file__).resolve().parents[1]
HOT, GREEDY, WARM = Sampling(temperature=0.8, top_p=0.95), Sampling(0.0), Sampling(0.7)


def _row(index, width, sampling=HOT, sample=0, turn=0):
  return Row(RowKey(index, sample, turn), [index] * width, sampling, width)


def _keys(plan):
  return [[tuple(r.key) for r in batch] for batch in plan]


def _random_rows(rng):
  """A turn's rows in (index, sample) order: random widths and samplings, n samples a prompt."""
  n, turn = rng.randint(1, 3), rng.randint(0, 2)
  rows = []
  for index in range(rng.randint(1, 40)):
    width = rng.choice([64, 128, 192, 2048])
    sampling = rng.choice([HOT, GREEDY, WARM])
    rows += [_row(index, width, sampling, s, turn) for s in range(n)]
  return rows


def test_a_worked_plan():
  """Narrow widths first; within a width, samplings by their fields (greedy before 0.7 before
  0.8); a group's rows in their given order, cut every `batch_size`."""
  rows = [_row(0, 128), _row(1, 64), _row(2, 128), _row(3, 64, GREEDY), _row(4, 128),
          _row(5, 64), _row(6, 128), _row(7, 64, GREEDY), _row(8, 64, WARM),
          _row(9, 128, GREEDY)]
  assert _keys(plan_batches(rows, 2)) == [
      [(3, 0, 0), (7, 0, 0)],                # width 64, temperature 0
      [(8, 0, 0)],                           # width 64, temperature 0.7
      [(1, 0, 0), (5, 0, 0)],                # width 64, temperature 0.8
      [(9, 0, 0)],                           # width 128, temperature 0
      [(0, 0, 0), (2, 0, 0)], [(4, 0, 0), (6, 0, 0)]]   # width 128, 0.8: two full batches


def test_every_row_is_planned_exactly_once_in_batches_of_one_width_and_sampling():
  rng = random.Random(0)
  for _ in range(300):
    rows, batch_size = _random_rows(rng), rng.randint(1, 9)
    plan = plan_batches(rows, batch_size)
    planned = [r for batch in plan for r in batch]
    assert sorted(r.key for r in planned) == sorted(r.key for r in rows)
    assert len(planned) == len(rows) == len({r.key for r in planned})
    for batch in plan:
      assert 1 <= len(batch) <= batch_size
      assert len({(r.width, r.sampling) for r in batch}) == 1


def test_groups_run_narrowest_first_and_keep_the_rows_order():
  """Consecutive batches of one group, in the rows' order; a group's batches are all full but
  its last; groups in (width, sampling fields) order, each group once."""
  rng = random.Random(1)
  for _ in range(300):
    rows, batch_size = _random_rows(rng), rng.randint(1, 9)
    plan = plan_batches(rows, batch_size)
    groups = []   # (width, sampling) of each run of batches, in plan order
    for batch in plan:
      group = (batch[0].width, batch[0].sampling)
      if not groups or groups[-1][0] != group:
        groups.append((group, []))
      groups[-1][1].append(batch)
    assert len({g for g, _ in groups}) == len(groups)   # a group's batches are consecutive
    order = [(width, dataclasses.astuple(sampling)) for (width, sampling), _ in groups]
    assert order == sorted(order)
    for (width, sampling), batches in groups:
      given = [r.key for r in rows if (r.width, r.sampling) == (width, sampling)]
      assert [r.key for batch in batches for r in batch] == given
      assert all(len(batch) == batch_size for batch in batches[:-1])


def test_the_plan_depends_on_each_group_s_rows_not_on_how_groups_interleave():
  """Rows of several groups, interleaved otherwise, plan the same batches: the order in which
  groups run is (width, sampling), never which one came first."""
  rng = random.Random(2)
  for _ in range(100):
    rows = _random_rows(rng)
    regrouped = sorted(rows, key=lambda r: (r.sampling.temperature, -r.width))   # stable
    assert _keys(plan_batches(regrouped, 4)) == _keys(plan_batches(rows, 4))


def test_a_short_batch_is_completed_with_copies_of_its_last_row():
  rows = [_row(i, 64) for i in range(5)]
  last = plan_batches(rows, 4)[-1]
  assert [r.key.index for r in last] == [4]
  filled = fill_batch(last, 4)
  assert len(filled) == 4 and all(r is last[-1] for r in filled)
  full = plan_batches(rows, 4)[0]
  assert fill_batch(full, 4) == full
  assert fill_batch(rows[:2], 3) == [rows[0], rows[1], rows[1]]


def test_a_row_keeps_its_prompt_s_end_padded_to_a_bucket():
  key = RowKey(3, 1, 0)
  row = make_row(key, range(100), HOT, max_prompt_length=2048)
  assert row.ids == list(range(100)) and row.width == 2 * PROMPT_WIDTH_MULTIPLE
  assert make_row(key, range(64), HOT, 2048).width == PROMPT_WIDTH_MULTIPLE
  cut = make_row(key, range(100), GREEDY, max_prompt_length=70)
  assert cut.ids == list(range(30, 100)) and cut.width == 70   # the end kept; width capped
  assert (cut.key, cut.sampling) == (key, GREEDY)


def test_row_keys_are_named_and_behave_as_the_plain_tuple():
  key = RowKey.of({"index": 2, "sample": 1, "turn": 0, "response": "x"})
  assert (key.index, key.sample, key.turn) == (2, 1, 0)
  assert key == (2, 1, 0) and hash(key) == hash((2, 1, 0))
  assert {(2, 1, 0): "line"}[key] == "line"
  assert sorted([RowKey(1, 0, 1), RowKey(0, 1, 0), RowKey(1, 0, 0)]) == [
      (0, 1, 0), (1, 0, 0), (1, 0, 1)]
  assert key.label() == "index 2, sample 1, turn 0"


def test_the_planner_imports_no_jax():
  script = ("import sys, csd_jax.generate.plan; "
            "print(sorted(m for m in ('jax', 'flax', 'transformers') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, check=True)
  assert result.stdout.strip() == "[]", result.stdout
