"""Paths on local disks and on object stores (`gs://bucket/run`, `s3://...`) as one type.

Every path of a run goes through `etils.epath` (Orbax's own path layer): `as_path` turns what a
user typed into an `epath.Path`, which reads and writes a local file or a GCS object alike
(gcsfs under it). What an object store lacks is handled here, once:

- no rename: `write_atomic` writes a local file under a temporary name and renames it (readers
  see the old file or the new one); an object is written in one upload instead, which GCS makes
  visible whole or not at all;
- no O_EXCL: `create_exclusive` is `os.open(O_CREAT | O_EXCL)` locally and a create with
  `ifGenerationMatch=0` on GCS (gcsfs's `open(mode="xb")`);
- no memory-mapped or library-opened files (safetensors, tokenizers, memmapped token files):
  `local_copy` copies a remote file or directory into a local cache once and returns its path.

gcsfs's listing cache is off (`_fresh_listings`): a directory listed once would otherwise stay as
it was for the life of the process, blind to what the run's other hosts (or a resumed run)
wrote or deleted since, e.g. a checkpoint step that another process committed.

`pathlib.Path("gs://b/run")` is the local directory `gs:/b/run` and `epath.Path(...).absolute()`
of a URL is `$PWD/gs:/b/run`: neither is ever called on a path that may be remote.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from typing import IO, Any

from etils import epath

PathLike = str | os.PathLike
_COPY_CHUNK = 16 << 20


def _fresh_listings() -> None:
  """Every gcsfs filesystem made from now on (etils.epath's included) lists afresh."""
  try:
    import fsspec.config
  except ImportError:   # no fsspec: no URL paths either
    return
  for protocol in ("gcs", "gs"):
    fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


_fresh_listings()


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: PathLike) -> bool:
  """True for a URL (`gs://...`, `s3://...`), False for a local path (`runs/lr=gs://x` is a
  local path: the scheme must start the string)."""
  return _URL.match(os.fspath(path)) is not None


def as_path(path: PathLike) -> epath.Path:
  """`path` as an `epath.Path`: a URL as it is, a local path with `~` expanded."""
  text = os.fspath(path)
  return epath.Path(text if is_remote(text) else os.path.expanduser(text))


def absolute(path: PathLike) -> epath.Path:
  """`as_path(path)`, made absolute when it is local (a URL already is)."""
  text = os.fspath(path)
  return epath.Path(text) if is_remote(text) else epath.Path(
      os.path.abspath(os.path.expanduser(text)))


def _filesystem(path: PathLike) -> Any:
  import fsspec   # an etils.epath dependency for URLs

  return fsspec.core.url_to_fs(os.fspath(path))[0]


def write_atomic(path: PathLike, data: str | bytes) -> None:
  """Replace the file at `path` with `data`, so that readers see the old content or the new,
  never half of it (locally a temporary file renamed over it; remotely one object upload)."""
  path = as_path(path)
  raw = data.encode() if isinstance(data, str) else data
  if is_remote(path):
    path.write_bytes(raw)
    return
  temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
  with open(temporary, "wb") as f:
    f.write(raw)
  os.replace(temporary, path)


def create_exclusive(path: PathLike, data: bytes) -> bool:
  """Create the file at `path` holding `data`; False, writing nothing, when it exists. Two
  contenders on one path (two hosts on one bucket included): exactly one gets True."""
  path = as_path(path)
  if is_remote(path):
    try:
      with _filesystem(path).open(os.fspath(path), "xb") as f:
        f.write(data)
    except FileExistsError:
      return False
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "wb") as f:
    f.write(data)
  return True


def _is_gcs(path: PathLike) -> bool:
  return os.fspath(path).startswith(("gs://", "gcs://"))


def generation(path: PathLike) -> str | None:
  """Which version of the file at `path` is there now: on GCS the object's generation (a new
  one with every upload, so equal generations mean the very same upload); on a disk its inode
  and change time in nanoseconds; None on an object store that gives none.

  Raises:
    FileNotFoundError: there is no such file.
  """
  if not is_remote(path):
    status = os.stat(os.path.expanduser(os.fspath(path)))
    return f"{status.st_ino}-{status.st_ctime_ns}"
  value = _filesystem(path).info(os.fspath(path)).get("generation") if _is_gcs(path) else None
  return None if value in (None, "") else str(value)


def delete_if_generation(path: PathLike, generation: str) -> bool:
  """Delete the GCS object at `path` only while its generation is still `generation` (one
  DELETE with `ifGenerationMatch`: GCS checks and deletes in one step, so two clients deleting
  the same generation cannot both succeed, nor delete an object uploaded since); False, deleting
  nothing, where it has another generation or is gone. gcsfs has no public call for it.

  Raises:
    ValueError: `path` is not on GCS (a disk has no conditional delete: see WorkdirLock's
      hard-link claims).
  """
  text = os.fspath(path)
  if not _is_gcs(text):
    raise ValueError(f"{text}: a conditional delete needs a gs:// path")
  filesystem = _filesystem(text)
  bucket, key, _ = filesystem.split_path(text)
  try:
    filesystem.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=generation)
  except FileExistsError:    # gcsfs's 412 (precondition failed): another generation, or gone
    return False
  except FileNotFoundError:  # 404: gone
    return False
  filesystem.invalidate_cache(text)
  return True


def open_binary(path: PathLike) -> IO[bytes]:
  """`path` opened for reading bytes, local or remote."""
  return as_path(path).open("rb")


def remove_tree(path: PathLike) -> None:
  """Delete the directory `path` and everything under it."""
  path = as_path(path)
  if is_remote(path):
    _filesystem(path).rm(os.fspath(path), recursive=True)
  else:
    shutil.rmtree(path)


def rename_tree(source: PathLike, destination: PathLike) -> None:
  """Move the directory `source` to `destination` (remotely a copy of every object, then a
  delete: object stores have no rename)."""
  source, destination = as_path(source), as_path(destination)
  if not is_remote(source):
    os.rename(source, destination)
    return
  filesystem = _filesystem(source)
  filesystem.copy(os.fspath(source), os.fspath(destination), recursive=True)
  # Orbax's marker of a complete checkpoint goes first: a delete cut short must not leave a
  # directory that still claims to be complete.
  marker = source / "commit_success.txt"
  if marker.exists():
    marker.unlink()
  filesystem.rm(os.fspath(source), recursive=True)


def file_size(path: PathLike) -> int:
  """The file's size in bytes.

  Raises:
    FileNotFoundError: there is no such file.
  """
  path = as_path(path)
  return path.stat().length if is_remote(path) else os.path.getsize(path)


def object_crc32c(path: PathLike) -> str:
  """The CRC-32C that the object store computed when the object was uploaded (its metadata:
  nothing is downloaded).

  Raises:
    FileNotFoundError: there is no such object.
  """
  info = _filesystem(path).info(os.fspath(path))
  if not info.get("crc32c"):
    raise OSError(f"{os.fspath(path)}: the object store gives no crc32c for it")
  return str(info["crc32c"])


def walk_files(directory: PathLike) -> list[str]:
  """Every file under `directory`, as sorted relative POSIX paths."""
  directory = as_path(directory)
  if not is_remote(directory):
    return sorted(os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
                  for root, _, names in os.walk(directory) for name in names)
  return sorted(_remote_listing(directory))


def _remote_listing(directory: epath.Path) -> dict[str, dict[str, Any]]:
  """{relative name: object metadata} of every object under `directory`; the empty "folder"
  objects (`name/`) that consoles create are left out."""
  filesystem, root = _filesystem(directory), os.fspath(directory).split("://", 1)[1].rstrip("/")
  found = filesystem.find(root, detail=True)
  return {name[len(root) + 1:]: info for name, info in found.items()
          if name[len(root) + 1:] and not name.endswith("/")}


def copy_file(source: PathLike, destination: PathLike) -> None:
  """Copy one file, local or remote either side, streamed (a 5 GB shard never sits in memory)."""
  with open_binary(source) as reader, as_path(destination).open("wb") as writer:
    shutil.copyfileobj(reader, writer, _COPY_CHUNK)


def _kept(name: str, skip_suffixes: tuple[str, ...]) -> bool:
  return not (skip_suffixes and name.endswith(skip_suffixes))


def copy_tree(source: PathLike, destination: PathLike, *, last: tuple[str, ...] = (),
              skip_suffixes: tuple[str, ...] = ()) -> None:
  """Copy every file under the directory `source` to the same place under `destination`
  (either may be local or remote), overwriting files of the same name. `last`: names copied
  after all the others (a model's config.json: a copy cut short has none, and is not taken for
  a model); `skip_suffixes`: files left out."""
  source, destination = as_path(source), as_path(destination)
  names = [n for n in walk_files(source) if _kept(n, skip_suffixes)]
  for relative in sorted(names, key=lambda n: n in last):
    target = destination / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    copy_file(source / relative, target)


def cache_root() -> epath.Path:
  """Where `local_copy` keeps remote files: $CSD_JAX_CACHE, else ~/.cache/csd_jax."""
  return as_path(os.environ.get("CSD_JAX_CACHE", "~/.cache/csd_jax"))


def local_copy(path: PathLike, *, skip_suffixes: tuple[str, ...] = ()) -> str:
  """A local path holding the file or directory `path`: `path` itself when local; for a URL,
  a copy in `cache_root()/remote/`. The copy is named after the URL and the objects' names,
  sizes and checksums, so changed objects get a new copy, and an unchanged one is copied once;
  it is made in a temporary directory and renamed when whole, so an interrupted copy is never
  taken for a complete one. `skip_suffixes`: files left out (a tokenizer needs no weights)."""
  text = os.fspath(path)
  if not is_remote(text):
    return os.path.expanduser(text)
  source = as_path(text)
  is_dir = source.is_dir()
  listing = (_remote_listing(source) if is_dir
             else {"": _filesystem(source).info(os.fspath(source))})
  manifest = sorted((name, info.get("size"), info.get("crc32c") or info.get("generation"))
                    for name, info in listing.items() if _kept(name, skip_suffixes))
  digest = hashlib.sha256(json.dumps([text.rstrip("/"), manifest]).encode()).hexdigest()[:16]
  target = cache_root() / "remote" / f"{digest}-{source.name}"
  if target.exists():
    return os.fspath(target)
  target.parent.mkdir(parents=True, exist_ok=True)
  temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}")
  if is_dir:
    copy_tree(source, temporary, skip_suffixes=skip_suffixes)
  else:
    copy_file(source, temporary)
  try:
    os.rename(temporary, target)
  except OSError:   # another process finished the same copy first
    if not target.exists():
      raise
    remove_tree(temporary) if temporary.is_dir() else temporary.unlink()
  return os.fspath(target)
