"""MiniLLM / DistiLLM pre-training token files (`{split}_{k}.bin` + `.idx`): read, write, convert.

MiniLLM's `tools/process_data_pretrain.py` tokenises OpenWebText (GPT-2) or RoBERTa's corpus
(LLaMA) into the Megatron / fairseq "mmap" indexed format, and both MiniLLM and DistiLLM train
their LM term (`loss.lm_coef`) on those files (e.g. `processed_data/openwebtext/gpt2/512/10M/`):

- Each document is encoded without special tokens and followed by eos; the documents are
  concatenated and cut into chunks of `--max-length` tokens (512 in the official scripts); the
  tail shorter than a chunk is dropped. The first `--dev-num` chunks go to `valid_0`, the rest to
  `train_0`. Ids are uint16 when the vocabulary has < 65500 tokens, else int32.
- `.bin`: the chunks' token arrays back to back, no header.
- `.idx` (little-endian): magic b"MMIDIDX\\x00\\x00", version `<Q` = 1, dtype code `<B` (`DTYPES`),
  item count `<Q` n, document count `<Q` d, then int32[n] sizes (tokens per item), int64[n]
  pointers (byte offsets into `.bin`), int64[d] document index (the official writer never ends
  a document, so it is [0]).

The official LM batch takes a chunk as is (cut to `--max-length` tokens), trains on
input = chunk[:-1], labels = chunk[1:] (511 targets for a 512-token chunk) and averages the
cross-entropy over those tokens. `TokenChunks` (the random-access source) and `ChunkEncoder`
(chunk -> pre-shifted example) stand in for a text source and `instruct.TextTokenizer` in
`loader.BatchLoader`; `write_token_files` / `convert_texts` make such files from raw text.
Files are memory-mapped: reading one chunk reads a few pages, never the whole (10 GB) file.
"""

from __future__ import annotations

import os
import pathlib
import re
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from csd_jax.runtime import paths
from csd_jax.errors import UserError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
# The dtype codes of MiniLLM's `data_utils/indexed_dataset.py` (and Megatron's): 6 and 7 are
# floats, which hold no token ids.
DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8), 2: np.dtype(np.int8), 3: np.dtype(np.int16), 4: np.dtype(np.int32),
    5: np.dtype(np.int64), 6: np.dtype(np.float32), 7: np.dtype(np.float64),
    8: np.dtype(np.uint16), 9: np.dtype(np.uint32)}
_HEADER = struct.Struct("<9sQBQQ")   # magic, version, dtype code, item count, document count
# MiniLLM encodes the newlines inside a document of its one-document-per-line data.txt as this.
NEWLINE_MARKER = "<@x(x!>"
_SPLIT_FILE = re.compile(r"(?P<split>.+)_(?P<k>\d+)\.bin")

Entry = str | os.PathLike
Pair = tuple[pathlib.Path, pathlib.Path]


def best_fitting_dtype(vocab_size: int | None) -> np.dtype:
  """The official choice: uint16 for a vocabulary under 65500 tokens, else int32."""
  return np.dtype(np.uint16 if vocab_size is not None and vocab_size < 65500 else np.int32)


def _code(dtype: Any) -> int:
  dtype = np.dtype(dtype)
  for code, candidate in DTYPES.items():
    if candidate == dtype and np.issubdtype(dtype, np.integer):
      return code
  names = ", ".join(str(d) for d in DTYPES.values() if np.issubdtype(d, np.integer))
  raise UserError(f"token file dtype {dtype} is not an integer type of the index format; "
                  f"pass one of {names} (best_fitting_dtype(vocab_size) picks the official one)")


def _with_suffix(prefix: pathlib.Path, suffix: str) -> pathlib.Path:
  # Appended, not Path.with_suffix: a prefix such as "owt.v2/train_0" keeps its dots.
  return prefix.parent / (prefix.name + suffix)


def _split_files(directory: pathlib.Path, split: str) -> list[pathlib.Path]:
  """`{split}_{k}.bin` in `directory`, sorted by k as a number (train_2 before train_10)."""
  found = []
  for path in directory.iterdir():
    match = _SPLIT_FILE.fullmatch(path.name)
    if match and match["split"] == split:
      found.append((int(match["k"]), path))
  return [path for _, path in sorted(found)]


def token_file_paths(entries: Entry | Iterable[Entry], *, split: str = "train") -> list[Pair]:
  """The (`.bin`, `.idx`) pairs that `entries` name, in order, each pair once.

  An entry is a `.bin` or `.idx` path (its partner is beside it), a prefix such as
  `.../512/10M/train_0`, or a directory: all `{split}_{k}.bin` in it (`train_*.bin` by default),
  sorted by k as a number. MiniLLM's reader also walks `train_0`, `train_1`, ... but stops at
  the first missing k; here every file present is read. A missing partner file is an error.
  """
  if isinstance(entries, (str, os.PathLike)):
    entries = [entries]
  pairs: list[Pair] = []
  for entry in entries:
    path = paths.as_path(entry)   # local, or in a bucket (gs://...): found there, mapped here
    if path.is_dir():
      bins = _split_files(path, split)
      if not bins:
        raise UserError(f"directory {path} holds no {split}_{{k}}.bin token files; pass a "
                        "directory made by process_data_pretrain.py, or the files themselves")
      prefixes = [b.parent / b.stem for b in bins]
    elif path.suffix in (".bin", ".idx"):
      prefixes = [path.parent / path.stem]
    else:
      prefixes = [path]
    for prefix in prefixes:
      bin_path, idx_path = _with_suffix(prefix, ".bin"), _with_suffix(prefix, ".idx")
      if not bin_path.is_file() and not idx_path.is_file():
        raise UserError(f"no token files at {entry}: expected {bin_path} and {idx_path}; pass a "
                        f".bin / .idx path, their prefix, or a directory of {split}_{{k}}.bin")
      for have, missing in ((bin_path, idx_path), (idx_path, bin_path)):
        if not missing.is_file():
          raise UserError(f"token file {have} has no partner {missing}: a .bin and its .idx "
                          "come in pairs; copy both files")
      pair = (_local(bin_path), _local(idx_path))   # memory-mapped: a local file
      if pair not in pairs:   # "x.bin" and "x.idx" name one pair, read once
        pairs.append(pair)
  return pairs


def _local(path: paths.PathLike) -> pathlib.Path:
  """A local path to the file: itself, or its copy in the local cache (`paths.local_copy`)."""
  return pathlib.Path(paths.local_copy(path))


def is_token_file(entry: Entry) -> bool:
  """Whether a `data.lm_files` entry names MiniLLM token files rather than JSONL / JSON /
  Parquet text: a `.bin` / `.idx` path, a prefix with a `.bin` or `.idx` beside it, or a
  directory holding `train_{k}.bin` files. It says nothing about whether the files are valid."""
  path = paths.as_path(entry)
  if path.suffix in (".bin", ".idx"):
    return True
  if path.is_dir():
    return bool(_split_files(path, "train"))
  return _with_suffix(path, ".bin").is_file() or _with_suffix(path, ".idx").is_file()


class _Header:
  """One file pair's validated `.idx` header (no arrays: those are mapped when first read)."""

  def __init__(self, bin_path: pathlib.Path, idx_path: pathlib.Path):
    self.bin_path, self.idx_path = bin_path, idx_path
    idx_bytes = idx_path.stat().st_size
    with open(idx_path, "rb") as f:
      head = f.read(_HEADER.size)
      if len(head) < _HEADER.size:
        raise UserError(f"token index {idx_path} is truncated: {idx_bytes} bytes, shorter than "
                        f"the {_HEADER.size}-byte header; copy the file again")
      magic, version, code, count, docs = _HEADER.unpack(head)
      if magic != MAGIC:
        kind = ("fairseq's 'lazy'/'cached' index (TNTIDX)" if magic.startswith(b"TNTIDX")
                else f"magic {magic!r}")
        raise UserError(f"token index {idx_path} is {kind}, not an mmap index (MMIDIDX); pass "
                        "files made by MiniLLM's process_data_pretrain.py or write_token_files")
      if version != VERSION:
        raise UserError(f"token index {idx_path} has format version {version}, expected "
                        f"{VERSION}; re-make it with process_data_pretrain.py or "
                        "write_token_files")
      dtype = DTYPES.get(code)
      if dtype is None or not np.issubdtype(dtype, np.integer):
        what = "unknown" if dtype is None else f"{dtype}, not an integer type"
        raise UserError(f"token index {idx_path} has dtype code {code} ({what}); token files "
                        "hold integer ids: re-make them with write_token_files")
      self.dtype = dtype.newbyteorder("<")
      self.count, self.docs = count, docs
      expected = _HEADER.size + count * (4 + 8) + docs * 8
      if idx_bytes != expected:
        raise UserError(f"token index {idx_path} is {idx_bytes} bytes but its header ({count} "
                        f"items, {docs} documents) needs {expected}: the file is truncated or "
                        "corrupt; copy it again")
      if count:
        # The last item ends the data (the writer lays items out in order): one read checks
        # the .bin's length without touching the n-item arrays.
        f.seek(_HEADER.size + 4 * (count - 1))
        (last_size,) = struct.unpack("<i", f.read(4))
        f.seek(_HEADER.size + 4 * count + 8 * (count - 1))
        (last_pointer,) = struct.unpack("<q", f.read(8))
    if count:
      needed = last_pointer + last_size * self.dtype.itemsize
      have = bin_path.stat().st_size
      if have < needed:
        raise UserError(f"token data {bin_path} is truncated: {have} bytes, its index "
                        f"{idx_path.name} needs {needed}; copy the .bin again")


class TokenChunks:
  """Random-access token chunks over one or more `.bin` / `.idx` pairs, for `BatchLoader`.

  `entries`: what `token_file_paths` accepts (paths, prefixes, directories). Headers are checked
  here; the files are memory-mapped on first read, and a pickled copy (Grain worker processes)
  carries only the paths and headers. `item(i)` is chunk i as int32;
  `source[i]` is {"input_ids": item(i)}, a record, since the loader reads records as mappings
  (the same form as MiniLLM's `LMPipeline._get_lm`).
  """

  def __init__(self, entries: Entry | Iterable[Entry], *, split: str = "train"):
    self.files = token_file_paths(entries, split=split)
    self._headers = [_Header(b, i) for b, i in self.files]
    self._starts = np.cumsum([0] + [h.count for h in self._headers], dtype=np.int64)
    if self._starts[-1] == 0:
      names = ", ".join(str(b) for b, _ in self.files)
      raise UserError(f"token files {names} hold no chunks; pass files with data")
    self._maps: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] | None = None

  def __len__(self) -> int:
    return int(self._starts[-1])

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_maps": None}   # memory maps stay behind; reopened on first read

  def _open(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray] | None]:
    maps: list[tuple[np.ndarray, np.ndarray, np.ndarray] | None] = []
    for h in self._headers:
      if not h.count:   # np.memmap refuses empty maps; an empty pair is never indexed
        maps.append(None)
        continue
      sizes = np.memmap(h.idx_path, dtype="<i4", mode="r", offset=_HEADER.size,
                        shape=(h.count,))
      pointers = np.memmap(h.idx_path, dtype="<i8", mode="r",
                           offset=_HEADER.size + 4 * h.count, shape=(h.count,))
      maps.append((sizes, pointers, np.memmap(h.bin_path, dtype=np.uint8, mode="r")))
    return maps

  def item(self, index: int) -> np.ndarray:
    """Chunk `index` (0 <= index < len; negative counts from the end) as int32 token ids."""
    total = len(self)
    index = int(index)
    if index < 0:
      index += total
    if not 0 <= index < total:
      raise IndexError(f"chunk {index} out of range for {total} chunks")
    if self._maps is None:
      self._maps = self._open()   # one assignment: concurrent readers at worst map twice
    file = int(np.searchsorted(self._starts, index, side="right")) - 1
    header = self._headers[file]
    sizes, pointers, data = self._maps[file]
    local = index - int(self._starts[file])
    size, pointer = int(sizes[local]), int(pointers[local])
    try:
      ids = np.frombuffer(data, dtype=header.dtype, count=size, offset=pointer)
    except ValueError:
      raise UserError(f"token data {header.bin_path} ends before chunk {local} (bytes "
                      f"{pointer}..{pointer + size * header.dtype.itemsize}); the .bin or .idx "
                      "is corrupt: copy both again") from None
    if header.dtype.itemsize >= 4 and header.dtype != np.int32 and size and (
        ids.max() > np.iinfo(np.int32).max):
      raise UserError(f"token data {header.bin_path} chunk {local} holds id {int(ids.max())}, "
                      "beyond int32; these are not token ids of a model vocabulary")
    return ids.astype(np.int32)   # a copy: no reference into the memory map escapes

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"input_ids": self.item(index)}

  def __repr__(self) -> str:
    return f"TokenChunks({len(self)} chunks in {len(self.files)} file pairs)"


class ChunkEncoder:
  """A token chunk -> {"input_ids": chunk[:-1], "labels": chunk[1:]} (int32), for `BatchLoader`.

  As MiniLLM's `LMPipeline` does, a chunk is used as is, never split into windows: a longer one
  is cut to `max_length + 1` tokens (so that `input_ids` fill a `max_length` row; the official
  cuts to `max_length` tokens, the same 511 targets for the official 512-token chunks with
  `data.max_length` 512) and the rest is dropped. A chunk of one token gives no target: None.
  `vocab_size`: the model's; an id outside [0, vocab_size) means the files were tokenised for
  another model (UserError). Takes a `TokenChunks` record or a bare id array.
  """

  def __init__(self, max_length: int, vocab_size: int | None = None):
    if max_length < 1:
      raise UserError(f"max_length must be >= 1, got {max_length}; pass a positive length")
    self.max_length, self.vocab_size = max_length, vocab_size

  def __call__(self, record: Mapping[str, Any] | np.ndarray) -> dict[str, np.ndarray] | None:
    ids = record["input_ids"] if isinstance(record, Mapping) else record
    ids = np.asarray(ids)[:self.max_length + 1].astype(np.int32)
    if len(ids) < 2:
      return None
    if self.vocab_size is not None:
      low, high = int(ids.min()), int(ids.max())
      if low < 0 or high >= self.vocab_size:
        bad = low if low < 0 else high
        raise UserError(f"token id {bad} is outside the model's vocabulary of "
                        f"{self.vocab_size}: the token files were made with another tokenizer;"
                        " re-make them with convert_texts and this model's tokenizer")
    return {"input_ids": ids[:-1], "labels": ids[1:]}


def write_token_files(prefix: Entry, items: Iterable[Sequence[int] | np.ndarray],
                      dtype: Any = np.uint16) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes `items` (token id sequences) as `{prefix}.bin` + `{prefix}.idx` in the official
  layout (one document, as MiniLLM's writer leaves it) and returns the two paths.

  `dtype`: an integer type of `DTYPES`; `best_fitting_dtype(len(tokenizer))` is the official
  choice. Items are streamed to disk; only their sizes stay in memory.
  """
  dtype = np.dtype(dtype)
  code = _code(dtype)
  dtype = dtype.newbyteorder("<")
  info = np.iinfo(dtype)
  prefix = pathlib.Path(prefix).expanduser()
  prefix.parent.mkdir(parents=True, exist_ok=True)
  bin_path, idx_path = _with_suffix(prefix, ".bin"), _with_suffix(prefix, ".idx")
  sizes: list[int] = []
  with open(bin_path, "wb") as f:
    for item in items:
      ids = np.asarray(item)
      low, high = (int(ids.min()), int(ids.max())) if ids.size else (0, 0)
      if low < info.min or high > info.max:
        raise UserError(f"token id {low if low < info.min else high} does not fit "
                        f"{dtype.name}; pass dtype=np.int32 (best_fitting_dtype(vocab_size) "
                        "picks the official type)")
      f.write(ids.astype(dtype).tobytes())
      sizes.append(int(ids.size))
  sizes_arr = np.asarray(sizes, dtype="<i4")
  pointers = np.zeros(len(sizes), dtype="<i8")
  pointers[1:] = np.cumsum(sizes_arr[:-1], dtype=np.int64) * dtype.itemsize
  doc_index = np.zeros(1, dtype="<i8")
  with open(idx_path, "wb") as f:
    f.write(_HEADER.pack(MAGIC, VERSION, code, len(sizes), len(doc_index)))
    f.write(sizes_arr.tobytes())
    f.write(pointers.tobytes())
    f.write(doc_index.tobytes())
  return bin_path, idx_path


def text_chunks(texts: Iterable[str], tokenizer: Any, chunk_length: int = 512
                ) -> Iterator[np.ndarray]:
  """Chunks of exactly `chunk_length` ids, as process_data_pretrain.py cuts them: each text
  encoded without special tokens, `<@x(x!>` read as a newline, eos after it, concatenated; the
  tail shorter than a chunk is dropped."""
  if chunk_length < 2:
    raise UserError(f"chunk_length must be >= 2 (a chunk needs a target), got {chunk_length}; "
                    "pass e.g. 512")
  eos = getattr(tokenizer, "eos_token_id", None)
  if eos is None:
    raise UserError(f"{type(tokenizer).__name__} has no eos token; the chunks separate documents"
                    " with eos: set tokenizer.eos_token")

  # A generator inside: the checks above run at the call, before any file is written.
  def chunks() -> Iterator[np.ndarray]:
    buffer: list[int] = []
    for text in texts:
      buffer.extend(tokenizer.encode(text.replace(NEWLINE_MARKER, "\n"),
                                     add_special_tokens=False))
      buffer.append(eos)
      while len(buffer) >= chunk_length:
        yield np.asarray(buffer[:chunk_length], dtype=np.int64)
        del buffer[:chunk_length]

  return chunks()


def convert_texts(texts: Iterable[str], tokenizer: Any, prefix: Entry, chunk_length: int = 512,
                  dtype: Any = None) -> int:
  """Raw documents -> `{prefix}.bin` / `.idx` token files, as MiniLLM's process_data_pretrain.py
  makes them (see `text_chunks`); returns the number of chunks written.

  `dtype` defaults to the official `best_fitting_dtype(len(tokenizer))`. To reproduce the
  official files from its one-document-per-line data.txt, pass the file's lines unchanged (the
  official encodes each line with its trailing newline). It writes one split: for MiniLLM's
  layout, write the first `dev_num` chunks to `valid_0` and the rest to `train_0`.
  """
  if dtype is None:
    dtype = best_fitting_dtype(len(tokenizer))
  count = 0

  def counted(chunks: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
    nonlocal count
    for chunk in chunks:
      count += 1
      yield chunk

  write_token_files(prefix, counted(text_chunks(texts, tokenizer, chunk_length)), dtype)
  return count
