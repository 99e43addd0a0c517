"""Checksums of a checkpoint's files: written once a step is committed, checked before a restore.

Orbax notices a checkpoint whose files are missing or unparseable, but not one whose array bytes
changed: a byte flipped inside an OCDBT data file restores, without a word, into a wrong weight
or optimizer moment. So every process lists, in `<step>/checksums.process_<i>.json`, the size
and CRC-32 of the files it wrote; a restore first checks them.

Who wrote what follows Orbax's layout: a path with a component named `process_<i>` or
`*.process_<i>` (`state/ocdbt.process_1/...`, `state/array_metadatas/process_1`) is process i's
shards; everything else (the step and item metadata, the merged OCDBT root, the JSON items) is
written by the primary process, 0. Each file is hashed once, by the process that wrote it and
has it in its page cache.

The lists are plain files at the top of the step directory: Orbax's composite handler takes
only directories for items, and a step's name and commit never depend on them. Each is written
to a dot-named temporary file, flushed to disk and renamed, so a list is whole or absent.

In an object store (a `gs://` workdir) the files are not read back: GCS computes the CRC-32C of
every object as it is uploaded and keeps it in the object's metadata, so the list records that
("gcs-crc32c") and a restore compares it with the object's current metadata, which catches a
missing, replaced or truncated object for the price of one metadata request a file. (GCS itself
guards objects at rest against bit flips.)

CRC-32 (zlib) is chosen by `bench/checkpoint_checksums.py`: on a 0.9 GB checkpoint it hashes
2.2 GB/s from the page cache (sha256 1.2, blake2b 0.6), 0.13x the time Orbax takes to restore
it. It catches what happens to files at rest (truncation, torn writes, flipped bits), missing a
random change with a 2^-32 chance; there is no adversary to resist.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import zlib
from collections.abc import Callable
from typing import Any

from csd_jax.runtime import paths
from csd_jax.runtime.distributed import from_every_process

LIST_PREFIX, LIST_SUFFIX = "checksums.process_", ".json"
ALGORITHM = "crc32"
REMOTE_ALGORITHM = "gcs-crc32c"   # the object store's own checksum, read from its metadata
FORMAT = 1
_CHUNK = 8 << 20      # large reads: zlib and hashlib release the GIL on big buffers
_OWNER = re.compile(r"(?:^|\.)process_(\d+)$")


class _Crc32:
  """zlib.crc32 behind hashlib's update/hexdigest."""

  def __init__(self) -> None:
    self.value = 0

  def update(self, data: Any) -> None:
    self.value = zlib.crc32(data, self.value)

  def hexdigest(self) -> str:
    return f"{self.value:08x}"


ALGORITHMS: dict[str, Callable[[], Any]] = {
    "crc32": _Crc32, "sha256": hashlib.sha256, "blake2b": hashlib.blake2b}


class _Crc32c:
  """CRC-32C (Castagnoli) as GCS writes it in object metadata: base64 of the 4 bytes, big-endian.
  Computed here for a step that was saved in a bucket and copied to a disk since."""

  def __init__(self) -> None:
    import google_crc32c   # a dependency of gcsfs (google-cloud-storage)

    self._checksum = google_crc32c.Checksum()

  def update(self, data: Any) -> None:
    self._checksum.update(bytes(data))

  def hexdigest(self) -> str:
    return base64.b64encode(self._checksum.digest()).decode()


def hash_file(path: paths.PathLike, algorithm: str = ALGORITHM) -> str:
  """The digest of the file's bytes, as the checksum lists write it. REMOTE_ALGORITHM: an
  object's stored CRC-32C (nothing downloaded), or the same value computed from a local file;
  the other algorithms read the file, local or remote (a run moved into or out of a bucket is
  checked like one that never moved)."""
  remote = paths.is_remote(path)
  if algorithm == REMOTE_ALGORITHM and remote:
    return paths.object_crc32c(path)
  hasher = _Crc32c() if algorithm == REMOTE_ALGORITHM else ALGORITHMS[algorithm]()
  if remote:
    with paths.open_binary(path) as f:
      while chunk := f.read(_CHUNK):
        hasher.update(chunk)
    return hasher.hexdigest()
  buffer = bytearray(_CHUNK)
  view = memoryview(buffer)
  with open(path, "rb", buffering=0) as f:
    while n := f.readinto(buffer):
      hasher.update(view[:n])
  return hasher.hexdigest()


def owner(relative: str) -> int:
  """The process that writes the file at `relative` (a path inside the step directory)."""
  for part in reversed(pathlib.PurePosixPath(relative).parts):
    if m := _OWNER.search(part):
      return int(m.group(1))
  return 0


def _list_name(process: int) -> str:
  return f"{LIST_PREFIX}{process}{LIST_SUFFIX}"


def _is_list(name: str) -> bool:
  """Our lists and their temporaries: never hashed themselves."""
  return name.lstrip(".").startswith(LIST_PREFIX)


def step_files(step_dir: paths.PathLike) -> list[str]:
  """Every file in the step directory (relative POSIX paths), our lists left out."""
  return [rel for rel in paths.walk_files(step_dir)
          if not _is_list(pathlib.PurePosixPath(rel).name)]


def write_checksums(step_dir: paths.PathLike, process: int, process_count: int,
                    algorithm: str | None = None) -> paths.PathLike:
  """Hash the files of the committed step `step_dir` that `process` wrote, and write their
  list atomically. Returns the list's path. `algorithm`: ALGORITHM on a disk, REMOTE_ALGORITHM
  in an object store, by default."""
  step_dir = paths.as_path(step_dir)
  remote = paths.is_remote(step_dir)
  algorithm = algorithm or (REMOTE_ALGORITHM if remote else ALGORITHM)
  files = {rel: [paths.file_size(step_dir / rel), hash_file(step_dir / rel, algorithm)]
           for rel in step_files(step_dir) if owner(rel) == process}
  document = {"format": FORMAT, "algorithm": algorithm, "process": process,
              "process_count": process_count, "files": files}
  final = step_dir / _list_name(process)
  if remote:   # one upload: the list is whole or absent
    final.write_text(json.dumps(document))
    return final
  temporary = step_dir / f".{final.name}.tmp-{os.getpid()}"
  with open(temporary, "w") as f:
    json.dump(document, f)
    f.flush()
    os.fsync(f.fileno())  # a power cut must not leave a list that names no file
  os.replace(temporary, final)
  try:  # the rename itself, on disk
    directory = os.open(step_dir, os.O_RDONLY)
    try:
      os.fsync(directory)
    finally:
      os.close(directory)
  except OSError:
    pass
  return final


@dataclasses.dataclass(frozen=True)
class Verdict:
  """What the checksums say about a step. `damage`: why it must not be restored (one line);
  `unverified`: why some or all of it could not be checked (it may still be restored)."""
  damage: str | None = None
  unverified: str | None = None


def _read_lists(step_dir: paths.PathLike) -> tuple[dict[str, tuple[int, str, str]], str | None]:
  """{file: (bytes, algorithm, digest)} from every list in the step, and what is not covered."""
  lists = sorted(p for p in step_dir.glob(f"{LIST_PREFIX}*{LIST_SUFFIX}"))
  if not lists:
    return {}, ("it has no checksums (saved by an older csd-jax, or the run stopped between the "
                "checkpoint's commit and its checksums)")
  entries: dict[str, tuple[int, str, str]] = {}
  present, expected, unreadable = set(), 1, []
  for path in lists:
    present.add(path.name[len(LIST_PREFIX):-len(LIST_SUFFIX)])
    try:  # a list is renamed into place whole; one that does not parse checks nothing
      document = json.loads(path.read_text())
      for rel, (size, digest) in document["files"].items():
        entries[rel] = (int(size), document["algorithm"], str(digest))
      expected = max(expected, int(document["process_count"]))
    except (OSError, ValueError, KeyError, TypeError):
      unreadable.append(path.name)
  gaps = [f"unreadable checksum lists {', '.join(unreadable)}"] if unreadable else []
  if missing := [str(i) for i in range(expected) if str(i) not in present]:
    gaps.append(f"no checksums from process(es) {', '.join(missing)}")
  return entries, ("; ".join(gaps) or None)


def _check(step_dir: paths.PathLike, rel: str, size: int, algorithm: str, digest: str
           ) -> tuple[str | None, str | None]:
  """(damage, unverified) of one listed file: what proves it changed, or why it could not be
  checked (an unknown algorithm, an object store that failed to answer)."""
  path = step_dir / rel
  try:
    actual = paths.file_size(path)
    if actual != size:
      return f"{rel} has {actual} bytes, {size} were saved", None
    if algorithm not in ALGORITHMS and algorithm != REMOTE_ALGORITHM:
      return None, None  # a newer csd-jax's hash: not checkable here, not evidence of damage
    if hash_file(path, algorithm) != digest:
      return f"{rel} does not match its {algorithm} checksum", None
  except FileNotFoundError:
    return f"{rel} is missing", None
  except ImportError as error:   # google-crc32c absent: REMOTE_ALGORITHM cannot be computed
    return None, f"{rel} not checked ({error})"
  except Exception as error:  # noqa: BLE001 (gcsfs raises its HttpError, not an OSError)
    if paths.is_remote(path):   # the object store failing to answer proves nothing
      return None, f"{rel} could not be checked ({type(error).__name__}: {error})"
    if isinstance(error, OSError):
      return f"{rel} cannot be read ({error.strerror or error})", None
    raise
  return None, None


def verify(step_dir: paths.PathLike, process: int = 0, process_count: int = 1,
           gather: Callable[[Any], list[Any]] = from_every_process) -> Verdict:
  """Check the step's files against its lists. With several processes, each checks every
  `process_count`-th file (the checkpoint is read once in all) and `gather` (an all-gather of
  JSON-able values, in process order) gives every process the same verdict."""
  step_dir = paths.as_path(step_dir)
  entries, unverified = _read_lists(step_dir)
  damage, unchecked = None, None
  for rel in sorted(entries)[process::process_count]:
    damage, reason = _check(step_dir, rel, *entries[rel])
    unchecked = unchecked or reason
    if damage:
      break
  if process_count > 1:   # damage decides what every process does: the same on all
    damage = next((d for d in gather(damage) if d), None)
  # What could not be checked only adds to a warning: each process tells its own.
  unverified = "; ".join(r for r in (unverified, unchecked) if r) or None
  return Verdict(damage, unverified)
