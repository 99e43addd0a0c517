"""MiniLLM token files: the official layout written and read back, header checks, path
resolution, the Grain loader over them, and conversion from raw text with the GPT-2 tokenizer."""

import pickle
import struct

import numpy as np
import pytest

from csd_jax.data.fields import IGNORE_INDEX
from csd_jax.data.loader import BatchLoader, LoaderConfig
from csd_jax.data.token_files import (MAGIC, ChunkEncoder, TokenChunks, best_fitting_dtype,
                                      convert_texts, is_token_file, token_file_paths,
                                      write_token_files)
from csd_jax.errors import UserError


def _items(n, length=9, high=50000, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, high, size=length - i % 3, dtype=np.int64) for i in range(n)]


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_written_files_read_back_exactly_in_the_official_layout(tmp_path, dtype):
  items = _items(7, high=50000 if dtype == np.uint16 else 150000)
  bin_path, idx_path = write_token_files(tmp_path / "train_0", items, dtype)
  assert (bin_path.name, idx_path.name) == ("train_0.bin", "train_0.idx")
  # The header and arrays as MiniLLM's MMapIndexedDataset.Index reads them.
  raw = idx_path.read_bytes()
  assert raw[:9] == MAGIC
  version, code, count, docs = struct.unpack("<QBQQ", raw[9:34])
  assert (version, code, count, docs) == (1, 8 if dtype == np.uint16 else 4, 7, 1)
  sizes = np.frombuffer(raw, np.int32, count=7, offset=34)
  pointers = np.frombuffer(raw, np.int64, count=7, offset=34 + 4 * 7)
  assert sizes.tolist() == [len(i) for i in items]
  data = bin_path.read_bytes()
  assert len(data) == sum(len(i) for i in items) * np.dtype(dtype).itemsize
  for item, size, pointer in zip(items, sizes, pointers):
    np.testing.assert_array_equal(np.frombuffer(data, dtype, count=size, offset=pointer), item)

  chunks = TokenChunks(tmp_path / "train_0")
  assert len(chunks) == 7
  for i, item in enumerate(items):
    got = chunks.item(i)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, item)
    np.testing.assert_array_equal(chunks[i]["input_ids"], item)
  np.testing.assert_array_equal(chunks.item(-1), items[-1])
  with pytest.raises(IndexError):
    chunks.item(7)


def test_several_file_pairs_read_as_one_source_and_survive_pickling(tmp_path):
  first, second = _items(3, seed=1), _items(4, seed=2)
  write_token_files(tmp_path / "train_0", first)
  write_token_files(tmp_path / "train_1", [])   # an empty pair in between is skipped
  write_token_files(tmp_path / "train_2", second)
  chunks = TokenChunks(tmp_path)
  assert len(chunks) == 7
  chunks.item(0)   # maps the files: the pickled copy must leave the maps behind
  copy = pickle.loads(pickle.dumps(chunks))
  for i, item in enumerate(first + second):
    np.testing.assert_array_equal(copy.item(i), item)


def test_best_fitting_dtype_is_the_official_choice():
  assert best_fitting_dtype(50257) == np.uint16      # GPT-2
  assert best_fitting_dtype(65500) == np.int32
  assert best_fitting_dtype(151665) == np.int32      # Qwen2.5


def test_ids_that_do_not_fit_the_dtype_are_refused(tmp_path):
  with pytest.raises(UserError, match="does not fit uint16"):
    write_token_files(tmp_path / "x", [[1, 70000]], np.uint16)
  with pytest.raises(UserError, match="not an integer type"):
    write_token_files(tmp_path / "x", [[1]], np.float32)


def _corrupt_idx(path, offset, data):
  raw = bytearray(path.read_bytes())
  raw[offset:offset + len(data)] = data
  path.write_bytes(bytes(raw))


def test_header_problems_name_the_file_and_the_fault(tmp_path):
  prefix = tmp_path / "train_0"
  bin_path, idx_path = write_token_files(prefix, _items(4))

  _corrupt_idx(idx_path, 0, b"TNTIDX\x00\x00")
  with pytest.raises(UserError, match=r"train_0\.idx.*TNTIDX"):
    TokenChunks(prefix)
  _corrupt_idx(idx_path, 0, b"NOTMAGIC!")
  with pytest.raises(UserError, match=r"train_0\.idx.*not an mmap index"):
    TokenChunks(prefix)
  _corrupt_idx(idx_path, 0, MAGIC)
  _corrupt_idx(idx_path, 9, struct.pack("<Q", 2))
  with pytest.raises(UserError, match="format version 2"):
    TokenChunks(prefix)
  _corrupt_idx(idx_path, 9, struct.pack("<Q", 1))
  for code, what in ((6, "float32, not an integer type"), (42, "unknown")):
    _corrupt_idx(idx_path, 17, bytes([code]))
    with pytest.raises(UserError, match=f"dtype code {code} .{what}"):
      TokenChunks(prefix)
  _corrupt_idx(idx_path, 17, bytes([8]))
  TokenChunks(prefix)   # restored

  data = bin_path.read_bytes()
  bin_path.write_bytes(data[:-3])
  with pytest.raises(UserError, match=r"train_0\.bin is truncated"):
    TokenChunks(prefix)
  bin_path.write_bytes(data)
  idx_path.write_bytes(idx_path.read_bytes()[:-8])
  with pytest.raises(UserError, match=r"train_0\.idx is .* truncated"):
    TokenChunks(prefix)
  idx_path.write_bytes(b"MMID")
  with pytest.raises(UserError, match="shorter than the 34-byte header"):
    TokenChunks(prefix)


def test_entries_resolve_from_paths_prefixes_and_directories(tmp_path):
  for k in (10, 2, 0):
    write_token_files(tmp_path / f"train_{k}", _items(2))
  write_token_files(tmp_path / "valid_0", _items(1))
  pair = (tmp_path / "train_2.bin", tmp_path / "train_2.idx")
  assert token_file_paths(tmp_path / "train_2.bin") == [pair]
  assert token_file_paths(str(tmp_path / "train_2.idx")) == [pair]
  assert token_file_paths([tmp_path / "train_2", tmp_path / "train_2.bin"]) == [pair]
  assert [b.name for b, _ in token_file_paths([tmp_path])] == [
      "train_0.bin", "train_2.bin", "train_10.bin"]   # sorted by k as a number
  assert [b.name for b, _ in token_file_paths(tmp_path, split="valid")] == ["valid_0.bin"]
  assert len(TokenChunks(tmp_path)) == 6

  (tmp_path / "train_10.idx").unlink()
  with pytest.raises(UserError, match=r"train_10\.bin has no partner .*train_10\.idx"):
    token_file_paths(tmp_path)
  with pytest.raises(UserError, match="no token files at"):
    token_file_paths(tmp_path / "train_7")
  (tmp_path / "empty").mkdir()
  with pytest.raises(UserError, match=r"holds no train_\{k\}\.bin"):
    token_file_paths(tmp_path / "empty")


def test_is_token_file_tells_token_files_from_text_files(tmp_path):
  write_token_files(tmp_path / "owt" / "train_0", _items(1))
  (tmp_path / "text").mkdir()
  (tmp_path / "text" / "train.jsonl").write_text('{"text": "hi"}\n')
  assert is_token_file(tmp_path / "owt" / "train_0.bin")
  assert is_token_file(str(tmp_path / "owt" / "train_0.idx"))
  assert is_token_file(tmp_path / "owt" / "train_0")
  assert is_token_file(tmp_path / "owt")
  assert not is_token_file(tmp_path / "text" / "train.jsonl")
  assert not is_token_file(tmp_path / "text")
  assert not is_token_file("data/openwebtext.parquet")


def test_chunk_encoder_shifts_cuts_and_checks_the_vocabulary():
  chunk = np.arange(10, dtype=np.int32)
  out = ChunkEncoder(max_length=16)({"input_ids": chunk})
  np.testing.assert_array_equal(out["input_ids"], chunk[:-1])
  np.testing.assert_array_equal(out["labels"], chunk[1:])
  assert out["input_ids"].dtype == out["labels"].dtype == np.int32
  cut = ChunkEncoder(max_length=4)(chunk)   # one row of 4 inputs; the rest is dropped
  np.testing.assert_array_equal(cut["input_ids"], [0, 1, 2, 3])
  np.testing.assert_array_equal(cut["labels"], [1, 2, 3, 4])
  assert ChunkEncoder(max_length=4)(chunk[:1]) is None
  assert ChunkEncoder(max_length=16, vocab_size=10)(chunk) is not None
  with pytest.raises(UserError, match="token id 9 is outside the model's vocabulary of 9"):
    ChunkEncoder(max_length=16, vocab_size=9)(chunk)
  with pytest.raises(UserError, match="max_length must be >= 1"):
    ChunkEncoder(max_length=0)


@pytest.mark.parametrize("pack", [False, True])
def test_batch_loader_over_token_chunks_gives_shifted_labels(tmp_path, pack):
  """Chunks of 17 tokens with max_length 16 (the official 512 / 512 in small)."""
  rng = np.random.default_rng(3)
  items = [rng.integers(0, 1000, size=17) for _ in range(10)]
  write_token_files(tmp_path / "train_0", items)
  config = LoaderConfig(global_batch_size=4, max_length=16, pack=pack, bucket_multiple=8,
                        num_threads=1, prefetch=1)
  loader = BatchLoader(TokenChunks(tmp_path), ChunkEncoder(16, vocab_size=1000), pad_id=0,
                       config=config, process_index=0, process_count=1)
  starts = {tuple(item[:16]) for item in items}
  for _ in range(3):   # past the first epoch's end (10 chunks, 4 rows a batch)
    batch = next(loader)
    assert batch["input_ids"].shape == (4, 16)
    mask = batch["attention_mask"] > 0
    assert mask.all()   # every chunk fills its row: no padding
    np.testing.assert_array_equal(batch["labels"][:, :-1], batch["input_ids"][:, 1:])
    assert (batch["labels"] != IGNORE_INDEX).all()
    for row, labels in zip(batch["input_ids"], batch["labels"]):
      assert tuple(row) in starts
      item = next(i for i in items if tuple(i[:16]) == tuple(row))
      assert labels[-1] == item[16]


def test_batch_loader_reports_a_vocabulary_mismatch(tmp_path):
  write_token_files(tmp_path / "train_0", [np.full(9, 50000)] * 4)
  config = LoaderConfig(global_batch_size=2, max_length=8, num_threads=1, prefetch=1)
  loader = BatchLoader(TokenChunks(tmp_path), ChunkEncoder(8, vocab_size=32000), pad_id=0,
                       config=config, process_index=0, process_count=1)
  with pytest.raises(UserError, match="token id 50000 is outside"):
    next(loader)


def test_convert_texts_makes_chunks_that_decode_to_the_texts_joined_by_eos(tmp_path,
                                                                           gpt2_tokenizer):
  texts = ["The quick brown fox jumps over the lazy dog.",
           "Distillation trains a small student<@x(x!>on a large teacher's outputs.",
           "A third document, with some numbers: 1, 2, 3, 42.",
           "Short."]
  count = convert_texts(texts, gpt2_tokenizer, tmp_path / "owt" / "train_0", chunk_length=8)
  chunks = TokenChunks(tmp_path / "owt")
  assert count == len(chunks) > 2
  assert TokenChunks(tmp_path / "owt").files[0][0].name == "train_0.bin"
  raw = (tmp_path / "owt" / "train_0.idx").read_bytes()
  assert raw[17] == 8   # uint16, as the official picks for GPT-2's 50257 tokens
  ids = np.concatenate([chunks.item(i) for i in range(len(chunks))])
  assert all(len(chunks.item(i)) == 8 for i in range(len(chunks)))
  eos = gpt2_tokenizer.eos_token
  joined = "".join(t.replace("<@x(x!>", "\n") + eos for t in texts)
  full = [gpt2_tokenizer.encode(t.replace("<@x(x!>", "\n"), add_special_tokens=False)
          + [gpt2_tokenizer.eos_token_id] for t in texts]
  total = sum(len(f) for f in full)
  assert len(ids) == total - total % 8   # the tail shorter than a chunk is dropped
  decoded = gpt2_tokenizer.decode(ids.tolist())
  assert joined.startswith(decoded) and len(decoded) > len(joined) // 2
  assert decoded.count(eos) == sum(ids == gpt2_tokenizer.eos_token_id)


def test_convert_texts_round_trips_whole_documents_with_one_chunk(tmp_path, gpt2_tokenizer):
  text = "Hello world, this is one document."
  n = len(gpt2_tokenizer.encode(text, add_special_tokens=False)) + 1
  assert convert_texts([text], gpt2_tokenizer, tmp_path / "train_0", chunk_length=n) == 1
  chunk = TokenChunks(tmp_path).item(0)
  assert gpt2_tokenizer.decode(chunk.tolist()) == text + gpt2_tokenizer.eos_token
  encoded = ChunkEncoder(max_length=n - 1, vocab_size=len(gpt2_tokenizer))(
      TokenChunks(tmp_path)[0])
  assert encoded["labels"][-1] == gpt2_tokenizer.eos_token_id


def test_convert_texts_checks_its_arguments_before_writing(tmp_path, gpt2_tokenizer):
  with pytest.raises(UserError, match="chunk_length must be >= 2"):
    convert_texts(["text"], gpt2_tokenizer, tmp_path / "train_0", chunk_length=1)
  assert not list(tmp_path.iterdir())


def test_the_lm_term_trains_on_token_files(instruction_files, tmp_path):
  """loss.lm_coef=1 over MiniLLM token files: the step logs an LM term, the student's
  cross-entropy on the chunks (about log V at a random start), and mixing kinds is refused."""
  import pathlib

  from csd_jax.config import load_config
  from csd_jax.train.loop import train
  from instruction_data import instruction_overrides

  tiny = pathlib.Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
  rng = np.random.default_rng(0)
  write_token_files(tmp_path / "owt" / "train_0", rng.integers(0, 50257, (16, 25)), np.uint16)
  base = [*instruction_overrides(instruction_files), "loss.lm_coef=1", "train.steps=2",
          "data.max_length=24", "train.log_every=1"]
  result = train(load_config(tiny, [*base, f"data.lm_files=[{tmp_path / 'owt'}]"]),
                 tmp_path / "run")
  assert result.metrics["lm"] == pytest.approx(np.log(50257), rel=0.05)
  text = tmp_path / "text.jsonl"
  text.write_text('{"text": "hello"}')
  with pytest.raises(UserError, match="mixes token files"):
    train(load_config(tiny, [*base, f"data.lm_files=[{tmp_path / 'owt'}, {text}]"]),
          tmp_path / "mixed")
