"""The Grain loader and the TFDS builders: sharding, exact resume, buckets, packing, errors."""

import json
import logging
import os
import pathlib
import socket
import subprocess
import sys

import numpy as np
import pytest

from csd_jax.data import length_plan
from csd_jax.data import loader as loader_module
from csd_jax.data import tfds_builder
from csd_jax.data.instruct import InstructionTokenizer, TokenizeStats
from csd_jax.data.loader import BatchLoader, LoaderConfig, padding_fraction
from csd_jax.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _numbered(n):
  return [{"text": str(i)} for i in range(n)]


def _encode(record):
  i = int(record["text"])
  n = i % 7 + 1
  return {"input_ids": np.full(n, i, np.int32), "labels": np.arange(n, dtype=np.int32)}


def _ids(batch):
  return [int(row[0]) for row in batch["input_ids"]]


def _loader(n=50, **config):
  config = {"global_batch_size": 4, "max_length": 16, "bucket_multiple": 4, **config}
  return BatchLoader(_numbered(n), _encode, pad_id=-1, config=LoaderConfig(**config),
                     process_index=0, process_count=1)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("skip", [1, 7, 13])  # 13 batches cross the epoch boundary (50 / 4)
def test_restored_state_gives_the_identical_next_batches(pack, skip):
  loader = _loader(pack=pack)
  for _ in range(skip):
    next(loader)
  state = json.loads(json.dumps(loader.get_state()))  # it must survive JSON
  expected = [next(loader) for _ in range(5)]
  restored = _loader(pack=pack)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_a_state_with_the_old_epoch_and_position_entry_still_restores():
  """Older checkpoints hold an "epoch_and_position" entry beside "grain": it is ignored."""
  loader = _loader()
  for _ in range(3):
    next(loader)
  state = loader.get_state()
  assert set(state) == {"grain"}
  old = json.loads(json.dumps({**state, "epoch_and_position": [0, 12]}))
  expected = [next(loader) for _ in range(2)]
  restored = _loader()
  restored.set_state(old)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_every_epoch_covers_the_data_in_a_new_order():
  loader = _loader(n=48)
  epochs = [sum((_ids(next(loader)) for _ in range(12)), []) for _ in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(48))
  assert epochs[0] != epochs[1]
  assert loader.steps_per_epoch == 12


def test_same_seed_same_order_other_seed_other_order():
  first = [_ids(next(_loader(seed=5))) for _ in range(1)]
  assert first == [_ids(next(_loader(seed=5)))]
  assert first != [_ids(next(_loader(seed=6)))]


def test_process_slices_are_disjoint_and_cover_the_data():
  seen = []
  for index in range(2):
    loader = BatchLoader(_numbered(40), _encode, pad_id=-1, process_index=index, process_count=2,
                         config=LoaderConfig(global_batch_size=8, max_length=16))
    rows = sum((_ids(next(loader)) for _ in range(5)), [])
    assert len(rows) == 20
    seen.append(set(rows))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(40))


def test_two_real_processes_agree_on_widths_without_a_collective_per_batch(tmp_path):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {**os.environ, "PYTHONPATH": str(ROOT)}
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "loader_process_main.py"),
                             str(i), str(port), str(tmp_path / f"{i}.json")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outputs
  results = [json.loads((tmp_path / f"{i}.json").read_text()) for i in range(2)]
  seen = [set(r["seen"]) for r in results]
  assert len(results[0]["seen"]) == len(results[1]["seen"]) == 32
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(64))
  # Every global batch has 8 rows and one agreed bucket length (64 or 128), the same on both
  # processes and the same as the per-batch all-gather of older versions gave.
  assert results[0]["shapes"] == results[1]["shapes"] == results[0]["old_shapes"]
  assert all(s[0] == 8 and s[1] in (64, 128) for s in results[0]["shapes"])
  assert {s[1] for s in results[0]["shapes"]} == {64, 128}   # both widths occur: a real test
  for r in results:
    # One all-gather at construction (the length table), none over 20 batches (2.5 epochs),
    # none after a restore; the counter sees the old scheme's 20.
    assert r["collectives"] == {"construction": 1, "batches": 0, "restored_batches": 0,
                                "old_batches": 20}, r["collectives"]
    assert r["restored_differ"] == []


def _plan_loaders(n, encode=None, processes=2, **config):
  """`processes` loaders of one run in this process (each builds the whole table itself)."""
  encode = encode or _encode
  source = _numbered(n)
  config = {"global_batch_size": 4 * processes, "max_length": 16, "bucket_multiple": 4,
            **config}
  return [BatchLoader(source, encode, pad_id=-1, config=LoaderConfig(**config),
                      process_index=i, process_count=processes) for i in range(processes)]


def _rare_long(record):
  """Mostly 1-3 tokens, 1 record in 10 13-15: a long row sits on one process, in some batches."""
  i = int(record["text"])
  n = i % 3 + 1 + 12 * (i % 10 == 3)
  return {"input_ids": np.full(n, i, np.int32), "labels": np.arange(n, dtype=np.int32)}


def _fan_out(record):
  """0, 1 or 2 examples a record: rows of one record land in different batches."""
  i = int(record["text"])
  return [_rare_long({"text": str(i)}) for _ in range(i % 3)]


@pytest.mark.parametrize("encode", [_rare_long, _fan_out])
def test_the_plan_gives_every_process_the_width_of_the_global_longest_row(encode):
  loaders = _plan_loaders(30, encode, processes=3)
  widths = set()
  for _ in range(25):   # 100 rows per process: more than 3 epochs
    batches = [next(loader) for loader in loaders]
    width = {b["input_ids"].shape[1] for b in batches}
    longest = max(int((b["attention_mask"] > 0).sum(1).max()) for b in batches)
    assert width == {min(16, -(-longest // 4) * 4)}   # what a per-batch all-gather gives
    for b in batches:
      real = b["attention_mask"] > 0
      assert (b["labels"][~real] == -100).all() and (b["input_ids"][~real] == -1).all()
    widths |= width
  assert widths == {4, 16}


def test_a_restored_plan_gives_the_identical_next_batches():
  loaders = _plan_loaders(30, _fan_out)
  for _ in range(9):
    for loader in loaders:
      next(loader)
  states = [json.loads(json.dumps(loader.get_state())) for loader in loaders]
  assert states[0]["plan"]["cursors"] == states[1]["plan"]["cursors"]
  expected = [[next(loader) for _ in range(6)] for loader in loaders]
  for loader, state, want in zip(_plan_loaders(30, _fan_out), states, expected):
    loader.set_state(state)
    for batch in want:
      got = next(loader)
      for key in batch:
        np.testing.assert_array_equal(got[key], batch[key])
  rewound = loaders[0]
  rewound.rewind()
  np.testing.assert_array_equal(next(rewound)["input_ids"],
                                next(_plan_loaders(30, _fan_out)[0])["input_ids"])


def test_a_state_without_a_plan_falls_back_to_the_per_batch_gather(monkeypatch, caplog):
  loaders = _plan_loaders(30)
  gathered = []
  monkeypatch.setattr(loader_module.BatchLoader, "_gathered_length",
                      lambda self, local: gathered.append(local["input_ids"].shape[1]) or 16)
  state = loaders[0].get_state()
  loaders[0].set_state({"grain": state["grain"]})   # as a 1-process run or older csd-jax saved
  assert "holds no length plan" in caplog.text
  assert next(loaders[0])["input_ids"].shape[1] == 16 and len(gathered) == 1
  assert "plan" not in loaders[0].get_state()


def test_no_plan_where_the_width_is_fixed(monkeypatch):
  monkeypatch.setattr(length_plan.LengthTable, "gathered", lambda *a: pytest.fail("planned"))
  for config in ({"pack": True}, {"bucket_multiple": 16}):
    loader = BatchLoader(_numbered(20), _encode, pad_id=-1, process_index=0, process_count=2,
                         config=LoaderConfig(global_batch_size=4, max_length=16, **config))
    assert loader._plan is None and next(loader)["input_ids"].shape == (2, 16)


def test_an_encoder_that_changes_its_lengths_is_caught():
  planning = [True]

  def drifting(record):   # longer rows in training than when the table was made
    example = _encode(record)
    return example if planning[0] else {k: np.tile(v, 3) for k, v in example.items()}

  loader = _plan_loaders(30, drifting, max_length=32)[0]
  planning[0] = False
  with pytest.raises(UserError, match="deterministic encoder"):
    for _ in range(8):
      next(loader)


def test_bucket_padding_rounds_up_and_caps():
  batch = next(_loader(max_length=6, bucket_multiple=4))
  lengths = (batch["attention_mask"] > 0).sum(1)
  assert batch["input_ids"].shape[1] in (4, 6)
  assert batch["input_ids"].shape[1] >= lengths.max()
  for row, n in zip(range(4), lengths):
    assert (batch["labels"][row, n:] == -100).all() and (batch["input_ids"][row, n:] == -1).all()
    np.testing.assert_array_equal(batch["positions"][row, :n], np.arange(n))


def test_packing_masks_positions_and_labels():
  batch = next(_loader(n=50, pack=True, max_length=16))
  assert batch["input_ids"].shape == (4, 16)
  for row in range(4):
    segments = batch["attention_mask"][row]
    for segment in set(segments.tolist()) - {0}:
      where = np.flatnonzero(segments == segment)
      assert (np.diff(where) == 1).all()  # contiguous
      value = batch["input_ids"][row, where[0]]
      assert (batch["input_ids"][row, where] == value).all()  # one sample per segment
      assert len(where) == value % 7 + 1  # whole, never split
      np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
      np.testing.assert_array_equal(batch["labels"][row, where], np.arange(len(where)))
    assert (batch["labels"][row][segments == 0] == -100).all()
  assert padding_fraction(batch) < 0.2


def test_loader_errors():
  with pytest.raises(UserError, match="empty"):
    _loader(n=0)
  with pytest.raises(UserError, match="global batch size 6 does not divide over 4 processes"):
    BatchLoader(_numbered(8), _encode, pad_id=0, process_index=0, process_count=4,
                config=LoaderConfig(global_batch_size=6, max_length=8))


def _write(path, rows, kind="jsonl"):
  if kind == "jsonl":
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
  elif kind == "json":
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
  else:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), path)
  return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_instruction_files_through_tfds(tmp_path, kind):
  rows = [{"instruction": f"Say {i} ✓ 日本", "input": "" if i % 2 else "ctx",
           "output": f"ok {i}"} for i in range(12)]
  source = _write(tmp_path / f"train.{kind}", rows, kind)
  splits = tfds_builder.instruction_files({"train": [source]}, tmp_path / "cache")
  records = [{k: v.decode() for k, v in splits["train"][i].items()} for i in range(12)]
  assert sorted(r["instruction"] for r in records) == sorted(r["instruction"] for r in rows)
  assert {r["context"] for r in records} == {"", "ctx"}
  prepared = list((tmp_path / "cache").rglob("*.array_record*"))
  assert prepared
  mtimes = [p.stat().st_mtime_ns for p in prepared]
  tfds_builder.instruction_files({"train": [source]}, tmp_path / "cache")  # reuses the cache
  assert [p.stat().st_mtime_ns for p in prepared] == mtimes


def test_text_files_and_loader_end_to_end(tmp_path, gpt2_tokenizer):
  rows = [{"instruction": f"Count to {i}.", "context": "", "response": " ".join(map(str, range(i)))}
          for i in range(1, 30)]
  splits = tfds_builder.instruction_files({"train": [_write(tmp_path / "d.jsonl", rows)]},
                                          tmp_path / "cache")
  encode = InstructionTokenizer(gpt2_tokenizer, max_length=64, max_prompt_length=48)
  loader = BatchLoader(splits["train"], encode, pad_id=encode.pad_id,
                       config=LoaderConfig(global_batch_size=4, max_length=64), process_count=1,
                       process_index=0)
  batch = next(loader)
  assert batch["input_ids"].shape == (4, 64)
  for row in range(4):
    labels = batch["labels"][row]
    text = gpt2_tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row] > 0])
    assert text.startswith("Below is an instruction")
    assert (labels != -100).sum() >= 2  # a response and eos


def test_builder_errors(tmp_path):
  with pytest.raises(UserError, match="missing.jsonl"):
    tfds_builder.instruction_files({"train": [tmp_path / "missing.jsonl"]}, tmp_path / "c")
  bad = _write(tmp_path / "bad.jsonl", [{"question": "q", "answer": "a"}, {"query": "q"}])
  with pytest.raises(UserError, match=r"bad.jsonl:2: record has fields \['query'\]"):
    tfds_builder.instruction_files({"train": [bad]}, tmp_path / "c")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("\n")
  with pytest.raises(UserError, match="empty"):
    tfds_builder.instruction_files({"train": [empty]}, tmp_path / "c")
  broken = tmp_path / "broken.jsonl"
  broken.write_text('{"text": "a"}\n{"text": \n')
  with pytest.raises(UserError, match="broken.jsonl:2: not valid JSON"):
    tfds_builder.text_files({"train": [broken]}, tmp_path / "c")
  broken_json = tmp_path / "broken.json"
  broken_json.write_text('[{"text": "a"},\n')
  with pytest.raises(UserError, match="broken.json:2: not valid JSON .*fix the file"):
    tfds_builder.text_files({"train": [broken_json]}, tmp_path / "c")
  with pytest.raises(UserError, match="split 'train' has no files; list at least one"):
    tfds_builder.text_files({"train": []}, tmp_path / "c")


def test_dolly_split_from_a_local_copy(tmp_path):
  rows = [{"instruction": f"q{i}", "context": "", "response": f"a{i}", "category": "qa"}
          for i in range(1200)]
  source = _write(tmp_path / "databricks-dolly-15k.jsonl", rows)
  splits = tfds_builder.dolly(tmp_path / "cache", source=str(source))
  sizes = {k: len(v) for k, v in splits.items()}
  assert sizes == {"train": 200, "valid": 500, "test": 500}
  names = {k: {v[i]["instruction"] for i in range(len(v))} for k, v in splits.items()}
  assert not names["train"] & names["test"] and not names["valid"] & names["test"]
  again = tfds_builder.dolly(tmp_path / "cache2", source=str(source))
  assert {again["test"][i]["instruction"] for i in range(500)} == names["test"]


def _data_logs(caplog):
  return [r.getMessage() for r in caplog.records
          if r.name == "csd_jax.data" and r.levelno == logging.INFO]


def test_tokenisation_drops_and_truncations_are_logged_once_at_start(tmp_path, gpt2_tokenizer,
                                                                       caplog):
  rows = [{"instruction": "Say hi.", "response": "hi"},
          {"instruction": "word " * 40, "response": "ok"},  # prompt cut from the left
          {"instruction": "Count.", "response": "one " * 60},  # response cut from the right
          {"instruction": "Nothing.", "response": ""}]  # no target left: dropped
  splits = tfds_builder.instruction_files({"train": [_write(tmp_path / "d.jsonl", rows)]},
                                          tmp_path / "cache")
  encode = InstructionTokenizer(gpt2_tokenizer, template="none", max_length=32,
                                max_prompt_length=24, add_eos=False)
  caplog.set_level(logging.INFO, logger="csd_jax.data")
  loader = BatchLoader(splits["train"], encode, pad_id=encode.pad_id, process_index=0,
                       process_count=1, config=LoaderConfig(global_batch_size=2, max_length=32))
  assert _data_logs(caplog) == [
      "instruction_files[train]: 4 records: 3 kept, 1 prompts cut to max_prompt_length, 1 responses"
      " cut from the right, 1 dropped with no response token"]
  assert encode.stats == TokenizeStats()  # the scan counted on a copy: training counts alone
  next(loader)
  assert encode.stats.samples >= 2
  assert len(_data_logs(caplog)) == 1  # once, at construction


def test_tokenisation_stats_of_a_large_set_come_from_a_sample(monkeypatch, gpt2_tokenizer,
                                                              caplog):
  monkeypatch.setattr(loader_module, "TOKENIZE_SCAN_LIMIT", 3)
  rows = [{"instruction": f"Say {i}.", "context": "", "response": str(i)} for i in range(10)]
  encode = InstructionTokenizer(gpt2_tokenizer, max_length=64, max_prompt_length=48)
  caplog.set_level(logging.INFO, logger="csd_jax.data")
  config = LoaderConfig(global_batch_size=2, max_length=64)
  BatchLoader(rows, encode, pad_id=encode.pad_id, process_index=1, process_count=2,
              config=config)
  assert _data_logs(caplog) == []  # one report per run, from process 0
  BatchLoader(rows, encode, pad_id=encode.pad_id, process_index=0, process_count=1,
              config=config)
  assert _data_logs(caplog) == [
      "data: 10 records; tokenising an evenly spaced sample of 3 records: 3 kept, 0 prompts cut"
      " to max_prompt_length, 0 responses cut from the right, 0 dropped with no response token"]
  caplog.clear()
  _loader(n=9)  # an encoder without counts: the record count alone
  assert _data_logs(caplog) == ["data: 9 records"]
