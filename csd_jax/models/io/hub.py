"""Hugging Face hub ids as model paths: `Qwen/Qwen2.5-1.5B-Instruct`, `owner/name@<revision>`.

    resolve("Qwen/Qwen2.5-1.5B-Instruct@main")   # -> .../models--Qwen--.../snapshots/<commit>
    resolve("models/student")                     # an existing directory: returned as given

One resolution order, used by every place that opens a model or tokenizer directory: a string
that exists on disk (a directory named like a hub id included), a URL (`gs://...`), an absolute
path, or one starting with `.` or `~` is a local path and is returned unchanged (a URL copied
into a local cache first, `csd_jax.runtime.paths.local_copy`); otherwise a
string of the form `owner/name[@revision]` (a branch, tag or commit hash) is a hub id, fetched
with `huggingface_hub.snapshot_download` into (or read from) huggingface_hub's cache, so that
`HF_HUB_OFFLINE=1` with a filled cache works. Only what the port reads is fetched: config,
generation config, tokenizer and chat template files, and the safetensors weights (the shards
that the index names, not every `*.safetensors` of the repository: some hold a second, consolidated
copy). A repository with PyTorch `.bin` / `.pt` or GGUF weights only is refused in one line.

Each hub id is resolved once per process (later calls return the same snapshot), and one log
line names the snapshot and its commit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re

from etils import epath

from csd_jax.runtime import paths
from csd_jax.errors import UserError

logger = logging.getLogger("csd_jax.hub")

# Hub repository names: letters, digits, `-`, `_`, `.` (huggingface_hub validates the rest:
# length, `--`, `..`). A revision may hold `/` (`refs/pr/1`), so it is everything after the `@`.
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[^@\s]+))?")
_COMMIT = re.compile(r"[0-9a-f]{40}")

CONFIG_PATTERNS = ("config.json", "generation_config.json")
TOKENIZER_PATTERNS = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "*.model",
                      "*.tiktoken", "chat_template.jinja", "chat_template.json",
                      "additional_chat_templates/*")
INDEX_PATTERN = "*.safetensors.index.json"
WEIGHT_PATTERNS = ("*.safetensors", INDEX_PATTERN)
_OTHER_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
_NOT_WEIGHTS = {"training_args.bin"}   # a Trainer's pickled arguments, beside many checkpoints


@dataclasses.dataclass(frozen=True)
class HubId:
  """A hub repository and an optional revision (None: the default branch)."""

  repo_id: str
  revision: str | None = None

  def __str__(self) -> str:
    return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(path: str | os.PathLike) -> HubId | None:
  """The hub id `path` names, or None when it is a local path (it exists, is absolute, starts
  with `.` or `~`, or is a URL) or not of the form `owner/name[@revision]`."""
  text = os.fspath(path)
  if (not text or "://" in text or text.startswith((".", "~", "/"))
      or os.path.isabs(text) or os.path.lexists(text)):
    return None
  match = _HUB_ID.fullmatch(text)
  if match is None:
    return None
  return HubId(match["repo"], match["revision"])


def cache_dir() -> str:
  """huggingface_hub's cache directory (HF_HUB_CACHE, else HF_HOME/hub)."""
  from huggingface_hub import constants

  return str(constants.HF_HUB_CACHE)


def _offline() -> bool:
  from huggingface_hub import constants

  return bool(constants.HF_HUB_OFFLINE)


# (repo, revision, cache dir, weights) -> snapshot; a snapshot with weights serves a lookup
# without them. Resolving again would fetch again online and log again.
_RESOLVED: dict[tuple[str, str | None, str, bool], epath.Path] = {}


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")


def resolve(path: str | os.PathLike, *, weights: bool = True) -> epath.Path:
  """`path` as a directory to read: a local path unchanged, a hub id's cached snapshot.

  Args:
    weights: fetch (and require) the safetensors weights; False for a tokenizer only.

  Raises:
    UserError: the repository is not in the cache while offline, not found or gated on the
      hub, has no such revision, or has no safetensors weights (only `.bin` / GGUF ones).
  """
  if paths.is_remote(path):   # gs://...: safetensors and tokenizers read local files
    skip = () if weights else _WEIGHT_SUFFIXES   # a tokenizer needs none of the weights
    return epath.Path(paths.local_copy(path, skip_suffixes=skip))
  hub_id = parse_hub_id(path)
  if hub_id is None:
    return epath.Path(path)
  return snapshot(hub_id, weights=weights)


def snapshot(hub_id: HubId, *, weights: bool = True) -> epath.Path:
  """The cached snapshot of `hub_id` (downloaded when online and not cached); see `resolve`."""
  cache = cache_dir()
  for key in ((hub_id.repo_id, hub_id.revision, cache, True),
              (hub_id.repo_id, hub_id.revision, cache, weights)):
    if key in _RESOLVED:
      return _RESOLVED[key]
  patterns = [*CONFIG_PATTERNS, *TOKENIZER_PATTERNS]
  directory = _download(hub_id, hub_id.revision, [*patterns, INDEX_PATTERN] if weights
                        else patterns)
  commit = directory.name
  if weights:
    # Pinned to the commit just resolved: a branch that moves between the calls cannot mix
    # two commits' files.
    directory = _download(hub_id, commit, [*patterns, *_weight_files(directory)])
    _check_weights(hub_id, directory)
  logger.info("%s: Hugging Face hub snapshot %s (revision %s, commit %s)", hub_id, directory,
              hub_id.revision or "main", commit)
  _RESOLVED[(hub_id.repo_id, hub_id.revision, cache, weights)] = directory
  return directory


def cached_file(path: str | os.PathLike, name: str) -> epath.Path | None:
  """File `name` of a model directory or hub id, None where it is not there; a hub id is read
  from the local cache only (never downloaded)."""
  hub_id = parse_hub_id(path)
  if hub_id is None:
    candidate = epath.Path(path) / name
    return candidate if candidate.exists() else None
  try:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(hub_id.repo_id, name, revision=hub_id.revision)
  except Exception:  # noqa: BLE001 (an id huggingface_hub rejects: nothing cached)
    return None
  return epath.Path(found) if isinstance(found, str) else None


def _weight_files(directory: epath.Path) -> list[str]:
  """The safetensors files to fetch: the shards an index names, else every `*.safetensors`."""
  for index in sorted(directory.glob(INDEX_PATTERN)):
    try:
      shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError):
      continue   # the loader names a broken index; fetch what a directory without one holds
    return [index.name, *shards]
  return list(WEIGHT_PATTERNS)


def _download(hub_id: HubId, revision: str | None, patterns: list[str]) -> epath.Path:
  """snapshot_download, with huggingface_hub's errors told in one line each."""
  from huggingface_hub import snapshot_download
  from huggingface_hub import errors as hub_errors

  where = f"hub repo {hub_id.repo_id} (revision {hub_id.revision or 'main'})"
  local = "or pass a local model directory"
  try:
    return epath.Path(snapshot_download(hub_id.repo_id, revision=revision,
                                        allow_patterns=patterns))
  except hub_errors.GatedRepoError as error:
    raise UserError(f"{where} is gated: accept its terms on huggingface.co and log in "
                    f"(`hf auth login` or HF_TOKEN), {local}") from error
  except hub_errors.RepositoryNotFoundError as error:
    raise UserError(f"{where} not found on the Hugging Face hub (or private: log in with "
                    f"`hf auth login` or HF_TOKEN); check the id, {local}") from error
  except hub_errors.RevisionNotFoundError as error:
    raise UserError(f"{where}: no such revision (branch, tag or commit) on the hub; pass "
                    f"another @revision, {local}") from error
  except getattr(hub_errors, "IncompleteSnapshotError", ()) as error:
    raise UserError(f"{where}: the cached snapshot in {cache_dir()} misses files; download "
                    f"it again online (HF_HUB_OFFLINE unset), {local}") from error
  except hub_errors.LocalEntryNotFoundError as error:
    reason = ("HF_HUB_OFFLINE=1 forbids downloading it" if _offline()
              else "the hub could not be reached")
    raise UserError(f"{where} is not in the Hugging Face cache {cache_dir()} and {reason}; "
                    f"download it once online (`hf download {hub_id.repo_id}`), point "
                    f"HF_HUB_CACHE at a filled cache, {local}") from error
  except hub_errors.HFValidationError as error:
    raise UserError(f"{hub_id}: not a valid hub id ({str(error).splitlines()[0]}); pass "
                    f"owner/name[@revision], {local}") from error
  except (hub_errors.HfHubHTTPError, OSError) as error:   # the hub is down, a proxy, a disk
    raise UserError(f"{where}: download failed ({type(error).__name__}: "
                    f"{str(error).splitlines()[0] if str(error) else 'no detail'}); retry, "
                    f"{local}") from error


def _repo_files(hub_id: HubId, directory: epath.Path) -> set[str]:
  """The repository's files as far as known without fetching any: the snapshot's (a cache
  filled by transformers may hold .bin files), the tree listing huggingface_hub cached when it
  downloaded, and the hub's listing when online."""
  names = {os.path.relpath(os.path.join(root, f), directory)   # the cache is local: os.walk
           for root, _, files in os.walk(directory) for f in files}
  commit = directory.name
  try:
    from huggingface_hub import get_cached_repo_tree   # huggingface_hub >= 1.x

    return names | {f.path for f in get_cached_repo_tree(hub_id.repo_id, revision=commit)}
  except Exception:  # noqa: BLE001 (no tree listing cached, or an older huggingface_hub)
    pass
  if not _offline():
    try:
      from huggingface_hub import list_repo_files

      names |= set(list_repo_files(hub_id.repo_id, revision=commit))
    except Exception:  # noqa: BLE001 (unreachable: judge by the snapshot alone)
      pass
  return names


def _check_weights(hub_id: HubId, directory: epath.Path) -> None:
  if any(directory.glob("*.safetensors")):
    return
  files = _repo_files(hub_id, directory)
  where = f"hub repo {hub_id} (snapshot {directory})"
  gguf = sorted(f for f in files if f.endswith(".gguf"))
  other = sorted(f for f in files if f.endswith(_OTHER_WEIGHTS)
                 and f.rsplit("/", 1)[-1] not in _NOT_WEIGHTS)
  if other:
    named = ", ".join(other[:3]) + (" ..." if len(other) > 3 else "")
    raise UserError(
        f"{where} has only PyTorch weights ({named}); csd-jax reads safetensors only: "
        "convert them (transformers: AutoModelForCausalLM."
        "from_pretrained(ID).save_pretrained(DIR, safe_serialization=True)) and pass DIR")
  if gguf:
    raise UserError(f"{where} has only GGUF weights ({gguf[0]}); convert one with `csd-jax "
                    "convert-gguf FILE OUT_DIR` and pass OUT_DIR")
  raise UserError(f"{where} has no *.safetensors weights; pass a repository or local "
                  "directory with model.safetensors (or shards with an index)")


def clear_cache() -> None:
  """Forget the snapshots resolved so far (tests that swap caches)."""
  _RESOLVED.clear()

